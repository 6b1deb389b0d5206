"""The `lego` command line.

    lego up                      the whole stack on this machine (embedded NATS, tiny models)
    lego up --monolithic         the same, each workflow served as one monolithic node type
    lego generate "a red fox"    one image, against a running stack or an embedded one
    lego node KIND --model M     one replica of one model pool
    lego host --device D         a device host: serves the pools the autoscaler makes resident
    lego autoscaler              the autoscaler alone (`lego up` runs one)
    lego gateway                 the REST gateway (with an ingress consumer)
    lego ingress                 an ingress consumer alone (NATS-only deployments)
    lego status [--json|--watch] per pool: replicas by state, lag, rates, latency, placement
    lego history [--workflow W]  the requests kept, newest first (--status, --limit, --json)
    lego schema                  JSON Schemas of the request and the result
    lego bench hop|e2e|burst     benchmarks
    lego bench slo|sweep|bound   the emulated GPU cluster's experiment, and its physical limit
    lego bench parallel          CFG and ControlNet parallelism, emulated: solo latency, load
    lego bench eta               the error of the ETA a request gets, on an emulated replay
    lego bench chaos             faults (replica, NATS, store, cluster member) and overload
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

from common.settings import Settings, load_settings

if TYPE_CHECKING:
    from lego.stack import Stack


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    return load_settings(
        getattr(args, "config", None),
        base_model=_model_spec(getattr(args, "model", None)),
        **extra,
    )


def _model_spec(model: str | None) -> str | None:
    if model is None or model.startswith("builtin:"):
        return model
    return str(Path(model).expanduser().resolve())


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise


def cmd_up(args: argparse.Namespace) -> int:
    from lego.stack import Stack, StopRequested, hosted

    settings = _settings(args, monolithic=args.monolithic or None,
                         autoscale=False if args.no_autoscale else None)
    if args.emulate:
        from emulation.systems import emulated_settings

        settings = emulated_settings(
            settings, system=args.system, workload=args.workload, devices=args.devices,
            profile_dir=args.profile, time_scale=args.time_scale,
        )
    elif args.system or args.workload or args.profile or args.time_scale or args.devices:
        raise SystemExit("--system, --workload, --devices, --profile and --time-scale go with "
                         "--emulate")
    else:
        settings = hosted(settings)
    _logging(settings)
    stack = Stack(settings, port=args.port)

    def request_stop(*_: object) -> None:
        stack.interrupt()  # a second signal while stopping: kill what has not drained yet

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        _start_showing(stack, "starting the stack")
        _print_stack(stack, args)
        stack.supervise()
    except StopRequested:
        pass  # start() has stopped what it started
    finally:
        print("stopping...", flush=True)
        stack.stop()  # again after a failed or interrupted start: it ends what start missed
    return 0


def _start_showing(stack: Stack, what: str) -> None:
    """``stack.start()``, with a status line on stderr saying what it waits for (on a
    terminal; elsewhere ``what`` once)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        print(f"{what}...", file=sys.stderr, flush=True)
        stack.start()
        return
    with console.status(what) as status:
        stack.progress = lambda step: status.update(f"{what}: {step}")
        try:
            stack.start()
        finally:
            stack.progress = None


def _print_stack(stack: Stack, args: argparse.Namespace) -> None:
    settings = stack.settings
    print(f"gateway  {stack.gateway_url}  (OpenAPI: {stack.gateway_url}/docs)")
    print(f"nats     {stack.settings.nats_url}")
    print(f"store    {stack.settings.store_kind}")
    print(f"serving  {'monolithic' if settings.monolithic else 'micro'}, "
          f"{'autoscaled' if settings.autoscale else 'one replica per pool'}")
    if settings.autoscale and settings.device_hosts and not settings.workload:
        from autoscaler.backends.hosts import host_devices

        print(f"hosts    {', '.join(host_devices(settings))} (one process each, holding the "
              "models the autoscaler makes resident there)")
    if settings.workload:
        from common.workflow import shipped_workflows
        from emulation.profiles import DEFAULT_PROFILE_DIR

        # no profile_dir (a workload set without --emulate): the plug-in's default profiles
        profile_dir = settings.profile_dir or DEFAULT_PROFILE_DIR
        print(f"emulated {settings.workload} on {len(settings.devices)} devices "
              f"({profile_dir.name}, {args.system or 'micro'}, time scale "
              f"{settings.time_scale:g}): {', '.join(sorted(shipped_workflows(settings)))}")
    _print_unserved(stack)
    print(f"logs     {stack.settings.run_dir / 'logs'}")
    print(f"ready; Ctrl-C stops within {settings.stop_timeout_s:g} s (nodes finish what they "
          "hold first; a second Ctrl-C does not wait)", flush=True)


def _print_unserved(stack: Stack, file: TextIO | None = None) -> None:
    """What the stack does not serve, and why: workflows its model cannot serve, pools that
    cannot start (tried again with a back-off)."""
    for name, why in stack.left_out.items():
        print(f"not offered  {name}: {why}", file=file)
    for pool, error in stack.failed_pools.items():
        print(f"cannot start {pool} (tried again with a back-off; "
              f"{', '.join(stack.workflows_using(pool))} answer 503 meanwhile): {error}",
              file=file)


def cmd_node(args: argparse.Namespace) -> int:
    from services.node import run_node

    settings = load_settings(args.config)
    _logging(settings)
    # a monolithic node serves a workflow: --model names it, it is not a model directory
    model = args.model if args.kind == "monolithic" else _model_spec(args.model)
    run_node(args.kind, model or settings.base_model, settings, args.max_batch)
    _exit_now(0)


def cmd_host(args: argparse.Namespace) -> int:
    from services.hostproc import run_host

    settings = load_settings(args.config)
    _logging(settings)
    run_host(settings, args.device, args.name)
    _exit_now(0)


def _exit_now(code: int) -> NoReturn:
    """End a service process (a host, a node, the gateway, the autoscaler) once it has stopped
    cleanly (what it held is acked, its NATS connection closed), skipping the interpreter's own
    teardown: with torch, diffusers and transformers imported that takes over a second, for
    nothing. Spans and logs are flushed first."""
    from common import telemetry

    telemetry.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_autoscaler(args: argparse.Namespace) -> int:
    import asyncio

    from autoscaler.backends import auto_backend, build_backend
    from autoscaler.backends.hosts import HostsBackend, host_processes
    from autoscaler.service import Autoscaler
    from common.bus import run_async

    settings = load_settings(args.config, monolithic=args.monolithic or None)
    _logging(settings)
    name = auto_backend(settings) if args.backend == "auto" else args.backend
    try:
        backend = build_backend(name, settings, namespace=args.namespace)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if host_processes(settings, name):
        # `lego host` processes (lego up's, or the lego-hosts pods) hold the pools: the
        # autoscaler writes which pools each holds instead of starting replicas
        if name == "kubernetes" and not settings.devices:
            raise SystemExit("device_hosts with --backend kubernetes: set devices to the "
                             "lego-hosts pod names (deploy/kubernetes/hosts/hosts.yaml does)")
        backend = HostsBackend(settings)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Local replicas are this process's children: they drain with it. Kubernetes
        # Deployments outlive the autoscaler.
        await Autoscaler(settings, backend).run(stop, stop_replicas=name != "kubernetes")

    try:
        run_async(main())
    except Exception as exc:
        from kubernetes.config import ConfigException

        if isinstance(exc, ConfigException):  # no cluster to talk to: say so, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    _exit_now(0)


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.app import serve

    settings = load_settings(args.config, port=args.port)
    _logging(settings)
    serve(settings, seed_builtin=args.seed_builtin)
    _exit_now(0)


def cmd_ingress(args: argparse.Namespace) -> int:
    import asyncio

    from common.bus import run_async
    from gateway.app import Gateway

    settings = load_settings(args.config)
    _logging(settings)

    async def main() -> None:
        gw = Gateway(settings, None, run_ingress=True)
        await gw.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await gw.stop()

    run_async(main())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import base64

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lego.stack import Stack, hosted, running_stack

    _require_client()
    import legoclient

    settings = _settings(args)
    found = running_stack(settings) if args.gateway is None else None
    if args.workflow is None:
        from common.workflow import default_workflow

        # text to image on the running stack's model family, else on the configured one's
        served = settings.model_copy(update={"base_model": found["base_model"]}) \
            if found and not args.model and found.get("base_model") else settings
        args.workflow = default_workflow(served)
    params = {
        "prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed,
        "steps": args.steps, "width": args.width, "height": args.height,
        "guidance": args.guidance, "strength": args.strength,
        # without --format, -o's suffix names it; without either, the workflow's default
        "output_format": args.format or _format_of(args.output), "output_quality": args.quality,
    }
    if args.image:
        params["image"] = base64.b64encode(Path(args.image).read_bytes()).decode()
    stack = None
    gateway = args.gateway
    if gateway is None:
        if found and args.model and found.get("base_model") != settings.base_model:
            print(f"error: the running stack serves {found.get('base_model')}; stop it or omit "
                  "--model", file=sys.stderr)
            return 2
        if found:
            gateway = found["gateway_url"]
        else:
            from common.workflow import offered_workflows, other_family_workflows

            left_out = {**offered_workflows(settings)[1], **other_family_workflows(settings)}
            if args.workflow in left_out:
                print(f"error: {args.workflow} cannot run on {settings.base_model}: "
                      f"{left_out[args.workflow]}", file=sys.stderr)
                return 2
            import tempfile

            run_dir = Path(tempfile.mkdtemp(prefix="lego-generate-"))
            # as few processes as serve one request: one device host (per configured device;
            # this CPU's as one) holds every pool, beside the gateway and the autoscaler
            stack = Stack(hosted(settings, cpu_hosts=1).model_copy(update={"run_dir": run_dir}),
                          quiet=True)
            _start_showing(stack, "no running stack: starting an embedded one")
            _print_unserved(stack, file=sys.stderr)
            gateway = stack.gateway_url
    api_key = _api_key(settings)
    try:
        with legoclient.LegoClient(gateway, api_key=api_key) as client, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task("queued", total=None)

            def on_event(event: legoclient.Event) -> None:
                # the gateway's Server-Sent Events: a state, each node's steps, the final state
                step = event if isinstance(event, legoclient.Progress) else event.progress
                if step:
                    bar.update(task, description=step.node, completed=step.step,
                               total=step.total)
                elif isinstance(event, legoclient.Generation):  # a state with no step running
                    bar.update(task, description=event.status)

            try:
                state, data = client.generate(args.workflow, on_event=on_event, **params)
            except legoclient.LegoError as exc:
                print(f"error: {exc}", file=sys.stderr)
                if exc.body:
                    print(json.dumps(exc.body, indent=2), file=sys.stderr)
                return 1
        suffix = OUTPUT_SUFFIXES[state.params.get("output_format", "png")]
        output = Path(args.output or f"out.{suffix}")
        output.write_bytes(data)
        print(f"wrote {output} (id {state.id}, seed {state.seed}, "
              f"model time {state.model_ms:.0f} ms)")
        for warning in state.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    finally:
        if stack is not None:
            stack.stop()


#: `lego generate`'s file suffix per output format (and the formats an -o suffix implies)
OUTPUT_SUFFIXES = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def _format_of(output: str | None) -> str | None:
    """The output format an output file's suffix names (``fox.jpg``: jpeg), if any."""
    suffix = Path(output).suffix.lower().lstrip(".") if output else ""
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}.get(suffix)


def _require_client() -> None:
    """Exit saying how to install it when the client package (``clients/python``, which
    scripts/setup.sh installs) is missing; the caller imports it then (typed, unlike a module
    object handed back)."""
    try:
        import legoclient  # noqa: F401
    except ImportError:
        raise SystemExit("the client package is missing: pip install -e ./clients/python "
                         "(scripts/setup.sh installs it)") from None


def _api_key(settings: Settings) -> str | None:
    """The key `lego` commands send to the gateway: ``api_key``, else the first of ``api_keys``."""
    return settings.api_key or next(iter(settings.api_keys.values()), None)


def _stack_settings(args: argparse.Namespace) -> Settings:
    """Settings that reach the running stack: NATS_URL if set, else `lego up`'s stack file."""
    from lego.stack import running_stack

    settings = load_settings(args.config)
    if settings.nats_url:
        return settings
    found = running_stack(settings)
    if found is None:
        raise SystemExit("no running stack: start one with `lego up`, or set NATS_URL")
    return settings.model_copy(update={
        "nats_url": found["nats_url"], "redis_url": found.get("redis_url"),
    })


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from common.bus import connect, run_async
    from common.observe import ClusterObserver, cluster_json

    settings = _stack_settings(args)

    def table(views: dict) -> Table:
        t = Table(title="LegoDiffusion pools")
        for column in ("pool", "replicas", "ready", "start", "drain", "failed", "lag", "in/s",
                       "out/s", "shed/s", "p50 ms", "p99 ms", "batch", "cold s", "placement"):
            t.add_column(column, justify="left" if column in ("pool", "placement") else "right")
        errors = []
        for pool, view in views.items():
            j = view.to_json()
            t.add_row(pool, str(j["replicas"]), str(j["ready"]), str(j["starting"]),
                      str(j["draining"]), str(j["failed"]), str(j["lag"]),
                      _fmt(j["arrival_rate"]), _fmt(j["completion_rate"]), _fmt(j["shed_rate"]),
                      _fmt(j["p50_ms"]), _fmt(j["p99_ms"]), _fmt(j["mean_batch"]),
                      _fmt(j["startup_s"]), " ".join(f"{d}:{n}" for d, n in j["placement"].items()))
            if j["failed"]:
                errors.append(f"{pool} cannot load its model ({j['failures']} attempts in a row; "
                              f"the next in {_fmt(j['retry_in_s'])} s): {j['error']}")
        t.caption = "\n".join(errors) or None
        return t

    async def main() -> None:
        nc = await connect(settings, name="lego-status")
        observer = ClusterObserver(nc)
        await observer.start()
        await asyncio.sleep(1.2)  # a report from every replica (they report once a second)
        await observer.sample()
        await asyncio.sleep(1.0)  # rates need a second sample
        views = await observer.sample()
        if args.json:
            print(json.dumps(cluster_json(views, observer.live_statuses()), indent=2))
        elif not args.watch:
            Console().print(table(views))
        else:
            with Live(table(views), refresh_per_second=2) as live:
                while True:
                    await asyncio.sleep(1.0)
                    live.update(table(await observer.sample()))
        await observer.stop()
        await nc.close()

    try:
        run_async(main())
    except KeyboardInterrupt:
        pass
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def cmd_history(args: argparse.Namespace) -> int:
    import datetime

    from rich.console import Console
    from rich.table import Table

    from lego.stack import running_stack

    _require_client()
    import legoclient

    settings = _settings(args)
    gateway = args.gateway or (running_stack(settings) or {}).get("gateway_url")
    if gateway is None:
        print("error: no running stack: start one with `lego up`, or pass --gateway",
              file=sys.stderr)
        return 2
    api_key = _api_key(settings)
    with legoclient.LegoClient(gateway, api_key=api_key) as client:
        try:
            page = client.history(workflow=args.workflow, status=args.status,
                                  limit=args.limit, cursor=args.cursor)
        except legoclient.LegoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(page.raw, indent=2))
        return 0
    table = Table(title="LegoDiffusion requests, newest first")
    for column in ("id", "workflow", "status", "created", "took s", "error"):
        table.add_column(column, justify="right" if column == "took s" else "left")
    for state in page.items:
        created = datetime.datetime.fromtimestamp(state.created_at).isoformat(" ", "seconds")
        took = state.finished_at and state.finished_at - state.created_at
        table.add_row(state.id, state.workflow, state.status, created, _fmt(took),
                      state.error.message if state.error else "")
    Console().print(table)
    if page.next_cursor:
        print(f"more: lego history --cursor {page.next_cursor}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """The JSON Schemas a client needs: a generation request (one per workflow this stack's
    settings offer, as the OpenAPI document has them) and the result."""
    from common.messages import RequestState, json_schema
    from common.workflow import offered_workflows
    from gateway.openapi import generation_request

    settings = load_settings(args.config)
    requests = [generation_request(spec, settings)
                for spec in offered_workflows(settings)[0].values()]
    print(json.dumps({"request": {"oneOf": requests}, "result": json_schema(RequestState)},
                     indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lego import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lego", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="settings file (YAML/JSON); also LEGO_CONFIG")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole stack on this machine")
    up.add_argument("--port", type=int, help="gateway port (default 8000, or a free one)")
    up.add_argument("--model", help="diffusers SD 1.x/2.x, SDXL, SD3 or FLUX.1 directory (or "
                    "builtin:NAME) for the shipped workflows of its family")
    up.add_argument("--monolithic", action="store_true",
                    help="the baseline: every workflow as one node type (its models in one "
                         "process), scaled per workflow")
    up.add_argument("--no-autoscale", action="store_true",
                    help="one fixed replica per pool instead of the autoscaler")
    emu = up.add_argument_group("emulated GPU cluster (profile-driven executor)")
    emu.add_argument("--emulate", action="store_true",
                     help="run emulated GPUs: models wait their profiled times")
    emu.add_argument("--devices", type=int, help="emulated GPUs (default 8)")
    emu.add_argument("--profile", type=Path, help="profile directory (default data/profiles-h800)")
    emu.add_argument("--workload", choices=["flux3", "mix12"], help="default flux3")
    emu.add_argument("--system", choices=["micro", "static", "swap", "shepherd",
                                          "mono-autoscale"], help="default micro")
    emu.add_argument("--time-scale", type=float, help="run K times faster (default 1)")
    up.set_defaults(func=cmd_up)

    gen = sub.add_parser("generate", help="generate one image")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output",
                     help="the file (default: out.png, out.jpg or out.webp, as the format)")
    gen.add_argument("--format", choices=list(OUTPUT_SUFFIXES),
                     help="png, jpeg or webp (default: as -o's suffix names, else the "
                          "workflow's default, png)")
    gen.add_argument("--quality", type=int, help="JPEG/WebP quality, 1-100 (default 90)")
    gen.add_argument("--workflow", help="default: txt2img of the model's family "
                     "(sdxl-txt2img on an SDXL model)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--image", help="input image file (img2img)")
    gen.add_argument("--strength", type=float, help="img2img strength")
    gen.add_argument("--model", help="diffusers SD 1.x/2.x, SDXL, SD3 or FLUX.1 directory, or "
                     "builtin:NAME (embedded stack)")
    gen.add_argument("--gateway", help="gateway URL (default: the running stack, or embedded)")
    gen.set_defaults(func=cmd_generate)

    node = sub.add_parser("node", help="run one replica of a model pool")
    node.add_argument("kind")
    node.add_argument("--model", help="model spec or directory (default: the base model)")
    node.add_argument("--max-batch", type=int)
    node.set_defaults(func=cmd_node)

    host = sub.add_parser("host", help="run a device host: one step loop on DEVICE serving "
                          "every pool the autoscaler makes resident there (KV lego-residency)")
    host.add_argument("--device", required=True,
                      help="where its models load: cuda:N, or cpu:N (a share of this CPU)")
    host.add_argument("--name", help="its name, as the autoscaler's devices list it (default: "
                      "DEVICE); a pod name on Kubernetes")
    host.set_defaults(func=cmd_host)

    scaler = sub.add_parser("autoscaler", help="scale node replicas from queue lag")
    scaler.add_argument("--backend", default="auto",
                        help="local, kubernetes, or one a plug-in registers (emulated: lego up "
                             "--emulate); auto (default): the plug-in's where it claims the "
                             "settings, else local")
    scaler.add_argument("--namespace", default="legodiffusion", help="Kubernetes namespace")
    scaler.add_argument("--monolithic", action="store_true", help="scale monolithic pools")
    scaler.set_defaults(func=cmd_autoscaler)

    gw = sub.add_parser("gateway", help="run the REST gateway (and an ingress consumer)")
    gw.add_argument("--port", type=int)
    gw.add_argument("--seed-builtin", action="store_true", help="register the shipped workflows")
    gw.set_defaults(func=cmd_gateway)

    ing = sub.add_parser("ingress", help="run an ingress consumer without HTTP")
    ing.set_defaults(func=cmd_ingress)

    status = sub.add_parser("status", help="per pool: replicas, lag, rates, latency, batch")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh every second")
    status.set_defaults(func=cmd_status)

    hist = sub.add_parser("history", help="the requests kept, newest first")
    hist.add_argument("--workflow", help="only this workflow's")
    hist.add_argument("--status", help="only these: queued, running, succeeded, failed, "
                      "cancelled")
    hist.add_argument("--limit", type=int, help="how many (default 20, at most 100)")
    hist.add_argument("--cursor", help="the next page (as the previous one printed)")
    hist.add_argument("--gateway", help="gateway URL (default: the running stack's)")
    hist.add_argument("--json", action="store_true", help="the page as the API answers it")
    hist.set_defaults(func=cmd_history)

    schema = sub.add_parser("schema", help="print the JSON Schemas of request and result")
    schema.set_defaults(func=cmd_schema)

    bench = sub.add_parser("bench", help="benchmarks")
    bench.add_argument("which", choices=["hop", "e2e", "overhead", "burst", "slo", "sweep", "bound",
                                         "eta", "chaos", "parallel"])
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--iterations", type=int, default=None)
    burst = bench.add_argument_group("burst")
    burst.add_argument("--rate", type=float, help="steady requests/s (default 1)")
    burst.add_argument("--factor", type=float, help="burst rate / steady rate (default 8)")
    burst.add_argument("--steady-s", type=float, help="seconds before the burst (default 15)")
    burst.add_argument("--burst-s", type=float, help="seconds of burst (default 5)")
    burst.add_argument("--after-s", type=float, help="seconds after the burst (default 25)")
    burst.add_argument("--slots", type=int, help="replica slots for either system (default 4)")
    burst.add_argument("--scale-down-delay-s", type=float,
                       help="the autoscaler's stable window, and the pause before each burst "
                            "(default 30)")
    chaos = bench.add_argument_group("chaos")
    chaos.add_argument("--scenarios", help="comma-separated (default replica_kill,"
                                           "nats_restart,store_restart,overload,"
                                           "cluster_member_loss)")
    chaos.add_argument("--overload-factor", type=float,
                       help="overload: x the measured capacity (default 10)")
    chaos.add_argument("--overload-s", type=float, help="overload: seconds (default 30)")
    slo = bench.add_argument_group("slo, sweep, bound and eta (the emulated GPU cluster; eta: "
                                   "default --rate-scale 3 --time-scale 4)")
    slo.add_argument("--system", choices=["micro", "static", "swap", "shepherd",
                                          "mono-autoscale"], default="micro")
    slo.add_argument("--workload", choices=["flux3", "mix12"],
                     help="default flux3 (slo) or both (sweep)")
    slo.add_argument("--trace", help="trace file (TENANT INTERVAL per line); default: the "
                                     "shipped trace at --rate-scale")
    slo.add_argument("--rate-scale", type=float, help="with no --trace (default 1)")
    slo.add_argument("--devices", type=int, default=8, help="emulated GPUs (default 8)")
    slo.add_argument("--time-scale", type=float, help="run K times faster (slo: default 1; "
                                                      "sweep: default 4)")
    slo.add_argument("--scales", help="sweep: comma-separated rate scales (default "
                                      "flux3 0.5,1,2,3,4,4.5,5,6,8; mix12 0.25,0.5,0.75,1,"
                                      "1.1,1.25,1.5,2,3,4,8)")
    slo.add_argument("--no-bursts", action="store_true", help="sweep: skip the burst ratio")
    slo.add_argument("--systems", help="sweep: comma-separated baselines to compare micro with "
                                       "(default all of the workload's)")
    slo.add_argument("--repeat", type=int, help="runs of each cell, seeds 0..N-1; the median "
                                                "is reported (slo: default 1; sweep, parallel: "
                                                "3; parallel: also each workflow's solo "
                                                "requests); burst: bursts per system, their "
                                                "spread reported")
    slo.add_argument("--burst-factor", type=float,
                     help="slo, bound: the sweep's burst cell on this trace: its first 60 s "
                          "with a 10 s spike of K x its rate at 20 s")
    slo.add_argument("--burst-workflow",
                     help="slo, bound: the spike's extra requests are all this workflow "
                          "(a name, or hot/cold: the most/least popular); default: the mix")
    slo.add_argument("--admission", choices=["lego", "paper", "both"],
                     help="micro's admission rule (the admission_rule setting); sweep: both "
                          "runs micro with each, as micro and micro-paper (default lego)")
    slo.add_argument("--parallel", choices=["off", "auto", "always"],
                     help="slo, sweep: CFG parallelism of the workflows' denoiser steps (the "
                          "parallel setting; default off); parallel: the modes it compares "
                          "(default off,auto)")
    slo.add_argument("--solo-only", action="store_true",
                     help="parallel: the solo latencies only, not the rate scales' rows")
    slo.add_argument("--out", type=Path, default=Path("bench-results"),
                     help="sweep: where the plots and JSON go (default bench-results/)")
    bench.set_defaults(func=cmd_bench)
    return parser


def load_plugins(names: list[str]) -> None:
    """Import the plug-in modules ``names`` (the ``plugins`` setting): each registers its
    pieces through the seams (model schemes, footprints, backends, workflow sources)."""
    import importlib

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"plugins: cannot import {name!r}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    # transformers says at import that torchvision is missing (its PIL fallback is what we use)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    settings = load_settings(args.config)
    if settings.parent_pid is not None:  # started by `lego up` or the autoscaler
        from common import bus, lifetime

        lifetime.watch_parent(settings.parent_pid, can_drain=bus.connected,
                              drain_timeout_s=settings.drain_timeout_s)
    # before any command: the processes `lego up` starts get ``plugins`` in their environment
    load_plugins(settings.plugins)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
