"""Request traces (``data/traces/*.txt``): who sends when, as a list of arrivals.

A trace file has one request per line, ``TENANT INTERVAL``: send the request, then wait
INTERVAL seconds before the next line's. ``Arrival.at_s`` is the send time from the start.
A line may name a workflow instead of a tenant, ``WORKFLOW INTERVAL`` (e.g.
``flux-schnell-canny 0.5``): on every workload that request is that workflow, so any mix, or a
burst on one workflow, can be replayed (``emulation.workloads.Workload.assign``; the shipped
traces' tenants A/B/C map to Flux-3's workflows, and on Mix-12 a tenant that is not a workflow
picks one by Zipf popularity).
Pure: parsing and arithmetic, no clock. The benchmarks (``lego bench slo``/``sweep``) and the
Locust load shapes (``loadtest/``) replay traces through these functions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: the traces shipped with the repository (copied from the paper's artifact)
DEFAULT_TRACE_DIR = Path(__file__).resolve().parent.parent / "data" / "traces"


@dataclass(frozen=True)
class Arrival:
    at_s: float  # send time, seconds from the start of the trace
    tenant: str


def parse_trace(text: str) -> list[Arrival]:
    """Arrivals of a trace file's text; ``ValueError`` naming the line when malformed."""
    arrivals, clock = [], 0.0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        try:
            tenant, gap = parts[0], float(parts[1])
        except (IndexError, ValueError):
            raise ValueError(
                f"trace line {number}: expected 'TENANT INTERVAL' (or 'WORKFLOW INTERVAL'), "
                f"got {line!r}"
            ) from None
        if gap < 0 or gap != gap:
            raise ValueError(f"trace line {number}: interval {parts[1]} must be >= 0")
        arrivals.append(Arrival(clock, tenant))
        clock += gap
    return arrivals


def load_trace(path: Path | str) -> list[Arrival]:
    return parse_trace(Path(path).read_text())


def trace_rate_scale(path: Path | str) -> float | None:
    """The rate scale a shipped trace's name states (``..._rs2.0_...``), else None."""
    found = re.search(r"_rs([0-9.]+)_", Path(path).name)
    return float(found.group(1)) if found else None


def trace_for_scale(scale: float, directory: Path | str = DEFAULT_TRACE_DIR) -> list[Arrival]:
    """Arrivals at rate scale ``scale`` over the shipped traces' span: the shipped trace of
    that scale, else the nearest shipped one below it sped up by ``scale / shipped`` and
    repeated to fill the span (same tenants and burst pattern, denser). Below the smallest
    shipped scale, the smallest is slowed down and cut at the span."""
    found: dict[float, Path] = {}
    for path in sorted(Path(directory).glob("*.txt")):
        rate_scale = trace_rate_scale(path)
        if rate_scale is not None:
            found[rate_scale] = path
    if not found:
        raise FileNotFoundError(f"no traces (*_rsX_*.txt) in {directory}")
    if scale <= 0:
        raise ValueError(f"rate scale must be > 0, got {scale}")
    below = [s for s in found if s <= scale]
    base = max(below) if below else min(found)
    original = load_trace(found[base])
    if scale == base:
        return original
    span = duration_s(original)
    period = span * base / scale
    fast = speed_up(original, scale / base)
    tiled: list[Arrival] = []
    offset = 0.0
    while offset < span:
        tiled += [Arrival(a.at_s + offset, a.tenant) for a in fast if a.at_s + offset < span]
        offset += period
    return tiled


def speed_up(arrivals: Sequence[Arrival], factor: float) -> list[Arrival]:
    """The same arrivals ``factor`` times denser (every send time divided by ``factor``)."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    return [Arrival(a.at_s / factor, a.tenant) for a in arrivals]


def duration_s(arrivals: Sequence[Arrival]) -> float:
    return arrivals[-1].at_s if arrivals else 0.0


def spike(
    base: Sequence[Arrival], *, at_s: float, length_s: float, factor: float, seed: int = 0,
    tenant: str | None = None,
) -> list[Arrival]:
    """``base`` with a burst: during [at_s, at_s + length_s) the arrival rate becomes ``factor``
    times the base rate, the extra requests at evenly spread times (jittered, fixed seed), each
    drawn from the base's tenants in that window, or all ``tenant`` when given (a workflow's
    name: a burst on that workflow alone). The times do not depend on ``tenant``, so spikes
    of one seed differ only in who sends. ``factor`` 1 returns ``base``."""
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    window = [a for a in base if at_s <= a.at_s < at_s + length_s]
    rate = len(base) / max(duration_s(base), 1e-9)
    extra = round((factor - 1) * max(len(window), rate * length_s))
    rng = random.Random(seed)
    tenants = [a.tenant for a in window] or [a.tenant for a in base]
    added = []
    for i in range(extra):
        at = at_s + length_s * (i + rng.random()) / max(extra, 1)
        drawn = rng.choice(tenants)  # drawn even when unused: same times for every tenant
        added.append(Arrival(at, tenant or drawn))
    return sorted([*base, *added], key=lambda a: a.at_s)


def zipf_choices(names: Sequence[str], count: int, *, s: float = 1.0, seed: int = 0) -> list[str]:
    """``count`` picks from ``names`` by Zipf popularity (rank r has weight 1 / r**s), with a
    fixed seed: the first names are hot, the last ones cold."""
    weights = [1.0 / (rank**s) for rank in range(1, len(names) + 1)]
    return random.Random(seed).choices(list(names), weights=weights, k=count)
