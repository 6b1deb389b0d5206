"""Which batch a device runs next, and when a device host may take more work: pure policy.

A device host (``services.host``) holds the tasks of every pool resident on its device and,
at every step boundary, asks its ``Scheduler`` which one is most urgent; the batch run next is
that task with its batch-compatible peers of the same pool. No I/O and no clock here: the host
passes the time and what it measured.

- ``LeastSlack`` (the default): the task whose deadline is nearest once the work ahead of it
  is counted runs first: slack = deadline - now - (its own steps at the step time measured on
  this device + the estimated work of the nodes after it, ``Plan.tail_s``). A cheap SD3 step
  therefore does not wait behind a queue of FLUX.1-dev steps, and a request about to miss its
  deadline goes before one that has time to spare. A task's own work is counted whole, not
  what remains of it: with the remainder, a running task's slack stays put while waiting ones
  lose theirs, so two requests would take turns step by step and both finish late (the
  thrashing of least-laxity-first); counted whole, the order is that of each task's latest
  start, which does not change as tasks run. Tasks without a deadline have infinite slack
  and run in arrival order after those with one.
  One exception (``steals``): a task whose remaining work is a small share (a quarter) of
  the least slack of the tasks ahead of it may run first, shortest first: a text encoder
  or a decoder then no longer waits a whole FLUX.1-dev request on a busy device, and its
  request's next task reaches the queue where any device can take it. Under load slack
  shrinks and least slack orders alone.
- ``Fifo``: arrival order (the monolithic baselines: one pipeline, one request after another).

``may_take`` is the pull rule, the DiFlow artifact's eligibility made deadline-aware: a host
takes a task only when it could start it soon: the held work that would run before it (more
urgent) is under ``eligible_s``, and the held work it would push back still keeps its slack.
Before a fetch the host asks it of a typical task of the pool (as urgent as the pool's recent
tasks were), after the fetch of the task itself (a host that cannot start it hands it back).
So a device busy with a long FLUX.1-dev request still takes an urgent SD3 task and runs it at
the next step boundary, while work that would only wait behind others waits in JetStream,
where any device holding the model can take it, and not in one host's memory. ``overtaken``
keeps it so after the fetch: a task not yet started that more urgent work taken since (an
idle device's feeds all fetch at once) would keep waiting goes back to its queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True)
class Urgency:
    """What the scheduler knows of one held task."""

    deadline_at: float | None  # epoch seconds; None: no deadline
    work_s: float  # its own compute plus the estimated work of the nodes after it
    since: float  # when its request arrived: arrival order among equals
    remaining_s: float = 0.0  # its own compute still to run on this device
    done_s: float = 0.0  # its own compute already run

    def slack_s(self, at: float) -> float:
        """Its rank under least slack: its own work counted whole, so the rank does not
        change as it runs."""
        if self.deadline_at is None:
            return math.inf
        return self.deadline_at - at - self.work_s

    def spare_s(self, at: float) -> float:
        """What it can really spare: the slack of what is left to run (its work done
        counts no more)."""
        return self.slack_s(at) + self.done_s


#: a task may run before more urgent ones when its work is at most this share of the least
#: slack among them (``steals``)
STEAL_SHARE = 0.25


class Scheduler(Protocol):
    name: str
    steal_share: float  # 0: never out of order
    fit_batches: bool  # batch only as many as keep their deadlines (``batch_size``)

    def order(self, urgency: Urgency, at: float) -> tuple[float, ...]:
        """Sort key: the lowest runs first."""


class LeastSlack:
    name = "least_slack"
    steal_share = STEAL_SHARE
    fit_batches = True

    def order(self, urgency: Urgency, at: float) -> tuple[float, ...]:
        return (urgency.slack_s(at), urgency.since)


class Fifo:
    name = "fifo"
    steal_share = 0.0
    fit_batches = False

    def order(self, urgency: Urgency, at: float) -> tuple[float, ...]:
        return (urgency.since,)


SCHEDULERS: dict[str, type[LeastSlack] | type[Fifo]] = {"least_slack": LeastSlack, "fifo": Fifo}


def scheduler(name: str) -> Scheduler:
    try:
        return SCHEDULERS[name]()
    except KeyError:
        raise ValueError(f"host_scheduler: unknown {name!r}; known: "
                         f"{', '.join(SCHEDULERS)}") from None


def most_urgent(urgencies: Sequence[Urgency], at: float, policy: Scheduler) -> list[int]:
    """Indexes of ``urgencies``, most urgent first."""
    return sorted(range(len(urgencies)), key=lambda i: policy.order(urgencies[i], at))


def steals(task: Urgency, ahead: Sequence[Urgency], at: float, policy: Scheduler) -> bool:
    """Whether ``task`` may run before the more urgent ``ahead``: its remaining work is a
    small share of the least that any of them can spare (the slack of what it has left to
    run), so they hardly notice, while its request moves on (an encoder done now publishes
    the request's denoiser task for any device to take). Not the slack they rank by: that
    counts a running task's work whole, so halfway through a FLUX denoise on track it is
    near zero, and every encoder waited the whole denoise. Under load slack shrinks and the
    order is the policy's again."""
    if not ahead:
        return True
    if policy.steal_share <= 0 or task.remaining_s <= 0:  # its work unknown: it keeps its turn
        return False
    least = min(a.spare_s(at) for a in ahead)
    return task.remaining_s <= policy.steal_share * least


def run_next(urgencies: Sequence[Urgency], at: float, policy: Scheduler) -> list[int]:
    """Indexes of ``urgencies`` in the order to run them: the policy's, except that the
    shortest task that ``steals`` from those ahead of it goes first."""
    ordered = most_urgent(urgencies, at, policy)
    stealers = [n for n, i in enumerate(ordered)
                if steals(urgencies[i], [urgencies[j] for j in ordered[:n]], at, policy)]
    first = min(stealers, key=lambda n: (urgencies[ordered[n]].remaining_s, n))
    return [ordered[first], *ordered[:first], *ordered[first + 1:]]


@dataclass(frozen=True)
class Member:
    """A task that may join the next batch: its deadline, the steps it has left and the
    estimated work of the nodes after it."""

    deadline_at: float | None
    steps_left: int
    tail_s: float

    def meets(self, at: float, step_s: float) -> bool:
        """Whether it finishes by its deadline when its steps run at ``step_s`` each."""
        return self.deadline_at is None or (
            at + self.steps_left * step_s + self.tail_s <= self.deadline_at)


def step_time(measured: Mapping[int, float], size: int, default: float = 0.0) -> float:
    """A step's time at batch ``size``, from the step times ``measured`` per batch size: as
    measured; else on the line through the sizes measured (a step costs a fixed part plus a
    part per task); with one size measured, its time scaled in proportion to the batch (no
    gain from batching assumed until one is seen); ``default`` before any."""
    if size in measured:
        return measured[size]
    if not measured:
        return default
    if len(measured) == 1:
        [(known, step_s)] = measured.items()
        return step_s * max(1.0, size / known)
    sizes = list(measured)
    mean_n = sum(sizes) / len(sizes)
    mean_s = sum(measured.values()) / len(sizes)
    spread = sum((n - mean_n) ** 2 for n in sizes)
    slope = max(0.0, sum((n - mean_n) * (measured[n] - mean_s) for n in sizes) / spread)
    return max(min(measured.values()), mean_s + slope * (size - mean_n))


def batch_size(members: Sequence[Member], step_s: Callable[[int], float], at: float,
               policy: Scheduler) -> int:
    """How many of ``members`` (most urgent first, batch-compatible, at most the pool's batch)
    run the next step together. A bigger batch steps slower (``step_s(n)``: the step time at
    batch size n), so every member waits longer for its result: with ``fit_batches`` the
    batch grows only while each member that could finish in time alone still can at the
    bigger batch's step time. Spare slack buys throughput; under load the batch shrinks to
    what the deadlines allow, instead of every request in a full batch missing its own."""
    if not policy.fit_batches or len(members) <= 1:
        return len(members)
    hopeful = [m for m in members if m.meets(at, step_s(1))]  # the others are late anyway
    n = 1
    while n < len(members) and all(m.meets(at, step_s(n + 1)) for m in members[:n + 1]
                                   if m in hopeful):
        n += 1
    return n


def may_take(newcomer: Urgency, own_s: float, held: Sequence[Urgency], at: float,
             policy: Scheduler, eligible_s: float) -> bool:
    """Whether a device should take a task as urgent as ``newcomer`` (``own_s`` of compute
    here) while it holds ``held`` (the tasks of its other pools: a task of the same pool joins
    their batch at the next step boundary): the work that would run before it is under
    ``eligible_s``, and every held task it would push back that can still make its deadline
    still can after ``own_s`` more."""
    newcomer = replace(newcomer, remaining_s=own_s)
    if ahead_s(newcomer, held, at, policy) > eligible_s and not steals(
            newcomer, _ahead_of(newcomer, held, at, policy), at, policy):
        return False
    rank = policy.order(newcomer, at)
    behind = [h.slack_s(at) for h in held if policy.order(h, at) > rank]
    return all(slack - own_s >= 0 for slack in behind if slack >= 0)


def ahead_s(task: Urgency, others: Sequence[Urgency], at: float, policy: Scheduler) -> float:
    """The work of ``others`` that is more urgent than ``task`` on this device."""
    return sum(o.remaining_s for o in _ahead_of(task, others, at, policy))


def _ahead_of(task: Urgency, others: Sequence[Urgency], at: float,
              policy: Scheduler) -> list[Urgency]:
    rank = policy.order(task, at)
    return [o for o in others if policy.order(o, at) <= rank]


def overtaken(waiting: Sequence[Urgency], others: Sequence[Sequence[Urgency]], at: float,
              policy: Scheduler, eligible_s: float) -> list[int]:
    """Indexes of the ``waiting`` tasks (held, not started) that more urgent work taken since
    (``others[i]``: the held tasks of the other pools) would now keep waiting longer than
    ``eligible_s``: a device that can start them sooner should have them. A task that passed
    ``may_take`` when it came stays unless something overtook it."""
    return [i for i, task in enumerate(waiting)
            if ahead_s(task, others[i], at, policy) > eligible_s
            and not steals(task, _ahead_of(task, others[i], at, policy), at, policy)]
