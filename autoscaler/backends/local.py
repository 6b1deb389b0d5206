"""Node processes on this machine: the default backend (`lego up`).

Each replica is a ``lego node`` process, forked from a template process that did its imports
once (``template``; started from scratch until that is ready), pinned to one device: for
``cuda:N`` through CUDA_VISIBLE_DEVICES, for CPU slots (``cpu:N``) only as a label the replica
reports (the OS schedules CPU). A crashed replica is restarted on its device (with a back-off
if it keeps crashing); a replica no longer wanted gets SIGTERM and drains: it stops fetching,
finishes and acks what it holds, and exits. The newest replica goes first: it is the likeliest
to be still loading or idle. Replicas end with the autoscaler: SIGTERM (a drain) when it dies,
even of SIGKILL (a forked one through the template, which dies with the autoscaler), and they
exit once NATS is gone too (``common.lifetime``), so a killed autoscaler leaves no orphans
consuming next to its successor's.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoscaler.backends import HostedReplicas, PoolLaunch, ReplicaInfo
from autoscaler.backends.template import ForkedProcess, Template
from common.lifetime import child_options
from common.settings import Settings

log = logging.getLogger(__name__)

#: a replica that dies sooner than this after its start counts as crash-looping
_CRASH_LOOP_S = 10.0
_MAX_BACKOFF_S = 30.0


@dataclass
class LocalReplica:
    launch: PoolLaunch
    device: str
    proc: subprocess.Popen | ForkedProcess
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    crashes: int = 0  # consecutive quick crashes: the back-off grows with them
    restart_at: float | None = None  # waiting out a back-off before the restart

    @property
    def id(self) -> str:
        return str(self.proc.pid)


def node_args(launch: PoolLaunch) -> list[str]:
    return ["node", launch.kind, "--model", launch.model]


def node_argv(launch: PoolLaunch) -> list[str]:
    return [sys.executable, "-m", "lego.cli", *node_args(launch)]


class LocalBackend(HostedReplicas[LocalReplica]):
    places_replicas = True

    def __init__(self, settings: Settings, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir or settings.run_dir / "logs"
        self.template: Template | None = None
        super().__init__()

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.node_template:
            try:
                self.template = Template(self._env(), self.log_dir / "template.log")
            except OSError as exc:
                log.warning("no template process (%s): node processes start from scratch", exc)

    def _env(self) -> dict[str, str]:
        env = self.settings.child_env()
        env["OMP_NUM_THREADS"] = str(self.settings.torch_threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def _spawn(self, launch: PoolLaunch, device: str) -> subprocess.Popen | ForkedProcess:
        env = self._env()
        env["LEGO_DEVICE_LABEL"] = device
        kind, _, index = device.partition(":")
        if kind == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = index or "0"
            env["LEGO_DEVICE"] = "cuda"
        elif kind == "cpu":
            env["LEGO_DEVICE"] = "cpu"
        log_path = self.log_dir / f"{launch.pool}.log"
        if self.template is not None and self.template.ready:
            try:  # its imports done: ready in its weights' load time
                return self.template.fork(node_args(launch), env, log_path)
            except Exception as exc:  # noqa: BLE001 - start it from scratch instead
                log.warning("the template could not fork %s (%s); starting it from scratch",
                            launch.pool, exc)
        return subprocess.Popen(
            node_argv(launch), stdout=subprocess.DEVNULL,
            stderr=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
            **child_options(env),  # a Ctrl-C reaches the autoscaler, which drains them
        )

    def _reap(self) -> None:
        """Forget replicas that exited when asked to; restart the ones that crashed."""
        now_s = time.monotonic()
        for pool, replicas in self._replicas.items():
            for replica in list(replicas):
                code = replica.proc.poll()
                if code is None:
                    continue
                if replica.stopping:
                    replicas.remove(replica)
                    continue
                if replica.restart_at is None:
                    quick = now_s - replica.started < _CRASH_LOOP_S
                    replica.crashes = replica.crashes + 1 if quick else 0
                    backoff = min(_MAX_BACKOFF_S, 0.5 * 2 ** replica.crashes) if quick else 0.0
                    replica.restart_at = now_s + backoff
                    log.warning("%s replica %s exited with %s; restarting in %.1fs",
                                pool, replica.id, code, backoff)
                if now_s >= replica.restart_at:
                    replica.proc = self._spawn(replica.launch, replica.device)
                    replica.started, replica.restart_at = now_s, None

    async def replicas(self) -> dict[str, list[ReplicaInfo]]:
        self._reap()
        return self._info()

    def _start(self, launch: PoolLaunch, device: str) -> LocalReplica:
        return LocalReplica(launch, device, self._spawn(launch, device))

    def _stop(self, replica: LocalReplica) -> None:
        replica.stopping = True
        if replica.proc.poll() is None:
            replica.proc.send_signal(signal.SIGTERM)  # drain: finish and ack what it holds

    async def close(self, *, stop_replicas: bool) -> None:
        if not stop_replicas:
            return
        everyone = [r for replicas in self._replicas.values() for r in replicas]
        for replica in everyone:
            self._stop(replica)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while any(r.proc.poll() is None for r in everyone) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for replica in everyone:
            if replica.proc.poll() is None:
                log.warning("replica %s did not drain in time; killing it", replica.id)
                replica.proc.kill()
                replica.proc.wait()
        self._replicas.clear()
        if self.template is not None:
            self.template.close()
