"""What the cluster looks like right now: per pool, the JetStream lag of its consumer and what
its replicas report (``lego.replicas.<pool>``). Read by `lego status`, the autoscaler loop and
the gateway's admission control; it only reads."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from common import subjects
from common.messages import ReplicaStatus, ShedReport, decode
from common.metrics import percentile

#: a replica silent for longer than this is gone (it reports once a second)
REPLICA_EXPIRY_S = 3.0
#: rates are measured over at least this long, however often the observer samples: a sample
#: taken right after another (a tick woken by news) would read one task as a rate spike
RATE_WINDOW_S = 0.25
_POOL_PREFIX = subjects.pool_consumer("")


@dataclass
class PoolView:
    """One pool as observed: its backlog, its replicas and their recent figures."""

    pool: str
    kind: str = ""
    model: str = ""
    lag: int = 0  # num_pending + num_ack_pending, as KEDA's NATS JetStream scaler counts it
    pending: int = 0
    ack_pending: int = 0
    delivered: int = 0  # tasks the pool's consumer ever handed out (redeliveries included)
    finished: int = 0  # tasks its replicas ever finished (done, failed or dropped)
    expired: int = 0  # of those, dropped because their request could not meet its deadline
    arrival_rate: float | None = None  # tasks/s over RATE_WINDOW_S or more, shed ones included
    shed_rate: float | None = None  # tasks/s admission control turned away
    held_rate: float | None = None  # of those, requests/s whose wait this pool held most
    completion_rate: float | None = None
    replicas: dict[str, int] = field(default_factory=dict)  # state -> count
    placement: dict[str, int] = field(default_factory=dict)  # device -> replicas
    mean_batch: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    load_s: float | None = None  # weights loaded and warmed up, slowest replica
    startup_s: float | None = None  # process start to ready, slowest replica
    startup_parts: dict[str, float] | None = None  # the slowest one's: process, import, weights
    work_ms: float | None = None  # amortised compute per task, mean over replicas
    unit_ms_min: float | None = None  # least compute per step of a task, over replicas
    unit_ms_mean: float | None = None  # a recent task's step time, mean over replicas
    unit_ms_p90: float | None = None  # its 90th percentile, mean over replicas
    steps_per_task: float | None = None  # mean over replicas of their recent tasks' mean
    max_batch: int = 1
    #: why its replicas cannot load their model (the latest ``failed`` report), attempts that
    #: failed in a row and the soonest next attempt
    error: str | None = None
    failures: int = 0
    retry_in_s: float | None = None

    @property
    def ready(self) -> int:
        return self.replicas.get("ready", 0)

    @property
    def live(self) -> int:
        return sum(n for state, n in self.replicas.items() if state != "stopped")

    @property
    def service_rate(self) -> float | None:
        """Tasks/s one replica sustains, from its measured amortised compute per task."""
        return 1000.0 / self.work_ms if self.work_ms else None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "replicas": self.live,
            "ready": self.ready,
            "starting": self.replicas.get("starting", 0),
            "draining": self.replicas.get("draining", 0),
            "failed": self.replicas.get("failed", 0),
            "error": self.error,
            "failures": self.failures,
            "retry_in_s": _round(self.retry_in_s),
            "lag": self.lag,
            "pending": self.pending,
            "ack_pending": self.ack_pending,
            "arrival_rate": _round(self.arrival_rate),
            "shed_rate": _round(self.shed_rate),
            "held_rate": _round(self.held_rate),
            "completion_rate": _round(self.completion_rate),
            "p50_ms": _round(self.p50_ms),
            "p99_ms": _round(self.p99_ms),
            "mean_batch": _round(self.mean_batch),
            "work_ms": _round(self.work_ms),
            "load_s": _round(self.load_s),
            "startup_s": _round(self.startup_s),
            "startup_parts": self.startup_parts,
            "placement": self.placement,
        }


def cluster_json(views: dict[str, PoolView], statuses: list[ReplicaStatus]) -> dict[str, Any]:
    """The cluster as JSON, as `lego status --json` prints it and ``GET /v1/cluster`` serves
    it: per pool its figures, and every live replica's last report (its pool, state and
    ``device``, the device label it runs on)."""
    return {
        "models": {pool: view.to_json() for pool, view in views.items()},
        "replicas": sorted((msgspec.structs.asdict(s) for s in statuses),
                           key=lambda r: (r["pool"], r["replica"])),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class ClusterObserver:
    """Follows replica reports and samples consumer lag on demand. ``news`` is set when
    admission control reports turning away more work than before (demand the queues do not
    show): a loop that samples on a period may wake for it."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.statuses: dict[str, tuple[float, ReplicaStatus]] = {}
        # Tasks each pool's replicas ever finished, and of those, expired: replicas come and
        # go, so the pool keeps the sum of every replica's last report (a replica's own
        # counters only grow).
        self._finished: dict[str, int] = {}
        self._expired: dict[str, int] = {}
        self._counted: dict[str, tuple[int, int]] = {}  # replica -> as last counted
        self._shed: dict[str, dict[str, int]] = {}  # ingress -> pool -> tasks turned away
        self._held: dict[str, dict[str, int]] = {}  # ingress -> pool -> rejections it held
        # per pool, recent samples (t, arrived, done, shed, held): rates over RATE_WINDOW_S
        self._samples: dict[str, deque[tuple[float, int, int, int, int]]] = {}
        self.news = asyncio.Event()

    async def start(self) -> None:
        self._subs = [
            await self.nc.subscribe(subjects.REPLICAS_WILDCARD, cb=self._on_status),
            await self.nc.subscribe(subjects.ADMISSION_SHED, cb=self._on_shed),
        ]

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()

    async def _on_shed(self, msg: Any) -> None:
        report = decode(msg.data, ShedReport)
        before = self._shed.get(report.source, {})
        if any(n > before.get(pool, 0) for pool, n in report.shed.items()):
            self.news.set()
        self._shed[report.source] = report.shed
        self._held[report.source] = report.held

    async def _on_status(self, msg: Any) -> None:
        status = decode(msg.data, ReplicaStatus)
        self.statuses[status.replica] = (time.monotonic(), status)
        finished = status.tasks_done + status.tasks_failed + status.tasks_dropped
        before, expired_before = self._counted.get(status.replica, (0, 0))
        self._finished[status.pool] = self._finished.get(status.pool, 0) + finished - before
        self._expired[status.pool] = (self._expired.get(status.pool, 0) + status.tasks_expired
                                      - expired_before)
        self._counted[status.replica] = (finished, status.tasks_expired)

    def live_statuses(self) -> list[ReplicaStatus]:
        cutoff = time.monotonic() - REPLICA_EXPIRY_S
        for replica in [r for r, (seen, _) in self.statuses.items() if seen < cutoff]:
            del self.statuses[replica]
            self._counted.pop(replica, None)
        return [s for _, s in self.statuses.values() if s.state != "stopped"]

    async def sample(self) -> dict[str, PoolView]:
        """Every pool with a consumer or a live replica, with rates since the last sample."""
        now_s = time.monotonic()
        views: dict[str, PoolView] = {}
        consumed: set[str] = set()  # pools with a consumer
        for info in await self.js.consumers_info(subjects.TASKS_STREAM):
            if not info.name.startswith(_POOL_PREFIX):
                continue
            pool = info.name[len(_POOL_PREFIX):]
            consumed.add(pool)
            view = views.setdefault(pool, PoolView(pool))
            view.pending = info.num_pending or 0
            view.ack_pending = info.num_ack_pending or 0
            view.lag = view.pending + view.ack_pending
            view.delivered = (info.delivered.consumer_seq or 0) if info.delivered else 0
        by_pool: dict[str, list[ReplicaStatus]] = {}
        for status in self.live_statuses():
            by_pool.setdefault(status.pool, []).append(status)
        for pool, statuses in by_pool.items():
            view = views.setdefault(pool, PoolView(pool))
            view.kind, view.model = statuses[0].kind, statuses[0].model
            view.replicas = dict(Counter(s.state for s in statuses))
            failed = sorted((s for s in statuses if s.state == "failed"), key=lambda s: s.at)
            if failed:
                view.error = failed[-1].error
                view.failures = max(s.failures for s in failed)
                view.retry_in_s = _min(_retry_in_s(s) for s in failed)
            view.placement = dict(Counter(s.device for s in statuses))
            view.max_batch = max(s.max_batch for s in statuses)
            batches = sum(s.batches for s in statuses)
            view.mean_batch = sum(s.batch_items for s in statuses) / batches if batches else None
            p50s = [s.p50_ms for s in statuses if s.p50_ms is not None]
            p99s = [s.p99_ms for s in statuses if s.p99_ms is not None]
            view.p50_ms = percentile(p50s, 50)
            view.p99_ms = max(p99s) if p99s else None
            view.load_s = max(s.load_s for s in statuses)
            started = [s for s in statuses if s.startup_s is not None]
            if started:
                slowest = max(started, key=lambda s: s.startup_s or 0.0)  # None filtered out
                view.startup_s, view.startup_parts = slowest.startup_s, slowest.startup_parts
            view.work_ms = _mean(s.work_ms for s in statuses)
            view.unit_ms_min = _min(s.unit_ms_min for s in statuses)
            view.unit_ms_mean = _mean(s.unit_ms_mean for s in statuses)
            view.unit_ms_p90 = _mean(s.unit_ms_p90 for s in statuses)
            view.steps_per_task = _mean(s.steps_per_task for s in statuses)
        for pool, view in views.items():
            done = self._finished.get(pool, 0)
            view.finished, view.expired = done, self._expired.get(pool, 0)
            shed = sum(counts.get(pool, 0) for counts in self._shed.values())
            held = sum(counts.get(pool, 0) for counts in self._held.values())
            # what came in = what its consumer handed out (redeliveries too, rare) + what still
            # waits + what was turned away at the door; without a consumer, what its replicas
            # finished instead of what was handed out (they report once a second: late)
            handed_out = view.delivered if pool in consumed else done
            arrived = handed_out + view.pending + shed
            samples = self._samples.setdefault(pool, deque())
            # the newest sample at least RATE_WINDOW_S old is the rates' start; older ones go
            while len(samples) > 1 and samples[1][0] <= now_s - RATE_WINDOW_S:
                samples.popleft()
            if samples and now_s > samples[0][0]:
                t, arrived_then, done_then, shed_then, held_then = samples[0]
                dt = max(now_s - t, RATE_WINDOW_S)
                view.completion_rate = max(0.0, (done - done_then) / dt)
                view.arrival_rate = max(0.0, (arrived - arrived_then) / dt)
                view.shed_rate = max(0.0, (shed - shed_then) / dt)
                view.held_rate = max(0.0, (held - held_then) / dt)
            samples.append((now_s, arrived, done, shed, held))
        return dict(sorted(views.items()))


def unstartable(statuses: Iterable[ReplicaStatus]) -> dict[str, ReplicaStatus]:
    """Pools that cannot serve now: a replica reports ``failed`` (its model cannot load) and
    none is ready, starting or draining. Per such pool, its latest ``failed`` report."""
    alive: set[str] = set()
    failed: dict[str, ReplicaStatus] = {}
    for status in statuses:
        if status.state == "failed":
            if status.pool not in failed or failed[status.pool].at < status.at:
                failed[status.pool] = status
        elif status.state != "stopped":
            alive.add(status.pool)
    return {pool: status for pool, status in failed.items() if pool not in alive}


def _retry_in_s(status: ReplicaStatus) -> float | None:
    """Seconds until a failed replica's next attempt: its report's figure less the time
    since it was made."""
    if status.retry_in_s is None:
        return None
    return max(0.0, status.retry_in_s - (time.time() - status.at))


def _mean(values: Any) -> float | None:
    """The mean of the replicas' figures that are reported (None and 0: not measured)."""
    present = [v for v in values if v]
    return sum(present) / len(present) if present else None


def _min(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None
