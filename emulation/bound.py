"""`lego bench bound`: the best SLO attainment an idealised cluster could reach on a trace.

The rate-scale capacity bound (``Workload.capacity_rps``) says where a system must start to
miss; it does not say how much it must miss at a given load, nor what a burst costs. This
module answers that for one trace: pure arithmetic over the arrivals and the workload's
profiles (no NATS, no clock), so every ``lego bench slo`` result and every sweep row can carry
it (``bound_attainment``) and a system's attainment reads as a fraction of what was possible.

The idealised cluster:

- ``devices`` devices, each able to run any model with no transfer cost and no load time (all
  models resident from the start);
- a request needs its workflow's solo work (``Workload.work_s``: the profiles' H800 seconds
  at batch 1; every request of a workflow is the same), as one non-preemptible piece on one
  device (a workflow's nodes are a chain, so spreading a request over devices gains nothing);
- its deadline is ``slo_factor`` x that solo work after its arrival (as the systems set it);
- the devices run earliest deadline first: a device that frees up takes the admitted pending
  request with the earliest deadline (event-driven, list scheduling);
- admission has oracle knowledge of every request's exact work and of the schedule: a
  request is admitted only if, with it, every admitted request still finishes by its deadline
  under that schedule. When it cannot be, one request is dropped, among the new one and those
  admitted but not started: one whose removal makes the rest feasible, and of those the one
  with the most work (the earliest deadline among equals, keeping the slack of the rest). That is
  Moore-Hodgson's rule (which is optimal on one machine with common release times) generalised
  to release times and several machines: keep the most requests. Dropping an admitted request
  counts as a miss, as a reject would.

What the figure is. Maximising on-time requests with release times on several machines is
NP-hard even offline, so this is not a proof that no system can do better: it is a strong
heuristic upper reference, the admission and scheduling a system would get with perfect
knowledge and a free, instant, perfectly shared cluster. It ignores what could let a real
system beat it slightly:

- batching: a batch of several requests costs less than their solo times added (VAEs, text
  encoders, SD3 denoisers batch; the Flux transformer is served at batch 1), so on batchable
  models a real system does less work per request than this reference charges;
- node boundaries: a micro-served request yields its device between nodes (and steps), a
  limited preemption this reference does not have;
- hindsight: admission decides at each arrival, not knowing later arrivals. Nor is earliest
  deadline first always the best order for what comes later: on 2 devices, requests of 1, 2,
  5 and 2 s arriving within 0.8 s and two more at 4.9 s (deadlines 2 x work), EDF runs the
  second 2 s one before the 5 s one and meets 5, where first come first served with rejection
  at arrival meets 6. Such instances are rare (1 in 3,000 random small ones); on the
  experiment's traces (every rate scale and burst cell, seeds, 1-8 devices) this figure was
  never below that simple policy's.

It ignores nothing that helps the reference: no hop costs, no load times, no memory limits,
no estimation error. Cost: one feasibility pass is O(k log N) for k pending requests; a drop
tries at most the k requests ahead of the first late one, so O(n k^2 log N) for n arrivals,
with k bounded by how many deadlines fit in the devices' backlog (tens): well under a second
for a few thousand requests.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emulation.traces import Arrival, duration_s
from emulation.workloads import Workload

#: finishing this close after a deadline counts as on time (float sums of profile times)
EPS_S = 1e-9


@dataclass(frozen=True)
class Job:
    arrival_s: float
    work_s: float
    deadline_s: float  # absolute, on the arrivals' clock


@dataclass(frozen=True)
class Schedule:
    admitted: list[bool]  # admitted at its arrival (it may have been dropped later)
    met: list[bool]  # ran and finished by its deadline
    start_s: list[float | None]  # when it started; None when it never ran

    def finish_s(self, jobs: Sequence[Job]) -> list[float | None]:
        return [None if s is None else s + j.work_s for s, j in zip(self.start_s, jobs,
                                                                     strict=True)]


def schedule(jobs: Sequence[Job], devices: int) -> Schedule:
    """Earliest-deadline-first on ``devices`` devices with the oracle admission of the module
    docstring; per job, whether it was admitted and whether it met its deadline."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    n = len(jobs)
    admitted = [False] * n
    start: list[float | None] = [None] * n
    free = [0.0] * devices  # a heap of the times each device is next free
    pending: list[tuple[float, int]] = []  # (deadline, index), admitted, not started; sorted
    decided_s = 0.0  # the last arrival: every pending job had arrived by then
    for i in sorted(range(n), key=lambda i: (jobs[i].arrival_s, i)):
        now = jobs[i].arrival_s
        _start(jobs, free, pending, start, decided_s, until_s=now)
        decided_s = now
        key = (jobs[i].deadline_s, i)
        bisect.insort(pending, key)
        late = _first_late(jobs, free, pending, now)
        if late is not None:
            pending.remove(_to_drop(jobs, free, pending, now, late))
        admitted[i] = key in pending
    _start(jobs, free, pending, start, decided_s, until_s=float("inf"))
    met = [s is not None and s + jobs[i].work_s <= jobs[i].deadline_s + EPS_S
           for i, s in enumerate(start)]
    return Schedule(admitted, met, start)


def _start(jobs: Sequence[Job], free: list[float], pending: list[tuple[float, int]],
           start: list[float | None], decided_s: float, *, until_s: float) -> None:
    """Run the schedule forward to ``until_s``: each device that frees before then takes the
    earliest-deadline pending job (the pending set is as of ``decided_s``, the last arrival)."""
    while pending and max(free[0], decided_s) < until_s:
        _, j = pending.pop(0)
        start[j] = began = max(heapq.heappop(free), decided_s)
        heapq.heappush(free, began + jobs[j].work_s)


def _first_late(jobs: Sequence[Job], free: list[float], pending: Sequence[tuple[float, int]],
                now_s: float) -> int | None:
    """Position in ``pending`` of the first job that would finish after its deadline if the
    devices ran ``pending`` earliest deadline first from ``now_s``; None if every one is on
    time. The same rule as ``_start``, so an admitted set that passes here is met."""
    heap = list(free)  # a heap's copy is a heap
    for pos, (deadline_s, j) in enumerate(pending):
        end_s = max(heapq.heappop(heap), now_s) + jobs[j].work_s
        if end_s > deadline_s + EPS_S:
            return pos
        heapq.heappush(heap, end_s)
    return None


def _to_drop(jobs: Sequence[Job], free: list[float], pending: list[tuple[float, int]],
             now_s: float, late: int) -> tuple[float, int]:
    """The pending entry to drop: of those up to the first late one (removing a later one
    leaves it late), one whose removal makes the rest feasible, the most work first, then the
    earliest deadline, then the newest (a tie costs no admitted request its place). The newest
    arrival is always one (the set was feasible without it)."""
    tried: set[tuple[float, float]] = set()
    for entry in sorted(pending[:late + 1], key=lambda e: (-jobs[e[1]].work_s, e[0], -e[1])):
        shape = (jobs[entry[1]].work_s, entry[0])
        if shape in tried:  # an identical job: removing it changes nothing new
            continue
        tried.add(shape)
        rest = [e for e in pending if e != entry]
        if _first_late(jobs, free, rest, now_s) is None:
            return entry
    raise AssertionError("no single drop makes the admitted set feasible")  # see docstring


def bound(workload: Workload, arrivals: Sequence[Arrival], devices: int, *,
          slo_factor: float = 2.0, seed: int = 0) -> dict[str, Any]:
    """The idealised cluster's figures on ``arrivals``, each mapped to its workflow as a run
    would (``workload.assign(arrivals, seed=seed)``); times in trace seconds."""
    workflows = workload.assign(arrivals, seed=seed)
    work = {w: workload.work_s(w) for w in set(workflows)}
    jobs = [Job(a.at_s, work[w], a.at_s + slo_factor * work[w])
            for a, w in zip(arrivals, workflows, strict=True)]
    result = schedule(jobs, devices)
    n = len(jobs)
    total, met = Counter(workflows), Counter(w for w, ok in zip(workflows, result.met,
                                                               strict=True) if ok)
    span_s = max(duration_s(arrivals), 1e-9)
    return {
        "slo_attainment": round(sum(result.met) / n, 4) if n else None,
        "requests": n,
        "admitted": sum(result.admitted),
        "met": sum(result.met),
        "devices": devices,
        "workload": workload.name,
        "capacity_rps": round(workload.capacity_rps(devices, arrivals), 4) if n else None,
        "offered_rps": round(n / span_s, 4),
        "by_workflow": {w: round(met[w] / total[w], 4) for w in sorted(total)},
    }


def print_bound(result: dict[str, Any]) -> None:
    r = result
    print(f"bound on {r['workload']} ({r['devices']} idealised devices): {r['requests']} "
          f"requests, offered {r['offered_rps']:.2f}/s (capacity bound "
          f"{r['capacity_rps'] or 0:.2f}/s)")
    attainment = "-" if r["slo_attainment"] is None else f"{r['slo_attainment']:.3f}"
    print(f"  best SLO attainment {attainment} ({r['met']} met, {r['admitted']} admitted); by "
          "workflow: " + ", ".join(f"{w} {a:.2f}" for w, a in r["by_workflow"].items()))
