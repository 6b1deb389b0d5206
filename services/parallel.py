"""Whether part of a denoising step runs on another device: pure policy.

Two parts may (the ``parallel_parts`` setting), both on a device that holds the model and is
idle (``services.branches`` does the I/O):

- ``cfg`` (CFG parallelism). With classifier-free guidance a step runs the model over two rows
  per request, the negative prompt's branch and the positive's, as one batch. Split, the
  other device runs the negative branch while this one runs the positive: the step takes
  about one row's time instead of two, plus the hand-off of the model input and of the
  prediction through the tensor store. A T5 encoder's guided pass splits the same way: the
  negative prompt encoded on the other device, the positive here (``services.t5_encoder``).
- ``controlnet`` (ControlNet parallelism), for a step with a ControlNet that does not split
  its branches: the other device runs the ControlNet on the step's model input while this one
  runs the model's blocks before the first that adds the ControlNet's outputs (a UNet's down
  blocks; a transformer's first block), then takes them through the store. It pays where the
  ControlNet takes about as long as those blocks and its outputs move fast (a UNet's), not
  where the model needs them at once (a transformer's).

A workflow chooses (``parallel``; the deployment's ``parallel`` setting where it names none):

- ``off``: never. Split guidance rounds differently from batched guidance (within 1/255 per
  pixel), so this is the default: the same seed gives the same bits.
- ``always``: at every step a helper takes: a device that holds the model and is idle. A host
  offers itself only then (held work under ``host_eligible_s``, no branch of its own running),
  so a split never takes a device that work already queued for it needs; under load no device
  is idle, and every step runs whole on one device.
- ``auto``: as ``always``, while splitting pays on this device: split steps, hand-offs
  included, measured at most ``GAIN`` of the whole step's time at the batch's size, per part
  (tiny
  models on a CPU, whose steps take less than the hand-offs, stay whole). A split that stopped
  paying is tried again after ``PROBE_EVERY`` whole steps, so a change shows (twice as long
  after each try that still did not pay).

A batch splits only where every task in it allows it: its mode is the least of theirs.

Which requests get a helper depends on their slack and on how loaded the helpers are. A helper
offers to any request only while idle *and* busy for at most ``parallel_busy_max`` of the last
``parallel_window_s`` (``Utilization``, 20 s: a shorter window reads a loaded device's idle
moments as a light load): on a loaded cluster a device idle for a moment is soon needed by a
new arrival, which would then wait behind another device's branch (on Flux-3 at rate scale 4,
helping at every idle moment cost 0.02 of attainment). While it runs another's branch a
device is not idle (``DeviceHost.idle``): an arrival it fetched goes back to the queue.

An idle helper busy beyond that still offers to a step whose deadline is at stake
(``at_stake``): its request's slack is within what splitting its remaining steps saves, so
the split decides whether it makes its deadline. A request with slack to spare leaves such a
helper to new arrivals; one that would miss even split is not helped. A helper busy beyond
``parallel_urgent_busy_max`` helps no step: near capacity a split's extra device time (two
one-row passes and a hand-off for one two-row pass) costs the requests that arrive next more
than it saves the one it helps (Flux-3 at rate scale 5: 0.862 with the urgent tier open to
every idle helper, 0.871 without it near capacity, 0.876 with parallelism off).

An ask costs the home a store write and a round trip before its step. Where no helper takes
it, the pool's next ``NO_HELPER_STEPS`` steps run whole without asking, and twice as many
after each further ask in a row that none took (``no_helper_steps``): on a loaded cluster,
where no device is idle, a home asks ever more seldom; the first ask a helper takes starts
the count again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import get_args

from common.messages import ParallelMode, StepPart

MODES: tuple[ParallelMode, ...] = get_args(ParallelMode)
PARTS: tuple[StepPart, ...] = get_args(StepPart)
#: in ``auto``, a split step must take at most this share of a whole one
GAIN = 0.9
#: in ``auto``, whole steps before a split that did not pay is tried again; twice as many
#: after each try that still did not pay, up to ``PROBE_MAX`` (a part that never pays here,
#: a transformer's ControlNet through a host-memory store, costs ever fewer tries)
PROBE_EVERY = 32
PROBE_MAX = 1024
#: after an ask that no helper took, a pool's steps run whole this many steps before it asks
#: again; twice as many after each further ask in a row that none took, up to
#: ``NO_HELPER_MAX`` (a busy cluster pays ever fewer store writes and round trips for asks).
#: One step first: on a light load an ask finds every helper busy only for a moment, and a
#: pause of 8 (Flux-3 at rate scale 1) left the next two FLUX.1-schnell requests of that
#: device unsplit, a tenth of all, which made the tail
NO_HELPER_STEPS = 1
NO_HELPER_MAX = 128
_SMOOTHING = 0.3


def batch_mode(modes: Iterable[str]) -> str:
    """The mode of a batch: the least permissive of its tasks' (an unknown one: off)."""
    return MODES[min((MODES.index(m) if m in MODES else 0 for m in modes), default=0)]


def backoff(first: int, failures: int, most: int) -> int:
    """``first``, doubled ``failures`` times, at most ``most``: how long a try that keeps
    failing waits before the next."""
    return min(most, first << max(0, min(failures, 16)))


def no_helper_steps(misses: int) -> int:
    """Whole steps before asking again after ``misses`` asks in a row that no helper took."""
    return backoff(NO_HELPER_STEPS, misses - 1, NO_HELPER_MAX)


def at_stake(spare_s: float, remaining_s: float, split_ratio: float) -> bool:
    """Whether splitting a task's remaining steps decides its deadline: what it can spare
    (its deadline less now, its remaining work run whole and the work after it; ``inf``
    without a deadline) is less than what the split saves (``split_ratio``: a split step's
    time over a whole one's), and not so far below that even split it would miss."""
    saved_s = remaining_s * (1.0 - split_ratio)
    return -saved_s <= spare_s < saved_s


def step_part(mode: str, parts: Iterable[StepPart], can: dict[StepPart, bool],
              figures: dict[StepPart, SplitFigures], size: int, whole_s: float
              ) -> StepPart | None:
    """What part of a step of ``size`` tasks in ``mode`` to run on another device: the first
    of ``parts`` (allowed, in order) that the step ``can`` run apart, if its ``figures`` want
    it (the whole step taking ``whole_s`` here); None: the step runs whole. A later part is
    no fallback for an earlier one that does not pay now: a ControlNet apart is for the steps
    whose branches do not split (and through the store it pays less often)."""
    part = next((p for p in parts if can.get(p)), None)
    return part if part is not None and figures[part].wants(mode, size, whole_s) else None


@dataclass
class SplitFigures:
    """What split steps of one pool took on one device, and whether the next one should split."""

    split_s: dict[int, float] = field(default_factory=dict)  # batch size -> seconds, smoothed
    whole_since: int = 0  # whole steps since a split did not pay
    failed_probes: int = 0  # tries in a row since it last paid

    @property
    def probe_every(self) -> int:
        """Whole steps between tries while it does not pay."""
        return backoff(PROBE_EVERY, self.failed_probes, PROBE_MAX)

    def wants(self, mode: str, size: int, whole_s: float) -> bool:
        """Whether a step of ``size`` tasks in ``mode`` should split, the whole step taking
        ``whole_s`` here (0: not measured yet)."""
        if mode == "always":
            return True
        if mode != "auto":
            return False
        split_s = self.split_s.get(size)
        if split_s is None:
            return True  # try it
        if whole_s <= 0:
            return False  # measure a whole one to compare
        if split_s <= GAIN * whole_s:
            self.failed_probes = 0
            return True
        self.whole_since += 1
        if self.whole_since >= self.probe_every:
            self.whole_since = 0
            self.failed_probes += 1
            return True
        return False

    def ratio(self, size: int, whole_s: float) -> float:
        """A split step's time over a whole one's at batch ``size`` (``GAIN`` until both are
        measured)."""
        split_s = self.split_s.get(size)
        return split_s / whole_s if split_s is not None and whole_s > 0 else GAIN

    def ran(self, size: int, elapsed_s: float) -> None:
        """Account a split step of ``size`` tasks that a helper shared."""
        previous = self.split_s.get(size)
        self.split_s[size] = elapsed_s if previous is None else (
            (1 - _SMOOTHING) * previous + _SMOOTHING * elapsed_s)


class Utilization:
    """The share of the last ``window_s`` seconds a device spent computing."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._spans: deque[tuple[float, float]] = deque()  # (start, end), oldest first

    def ran(self, start: float, end: float) -> None:
        self._spans.append((start, end))

    def share(self, at: float) -> float:
        since = at - self.window_s
        while self._spans and self._spans[0][1] <= since:
            self._spans.popleft()
        busy = sum(min(end, at) - max(start, since) for start, end in self._spans)
        return min(1.0, max(0.0, busy / self.window_s))
