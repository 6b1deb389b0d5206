"""A pool's feed on a device host: the life of one task, from fetch to ack.

Each pool resident on a device has one ``PoolFeed`` on that device's host (``services.host``).
It binds to the pool's durable JetStream pull consumer (shared by every device that holds the
model), fetches a task when the host says it could start it soon, loads its input tensors from
the store and turns it into the core's per-item state; once the host's step loop has finished
the task, the feed stores its outputs, publishes the successors' tasks (or records its part of
a join, or finishes the request) and only then acks. Transient failures are retried (nak) up
to ``max_deliver``; terminal ones fail the request. Cancelled and expired work is dropped.

The feed never runs the model: which batch runs when is the host's decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

import common
from common import bus, metrics, subjects, telemetry, webhooks
from common.errors import DeadlineExceeded, LegoError, RequestError, TerminalError
from common.messages import (
    ErrorInfo,
    JoinState,
    NodeTiming,
    Progress,
    ReplicaState,
    ReplicaStatus,
    StepPart,
    Task,
    TensorRef,
    decode,
    encode,
    error_info,
    merge_meta,
    now,
)
from common.metrics import percentile
from common.store import tensor_key
from services import parallel, scheduling
from services.core import ModelCore, WorkItem

if TYPE_CHECKING:
    from services.host import DeviceHost

log = logging.getLogger(__name__)

#: single-task steps measured on a device before its least step time bounds anything
_TRUSTED_STEPS = 8


@dataclass(frozen=True)
class TaskFigures:
    """What one finished task tells about the replica's speed (reported in ReplicaStatus)."""

    latency_ms: float  # queue + run + held + store I/O
    work_ms: float  # compute amortised over the batches it shared
    unit_ms: float  # compute per step (a split step's at a whole one's time here)
    units: int  # steps


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 3) if values else None


#: a step counts to a pool's step figures as at most this many times the figure so far
_OUTLIER = 2.0
#: times a new arrival goes back from busy hosts' fetches made while they were idle
_STALE_FETCH_HANDOFFS = 2


@dataclass(eq=False)
class Held:
    """A task this host holds: fetched, not yet acked."""

    feed: PoolFeed
    msg: Msg
    task: Task
    fetched_at: float
    attempt: int
    state: Any = None
    run_s: float = 0.0
    #: ``run_s`` with each split step counted at the time a whole step takes here: what the
    #: pool's task figures (and admission) see, since a split needs an idle device
    whole_s: float = 0.0
    work_s: float = 0.0  # run time amortised over the batch sizes it ran in
    io_s: float = 0.0
    batch: int = 1
    steps_reported: int = 0
    ran_from: float = 0.0  # wall clock of its first step's start, and of its last step's end
    ran_until: float = 0.0
    span: Any = None  # its trace span, when tracing is on
    tail_s: float = field(init=False)  # estimated work of the nodes after it (``Plan.tail_s``)

    def __post_init__(self) -> None:
        self.tail_s = self.task.plan.tail_s(self.task.node)


@dataclass
class FeedStats:
    loaded_s: float = 0.0
    startup_s: float | None = None
    startup_parts: dict[str, float] | None = None  # process, import, weights
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_retried: int = 0
    tasks_dropped: int = 0
    tasks_expired: int = 0  # of those dropped: their request could not meet its deadline
    tasks_handed_back: int = 0
    batches: int = 0
    batch_items: int = 0
    split_steps: int = 0  # steps a helper ran part of (a guidance branch, the ControlNet)
    helped_steps: int = 0  # parts of another host's steps run here
    ready: bool = False
    draining: bool = False


class PoolFeed:
    """One pool on one host (a replica of the pool, as the autoscaler and `lego status` see it)."""

    def __init__(self, host: DeviceHost, core: ModelCore, pool: str, model: str,
                 replica: str, process_started: float) -> None:
        self.host = host
        self.core = core
        self.pool = pool
        self.model = model
        self.replica = replica
        self.process_started = process_started
        self.stats = FeedStats()
        self.metrics = metrics.NodeMetrics(pool)
        self.held: list[Held] = []
        #: measured compute of one step of this pool on this device (seconds; None: not yet)
        self.step_s: float | None = None
        self._least_single_s: float | None = None  # the least a step of one task took here
        self._single_steps = 0
        self._step_by_size: dict[int, float] = {}  # batch size -> its step time (smoothed)
        #: when a step last counted to those figures (a split step, or one beside a model's
        #: load, does not: ``fresh``)
        self._figured_at: float | None = None
        #: how long and how urgent this pool's tasks have recently been (``typical``)
        self.typical_work_s: float | None = None
        self.typical_slack_s: float | None = None
        self.typical_tail_s = 0.0
        #: what its steps with a part on another device took here, per part
        #: (``services.parallel``)
        self.splits = {part: parallel.SplitFigures() for part in parallel.PARTS}
        self.stopping = False
        self.done = asyncio.Event()  # drained: fetching stopped, nothing held
        self._fetch_ended = False
        self._recent: collections.deque[TaskFigures] = collections.deque(maxlen=256)
        self._sub: Any = None
        self._window = -1  # the host's fetch window it last looked at the queue in, busy

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and bind to the pool's consumer."""
        settings = self.host.settings
        started = time.perf_counter()
        with self.host.loading_model():
            imported_s = await asyncio.to_thread(self.core.load_serialized)
        self.stats.loaded_s = time.perf_counter() - started
        self._sub = await bus.pull_subscription(
            self.host.js, subjects.TASKS_STREAM, subjects.pool_consumer(self.pool),
            subjects.task_subject(self.pool), settings,
        )
        self.stats.ready = True
        self.stats.startup_s = startup_s = time.monotonic() - self.process_started
        # the process's own start counts where this replica began with it (a node process)
        process_s = min(startup_s, max(0.0, common.STARTED_AT - self.process_started))
        weights_s = min(startup_s - process_s, max(0.0, self.stats.loaded_s - imported_s))
        self.stats.startup_parts = {
            "process": round(process_s, 3), "weights": round(weights_s, 3),
            "import": round(startup_s - process_s - weights_s, 3)}
        await self.publish_status()
        log.info("%s ready (model loaded in %.2fs)", self.replica, self.stats.loaded_s)

    def drain(self) -> None:
        """Stop fetching; what is held is finished and acked, then ``done`` is set."""
        self.stopping = True
        self.stats.draining = True
        self.host.changed()

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        await self.publish_status("stopped")
        self.core.close()
        log.info("%s stopped", self.replica)

    def check_done(self) -> None:
        if self.stopping and not self.held and self._fetch_ended:
            self.done.set()

    # --- fetching and admission ------------------------------------------------------------------

    async def fetch_loop(self) -> None:
        settings = self.host.settings
        try:
            while not self.stopping:
                if not self.host.may_fetch(self):
                    await self.host.wait_changed()
                    continue
                # One at a time: a single fetch returns on the first arrival, and the host
                # only asks when it could start the task soon (work waits in JetStream,
                # where any device holding the model can take it). A busy host (one that would
                # run it by joining a batch or taking a turn from its other work) waits for no
                # new arrival, so an idle device's fetch gets those: it takes what is already
                # queued, once a step, in the step's fetch window (``host_fetch_lead_s`` before
                # it is expected to end), so that what it takes is held by the boundary and
                # runs next, not a step later.
                idle = self.host.idle()
                if not idle:
                    if self._window == self.host.windows:
                        await self.host.wait_changed()
                        continue
                    self._window = self.host.windows
                try:
                    [msg] = await self._sub.fetch(
                        1, timeout=settings.host_poll_s if idle else settings.host_probe_s)
                except TimeoutError:
                    # Busy still, as of now (not as of the fetch: its work may have ended
                    # meanwhile, and then no step boundary would ever wake this loop).
                    if not self.host.idle():
                        await self.host.wait_changed()
                    continue
                except Exception as exc:  # noqa: BLE001 - NATS is down: wait for it, never stop
                    log.warning("%s: could not fetch (%s); retrying", self.replica, exc)
                    await asyncio.sleep(max(settings.retry_backoff_s, 0.1))
                    continue
                try:
                    # even if draining began meanwhile: ours
                    held = await self._admit(msg, waited=idle)
                except Exception:  # noqa: BLE001 - the store or NATS failed: never stop fetching
                    log.exception("%s: could not take a task; it will be redelivered",
                                  self.replica)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=settings.retry_backoff_s)
                    await asyncio.sleep(settings.retry_backoff_s)
                    continue
                if held is not None:
                    self.host.hold(held)
        finally:
            self._fetch_ended = True
            self.check_done()

    async def _admit(self, msg: Msg, *, waited: bool) -> Held | None:
        """Take a fetched task: decode, judge, load its inputs and start it. ``waited``: the
        fetch waited for an arrival (the host was idle when it asked)."""
        host = self.host
        fetched_at = now()
        try:
            task = decode(msg.data, Task)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("%s: dropping a malformed task: %s", self.replica, exc)
            await msg.term()
            return None
        held = Held(self, msg, task, fetched_at, msg.metadata.num_delivered or 1)
        host.branches.saw(task)
        self.metrics.queue_wait.observe(max(0.0, fetched_at - task.published_at))
        if telemetry.enabled():
            self._trace(held)
        if task.request_id in host.cancelled:
            await self.drop(held)
            return None
        if task.expired(fetched_at) or self.doomed(held, fetched_at):
            await self.expire(held)
            return None
        self._learn(held, fetched_at)
        # Handed back: a task this host cannot start soon, and a new arrival that reached the
        # fetch it made while idle after it got busy (an idle device's fetch may be waiting;
        # not when others queue behind it, which it would then wait behind). JetStream serves
        # the oldest fetch first, often another host's that got busy since too, so such an
        # arrival goes back up to ``_STALE_FETCH_HANDOFFS`` times: handed back once, it stayed
        # on the second busy host for a step while other devices idled; with no bound, when
        # every host is busy (a burst), it only moves between them.
        if task.handoffs < host.settings.host_max_handoffs and (
                not host.may_start(self, held)
                or waited and task.handoffs < _STALE_FETCH_HANDOFFS
                and not msg.metadata.num_pending and not host.idle()):
            try:
                await self.hand_back(held)
                return None
            except Exception as exc:  # noqa: BLE001 - then it runs here, later
                log.warning("%s: could not hand %s back (%s); keeping it", self.replica,
                            task.request_id, exc)
        node = task.plan.nodes[task.node]
        try:
            started = time.perf_counter()
            with telemetry.within(held.span):
                inputs = {name: await host.store.get(ref) for name, ref in task.inputs.items()}
            held.io_s += time.perf_counter() - started
        except KeyError as exc:
            # Inputs gone: the request ended (cancelled, failed) and was cleaned up.
            log.info("%s: inputs of %s gone (%s); dropping", self.replica, task.request_id, exc)
            await self.drop(held)
            return None
        except Exception as exc:  # noqa: BLE001 - classified in fail
            await self.fail(held, exc)
            return None
        try:
            if held.attempt == 1 and task.node in task.plan.roots():
                # Off the critical path: a compare-and-set that only moves queued -> running.
                host.spawn(host.tracker.mark_running(task.request_id))
            item = WorkItem(task.request_id, node.op, task.params, inputs, tuple(node.adapters))
            if self.core.needs_prepare(item):  # off the event loop and the step loop
                await asyncio.to_thread(self.core.prepare, item)
            held.state = self.core.start(item)
        except Exception as exc:  # noqa: BLE001 - classified in fail
            await self.fail(held, exc)
            return None
        return held

    async def hand_back(self, held: Held) -> None:
        """The host got busy while this fetch waited, or since (another pool's more urgent task
        came first): put the task back in the pool's queue, as a new message, for a device
        that can start it now (a nak would count as a failed delivery), then ack this one."""
        task = msgspec.structs.replace(held.task, handoffs=held.task.handoffs + 1)
        await self.host.js.publish(
            subjects.task_subject(self.pool), encode(task),
            headers=telemetry.inject({"Nats-Msg-Id": subjects.task_msg_id(
                task.request_id, task.node, task.handoffs)}),
        )
        await held.msg.ack()
        self.stats.tasks_handed_back += 1
        telemetry.end(held.span, outcome="handed_back")

    def _trace(self, held: Held) -> None:
        """Start the task's span, the child of its publisher's (``traceparent`` in the message
        headers), from its publication on; its queue wait is the first child."""
        task = held.task
        held.span = telemetry.start_span(
            f"node {task.node}",
            {"lego.request_id": task.request_id, "lego.workflow": task.workflow,
             "lego.node": task.node, "lego.pool": self.pool, "lego.replica": self.replica,
             "lego.attempt": held.attempt},
            headers=held.msg.headers, start_s=task.published_at,
            kind=telemetry.SpanKind.CONSUMER,
        )
        telemetry.record_span("queue_wait", held.span, task.published_at, held.fetched_at)

    # --- what the host asks ---------------------------------------------------------------------

    def work_s(self, held: Held, *, remaining: bool = True, least: bool = False) -> float:
        """The held task's own compute here: what is still to run (or all of it), at the step
        time measured on this device (smoothed, or the least seen), else at the plan's
        estimate."""
        node = held.task.plan.nodes[held.task.node]
        if held.state is None:  # not started yet: as planned
            return node.est_s
        done, total = self.core.progress(held.state)
        planned_s = node.est_s / max(total, 1) if node.est_s else None
        if least:  # a lower bound: the least of this device's and the pool's figures
            step_s = min((s for s in (self.least_step_s, planned_s) if s), default=0.0)
        else:
            step_s = self.step_s if self.step_s is not None else planned_s or 0.0
        return max(0, total - done if remaining else total) * step_s

    def _learn(self, held: Held, at: float) -> None:
        """Remember how urgent and how long this pool's tasks are (smoothed), so the host can
        judge, before fetching, whether a next one should come here."""
        task = held.task
        own_s = self.work_s(held, remaining=False)
        self.typical_work_s = own_s if self.typical_work_s is None else (
            0.8 * self.typical_work_s + 0.2 * own_s)
        if task.deadline_at is not None:
            slack_s = task.deadline_at - at - own_s - held.tail_s
            self.typical_slack_s = slack_s if self.typical_slack_s is None else (
                0.8 * self.typical_slack_s + 0.2 * slack_s)
        self.typical_tail_s = held.tail_s

    def typical(self, at: float) -> scheduling.Urgency:
        """A task as urgent as this pool's recent ones, arriving now (no deadline while none
        has been seen: it then waits for everything held)."""
        work_s = (self.typical_work_s or 0.0) + self.typical_tail_s
        deadline = None if self.typical_slack_s is None else at + self.typical_slack_s + work_s
        return scheduling.Urgency(deadline, work_s, at, self.typical_work_s or 0.0)

    @property
    def least_step_s(self) -> float | None:
        """The least a step of one task has taken here, once there are enough such steps to
        trust it (a first step may include loading a ControlNet, or wait for another model's
        load on the device)."""
        return self._least_single_s if self._single_steps >= _TRUSTED_STEPS else None

    def doomed(self, held: Held, at: float) -> bool:
        """Whether the request cannot finish by its deadline: running it would only take time
        from work that can still make it. Once started, if even its remaining work at the
        fastest this device and its pools have gone would end too late; before it starts, if
        its steps at the time a single task's step took on this device (smoothed; adapters
        such as a ControlNet included, which the fastest step of the pool leaves out; not a
        bigger batch's, which it need not join) would: nothing is invested yet, and a task
        started on the fastest figures ran its whole denoise only to miss by less than its
        decode."""
        task = held.task
        if task.deadline_at is None or not self.host.settings.drop_doomed:
            return False
        return at + self.needed_s(held, at) > task.deadline_at

    def needed_s(self, held: Held, at: float) -> float:
        """What the task and the nodes after it still need, as ``doomed`` judges it (one
        task's step time only while ``fresh``)."""
        needed_s = self.least_needed_s(held)
        single_s = self._step_by_size.get(1) if self.fresh(at) else None
        if not held.ran_from and held.state is not None and single_s:
            _, total = self.core.progress(held.state)
            needed_s = max(needed_s, total * single_s + held.tail_s)
        return needed_s

    def fresh(self, at: float) -> bool:
        """Whether this pool's step figures here are recent enough to count where they are
        slower than its fastest (``figure_max_age_s``): a pool whose every task is turned away
        on figures from a busier time measures no new ones, so they age out instead."""
        return (self._figured_at is not None
                and at - self._figured_at <= self.host.settings.figure_max_age_s)

    def least_needed_s(self, held: Held) -> float:
        """The least the task and the nodes after it still need, at the fastest step times."""
        return self.work_s(held, least=True) + held.tail_s

    def steps_left(self, held: Held) -> int:
        done, total = self.core.progress(held.state)
        return max(0, total - done)

    def step_time_s(self, size: int) -> float:
        """A step's time here at batch ``size`` (``scheduling.step_time``); 0 before any."""
        return scheduling.step_time(self._step_by_size, size, self.step_s or 0.0)

    def ran(self, group: list[Held], elapsed_s: float, ended_at: float,
            figure_s: float | None, *, split: StepPart | None = None) -> None:
        """Account one step of ``group`` that took ``elapsed_s``. Its time counts to its
        tasks; ``figure_s``, the step's own time (less than ``elapsed_s`` after an ask for a
        helper that none took), to the pool's step times (what judges whether work can still
        make its deadline, and how large a batch may be): None where the step is no figure
        (it ran beside a model's load on the device, which it may have waited for), and at
        most ``_OUTLIER`` times the figure so far: a step held up once (a busy event loop, a
        load on the device) once made an SD3 copy's one-task step figure several times its
        time, and the copy dropped tasks that had the time to finish. A lasting change still
        shows within a few steps. A ``split`` step (a helper ran that part of it,
        ``services.parallel``) counts to that part's split figures only, and to its tasks'
        ``whole_s`` at a whole step's time."""
        size = len(group)
        whole_s = elapsed_s
        if split:
            self.splits[split].ran(size, elapsed_s)
            whole_s = max(elapsed_s, self.step_time_s(size))
            figure_s = None
        self.stats.batches += 1
        self.stats.batch_items += len(group)
        self.metrics.batch_size.observe(len(group))
        if figure_s is not None:
            self._figured_at = ended_at
            previous = self._step_by_size.get(size)
            self._step_by_size[size] = figure_s if previous is None else (
                0.7 * previous + 0.3 * min(figure_s, _OUTLIER * previous))
            self.step_s = figure_s if self.step_s is None else (
                0.7 * self.step_s + 0.3 * min(figure_s, _OUTLIER * self.step_s))
            if len(group) == 1:
                self._single_steps += 1
                self._least_single_s = min(figure_s, self._least_single_s or figure_s)
        for held in group:
            held.ran_from = held.ran_from or ended_at - elapsed_s
            held.ran_until = ended_at
            held.run_s += elapsed_s
            held.whole_s += whole_s
            held.work_s += whole_s / len(group)
            held.batch = max(held.batch, len(group))

    # --- ending a task --------------------------------------------------------------------------

    async def drop(self, held: Held, outcome: str = "dropped") -> None:
        self.stats.tasks_dropped += 1
        telemetry.end(held.span, outcome=outcome)
        await held.msg.term()
        # A late task may have written tensors after the cancel cleaned up.
        await self.host.store.delete_group("tmp", held.task.request_id)

    async def expire(self, held: Held) -> None:
        """Its deadline passed, or it can no longer be met: fail the request with a clear
        status instead of running it."""
        task = held.task
        at = now()
        late_s = at - (task.deadline_at or 0.0)
        if late_s > 0:
            why = f"the deadline passed {late_s:.3f}s before node {task.node} finished"
        else:
            needs_s = self.needed_s(held, at)
            why = (f"node {task.node} and what follows need at least {needs_s:.3f}s, and "
                   f"{-late_s:.3f}s are left before the deadline")
            log.info("%s: %s (least step here %s s, one task's step %s s, planned %s s for the "
                     "node, %s s after)", self.replica, why, self.least_step_s,
                     self._step_by_size.get(1), task.plan.nodes[task.node].est_s, held.tail_s)
        waited = f"; it waited {max(0.0, held.fetched_at - task.published_at):.3f}s for a device"
        if task.handoffs:
            waited += f" (handed back {task.handoffs} time(s))"
        error = DeadlineExceeded(f"{why}{waited}; dropped, not run", pool=self.pool)
        await self.host.tracker.finish(task.request_id, "failed",
                                       error=error_info(error, task.node), timings=task.timings)
        self.stats.tasks_expired += 1
        await self.drop(held, "expired")

    async def report_progress(self, group: list[Held]) -> None:
        for held in group:
            step, total = self.core.progress(held.state)
            if total > 1 and step > held.steps_reported:
                held.steps_reported = step
                progress = Progress(held.task.request_id, held.task.node, step, total)
                await self.host.nc.publish(
                    subjects.progress_subject(held.task.request_id), encode(progress)
                )
                if held.task.progress_webhook:  # off the step loop, like mark_running
                    self.host.spawn(webhooks.notify_progress(
                        self.host.js, held.task.progress_webhook, progress))

    async def complete(self, held: Held) -> None:
        host, task = self.host, held.task
        units = max(1, self.core.progress(held.state)[1])
        telemetry.record_span("execute", held.span, held.ran_from, held.ran_until,
                              {"lego.steps": units, "lego.batch": held.batch})
        try:
            result = self.core.finish(held.state)
            started = time.perf_counter()
            plan = task.plan
            timing = NodeTiming(
                node=task.node,
                pool=self.pool,
                replica=self.replica,
                queue_ms=round(max(0.0, held.fetched_at - task.published_at) * 1000, 3),
                run_ms=round(held.run_s * 1000, 3),
                io_ms=0.0,
                attempt=held.attempt,
                batch=held.batch,
                held_ms=round(max(0.0, now() - held.fetched_at - held.run_s - held.io_s)
                              * 1000, 3),
            )
            meta = merge_meta(task.meta, result.meta)
            if task.node == plan.output_node:
                name = plan.output_ref.name
                ref = await host.store.put(
                    tensor_key("out", task.request_id, name),
                    result.tensors[name],
                    host.settings.result_ttl_s,
                )
                timing.io_ms = round((held.io_s + time.perf_counter() - started) * 1000, 3)
                with telemetry.span("request.finish"):
                    finished = await host.tracker.finish(
                        task.request_id, "succeeded", image=ref, meta=meta,
                        timings=[*task.timings, timing],
                    )
                if finished is None:  # it ended meanwhile (cancelled): keep nothing of it
                    await host.store.delete_group("out", task.request_id)
            else:
                refs = await self._store_outputs(task, result.tensors)
                timing.io_ms = round((held.io_s + time.perf_counter() - started) * 1000, 3)
                for successor in plan.successors(task.node):
                    await self._forward(task, successor, refs, meta, [*task.timings, timing])
        except Exception as exc:  # noqa: BLE001 - classified in fail
            await self.fail(held, exc)
            return
        await held.msg.ack()
        self.stats.tasks_done += 1
        self.metrics.execution.observe(held.run_s)
        telemetry.end(held.span, outcome="done")
        self._recent.append(TaskFigures(
            latency_ms=timing.queue_ms + timing.run_ms + timing.held_ms + timing.io_ms,
            work_ms=held.work_s * 1000, unit_ms=held.whole_s * 1000 / units, units=units,
        ))

    async def _store_outputs(self, task: Task, tensors: dict) -> dict[str, TensorRef]:
        wanted = {
            source.name
            for successor in task.plan.successors(task.node)
            for source in task.plan.nodes[successor].sources().values()
            if source.node == task.node
        }
        return {
            name: await self.host.store.put(
                tensor_key("tmp", task.request_id, task.node, name),
                tensors[name],
                self.host.settings.tensor_ttl_s,
            )
            for name in sorted(wanted)
        }

    async def _forward(
        self,
        task: Task,
        successor: str,
        refs: dict[str, TensorRef],
        meta: dict,
        timings: list[NodeTiming],
    ) -> None:
        """Publish ``successor``'s task, or record our part of its join if it has other inputs."""
        node = task.plan.nodes[successor]
        inputs = {}
        for name, source in node.sources().items():
            if source.node == task.node:
                inputs[name] = refs[source.name]
            elif source.from_request:
                inputs[name] = task.request_tensors[source.name]
        if len(task.plan.predecessors(successor)) > 1:
            joined = await self._join(task, successor, inputs, meta, timings)
            if joined is None:
                return  # others still to come; the last one publishes
            inputs, meta, timings = joined.inputs, joined.meta, joined.timings
        downstream = msgspec.structs.replace(
            task,
            node=successor,
            inputs=inputs,
            meta=meta,
            timings=timings,
            published_at=now(),
        )
        await self.host.js.publish(
            subjects.task_subject(node.pool),
            encode(downstream),
            headers=telemetry.inject(
                {"Nats-Msg-Id": subjects.task_msg_id(task.request_id, successor)}
            ),
        )

    async def _join(
        self,
        task: Task,
        successor: str,
        inputs: dict[str, TensorRef],
        meta: dict,
        timings: list[NodeTiming],
    ) -> JoinState | None:
        """Compare-and-set our inputs into the join record; the completed join when we were last."""
        joins = self.host.joins
        key = f"{task.request_id}.{successor}"
        needed = task.plan.predecessors(successor)
        while True:
            try:
                entry = await joins.get(key)
                state = decode(entry.value or b"", JoinState)  # empty reads as None
                revision = entry.revision
            except KeyNotFoundError:
                state, revision = JoinState(arrived=[], inputs={}, meta={}, timings=[]), None
            if task.node not in state.arrived:
                state.arrived.append(task.node)
                state.inputs.update(inputs)
                state.meta = merge_meta(state.meta, meta)
                state.timings.extend(t for t in timings if t not in state.timings)
            try:
                if revision is None:
                    await joins.create(key, encode(state))
                else:
                    await joins.update(key, encode(state), last=revision)
            except KeyWrongLastSequenceError:
                continue
            if set(state.arrived) >= needed:
                return state
            return None

    async def fail(self, held: Held, exc: Exception) -> None:
        """Retry a transient failure (nak) until max_deliver; then fail the request with it."""
        settings, task = self.host.settings, held.task
        final_attempt = held.attempt >= settings.max_deliver
        terminal = isinstance(exc, RequestError | TerminalError)
        telemetry.end(held.span, exc, "failed" if terminal or final_attempt else "retried")
        if not terminal and not final_attempt:
            self.stats.tasks_retried += 1
            log.warning(
                "%s: %s attempt %d failed (%s: %s); retrying",
                self.replica, task.request_id, held.attempt, type(exc).__name__, exc,
            )
            # backing off exponentially: an outage of the store or NATS gets time to end
            await held.msg.nak(delay=settings.retry_backoff_s * 2 ** (held.attempt - 1))
            return
        self.stats.tasks_failed += 1
        log.error("%s: %s failed: %s: %s", self.replica, task.request_id, type(exc).__name__, exc)
        error = ErrorInfo(
            code=exc.code if isinstance(exc, LegoError) else "node_error",
            message=f"{type(exc).__name__}: {exc}",
            node=task.node,
            details={"attempts": held.attempt, "pool": self.pool},
        )
        await self.host.tracker.finish(task.request_id, "failed", error=error,
                                       timings=task.timings)
        await held.msg.term()

    # --- reports --------------------------------------------------------------------------------

    async def publish_status(self, state: ReplicaState | None = None) -> None:
        stats, recent = self.stats, self._recent
        if state is None:
            state = "draining" if stats.draining else "ready" if stats.ready else "starting"
        latencies = [r.latency_ms for r in recent]
        units = [r.unit_ms for r in recent]
        least_ms = round(min(units), 3) if units else None
        # idle past figure_max_age_s: its next task's steps go as fast as its fastest, as far
        # as anything known says (its recent ones may have shared a burst's contention)
        fresh = self.fresh(now())
        status = ReplicaStatus(
            replica=self.replica, pool=self.pool, kind=self.core.kind, model=self.model,
            state=state, held=len(self.held),
            max_batch=self.core.max_batch, load_s=round(stats.loaded_s, 3),
            tasks_done=stats.tasks_done, tasks_failed=stats.tasks_failed, batches=stats.batches,
            batch_items=stats.batch_items, at=now(),
            device=self.host.device,
            p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
            startup_s=None if stats.startup_s is None else round(stats.startup_s, 3),
            startup_parts=stats.startup_parts,
            work_ms=_mean(r.work_ms for r in recent),
            unit_ms_min=least_ms,
            unit_ms_mean=_mean(units) if fresh else least_ms,
            unit_ms_p90=percentile(units, 90) if fresh else least_ms,
            steps_per_task=_mean(r.units for r in recent),
            tasks_dropped=stats.tasks_dropped, tasks_expired=stats.tasks_expired,
            metrics_port=self.host.metrics_port, split_steps=stats.split_steps,
            helped_steps=stats.helped_steps,
        )
        metrics.REPLICA_REPORTS.report(status)
        await self.host.nc.publish(subjects.replica_subject(self.pool), encode(status))
