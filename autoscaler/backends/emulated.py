"""Replicas on emulated GPUs (``lego up --emulate``): the backend of issue 4's experiment.

Each replica is a real ``NodeRunner`` (its own NATS connection, the real tensor store, batching
and acks) over an ``EmulatedCore``, run as a task in this process rather than as a child
process: replicas placed on one emulated device must share its memory ledger and its compute
(``services.emulated.EmulatedDevice``), and a 2-core host could not run dozens of Python
processes without the host, not the emulated GPUs, becoming the bottleneck. Placement,
scaling, draining and crash restarts are as with the local backend.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass, field

from autoscaler.backends import HostedReplicas, PoolLaunch, ReplicaInfo
from common.settings import Settings
from services.node import build_runner
from services.runner import NodeRunner

log = logging.getLogger(__name__)

#: threads for emulated steps: each running step sleeps in one, so there must be enough for
#: every replica at once (the default pool has cpu_count + 4)
_STEP_THREADS = 512


@dataclass(eq=False)
class EmulatedReplica:
    id: str
    launch: PoolLaunch
    device: str
    runner: NodeRunner
    task: asyncio.Task
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False


class EmulatedBackend(HostedReplicas[EmulatedReplica]):
    places_replicas = True

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self._ids = itertools.count(1)

    async def start(self) -> None:
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(_STEP_THREADS, thread_name_prefix="emulated")
        )

    def _start(self, launch: PoolLaunch, device: str) -> EmulatedReplica:
        replica_id = f"{launch.pool}@{device}#{next(self._ids)}"
        settings = self.settings.model_copy(update={"device_label": device})
        runner = build_runner(launch.kind, launch.model, settings, replica=replica_id)
        task = asyncio.create_task(runner.serve(), name=replica_id)
        return EmulatedReplica(replica_id, launch, device, runner, task)

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
        replica.runner.drain()  # finishes and acks what it holds, then frees its memory

    async def close(self, *, stop_replicas: bool) -> None:
        everyone = [r for replicas in self._replicas.values() for r in replicas]
        for replica in everyone:
            self._stop(replica)
        tasks = [r.task for r in everyone]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._replicas.clear()
