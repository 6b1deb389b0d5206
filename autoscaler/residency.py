"""Residency: which models are resident on which devices, when devices are hosts.

With device hosts (``services.host``) a device serves every pool whose model is resident on it,
and runs the most urgent step next, so the autoscaler's decision is no longer a replica count
per pool but the set of models each device holds. Pure functions, as ``policy`` is:

- ``copies_wanted``: how many devices a pool should be resident on so that its tasks rarely
  wait past their slack: enough for its demand (arrivals plus draining the backlog) and, by
  Erlang C (M/M/c), for the probability that a task waits longer than ``target_wait_s`` to be
  under ``miss``. A pool sized only for its mean demand makes two overlapping requests of a
  rare, slow model miss their deadlines while other devices idle.
- ``Residency.step``: the wanted copies per pool, held at their peak over a stable window so
  that a lull does not evict a model that the next request needs (a load costs seconds).
- ``plan``: copies onto devices by memory. Running copies stay where they are; every pool
  first gets one copy (largest first, on the device with the most free memory); then copies go
  one at a time to the pool with the highest want per copy, so memory is filled in proportion
  to need: an idle device costs nothing, and a model already resident costs no load when a
  burst comes. A pool below its want may evict copies of pools above theirs (the least needed
  first); copies beyond the want otherwise stay until memory is needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from autoscaler.placement import Device


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits, in an M/M/c queue with ``servers`` servers and
    ``offered`` load (arrival rate x service time); 1 when the queue is unstable."""
    if offered <= 0:
        return 0.0
    if servers <= offered:
        return 1.0
    term, total = 1.0, 1.0  # a^k / k!, summed for k < servers
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers * servers / (servers - offered)
    return last / (total + last)


def copies_wanted(
    rate_per_s: float, service_s: float, *, queued: int = 0, target_wait_s: float,
    miss: float = 0.05, most: int,
) -> int:
    """Least copies (at most ``most``) that make P(wait > target_wait_s) <= ``miss`` at the
    long-run ``rate_per_s``, plus one for each task queued now that no device has taken (a
    burst: with deadlines a small multiple of the work, each needs a device soon); 0 for a
    pool with no work. Not the lag with the tasks in progress: those have their device."""
    if rate_per_s <= 0 and queued <= 0:
        return 0
    if service_s <= 0:
        return 1
    offered = rate_per_s * service_s
    copies = max(1, math.ceil(round(offered, 9)))
    while copies < most:
        mu = 1.0 / service_s
        waits = erlang_c(copies, offered)
        if waits * math.exp(-(copies * mu - rate_per_s) * target_wait_s) <= miss:
            break
        copies += 1
    return min(copies + queued, most)


@dataclass(frozen=True)
class PoolNeed:
    name: str
    memory_bytes: int
    want: int  # copies wanted (at least 1 is always placed)


@dataclass(frozen=True)
class Residency:
    """Wanted copies per pool, each held at its peak over ``window_s``, and each pool's
    long-run arrival rate (an exponential average over ``window_s``: copies of a large model
    are not loaded, and others evicted for them, because of one request)."""

    window_s: float
    history: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    rate_per_s: Mapping[str, float] = field(default_factory=dict)
    at_s: float | None = None

    def rates(self, now_s: float, observed: Mapping[str, float]) -> dict[str, float]:
        """The long-run rates after this tick's observed arrival rates."""
        if self.at_s is None:
            return {pool: 0.0 for pool in observed}
        weight = min(1.0, max(0.0, now_s - self.at_s) / self.window_s)
        return {pool: self.rate_per_s.get(pool, 0.0) * (1 - weight) + rate * weight
                for pool, rate in observed.items()}

    def step(self, now_s: float, wants: Mapping[str, int],
             rates: Mapping[str, float] | None = None) -> tuple[dict[str, int], Residency]:
        history = {}
        held = {}
        for pool, want in wants.items():
            kept = tuple((t, w) for t, w in self.history.get(pool, ())
                         if t > now_s - self.window_s)
            history[pool] = (*kept, (now_s, want))
            held[pool] = max(w for _, w in history[pool])
        return held, Residency(self.window_s, history, dict(rates or self.rate_per_s), now_s)


def plan(
    needs: Mapping[str, PoolNeed], devices: Sequence[Device],
    current: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Pool -> the devices it is resident on (see the module docstring); deterministic."""
    free = {d.id: d.memory_bytes for d in devices}
    placed: dict[str, list[str]] = {p: [] for p in sorted(needs)}
    by_size = sorted(needs, key=lambda p: (-needs[p].memory_bytes, p))

    def put(pool: str, device: str) -> None:
        free[device] -= needs[pool].memory_bytes
        placed[pool].append(device)

    for pool in by_size:  # what runs stays: moving a model costs a load
        for device in (current or {}).get(pool, []):
            if device in free and device not in placed[pool] \
                    and free[device] >= needs[pool].memory_bytes:
                put(pool, device)

    def want(pool: str) -> int:
        return max(1, needs[pool].want)

    def priority(pool: str) -> tuple:
        copies = len(placed[pool])
        if copies == 0:  # one copy of everything first, the largest while memory is free
            return (0, -needs[pool].memory_bytes, pool)
        below = copies < want(pool)
        return (1 if below else 2, -want(pool) / copies, pool)

    def room_by_eviction(pool: str) -> tuple[str, list[str]] | None:
        """A device where evicting surplus copies (pools above their want, least needed
        first) makes room for ``pool``, and the pools to evict there."""
        need_bytes = needs[pool].memory_bytes
        best = None
        for device in free:
            if device in placed[pool]:
                continue
            surplus = sorted((q for q in placed if device in placed[q]
                              and len(placed[q]) > want(q)),
                             key=lambda q: (want(q) / len(placed[q]), q))
            evict, room = [], free[device]
            for q in surplus:
                if room >= need_bytes:
                    break
                evict.append(q)
                room += needs[q].memory_bytes
            if room >= need_bytes and (best is None or len(evict) < len(best[1])):
                best = (device, evict)
        return best

    done: set[str] = set()
    for _ in range(len(needs) * max(1, len(devices)) * 4):  # bounded: each round places one
        open_pools = [p for p in placed if p not in done and len(placed[p]) < len(devices)]
        if not open_pools:
            break
        pool = min(open_pools, key=priority)
        fitting = [d for d in free if d not in placed[pool]
                   and free[d] >= needs[pool].memory_bytes]
        if fitting:
            put(pool, max(fitting, key=lambda d: (free[d], -list(free).index(d))))
            continue
        found = room_by_eviction(pool) if len(placed[pool]) < want(pool) else None
        if found is None:
            done.add(pool)
            continue
        device, evict = found
        for q in evict:
            placed[q].remove(device)
            free[device] += needs[q].memory_bytes
        put(pool, device)
    return placed
