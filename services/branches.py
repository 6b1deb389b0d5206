"""Parallelism between device hosts: part of one denoising step on another device that holds
the model, its negative guidance branch (CFG parallelism) or its ControlNet (ControlNet
parallelism), or a T5 encoder's negative prompt (CFG parallelism of a one-step task: "step"
below is its one pass); the policy is ``services.parallel``.

- **Helpers.** A host offers to help a pool it holds (a core with ``guidance_branches``) while
  it is idle, once parallelism is asked for here (the ``parallel`` setting, or a task taken of
  a workflow that asks for it): it subscribes to the pool's branch subjects
  (``subjects.branch_subject``) in one queue group, so the NATS server hands each request to
  one idle helper, and answers "no responders" at once when there is none. Two subjects, two
  offers: to any step while the host was not busy lately, and to a step whose deadline is at
  stake while it was (``services.parallel``). A host that got busy since unsubscribes, and
  declines what still reaches it. An accepted branch runs at the
  host's next step boundary, before its own work (it was idle): the helper makes the request's
  state from the task's inputs once (``ModelCore.start``: its conditioning; kept while the
  request steps, forgotten at its last step or when unused for ``STATE_TTL_S``), runs the
  negative branch (or the ControlNet) on the step's model input and answers with its
  prediction (or the ControlNet's outputs), both through the tensor store.
- **The home** (the host that holds the task) stores the step's model input, asks (on the
  urgent subject where the step's deadline is at stake), and once a
  helper took it runs the positive branch and joins the two (or runs the step, taking the
  ControlNet's outputs where the model first adds them). No helper, or a decline: the step
  runs whole, here. A helper that took it and then fails or does not answer in time: the home
  runs that part itself. Nothing durable moves: the home holds the
  task, un-acked, throughout (a helper that dies costs a timeout; a home that dies, the task's
  redelivery, as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
from nats.aio.msg import Msg

from common import subjects
from common.messages import BranchResult, BranchStep, StepPart, Task, decode, encode, now
from common.store import tensor_key
from services import parallel
from services.core import WorkItem

if TYPE_CHECKING:
    from services.feed import Held, PoolFeed
    from services.host import DeviceHost

log = logging.getLogger(__name__)

#: how long a home waits for a helper to take its ask (an answer within a round trip of an
#: idle host's event loop), in wall seconds
ACCEPT_S = 0.05
#: a helper takes an ask only this long before its home stops waiting (``BranchStep
#: .accept_by``), so that its acceptance arrives in time: one that came after would have it run
#: a branch that nobody waits for, while a new arrival might need the device
ACCEPT_MARGIN_S = 0.01
#: a helper forgets a request's branch state unused for this long (its home finished it, or
#: another helper took its steps)
STATE_TTL_S = 60.0
#: the least a home waits for a helper's answer; else four whole steps of the batch
ANSWER_MIN_S = 1.0
_REASON_CHARS = 500


class Split(NamedTuple):
    """What part of a step runs on another device, and whether its ask is urgent (a deadline
    of the batch is at stake)."""

    part: StepPart
    urgent: bool


class SplitRun(NamedTuple):
    """How a split step ran: whether a helper ran its part, and, where none took it, the
    seconds the step took run whole here after the ask (a step figure like any other)."""

    helped: bool
    whole_s: float | None = None


@dataclass
class _Pause:
    """A pool's asks after one that no helper took: steps to run whole before asking again,
    and the asks in a row none took."""

    steps: int = 0
    misses: int = 0


@dataclass(eq=False)
class _Job:
    feed: PoolFeed
    ask: BranchStep
    msg: Msg


class Branches:
    """One device host's side of parallelism: its offers, the parts of steps it runs for
    other hosts, and its own split steps."""

    def __init__(self, host: DeviceHost) -> None:
        self.host = host
        #: (replica, urgent) -> its subscription to the branch subject
        self._offers: dict[tuple[str, bool], Any] = {}
        self._jobs: deque[_Job] = deque()
        self._states: dict[tuple[str, str, str], tuple[Any, float]] = {}  # -> (state, used)
        self._splitting = False  # one of its own steps is split: it helps no one meanwhile
        self._helping = False  # it runs part of another host's step
        #: whether parallelism is asked for here: by the deployment's default, or by a task
        #: taken (``saw``)
        self.wanted = host.settings.parallel != "off"
        #: how busy the device has been lately (its steps and the parts it ran for others:
        #: counting its own alone, helpers kept helping on a loaded cluster, and Flux-3 at
        #: rate scale 5 attained 0.05 less; on ``time.perf_counter``, as the host times
        #: its steps)
        self.utilization = parallel.Utilization(host.settings.parallel_window_s)
        #: (replica, urgent) -> its asks' pause, after one that no helper took
        self._no_helper: dict[tuple[str, bool], _Pause] = {}
        self._inbox: str | None = None  # where helpers answer its asks (one token each)
        self._reply_sub: Any = None
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Queue[Msg]] = {}

    # --- helping ---------------------------------------------------------------------------------

    def saw(self, task: Task) -> None:
        """Note a task taken here: once one of a workflow that asks for CFG parallelism came,
        this host offers to help (before, it never subscribes: no churn on a deployment
        that splits nothing)."""
        if not self.wanted and any(n.parallel != "off" for n in task.plan.nodes.values()):
            self.wanted = True
            self.host.changed()

    def _may_help(self, feed: PoolFeed, urgent: bool) -> bool:
        """Whether to offer to run parts of ``feed``'s steps: while idle, and not busy lately
        (for a step whose deadline is at stake, ``urgent``: not nearly always busy)."""
        host = self.host
        return (self.wanted and not host.stopping and not feed.stopping and feed.stats.ready
                and feed.core.guidance_branches and host.feeds.get(feed.replica) is feed
                and not self._jobs and not self._splitting and host.loading == 0
                and host.idle() and self.utilization.share(time.perf_counter()) <= (
                    host.settings.parallel_urgent_busy_max if urgent
                    else host.settings.parallel_busy_max))

    async def offer_loop(self) -> None:
        """Keep each pool's offer in step with whether this host may help (on every change of
        the host, and at least twice a second)."""
        while True:
            try:
                await self._update_offers()
            except Exception as exc:  # noqa: BLE001 - NATS is down: offer again once it is back
                log.warning("%s: could not update its offers to help: %s", self.host.name, exc)
            with contextlib.suppress(TimeoutError):  # (not wait_for: it may swallow a cancel)
                async with asyncio.timeout(0.5):
                    await self.host.wait_changed()

    async def _update_offers(self) -> None:
        for replica, feed in list(self.host.feeds.items()):
            for urgent in (False, True):
                key, wanted = (replica, urgent), self._may_help(feed, urgent)
                if wanted and key not in self._offers:
                    self._offers[key] = await self.host.nc.subscribe(
                        subjects.branch_subject(feed.pool, urgent),
                        queue=subjects.BRANCH_QUEUE,
                        cb=functools.partial(self._asked, feed, urgent))
                elif not wanted and key in self._offers:
                    await self._withdraw(key)
        for key in [k for k in self._offers if k[0] not in self.host.feeds]:
            await self._withdraw(key)

    async def _withdraw(self, key: tuple[str, bool]) -> None:
        sub = self._offers.pop(key)
        with contextlib.suppress(Exception):  # a closed connection has no subscription left
            await sub.unsubscribe()

    async def _asked(self, feed: PoolFeed, urgent: bool, msg: Msg) -> None:
        try:
            ask = decode(msg.data, BranchStep)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await _answer(msg, BranchResult(declined=f"malformed: {exc}"))
            return
        if ask.host == self.host.name or not self._may_help(feed, urgent):
            await _answer(msg, BranchResult(declined=f"{self.host.name} is busy"))
            return
        if ask.accept_by is not None and now() > ask.accept_by - ACCEPT_MARGIN_S:
            await _answer(msg, BranchResult(declined=f"{self.host.name} got it too late"))
            return
        self._jobs.append(_Job(feed, ask, msg))
        await _answer(msg, BranchResult(accepted=True))
        self.host.changed()  # the step loop runs it next; the offers are withdrawn

    def offering(self, urgent: bool = False) -> list[str]:
        """The replicas whose offer to help (steps whose deadline is at stake, if
        ``urgent``) stands."""
        return [replica for replica, tier in self._offers if tier == urgent]

    def pending(self) -> bool:
        return bool(self._jobs)

    def helping(self) -> bool:
        """Whether it runs, or has taken, part of another host's step: the device is not
        idle (a new arrival would wait behind it)."""
        return bool(self._jobs) or self._helping

    async def help_next(self) -> None:
        """Run the oldest part of a step another host asked for, and answer it."""
        job = self._jobs.popleft()
        self._helping = True
        try:
            await self._help(job)
        finally:
            self._helping = False
            self.host.changed()

    async def _help(self, job: _Job) -> None:
        feed, ask = job.feed, job.ask
        host = self.host
        try:
            if host.feeds.get(feed.replica) is not feed:
                raise RuntimeError(f"{feed.replica} is no longer resident here")
            states = [await self._state(feed, task) for task in ask.tasks]
            sample = await host.store.get(ask.sample)
            host.liveness.step_started()
            started = time.perf_counter()
            try:
                if ask.part == "controlnet":
                    made = await asyncio.to_thread(feed.core.run_control, states, sample,
                                                   ask.steps)
                else:
                    made = [await asyncio.to_thread(feed.core.run_branch, states, 0, sample,
                                                    ask.steps)]
            finally:
                host.liveness.step_ended()
                self.utilization.ran(started, time.perf_counter())
            first, ttl_s = ask.tasks[0], host.settings.tensor_ttl_s
            refs = [await host.store.put(
                tensor_key("tmp", first.request_id, first.node, f"{ask.part}_{n}"), tensor,
                ttl_s) for n, tensor in enumerate(made)]
            answer = (BranchResult(outputs=refs) if ask.part == "controlnet"
                      else BranchResult(noise=refs[0]))
            feed.stats.helped_steps += 1
        except Exception as exc:  # noqa: BLE001 - the home runs the branch itself
            log.warning("%s: could not run a branch for %s: %s: %s", feed.replica, ask.host,
                        type(exc).__name__, exc)
            answer = BranchResult(declined=f"{type(exc).__name__}: {exc}"[:_REASON_CHARS])
        await _answer(job.msg, answer)
        for task, step in zip(ask.tasks, ask.steps, strict=True):
            key = (feed.replica, task.request_id, task.node)
            entry = self._states.get(key)
            if entry is not None and step + 1 >= feed.core.progress(entry[0])[1]:
                del self._states[key]  # its last step

    async def _state(self, feed: PoolFeed, task: Task) -> Any:
        """The helper's state of ``task`` (its conditioning), made once from its inputs."""
        at = time.monotonic()
        for key, (_, used) in list(self._states.items()):
            if at - used > STATE_TTL_S:
                del self._states[key]
        key = (feed.replica, task.request_id, task.node)
        entry = self._states.get(key)
        if entry is None:
            store, node = self.host.store, task.plan.nodes[task.node]
            inputs = {name: await store.get(ref) for name, ref in task.inputs.items()}
            item = WorkItem(task.request_id, node.op, task.params, inputs, tuple(node.adapters))
            if feed.core.needs_prepare(item):
                await asyncio.to_thread(feed.core.prepare, item)
            entry = (await asyncio.to_thread(feed.core.start, item), at)
        self._states[key] = (entry[0], at)
        return entry[0]

    async def close(self) -> None:
        for key in list(self._offers):
            await self._withdraw(key)
        if self._reply_sub is not None:
            with contextlib.suppress(Exception):
                await self._reply_sub.unsubscribe()
        while self._jobs:
            await _answer(self._jobs.popleft().msg, BranchResult(declined="stopping"))

    # --- splitting its own steps -----------------------------------------------------------------

    def split_part(self, feed: PoolFeed, group: list[Held]) -> Split | None:
        """What part of the next step of ``group`` runs on another device, if any (its tasks'
        modes, the core, the measured times and whether a helper answered lately), and
        whether it is asked for urgently."""
        mode = parallel.batch_mode(h.task.plan.nodes[h.task.node].parallel for h in group)
        if mode == "off":
            return None
        states = [h.state for h in group]
        can: dict[StepPart, bool] = {"cfg": feed.core.splits(states),
                                     "controlnet": feed.core.control_splits(states)}
        part = parallel.step_part(mode, self.host.settings.parallel_parts, can, feed.splits,
                                  len(group), feed.step_time_s(len(group)))
        if part is None:
            return None
        split = Split(part, self.at_stake(feed, group, part))
        pause = self._no_helper.get((feed.replica, split.urgent))
        if pause is not None and pause.steps > 0:
            pause.steps -= 1
            return None
        return split

    def at_stake(self, feed: PoolFeed, group: list[Held], part: StepPart) -> bool:
        """Whether splitting ``part`` off the steps of ``group`` decides a deadline of theirs
        (``parallel.at_stake``, at this device's step figures): its ask is urgent."""
        at, size = now(), len(group)
        ratio = feed.splits[part].ratio(size, feed.step_time_s(size))
        urgencies = [self.host.urgency(h, at) for h in group]
        return any(parallel.at_stake(u.spare_s(at), u.remaining_s, ratio) for u in urgencies)

    async def split_step(self, feed: PoolFeed, group: list[Held], split: Split) -> SplitRun:
        """Run the next step of ``group`` with ``split.part`` of it on a helper that takes it
        (asked on the urgent subject where ``split.urgent``):
        its negative branch (the positive runs here meanwhile), or its ControlNet (the step
        runs here meanwhile, taking its outputs when the model needs them). Where none takes
        it, the whole step here (the same bits as without parallelism)."""
        host, core = self.host, feed.core
        states = [h.state for h in group]
        steps = [core.progress(s)[0] for s in states]
        self._splitting = True
        token = f"{next(self._tokens)}"
        part = split.part
        try:
            for key in [k for k in self._offers if k[0] == feed.replica]:
                await self._withdraw(key)  # before the ask, on the same connection
            inputs = core.branch_inputs(states)
            first = group[0].task
            sample = await host.store.put(
                tensor_key("tmp", first.request_id, first.node, f"{part}_sample"), inputs,
                host.settings.tensor_ttl_s)
            ask = BranchStep(host=host.name, tasks=[h.task for h in group], steps=steps,
                             sample=sample, part=part, accept_by=now() + ACCEPT_S)
            answers = await self._ask(feed, ask, token, split.urgent)
            if answers is None:
                host.open_window_in(feed.step_time_s(len(group)))  # the whole step, from now
                started = time.perf_counter()
                await asyncio.to_thread(core.step, states)
                return SplitRun(False, time.perf_counter() - started)
            timeout_s = max(ANSWER_MIN_S, 4 * feed.step_time_s(len(group)))
            if part == "controlnet":
                helped = await self._controlled_step(feed, states, answers, timeout_s)
            else:
                positive = await asyncio.to_thread(core.run_branch, states, 1, inputs, steps)
                made = await self._made(feed, answers, timeout_s)
                helped = made is not None
                negative = made[0] if made is not None else await asyncio.to_thread(
                    core.run_branch, states, 0, inputs, steps)
                core.join_branches(states, negative, positive)  # guidance, the scheduler
        finally:
            self._splitting = False
            self._waiting.pop(token, None)
        if helped:
            feed.stats.split_steps += 1
        return SplitRun(helped)

    async def _controlled_step(self, feed: PoolFeed, states: list[Any],
                               answers: asyncio.Queue[Msg], timeout_s: float) -> bool:
        """The step, here, the ControlNet's outputs being the helper's (waited for in the
        step's thread where the model first needs them). Whether the helper's came."""
        loop = asyncio.get_running_loop()
        came: list[bool] = []

        def outputs() -> list[Any] | None:
            made = asyncio.run_coroutine_threadsafe(
                self._made(feed, answers, timeout_s), loop).result()
            came.append(made is not None)
            return made

        await asyncio.to_thread(feed.core.step_controlled, states, outputs)
        return any(came)

    async def _ask(self, feed: PoolFeed, ask: BranchStep, token: str,
                   urgent: bool) -> asyncio.Queue[Msg] | None:
        """Ask for ``ask``'s branch (of any idle helper, if ``urgent``); the queue its answers
        arrive on once a helper took it.
        None where none did: none offers (the server's "no responders"), the one asked
        declined, or it did not take it within ``ACCEPT_S`` (an offer withdrawn while the ask
        was on its way loses it)."""
        host = self.host
        if self._inbox is None:
            self._inbox = host.nc.new_inbox()
            self._reply_sub = await host.nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        self._waiting[token] = answers
        key = (feed.replica, urgent)
        try:
            await host.nc.publish(subjects.branch_subject(feed.pool, urgent), encode(ask),
                                  reply=f"{self._inbox}.{token}")
            async with asyncio.timeout(ACCEPT_S):
                first = await answers.get()
            answer = None if _no_responders(first) else decode(first.data, BranchResult)
            if answer is not None and answer.accepted:
                self._no_helper.pop(key, None)
                return answers
            log.debug("%s: no helper took the branch: %s", feed.replica,
                      "none offers" if answer is None else answer.declined)
        except Exception as exc:  # noqa: BLE001 - NATS is down, no answer in time: run it whole
            log.debug("%s: no helper took the branch (%s)", feed.replica, exc)
        pause = self._no_helper.setdefault(key, _Pause())
        pause.misses += 1
        pause.steps = parallel.no_helper_steps(pause.misses)
        return None

    async def _made(self, feed: PoolFeed, answers: asyncio.Queue[Msg],
                    timeout_s: float) -> list[Any] | None:
        """What the helper made (its prediction, or the ControlNet's outputs), once it
        answers; None if it fails, or takes longer than ``timeout_s`` (it died, say)."""
        try:
            async with asyncio.timeout(timeout_s):
                answer = decode((await answers.get()).data, BranchResult)
            refs = answer.outputs if answer.noise is None else [answer.noise]
            if refs is None:
                log.info("%s: the helper did not run its part: %s", feed.replica,
                         answer.declined)
                return None
            return [await self.host.store.get(ref) for ref in refs]
        except Exception as exc:  # noqa: BLE001 - a timeout, a lost store entry: run it here
            log.warning("%s: nothing from the helper (%s: %s); running its part here",
                        feed.replica, type(exc).__name__, exc)
            return None

    async def _on_reply(self, msg: Msg) -> None:
        answers = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if answers is not None:  # else: for an ask given up on
            answers.put_nowait(msg)


def _no_responders(msg: Msg) -> bool:
    """Whether ``msg`` is the server's status for a message nobody was subscribed to."""
    return not msg.data and (msg.headers or {}).get("Status") == "503"


async def _answer(msg: Msg, answer: BranchResult) -> None:
    with contextlib.suppress(Exception):  # the asker gave up (timed out) or NATS is down
        await msg.respond(encode(answer))
