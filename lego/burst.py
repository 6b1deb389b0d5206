"""`lego bench burst`: a steady load, then a sudden burst, on micro-serving and on the
monolithic baseline under the same budget of replica slots.

Each system runs as `lego up` would (gateway, autoscaler, node processes; admission control on)
with only the txt2img workflow registered, so the budget is spent on one workflow in both. The
monolithic baseline runs first: the workflow's solo latency is its median latency through that
stack at idle (a pipeline served alone, HTTP included), and every request of both systems gets
the deadline ``slo_factor`` x that. The load is open-loop: requests are sent on a fixed schedule
whatever the answers. Reported per system: seconds from the burst to the first scale-up
decision and to the new replicas being ready, SLO attainment before, during and after the
burst, and requests rejected (503 at the door), dropped late (deadline_exceeded) and lost (no
final state: must be 0).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common import bus, subjects
from common.messages import ReplicaStatus, ScaleEvent, decode
from common.metrics import percentile
from common.settings import Settings

REQUEST = {"prompt": "a sudden crowd", "steps": 8, "width": 64, "height": 64, "guidance": 7.5}
PHASES = ("steady", "burst", "after")


@dataclass
class BurstConfig:
    rate: float = 1.0  # steady requests/s
    factor: float = 8.0  # the burst's rate, as a multiple of ``rate``
    steady_s: float = 15.0
    burst_s: float = 5.0
    after_s: float = 25.0
    slots: int = 4
    slo_factor: float = 2.0
    scale_down_delay_s: float = 30.0
    repeat: int = 1  # bursts per system, each after the pools are back to their idle count


@dataclass
class Outcome:
    phase: str
    sent_at: float  # wall clock
    status: str = "lost"  # succeeded, failed, rejected, lost
    error: str | None = None
    latency_s: float | None = None  # as the client saw it (HTTP included)
    served_s: float | None = None  # from the gateway's acceptance to the end, as recorded
    timings: list[dict] = field(default_factory=list)  # per node: queue, run and I/O ms
    eta_s: float | None = None  # when the gateway said, on accepting it, it should finish


@dataclass
class Watch:
    """Scale events and, per pool, when each replica was first seen ready (wall clock)."""

    events: list[ScaleEvent] = field(default_factory=list)
    ready_at: dict[str, dict[str, float]] = field(default_factory=dict)  # pool -> replica -> t


def schedule(cfg: BurstConfig) -> list[tuple[float, str]]:
    """(offset seconds, phase) of every request: evenly spaced at each phase's rate."""
    plan: list[tuple[float, str]] = []
    start = 0.0
    for phase, duration, rate in (("steady", cfg.steady_s, cfg.rate),
                                  ("burst", cfg.burst_s, cfg.rate * cfg.factor),
                                  ("after", cfg.after_s, cfg.rate)):
        n = round(duration * rate)
        plan += [(start + i / rate, phase) for i in range(n)]
        start += duration
    return plan


async def submit(http: httpx.AsyncClient, outcome: Outcome, body: dict) -> None:
    """Send one generation and wait for its end; ``outcome`` records how it ended."""
    try:
        r = await http.post("/v1/generations", json=body)
        if r.status_code == 503:
            outcome.status, outcome.error = "rejected", r.json()["error"]["code"]
            return
        r.raise_for_status()
        accepted = r.json()
        request_id, outcome.eta_s = accepted["id"], accepted.get("eta_s")
        while True:
            state = (await http.get(f"/v1/generations/{request_id}?wait=30")).json()
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
        outcome.latency_s = time.time() - outcome.sent_at
        outcome.served_s = state["updated_at"] - state["created_at"]
        outcome.status = "succeeded" if state["status"] == "succeeded" else "failed"
        outcome.error = (state.get("error") or {}).get("code")
        outcome.timings = state.get("timings") or []
    except httpx.HTTPError as exc:  # counted as lost: no final state came back
        outcome.error = f"{type(exc).__name__}: {exc}"


async def _run_load(url: str, cfg: BurstConfig, deadline_s: float) -> tuple[float, list]:
    outcomes: list[Outcome] = []
    tasks = []
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.time()
        for seed, (offset, phase) in enumerate(schedule(cfg)):
            await asyncio.sleep(max(0.0, start + offset - time.time()))
            outcome = Outcome(phase, time.time())
            outcomes.append(outcome)
            body = {**REQUEST, "seed": seed, "deadline_s": deadline_s}
            tasks.append(asyncio.create_task(submit(http, outcome, body)))
        await asyncio.gather(*tasks)
    return start, outcomes


async def _follow(settings: Settings, watch: Watch, stop: asyncio.Event) -> None:
    nc = await bus.connect(settings, name="bench-burst")

    async def on_event(msg: Any) -> None:
        watch.events.append(decode(msg.data, ScaleEvent))

    async def on_status(msg: Any) -> None:
        status = decode(msg.data, ReplicaStatus)
        if status.state == "ready":
            watch.ready_at.setdefault(status.pool, {}).setdefault(status.replica, time.time())

    await nc.subscribe(subjects.AUTOSCALER_EVENTS, cb=on_event)
    await nc.subscribe(subjects.REPLICAS_WILDCARD, cb=on_status)
    await stop.wait()
    await bus.close(nc)


def summarize(outcomes: list[Outcome], watch: Watch, burst_at: float, deadline_s: float) -> dict:
    def attainment(phase: str | None) -> float | None:
        chosen = [o for o in outcomes if phase is None or o.phase == phase]
        if not chosen:
            return None
        met = [o for o in chosen if o.status == "succeeded" and o.latency_s is not None
               and o.latency_s <= deadline_s]
        return round(len(met) / len(chosen), 4)

    ups = [e for e in watch.events if e.after > e.before and e.at >= burst_at]
    decision_s = ready_s = None
    if ups:
        first = min(ups, key=lambda e: e.at)
        decision_s = first.at - burst_at
        # the pool reaches the decided count: the after-th replica ever seen ready since then
        times = sorted(t for t in watch.ready_at.get(first.pool, {}).values() if t >= first.at)
        needed = first.after - first.before
        if len(times) >= needed:
            ready_s = times[needed - 1] - burst_at
    # a succeeded outcome has its latency
    latencies = [o.latency_s for o in outcomes
                 if o.status == "succeeded" and o.latency_s is not None]
    p99_s = percentile(latencies, 99)
    return {
        "requests": len(outcomes),
        "scale_up_decision_s": None if decision_s is None else round(decision_s, 3),
        "scale_up_ready_s": None if ready_s is None else round(ready_s, 3),
        "scale_up_pool": ups[0].pool if ups else None,
        "slo_attainment": attainment(None),
        "slo_attainment_by_phase": {p: attainment(p) for p in PHASES},
        "rejected": sum(o.status == "rejected" for o in outcomes),
        "dropped_late": sum(o.error == "deadline_exceeded" for o in outcomes),
        "failed_other": sum(o.status == "failed" and o.error != "deadline_exceeded"
                            for o in outcomes),
        "lost": sum(o.status == "lost" for o in outcomes),
        "p50_s": None if not latencies else round(statistics.median(latencies), 3),
        "p99_s": None if p99_s is None else round(p99_s, 3),
        "scale_events": [
            {"at_s": round(e.at - burst_at, 3), "pool": e.pool, "before": e.before,
             "after": e.after}
            for e in watch.events
        ],
    }


def run_system(settings: Settings, cfg: BurstConfig, monolithic: bool,
               deadline_s: float | None, tmp: Path) -> tuple[list[dict], float]:
    """One system's runs (``cfg.repeat`` bursts on one stack), and the deadline used (measured
    here when ``deadline_s`` is None)."""
    from lego.stack import Stack, free_port

    name = "monolithic" if monolithic else "micro"
    s = settings.model_copy(update={
        "monolithic": monolithic, "autoscale": True, "slots": cfg.slots, "admission": True,
        "workflows": ["txt2img"], "scale_down_delay_s": cfg.scale_down_delay_s,
        "run_dir": tmp / name, "shm_root": Path("/dev/shm") / f"lego-burst-{uuid.uuid4().hex[:8]}",
    })
    stack = Stack(s, port=free_port())
    stack.start()
    try:
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            solo = []
            for seed in range(10):  # warm up, then the solo latency: one request at a time
                started = time.perf_counter()
                r = http.post("/v1/generations?wait=30", json={**REQUEST, "seed": seed,
                                                               "deadline_s": 600})
                assert r.json()["status"] == "succeeded", r.text
                solo.append(time.perf_counter() - started)
        if deadline_s is None:
            deadline_s = round(cfg.slo_factor * statistics.median(solo[3:]), 3)

        async def run() -> dict:
            watch, stop = Watch(), asyncio.Event()
            follower = asyncio.create_task(_follow(stack.settings, watch, stop))
            await asyncio.sleep(0.5)
            start, outcomes = await _run_load(stack.gateway_url, cfg, deadline_s)
            stop.set()
            await follower
            return summarize(outcomes, watch, start + cfg.steady_s, deadline_s)

        runs = []
        for _ in range(cfg.repeat):
            # the replicas the last load (the warm-up's, the last burst's) started are gone, and
            # the replicas' reports reached admission control
            time.sleep(cfg.scale_down_delay_s + 2.0)
            runs.append(bus.run_async(run()))
        return runs, deadline_s
    finally:
        stack.stop()
        shutil.rmtree(s.shm_root, ignore_errors=True)


def bench_burst(settings: Settings, cfg: BurstConfig) -> dict:
    from lego.bench import servers

    deadline_s: float | None = None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system, monolithic in (("monolithic", True), ("micro", False)):
            # a fresh NATS per system: no stream, consumer or measurement carries over
            with servers(settings.model_copy(update={"nats_url": None}),
                         Path(tmp) / f"{system}-servers", False) as s:
                runs, deadline_s = run_system(s, cfg, monolithic, deadline_s, Path(tmp))
                results[system] = runs[0] if cfg.repeat == 1 else over_runs(runs)
    assert deadline_s is not None  # the first system's run measured it
    results["config"] = {
        "solo_s": round(deadline_s / cfg.slo_factor, 4), "deadline_s": deadline_s,
        "rate": cfg.rate,
        "burst_rate": cfg.rate * cfg.factor, "steady_s": cfg.steady_s, "burst_s": cfg.burst_s,
        "after_s": cfg.after_s, "slots": cfg.slots, "request": REQUEST, "repeat": cfg.repeat,
    }
    return results


#: figures of a repeated run given as their distribution over the bursts
SPREAD = ("scale_up_decision_s", "scale_up_ready_s", "slo_attainment", "p50_s", "p99_s")


def over_runs(runs: list[dict]) -> dict:
    """A system's repeated bursts: ``SPREAD``'s figures as p50, p95 and max over the bursts
    (with how many bursts had one: a burst the replicas absorbed scales nothing), the counts
    summed, and every run."""
    result: dict[str, Any] = {}
    for name in SPREAD:
        values = [r[name] for r in runs if r[name] is not None]
        spread = (statistics.median(values), percentile(values, 95), max(values)) if values \
            else (None, None, None)
        result[name] = {key: None if v is None else round(v, 3)
                        for key, v in zip(("p50", "p95", "max"), spread, strict=True)}
        result[name]["runs"] = len(values)
    for name in ("requests", "rejected", "dropped_late", "failed_other", "lost"):
        result[name] = sum(r[name] for r in runs)
    result["runs"] = runs
    return result


def print_table(results: dict) -> None:
    c = results["config"]
    if c.get("repeat", 1) > 1:
        print_spread(results)
        return
    print(f"txt2img {c['request']['steps']} steps {c['request']['width']}px; monolithic solo "
          f"{c['solo_s'] * 1000:.0f} ms, deadline {c['deadline_s'] * 1000:.0f} ms; "
          f"{c['rate']}/s for {c['steady_s']:g}s, {c['burst_rate']}/s for {c['burst_s']:g}s, "
          f"{c['rate']}/s for {c['after_s']:g}s; {c['slots']} slots")
    print(f"{'system':<11} {'decide s':>8} {'ready s':>8} {'SLO':>6} {'steady':>6} {'burst':>6} "
          f"{'after':>6} {'rejected':>8} {'late':>5} {'lost':>4} {'p50 s':>6} {'p99 s':>6}")
    for system in ("micro", "monolithic"):
        r = results[system]
        ph = r["slo_attainment_by_phase"]
        print(f"{system:<11} {_f(r['scale_up_decision_s']):>8} {_f(r['scale_up_ready_s']):>8} "
              f"{_f(r['slo_attainment']):>6} {_f(ph['steady']):>6} {_f(ph['burst']):>6} "
              f"{_f(ph['after']):>6} {r['rejected']:>8} {r['dropped_late']:>5} {r['lost']:>4} "
              f"{_f(r['p50_s']):>6} {_f(r['p99_s']):>6}")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_spread(results: dict) -> None:
    c = results["config"]
    print(f"txt2img {c['request']['steps']} steps {c['request']['width']}px; deadline "
          f"{c['deadline_s'] * 1000:.0f} ms; {c['repeat']} bursts of {c['burst_rate']}/s for "
          f"{c['burst_s']:g}s after {c['rate']}/s for {c['steady_s']:g}s; {c['slots']} slots")
    print(f"{'system':<11} {'figure':<20} {'p50':>7} {'p95':>7} {'max':>7} {'bursts':>6}")
    for system in ("micro", "monolithic"):
        r = results[system]
        for name in SPREAD:
            d = r[name]
            print(f"{system:<11} {name:<20} {_f(d['p50']):>7} {_f(d['p95']):>7} "
                  f"{_f(d['max']):>7} {d['runs']:>6}")
        print(f"{system:<11} {'rejected/late/lost':<20} {r['rejected']}/{r['dropped_late']}/"
              f"{r['lost']} of {r['requests']}")
