"""Admission control: reject at the door what cannot meet its deadline.

Every request has a deadline: the client's ``deadline_s``, else the workflow's SLO
(``slo_factor`` x its solo latency, at least ``slo_min_s``). Before a request is accepted, the
ingress estimates the earliest it could finish, given the work already queued in every pool it
needs; if that is past the deadline, the request is rejected (HTTP 503 with Retry-After,
or an error result on NATS) instead of timing out in a queue. Work whose deadline passes anyway
is dropped by the node that finds it (``services.runner``), not run.

The bound, for a DAG of nodes: a node cannot start before the tasks ahead of it are done (those
queued in its pool, and those queued or in progress upstream of it, which will reach it first,
the most on any one chain of pools from a root to it: ``backlog x work / ready replicas``,
FIFO, at the throughput recently measured) nor before its predecessors finish, and then takes
at least its steps times the least time a step of its pool has taken. A request's ``eta_s`` is
the expected finish: the same walk with its own steps at the mean time recent tasks' steps took
(batches shared included); what admission holds against the deadline takes their 90th
percentile, so that an admitted request still finishes in time when its steps run slower than
the mean (a fuller batch, a busier host). Against the lower bound alone, an overload admitted
requests that then ran in full batches and missed their deadlines: two thirds of those
admitted, on the tiny CPU models; against the mean, one in ten.

Estimates err: a host busier than its recent figures show (on a shared CPU host, the gateway
itself turning an overload away) makes admitted requests late. ``Margin`` learns from those
misses: while the pools drop more of their tasks as late than ``admission_miss_target``
allows, the estimate is held against the deadline times a growing factor, which eases back
once misses are rare again.

With device hosts, several models take turns on one device, the step with the least slack
first: a new request waits for its own pools' queues (first in, first out until a host
fetches a task) and for the part of the other models' queued work that is due before its
deadline. ``Ledger`` keeps, for the requests this gateway admitted, their deadlines and their
nodes' remaining work (from the nodes' progress reports), so it can tell that part.

The paper's rule (``admission_rule: paper``, the DiFlow artifact's early abort) is kept beside
it for comparison: a request is rejected when the work in flight, max(queued work / devices,
the longest single piece of it), exceeds its slack (deadline minus its own solo work); the
check is skipped while fewer requests are in flight than there are devices. It sees the same
per-pool figures (``paper_estimate``). The functions here are pure; ``LoadWatch`` feeds them
from the replicas' reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from common import subjects
from common.errors import InvalidField, InvalidRequest, Overloaded
from common.kinds import KINDS
from common.messages import Plan, Progress, QueueMark, ShedReport, decode, encode, now
from common.observe import ClusterObserver
from common.workflow import WorkflowSpec

log = logging.getLogger(__name__)

AdmissionRule = Literal["lego", "paper"]
#: which step time a request's own steps take in an estimate: the least a step took (a lower
#: bound), the mean of recent tasks' steps (the ETA), or their 90th percentile (what admission
#: holds against the deadline)
StepTime = Literal["least", "mean", "p90"]


@dataclass(frozen=True)
class PoolLoad:
    """What admission needs to know about one pool."""

    lag: int  # tasks queued (and in progress, unless counted in ``in_progress``)
    ready: int  # replicas serving
    work_s: float | None = None  # amortised compute per task (1 / a replica's throughput)
    step_s: float | None = None  # least compute one step of a task took
    step_mean_s: float | None = None  # what a step of a recent task took, batches included
    step_p90_s: float | None = None  # the 90th percentile of recent tasks' step times
    steps_per_task: float = 1.0  # mean steps of recent tasks
    admitted_steps: int = 0  # steps of requests admitted here since ``lag`` was sampled
    in_progress: int = 0  # tasks a replica of this pool holds (fetched, running)
    admitted_requests: int = 0  # requests admitted here since ``lag`` was sampled
    devices: frozenset[str] = frozenset()  # devices its ready replicas run on
    delivered: int = 0  # tasks its consumer ever handed out, when ``lag`` was sampled

    def ahead(self, upstream: bool) -> int:
        """Tasks of this pool a new one waits for: the queued ones, and when the pool is
        upstream of the node also those in progress (they will all reach the node first). At
        the node's own pool a new task joins the batch in progress at its next step (batches
        form step by step), so those in progress do not hold it back."""
        return self.lag + (self.in_progress if upstream else 0)

    def own_step_s(self, step: StepTime) -> float:
        """A step of a new task here: the least one took, or what a recent task's steps took
        (batches included), on average or at the 90th percentile; the next best figure where
        one is missing."""
        figures = {"least": (self.step_s,), "mean": (self.step_mean_s, self.step_s),
                   "p90": (self.step_p90_s, self.step_mean_s, self.step_s)}[step]
        return next((f for f in figures if f), 0.0)

    def clear_s(self, backlog: int) -> float:
        """Seconds until ``backlog`` queued tasks, and the steps admitted since the lag was
        sampled, are done here at the measured throughput: the mean work a task amortised
        over its batches, as the replicas have recently gone (time-sharing a device with
        other pools included). Not the fastest a task went: under overload, that let in
        work which then missed its deadline, taking device time from work that would not
        have."""
        return self._work_s(backlog) / max(self.ready, 1)

    def queued_work_s(self) -> float:
        """Device-seconds of work this pool still has to do: its tasks queued, half of those
        in progress (on average half done), and the steps admitted since the lag was
        sampled, at the measured throughput."""
        return self._work_s(self.lag + self.in_progress / 2)

    def _work_s(self, backlog: float) -> float:
        if not self.work_s:
            return 0.0
        per_step = self.work_s / self.steps_per_task
        return backlog * self.work_s + self.admitted_steps * per_step


def steps_of(spec: WorkflowSpec, params: Mapping[str, Any], plan: Plan) -> dict[str, int]:
    """Steps (progress units) each node of ``plan`` will run for these params: a node of a
    stepped kind (a denoiser) its kind's ``step_param`` (times img2img's ``strength``), any
    other node one; a monolithic node the sum."""

    def steps(kind: str) -> int:
        step_param = KINDS[kind].step_param
        if step_param is None:
            return 1
        n = params.get(step_param, 1)
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
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None = None,
    step: StepTime = "least",
) -> float:
    """The earliest a new request of ``plan`` could finish, in seconds, given the queues now
    (cleared at the measured throughput; its own steps at the least step time; pools without
    figures count as empty and instant). ``step``: its own steps at another step time, to
    say when it should finish (``mean``) or will very likely have finished (``p90``)."""
    memo: dict[str, float] = {}

    def ahead_of(node: str) -> int:
        """Tasks ahead of a new one at ``node``: those queued in its pool, and the requests
        upstream of it. A request has a task in each parallel branch (the text encoders
        feeding one denoiser), so those are the most on any one chain from a root, not the
        sum over every upstream pool, which counted each request once per branch."""
        pool = plan.nodes[node].pool
        own = loads[pool].ahead(upstream=False) if pool in loads else 0
        chains = ({plan.nodes[n].pool for n in path} - {pool} for path in plan.paths_to(node))
        return own + max(sum(loads[p].ahead(upstream=True) for p in pools if p in loads)
                         for pools in chains)

    def done_by(node: str) -> float:
        if node not in memo:
            load = loads.get(plan.nodes[node].pool, PoolLoad(0, 0))
            backlog = ahead_of(node)
            start = max([load.clear_s(backlog), *(done_by(p) for p in plan.predecessors(node))])
            memo[node] = start + load.own_step_s(step) * (steps or {}).get(node, 1)
        return memo[node]

    return done_by(plan.output_node)


def solo_latency_s(
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None = None
) -> float | None:
    """The request alone on an idle system, from measured step times; None until every pool
    of it has finished a task."""
    if any(loads.get(n.pool, PoolLoad(0, 0)).step_s is None for n in plan.nodes.values()):
        return None
    return _own_work_s(plan, loads, steps)


def _own_work_s(
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None,
    step: StepTime = "least",
) -> float:
    """The request's own path through ``plan`` on idle pools (unmeasured ones instant)."""
    # in progress counts too: upstream of a node, finish_bound_s waits for those tasks
    idle = {pool: replace(load, lag=0, in_progress=0, admitted_steps=0)
            for pool, load in loads.items()}
    return finish_bound_s(plan, idle, steps, step)


@dataclass(frozen=True)
class PaperEstimate:
    """The DiFlow artifact's view of the work in flight ahead of a new request."""

    wait_s: float  # max(queued work / devices, the longest single piece of it)
    devices: int  # the workers that work is spread over
    in_flight: int  # requests in flight there (one outstanding task each)


def paper_estimate(plan: Plan, loads: Mapping[str, PoolLoad]) -> PaperEstimate:
    """The work in flight, as the paper's early abort estimates it, from the per-pool figures
    admission sees.

    Devices (the paper's workers): those a ready replica of the request's pools runs on, else
    those any pool's ready replicas run on, at least 1. The work that competes for them: every
    pool with a ready replica there, and the request's own pools (every pool when no device is
    known). The artifact sums each in-flight request's remaining work; the pools' queues do not
    say which task belongs to which request, so the longest single piece is the longest task
    queued (a lower bound of the longest request), and a request in flight is one outstanding
    task (its nodes are a chain; each runs after the previous one is done)."""
    count, sharing = _sharing(plan, loads)
    competing = sharing.values()
    total_s = sum(load.queued_work_s() for load in competing)
    longest_s = max((load.work_s or 0.0 for load in competing
                     if load.lag + load.in_progress + load.admitted_requests), default=0.0)
    in_flight = (sum(load.lag + load.in_progress for load in competing)
                 + max((load.admitted_requests for load in competing), default=0))
    return PaperEstimate(max(total_s / count, longest_s), count, in_flight)


def _sharing(plan: Plan, loads: Mapping[str, PoolLoad]) -> tuple[int, dict[str, PoolLoad]]:
    """The devices a request of ``plan`` can run on (those a ready replica of its pools runs
    on, else those of any pool; at least 1) and the pools whose work competes for them
    (every pool with a ready replica there, and the request's own; all when no device is
    known)."""
    mine = {node.pool for node in plan.nodes.values()}
    devices = frozenset().union(*(loads[p].devices for p in mine if p in loads))
    devices = devices or frozenset().union(*(load.devices for load in loads.values()))
    competing = {pool: load for pool, load in loads.items()
                 if pool in mine or load.devices & devices or not devices}
    return max(1, len(devices)), competing


def shared_wait_s(plan: Plan, loads: Mapping[str, PoolLoad],
                  due_share: Callable[[str], float | None] | None = None) -> float:
    """When pools share devices (device hosts), the least a new request waits for the work
    ahead of it: the work queued in its own pools, and the part due first of the work of the
    other pools on its devices, spread evenly over those devices. The per-pool bound alone
    counts each pool's copies as devices of their own, while its encoders, denoiser and
    decoder take turns on the same devices.

    Its own pools' work counts whole: their queues are first in, first out until a host
    fetches a task. Another pool's work counts by ``due_share(pool)``, the share of it due
    before the new request's deadline (``Ledger.due_share``): the hosts run the step with the
    least slack first, so that part runs ahead of the new request and the rest after it.
    Without a figure (no ``due_share``, or no request of that pool on record) it counts
    nothing."""
    mine = {node.pool for node in plan.nodes.values()}
    count, competing = _sharing(plan, loads)
    total = 0.0
    for pool, load in competing.items():
        share = 1.0 if pool in mine else (due_share(pool) if due_share else None) or 0.0
        total += share * load.queued_work_s()
    return total / count


def bottleneck(plan: Plan, loads: Mapping[str, PoolLoad]) -> str:
    """The pool of ``plan`` that holds a new request longest: its queued work per ready
    replica plus its own work (a pool without figures holds nothing)."""
    def holds_s(pool: str) -> float:
        load = loads.get(pool)
        if load is None:
            return 0.0
        return load.queued_work_s() / max(load.ready, 1) + (load.work_s or 0.0)

    return max(sorted({node.pool for node in plan.nodes.values()}), key=holds_s)


@dataclass
class _Part:
    """One node of a booked request: its pool, the device-seconds it takes, the share of them
    still to run, whether it reports progress (a node of more than one step), and the nodes
    that run before it."""

    pool: str
    work_s: float
    stepped: bool
    before: frozenset[str]
    left: float = 1.0


class Ledger:
    """The requests this gateway admitted, while they may still run: each one's deadline and
    the work its nodes still have to do, per pool. Admission reads from it which share of a
    pool's queued work is due before a new request's deadline (``due_shares``), the work a
    device host runs ahead of that request.

    A request's progress comes from its stepped nodes' progress reports: the nodes before a
    node that reports are done, and that node's work shrinks with its steps. A request is
    forgotten once its last stepped node is done (what is left, a decode, is small) or its
    deadline has passed (no node runs it after that). The queues' own figures stay the
    measure of how much work there is; the ledger only says how it is spread over deadlines.
    Requests another gateway replica admitted are not on it: each replica sees its share of
    the traffic, a sample of the same mix."""

    def __init__(self) -> None:
        self.bookings: dict[str, tuple[float, dict[str, _Part]]] = {}
        self._due: list[tuple[float, str]] = []  # (deadline, request id), soonest first

    def book(self, request_id: str, deadline_at: float, plan: Plan,
             steps: Mapping[str, int], loads: Mapping[str, PoolLoad], at: float) -> None:
        """Book an admitted request (as of ``at``: what is past its deadline is forgotten
        first, so the ledger holds no more than the requests that may still run)."""
        self.expire(at)
        parts = {}
        for name, node in plan.nodes.items():
            load = loads.get(node.pool)
            n = steps.get(name, 1)
            work = load.own_step_s("mean") * n if load is not None else 0.0
            parts[name] = _Part(node.pool, work, n > 1, frozenset(plan.ancestors(name)))
        self.bookings[request_id] = (deadline_at, parts)
        heapq.heappush(self._due, (deadline_at, request_id))

    def progressed(self, request_id: str, node: str, step: int, total: int) -> None:
        """Node ``node`` of a booked request reported ``step`` of ``total`` done."""
        booking = self.bookings.get(request_id)
        if booking is None or node not in booking[1]:
            return
        parts = booking[1]
        for done in parts[node].before:
            parts.pop(done, None)
        parts[node].left = max(0.0, 1 - step / max(total, 1))
        if step >= total:
            del parts[node]
            if not any(part.stepped for part in parts.values()):
                del self.bookings[request_id]

    def expire(self, at: float) -> None:
        """Forget the requests whose deadline is before ``at``."""
        while self._due and self._due[0][0] < at:
            deadline_at, request_id = heapq.heappop(self._due)
            booking = self.bookings.get(request_id)
            if booking is not None and booking[0] == deadline_at:
                del self.bookings[request_id]

    def due_shares(self, due_at: float, at: float) -> dict[str, float]:
        """Per pool with booked work still to run: the share of it whose request is due by
        ``due_at`` (as of ``at``)."""
        self.expire(at)
        total: dict[str, float] = {}
        due: dict[str, float] = {}
        for deadline_at, parts in self.bookings.values():
            for part in parts.values():
                work = part.work_s * part.left
                total[part.pool] = total.get(part.pool, 0.0) + work
                if deadline_at <= due_at:
                    due[part.pool] = due.get(part.pool, 0.0) + work
        return {pool: due.get(pool, 0.0) / work for pool, work in total.items() if work > 0}


@dataclass
class Margin:
    """Admission's safety factor, learned from its misses: what ``check`` multiplies its
    estimate by before holding it against the deadline (at least 1, at most ``limit``).

    Fed, every sample, each pool's tasks finished and, of those, expired (dropped because
    their request could no longer meet its deadline) since the previous sample. Counts decay
    by ``decay`` a sample, a window of about 1 / (1 - decay) samples. A request crosses its
    pools in turn, so its chance of missing is about the sum of the pools' expired shares:
    above ``target`` the factor grows by ``step``, below half of it it shrinks back as fast
    (a slower way back kept an overload's first misses, when queues fill faster than their
    figures are sampled, in the margin long after, halving goodput); pools
    with fewer than ``min_tasks`` in the window say nothing yet."""

    target: float = 0.08
    limit: float = 1.5
    step: float = 0.02
    decay: float = 0.9
    min_tasks: float = 10.0
    factor: float = 1.0
    _finished: dict[str, float] = field(default_factory=dict)
    _expired: dict[str, float] = field(default_factory=dict)

    def update(self, finished: Mapping[str, int], expired: Mapping[str, int]) -> float:
        if self.target >= 1:  # off
            return self.factor
        for counts, new in ((self._finished, finished), (self._expired, expired)):
            for pool in set(counts) | set(new):
                counts[pool] = counts.get(pool, 0.0) * self.decay + max(0, new.get(pool, 0))
        share = self.miss_share()
        if share > self.target:
            self.factor = min(self.limit, self.factor * (1 + self.step))
        elif share < self.target / 2:
            self.factor = max(1.0, self.factor / (1 + self.step))
        return self.factor

    def miss_share(self) -> float:
        """The share of requests expected to miss, from the pools' recent expired tasks."""
        return sum(self._expired.get(pool, 0.0) / done for pool, done in self._finished.items()
                   if done >= self.min_tasks)


@dataclass(frozen=True)
class DeadlinePolicy:
    slo_factor: float = 2.0
    slo_min_s: float = 1.0
    max_deadline_s: float = 3600.0


def deadline_s(
    raw: Mapping[str, Any], declared_solo_s: float | None, measured_solo_s: float | None,
    policy: DeadlinePolicy,
) -> float:
    """The request's deadline in seconds from submission: its own ``deadline_s``, else the
    workflow's SLO; ``max_deadline_s`` while its solo latency is neither declared nor
    measured yet (a pool that never had a replica)."""
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
    if solo is None:  # not measured yet: still a limit, so that no request waits forever
        return policy.max_deadline_s
    return min(max(policy.slo_factor * solo, policy.slo_min_s), policy.max_deadline_s)


def check(
    workflow: str, plan: Plan, loads: Mapping[str, PoolLoad], deadline: float,
    steps: Mapping[str, int] | None = None, rule: AdmissionRule = "lego",
    shared_devices: bool = False, margin: float = 1.0,
    due_share: Callable[[str], float | None] | None = None,
) -> float:
    """The estimated finish; raises ``Overloaded`` (with when to retry) if it is past
    ``deadline``. ``rule``: ``lego``, the finish bound over the DAG (with ``shared_devices``,
    at least ``shared_wait_s`` plus the request's own work, other pools' work counted by
    ``due_share``), times ``margin`` (``Margin``); ``paper``, the DiFlow artifact's
    (``paper_estimate`` against the request's slack)."""
    if rule == "paper":
        own = _own_work_s(plan, loads, steps)
        estimate = paper_estimate(plan, loads)
        slack = deadline - own
        # with a device free for every request in flight, the new one starts at once
        if estimate.in_flight >= estimate.devices and estimate.wait_s > slack:
            raise Overloaded(
                f"{workflow}: the work in flight needs {estimate.wait_s:.2f}s on "
                f"{estimate.devices} device(s), past the slack of {slack:.2f}s (deadline "
                f"{deadline:.2f}s minus its own {own:.2f}s); retry later or with a larger "
                "deadline_s",
                retry_after_s=max(1.0, math.ceil(estimate.wait_s - slack)),
                wait_s=round(estimate.wait_s, 3), slack_s=round(slack, 3),
                deadline_s=round(deadline, 3), devices=estimate.devices,
                queued=_queued(plan, loads),
            )
        return estimate.wait_s + own
    bound = _lego_bound_s(plan, loads, steps, shared_devices, "p90", due_share) * margin
    if bound > deadline:
        raise Overloaded(
            f"{workflow}: the work queued ahead needs at least {bound:.2f}s, past the deadline "
            f"of {deadline:.2f}s; retry later or with a larger deadline_s",
            retry_after_s=max(1.0, math.ceil(bound - deadline)),
            bound_s=round(bound, 3), deadline_s=round(deadline, 3), queued=_queued(plan, loads),
        )
    return bound


def _lego_bound_s(plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None,
                  shared_devices: bool, step: StepTime,
                  due_share: Callable[[str], float | None] | None = None) -> float:
    bound = finish_bound_s(plan, loads, steps, step)
    if shared_devices:
        bound = max(bound, shared_wait_s(plan, loads, due_share)
                    + _own_work_s(plan, loads, steps, step))
    return bound


def estimate_s(
    plan: Plan, loads: Mapping[str, PoolLoad], steps: Mapping[str, int] | None = None,
    rule: AdmissionRule = "lego", shared_devices: bool = False,
    due_share: Callable[[str], float | None] | None = None,
) -> float:
    """When a new request of ``plan`` should finish, in seconds from now (a request's
    ``eta_s`` when it is accepted): the estimate ``check`` makes, with its own steps at the
    mean step time of recent tasks where ``check`` takes their 90th percentile."""
    if rule == "paper":
        return paper_estimate(plan, loads).wait_s + _own_work_s(plan, loads, steps)
    return _lego_bound_s(plan, loads, steps, shared_devices, "mean", due_share)


def queue_position(mark: QueueMark, load: PoolLoad | None) -> int:
    """Tasks still ahead of one that entered a pool's queue at ``mark``: those ahead then,
    less those the pool's consumer handed out since (first in, first out)."""
    handed_out = 0 if load is None else max(0, load.delivered - mark.delivered)
    return max(0, mark.ahead - handed_out)


def queue_marks(plan: Plan, loads: Mapping[str, PoolLoad]) -> dict[str, QueueMark]:
    """Where a new request of ``plan`` enters the queues of the pools it waits on first (its
    roots'): behind their queued tasks and the requests admitted since they were counted."""
    marks = {}
    for root in plan.roots():
        pool = plan.nodes[root].pool
        load = loads.get(pool, PoolLoad(0, 0))
        marks[pool] = QueueMark(load.lag + load.admitted_requests, load.delivered)
    return marks


def _queued(plan: Plan, loads: Mapping[str, PoolLoad]) -> dict[str, int]:
    """Tasks queued or in progress in each pool of ``plan``: a rejection's reason."""
    return {n.pool: loads[n.pool].lag + loads[n.pool].in_progress
            for n in plan.nodes.values() if n.pool in loads}


def _remembered(load: PoolLoad, before: PoolLoad | None) -> PoolLoad:
    """``load``, with the speed figures of ``before`` where it has none: a pool whose last
    replica died (or scaled to zero) keeps its measured step times, so its workflows keep a
    measured solo latency, hence a deadline, and its queue an estimate, until a replica
    reports again. Without a deadline a request would wait for a replica forever."""
    if before is None or load.work_s is not None:
        return load
    return replace(load, work_s=before.work_s, step_s=before.step_s,
                   step_mean_s=before.step_mean_s, step_p90_s=before.step_p90_s,
                   steps_per_task=before.steps_per_task)


#: the least time between two reports of rejections that happen one after another
SHED_REPORT_GAP_S = 0.05


class LoadWatch:
    """Keeps ``loads`` fresh from the replicas' reports and the consumers' lag."""

    def __init__(self, nc: Any, period_s: float = 0.5, miss_target: float = 0.08) -> None:
        self.nc = nc
        self.observer = ClusterObserver(nc)
        self.period_s = period_s
        self.loads: dict[str, PoolLoad] = {}
        self.margin = Margin(target=miss_target)
        self.ledger = Ledger()
        self._counts: dict[str, tuple[int, int]] = {}  # pool -> (finished, expired) last seen
        self.source = uuid.uuid4().hex[:12]
        self.shed: Counter[str] = Counter()  # pool -> tasks turned away, ever
        self.held: Counter[str] = Counter()  # pool -> rejections it was the bottleneck of
        self._shed_news = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._progress: Any = None

    async def start(self) -> None:
        await self.observer.start()
        await self.refresh()
        self._progress = await self.nc.subscribe(subjects.PROGRESS_WILDCARD,
                                                 cb=self._on_progress)
        self._tasks = [asyncio.create_task(self._loop()), asyncio.create_task(self._shed_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._progress is not None:
            with contextlib.suppress(Exception):
                await self._progress.unsubscribe()
        await self.observer.stop()

    async def _on_progress(self, msg: Any) -> None:
        try:
            progress = decode(msg.data, Progress)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        self.ledger.progressed(progress.id, progress.node, progress.step, progress.total)

    def rejected(self, plan: Plan) -> None:
        """Count a rejected request's tasks: the autoscaler adds them to the pools' demand,
        and a replica to the pool that held it back most (``bottleneck``); told at once (a
        burst turned away is the news that more replicas are needed)."""
        self.shed.update(node.pool for node in plan.nodes.values())
        self.held[bottleneck(plan, self.loads)] += 1
        self._shed_news.set()

    def admitted(self, plan: Plan, steps: Mapping[str, int]) -> None:
        """Count the steps of a request admitted since the last sample, so that a burst within
        one sampling period is not admitted as if the queues were empty."""
        for name, node in plan.nodes.items():
            load = self.loads.get(node.pool, PoolLoad(0, 0))
            self.loads[node.pool] = replace(
                load, admitted_steps=load.admitted_steps + steps.get(name, 1),
                admitted_requests=load.admitted_requests + 1,
            )

    async def refresh(self) -> None:
        views = await self.observer.sample()
        ready_on: dict[str, set[str]] = {}
        for status in self.observer.live_statuses():
            if status.state == "ready":
                ready_on.setdefault(status.pool, set()).add(status.device)
        loads = {
            pool: PoolLoad(
                lag=v.pending, in_progress=v.ack_pending, ready=v.ready,
                work_s=None if v.work_ms is None else v.work_ms / 1000,
                step_s=None if v.unit_ms_min is None else v.unit_ms_min / 1000,
                step_mean_s=None if v.unit_ms_mean is None else v.unit_ms_mean / 1000,
                step_p90_s=None if v.unit_ms_p90 is None else v.unit_ms_p90 / 1000,
                steps_per_task=v.steps_per_task or 1.0,
                devices=frozenset(ready_on.get(pool, ())), delivered=v.delivered,
            )
            for pool, v in views.items()
        }
        self.loads = {pool: _remembered(load, self.loads.get(pool))
                      for pool, load in loads.items()}
        counts = {pool: (v.finished, v.expired) for pool, v in views.items()}
        before = {pool: self._counts.get(pool, seen) for pool, seen in counts.items()}
        self.margin.update({pool: n[0] - before[pool][0] for pool, n in counts.items()},
                           {pool: n[1] - before[pool][1] for pool, n in counts.items()})
        self._counts = counts

    async def _publish_shed(self) -> None:
        report = ShedReport(self.source, dict(self.shed), now(), dict(self.held))
        await self.nc.publish(subjects.ADMISSION_SHED, encode(report))

    async def _shed_loop(self) -> None:
        """Report rejections as they happen, at most one report per ``SHED_REPORT_GAP_S``."""
        while True:
            await self._shed_news.wait()
            self._shed_news.clear()
            with contextlib.suppress(Exception):  # the periodic report follows anyway
                await self._publish_shed()
            await asyncio.sleep(SHED_REPORT_GAP_S)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                if self.shed:  # again, in case one was lost
                    await self._publish_shed()
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the last view; NATS may be back soon
                log.debug("load refresh failed: %s", exc)
