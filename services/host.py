"""A device host: one step loop per device, serving every pool resident on it.

A host owns one device (a GPU, a stand-in GPU, or a CPU process's share of the host) and the
pools whose models are resident there, each through a ``services.feed.PoolFeed`` bound to the
pool's durable JetStream consumer: a host is a consumer of several subjects. Its one step loop
runs, at every step boundary, the batch whose tasks are most urgent across all resident pools
(``services.scheduling``: least slack by default), so a cheap step never waits behind a queue
of expensive ones and a burst on one model uses every device that holds it. Feeds fetch only
when the host could start their task soon, so work waits in JetStream where any device can take
it; and only a nearly idle host waits for new arrivals: a busy one takes what is already
queued, just before each step ends (its fetch window), so a new task goes to an idle device
first and a queued one runs at the next boundary. Finished tasks
are completed (outputs stored, successors published, acked) while the next step already runs.

``services.runner.NodeRunner`` is a host with one pool (a `lego node` process); a backend that
hosts replicas in its own process (``device_hosts``) runs one host per device and adds or
removes pools as the autoscaler decides where models are resident.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from common import bus, heap, metrics, subjects, telemetry
from common.messages import ReplicaState, ReplicaStatus, encode, now
from common.settings import Settings
from common.store import TensorStore, open_store
from common.tracking import RequestTracker
from services import scheduling
from services.branches import Branches, SplitRun
from services.core import ModelCore
from services.feed import Held, PoolFeed
from services.liveness import Liveness

log = logging.getLogger(__name__)

#: a pool whose model fails to load is tried again after this, doubled with every failure in
#: a row, up to the last
LOAD_RETRY_S = 1.0
LOAD_RETRY_MAX_S = 60.0
_ERROR_CHARS = 2000  # of a failure's message, in its reports


def load_retry_s(failures: int) -> float:
    """The wait before the next attempt to load a pool after ``failures`` failed in a row."""
    return min(LOAD_RETRY_MAX_S, LOAD_RETRY_S * 2 ** max(0, failures - 1))


@dataclass
class LoadFailure:
    """A pool whose model could not be loaded here, until it loads or is no longer wanted."""

    pool: str
    kind: str
    model: str
    error: str
    failures: int
    retry_at: float  # monotonic; passed: an attempt is under way


class DeviceHost:
    def __init__(self, settings: Settings, name: str, *, device: str | None = None,
                 scheduler: scheduling.Scheduler | None = None) -> None:
        self.settings = settings
        self.name = name
        self.device = device or settings.device_label or settings.device
        self.policy = scheduler or scheduling.scheduler(settings.host_scheduler)
        self.feeds: dict[str, PoolFeed] = {}  # replica id -> feed
        self.failed: dict[str, LoadFailure] = {}  # replica id -> why its pool did not load
        self.cancelled: set[str] = set()
        self.metrics_port: int | None = None
        self._held: list[Held] = []  # tasks that still have steps to run
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = False
        self._side_tasks: set[asyncio.Task] = set()
        #: fetch windows opened, one per step, ``host_fetch_lead_s`` before it is expected to
        #: end (or at its end): a busy host's feeds take queued work then (``PoolFeed.fetch_loop``)
        self.windows = 0
        self._window_timer: asyncio.TimerHandle | None = None
        #: progress of the event loop and of the step in progress, for a process's watchdog
        #: (``services.liveness.watch``; `lego node` and `lego host` start one)
        self.liveness = Liveness(settings.liveness_timeout_s)
        #: models being loaded onto the device now, and loads ever started: a step that ran
        #: beside a load may have waited for it, and says nothing of how long a step takes
        self.loading = 0
        self.loads_started = 0
        #: CFG parallelism: its offers to help other devices' steps, and its own split steps
        self.branches = Branches(self)

    # --- lifecycle ------------------------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Connect, then run the step loop until ``drain`` and every feed has finished."""
        settings = self.settings
        telemetry.setup_tracing(settings, "lego-node")
        self.metrics_port = metrics.serve(settings.node_metrics_port, settings.host)
        self.nc = await bus.connect(settings, name=self.name)
        self.js = self.nc.jetstream()
        buckets = await bus.ensure_topology(self.js, settings)
        self.joins = buckets[subjects.JOIN_BUCKET]
        self.store: TensorStore = open_store(settings)
        self.tracker = RequestTracker(self.js, buckets, self.store)
        watcher = await buckets[subjects.CANCEL_BUCKET].watchall()
        background = [
            asyncio.create_task(self._watch_cancels(watcher)),
            asyncio.create_task(self._status_loop()),
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self.branches.offer_loop()),
        ]
        self._connected.set()
        if ready is not None:
            ready.set()
        try:
            await self._step_loop()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.branches.close()
            if self._side_tasks:
                await asyncio.gather(*self._side_tasks, return_exceptions=True)
            await watcher.stop()
            await self.store.close()
            await bus.close(self.nc)  # everything held is acked

    def drain(self) -> None:
        """Stop fetching everywhere; finish and ack what is held; then ``serve`` returns."""
        self._stopping = True
        for feed in list(self.feeds.values()):
            feed.drain()
        self.changed()

    async def run_pool(self, core: ModelCore, pool: str, model: str, replica: str, *,
                       ready: asyncio.Event | None = None,
                       process_started: float | None = None) -> None:
        """Make ``pool`` resident here: load its model, serve its tasks until ``drain_replica``
        (or ``drain``), then unbind and give the model's memory back."""
        await self._connected.wait()
        feed = PoolFeed(self, core, pool, model, replica,
                        time.monotonic() if process_started is None else process_started)
        self.feeds[replica] = feed
        if self._stopping:
            feed.drain()
        try:
            await feed.start()
            heap.freeze()  # the model stays loaded: no collection should walk it
            self.failed.pop(replica, None)  # its ready report stands from now on
            self.changed()  # it may take work, and offer help (``Branches.offer_loop``)
            if ready is not None:
                ready.set()
            await feed.fetch_loop()
            await feed.done.wait()
        finally:
            try:
                await feed.close()
            finally:
                self.feeds.pop(replica, None)
                self.changed()

    async def serve_pool(self, build: Callable[[], ModelCore], kind: str, pool: str, model: str,
                         replica: str, *, released: asyncio.Event | None = None,
                         ready: asyncio.Event | None = None,
                         process_started: float | None = None) -> None:
        """Build ``pool``'s core (``build``, in a worker thread) and make it resident
        (``run_pool``) until it is drained. A core that fails to build or load is reported
        (replica ``replica`` in state ``failed``, with the error and when it is tried again)
        and tried again after ``load_retry_s``, doubled with each failure in a row, while the
        pool is wanted (``released`` not set, the host not draining; ``drain_replica`` wakes
        the wait): the host and its other pools go on serving."""
        await self._connected.wait()

        def unwanted() -> bool:
            return self._stopping or (released is not None and released.is_set())

        failures = 0
        try:
            while not unwanted():
                try:
                    core = await asyncio.to_thread(build)
                    if unwanted():
                        core.close()
                        return
                    await self.run_pool(core, pool, model, replica, ready=ready,
                                        process_started=process_started)
                    return
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - a bad kind exits
                    # no failure on record: it had loaded, so this one starts a new series
                    failures = failures + 1 if replica in self.failed else 1
                    retry_s = load_retry_s(failures)
                    error = (f"{type(exc).__name__}: {exc}")[:_ERROR_CHARS]
                    log.error("%s: %s (%s --model %s) failed to load: %s; trying again in "
                              "%.0f s", self.name, pool, kind, model, error, retry_s,
                              exc_info=failures == 1)
                    self.failed[replica] = LoadFailure(pool, kind, model, error, failures,
                                                       time.monotonic() + retry_s)
                    await self._publish_failed(replica)
                    await self._wait_unless(retry_s, unwanted)
        finally:
            failure = self.failed.pop(replica, None)
            if failure is not None:  # observers forget it at once
                await self._publish_failed(replica, failure, "stopped")

    async def _wait_unless(self, seconds: float, stop: Callable[[], bool]) -> None:
        """Wait ``seconds``, or until ``stop()`` is true (checked when the host changes)."""
        deadline = time.monotonic() + seconds
        while not stop() and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_changed(), left)

    async def _publish_failed(self, replica: str, failure: LoadFailure | None = None,
                              state: ReplicaState = "failed") -> None:
        """Report a pool that could not load (best effort: NATS may be down)."""
        failure = failure or self.failed.get(replica)
        if failure is None:
            return
        status = ReplicaStatus(
            replica=replica, pool=failure.pool, kind=failure.kind, model=failure.model,
            state=state, held=0, max_batch=self.settings.max_batch,
            load_s=0.0, tasks_done=0, tasks_failed=0, batches=0, batch_items=0, at=now(),
            device=self.device, metrics_port=self.metrics_port, error=failure.error,
            failures=failure.failures,
            retry_in_s=round(max(0.0, failure.retry_at - time.monotonic()), 3),
        )
        metrics.REPLICA_REPORTS.report(status)
        try:
            await self.nc.publish(subjects.replica_subject(failure.pool), encode(status))
        except Exception as exc:  # noqa: BLE001 - the next report goes out a second later
            log.debug("%s: failure report not published: %s", self.name, exc)

    def drain_replica(self, replica: str) -> None:
        feed = self.feeds.get(replica)
        if feed is not None:
            feed.drain()
        self.changed()  # a pool waiting to be loaded again stops waiting

    # --- what feeds ask -------------------------------------------------------------------------

    @contextlib.contextmanager
    def loading_model(self) -> Iterator[None]:
        """Mark a model's load onto this device, for the steps that run beside it."""
        self.loading += 1
        self.loads_started += 1
        try:
            yield
        finally:
            self.loading -= 1

    def may_fetch(self, feed: PoolFeed) -> bool:
        return not feed.stopping and self.may_start(feed)

    def may_start(self, feed: PoolFeed, held: Held | None = None) -> bool:
        """Whether a task of ``feed``'s pool (``held``, just fetched, else one as urgent as
        the pool's recent ones) would start soon here without making held work late."""
        if len(feed.held) >= feed.core.max_batch:
            return False
        at = now()
        if held is not None:
            newcomer, own_s = self.urgency(held, at), feed.work_s(held, remaining=False)
        else:
            newcomer, own_s = feed.typical(at), feed.typical_work_s or 0.0
        others = [self.urgency(h, at) for h in self._held if h.feed is not feed]
        return scheduling.may_take(newcomer, own_s, others, at, self.policy,
                                   self.settings.host_eligible_s)

    def idle(self) -> bool:
        """Whether the device is nearly idle: the work it holds, of every pool, is under
        ``host_eligible_s`` (the artifact's eligibility). A new arrival belongs to such a
        device first, rather than to a busy one's next step boundary, or to its running batch
        (which it would slow down while other devices idle). A device running, or about to
        run, part of another device's step is not idle either."""
        return (not self.branches.helping() and sum(h.feed.work_s(h) for h in self._held)
                <= self.settings.host_eligible_s)

    def changed(self) -> None:
        """Wake whoever waits for the host's state to change (fetch loops, the step loop)."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._wake.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def hold(self, held: Held) -> None:
        held.feed.held.append(held)
        self._held.append(held)
        self.changed()

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # --- the step loop --------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _step_loop(self) -> None:
        while True:
            if self.branches.pending():  # another device waits for it: it was idle when asked
                await self.branches.help_next()
                continue
            if not self._held:
                if self._stopping and not self.feeds:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Step boundary: cancelled and expired work leaves; the most urgent batch runs.
            at = now()
            for held in list(self._held):
                if held.task.request_id in self.cancelled:
                    await self._end(held, held.feed.drop(held))
                elif held.task.expired(at) or held.feed.doomed(held, at):
                    await self._end(held, held.feed.expire(held))
            for held in self._overtaken(at):
                await self._end(held, held.feed.hand_back(held))
            if not self._held:
                continue
            group = self._next_group(at)
            feed = group[0].feed
            started = time.perf_counter()
            clear_of_loads = self.loading == 0
            loads_before = self.loads_started
            self.liveness.step_started()
            split, run = None, SplitRun(False)
            try:
                expected_s = feed.step_time_s(len(group))
                if split := self.branches.split_part(feed, group):
                    self.open_window_in(
                        expected_s * feed.splits[split.part].ratio(len(group), expected_s))
                    run = await self.branches.split_step(feed, group, split)
                else:
                    self.open_window_in(expected_s)
                    await asyncio.to_thread(feed.core.step, [h.state for h in group])
            except Exception as exc:  # noqa: BLE001 - classified in fail
                for held in group:
                    await self._end(held, feed.fail(held, exc))
                continue
            finally:
                if self._window_timer is not None:  # it ended before its window opened: its
                    self._open_window(announce=False)  # end (announced below) opens it
                self.liveness.step_ended()
                self.branches.utilization.ran(started, time.perf_counter())
            elapsed_s = time.perf_counter() - started
            # the step's figure: none beside a load; for a split that no helper took, the
            # whole step's own time after the ask (a pool that asks at every step still
            # measures its steps); none for one a helper shared (its split figures count it)
            clear_of_loads &= self.loading == 0 and self.loads_started == loads_before
            figure_s = (run.whole_s if split else elapsed_s) if clear_of_loads else None
            feed.ran(group, elapsed_s, now(), figure_s,
                     split=split.part if split and run.helped else None)
            try:
                await feed.report_progress(group)
            except Exception as exc:  # noqa: BLE001 - progress is best effort; steps go on
                log.warning("%s: progress not published: %s", self.name, exc)
            for held in group:
                if feed.core.done(held.state):
                    self._held.remove(held)
                    self.spawn(self._complete(held))  # overlapped with the next step
            self.changed()

    def open_window_in(self, expected_s: float) -> None:
        """Open the fetch window of the running step, expected to end ``expected_s`` from now:
        ``host_fetch_lead_s`` before its end, or, for a step shorter than that (tiny models
        on a CPU), at its end, when the step loop announces the boundary anyway. Called again
        while the step runs, the window moves: a split step that no helper took runs whole
        (``Branches.split_step``), so it ends later than its split was expected to."""
        wait_s = expected_s - self.settings.host_fetch_lead_s
        if wait_s <= 0:
            self._open_window(announce=False)
        else:
            self._cancel_window_timer()
            self._window_timer = asyncio.get_running_loop().call_later(
                wait_s, self._open_window)

    def _open_window(self, announce: bool = True) -> None:
        """The running step ends within the fetch lead (or has ended): a busy host's feeds
        may take queued work now, to be held by the step boundary (``PoolFeed.fetch_loop``);
        ``announce``: wake them now, not at the boundary the step loop announces anyway."""
        self._cancel_window_timer()  # (a no-op when it is the timer that fired)
        self.windows += 1
        if announce:
            self.changed()

    def _cancel_window_timer(self) -> None:
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None

    def urgency(self, held: Held, at: float) -> scheduling.Urgency:
        task = held.task
        own_s, remaining_s = held.feed.work_s(held, remaining=False), held.feed.work_s(held)
        return scheduling.Urgency(
            deadline_at=task.deadline_at, work_s=own_s + held.tail_s,
            since=task.submitted_at, remaining_s=remaining_s, done_s=own_s - remaining_s,
        )

    def _overtaken(self, at: float) -> list[Held]:
        """Held tasks not started yet that more urgent work taken since would keep waiting here
        (``scheduling.overtaken``), while they may still be handed back."""
        waiting = [h for h in self._held if not h.ran_from
                   and h.task.handoffs < self.settings.host_max_handoffs]
        if not waiting:
            return []
        urgency = {id(h): self.urgency(h, at) for h in self._held}
        others = [[urgency[id(o)] for o in self._held if o.feed is not h.feed] for h in waiting]
        chosen = scheduling.overtaken([urgency[id(h)] for h in waiting], others, at,
                                      self.policy, self.settings.host_eligible_s)
        return [waiting[i] for i in chosen]

    def _next_group(self, at: float) -> list[Held]:
        """The most urgent task and its batch-compatible peers of the same pool, most urgent
        first, up to the pool's batch and as many as their deadlines allow
        (``scheduling.batch_size``)."""
        urgencies = [self.urgency(h, at) for h in self._held]
        ordered = [self._held[i] for i in scheduling.run_next(urgencies, at, self.policy)]
        first = ordered[0]
        feed, core = first.feed, first.feed.core
        key = core.batch_key(first.state)
        group = [h for h in ordered if h.feed is feed and core.batch_key(h.state) == key]
        group = group[: core.max_batch]
        members = [scheduling.Member(h.task.deadline_at, feed.steps_left(h),
                                     h.tail_s) for h in group]
        return group[: scheduling.batch_size(members, feed.step_time_s, at, self.policy)]

    async def _end(self, held: Held, ending: Any) -> None:
        """Take ``held`` off the step loop and out of its feed once ``ending`` has run. If
        ending it fails (the store or NATS is down), its message is not acked and comes back
        after the ack wait: the step loop goes on."""
        self._held.remove(held)
        try:
            await ending
        except Exception:  # noqa: BLE001 - never stop the device's step loop
            log.exception("%s: could not end %s's task", self.name, held.task.request_id)
        finally:
            self._forget(held)

    async def _complete(self, held: Held) -> None:
        try:
            with telemetry.within(held.span):  # its store I/O and successors belong to it
                await held.feed.complete(held)
        except Exception:  # noqa: BLE001 - not acked: it comes back after the ack wait
            log.exception("%s: could not end %s's task", self.name, held.task.request_id)
        finally:
            self._forget(held)

    def _forget(self, held: Held) -> None:
        held.feed.held.remove(held)
        held.feed.check_done()
        self.changed()

    # --- background -----------------------------------------------------------------------------

    async def _watch_cancels(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is not None and entry.value:
                self.cancelled.add(entry.key)
                self._wake.set()

    async def _status_loop(self) -> None:
        while True:
            for feed in list(self.feeds.values()):
                if feed.replica not in self.failed:  # loading again: it stays failed till then
                    await feed.publish_status()
            for replica in list(self.failed):
                await self._publish_failed(replica)
            await asyncio.sleep(1.0)

    async def _heartbeat_loop(self) -> None:
        """Tell JetStream we are still working on long tasks, so they are not redelivered."""
        interval = self.settings.ack_wait_s / 4
        while True:
            await asyncio.sleep(interval)
            for feed in list(self.feeds.values()):
                for held in list(feed.held):
                    try:
                        await held.msg.in_progress()
                    except Exception as exc:  # noqa: BLE001 - a lost connection shows elsewhere
                        log.debug("in_progress failed: %s", exc)
