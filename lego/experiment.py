"""`lego bench slo` and `lego bench sweep`: the paper's experiment on the emulated GPU cluster.

``slo`` replays one trace against one system (``lego.systems``) on one workload
(``common.workloads``): a fresh stack as `lego up --emulate` runs it, requests sent open-loop
over HTTP at the trace's times (divided by the time scale), each with the default deadline,
2 x its workflow's profiled solo latency. Reported: SLO attainment (finished within the
deadline / all; rejected and late requests are misses), p50/p99 latency of finished requests,
goodput, and rejected, late and lost counts. Latencies and rates are in trace time (wall
seconds x the time scale), so runs at different time scales compare directly.

``sweep`` runs every system at every rate scale, then measures bursts, and reports per
workload: the rate ratio (the highest rate scale each system sustains at >= 90% attainment,
micro / best baseline), the burst ratio (on a base load every system sustains, a 10-second
spike of k x the base rate: the largest k each absorbs at >= 90%, micro / best baseline),
micro's sustained rate as a fraction of the capacity bound, a table and a PNG plot.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common.bus import run_async
from common.metrics import percentile
from common.settings import Settings
from common.traces import Arrival, duration_s, load_trace, spike, trace_for_scale
from common.workloads import Workload, load_workload
from lego.burst import Outcome, submit
from lego.systems import SYSTEMS, emulated_settings

#: rate scales of the sweep per workload (the shipped traces are 0.5, 1, 2 and 4; others are
#: scaled): finer around each one's capacity bound (Flux-3: rate scale 5.22, whose 85% is
#: 4.44; Mix-12: 1.28), so sustained rates are told apart there
RATE_SCALES = {"flux3": (0.5, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 6.0, 8.0),
               "mix12": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)}
#: attainment a system must reach to "sustain" a load
SUSTAIN = 0.9
#: the burst experiment: a spike of k x the base rate for SPIKE_S seconds (trace time), at
#: SPIKE_AT_S into a BURST_WINDOW_S-second window of the base trace
SPIKE_S, SPIKE_AT_S, BURST_WINDOW_S = 10.0, 20.0, 60.0
BURST_FACTORS = (2, 4, 8, 16, 32, 64)
PROMPT = "a lighthouse on a cliff at dawn"


@dataclass(frozen=True)
class SloRun:
    system: str
    workload: str
    arrivals: list[Arrival]
    devices: int = 8
    time_scale: float = 1.0


def systems_for(workload: str) -> list[str]:
    """The systems a workload is compared on (the Shepherd-like split is Flux-3's)."""
    return [s for s in SYSTEMS if s != "shepherd" or workload == "flux3"]


# --- one run -------------------------------------------------------------------------------

async def replay(url: str, requests: Sequence[tuple[float, str]], time_scale: float,
                 wait_s: float) -> list[Outcome]:
    """Send each (trace time, workflow) request at its time / ``time_scale``, open-loop; wait
    up to ``wait_s`` after the last for every end (what has not ended by then is lost)."""
    outcomes: list[Outcome] = []
    tasks = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.time()
        for seed, (at_s, workflow) in enumerate(requests):
            await asyncio.sleep(max(0.0, start + at_s / time_scale - time.time()))
            outcome = Outcome(workflow, time.time())
            outcomes.append(outcome)
            body = {"workflow": workflow, "prompt": PROMPT, "seed": seed}
            tasks.append(asyncio.create_task(submit(http, outcome, body)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=wait_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes


def summarize(outcomes: list[Outcome], deadline_s: dict[str, float], time_scale: float,
              span_s: float) -> dict[str, Any]:
    """Figures of one run; latencies in trace seconds; ``deadline_s`` in wall seconds.

    A request's latency is the system's own record of it, from the gateway's acceptance to its
    end (what its deadline counts from), so the load generator's HTTP round trips, which the
    time scale does not shrink, do not distort scaled runs."""
    met = [o for o in outcomes
           if o.status == "succeeded" and o.served_s is not None
           and o.served_s <= deadline_s[o.phase]]
    latencies = [o.served_s * time_scale for o in outcomes
                 if o.status == "succeeded" and o.served_s is not None]
    by_workflow: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_workflow.setdefault(o.phase, []).append(o)
    n = len(outcomes)
    return {
        "requests": n,
        "slo_attainment": round(len(met) / n, 4) if n else None,
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "goodput_rps": round(len(met) / max(span_s, 1e-9), 4),
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "dropped_late": sum(o.error == "deadline_exceeded" for o in outcomes),
        "failed_other": sum(o.status == "failed" and o.error != "deadline_exceeded"
                            for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "by_workflow": {
            w: round(sum(o in met for o in group) / len(group), 4)
            for w, group in sorted(by_workflow.items())
        },
    }


def run_slo(base: Settings, run: SloRun, *, seed: int = 0) -> dict[str, Any]:
    """One system on one trace, on a fresh stack (its own NATS, store and autoscaler)."""
    from lego.stack import Stack, free_port

    workload = load_workload(run.workload, base.profile_dir, run.time_scale)
    requests = list(zip((a.at_s for a in run.arrivals),
                        workload.assign(run.arrivals, seed=seed), strict=True))
    deadline_s = {name: base.slo_factor * spec.solo_latency_s  # type: ignore[operator]
                  for name, spec in workload.workflows.items()}
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix=f"lego-slo-{tag}-") as tmp:
        settings = emulated_settings(
            base.model_copy(update={
                "nats_url": None, "redis_url": None, "run_dir": Path(tmp),
                "shm_root": Path("/dev/shm") / f"lego-slo-{tag}",
            }),
            system=run.system, workload=run.workload, devices=run.devices,
            time_scale=run.time_scale,
        )
        stack = Stack(settings, port=free_port(), quiet=True)
        try:
            stack.start()
            # every request ends by then: dropped at its deadline, or by a replica started
            # for it (a pool at zero waits out another's scale-down delay, then a cold start)
            wait_s = 4 * max(deadline_s.values()) + settings.scale_down_delay_s + 10.0
            started = time.perf_counter()
            outcomes = run_async(replay(stack.gateway_url, requests, run.time_scale, wait_s))
            wall_s = time.perf_counter() - started
        finally:
            stack.stop(timeout_s=30)
            shutil.rmtree(settings.shm_root, ignore_errors=True)
    span_s = max(duration_s(run.arrivals), 1e-9)
    result = {"system": run.system, **summarize(outcomes, deadline_s, run.time_scale, span_s)}
    result.update({
        "workload": run.workload, "devices": run.devices, "time_scale": run.time_scale,
        "trace_s": round(span_s, 3), "wall_s": round(wall_s, 3),
        "capacity_rps": round(workload.capacity_rps(run.devices, run.arrivals), 4),
        "offered_rps": round(len(run.arrivals) / span_s, 4),
    })
    return result


def print_slo(result: dict[str, Any]) -> None:
    r = result
    print(f"{r['system']} on {r['workload']} ({r['devices']} emulated devices, time scale "
          f"{r['time_scale']:g}): {r['requests']} requests over {r['trace_s']:.0f} s, offered "
          f"{r['offered_rps']:.2f}/s (capacity bound {r['capacity_rps']:.2f}/s)")
    print(f"  SLO attainment {_f(r['slo_attainment'], 3)}   p50 {_f(r['p50_s'])} s   p99 "
          f"{_f(r['p99_s'])} s   goodput {r['goodput_rps']:.3f}/s")
    print(f"  rejected {r['rejected']}   dropped late {r['dropped_late']}   other failures "
          f"{r['failed_other']}   lost {r['lost']}")
    print("  by workflow: " + ", ".join(f"{w} {a:.2f}" for w, a in r["by_workflow"].items()))


# --- the sweep -----------------------------------------------------------------------------

def sustained(rows: list[dict], system: str) -> float:
    """The highest rate scale at which ``system`` held >= 90% attainment (below which it held
    at every scale measured); 0 if none."""
    best = 0.0
    for row in sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate_scale"]):
        if (row["slo_attainment"] or 0) < SUSTAIN:
            break
        best = row["rate_scale"]
    return best


def ratio(micro: float, baselines: list[float]) -> float | None:
    """micro / the best baseline; None when no baseline held even the lowest load measured
    (the ratio is then unbounded by this sweep: the rows say how far micro went)."""
    best = max(baselines, default=0.0)
    return None if best <= 0 else round(micro / best, 3)


def burst_arrivals(base_scale: float, factor: float) -> list[Arrival]:
    window = [a for a in trace_for_scale(base_scale) if a.at_s < BURST_WINDOW_S]
    return spike(window, at_s=SPIKE_AT_S, length_s=SPIKE_S, factor=factor)


def _run_row(base: Settings, run: SloRun, log: Callable[[str], None]) -> dict[str, Any]:
    """One cell of the sweep; a stack that fails to start (a transient on a loaded host) gets
    one more try rather than ending an hour-long sweep."""
    try:
        return run_slo(base, run)
    except RuntimeError as exc:
        log(f"  {run.workload} {run.system}: {exc}; trying once more")
        return run_slo(base, run)


def sweep_workload(
    base: Settings, workload: str, *, devices: int, time_scale: float,
    scales: Sequence[float] | None = None, bursts: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every system at every rate scale (default: the workload's), then the burst experiment
    on the highest base every system sustains (the lowest scale if one sustains none)."""
    scales = scales or RATE_SCALES[workload]
    systems = systems_for(workload)
    rows: list[dict] = []
    for system in systems:
        for scale in scales:
            result = _run_row(base, SloRun(system, workload, trace_for_scale(scale), devices,
                                           time_scale), log)
            rows.append({"rate_scale": scale, **result})
            log(_row_line(rows[-1]))
    rate = {s: sustained(rows, s) for s in systems}
    loaded: Workload = load_workload(workload, base.profile_dir)
    at_1 = trace_for_scale(1.0)
    capacity = loaded.capacity_rps(devices, at_1)
    rps_at_1 = len(at_1) / duration_s(at_1)
    out: dict[str, Any] = {
        "rate_ratio": ratio(rate["micro"], [v for s, v in rate.items() if s != "micro"]),
        "capacity_fraction": round(rate["micro"] * rps_at_1 / capacity, 3),
        "sustained_rate_scale": rate,
        "capacity_rps": round(capacity, 4),
        "capacity_rate_scale": round(capacity / rps_at_1, 3),
        "rate_scales": list(scales),
        "rows": rows,
    }
    if bursts:
        everyone = min(rate.values())
        base_scale = everyone if everyone > 0 else min(scales)
        absorbed: dict[str, float] = {}
        burst_rows = []
        for system in systems:
            absorbed[system] = 1.0
            for factor in BURST_FACTORS:
                result = _run_row(base, SloRun(system, workload,
                                               burst_arrivals(base_scale, factor), devices,
                                               time_scale), log)
                burst_rows.append({"base_rate_scale": base_scale, "factor": factor, **result})
                log(f"  burst x{factor:<3g} " + _row_line(burst_rows[-1]))
                if (result["slo_attainment"] or 0) < SUSTAIN:
                    break
                absorbed[system] = factor
        out.update({
            "burst_ratio": ratio(absorbed["micro"],
                                 [v for s, v in absorbed.items() if s != "micro"]),
            "burst_base_rate_scale": base_scale,
            "burst_absorbed_factor": absorbed,
            "burst_rows": burst_rows,
        })
    return out


def plot(workload: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    systems = sorted({r["system"] for r in result["rows"]}, key=SYSTEMS.index)
    for system in systems:
        rows = sorted((r for r in result["rows"] if r["system"] == system),
                      key=lambda r: r["rate_scale"])
        ax.plot([r["rate_scale"] for r in rows], [r["slo_attainment"] for r in rows],
                marker="o", label=system, linewidth=2.2 if system == "micro" else 1.3)
    ax.axvline(result["capacity_rate_scale"], color="grey", linestyle="--",
               label=f"capacity bound ({result['capacity_rate_scale']:.2f})")
    ax.axhline(SUSTAIN, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("rate scale (x the trace's request rate)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{workload}: SLO attainment vs request rate (8 emulated H800s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_sweep(results: dict[str, Any]) -> None:
    for workload, r in results["workloads"].items():
        print(f"\n{workload}: capacity bound {r['capacity_rps']:.2f} req/s (rate scale "
              f"{r['capacity_rate_scale']:.2f})")
        systems = sorted({row["system"] for row in r["rows"]}, key=SYSTEMS.index)
        scales = sorted({row["rate_scale"] for row in r["rows"]})
        print(f"{'rate scale':>10} " + " ".join(f"{s:>14}" for s in systems))
        for scale in scales:
            cells = []
            for system in systems:
                row = next(x for x in r["rows"]
                           if x["system"] == system and x["rate_scale"] == scale)
                cells.append(f"{_f(row['slo_attainment'], 2):>14}")
            print(f"{scale:>10g} " + " ".join(cells))
        print("sustained (>= 90%): " + ", ".join(
            f"{s} {v:g}" for s, v in r["sustained_rate_scale"].items()))
        print(f"rate ratio (micro / best baseline): {r['rate_ratio']}")
        print(f"capacity fraction (micro sustained / bound): {r['capacity_fraction']}")
        if "burst_ratio" in r:
            print(f"burst (base rate scale {r['burst_base_rate_scale']:g}, 10 s spike): "
                  + ", ".join(f"{s} x{v:g}" for s, v in r["burst_absorbed_factor"].items()))
            print(f"burst ratio (micro / best baseline): {r['burst_ratio']}")
        if r.get("plot"):
            print(f"plot: {r['plot']}")


def _row_line(row: dict[str, Any]) -> str:
    return (f"{row['workload']} {row['system']:<14} scale {row.get('rate_scale', '-')!s:>4} "
            f"SLO {_f(row['slo_attainment'], 3)} p50 {_f(row['p50_s'])} p99 {_f(row['p99_s'])} "
            f"rejected {row['rejected']} late {row['dropped_late']} lost {row['lost']} "
            f"({row['wall_s']:.0f} s)")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def trace_arrivals(trace: str | None, rate_scale: float | None) -> list[Arrival]:
    if trace:
        return load_trace(trace)
    return trace_for_scale(rate_scale or 1.0)
