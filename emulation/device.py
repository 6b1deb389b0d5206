"""An emulated GPU: its memory and its compute, shared by what is placed on it.

An ``EmulatedDevice`` is one GPU (80 GB for an H800). What is placed on one device shares its
compute (one kernel stream: a step holds the device while it runs, so co-located replicas
time-share it, as on a GPU without MPS) and its memory: an ``Owner`` (a replica's models)
reserves its profiled memory when it loads, paying the profiled host-to-device load time, and
frees it when it stops. A *swap* owner (the Clockwork-like baseline) is loaded lazily when it
runs, evicting the least recently used owners that are not running. Out of memory is an
``OutOfDeviceMemory`` naming the device, the need and what is free.

Devices live in a per-process registry (``emulated_device``, ``device_of``): every core placed
on a device id in this process shares it, which is why the emulated backend hosts its replicas
in the autoscaler's process. ``time_scale`` K runs everything K times faster: every profiled
time is divided by K.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

from common.errors import TerminalError
from common.settings import Settings
from emulation.profiles import EMULATED_DEVICE_BYTES

#: how long a load waits for memory that an eviction in progress still holds (wall seconds)
MEMORY_WAIT_S = 30.0
#: a call that a host could have queued behind the device's previous one (``run``, queued)
#: and that comes within this much wall time of that one's end starts where it ended
QUEUED_GAP_S = 0.005


class OutOfDeviceMemory(TerminalError):
    """What a device was asked to hold does not fit in what it has free."""

    code = "out_of_device_memory"
    http_status = 507


@dataclass(eq=False)
class Owner:
    """What holds memory on a device: one replica's models (for a monolithic replica, its whole
    pipeline), loaded and swapped together."""

    key: str
    memory_bytes: int
    load_s: float  # profiled host-to-device time of all of it
    swap: bool = False  # loaded lazily when it runs; evictable when idle (the swap baseline)


class EmulatedDevice:
    """One emulated GPU: its memory and its compute, shared by the replicas placed on it (all
    in this process: the emulated backend hosts a device's replicas together)."""

    def __init__(self, id: str, memory_bytes: int, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.id = id
        self.memory_bytes = memory_bytes
        self.time_scale = time_scale
        self._compute = threading.Lock()  # one step (or load) at a time: time-sharing
        self._end: float | None = None  # where the last queueable call ended (perf_counter)
        self._ledger = threading.Lock()
        self._resident: collections.OrderedDict[str, int] = collections.OrderedDict()  # LRU
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(self._resident.values())

    def resident(self, owner: Owner) -> bool:
        return owner.key in self._resident

    def _load_for(self, seconds: float) -> None:
        """Copy a model in for ``seconds`` of profiled time (divided by the time scale); the
        step after it starts afresh, not where the step before the load ended."""
        if seconds > 0:
            time.sleep(seconds / self.time_scale)
        self._end = None

    def _admit(self, owner: Owner, nbytes: int, *, evict: bool) -> None:
        with self._ledger:
            held = self._resident.get(owner.key, 0)
            while self.used_bytes - held + nbytes > self.memory_bytes:
                victims = [k for k in self._resident if k != owner.key] if evict else []
                if not victims:
                    raise OutOfDeviceMemory(
                        f"{self.id}: {owner.key} needs {nbytes / 1e9:.2f} GB; "
                        f"{(self.memory_bytes - self.used_bytes + held) / 1e9:.2f} GB free of "
                        f"{self.memory_bytes / 1e9:.0f} GB"
                    )
                del self._resident[victims[0]]  # least recently used first
                self.evictions += 1
            self._resident[owner.key] = nbytes
            self._resident.move_to_end(owner.key)

    def load(self, owner: Owner, nbytes: int | None = None, load_s: float | None = None,
             memory_wait_s: float = MEMORY_WAIT_S) -> None:
        """Make ``owner`` resident with ``nbytes`` (default: its memory; more once a ControlNet
        is attached to it) and wait ``load_s`` (default: its load time); the device computes
        nothing meanwhile. Memory an eviction still holds (a model draining its last task) is
        waited for, up to ``memory_wait_s`` of wall time, with the device free meanwhile."""
        give_up = time.monotonic() + memory_wait_s
        while True:
            with self._compute:
                try:
                    self._admit(owner, nbytes or owner.memory_bytes, evict=owner.swap)
                except OutOfDeviceMemory:
                    if time.monotonic() >= give_up:
                        raise
                else:
                    self._load_for(owner.load_s if load_s is None else load_s)
                    return
            time.sleep(0.01)

    def free(self, owner: Owner) -> None:
        with self._ledger:
            self._resident.pop(owner.key, None)

    def run(self, owner: Owner, seconds: float, *, queued: bool = True) -> None:
        """One call of ``seconds`` profiled time on this device's compute; a swap owner not
        resident is loaded first (evicting the least recently used).

        A ``queued`` call (a step its host could have queued on the GPU behind the last one)
        that comes within ``QUEUED_GAP_S`` of the previous queued call's end starts where that
        one ended: on a GPU the host launches the next step's kernels while the last ones
        run, so the few milliseconds between two calls (here the emulator's own: every
        device's host in one process on a few shared cores, which the time scale would
        multiply) do not idle the device. A call after a hand-off between devices (part of a
        split step) is not queued, and the call after it starts afresh: that wait is real."""
        with self._compute:
            if owner.swap and owner.key not in self._resident:
                self._admit(owner, owner.memory_bytes, evict=True)
                self._load_for(owner.load_s)
            with self._ledger:
                if owner.key in self._resident:
                    self._resident.move_to_end(owner.key)
            start = time.perf_counter()
            if queued and self._end is not None and start - self._end <= QUEUED_GAP_S:
                start = self._end
            end = start + max(0.0, seconds) / self.time_scale
            pause = end - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            self._end = end if queued else None


_DEVICES: dict[str, EmulatedDevice] = {}
_DEVICES_LOCK = threading.Lock()


def emulated_device(id: str, memory_bytes: int, time_scale: float) -> EmulatedDevice:
    """This process's device ``id`` (created on first use): replicas placed on one device id
    share it."""
    with _DEVICES_LOCK:
        device = _DEVICES.get(id)
        if device is None:
            device = _DEVICES[id] = EmulatedDevice(id, memory_bytes, time_scale)
        return device


def device_of(settings: Settings) -> EmulatedDevice:
    """The emulated device this replica was placed on (``device_label``)."""
    label = settings.device_label or "emu:0"
    return emulated_device(label, settings.device_memory_bytes or EMULATED_DEVICE_BYTES,
                           settings.time_scale)
