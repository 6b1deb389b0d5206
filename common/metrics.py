"""Statistics that replicas report and the autoscaler, `lego status` and benchmarks read, and the
Prometheus metrics every process exports.

Where each metric comes from (the gateway serves ``GET /metrics`` on its own port; a node and
the autoscaler each run a small HTTP server on ``node_metrics_port`` / ``autoscaler_metrics_port``):

    gateway/ingress  lego_requests_total{workflow,outcome}             submissions: accepted,
                                                                       duplicate, invalid,
                                                                       conflict, overloaded
                     lego_requests_finished_total{workflow,status}     succeeded, failed, cancelled
    nodes            lego_node_queue_wait_seconds{pool}                histogram: published ->
                                                                       fetched
                     lego_node_execution_seconds{pool}                 histogram: a task's steps
                     lego_node_batch_size{pool}                        histogram: tasks per step
                     lego_node_tasks_total{pool,replica,outcome}       done, failed, dropped
                     lego_node_state{pool,replica,state}, lego_node_held_tasks{pool,replica},
                     lego_node_load_seconds{pool,replica},
                     lego_node_startup_seconds{pool,replica}           (the replica's own report)
    nodes, gateway   lego_store_operations_total{store,op}             get, put, delete
                     lego_store_bytes_total{store,op}                  get, put
    autoscaler       lego_pool_lag{pool}                               pending + ack pending
                     lego_pool_replicas{pool,state}                    starting, ready, draining
                     lego_pool_desired_replicas{pool}
                     lego_autoscaler_scale_events_total{pool,direction}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.messages import ReplicaStatus, ScaleEvent

if TYPE_CHECKING:
    from common.observe import PoolView

log = logging.getLogger(__name__)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --- exposition -------------------------------------------------------------------------------

CONTENT_TYPE = CONTENT_TYPE_LATEST


def exposition() -> bytes:
    """Every metric of this process in Prometheus' text format."""
    return generate_latest(REGISTRY)


_served_port: int | None = None


def serve(port: int | None, host: str) -> int | None:
    """Start this process's Prometheus endpoint on ``host:port`` (0: a free port) in a thread,
    once per process (a process hosting several replicas serves them all on one). Returns the
    port; None when ``port`` is None or taken (logged: metrics are not worth failing for)."""
    global _served_port
    if port is None or _served_port is not None:
        return _served_port if port is not None else None
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("no Prometheus endpoint on %s:%s: %s", host, port, exc)
        return None
    _served_port = int(server.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, _served_port)
    return _served_port


_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0, 60.0, 120.0)

# --- gateway and ingress ------------------------------------------------------------------------

REQUESTS = Counter(
    "lego_requests", "Submissions by admission outcome (accepted, duplicate, invalid, conflict, "
    "overloaded)", ["workflow", "outcome"],
)
REQUESTS_FINISHED = Counter(
    "lego_requests_finished", "Requests that ended, by final status", ["workflow", "status"]
)

# --- tensor store -------------------------------------------------------------------------------

STORE_OPERATIONS = Counter(
    "lego_store_operations", "Tensor store operations (delete: tensors deleted)", ["store", "op"]
)
STORE_BYTES = Counter("lego_store_bytes", "Tensor bytes read and written", ["store", "op"])

# --- nodes ------------------------------------------------------------------------------------

QUEUE_WAIT = Histogram(
    "lego_node_queue_wait_seconds", "A task's wait from publication to fetch", ["pool"],
    buckets=_SECONDS,
)
EXECUTION = Histogram(
    "lego_node_execution_seconds", "A task's compute: the steps it ran (batched with others)",
    ["pool"], buckets=_SECONDS,
)
BATCH_SIZE = Histogram(
    "lego_node_batch_size", "Tasks advanced together by one step", ["pool"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)


class NodeMetrics:
    """A replica's histograms, bound to its pool."""

    def __init__(self, pool: str) -> None:
        self.queue_wait = QUEUE_WAIT.labels(pool)
        self.execution = EXECUTION.labels(pool)
        self.batch_size = BATCH_SIZE.labels(pool)


class ReplicaReports:
    """Exports what this process's replicas last reported about themselves (``ReplicaStatus``,
    once a second) at scrape time, so a replica counts each thing once, for NATS and for
    Prometheus alike."""

    STATES = ("starting", "ready", "draining", "stopped", "failed")

    def __init__(self) -> None:
        self.latest: dict[str, ReplicaStatus] = {}

    def report(self, status: ReplicaStatus) -> None:
        self.latest[status.replica] = status

    def describe(self) -> Iterator[Metric]:
        return self._families([])

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self.latest.values()))  # list(): a snapshot, thread-safe

    def _families(self, statuses: list[ReplicaStatus]) -> Iterator[Metric]:
        labels = ["pool", "replica"]
        tasks = CounterMetricFamily("lego_node_tasks", "Tasks a replica finished, by outcome",
                                    labels=[*labels, "outcome"])
        state = GaugeMetricFamily("lego_node_state", "1 for the replica's state",
                                  labels=[*labels, "state"])
        held = GaugeMetricFamily("lego_node_held_tasks", "Tasks fetched, not yet acked",
                                 labels=labels)
        load = GaugeMetricFamily("lego_node_load_seconds", "Weights loaded and warmed up in",
                                 labels=labels)
        startup = GaugeMetricFamily("lego_node_startup_seconds",
                                    "Process start to ready (the cold start)", labels=labels)
        for s in statuses:
            ids = [s.pool, s.replica]
            for outcome, count in (("done", s.tasks_done), ("failed", s.tasks_failed),
                                   ("dropped", s.tasks_dropped)):
                tasks.add_metric([*ids, outcome], count)
            for name in self.STATES:
                state.add_metric([*ids, name], float(s.state == name))
            held.add_metric(ids, s.held)
            load.add_metric(ids, s.load_s)
            if s.startup_s is not None:
                startup.add_metric(ids, s.startup_s)
        yield from (tasks, state, held, load, startup)


REPLICA_REPORTS = ReplicaReports()
REGISTRY.register(REPLICA_REPORTS)

# --- autoscaler -------------------------------------------------------------------------------

class AutoscalerReports:
    """Exports the autoscaler's last tick at scrape time: per pool its lag, its replicas by the
    state they report and the count the policy asks for. Pools that went away go with it."""

    def __init__(self) -> None:
        self.views: Mapping[str, PoolView] = {}
        self.desired: Mapping[str, int] = {}

    def record(self, views: Mapping[str, PoolView], desired: Mapping[str, int]) -> None:
        self.views, self.desired = dict(views), dict(desired)  # swapped whole: thread-safe

    def describe(self) -> Iterator[Metric]:
        return self._families({}, {})

    def collect(self) -> Iterator[Metric]:
        return self._families(self.views, self.desired)

    def _families(
        self, views: Mapping[str, PoolView], desired: Mapping[str, int]
    ) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "lego_pool_lag", "Tasks waiting or held: num_pending + num_ack_pending",
            labels=["pool"],
        )
        replicas = GaugeMetricFamily(
            "lego_pool_replicas", "Live replicas by the state they report",
            labels=["pool", "state"],
        )
        wanted = GaugeMetricFamily(
            "lego_pool_desired_replicas", "Replicas the policy asks for", labels=["pool"]
        )
        for pool, view in views.items():
            lag.add_metric([pool], view.lag)
            for state in ("starting", "ready", "draining", "failed"):
                replicas.add_metric([pool, state], view.replicas.get(state, 0))
        for pool, count in desired.items():
            wanted.add_metric([pool], count)
        yield from (lag, replicas, wanted)


AUTOSCALER_REPORTS = AutoscalerReports()
REGISTRY.register(AUTOSCALER_REPORTS)
SCALE_EVENTS = Counter(
    "lego_autoscaler_scale_events", "Replica count changes", ["pool", "direction"]
)


def record_autoscaler(
    views: Mapping[str, PoolView], desired: Mapping[str, int], events: Iterable[ScaleEvent]
) -> None:
    """One autoscaler tick's figures (``lego_pool_*``) and scale events."""
    AUTOSCALER_REPORTS.record(views, desired)
    for event in events:
        SCALE_EVENTS.labels(event.pool, "up" if event.after > event.before else "down").inc()
