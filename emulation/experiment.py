"""`lego bench slo` and `lego bench sweep`: the paper's experiment on the emulated GPU cluster.

``slo`` replays one trace against one system (``emulation.systems``) on one workload
(``emulation.workloads``): a fresh stack as `lego up --emulate` runs it, requests sent open-loop
over HTTP at the trace's times (divided by the time scale), each with the default deadline,
2 x its workflow's profiled solo latency. Reported: SLO attainment (finished within the
deadline / all; rejected and late requests are misses), p50/p99 latency of finished requests,
goodput, and rejected, late and lost counts. Latencies and rates are in trace time (wall
seconds x the time scale), so runs at different time scales compare directly.

Beside every result, ``bound_attainment``: the best attainment an idealised cluster could
reach on the same arrivals, workload, devices and workflow assignment (``emulation.bound``), so a
figure reads against what was possible, not only against the baselines.

A cell can run ``repeat`` times (``--repeat``), run i with seed i (the workflow assignment on
Mix-12, a spike's random draws) on a fresh stack each: ``slo_attainment`` is then the median,
with ``slo_attainment_min``/``_max`` and each run's figures under ``runs``; the other
figures are the median run's. One run a cell could not tell micro at x8 from the baseline
(the same cell gave 0.905, 0.778 and 0.873), hence the medians.

``sweep`` runs every system at every rate scale, then measures bursts, and reports per
workload: the rate ratio (the highest rate scale each system sustains at >= 90% attainment,
micro / best baseline), the burst ratios (on a base load every system sustains, a 10-second
spike of k x the base rate: the largest k each absorbs at >= 90%, micro / best baseline; the
spike's extra requests in the mix's proportions, ``burst_ratio``, all for the most popular
workflow, ``burst_ratio_hot``, or all for the least popular one, ``burst_ratio_cold``),
micro's sustained rate as a fraction of the capacity bound, a table and a PNG plot. Every cell
takes the median of ``repeat`` runs (default 3). With ``admission="both"`` micro runs twice,
with our admission rule (``micro``) and the paper's (``micro-paper``, the ``admission_rule``
setting); the ratios are micro's, micro-paper's stand beside them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
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
from emulation.bound import bound
from emulation.systems import SYSTEMS, emulated_settings
from emulation.traces import Arrival, duration_s, load_trace, spike, trace_for_scale
from emulation.workloads import Workload, load_workload
from lego.burst import Outcome, submit

#: rate scales of the sweep per workload (the shipped traces are 0.5, 1, 2 and 4; others are
#: scaled): finer around each one's capacity bound, so sustained rates are told apart there,
#: with one scale at about 86% of it (Flux-3: 4.5 of 5.22; Mix-12: 1.1 of 1.28), past the 85%
#: a system should sustain
RATE_SCALES = {"flux3": (0.5, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 6.0, 8.0),
               "mix12": (0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0)}
#: attainment a system must reach to "sustain" a load
SUSTAIN = 0.9
#: the burst experiment: a spike of k x the base rate for SPIKE_S seconds (trace time), at
#: SPIKE_AT_S into a BURST_WINDOW_S-second window of the base trace
SPIKE_S, SPIKE_AT_S, BURST_WINDOW_S = 10.0, 20.0, 60.0
BURST_FACTORS = (2, 4, 8, 16, 32, 64)
#: the sweep's spikes: the key's suffix in the results -> which workflow the extra requests
#: are ("all": the mix's own proportions; "hot"/"cold": the most/least popular workflow)
BURST_KINDS = {"": "all", "_hot": "hot", "_cold": "cold"}
#: micro's admission rules (the ``admission_rule`` setting) and the system label of each
ADMISSION_LABELS = {"lego": "micro", "paper": "micro-paper"}
#: a run's finished requests' latencies (trace seconds), kept for its cell's percentiles
LATENCIES = "latencies_s"
#: what each run of a repeated cell keeps under ``runs``
RUN_KEYS = ("seed", "slo_attainment", "bound_attainment", "p50_s", "p99_s", "goodput_rps",
            "rejected", "dropped_late", "failed_other", "lost", "lost_why", "eta_error_p50",
            "eta_error_p90", "wall_s", "by_workflow")
#: why a request counts as lost when the load generator has no error for it
NO_FINAL_STATE = "no final state by the end of the replay's wait"
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
        **latency_percentiles(latencies),
        LATENCIES: sorted(round(x, 4) for x in latencies),
        "goodput_rps": round(len(met) / max(span_s, 1e-9), 4),
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "dropped_late": sum(o.error == "deadline_exceeded" for o in outcomes),
        "failed_other": sum(o.status == "failed" and o.error != "deadline_exceeded"
                            for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "lost_why": dict(collections.Counter(
            o.error or NO_FINAL_STATE for o in outcomes if o.status == "lost")),
        **eta_errors(outcomes),
        "by_workflow": {
            w: round(sum(o in met for o in group) / len(group), 4)
            for w, group in sorted(by_workflow.items())
        },
    }


def latency_percentiles(latencies: list[float]) -> dict[str, float | None]:
    """``p50_s`` and ``p99_s`` of ``latencies`` (None where there are none)."""
    p99_s = percentile(latencies, 99)
    return {"p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": None if p99_s is None else round(p99_s, 3)}


def eta_errors(outcomes: list[Outcome]) -> dict[str, Any]:
    """How far the ETA a request got on acceptance (``eta_s``) was from when it finished, over
    the requests that succeeded: |actual - predicted| / actual, median and p90, and the median
    of (actual - predicted) / actual (above 0: they finished later than predicted)."""
    pairs = [(o.served_s, o.eta_s) for o in outcomes
             if o.status == "succeeded" and o.served_s and o.eta_s is not None]
    signed = [(actual - eta) / actual for actual, eta in pairs]
    errors = [abs(x) for x in signed]
    p90 = percentile(errors, 90)
    return {
        "eta_measured": len(pairs),
        "eta_error_p50": round(statistics.median(errors), 4) if errors else None,
        "eta_error_p90": None if p90 is None else round(p90, 4),
        "eta_late_p50": round(statistics.median(signed), 4) if signed else None,
    }


def run_slo(base: Settings, run: SloRun, *, seed: int = 0) -> dict[str, Any]:
    """One system on one trace, on a fresh stack (its own NATS, store and autoscaler)."""
    workload = load_workload(run.workload, base.profile_dir, run.time_scale)
    limit = bound(workload, run.arrivals, run.devices, slo_factor=base.slo_factor, seed=seed)
    requests = list(zip((a.at_s for a in run.arrivals),
                        workload.assign(run.arrivals, seed=seed), strict=True))
    deadline_s = {name: base.slo_factor * workload.solo_s(name) for name in workload.workflows}
    outcomes, wall_s = replay_on_stack(base, run, requests, max(deadline_s.values()))
    span_s = max(duration_s(run.arrivals), 1e-9)
    result = {"system": run.system, **summarize(outcomes, deadline_s, run.time_scale, span_s)}
    result["bound_attainment"] = limit["slo_attainment"]
    if getattr(base, "admission_rule", None) is not None:  # a setting newer than this code
        result["admission_rule"] = base.admission_rule
    result.update({
        "workload": run.workload, "devices": run.devices, "time_scale": run.time_scale,
        "trace_s": round(span_s, 3), "wall_s": round(wall_s, 3),
        "capacity_rps": round(workload.capacity_rps(run.devices, run.arrivals), 4),
        "offered_rps": round(len(run.arrivals) / span_s, 4),
    })
    return result


def replay_on_stack(base: Settings, run: SloRun, requests: Sequence[tuple[float, str]],
                    deadline_s: float) -> tuple[list[Outcome], float]:
    """Send ``requests`` ((trace time, workflow)) to a fresh stack of ``run``'s system,
    workload, devices and time scale (its own NATS, store and autoscaler); their outcomes and
    the wall seconds the replay took. ``deadline_s``: the longest deadline, in wall seconds."""
    from lego.stack import Stack, free_port

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
            stack.wait_settled()  # the copies placed beyond each pool's first, loaded too
            # every request ends by then: dropped at its deadline, or by a replica started
            # for it (a pool at zero waits out another's scale-down delay, then a cold start)
            wait_s = 4 * deadline_s + settings.scale_down_delay_s + 10.0
            started = time.perf_counter()
            outcomes = run_async(replay(stack.gateway_url, requests, run.time_scale, wait_s))
            return outcomes, time.perf_counter() - started
        finally:
            stack.stop(timeout_s=30)
            shutil.rmtree(settings.shm_root, ignore_errors=True)


def repeat_slo(base: Settings, make_run: Callable[[int], SloRun], repeat: int = 1, *,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``repeat`` runs of one cell, run i with seed i (``make_run(i)`` builds its arrivals,
    ``run_slo`` assigns their workflows with it), each on a fresh stack. The result is the
    median run's figures (the lower middle one by attainment), with ``slo_attainment`` and
    ``bound_attainment`` the medians over the runs, ``slo_attainment_min``/``_max``, and
    ``runs``. With ``log``, a stack that fails to start (a transient on a loaded host) gets
    one more try rather than ending an hour-long sweep."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    runs = []
    for seed in range(repeat):
        run = make_run(seed)
        try:
            result = run_slo(base, run, seed=seed)
        except RuntimeError as exc:
            if log is None:
                raise
            log(f"  {run.workload} {run.system} seed {seed}: {exc}; trying once more")
            result = run_slo(base, run, seed=seed)
        runs.append({"seed": seed, **result})
    return combine_runs(runs)


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's figures from its runs (see ``repeat_slo``); pure. Where the runs kept their
    requests' latencies, the cell's ``p50_s`` and ``p99_s`` are over all of them: a light
    load's run has a few dozen requests, so its own p99 is its slowest one or two."""
    ranked = sorted(runs, key=lambda r: (r["slo_attainment"] is None, r["slo_attainment"] or 0))
    middle = ranked[(len(ranked) - 1) // 2]
    attained = [r["slo_attainment"] for r in runs if r["slo_attainment"] is not None]
    bounds = [r["bound_attainment"] for r in runs if r.get("bound_attainment") is not None]
    pooled = (latency_percentiles([x for r in runs for x in r[LATENCIES]])
              if all(LATENCIES in r for r in runs) else {})
    return {
        **{k: v for k, v in middle.items() if k not in ("seed", LATENCIES)},
        **pooled,
        "slo_attainment": round(statistics.median(attained), 4) if attained else None,
        "slo_attainment_min": min(attained, default=None),
        "slo_attainment_max": max(attained, default=None),
        "bound_attainment": round(statistics.median(bounds), 4) if bounds else None,
        "repeat": len(runs),
        "median_seed": middle["seed"],
        "runs": [{k: r[k] for k in RUN_KEYS if k in r} for r in runs],
    }


def print_slo(result: dict[str, Any]) -> None:
    r = result
    print(f"{r['system']} on {r['workload']} ({r['devices']} emulated devices, time scale "
          f"{r['time_scale']:g}): {r['requests']} requests over {r['trace_s']:.0f} s, offered "
          f"{r['offered_rps']:.2f}/s (capacity bound {r['capacity_rps']:.2f}/s)")
    print(f"  SLO attainment {_f(r['slo_attainment'], 3)}{_spread(r)}   bound "
          f"{_f(r.get('bound_attainment'), 3)}   p50 {_f(r['p50_s'])} s   p99 "
          f"{_f(r['p99_s'])} s   goodput {r['goodput_rps']:.3f}/s")
    print(f"  rejected {r['rejected']}   dropped late {r['dropped_late']}   other failures "
          f"{r['failed_other']}   lost {r['lost']}")
    for why, n in (r.get("lost_why") or {}).items():
        print(f"    lost {n}: {why}")
    if r.get("eta_measured"):
        print(f"  ETA error |actual - eta_s| / actual over {r['eta_measured']} finished: median "
              f"{_f(r['eta_error_p50'], 3)}, p90 {_f(r['eta_error_p90'], 3)}; median "
              f"(actual - eta_s) / actual {_f(r['eta_late_p50'], 3)}")
    print("  by workflow: " + ", ".join(f"{w} {a:.2f}" for w, a in r["by_workflow"].items()))


def print_eta(result: dict[str, Any]) -> None:
    """`lego bench eta`: the ETA's error on one replay, beside what the run was."""
    r = result
    print(f"{r['system']} on {r['workload']}, {r['requests']} requests over {r['trace_s']:.0f} "
          f"s (offered {r['offered_rps']:.2f}/s, time scale {r['time_scale']:g}): SLO "
          f"attainment {_f(r['slo_attainment'], 3)}, p50 {_f(r['p50_s'])} s")
    print(f"ETA error |actual - eta_s| / actual over the {r['eta_measured']} that finished:")
    print(f"  median {_f(r['eta_error_p50'], 3)}   p90 {_f(r['eta_error_p90'], 3)}   "
          f"median (actual - eta_s) / actual {_f(r['eta_late_p50'], 3)} (> 0: later than "
          "predicted)")


# --- the sweep -----------------------------------------------------------------------------

def sustained(rows: list[dict], system: str, key: str = "slo_attainment") -> float:
    """The highest rate scale at which ``system`` held >= 90% attainment (below which it held
    at every scale measured); 0 if none. ``key="bound_attainment"``: the idealised cluster's."""
    best = 0.0
    for row in sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate_scale"]):
        if (row.get(key) or 0) < SUSTAIN:
            break
        best = row["rate_scale"]
    return best


def ratio(micro: float, baselines: list[float]) -> float | None:
    """micro / the best baseline; None when no baseline held even the lowest load measured
    (the ratio is then unbounded by this sweep: the rows say how far micro went)."""
    best = max(baselines, default=0.0)
    return None if best <= 0 else round(micro / best, 3)


def burst_arrivals(base_scale: float, factor: float, *, workflow: str | None = None,
                   seed: int = 0) -> list[Arrival]:
    """The sweep's burst cell: the first BURST_WINDOW_S of the trace at ``base_scale`` with a
    spike of ``factor`` (its extra requests all ``workflow`` when given)."""
    return burst_of(trace_for_scale(base_scale), factor, workflow=workflow, seed=seed)


def burst_of(arrivals: Sequence[Arrival], factor: float, *, workflow: str | None = None,
             seed: int = 0) -> list[Arrival]:
    window = [a for a in arrivals if a.at_s < BURST_WINDOW_S]
    return spike(window, at_s=SPIKE_AT_S, length_s=SPIKE_S, factor=factor, seed=seed,
                 tenant=workflow)


def burst_workflow(workload: Workload, kind: str | None) -> str | None:
    """The workflow a spike's extra requests name: None for "all" (the mix's proportions),
    the most or least popular one for "hot"/"cold", else ``kind`` itself if a workflow."""
    if kind in (None, "all"):
        return None
    if kind in ("hot", "cold"):
        return workload.popularity[0 if kind == "hot" else -1]
    if kind not in workload.workflows:
        raise ValueError(f"burst workflow: {workload.name} has no {kind!r}; it has hot, cold, "
                         f"all, {', '.join(workload.popularity)}")
    return kind


def slo_arrivals(trace: str | None, rate_scale: float | None, *,
                 burst_factor: float | None = None, burst_workflow: str | None = None,
                 seed: int = 0) -> list[Arrival]:
    """``lego bench slo``'s arrivals: the trace (or the shipped one at ``rate_scale``), or with
    ``burst_factor`` the sweep's burst cell made from it."""
    arrivals = trace_arrivals(trace, rate_scale)
    if burst_factor is None:
        if burst_workflow:
            raise ValueError("--burst-workflow goes with --burst-factor")
        return arrivals
    return burst_of(arrivals, burst_factor, workflow=burst_workflow, seed=seed)


def with_admission_rule(base: Settings, rule: str) -> Settings:
    """``base`` with micro's admission rule set. Settings without the ``admission_rule``
    field (before the paper's rule exists) run today's rule, and refuse "paper"."""
    if "admission_rule" in Settings.model_fields:
        return base.model_copy(update={"admission_rule": rule})
    if rule != "lego":
        raise ValueError(f"admission rule {rule!r}: this tree's Settings has no admission_rule "
                         "(only today's rule, lego)")
    return base


def sweep_entrants(base: Settings, workload: str, admission: str = "lego",
                   systems: Sequence[str] | None = None) -> dict[str, tuple[str, Settings]]:
    """The sweep's columns: system label -> (system, settings). Micro once per admission
    rule asked for (``lego``, ``paper`` or ``both``), then the baselines (``systems``: only
    those of them)."""
    unknown = sorted(set(systems or ()) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    rules = ("lego", "paper") if admission == "both" else (admission,)
    entrants = {ADMISSION_LABELS[r]: ("micro", with_admission_rule(base, r)) for r in rules}
    entrants.update({s: (s, base) for s in systems_for(workload)
                     if s != "micro" and (systems is None or s in systems)})
    return entrants


def _cell(entrants: dict[str, tuple[str, Settings]], label: str, workload: str,
          arrivals_for: Callable[..., list[Arrival]], *, devices: int, time_scale: float,
          repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    """One cell of the sweep, ``repeat`` runs (``arrivals_for(seed=i)``: run i's arrivals),
    labelled with its column."""
    system, settings = entrants[label]
    result = repeat_slo(
        settings,
        lambda seed: SloRun(system, workload, arrivals_for(seed=seed), devices, time_scale),
        repeat, log=log)
    result["system"] = label
    return result


def at_scale(scale: float, *, seed: int) -> list[Arrival]:
    return trace_for_scale(scale)  # the shipped traces' order: the seed bears on Mix-12 only


def _bound_absorbed(loaded: Workload, base_scale: float, workflow: str | None, devices: int,
                    slo_factor: float, repeat: int) -> float:
    """The largest spike factor the idealised cluster absorbs (median over the seeds)."""
    absorbed = 1.0
    for factor in BURST_FACTORS:
        attained = [bound(loaded, burst_arrivals(base_scale, factor, workflow=workflow,
                                                 seed=seed), devices, slo_factor=slo_factor,
                          seed=seed)["slo_attainment"] or 0 for seed in range(repeat)]
        if statistics.median(attained) < SUSTAIN:
            break
        absorbed = factor
    return absorbed


def sweep_workload(
    base: Settings, workload: str, *, devices: int, time_scale: float,
    scales: Sequence[float] | None = None, bursts: bool = True, repeat: int = 3,
    admission: str = "lego", systems: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every system at every rate scale (default: the workload's), then the burst experiment
    on the highest base every system sustains (the lowest scale if one sustains none): a spike
    on the whole mix, on the most popular workflow, on the least popular one. Every cell is
    the median of ``repeat`` runs."""
    scales = scales or RATE_SCALES[workload]
    entrants = sweep_entrants(base, workload, admission, systems)
    micros = [label for label in ADMISSION_LABELS.values() if label in entrants]
    lead = micros[0]  # micro with our rule when it ran
    baselines = [label for label in entrants if label not in micros]
    cell = functools.partial(_cell, entrants, workload=workload, devices=devices,
                             time_scale=time_scale, repeat=repeat, log=log)
    rows: list[dict] = []
    for label in entrants:
        for scale in scales:
            rows.append({"rate_scale": scale,
                         **cell(label, arrivals_for=functools.partial(at_scale, scale))})
            log(_row_line(rows[-1]))
    rate = {s: sustained(rows, s) for s in entrants}
    loaded: Workload = load_workload(workload, base.profile_dir)
    at_1 = trace_for_scale(1.0)
    capacity = loaded.capacity_rps(devices, at_1)
    rps_at_1 = len(at_1) / duration_s(at_1)
    figures = {label: {"rate_ratio": ratio(rate[label], [rate[s] for s in baselines]),
                       "capacity_fraction": round(rate[label] * rps_at_1 / capacity, 3)}
               for label in micros}
    out: dict[str, Any] = {
        **figures[lead],
        "ratio_system": lead,
        "sustained_rate_scale": rate,
        "bound_sustained_rate_scale": sustained(rows, lead, "bound_attainment"),
        "capacity_rps": round(capacity, 4),
        "capacity_rate_scale": round(capacity / rps_at_1, 3),
        "rate_scales": list(scales),
        "repeat": repeat,
        "rows": rows,
    }
    if bursts:
        # the base every compared system sustains; a second micro rule does not move it
        everyone = min(rate[s] for s in [lead, *baselines])
        base_scale = everyone if everyone > 0 else min(scales)
        burst_rows = []
        for suffix, kind in BURST_KINDS.items():
            workflow = burst_workflow(loaded, kind)
            absorbed: dict[str, float] = {}
            for label in entrants:
                absorbed[label] = 1.0
                for factor in BURST_FACTORS:
                    result = cell(label, arrivals_for=functools.partial(
                        burst_arrivals, base_scale, factor, workflow=workflow))
                    burst_rows.append({"burst": kind, "burst_workflow": workflow,
                                       "base_rate_scale": base_scale, "factor": factor,
                                       **result})
                    log(f"  burst {kind} x{factor:<3g} " + _row_line(burst_rows[-1]))
                    if (result["slo_attainment"] or 0) < SUSTAIN:
                        break
                    absorbed[label] = factor
            for label in micros:
                figures[label][f"burst_ratio{suffix}"] = ratio(
                    absorbed[label], [absorbed[s] for s in baselines])
            out.update({
                f"burst_ratio{suffix}": figures[lead][f"burst_ratio{suffix}"],
                f"burst_absorbed_factor{suffix}": absorbed,
                f"burst_bound_factor{suffix}": _bound_absorbed(
                    loaded, base_scale, workflow, devices, base.slo_factor, repeat),
            })
        out.update({
            "burst_base_rate_scale": base_scale,
            "burst_workflows": {kind: burst_workflow(loaded, kind) for kind in ("hot", "cold")},
            "burst_rows": burst_rows,
        })
    for label in micros[1:]:  # the other rule's figures beside ours
        out[label] = figures[label]
    return out


def plot(workload: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for system in _labels(result["rows"]):
        rows = _by_scale(result["rows"], system)
        ax.plot([r["rate_scale"] for r in rows], [r["slo_attainment"] for r in rows],
                marker="o", label=system, linewidth=2.2 if system == "micro" else 1.3)
    bounded = [r for r in _by_scale(result["rows"], result.get("ratio_system", "micro"))
               if r.get("bound_attainment") is not None]
    if bounded:
        ax.plot([r["rate_scale"] for r in bounded], [r["bound_attainment"] for r in bounded],
                color="black", linestyle="--", linewidth=1.0, label="bound (idealised)")
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


def _labels(rows: list[dict]) -> list[str]:
    """The systems of ``rows`` in the order they ran (micro, micro-paper, the baselines)."""
    return list(dict.fromkeys(r["system"] for r in rows))


def _by_scale(rows: list[dict], system: str) -> list[dict]:
    return sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate_scale"])


def print_sweep(results: dict[str, Any]) -> None:
    for workload, r in results["workloads"].items():
        print(f"\n{workload}: capacity bound {r['capacity_rps']:.2f} req/s (rate scale "
              f"{r['capacity_rate_scale']:.2f}); median of {r.get('repeat', 1)} run(s) a cell, "
              "lowest-highest beside it")
        systems = _labels(r["rows"])
        print(f"{'rate scale':>10} " + " ".join(f"{s:>16}" for s in systems) + f"{'bound':>8}")
        for scale in sorted({row["rate_scale"] for row in r["rows"]}):
            at = [next(x for x in r["rows"] if x["system"] == s and x["rate_scale"] == scale)
                  for s in systems]
            print(f"{scale:>10g} " + " ".join(f"{_cell_text(row):>16}" for row in at)
                  + f"{_f(at[0].get('bound_attainment'), 2):>8}")
        print("sustained (>= 90%): " + ", ".join(
            f"{s} {v:g}" for s, v in r["sustained_rate_scale"].items())
            + f"; bound {r.get('bound_sustained_rate_scale', '-')}")
        lead = r.get("ratio_system", "micro")
        print(f"rate ratio ({lead} / best baseline): {r['rate_ratio']}")
        print(f"capacity fraction ({lead} sustained / bound): {r['capacity_fraction']}")
        for suffix, kind in BURST_KINDS.items():
            if f"burst_ratio{suffix}" not in r:
                continue
            workflow = (r.get("burst_workflows") or {}).get(kind) or "every workflow"
            print(f"burst {kind} ({workflow}; base rate scale {r['burst_base_rate_scale']:g}, "
                  f"{SPIKE_S:g} s spike): " + ", ".join(
                      f"{s} x{v:g}" for s, v in r[f"burst_absorbed_factor{suffix}"].items())
                  + f"; bound x{r.get(f'burst_bound_factor{suffix}', '-')}")
            print(f"burst ratio {kind} ({lead} / best baseline): {r[f'burst_ratio{suffix}']}")
        for label in ADMISSION_LABELS.values():
            if label in r:
                print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in r[label].items()))
        if r.get("plot"):
            print(f"plot: {r['plot']}")


def _row_line(row: dict[str, Any]) -> str:
    return (f"{row['workload']} {row['system']:<14} scale {row.get('rate_scale', '-')!s:>4} "
            f"SLO {_f(row['slo_attainment'], 3)}{_spread(row)} bound "
            f"{_f(row.get('bound_attainment'), 3)} p50 {_f(row['p50_s'])} p99 "
            f"{_f(row['p99_s'])} rejected {row['rejected']} late {row['dropped_late']} lost "
            f"{row['lost']} ({row['wall_s']:.0f} s)")


def _spread(row: dict[str, Any]) -> str:
    """`` (lowest-highest of N)`` for a repeated cell, else nothing."""
    if row.get("repeat", 1) < 2 or row.get("slo_attainment_min") is None:
        return ""
    return (f" ({row['slo_attainment_min']:.3f}-{row['slo_attainment_max']:.3f} of "
            f"{row['repeat']})")


def _cell_text(row: dict[str, Any]) -> str:
    text = _f(row["slo_attainment"], 2)
    if row.get("repeat", 1) > 1 and row.get("slo_attainment_min") is not None:
        text += f" {row['slo_attainment_min']:.2f}-{row['slo_attainment_max']:.2f}"
    return text


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def trace_arrivals(trace: str | None, rate_scale: float | None) -> list[Arrival]:
    if trace:
        return load_trace(trace)
    return trace_for_scale(rate_scale or 1.0)
