"""The one runner under every model node.

It binds to the durable pull consumer of its pool, loads the model once, and then loops:
fetch tasks while there is room in the batch, load their input tensors from the store, admit
them at the next step boundary, advance a batch by one step (in a worker thread, so acks and
heartbeats keep flowing), and for every finished task store its outputs, publish the downstream
tasks (or finish the request) and only then ack. Cancelled work is dropped at step boundaries;
SIGTERM drains: stop fetching, finish what is held, ack, exit.

The model itself is a ``services.core.ModelCore``; nothing here knows which model it drives.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from common import bus, metrics, subjects, telemetry
from common.errors import DeadlineExceeded, LegoError, RequestError, TerminalError
from common.messages import (
    ErrorInfo,
    JoinState,
    NodeTiming,
    Progress,
    ReplicaStatus,
    Task,
    TensorRef,
    decode,
    encode,
    error_info,
    merge_meta,
    now,
)
from common.metrics import percentile
from common.settings import Settings
from common.store import TensorStore, open_store, tensor_key
from common.tracking import RequestTracker
from services.core import ModelCore, WorkItem

log = logging.getLogger(__name__)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where /proc cannot tell."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class TaskFigures:
    """What one finished task tells about the replica's speed (reported in ReplicaStatus)."""

    latency_ms: float  # queue + run + store I/O
    work_ms: float  # compute amortised over the batches it shared
    unit_ms: float  # compute per step
    units: int  # steps


def _mean(values: Any) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 3) if values else None


@dataclass
class Held:
    """A task this replica holds: fetched, not yet acked."""

    msg: Msg
    task: Task
    fetched_at: float
    attempt: int
    state: Any = None
    run_s: float = 0.0
    work_s: float = 0.0  # run time amortised over the batch sizes it ran in
    io_s: float = 0.0
    batch: int = 1
    steps_reported: int = 0
    ran_from: float = 0.0  # wall clock of its first step's start, and of its last step's end
    ran_until: float = 0.0
    span: Any = None  # its trace span, when tracing is on


@dataclass
class RunnerStats:
    loaded_s: float = 0.0
    startup_s: float | None = None
    tasks_done: int = 0
    tasks_failed: int = 0
    tasks_retried: int = 0
    tasks_dropped: int = 0
    batches: int = 0
    batch_items: int = 0
    ready: bool = False
    draining: bool = False


class NodeRunner:
    def __init__(
        self, core: ModelCore, pool: str, model: str, settings: Settings,
        replica: str | None = None,
    ) -> None:
        """``replica``: its id, unique in the cluster (default: pool@host:pid, for one replica
        per process; a process hosting several, as the emulated backend does, names each)."""
        # when the process began, so the replica reports its whole cold start, imports included
        self.process_started = time.monotonic() - (
            0.0 if replica else (_process_age_s() or 0.0)
        )
        self.core = core
        self.pool = pool
        self.model = model
        self.settings = settings
        self.replica = replica or f"{pool}@{socket.gethostname()}:{os.getpid()}"
        self.stats = RunnerStats()
        self.metrics = metrics.NodeMetrics(pool)
        self.metrics_port: int | None = None
        self._admitted: list[Held] = []
        self._active: list[Held] = []
        self._cancelled: set[str] = set()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._stop = asyncio.Event()
        self._fetch_done = asyncio.Event()
        self._side_tasks: set[asyncio.Task] = set()
        self._recent: collections.deque[TaskFigures] = collections.deque(maxlen=256)

    # --- lifecycle ------------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop fetching; finish and ack what is held; then ``serve`` returns."""
        self.stats.draining = True
        self._stop.set()
        self._wake.set()
        self._room.set()

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        settings = self.settings
        telemetry.setup_tracing(settings, "lego-node")
        self.metrics_port = metrics.serve(settings.node_metrics_port, settings.host)
        self.nc = await bus.connect(settings, name=self.replica)
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_topology(self.js, settings)
        self.joins = buckets[subjects.JOIN_BUCKET]
        self.store: TensorStore = open_store(settings)
        self.tracker = RequestTracker(self.js, buckets, self.store)
        watcher = await buckets[subjects.CANCEL_BUCKET].watchall()
        background = [
            asyncio.create_task(self._watch_cancels(watcher)),
            asyncio.create_task(self._status_loop()),
        ]
        started = time.perf_counter()
        await asyncio.to_thread(self.core.load)
        self.stats.loaded_s = time.perf_counter() - started
        sub = await bus.pull_subscription(
            self.js,
            subjects.TASKS_STREAM,
            subjects.pool_consumer(self.pool),
            subjects.task_subject(self.pool),
            settings,
        )
        self.stats.ready = True
        self.stats.startup_s = time.monotonic() - self.process_started
        await self._publish_status()
        log.info("%s ready (model loaded in %.2fs)", self.replica, self.stats.loaded_s)
        if ready is not None:
            ready.set()
        background += [
            asyncio.create_task(self._fetch_loop(sub)),
            asyncio.create_task(self._heartbeat_loop()),
        ]
        try:
            await self._compute_loop()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await watcher.stop()
            await sub.unsubscribe()
            await self._publish_status("stopped")
            self.core.close()
            await self.store.close()
            await bus.close(self.nc)  # everything held is acked
            log.info("%s stopped", self.replica)

    # --- fetching and admission ------------------------------------------------------------------

    async def _fetch_loop(self, sub: Any) -> None:
        try:
            while not self._stop.is_set():
                room = self.core.max_batch - len(self._active) - len(self._admitted)
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                try:
                    # One at a time: a batched fetch holds what it got until the batch fills or
                    # the request expires, while a single fetch returns on the first arrival.
                    # Arrivals during a step queue up here and join at the next boundary.
                    [msg] = await sub.fetch(1, timeout=1.0)
                except TimeoutError:
                    continue
                held = await self._admit(msg)  # even if draining began meanwhile: it is ours
                if held is not None:
                    self._admitted.append(held)
                    self._wake.set()
        finally:
            self._fetch_done.set()
            self._wake.set()

    async def _admit(self, msg: Msg) -> Held | None:
        fetched_at = now()
        try:
            task = decode(msg.data, Task)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("%s: dropping a malformed task: %s", self.replica, exc)
            await msg.term()
            return None
        held = Held(msg, task, fetched_at, msg.metadata.num_delivered or 1)
        self.metrics.queue_wait.observe(max(0.0, fetched_at - task.published_at))
        if telemetry.enabled():
            self._trace(held)
        if task.request_id in self._cancelled:
            await self._drop(held)
            return None
        if task.expired(fetched_at):
            await self._expire(held)
            return None
        node = task.plan.nodes[task.node]
        try:
            started = time.perf_counter()
            with telemetry.within(held.span):
                inputs = {name: await self.store.get(ref) for name, ref in task.inputs.items()}
            held.io_s += time.perf_counter() - started
        except KeyError as exc:
            # Inputs gone: the request ended (cancelled, failed) and was cleaned up.
            log.info("%s: inputs of %s gone (%s); dropping", self.replica, task.request_id, exc)
            await self._drop(held)
            return None
        except Exception as exc:  # noqa: BLE001 - classified in _fail
            await self._fail(held, exc)
            return None
        try:
            if held.attempt == 1 and task.node in task.plan.roots():
                # Off the critical path: a compare-and-set that only moves queued -> running.
                self._spawn(self.tracker.mark_running(task.request_id))
            held.state = self.core.start(
                WorkItem(task.request_id, node.op, task.params, inputs, tuple(node.adapters))
            )
        except Exception as exc:  # noqa: BLE001 - classified in _fail
            await self._fail(held, exc)
            return None
        return held

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _drop(self, held: Held, outcome: str = "dropped") -> None:
        self.stats.tasks_dropped += 1
        telemetry.end(held.span, outcome=outcome)
        await held.msg.term()
        # A late task may have written tensors after the cancel cleaned up.
        await self.store.delete_group("tmp", held.task.request_id)

    async def _expire(self, held: Held) -> None:
        """Its deadline passed: fail the request with a clear status instead of running it."""
        task = held.task
        late_s = now() - (task.deadline_at or 0.0)
        error = DeadlineExceeded(
            f"the deadline passed {late_s:.3f}s before node {task.node} finished; dropped, "
            "not run", pool=self.pool,
        )
        await self.tracker.finish(task.request_id, "failed", error=error_info(error, task.node),
                                  timings=task.timings)
        await self._drop(held, "expired")

    async def _watch_cancels(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                self._cancelled.add(entry.key)

    # --- compute ------------------------------------------------------------------------------

    async def _compute_loop(self) -> None:
        while True:
            if not self._admitted and not self._active:
                if self._stop.is_set() and self._fetch_done.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Step boundary: newly fetched tasks join the running batch; cancelled ones leave.
            self._active.extend(self._admitted)
            self._admitted.clear()
            at = now()
            for held in list(self._active):
                if held.task.request_id in self._cancelled:
                    self._active.remove(held)
                    await self._drop(held)
                elif held.task.expired(at):
                    self._active.remove(held)
                    await self._expire(held)
            if not self._active:
                continue
            group = self._next_group()
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.core.step, [h.state for h in group])
            except Exception as exc:  # noqa: BLE001 - classified in _fail
                for held in group:
                    self._active.remove(held)
                    await self._fail(held, exc)
                self._room.set()
                continue
            elapsed = time.perf_counter() - started
            ended_at = now()
            self.stats.batches += 1
            self.stats.batch_items += len(group)
            self.metrics.batch_size.observe(len(group))
            for held in group:
                held.ran_from = held.ran_from or ended_at - elapsed
                held.ran_until = ended_at
                held.run_s += elapsed
                held.work_s += elapsed / len(group)
                held.batch = max(held.batch, len(group))
            await self._report_progress(group)
            for held in [h for h in group if self.core.done(h.state)]:
                self._active.remove(held)
                with telemetry.within(held.span):  # its store I/O and successors belong to it
                    await self._complete(held)
            self._room.set()

    def _next_group(self) -> list[Held]:
        """The oldest task's batch-compatible peers (FIFO across shapes, fair to everyone)."""
        key = self.core.batch_key(self._active[0].state)
        group = [h for h in self._active if self.core.batch_key(h.state) == key]
        return group[: self.core.max_batch]

    async def _report_progress(self, group: list[Held]) -> None:
        for held in group:
            step, total = self.core.progress(held.state)
            if total > 1 and step > held.steps_reported:
                held.steps_reported = step
                progress = Progress(held.task.request_id, held.task.node, step, total)
                await self.nc.publish(
                    subjects.progress_subject(held.task.request_id), encode(progress)
                )

    # --- completion ---------------------------------------------------------------------------

    async def _complete(self, held: Held) -> None:
        task = held.task
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
            )
            meta = merge_meta(task.meta, result.meta)
            if task.node == plan.output_node:
                name = plan.output.split(".", 1)[1]
                ref = await self.store.put(
                    tensor_key("out", task.request_id, name),
                    result.tensors[name],
                    self.settings.result_ttl_s,
                )
                timing.io_ms = round((held.io_s + time.perf_counter() - started) * 1000, 3)
                finished = await self.tracker.finish(
                    task.request_id, "succeeded", image=ref, meta=meta,
                    timings=[*task.timings, timing],
                )
                if finished is None:  # it ended meanwhile (cancelled): keep nothing of it
                    await self.store.delete_group("out", task.request_id)
            else:
                refs = await self._store_outputs(task, result.tensors)
                timing.io_ms = round((held.io_s + time.perf_counter() - started) * 1000, 3)
                for successor in plan.successors(task.node):
                    await self._forward(task, successor, refs, meta, [*task.timings, timing])
        except Exception as exc:  # noqa: BLE001 - classified in _fail
            await self._fail(held, exc)
            return
        await held.msg.ack()
        self.stats.tasks_done += 1
        self.metrics.execution.observe(held.run_s)
        telemetry.end(held.span, outcome="done")
        self._recent.append(TaskFigures(
            latency_ms=timing.queue_ms + timing.run_ms + timing.io_ms,
            work_ms=held.work_s * 1000, unit_ms=held.run_s * 1000 / units, units=units,
        ))

    async def _store_outputs(self, task: Task, tensors: dict) -> dict[str, TensorRef]:
        wanted = {
            source.split(".", 1)[1]
            for successor in task.plan.successors(task.node)
            for source in task.plan.nodes[successor].inputs.values()
            if source.split(".", 1)[0] == task.node
        }
        return {
            name: await self.store.put(
                tensor_key("tmp", task.request_id, task.node, name),
                tensors[name],
                self.settings.tensor_ttl_s,
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
        for name, source in node.inputs.items():
            head, _, output = source.partition(".")
            if head == task.node:
                inputs[name] = refs[output]
            elif head == "request":
                inputs[name] = task.request_tensors[output]
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
        await self.js.publish(
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
        key = f"{task.request_id}.{successor}"
        needed = task.plan.predecessors(successor)
        while True:
            try:
                entry = await self.joins.get(key)
                state = decode(entry.value, JoinState)
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
                    await self.joins.create(key, encode(state))
                else:
                    await self.joins.update(key, encode(state), last=revision)
            except KeyWrongLastSequenceError:
                continue
            if set(state.arrived) >= needed:
                return state
            return None

    # --- failure ------------------------------------------------------------------------------

    async def _fail(self, held: Held, exc: Exception) -> None:
        """Retry a transient failure (nak) until max_deliver; then fail the request with it."""
        task = held.task
        final_attempt = held.attempt >= self.settings.max_deliver
        terminal = isinstance(exc, RequestError | TerminalError)
        telemetry.end(held.span, exc, "failed" if terminal or final_attempt else "retried")
        if not terminal and not final_attempt:
            self.stats.tasks_retried += 1
            log.warning(
                "%s: %s attempt %d failed (%s: %s); retrying",
                self.replica, task.request_id, held.attempt, type(exc).__name__, exc,
            )
            await held.msg.nak(delay=self.settings.retry_backoff_s * held.attempt)
            return
        self.stats.tasks_failed += 1
        log.error("%s: %s failed: %s: %s", self.replica, task.request_id, type(exc).__name__, exc)
        error = ErrorInfo(
            code=exc.code if isinstance(exc, LegoError) else "node_error",
            message=f"{type(exc).__name__}: {exc}",
            node=task.node,
            details={"attempts": held.attempt, "pool": self.pool},
        )
        await self.tracker.finish(task.request_id, "failed", error=error, timings=task.timings)
        await held.msg.term()

    async def _publish_status(self, state: str | None = None) -> None:
        stats, recent = self.stats, self._recent
        if state is None:
            state = "draining" if stats.draining else "ready" if stats.ready else "starting"
        latencies = [r.latency_ms for r in recent]
        status = ReplicaStatus(
            replica=self.replica, pool=self.pool, kind=self.core.kind, model=self.model,
            state=state, held=len(self._active) + len(self._admitted),  # type: ignore[arg-type]
            max_batch=self.core.max_batch, load_s=round(stats.loaded_s, 3),
            tasks_done=stats.tasks_done, tasks_failed=stats.tasks_failed, batches=stats.batches,
            batch_items=stats.batch_items, at=now(),
            device=self.settings.device_label or str(self.core.device),
            p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
            startup_s=None if stats.startup_s is None else round(stats.startup_s, 3),
            work_ms=_mean(r.work_ms for r in recent),
            unit_ms_min=round(min(r.unit_ms for r in recent), 3) if recent else None,
            steps_per_task=_mean(r.units for r in recent),
            tasks_dropped=stats.tasks_dropped, metrics_port=self.metrics_port,
        )
        metrics.REPLICA_REPORTS.report(status)
        await self.nc.publish(subjects.replica_subject(self.pool), encode(status))

    async def _status_loop(self) -> None:
        while True:
            await self._publish_status()
            await asyncio.sleep(1.0)

    async def _heartbeat_loop(self) -> None:
        """Tell JetStream we are still working on long tasks, so they are not redelivered."""
        interval = self.settings.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            for held in [*self._active, *self._admitted]:
                try:
                    await held.msg.in_progress()
                except Exception as exc:  # noqa: BLE001 - a lost connection shows elsewhere
                    log.debug("in_progress failed: %s", exc)
