"""The autoscaler for real: nats-server, the gateway, the autoscaler process and the node
processes it spawns. A burst gets a scale-up decision within about a second and new replicas
that report ready; when the load calms down, surplus replicas drain and no request fails; a
crashed replica is restarted; a pool at zero replicas cold-starts when work arrives, and the
work waits in JetStream meanwhile; node processes are forked from a template process that
did their imports."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from common import bus, subjects
from common.kinds import pool_of
from common.lifetime import stat_fields
from common.messages import ScaleEvent, decode
from common.settings import Settings
from lego.stack import Stack
from tests.conftest import nats_server
from tests.stackutil import ReplicaWatch, replica_pid, running_stack, wait_gone

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("autoscaling")
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, replicas={"upscaler": 0}, max_replicas=3, scale_down_delay_s=3.0,
        admission=False,
    ) as st:
        yield st


class Events:
    """The autoscaler's ScaleEvents, with when this test received each."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: list[tuple[float, ScaleEvent]] = []

    async def __aenter__(self) -> Events:
        self.nc = await bus.connect(self.settings, name="test-events")

        async def on_event(msg: object) -> None:
            self.seen.append((time.monotonic(), decode(msg.data, ScaleEvent)))  # type: ignore

        await self.nc.subscribe(subjects.AUTOSCALER_EVENTS, cb=on_event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def until(
        self, match: Callable[[ScaleEvent], bool], timeout_s: float = 60.0
    ) -> tuple[float, ScaleEvent]:
        async with asyncio.timeout(timeout_s):
            while True:
                found = [(t, e) for t, e in self.seen if match(e)]
                if found:
                    return found[0]
                await asyncio.sleep(0.02)


async def _submit(http: httpx.AsyncClient, **params: object) -> str:
    response = await http.post("/v1/generations", json={"prompt": "scale", **params})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def _outcomes(http: httpx.AsyncClient, ids: list[str]) -> list[dict]:
    async def one(request_id: str) -> dict:
        state: dict = {}
        try:
            async with asyncio.timeout(240):  # a request that never ends fails the test here
                while True:
                    state = (await http.get(f"/v1/generations/{request_id}?wait=30")).json()
                    if state["status"] not in ("queued", "running"):
                        return state
        except TimeoutError:
            raise AssertionError(f"request {request_id} did not end: {state}") from None

    return await asyncio.gather(*(one(i) for i in ids))


def test_burst_scales_up_fast_then_drains_without_loss(stack: Stack) -> None:
    denoiser = pool_of("denoiser", stack.settings.base_model)

    async def scenario() -> None:
        async with ReplicaWatch(stack.settings) as watch, Events(stack.settings) as events, \
                httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as http:
            await watch.until(lambda: watch.ready("denoiser"))
            ids = [await _submit(http, steps=4, seed=0)]  # a measured service rate first
            await _outcomes(http, ids)
            burst_at = time.monotonic()
            ids += await asyncio.gather(*(_submit(http, steps=20, seed=i) for i in range(24)))
            seen_at, up = await events.until(
                lambda e: e.pool == denoiser and e.after > e.before, timeout_s=30
            )
            decision_s = seen_at - burst_at
            assert decision_s < 3.0, f"scale-up decided {decision_s:.2f}s after the burst"
            assert "burst" in up.reason
            await watch.until(lambda: len(watch.ready("denoiser")) >= 2, timeout_s=240)

            # A light load (about 1 request/s, well within one replica even on a busy
            # machine) goes on while the surplus replicas drain: none of it may fail.
            async def trickle(stop: asyncio.Event) -> None:
                seed = 100
                while not stop.is_set():
                    ids.append(await _submit(http, steps=3, seed=seed))
                    seed += 1
                    await asyncio.sleep(1.0)

            stop = asyncio.Event()
            load = asyncio.create_task(trickle(stop))
            _, down = await events.until(
                lambda e: e.pool == denoiser and e.after < e.before, timeout_s=180
            )
            await asyncio.sleep(3.0)
            stop.set()
            await load
            states = await _outcomes(http, ids)
            failed = [s for s in states if s["status"] != "succeeded"]
            assert not failed, failed[:3]
            assert "down" in down.reason

            def drained() -> list:
                return [s for s in watch.latest.values()
                        if s.kind == "denoiser" and s.state in ("draining", "stopped")]

            # the replica told to stop reports it (promptly, unless the machine is busy)
            draining = await watch.until(drained, timeout_s=60)
            for status in draining:
                assert wait_gone(replica_pid(status.replica), timeout_s=60)

    asyncio.run(scenario())


def test_crashed_replica_is_restarted(stack: Stack) -> None:
    async def scenario() -> None:
        async with ReplicaWatch(stack.settings) as watch, \
                httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as http:
            [victim] = (await watch.until(lambda: watch.ready("text_encoder")))[:1]
            os.kill(replica_pid(victim.replica), signal.SIGKILL)
            await watch.until(
                lambda: [s for s in watch.ready("text_encoder") if s.replica != victim.replica
                         and s.at > victim.at],
                timeout_s=180,
            )
            [state] = await _outcomes(http, [await _submit(http, steps=2, seed=3)])
            assert state["status"] == "succeeded"

    asyncio.run(scenario())


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def test_pool_at_zero_cold_starts_while_work_waits(stack: Stack) -> None:
    upscaler = pool_of("upscaler", stack.settings.upscaler_model)

    async def scenario() -> None:
        async with ReplicaWatch(stack.settings) as watch, Events(stack.settings) as events, \
                httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as http:
            await asyncio.sleep(1.5)  # every live replica has reported
            assert not [s for s in watch.latest.values() if s.pool == upscaler]
            request_id = await _submit(http, workflow="txt2img-hires", steps=2, seed=9,
                                       deadline_s=600)
            _, start = await events.until(lambda e: e.pool == upscaler, timeout_s=60)
            assert start.before == 0 and start.after >= 1 and "cold start" in start.reason
            [state] = await _outcomes(http, [request_id])
            assert state["status"] == "succeeded", state
            started = await watch.until(lambda: len(ready := [
                s for s in watch.latest.values() if s.pool == upscaler and s.state == "ready"
            ]) == start.after and ready, timeout_s=120)
            for replica in started:  # each says how long its cold start took, and on what
                assert replica.startup_s is not None and replica.startup_s >= replica.load_s > 0
                parts = replica.startup_parts
                assert set(parts) == {"process", "import", "weights"}
                assert parts["process"] >= 0 and parts["weights"] > 0, parts
                # a process of its own, forked from the template, which did the imports
                parent = int(stat_fields(replica_pid(replica.replica))[1])
                assert "autoscaler.backends.template" in _cmdline(parent), _cmdline(parent)
                assert sum(parts.values()) == pytest.approx(replica.startup_s, abs=0.005)
                assert parts["weights"] <= replica.load_s

    asyncio.run(scenario())
