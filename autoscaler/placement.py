"""Where replicas run: pack pool replicas onto devices (GPUs or CPU hosts).

Largest first by memory, so a large model is placed while devices are still empty, each replica
on the fitting device with the most free slots (then memory): replicas spread over the devices,
since co-located replicas share a device's compute, and the small ones (text encoder, VAE,
safety checker) fill what is left. A replica takes
``slots_per_replica`` slots and ``memory_bytes`` on exactly one device: a model that needs a
whole GPU declares as many slots as the device has, so nothing shares it. Running replicas stay
where they are while still wanted, because moving one means a cold start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # policy imports this module; the spec is only read here
    from autoscaler.policy import PoolSpec


@dataclass(frozen=True)
class Device:
    """One GPU or host: its memory and how many replica slots it offers."""

    id: str
    memory_bytes: int
    slots: int = 1

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.slots < 0:
            raise ValueError(f"device {self.id}: memory_bytes and slots must be >= 0")


@dataclass(frozen=True)
class Placement:
    """``assignment``: pool -> one device id per placed replica (running ones first);
    ``unplaced``: pool -> replicas that found no device (pools with none are left out)."""

    assignment: dict[str, list[str]]
    unplaced: dict[str, int]

    @property
    def complete(self) -> bool:
        return not self.unplaced


def place(
    replicas: Mapping[str, int],
    pools: Mapping[str, PoolSpec],
    devices: list[Device],
    current: Mapping[str, list[str]] | None = None,
) -> Placement:
    """Assign ``replicas[pool]`` replicas of each pool to ``devices``; deterministic."""
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate device ids: {ids}")
    for name, count in replicas.items():
        if name not in pools:
            raise ValueError(f"no PoolSpec for pool {name!r}")
        if count < 0:
            raise ValueError(f"{name}: replicas must be >= 0, got {count}")
    free_memory = {d.id: d.memory_bytes for d in devices}
    free_slots = {d.id: d.slots for d in devices}

    def fits_on(device_id: str, spec: PoolSpec) -> bool:
        return (
            free_memory[device_id] >= spec.memory_bytes
            and free_slots[device_id] >= spec.slots_per_replica
        )

    def take(device_id: str, spec: PoolSpec) -> None:
        free_memory[device_id] -= spec.memory_bytes
        free_slots[device_id] -= spec.slots_per_replica

    # Largest first in both passes: if devices shrank, the big models keep their place.
    order = sorted(replicas, key=lambda n: (-pools[n].memory_bytes, -pools[n].slots_per_replica, n))
    assignment: dict[str, list[str]] = {name: [] for name in sorted(replicas)}

    # 1. Stability: keep running replicas on their device, up to the wanted count.
    for name in order:
        spec = pools[name]
        for device_id in (current or {}).get(name, []):
            if len(assignment[name]) >= replicas[name]:
                break
            if device_id in free_memory and fits_on(device_id, spec):
                take(device_id, spec)
                assignment[name].append(device_id)

    # 2. Largest first for the rest, one replica at a time, each on the fitting device with the
    # most free slots (then memory): replicas spread, since co-located ones share its compute.
    unplaced: dict[str, int] = {}
    for name in order:
        spec = pools[name]
        for _ in range(replicas[name] - len(assignment[name])):
            fitting = [d for d in ids if fits_on(d, spec)]
            best = max(fitting, key=lambda d: (free_slots[d], free_memory[d], -ids.index(d)),
                       default=None)
            if best is None:
                unplaced[name] = unplaced.get(name, 0) + 1
                continue
            take(best, spec)
            assignment[name].append(best)
    return Placement(assignment=assignment, unplaced=dict(sorted(unplaced.items())))


def fits(replicas: Mapping[str, int], pools: Mapping[str, PoolSpec], devices: list[Device]) -> bool:
    """Whether every wanted replica finds a device (from scratch; a heuristic, so it may say no
    to a count that a cleverer packing would fit: the safe side for a budget check)."""
    return place(replicas, pools, devices).complete
