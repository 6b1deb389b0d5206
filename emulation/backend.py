"""Replicas on emulated GPUs (``lego up --emulate``): the backend of the emulated cluster.

With ``device_hosts`` (micro-serving) each emulated GPU has one ``services.host.DeviceHost``,
and a replica is a pool made resident on that host: the host's one step loop runs the most
urgent batch across its pools. Otherwise (the monolithic baselines) each replica is a
``NodeRunner``, a host of its own, and replicas placed on one device time-share it. Either way
the transport is the real one (NATS, the tensor store, batching, acks) over ``EmulatedCore``s,
run as tasks in this process rather than as child processes: what is placed on one emulated
device must share its memory ledger and its compute (``emulation.device.EmulatedDevice``),
and a 2-core host could not run dozens of Python processes without the host, not the emulated
GPUs, becoming the bottleneck. Placement, scaling, draining and crash restarts are as with the
local backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from autoscaler.backends import HostedReplicas, PoolLaunch, ReplicaInfo
from common.settings import Settings
from services.host import DeviceHost
from services.node import build_core, build_runner

log = logging.getLogger(__name__)

#: threads for emulated steps: each running step sleeps in one, so there must be enough for
#: every replica at once (the default pool has cpu_count + 4)
_STEP_THREADS = 512


@dataclass(eq=False)
class EmulatedReplica:
    id: str
    launch: PoolLaunch
    device: str
    drain: Callable[[], None]  # finish and ack what it holds, then give its memory back
    task: asyncio.Task
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False


class EmulatedBackend(HostedReplicas[EmulatedReplica]):
    places_replicas = True

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self._ids = itertools.count(1)
        self._hosts: dict[str, tuple[DeviceHost, asyncio.Task]] = {}

    async def start(self) -> None:
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(_STEP_THREADS, thread_name_prefix="emulated")
        )

    def _start(self, launch: PoolLaunch, device: str) -> EmulatedReplica:
        replica_id = f"{launch.pool}@{device}#{next(self._ids)}"
        settings = self.settings.model_copy(update={"device_label": device})
        if not settings.device_hosts:
            runner = build_runner(launch.kind, launch.model, settings, replica=replica_id)
            task = asyncio.create_task(runner.serve(), name=replica_id)
            return EmulatedReplica(replica_id, launch, device, runner.drain, task)
        host = self._host(device, settings)
        core, pool = build_core(launch.kind, launch.model, settings, replica=replica_id)
        task = asyncio.create_task(host.run_pool(core, pool, launch.model, replica_id),
                                   name=replica_id)
        return EmulatedReplica(replica_id, launch, device,
                               lambda: host.drain_replica(replica_id), task)

    def _host(self, device: str, settings: Settings) -> DeviceHost:
        """The device's host, started on first use (and again if it ended)."""
        found = self._hosts.get(device)
        if found is None or found[1].done():
            host = DeviceHost(settings, f"host@{device}", device=device)
            found = self._hosts[device] = (host, asyncio.create_task(host.serve(),
                                                                     name=f"host@{device}"))
        return found[0]

    async def replicas(self) -> dict[str, list[ReplicaInfo]]:
        for pool, replicas in self._replicas.items():
            for replica in list(replicas):
                if not replica.task.done():
                    continue
                replicas.remove(replica)
                if not replica.stopping:  # it crashed: start it again on its device
                    error = replica.task.exception() if not replica.task.cancelled() else None
                    log.warning("%s replica %s ended (%s); restarting", pool, replica.id, error)
                    replicas.append(self._start(replica.launch, replica.device))
        return self._info()

    def _stop(self, replica: EmulatedReplica) -> None:
        replica.stopping = True
        replica.drain()

    async def close(self, *, stop_replicas: bool) -> None:
        everyone = [r for replicas in self._replicas.values() for r in replicas]
        for replica in everyone:
            self._stop(replica)
        await self._finish([r.task for r in everyone])
        self._replicas.clear()
        for host, _ in self._hosts.values():
            host.drain()
        await self._finish([task for _, task in self._hosts.values()])
        self._hosts.clear()

    async def _finish(self, tasks: list[asyncio.Task]) -> None:
        """Wait for drained ``tasks`` up to the drain timeout; cancel what is left."""
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
