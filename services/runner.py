"""The runner of a node process (`lego node KIND --model SPEC`): a device host serving one pool.

Every replica runs the same machinery: ``services.host.DeviceHost`` (the step loop and its
scheduler) over ``services.feed.PoolFeed`` (fetch, store I/O, forwarding, acks) around a pure
model core (``services.core.ModelCore``). A process that serves one model is a host with one
resident pool; SIGTERM drains it: stop fetching, finish what is held, ack, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from common.lifetime import stat_fields
from common.settings import Settings
from services.core import ModelCore
from services.host import DeviceHost


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where /proc cannot tell."""
    try:
        fields = stat_fields()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class NodeRunner:
    def __init__(
        self, core: ModelCore, pool: str, model: str, settings: Settings,
        replica: str | None = None, rebuild: Callable[[], ModelCore] | None = None,
    ) -> None:
        """``replica``: its id, unique in the cluster (default: pool@host:pid, for one replica
        per process; a process hosting several names each). ``rebuild``: a fresh core for
        another attempt when ``core`` fails to load (default: ``core`` again)."""
        # when the process began, so the replica reports its whole cold start, imports included
        self.process_started = time.monotonic() - (
            0.0 if replica else (_process_age_s() or 0.0)
        )
        self.core = core
        self._rebuild = rebuild
        self._attempts = 0
        self.pool = pool
        self.model = model
        self.settings = settings
        self.replica = replica or f"{pool}@{socket.gethostname()}:{os.getpid()}"
        self.host = DeviceHost(settings, self.replica,
                               device=settings.device_label or str(core.device))

    def drain(self) -> None:
        """Stop fetching; finish and ack what is held; then ``serve`` returns."""
        self.host.drain()

    def _core(self) -> ModelCore:
        """The core for the next attempt to load: the one given first, then a fresh one."""
        self._attempts += 1
        if self._attempts > 1 and self._rebuild is not None:
            self.core = self._rebuild()
        return self.core

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        """Serve the pool until drained. A model that fails to load is reported (state
        ``failed``, with the error) and tried again with a back-off (``DeviceHost.serve_pool``):
        the process stays, so its reports say why the pool does not serve."""
        hosting = asyncio.create_task(self.host.serve())
        serving = asyncio.create_task(self.host.serve_pool(
            self._core, self.core.kind, self.pool, self.model, self.replica, ready=ready,
            process_started=self.process_started,
        ))
        try:
            # the pool ends first (drained); a host that fails (NATS unreachable) ends both
            done, _ = await asyncio.wait({hosting, serving}, return_when=asyncio.FIRST_COMPLETED)
            if hosting in done and not serving.done():
                serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        finally:
            self.host.drain()
            await hosting
