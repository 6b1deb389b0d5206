"""Device hosts: the scheduling and residency policies (pure), and one host serving two pools
against a real nats-server, running the more urgent task first."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch

from autoscaler.placement import Device
from autoscaler.residency import PoolNeed, Residency, copies_wanted, erlang_c, plan
from common import bus, subjects
from common.messages import (
    Plan,
    PlanNode,
    ReplicaStatus,
    RequestState,
    Task,
    decode,
    encode,
    now,
)
from common.settings import Settings
from common.store import open_store
from common.tracking import RequestTracker
from services import liveness, scheduling
from services.core import ModelCore, Result, WorkItem
from services.feed import PoolFeed
from services.host import DeviceHost

GB = 10**9


# --- scheduling (pure) ---------------------------------------------------------------------

def test_least_slack_counts_the_work_ahead_and_fifo_the_arrival():
    at = 100.0
    # A: deadline in 10 s, 9 s of work ahead (1 s slack); B: deadline in 5 s, 1 s of work (4 s)
    a = scheduling.Urgency(deadline_at=at + 10, work_s=9.0, since=2.0)
    b = scheduling.Urgency(deadline_at=at + 5, work_s=1.0, since=1.0)
    free = scheduling.Urgency(deadline_at=None, work_s=0.0, since=0.0)
    assert a.slack_s(at) == 1.0 and free.slack_s(at) == math.inf
    assert scheduling.most_urgent([b, free, a], at, scheduling.LeastSlack()) == [2, 0, 1]
    assert scheduling.most_urgent([b, free, a], at, scheduling.Fifo()) == [1, 0, 2]
    with pytest.raises(ValueError, match="host_scheduler"):
        scheduling.scheduler("random")


def test_a_host_takes_a_task_only_when_it_could_start_it_soon():
    at, policy = 100.0, scheduling.LeastSlack()
    idle: list[scheduling.Urgency] = []
    urgent = scheduling.Urgency(deadline_at=at + 1.0, work_s=0.6, since=at, remaining_s=0.5)
    relaxed = scheduling.Urgency(deadline_at=at + 60.0, work_s=0.6, since=at, remaining_s=0.5)
    # a long request held, with 20 s of slack left (a FLUX.1-dev one, say)
    long = scheduling.Urgency(deadline_at=at + 30.0, work_s=10.0, since=at - 5,
                              remaining_s=8.0)
    assert scheduling.may_take(relaxed, 0.5, idle, at, policy, eligible_s=0.01)
    # the urgent task goes first and pushes the long one back by 0.5 s: it can afford that
    assert scheduling.may_take(urgent, 0.5, [long], at, policy, eligible_s=0.01)
    # the relaxed one is less urgent, but its 0.5 s are a small share of the long one's 20 s
    # of slack: it runs first, and its request moves on
    assert scheduling.may_take(relaxed, 0.5, [long], at, policy, eligible_s=0.01)
    # 6 s of relaxed work would wait behind 8 s of held work: it stays in the queue
    bulky = scheduling.Urgency(deadline_at=at + 60.0, work_s=6.0, since=at, remaining_s=6.0)
    assert not scheduling.may_take(bulky, 6.0, [long], at, policy, eligible_s=0.01)
    # not when it would make the held request late
    tight = scheduling.Urgency(deadline_at=at + 8.2, work_s=8.0, since=at - 5, remaining_s=8.0)
    assert not scheduling.may_take(urgent, 0.5, [tight], at, policy, eligible_s=0.01)
    # first come first served: whatever is held goes first
    assert not scheduling.may_take(urgent, 0.5, [long], at, scheduling.Fifo(), eligible_s=0.01)


def test_a_held_task_overtaken_by_more_urgent_work_goes_back():
    """An idle device's feeds all fetch at once: a decode taken first, then a denoiser task
    more urgent than it. The decode would now wait the denoiser's 1.8 s: it goes back to its
    queue for a device that can start it sooner; behind a short step it stays."""
    at, policy = 100.0, scheduling.LeastSlack()
    decode = scheduling.Urgency(deadline_at=at + 2.0, work_s=0.25, since=at - 2,
                                remaining_s=0.25)  # 1.75 s of slack
    denoise = scheduling.Urgency(deadline_at=at + 2.85, work_s=2.05, since=at - 1.1,
                                 remaining_s=1.8)  # 0.8 s: more urgent, too little to share
    clip = scheduling.Urgency(deadline_at=at + 3.9, work_s=2.1, since=at, remaining_s=0.005)
    assert scheduling.overtaken([decode], [[denoise]], at, policy, eligible_s=0.01) == [0]
    assert scheduling.overtaken([decode], [[clip]], at, policy, eligible_s=0.01) == []
    assert scheduling.overtaken([decode, denoise], [[denoise], [decode]], at, policy,
                                eligible_s=0.01) == [0]
    assert scheduling.ahead_s(decode, [denoise, clip], at, policy) == pytest.approx(1.8)
    # with more slack the denoiser can spare the decode's 0.25 s: the decode runs first
    relaxed = dataclasses.replace(denoise, deadline_at=at + 3.5)
    assert scheduling.overtaken([decode], [[relaxed]], at, policy, eligible_s=0.01) == []
    assert scheduling.run_next([relaxed, decode, clip], at, policy)[0] == 2  # the shortest
    assert scheduling.run_next([denoise, decode], at, policy) == [0, 1]
    assert scheduling.run_next([relaxed, decode], at, scheduling.Fifo()) == [1, 0]


def test_a_short_task_steals_from_a_running_one_by_what_it_can_spare():
    """Halfway through a 1.8 s denoise whose request is on track, its rank (work counted
    whole) has hardly any slack left, but what it can spare (the slack of its remaining 0.9 s)
    is 0.4 s: a 45 ms text encoder runs at the next step boundary, not after the denoise."""
    at, policy = 100.0, scheduling.LeastSlack()
    running = scheduling.Urgency(deadline_at=at + 1.4, work_s=2.05, since=at - 2,
                                 remaining_s=0.9, done_s=0.9)
    assert running.slack_s(at) == pytest.approx(-0.65)
    assert running.spare_s(at) == pytest.approx(0.25)
    t5 = scheduling.Urgency(deadline_at=at + 4.2, work_s=2.1, since=at, remaining_s=0.045)
    assert scheduling.steals(t5, [running], at, policy)
    assert scheduling.may_take(t5, 0.045, [running], at, policy, eligible_s=0.01)
    assert scheduling.run_next([running, t5], at, policy) == [1, 0]
    # the same denoise not started yet (nothing done): it has only its rank's slack to spare
    waiting = dataclasses.replace(running, remaining_s=1.8, done_s=0.0)
    assert not scheduling.steals(t5, [waiting], at, policy)


def test_a_batch_grows_only_while_its_members_keep_their_deadlines():
    """Step time grows with the batch (10 ms alone, +5 ms per extra task): four tasks of 8
    steps with plenty of slack run together; with 0.2 s left for the most urgent, only as many
    as keep it (and the others) in time; one already late does not hold the others back."""
    at, policy = 100.0, scheduling.LeastSlack()

    def step_s(n: int) -> float:
        return 0.010 + 0.005 * (n - 1)

    relaxed = [scheduling.Member(at + 5.0, 8, 0.02) for _ in range(4)]
    assert scheduling.batch_size(relaxed, step_s, at, policy) == 4
    tight = [scheduling.Member(at + 0.2, 8, 0.02), *relaxed[1:]]
    # 8 steps at 20 ms (a batch of 3) + 0.02 s = 0.18 s fits 0.2 s; at 25 ms (4) it does not
    assert scheduling.batch_size(tight, step_s, at, policy) == 3
    late = [scheduling.Member(at + 0.01, 8, 0.02), *relaxed[1:]]
    assert scheduling.batch_size(late, step_s, at, policy) == 4
    no_deadlines = [scheduling.Member(None, 8, 0.0)] * 3
    assert scheduling.batch_size(no_deadlines, step_s, at, policy) == 3
    # first come first served batches whatever it can (the monolithic baselines)
    assert scheduling.batch_size(tight, step_s, at, scheduling.Fifo()) == 4


def test_step_times_of_unmeasured_batch_sizes():
    assert scheduling.step_time({}, 4, default=0.02) == 0.02
    # one size seen: no gain from batching assumed (an upper bound)
    assert scheduling.step_time({1: 0.01}, 4) == pytest.approx(0.04)
    assert scheduling.step_time({4: 0.04}, 2) == pytest.approx(0.04)
    # two or more: the line through them (a fixed part and a part per task)
    assert scheduling.step_time({1: 0.010, 3: 0.014}, 8) == pytest.approx(0.024)
    assert scheduling.step_time({1: 0.010, 3: 0.014}, 3) == 0.014  # measured wins


# --- residency (pure) ----------------------------------------------------------------------

def test_erlang_c_matches_known_values():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(2, 2.0) == 1.0 and erlang_c(3, 0.0) == 0.0


def test_copies_cover_demand_and_the_wait_a_deadline_allows():
    assert copies_wanted(0.0, 2.0, target_wait_s=2.0, most=8) == 0
    # 0.1/s of a 10 s task: one copy keeps up on average, but a second request arriving while
    # one runs would wait past its slack; Erlang C asks for more
    assert copies_wanted(0.1, 10.0, target_wait_s=10.0, most=8) >= 2
    # a cheap, rare task needs one
    assert copies_wanted(0.1, 0.05, target_wait_s=0.05, most=8) == 1
    assert copies_wanted(100.0, 1.0, target_wait_s=1.0, most=8) == 8  # capped
    # tasks queued now that no device has taken: one more copy each
    assert copies_wanted(0.0, 1.0, queued=3, target_wait_s=1.0, most=8) == 4


def test_wants_are_held_at_their_peak_over_the_window():
    state = Residency(window_s=10.0)
    held, state = state.step(0.0, {"a": 4})
    held, state = state.step(5.0, {"a": 1})
    assert held["a"] == 4
    held, state = state.step(11.0, {"a": 1})
    assert held["a"] == 1


def test_long_run_rates_follow_arrivals_slowly():
    state = Residency(window_s=10.0)
    assert state.rates(0.0, {"a": 4.0}) == {"a": 0.0}  # nothing known before the first tick
    _, state = state.step(0.0, {"a": 1}, {"a": 0.0})
    rates = state.rates(1.0, {"a": 4.0})  # one busy second moves a tenth of the way
    assert rates["a"] == pytest.approx(0.4)
    _, state = state.step(1.0, {"a": 1}, rates)
    assert state.rates(31.0, {"a": 2.0})["a"] == pytest.approx(2.0)


def test_residency_places_one_of_each_then_fills_memory_by_need():
    devices = [Device(f"gpu:{i}", 80 * GB) for i in range(4)]
    needs = {"big": PoolNeed("big", 30 * GB, want=4), "mid": PoolNeed("mid", 25 * GB, want=1),
             "small": PoolNeed("small", 1 * GB, want=1)}
    placed = plan(needs, devices)
    assert all(placed[p] for p in needs)
    assert len(placed["big"]) == 4 and len(placed["small"]) == 4
    for d in devices:
        assert sum(needs[p].memory_bytes for p, w in placed.items() if d.id in w) <= d.memory_bytes
    # what runs stays where it is
    again = plan(needs, devices, placed)
    assert again == placed


def test_a_pool_below_its_want_evicts_surplus_copies():
    devices = [Device(f"gpu:{i}", 50 * GB) for i in range(3)]
    current = {"a": ["gpu:0", "gpu:1", "gpu:2"]}  # a surplus copy on every device
    needs = {"a": PoolNeed("a", 30 * GB, want=1), "b": PoolNeed("b", 30 * GB, want=2)}
    placed = plan(needs, devices, current)
    assert len(placed["b"]) == 2 and len(placed["a"]) == 1
    assert not set(placed["a"]) & set(placed["b"])
    # a pool at its want is not evicted for another's
    tight = plan({**needs, "b": PoolNeed("b", 30 * GB, want=3)}, devices, placed)
    assert len(tight["a"]) == 1 and len(tight["b"]) == 2


# --- one host, two pools, a real nats-server -------------------------------------------------

class RecordingCore(ModelCore):
    """Each item runs ``params["steps"]`` steps of ``step_s``; every step is recorded."""

    kind = "vae_decoder"
    ops = ("decode",)

    def __init__(self, name: str, log: list[str], lock: threading.Lock, step_s: float) -> None:
        super().__init__(Path("."), max_batch=1)
        self.name, self.log, self.lock, self.step_s = name, log, lock, step_s

    def load(self) -> None:
        pass

    def start(self, item: WorkItem) -> Any:
        return {"item": item, "done": 0, "total": int(item.params.get("steps", 1))}

    def step(self, states: list[Any]) -> None:
        time.sleep(self.step_s)
        with self.lock:
            self.log.extend(s["item"].request_id.split("-")[-1] for s in states)
        for state in states:
            state["done"] += 1

    def done(self, state: Any) -> bool:
        return state["done"] >= state["total"]

    def progress(self, state: Any) -> tuple[int, int]:
        return state["done"], state["total"]

    def finish(self, state: Any) -> Result:
        return Result({"image": torch.zeros(1, 2, 2, 3, dtype=torch.uint8)})


class Harness:
    """A real nats-server's bus, request tracking and device hosts started on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.hosts: list[tuple[DeviceHost, list[asyncio.Task]]] = []

    async def __aenter__(self) -> Harness:
        self.nc = await bus.connect(self.settings, name="test")
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_topology(self.js, self.settings)
        self.store = open_store(self.settings)
        self.tracker = RequestTracker(self.js, buckets, self.store)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for host, _ in self.hosts:
            host.drain()
        await asyncio.gather(*(t for _, tasks in self.hosts for t in tasks))
        await self.store.close()
        await self.nc.close()

    async def host(self, name: str, pools: tuple[str, ...], **settings: Any) -> DeviceHost:
        """A host serving ``pools`` (0.3 s steps), once every pool is ready."""
        host = DeviceHost(self.settings.model_copy(update=settings), name, device=name)
        tasks = [asyncio.create_task(host.serve())]
        ready = [asyncio.Event() for _ in pools]
        tasks += [asyncio.create_task(host.run_pool(
            RecordingCore(p, self.log, self.lock, 0.3), p, "m", f"{p}@{name}", ready=r))
            for p, r in zip(pools, ready, strict=True)]
        self.hosts.append((host, tasks))
        for event in ready:
            await event.wait()
        return host

    async def submit(self, request_id: str, pool: str, steps: int,
                     deadline_s: float | None, est_s: float = 0.0) -> None:
        at = now()
        plan_ = Plan(nodes={"decode": PlanNode(kind="vae_decoder", pool=pool, op="decode",
                                               est_s=est_s)},
                     output="decode.image")
        await self.tracker.create(RequestState(id=request_id, workflow="t", status="queued",
                                               created_at=at, updated_at=at))
        task = Task(request_id=request_id, workflow="t", node="decode", plan=plan_,
                    params={"steps": steps}, inputs={}, submitted_at=at, published_at=at,
                    deadline_at=None if deadline_s is None else at + deadline_s)
        await self.js.publish(f"lego.tasks.{pool}", encode(task))

    async def finished(self, *request_ids: str) -> list[RequestState]:
        states = await self.ended(*request_ids)
        for state in states:
            assert state.status == "succeeded", state
        return states

    async def ended(self, *request_ids: str) -> list[RequestState]:
        states = []
        async with asyncio.timeout(30):
            for request_id in request_ids:
                state = await self.tracker.get(request_id)
                while state is None or not state.done:
                    await asyncio.sleep(0.05)
                    state = await self.tracker.get(request_id)
                states.append(state)
        return states

    async def started(self) -> None:
        async with asyncio.timeout(10):
            while not self.log:
                await asyncio.sleep(0.02)


async def test_a_step_s_fetch_window_moves_when_its_expected_end_does(settings: Settings):
    """A split step whose ask no helper took runs whole, so ends later than its split was
    expected to: its window moves to the whole step's end; a step that ended opens it."""
    host = DeviceHost(settings.model_copy(update={"host_fetch_lead_s": 0.005}), "h",
                      device="cpu:0")
    host.open_window_in(0.05)  # the split's expected end
    host.open_window_in(0.5)  # no helper took it: the whole step's, from now
    await asyncio.sleep(0.2)
    assert host.windows == 0  # not at the split's end
    host.open_window_in(0.0)  # it ended early: at once, and no later one
    assert host.windows == 1
    await asyncio.sleep(0.5)
    assert host.windows == 1


@pytest.mark.timeout(60)
async def test_a_model_made_resident_is_out_of_the_garbage_collectors_walks(settings: Settings):
    """A full collection walks every tracked object (125 ms with torch and diffusers loaded,
    every host of the process standing still): a loaded model is not among them."""
    async with Harness(settings) as h:
        host = await h.host("cpu:0", ("pool-a",))
        core = host.feeds["pool-a@cpu:0"].core
        assert not any(o is core for o in gc.get_objects())


async def _order(settings: Settings, scheduler: str) -> list[str]:
    """Run a 4-step blocker on pool A; while it runs, submit X (pool C, deadline in 60 s) and
    Y (pool B, deadline in 5 s); return the order of steps the one host ran."""
    async with Harness(settings) as h:
        await h.host("cpu:0", ("pool-a", "pool-b", "pool-c"), host_eligible_s=60.0,
                     host_poll_s=0.2,
                     host_scheduler=scheduler.replace("leastslack", "least_slack"))
        await h.submit(f"{scheduler}-blocker", "pool-a", 4, None)
        await h.started()
        await h.submit(f"{scheduler}-x", "pool-c", 1, 60.0)
        await asyncio.sleep(0.05)
        await h.submit(f"{scheduler}-y", "pool-b", 1, 5.0)
        await h.finished(*(f"{scheduler}-{n}" for n in ("blocker", "x", "y")))
    return h.log


@pytest.mark.timeout(90)
async def test_one_host_serving_two_pools_runs_the_more_urgent_task_first(settings: Settings):
    order = await _order(settings, "leastslack")
    # Y (pool B, 5 s deadline) goes before X (pool C, 60 s), and both before the blocker's
    # remaining steps (pool A, no deadline), though those came first
    assert order[0] == "blocker" and order.index("y") < order.index("x")
    assert order.index("x") < len(order) - 1 - order[::-1].index("blocker")
    fifo = await _order(settings, "fifo")
    assert fifo == ["blocker"] * 4 + ["x", "y"]


@pytest.mark.timeout(90)
async def test_a_host_that_got_busy_hands_the_task_back_for_an_idle_one(settings: Settings):
    """Host 1's fetch for pool A is outstanding when pool B's urgent work makes it busy; the A
    task it then receives would wait behind that work, so it goes back to the queue and host 2,
    idle, runs it."""
    async with Harness(settings) as h:
        busy = await h.host("gpu:1", ("pool-a", "pool-b"), host_poll_s=10.0)
        await h.submit("urgent", "pool-b", 3, 1.5)  # 0.9 s of work, 0.6 s to spare
        await h.started()
        await h.submit("later", "pool-a", 3, 30.0)  # less urgent: it would wait 0.6 s
        await asyncio.sleep(0.2)
        await h.host("gpu:2", ("pool-a",), host_poll_s=0.2)
        urgent, later = await h.finished("urgent", "later")
        assert urgent.timings[-1].replica == "pool-b@gpu:1"
        assert later.timings[-1].replica == "pool-a@gpu:2"
        assert busy.feeds["pool-a@gpu:1"].stats.tasks_handed_back == 1


@pytest.mark.timeout(90)
async def test_a_new_arrival_goes_to_an_idle_host_not_to_a_busy_ones_next_step(
        settings: Settings):
    """Host 1's fetch for pool B went out while it was idle; then it got busy with pool A. A
    pool-B task with time to spare, which host 1 could run between its steps, reaches that
    fetch: it goes back to the queue (nothing waits behind it), and host 2, idle, runs it at
    once; host 1's later fetches take only what is already queued."""
    async with Harness(settings) as h:
        busy = await h.host("gpu:1", ("pool-a", "pool-b"), host_poll_s=10.0)
        await h.submit("blocker", "pool-a", 4, None)
        await h.started()
        await h.host("gpu:2", ("pool-b",), host_poll_s=0.2)
        await asyncio.sleep(0.3)
        await h.submit("spare", "pool-b", 1, 30.0)
        blocker, spare = await h.finished("blocker", "spare")
        assert blocker.timings[-1].replica == "pool-a@gpu:1"
        assert spare.timings[-1].replica == "pool-b@gpu:2"
        assert busy.feeds["pool-b@gpu:1"].stats.tasks_handed_back == 1


@pytest.mark.timeout(90)
async def test_a_new_arrival_passes_two_busy_hosts_stale_fetches_to_reach_an_idle_one(
        settings: Settings):
    """Hosts 1 and 2 each fetched for pool B while idle, then got busy with pool A; host 3,
    idle, fetches for pool B after them. JetStream hands a new pool-B task to the oldest
    fetch first: host 1's or 2's, which hand it back, each in turn, until it reaches host 3.
    (Handed back once only, it stayed on the second busy host, behind its step.)"""
    async with Harness(settings) as h:
        busy = [await h.host(f"gpu:{n}", ("pool-a", "pool-b"), host_poll_s=10.0)
                for n in (1, 2)]
        for n in (1, 2):
            await h.submit(f"blocker{n}", "pool-a", 6, None)
        async with asyncio.timeout(10):
            while {"blocker1", "blocker2"} - set(h.log):
                await asyncio.sleep(0.02)
        await h.host("gpu:3", ("pool-b",), host_poll_s=0.2)
        await asyncio.sleep(0.3)
        await h.submit("spare", "pool-b", 1, 30.0)
        [spare] = await h.finished("spare")
        assert spare.timings[-1].replica == "pool-b@gpu:3"
        assert spare.timings[-1].held_ms < 100  # it did not wait for a blocker's step
        assert sum(b.feeds[f"pool-b@gpu:{n}"].stats.tasks_handed_back
                   for n, b in zip((1, 2), busy, strict=True)) == 2


@pytest.mark.timeout(90)
async def test_a_fetch_that_began_busy_does_not_wait_once_the_work_ended(settings: Settings):
    """A busy host's fetch (batches of 2: it may take a second task) outlasts its only task,
    which ends meanwhile: the host is idle by then, so it fetches again at once, rather than
    waiting for a step boundary that will never come. (The next task would wait forever.)"""
    async with Harness(settings) as h:
        host = await h.host("cpu:0", ("pool-a",), host_eligible_s=0.0, host_probe_s=1.5,
                            host_poll_s=0.2)
        host.feeds["pool-a@cpu:0"].core.max_batch = 2
        await h.submit("first", "pool-a", 1, None, est_s=0.3)
        await h.finished("first")
        await asyncio.sleep(1.5)  # the fetch that went out while it ran has timed out
        await h.submit("second", "pool-a", 1, None, est_s=0.3)
        async with asyncio.timeout(5):
            await h.finished("second")


@pytest.mark.timeout(90)
async def test_a_busy_host_takes_queued_work_just_before_its_step_ends(settings: Settings):
    """An urgent pool-B task queues while the host runs a pool-A task's steps and no other
    device holds pool B: the host takes it in the step's fetch window, just before the step
    ends, so it runs at that boundary. (Taken at the boundary, it came once the next step had
    begun, and waited for that whole step too.)"""
    async with Harness(settings) as h:
        await h.host("gpu:1", ("pool-a", "pool-b"))
        await h.submit("warm", "pool-b", 1, 5.0)  # pool B's tasks are urgent ones
        await h.finished("warm")
        await h.submit("blocker", "pool-a", 6, 60.0)
        async with asyncio.timeout(10):
            while h.log.count("blocker") < 2:  # its steps' time is measured by the third
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # into the third step
        await h.submit("urgent", "pool-b", 1, 5.0)
        _, urgent = await h.finished("blocker", "urgent")
        assert h.log == ["warm", *["blocker"] * 3, "urgent", *["blocker"] * 3]
        # held on the device only for the rest of the step it came in, not for another one
        assert urgent.timings[-1].held_ms < 150


class DeviceCore(RecordingCore):
    """A ``RecordingCore`` on a device that computes nothing while it loads a model: its steps
    and its load (``load_s``) hold ``device``."""

    def __init__(self, name: str, log: list[str], lock: threading.Lock, step_s: float,
                 device: threading.Lock, load_s: float = 0.0) -> None:
        super().__init__(name, log, lock, step_s)
        self.device, self.load_s = device, load_s

    def load(self) -> None:
        with self.device:
            time.sleep(self.load_s)

    def step(self, states: list[Any]) -> None:
        with self.device:
            super().step(states)


@pytest.mark.timeout(90)
async def test_a_step_that_waited_for_a_load_is_not_a_step_time(settings: Settings):
    """Pool B's model loads (2 s) onto the device while pool A's task runs 0.1 s steps: the
    step that waited for the load took its task 2 s, but it does not count to the pool's step
    figures, which judge what can still make its deadline."""
    device = threading.Lock()
    async with Harness(settings) as h:
        host = DeviceHost(settings, "gpu:0", device="gpu:0")
        ready_a, ready_b = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(host.serve()), asyncio.create_task(host.run_pool(
            DeviceCore("a", h.log, h.lock, 0.1, device), "pool-a", "m", "pool-a@gpu:0",
            ready=ready_a))]
        h.hosts.append((host, tasks))
        await ready_a.wait()
        feed = host.feeds["pool-a@gpu:0"]
        steps: list[tuple[float, float | None]] = []
        ran = feed.ran

        def recording(group: Any, elapsed_s: float, ended_at: float, figure_s: float | None,
                      **kwargs: Any) -> None:
            steps.append((elapsed_s, figure_s))
            ran(group, elapsed_s, ended_at, figure_s, **kwargs)

        feed.ran = recording  # type: ignore[method-assign]
        await h.submit("long", "pool-a", 4, None)
        await h.started()
        tasks.append(asyncio.create_task(host.run_pool(
            DeviceCore("b", h.log, h.lock, 0.1, device, load_s=2.0), "pool-b", "m",
            "pool-b@gpu:0", ready=ready_b)))
        (state,) = await h.finished("long")
        assert state.timings[-1].run_ms > 2000  # its task waited for the load
        assert len(steps) == 4 and any(elapsed > 1.5 for elapsed, _ in steps)
        assert all(figure is None for elapsed, figure in steps if elapsed > 1.5)
        assert feed.step_time_s(1) < 0.15


@pytest.mark.timeout(60)
async def test_step_figures_from_a_slower_time_age_out_rather_than_turn_work_away(
        settings: Settings):
    """Steps measured slow (a burst's contention, a noisy neighbour) make a task look doomed;
    dropped unrun, it measures nothing, so on those figures every later task would be dropped
    too. Once the pool has run no step for ``figure_max_age_s`` its fastest figures stand in:
    the next task runs, and the replica reports its fastest step as its recent tasks' mean and
    90th percentile, which admission holds against deadlines."""
    async with Harness(settings) as h:
        host = await h.host("cpu:0", ("pool-a",), figure_max_age_s=2.0)
        feed = host.feeds["pool-a@cpu:0"]
        reports: asyncio.Queue[ReplicaStatus] = asyncio.Queue()

        async def on_status(msg: Any) -> None:
            await reports.put(decode(msg.data, ReplicaStatus))

        sub = await h.nc.subscribe(subjects.replica_subject("pool-a"), cb=on_status)

        async def report() -> ReplicaStatus:
            while not reports.empty():
                reports.get_nowait()
            await feed.publish_status()
            async with asyncio.timeout(5):
                while (status := await reports.get()).replica != feed.replica:
                    pass
            return status

        await h.submit("slow", "pool-a", 2, None)  # 0.3 s steps
        await h.finished("slow")
        feed.core.step_s = 0.05  # the contention is over
        await h.submit("fast", "pool-a", 2, None)
        await h.finished("fast")
        assert feed.step_time_s(1) > 0.15  # still weighed down by the slow steps
        fresh = await report()
        assert fresh.unit_ms_p90 is not None and fresh.unit_ms_min is not None
        assert fresh.unit_ms_p90 > 2 * fresh.unit_ms_min
        await h.submit("hopeless", "pool-a", 2, 0.3)  # 2 x 0.17 s on those figures
        (hopeless,) = await h.ended("hopeless")
        assert hopeless.error is not None and hopeless.error.code == "deadline_exceeded"
        await asyncio.sleep(2.3)
        stale = await report()
        assert stale.unit_ms_p90 == stale.unit_ms_mean == stale.unit_ms_min == fresh.unit_ms_min
        await h.submit("again", "pool-a", 2, 0.3)
        await h.finished("again")
        assert feed.step_time_s(1) < 0.15  # measured again
        await sub.unsubscribe()


def test_one_slow_step_moves_a_step_figure_by_a_bounded_share():
    """A step far slower than the figure so far counts as twice the figure: one hold-up does
    not make the pool's work look several times longer; a step beside a load not at all."""
    feed = PoolFeed(cast(Any, None), RecordingCore("a", [], threading.Lock(), 0.1), "pool-a",
                    "m", "pool-a@gpu:0", 0.0)
    task = SimpleNamespace(ran_from=0.0, ran_until=0.0, run_s=0.0, whole_s=0.0, work_s=0.0,
                           batch=1)
    group = cast(Any, [task])
    for elapsed in (0.1, 0.1, 5.0):
        feed.ran(group, elapsed, 10.0, elapsed)
    assert feed.step_time_s(1) == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)
    feed.ran(group, 5.0, 15.0, None)
    assert feed.step_time_s(1) == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)
    assert task.run_s == pytest.approx(10.2)  # the task's own time counts every step
    # a split step (a helper ran its negative branch) counts to the split figures only, and
    # to what the task's figures report at a whole step's time
    feed.ran(group, 0.06, 16.0, 0.06, split="cfg")
    assert feed.step_time_s(1) == pytest.approx(0.7 * 0.1 + 0.3 * 0.2)
    assert feed.splits["cfg"].split_s == {1: 0.06} and not feed.splits["controlnet"].split_s
    assert task.whole_s == pytest.approx(10.2 + feed.step_time_s(1))


# --- liveness ------------------------------------------------------------------------------

def test_a_stuck_step_or_event_loop_is_caught():
    clock = [0.0]
    live = liveness.Liveness(timeout_s=10.0, clock=lambda: clock[0])
    clock[0] = 9.0
    assert live.stuck() is None
    live.tick()
    live.step_started()
    clock[0] = 18.0
    live.tick()
    assert live.stuck() is None  # a long step, within the timeout
    clock[0] = 19.5
    live.tick()
    assert "a step has run for 10 s" in live.stuck()
    live.step_ended()
    assert live.stuck() is None
    clock[0] = 30.0  # no tick for 10.5 s: the event loop is blocked
    assert "event loop" in live.stuck()
    assert liveness.Liveness(timeout_s=0, clock=lambda: clock[0]).stuck() is None  # off


async def test_the_watchdog_ends_a_process_whose_loop_is_blocked():
    exits: list[int] = []
    ended = threading.Event()
    live = liveness.Liveness(timeout_s=0.3)

    def exit_(code: int) -> None:
        exits.append(code)
        ended.set()

    liveness.watch(live, "test", period_s=0.05, exit=exit_)
    await asyncio.sleep(0.2)
    assert not exits  # ticking: alive
    time.sleep(0.6)  # the event loop blocked
    assert ended.wait(2.0) and exits == [liveness.EXIT_STUCK]
