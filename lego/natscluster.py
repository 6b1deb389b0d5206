"""A NATS cluster on loopback: ``size`` nats-server processes with JetStream, routed to each
other, for the cluster tests and `lego bench chaos`'s member-loss scenario (a deployment runs
its NATS cluster itself: deploy/)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from common.lifetime import child_options
from lego.stack import free_port, nats_server_binary


class NatsCluster:
    """``size`` nats-server processes with JetStream on loopback, routed to each other as the
    cluster ``lego`` (servers n1, n2, ...): ``url`` names them all, ``kill`` SIGKILLs one."""

    def __init__(self, tmp: Path, size: int = 3) -> None:
        self.tmp = tmp
        ports: set[int] = set()
        while len(ports) < 3 * size:  # client, route and monitoring port of each server
            ports.add(free_port())
        chosen = sorted(ports)
        self.names = [f"n{i + 1}" for i in range(size)]
        self.ports = dict(zip(self.names, chosen[:size], strict=True))
        self.route_ports = dict(zip(self.names, chosen[size:2 * size], strict=True))
        self.http_ports = dict(zip(self.names, chosen[2 * size:], strict=True))
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{self.ports[n]}" for n in self.names)

    def alive(self) -> list[str]:
        return [n for n in self.names if self.procs[n].poll() is None]

    def start(self, timeout_s: float = 30.0) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.route_ports.values())
        for name in self.names:
            store = self.tmp / name
            store.mkdir(parents=True, exist_ok=True)
            self.procs[name] = subprocess.Popen(
                [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.ports[name]),
                 "-m", str(self.http_ports[name]), "-n", name, "-js", "-sd", str(store),
                 "--cluster_name", "lego",
                 "--cluster", f"nats://127.0.0.1:{self.route_ports[name]}", "--routes", routes],
                stdout=subprocess.DEVNULL,
                stderr=open(self.tmp / f"{name}.log", "ab"),  # noqa: SIM115 - the child owns it
                **child_options(),
            )
        self.wait_ready(timeout_s)

    def jsz(self, name: str) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.http_ports[name]}/jsz", timeout=2).json()

    def server_of(self, connection: str) -> str | None:
        """The live server the client connection named ``connection`` is connected to."""
        for name in self.alive():
            connz = httpx.get(f"http://127.0.0.1:{self.http_ports[name]}/connz", timeout=2)
            if any(c.get("name") == connection for c in connz.json().get("connections") or []):
                return name
        return None

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every live server agrees on (None: none yet)."""
        leaders = set()
        for name in self.alive():
            try:
                leaders.add((self.jsz(name).get("meta_cluster") or {}).get("leader"))
            except (httpx.HTTPError, ValueError):
                return None
        return leaders.pop() if len(leaders) == 1 else None

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        """Until every live server listens for clients and all agree on a meta leader."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name in self.names:
                if self.procs[name].poll() not in (None, -signal.SIGKILL):
                    raise RuntimeError(f"nats-server {name} exited; see {self.tmp}/{name}.log")
            with contextlib.suppress(OSError):
                for name in self.alive():
                    socket.create_connection(("127.0.0.1", self.ports[name]), 0.2).close()
                if leader := self.meta_leader():
                    return leader
            time.sleep(0.1)
        raise RuntimeError(f"the NATS cluster had no JetStream meta leader in {timeout_s:g} s")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def nats_cluster(tmp: Path, size: int = 3) -> Iterator[NatsCluster]:
    """A fresh NATS cluster of ``size`` servers with JetStream, ready (a meta leader)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = NatsCluster(tmp, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
