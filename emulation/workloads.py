"""The emulated cluster's workloads: which workflows, who asks for which, the
capacity bound, and the static baselines' device splits. Pure: files and arithmetic.

- ``flux3`` (the paper's Figure 9(d)): FLUX.1-schnell txt2img with CFG, + ControlNet Canny,
  + ControlNet Depth (4 steps, 1024x1024); the traces' tenants A/B/C map to them.
- ``mix12`` (the paper's workflow set): SD3-medium, SD3.5-large, FLUX.1-dev and FLUX.1-schnell,
  each as txt2img with CFG, + ControlNet Canny, + ControlNet Depth (Pose for SD3); requests
  arrive with the traces' gaps and pick a workflow by a fixed-seed Zipf popularity (s = 1).
- On either, a trace line may name a workflow instead of a tenant: that request is that
  workflow (``Workload.assign``).

The workflow files are in ``data/workloads/<name>/``; their ``solo_latency_s`` (what deadlines
default from) is computed here from the profiles: every node's profiled time at batch 1,
divided by the time scale.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.kinds import KINDS, pool_of
from common.settings import Settings
from common.workflow import WorkflowSpec, parse_workflow
from emulation.profiles import (
    ModelProfile,
    node_solo_seconds,
    pipeline_models,
    profile_of,
    profiles_in,
    solo_latency_s,
)
from emulation.traces import Arrival, zipf_choices

WORKLOAD_DIR = Path(__file__).resolve().parent.parent / "data" / "workloads"
WORKLOADS = ("flux3", "mix12")

#: the traces' tenants on Flux-3, as the paper maps them
FLUX3_TENANTS = {"A": "flux-schnell-txt2img", "B": "flux-schnell-canny",
                 "C": "flux-schnell-depth"}
#: the paper's static splits of 8 GPUs on Flux-3 (A/B/C): proportional, and Shepherd-like
FLUX3_SPLITS = {"static": (3, 3, 2), "shepherd": (4, 2, 2)}
ZIPF_SEED = 2026


@dataclass(frozen=True)
class Workload:
    name: str
    workflows: dict[str, WorkflowSpec]  # with solo_latency_s (time-scaled)
    profiles: dict[str, ModelProfile]
    time_scale: float = 1.0

    @property
    def popularity(self) -> list[str]:
        """Workflows from most to least popular (Zipf rank order; a fixed-seed shuffle, so
        popularity is not aligned with the base model)."""
        names = sorted(self.workflows)
        if self.name == "flux3":
            return list(FLUX3_TENANTS.values())
        random.Random(ZIPF_SEED).shuffle(names)
        return names

    def assign(self, arrivals: Sequence[Arrival], seed: int = 0) -> list[str]:
        """The workflow of each arrival. A tenant that names one of the workload's workflows
        is that workflow, on every workload (a trace line ``WORKFLOW INTERVAL``, so a burst
        can hit one workflow); otherwise by tenant on Flux-3 (A/B/C) and by Zipf popularity
        on Mix-12. The Zipf picks go to the other arrivals in order, so adding named arrivals
        to a trace leaves the others' workflows as they were."""
        if self.name == "flux3":
            return [a.tenant if a.tenant in self.workflows else self._tenant_workflow(a.tenant)
                    for a in arrivals]
        drawn = sum(a.tenant not in self.workflows for a in arrivals)
        picks = iter(zipf_choices(self.popularity, drawn, seed=seed))
        return [a.tenant if a.tenant in self.workflows else next(picks) for a in arrivals]

    def _tenant_workflow(self, tenant: str) -> str:
        if tenant not in FLUX3_TENANTS:
            raise ValueError(f"flux3: unknown tenant {tenant!r}; a trace names A, B, C or a "
                             f"workflow ({', '.join(sorted(self.workflows))})")
        return FLUX3_TENANTS[tenant]

    def shares(self, arrivals: Sequence[Arrival]) -> dict[str, float]:
        """Each workflow's share of the requests of ``arrivals``: counted on Flux-3; on
        Mix-12 the arrivals that name a workflow counted, the others at their expected Zipf
        share."""
        if self.name == "flux3":
            counts = Counter(self.assign(arrivals))
            return {w: counts[w] / max(1, len(arrivals)) for w in self.popularity}
        weights = [1 / r for r in range(1, len(self.popularity) + 1)]
        zipf = {w: x / sum(weights) for w, x in zip(self.popularity, weights, strict=True)}
        named = Counter(a.tenant for a in arrivals if a.tenant in self.workflows)
        if not named:
            return zipf
        drawn = len(arrivals) - sum(named.values())
        return {w: (named[w] + drawn * zipf[w]) / len(arrivals) for w in self.popularity}

    def solo_s(self, workflow: str) -> float:
        """``workflow``'s solo latency (time-scaled), which ``load_workload`` set."""
        solo = self.workflows[workflow].solo_latency_s
        if solo is None:
            raise ValueError(f"workload {self.name}: {workflow} has no solo_latency_s")
        return solo

    def work_s(self, workflow: str) -> float:
        """Device-seconds of profiled work one request needs (unscaled: H800 seconds)."""
        return self.solo_s(workflow) * self.time_scale

    def capacity_rps(self, devices: int, arrivals: Sequence[Arrival]) -> float:
        """The physical limit: devices / mean device-seconds per request over the mix
        (requests/s in trace time; no system can sustain more)."""
        shares = self.shares(arrivals)
        return devices / sum(share * self.work_s(w) for w, share in shares.items())

    def pipeline_bytes(self, workflow: str) -> int:
        """Device memory one whole-workflow (monolithic) replica holds."""
        spec = self.workflows[workflow]
        return sum(profile_of(m, self.profiles).memory_bytes for m in pipeline_models(spec))


def load_workload(name: str, profile_dir: Path | str | None = None, time_scale: float = 1.0
                  ) -> Workload:
    """Workload ``name`` timed by the profiles in ``profile_dir`` (None: the shipped ones)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown {name!r}; known: {', '.join(WORKLOADS)}")
    profiles = profiles_in(profile_dir)
    found = {}
    for path in sorted((WORKLOAD_DIR / name).glob("*.yaml")):
        spec = parse_workflow(path.read_text())
        solo = solo_latency_s(spec, profiles) / time_scale
        found[spec.name] = spec.model_copy(update={"solo_latency_s": solo})
    return Workload(name, found, profiles, time_scale)


def workload_workflows(settings: Settings) -> list[WorkflowSpec]:
    """The workflows of the emulated workload ``settings`` names (none for another)."""
    if settings.workload not in WORKLOADS:
        return []
    return list(load_workload(settings.workload, settings.profile_dir,
                              settings.time_scale).workflows.values())


def static_split(
    workload: Workload, shares: Mapping[str, float], devices: Sequence[str], memory_bytes: int,
) -> dict[str, list[str]]:
    """The static baseline: whole-workflow replicas on ``devices`` in proportion to each
    workflow's share of the *work* (requests x device-seconds per request). Hot workflows (a
    quota of half a device or more) get dedicated devices by largest remainder; the cold ones
    share the remaining devices, as many per device as memory allows, each on the least loaded
    device it fits. Deterministic."""
    work = {w: shares.get(w, 0.0) * workload.work_s(w) for w in workload.workflows}
    total = sum(work.values()) or 1.0
    n = len(devices)
    quota = {w: work[w] / total * n for w in work}
    order = sorted(work, key=lambda w: (-work[w], w))
    cold = [w for w in order if quota[w] < 0.5]
    hot = [w for w in order if w not in cold]
    cold_bytes = sum(workload.pipeline_bytes(w) for w in cold)
    shared = 0 if not cold else max(round(sum(quota[w] for w in cold)), 1,
                                     -(-cold_bytes // memory_bytes))
    while len(hot) > n - shared:  # too many hot ones: the coolest of them share too
        cold.insert(0, hot.pop())
        shared = max(shared, 1)
    counts = dict.fromkeys(hot, 1)
    for _ in range(n - shared - len(hot)):
        w = max(hot, key=lambda w: (quota[w] - counts[w], -order.index(w)))
        counts[w] += 1
    it = iter(devices)
    assignment = {w: [next(it) for _ in range(counts[w])] for w in hot}
    pool = list(it) or [devices[-1]]
    free = dict.fromkeys(pool, memory_bytes)
    load = dict.fromkeys(pool, 0.0)
    for w in cold:
        need = workload.pipeline_bytes(w)
        fitting = [d for d in pool if free[d] >= need]
        if not fitting:
            raise ValueError(f"static split: no device has {need / 1e9:.1f} GB free for {w}")
        d = min(fitting, key=lambda d: (load[d], pool.index(d)))
        assignment[w] = [d]
        free[d] -= need
        load[d] += work[w]
    return assignment


def flux3_split(workload: Workload, system: str, devices: Sequence[str]) -> dict[str, list[str]]:
    """The paper's fixed Flux-3 splits (3/3/2 static, 4/2/2 Shepherd-like) of 8 devices, scaled
    to ``len(devices)`` (each workflow at least one)."""
    counts = FLUX3_SPLITS[system]
    n = len(devices)
    scaled = [max(1, round(c * n / sum(counts))) for c in counts]
    while sum(scaled) > n and max(scaled) > 1:
        scaled[scaled.index(max(scaled))] -= 1
    it = iter(devices)
    return {w: [next(it, devices[-1]) for _ in range(c)]
            for w, c in zip(FLUX3_TENANTS.values(), scaled, strict=True)}


def micro_provision(workload: Workload, shares: Mapping[str, float], devices: int,
                    small_devices: int = 1) -> dict[str, int]:
    """Initial replicas for micro-serving: one of every small pool (a kind whose replica does
    not take a whole device, ``common.kinds``: text encoders, VAEs), and the devices but
    ``small_devices`` (0: the small pools share devices with denoisers) split between the big
    pools (the denoisers') in proportion to their share of the denoising work, each at least
    one."""
    work: dict[str, float] = {}
    small: set[str] = set()
    for name, spec in workload.workflows.items():
        for node in spec.nodes.values():
            pool = pool_of(node.kind, spec.models[node.model])
            if not KINDS[node.kind].exclusive:
                small.add(pool)
                continue
            adapters = ([profile_of(spec.models[node.controlnet], workload.profiles)]
                        if node.controlnet else [])
            params = {k: p.default for k, p in spec.params.items() if p.default is not None}
            seconds = node_solo_seconds(node.kind, profile_of(spec.models[node.model],
                                                              workload.profiles),
                                        params, adapters)
            work[pool] = work.get(pool, 0.0) + shares.get(name, 0.0) * seconds
    counts = _largest_remainder(work, max(len(work), devices - small_devices))
    return {**dict.fromkeys(sorted(small), 1), **counts}


def _largest_remainder(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights``, each key at least one."""
    keys = sorted(weights, key=lambda k: (-weights[k], k))
    counts = dict.fromkeys(keys, 1)
    whole = sum(weights.values()) or 1.0
    for _ in range(total - len(keys)):
        k = max(keys, key=lambda k: (weights[k] / whole * total - counts[k], -keys.index(k)))
        counts[k] += 1
    return counts
