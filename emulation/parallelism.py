"""`lego bench parallel`: CFG and ControlNet parallelism on the emulated cluster.

Two parts, per workload:

- **Solo latency** of every workflow, micro-served on the emulated H800s, one request at a time
  (each workflow once to warm up, then ``reps`` times, the median kept): with parallelism off
  (``serial_s``), and with a part of every step on another device whenever one holding the
  model is idle (``always``): its negative guidance branch (``cfg_parallel_s``), or, for a
  workflow with a ControlNet, its ControlNet (``controlnet_parallel_s``; null without one).
  Latencies are in trace time (wall x the time scale). Latent parallelism is not built
  (``latent_parallel_s`` null; docs/emulation.md says why). Beside each, the part the split
  acts on: the run time of the workflow's stepped nodes (its denoiser: ``denoise_serial_s``,
  ``denoise_cfg_parallel_s``, ...), without the encoders and the decoder that run whole
  either way.
- **Attainment under load**: the sweep's rate scales, parallelism off against ``auto``, each
  cell the median of ``repeat`` runs, with p50 and p99 latency.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

from common.kinds import KINDS
from common.settings import Settings
from common.subjects import pool_kind
from emulation.experiment import (
    RATE_SCALES,
    SloRun,
    at_scale,
    repeat_slo,
    replay_on_stack,
)
from emulation.workloads import load_workload

#: the modes a row compares, and what the solo part runs split
ROW_MODES = ("off", "auto")
SOLO_SPLIT = "always"
#: solo requests are this many of their workflow's solo latencies apart (trace time): one
#: alone ends within about one, so the next finds the cluster idle
SOLO_GAP = 1.5
SOLO_CONTROLNET_GAP = 5.0
#: solo requests' deadlines, in their solo latencies (the longest's: how long a replay waits)
SOLO_DEADLINE = 10.0


class Solo(NamedTuple):
    """A workflow alone on the cluster (trace seconds, medians; None where none succeeded)."""

    latency_s: float | None  # the request's, from acceptance to its result
    stepped_s: float | None  # what its stepped nodes (the denoiser) ran


def stepped_run_s(timings: Sequence[dict[str, Any]]) -> float | None:
    """The run time of a request's stepped nodes (``NodeTiming`` dicts), in seconds; None
    where it has none."""
    ran = [t["run_ms"] for t in timings
           if (kind := KINDS.get(pool_kind(str(t.get("pool", ""))))) and kind.stepped]
    return sum(ran) / 1000 if ran else None


def solo_latencies(base: Settings, workload: str, mode: str, *, devices: int,
                   time_scale: float, reps: int, parts: Sequence[str] | None = None,
                   names: Collection[str] | None = None,
                   gap: float = SOLO_GAP) -> dict[str, Solo]:
    """Each of the workload's workflows (``names``: of those) alone on the cluster with
    parallelism ``mode`` of ``parts`` (None: the settings'): the median of ``reps`` after one
    warm-up, requests ``gap`` of their serial work apart."""
    loaded = load_workload(workload, base.profile_dir, time_scale)
    chosen = sorted(n for n in loaded.workflows if names is None or n in names)
    requests, at_s = [], 0.0
    for name in chosen:
        for _ in range(reps + 1):
            requests.append((at_s, name))
            at_s += gap * loaded.work_s(name)
    # deadlines far off: a part that does not pay shows how slow it is, not a drop
    settings = base.model_copy(update={"parallel": mode, "slo_factor": SOLO_DEADLINE,
                                       "parallel_parts": list(
                                           base.parallel_parts if parts is None else parts)})
    run = SloRun("micro", workload, [], devices, time_scale)
    deadline_s = SOLO_DEADLINE * max(loaded.solo_s(n) for n in loaded.workflows)
    outcomes, _ = replay_on_stack(settings, run, requests, deadline_s)
    found: dict[str, Solo] = {}
    for name in chosen:
        measured = [o for o in outcomes if o.phase == name][1:]  # after its warm-up
        ok = [o for o in measured if o.status == "succeeded"]
        served = [o.served_s for o in ok if o.served_s is not None]
        stepped = [s for o in ok if (s := stepped_run_s(o.timings)) is not None]
        found[name] = Solo(_median(served, time_scale), _median(stepped, time_scale))
    return found


def _median(values: Sequence[float], time_scale: float) -> float | None:
    return round(statistics.median(values) * time_scale, 3) if values else None


def bench_parallel(base: Settings, workloads: Sequence[str], *, devices: int = 8,
                   time_scale: float = 4.0, scales: Sequence[float] | None = None,
                   repeat: int = 3, reps: int = 2, rows: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {"workflows": {}, "rows": [], "config": {
        "devices": devices, "time_scale": time_scale, "repeat": repeat, "solo_reps": reps,
        "solo_split": SOLO_SPLIT, "modes": list(ROW_MODES)}}
    for workload in workloads:
        serial = solo_latencies(base, workload, "off", devices=devices,
                                time_scale=time_scale, reps=reps)
        controlled = {name for name, spec in load_workload(workload, base.profile_dir)
                      .workflows.items() if any(n.controlnet for n in spec.nodes.values())}
        cfg = solo_latencies(base, workload, SOLO_SPLIT, devices=devices,
                             time_scale=time_scale, reps=reps, parts=["cfg"])
        # a ControlNet apart may take several times the serial latency: requests further
        # apart, so each still runs alone
        controlnet = solo_latencies(base, workload, SOLO_SPLIT, devices=devices,
                                    time_scale=time_scale, reps=reps, parts=["controlnet"],
                                    names=controlled, gap=SOLO_CONTROLNET_GAP)
        none = Solo(None, None)
        for name in serial:
            s, p, c = serial[name], cfg[name], controlnet.get(name, none)
            result["workflows"][name] = {
                "workload": workload, "serial_s": s.latency_s, "cfg_parallel_s": p.latency_s,
                "cfg_ratio": _ratio(p.latency_s, s.latency_s),
                "controlnet_parallel_s": c.latency_s,
                "controlnet_ratio": _ratio(c.latency_s, s.latency_s), "latent_parallel_s": None,
                "denoise_serial_s": s.stepped_s, "denoise_cfg_parallel_s": p.stepped_s,
                "denoise_cfg_ratio": _ratio(p.stepped_s, s.stepped_s),
                "denoise_controlnet_parallel_s": c.stepped_s,
                "denoise_controlnet_ratio": _ratio(c.stepped_s, s.stepped_s)}
            log(f"{workload} {name}: serial {s.latency_s} s, CFG-parallel {p.latency_s} s, "
                f"ControlNet-parallel {c.latency_s} s; its denoiser {s.stepped_s}, "
                f"{p.stepped_s}, {c.stepped_s} s")
        if not rows:
            continue
        for scale in scales or RATE_SCALES[workload]:
            row: dict[str, Any] = {"workload": workload, "rate_scale": scale}
            make_run = functools.partial(_run_at, workload, scale, devices, time_scale)
            for mode in ROW_MODES:
                cell = repeat_slo(base.model_copy(update={"parallel": mode}), make_run, repeat,
                                  log=log)
                row[mode] = {k: cell.get(k) for k in (
                    "slo_attainment", "slo_attainment_min", "slo_attainment_max",
                    "bound_attainment", "p50_s", "p99_s", "rejected", "dropped_late")}
                log(f"{workload} x{scale} {mode}: {row[mode]['slo_attainment']} "
                    f"(p50 {row[mode]['p50_s']} s, p99 {row[mode]['p99_s']} s)")
            result["rows"].append(row)
    return result


def _run_at(workload: str, scale: float, devices: int, time_scale: float,
            seed: int) -> SloRun:
    return SloRun("micro", workload, at_scale(scale, seed=seed), devices, time_scale)


def _ratio(split_s: float | None, serial_s: float | None) -> float | None:
    return round(split_s / serial_s, 3) if split_s and serial_s else None


def print_parallel(result: dict[str, Any]) -> None:
    print(f"{'workflow':34} {'serial s':>9} {'CFG-par s':>10} {'ratio':>6} {'CN-par s':>9} "
          f"{'ratio':>6}")
    for prefix, title in (("", "the request"), ("denoise_", "its denoiser")):
        print(f"-- {title}")
        for name, w in result["workflows"].items():
            print(f"{name:34} {_f(w[prefix + 'serial_s']):>9} "
                  f"{_f(w[prefix + 'cfg_parallel_s']):>10} {_f(w[prefix + 'cfg_ratio']):>6} "
                  f"{_f(w[prefix + 'controlnet_parallel_s']):>9} "
                  f"{_f(w[prefix + 'controlnet_ratio']):>6}")
    if result["rows"]:
        print(f"\n{'workload':8} {'scale':>5}" + "".join(
            f" {m + ' attain':>13} {'p50':>6} {'p99':>6}" for m in ROW_MODES))
        for row in result["rows"]:
            print(f"{row['workload']:8} {row['rate_scale']:>5}" + "".join(
                f" {_f(row[m]['slo_attainment']):>13} {_f(row[m]['p50_s']):>6} "
                f"{_f(row[m]['p99_s']):>6}" for m in ROW_MODES))


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
