"""The shared runner against a real nats-server, driving small test cores: bounded retries,
the node's error on the request after max_deliver, recovery from a transient failure, joins,
work past its deadline dropped unrun."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from common import bus
from common.messages import Plan, PlanNode, RequestState, Task, now
from common.settings import Settings
from common.store import open_store
from common.tracking import RequestTracker
from services.core import OneShotCore, Result, WorkItem
from services.runner import NodeRunner

pytestmark = pytest.mark.timeout(60)


class FlakyCore(OneShotCore):
    """Doubles its input; raises on the first ``failures`` batches it sees."""

    kind = "vae_decoder"
    ops = ("decode",)

    def __init__(self, failures: int) -> None:
        super().__init__(Path("."), max_batch=4)
        self.failures = failures
        self.calls = 0

    def load(self) -> None:
        pass

    def run(self, items: list[WorkItem]) -> list[Result]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")
        return [Result({"image": item.inputs["latents"] * 2}) for item in items]


async def _run_one(
    settings: Settings, core: OneShotCore, deadline_at: float | None = None
) -> RequestState:
    [state] = await _run_in_turn(settings, core, [deadline_at])
    return state


async def _run_in_turn(
    settings: Settings, core: OneShotCore, deadlines: list[float | None]
) -> list[RequestState]:
    """One request per deadline (epoch seconds, or a function of the time it is sent), each
    sent once the previous one has ended."""
    from common.messages import encode

    nc = await bus.connect(settings, name="test")
    js = nc.jetstream()
    buckets = await bus.ensure_topology(js, settings)
    store = open_store(settings)
    tracker = RequestTracker(js, buckets, store)
    runner = NodeRunner(core, "test-pool", "test-model", settings)
    ready = asyncio.Event()
    serving = asyncio.create_task(runner.serve(ready))
    await ready.wait()
    plan = Plan(nodes={"decode": PlanNode(kind="vae_decoder", pool="test-pool", op="decode")},
                output="decode.image")
    states = []
    for i, deadline_at in enumerate(deadlines):
        request_id = f"r{i + 1}"
        ref = await store.put(f"tmp/{request_id}/request/latents", torch.ones(2, 2), 60)
        at = now()
        await tracker.create(RequestState(id=request_id, workflow="t", status="queued",
                                          created_at=at, updated_at=at))
        task = Task(request_id=request_id, workflow="t", node="decode", plan=plan, params={},
                    inputs={"latents": ref}, submitted_at=at, published_at=at,
                    deadline_at=deadline_at(at) if callable(deadline_at) else deadline_at)
        await js.publish("lego.tasks.test-pool", encode(task))
        state = await tracker.get(request_id)
        async with asyncio.timeout(30):
            while state is None or not state.done:
                await asyncio.sleep(0.05)
                state = await tracker.get(request_id)
        states.append(state)
    runner.drain()
    await serving
    await store.close()
    await nc.close()
    return states


async def test_failure_is_retried_then_reported(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_deliver": 3})
    state = await _run_one(settings, FlakyCore(failures=10))
    assert state.status == "failed"
    assert state.error.message == "RuntimeError: boom 3"
    assert state.error.details["attempts"] == 3 and state.error.node == "decode"


async def test_transient_failure_recovers(settings: Settings) -> None:
    core = FlakyCore(failures=1)
    state = await _run_one(settings, core)
    assert state.status == "succeeded"
    assert state.timings[0].attempt == 2
    store = open_store(settings)
    assert torch.equal(await store.get(state.image), torch.full((2, 2), 2.0))


async def test_expired_task_is_dropped_not_run(settings: Settings) -> None:
    core = FlakyCore(failures=0)
    state = await _run_one(settings, core, deadline_at=now() - 0.01)
    assert state.status == "failed"
    assert state.error.code == "deadline_exceeded"
    assert "dropped, not run" in state.error.message and state.error.node == "decode"
    assert core.calls == 0


class SlowCore(FlakyCore):
    """Takes ``seconds`` a batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__(failures=0)
        self.seconds = seconds

    def run(self, items: list[WorkItem]) -> list[Result]:
        time.sleep(self.seconds)
        return super().run(items)


async def test_a_task_expected_to_miss_is_dropped_before_it_starts(settings: Settings) -> None:
    """Nothing invested yet: a task whose work at the step time measured here would end past
    its deadline is dropped unrun, though the fastest figures (none trusted yet, nor planned)
    would have let it start and run its whole work only to end late."""
    core = SlowCore(0.4)
    first, second = await _run_in_turn(settings, core, [None, lambda at: at + 0.25])
    assert first.status == "succeeded"  # measures a step: 0.4 s
    assert second.status == "failed" and second.error.code == "deadline_exceeded"
    assert "dropped, not run" in second.error.message
    assert core.calls == 1
