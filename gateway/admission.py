"""Admission control: reject at the door what cannot meet its deadline.

Every request has a deadline: the client's ``deadline_s``, else the workflow's SLO
(``slo_factor`` x its solo latency, at least ``slo_min_s``). Before a request is accepted, the
ingress estimates the earliest it could finish, given the work already queued in every pool it
needs; if that is past the deadline, the request is rejected (HTTP 503 with Retry-After,
or an error result on NATS) instead of timing out in a queue. Work whose deadline passes anyway
is dropped by the node that finds it (``services.runner``), not run.

The bound, for a DAG of nodes: a node cannot start before the tasks ahead of it are done
(those queued in its pool, and those queued or in progress in the pools upstream of it, which
will reach it first: ``backlog x work / ready replicas``, FIFO, at the throughput recently
measured) nor before its predecessors finish, and then takes at least its steps times the
least time a step of its pool has taken. The functions here are pure; ``LoadWatch`` feeds
them from the replicas' reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from common import subjects
from common.errors import InvalidField, InvalidRequest, Overloaded
from common.messages import Plan, ShedReport, encode, now
from common.observe import ClusterObserver
from common.workflow import WorkflowSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolLoad:
    """What admission needs to know about one pool."""

    lag: int  # tasks queued (and in progress, unless counted in ``in_progress``)
    ready: int  # replicas serving
    work_s: float | None = None  # amortised compute per task (1 / a replica's throughput)
    step_s: float | None = None  # least compute one step of a task took
    steps_per_task: float = 1.0  # mean steps of recent tasks
    admitted_steps: int = 0  # steps of requests admitted here since ``lag`` was sampled
    in_progress: int = 0  # tasks a replica of this pool holds (fetched, running)

    def ahead(self, upstream: bool) -> int:
        """Tasks of this pool a new one surely waits for: the queued ones, and when the pool is
        upstream of the node also those in progress (they will all reach the node first). At
        the node's own pool a task in progress may be about to finish: a lower bound counts
        it as done."""
        return self.lag + (self.in_progress if upstream else 0)

    def clear_s(self, backlog: int) -> float:
        """Seconds until ``backlog`` queued tasks, and the steps admitted since the lag was
        sampled, are done here at the measured throughput: the mean work a task amortised
        over its batches, as the replicas have recently gone (time-sharing a device with
        other pools included). Not the fastest a task went: under overload, that let in
        work which then missed its deadline, taking device time from work that would not
        have."""
        if not self.work_s:
            return 0.0
        per_step = self.work_s / self.steps_per_task
        return (backlog * self.work_s + self.admitted_steps * per_step) / max(self.ready, 1)


def steps_of(spec: WorkflowSpec, params: Mapping[str, Any], plan: Plan) -> dict[str, int]:
    """Steps (progress units) each node of ``plan`` will run for these params: a denoiser its
    ``steps`` (times img2img's ``strength``), any other node one; a monolithic node the sum."""

    def steps(kind: str) -> int:
        if kind != "denoiser":
            return 1
        n = params.get("steps", 1)
        n = n if isinstance(n, int | float) and not isinstance(n, bool) else 1
        strength = params.get("strength")
        if isinstance(strength, int | float) and any(
            "image_latents" in node.inputs for node in spec.nodes.values()
        ):
            n = int(n * strength)
        return max(1, int(n))

    per_spec_node = {name: steps(node.kind) for name, node in spec.nodes.items()}
    return {
        name: per_spec_node[name] if name in per_spec_node else sum(per_spec_node.values())
        for name in plan.nodes
    }


def finish_bound_s(
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None = None
) -> float:
    """The earliest a new request of ``plan`` could finish, in seconds, given the queues now
    (cleared at the measured throughput; its own steps at the least step time; pools without
    figures count as empty and instant)."""
    memo: dict[str, float] = {}

    def upstream(node: str) -> set[str]:
        pools = {plan.nodes[node].pool}
        for p in plan.predecessors(node):
            pools |= upstream(p)
        return pools

    def done_by(node: str) -> float:
        if node not in memo:
            load = loads.get(plan.nodes[node].pool, PoolLoad(0, 0))
            pool = plan.nodes[node].pool
            backlog = sum(loads[p].ahead(upstream=p != pool) for p in upstream(node)
                          if p in loads)
            start = max([load.clear_s(backlog), *(done_by(p) for p in plan.predecessors(node))])
            memo[node] = start + (load.step_s or 0.0) * (steps or {}).get(node, 1)
        return memo[node]

    return done_by(plan.output_node)


def solo_latency_s(
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None = None
) -> float | None:
    """The request alone on an idle system, from measured step times; None until every pool
    of it has finished a task."""
    if any(loads.get(n.pool, PoolLoad(0, 0)).step_s is None for n in plan.nodes.values()):
        return None
    idle = {pool: replace(load, lag=0, admitted_steps=0) for pool, load in loads.items()}
    return finish_bound_s(plan, idle, steps)


@dataclass(frozen=True)
class DeadlinePolicy:
    slo_factor: float = 2.0
    slo_min_s: float = 1.0
    max_deadline_s: float = 3600.0


def deadline_s(
    raw: Mapping[str, Any], declared_solo_s: float | None, measured_solo_s: float | None,
    policy: DeadlinePolicy,
) -> float | None:
    """The request's deadline in seconds from submission: its own ``deadline_s``, else the
    workflow's SLO; None when neither is known (no solo latency declared or measured yet)."""
    value = raw.get("deadline_s")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InvalidRequest([InvalidField("deadline_s", "must be a number of seconds > 0")])
        if value > policy.max_deadline_s:
            raise InvalidRequest([InvalidField(
                "deadline_s", f"{value} exceeds the limit of {policy.max_deadline_s:g} s",
                policy.max_deadline_s,
            )])
        return float(value)
    solo = declared_solo_s if declared_solo_s is not None else measured_solo_s
    if solo is None:
        return None
    return min(max(policy.slo_factor * solo, policy.slo_min_s), policy.max_deadline_s)


def check(
    workflow: str, plan: Plan, loads: Mapping[str, PoolLoad], deadline: float,
    steps: Mapping[str, int] | None = None,
) -> float:
    """The finish bound; raises ``Overloaded`` (with when to retry) if it is past ``deadline``."""
    bound = finish_bound_s(plan, loads, steps)
    if bound > deadline:
        queued = {n.pool: loads[n.pool].lag + loads[n.pool].in_progress
                  for n in plan.nodes.values() if n.pool in loads}
        raise Overloaded(
            f"{workflow}: the work queued ahead needs at least {bound:.2f}s, past the deadline "
            f"of {deadline:.2f}s; retry later or with a larger deadline_s",
            retry_after_s=max(1.0, math.ceil(bound - deadline)),
            bound_s=round(bound, 3), deadline_s=round(deadline, 3), queued=queued,
        )
    return bound


class LoadWatch:
    """Keeps ``loads`` fresh from the replicas' reports and the consumers' lag."""

    def __init__(self, nc: Any, period_s: float = 0.5) -> None:
        self.nc = nc
        self.observer = ClusterObserver(nc)
        self.period_s = period_s
        self.loads: dict[str, PoolLoad] = {}
        self.source = uuid.uuid4().hex[:12]
        self.shed: Counter[str] = Counter()  # pool -> tasks turned away, ever
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.observer.start()
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.observer.stop()

    def rejected(self, plan: Plan) -> None:
        """Count a rejected request's tasks: the autoscaler adds them to the pools' demand."""
        self.shed.update(node.pool for node in plan.nodes.values())

    def admitted(self, plan: Plan, steps: Mapping[str, int]) -> None:
        """Count the steps of a request admitted since the last sample, so that a burst within
        one sampling period is not admitted as if the queues were empty."""
        for name, node in plan.nodes.items():
            load = self.loads.get(node.pool, PoolLoad(0, 0))
            self.loads[node.pool] = replace(
                load, admitted_steps=load.admitted_steps + steps.get(name, 1)
            )

    async def refresh(self) -> None:
        views = await self.observer.sample()
        self.loads = {
            pool: PoolLoad(
                lag=v.pending, in_progress=v.ack_pending, ready=v.ready,
                work_s=None if v.work_ms is None else v.work_ms / 1000,
                step_s=None if v.unit_ms_min is None else v.unit_ms_min / 1000,
                steps_per_task=v.steps_per_task or 1.0,
            )
            for pool, v in views.items()
        }

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                if self.shed:
                    report = ShedReport(self.source, dict(self.shed), now())
                    await self.nc.publish(subjects.ADMISSION_SHED, encode(report))
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last view; NATS may be back soon
                log.debug("load refresh failed: %s", exc)
