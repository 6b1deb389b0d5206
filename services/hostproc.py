"""A device-host process (`lego host --device DEVICE [--name NAME]`): one ``DeviceHost`` on one
device, serving every pool the autoscaler makes resident there.

The process follows its entry of KV ``lego-residency`` (key ``subjects.host_key(NAME or
DEVICE)``: ``cuda-0``, ``cpu-1``, or a pod name such as ``lego-hosts-0``), a ``HostResidency``
the autoscaler writes (``autoscaler.backends.hosts.HostsBackend``). For each pool newly listed it
builds the core (``services.node.build_core``, in a worker thread: building a model directory or
reading a workflow blocks) on this device and makes it resident with ``DeviceHost.run_pool`` as
replica ``<pool>@<KEY>``; a pool no longer listed is drained (it stops fetching, finishes and
acks what it holds, then gives its memory back). A pool listed again while its replica still
drains is started anew once that replica has ended.

A pool whose core fails to build or load is logged and reported (its replica in state
``failed``, with the reason) and tried again, with a back-off, while it stays listed: the host
and its other pools go on serving. SIGTERM/SIGINT
drains every pool and exits. Replicas report on ``lego.replicas.<pool>`` as every replica does,
with ``device`` = NAME or DEVICE (what the autoscaler placed them on).

`lego up` starts one such process per configured device when ``device_hosts`` is set; on
Kubernetes each pod of the StatefulSet ``lego-hosts`` is one (one GPU each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field

import torch
from nats.js.kv import KeyValue

from common import bus, subjects
from common.messages import HostResidency, ResidentPool
from common.models import resolve_model_dir
from common.settings import Settings
from services import liveness
from services.core import ModelCore, import_classes
from services.host import DeviceHost
from services.node import build_core
from services.schemes import scheme_of

log = logging.getLogger(__name__)

#: after a residency change, wait this long for the rest of the autoscaler's tick: it writes one
#: pool at a time, and a device should drain what it loses before loading what it gains
_SETTLE_S = 0.05


def torch_device(device: str) -> str:
    """The torch device a host's cores load on: a CPU "device" (``cpu:1``) is a share of the
    host's CPU, so plain ``cpu``; anything else (``cuda:0``) as given."""
    return "cpu" if device.partition(":")[0] == "cpu" else device


@dataclass(eq=False)
class _Resident:
    """A listed pool on this host: its replica from the first load attempt until drained."""

    entry: ResidentPool
    replica: str
    released: asyncio.Event = field(default_factory=asyncio.Event)  # no longer listed
    task: asyncio.Task | None = None


class HostProcess:
    def __init__(self, settings: Settings, device: str, name: str | None = None) -> None:
        label = name or device
        self.key = subjects.host_key(label)
        self.settings = settings.model_copy(
            update={"device": torch_device(device), "device_label": label})
        self.host = DeviceHost(self.settings, f"host@{self.key}", device=label)
        self.wanted: dict[str, ResidentPool] = {}  # pool -> as the entry lists it
        self.residents: dict[str, _Resident] = {}
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()

    def drain(self) -> None:
        """Stop following the entry; drain every pool; then ``serve`` returns."""
        self._stop.set()
        self.host.drain()
        for resident in self.residents.values():
            resident.released.set()

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        connected = asyncio.Event()
        hosting = asyncio.create_task(self.host.serve(connected), name=f"host@{self.key}")
        waiting = asyncio.create_task(connected.wait())
        await asyncio.wait({hosting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if hosting.done():  # it could not connect: say why
            waiting.cancel()
            await hosting
            return
        bucket = await self.host.js.key_value(subjects.RESIDENCY_BUCKET)  # the host made it
        watcher = await bucket.watch(self.key)
        helpers = [asyncio.create_task(self._follow(watcher)),
                   asyncio.create_task(self._reconcile_loop())]
        log.info("host %s on %s: following %s/%s", self.key, self.settings.device,
                 subjects.RESIDENCY_BUCKET, self.key)
        if ready is not None:
            ready.set()
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({hosting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            for helper in helpers:
                helper.cancel()
            with contextlib.suppress(Exception):  # NATS may be gone already
                await watcher.stop()
            self.drain()
            residents = [r.task for r in self.residents.values() if r.task]
            if hosting.done():  # the host failed: no step loop will finish what pools hold
                for task in residents:
                    task.cancel()
            await asyncio.gather(*helpers, *residents, return_exceptions=True)
            await hosting  # every feed drained and acked; raises what the host raised

    # --- following the entry --------------------------------------------------------------------

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the current value (if any) has been delivered
                continue
            try:
                listed = HostResidency.of(entry.value)
            except Exception as exc:  # noqa: BLE001 - a bad write must not stop the host
                log.error("host %s: unreadable residency entry (revision %s) ignored: %s",
                          self.key, entry.revision, exc)
                continue
            self.wanted = {p.pool: p for p in listed.pools}
            self._changed.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._changed.wait()
            await asyncio.sleep(_SETTLE_S)
            self._changed.clear()
            self._reconcile()

    def _reconcile(self) -> None:
        if self._stop.is_set():
            return
        for pool, resident in list(self.residents.items()):
            if resident.task is not None and resident.task.done():
                del self.residents[pool]
            elif self.wanted.get(pool) != resident.entry and not resident.released.is_set():
                log.info("host %s: %s no longer resident; draining", self.key, pool)
                resident.released.set()
                self.host.drain_replica(resident.replica)
        for pool, entry in self.wanted.items():
            if pool in self.residents:  # serving, or still draining: started again once gone
                continue
            resident = _Resident(entry, f"{pool}@{self.key}")
            resident.task = asyncio.create_task(self._serve_pool(resident), name=resident.replica)
            resident.task.add_done_callback(lambda _: self._changed.set())
            self.residents[pool] = resident
            log.info("host %s: making %s resident (%s --model %s)", self.key, pool,
                     entry.kind, entry.model)

    async def _serve_pool(self, resident: _Resident) -> None:
        """Build and serve the pool until it is drained; a failed build or load is reported
        and retried with a back-off while the pool stays listed (``DeviceHost.serve_pool``)."""
        entry = resident.entry

        def build() -> ModelCore:
            return build_core(entry.kind, entry.model, self.settings, None, resident.replica)[0]

        await self.host.serve_pool(build, entry.kind, entry.pool, entry.model, resident.replica,
                                   released=resident.released)


def run_host(settings: Settings, device: str, name: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain every pool (finish and ack what is held) and exit.
    While it connects and waits for its entry, a thread imports the base model's classes."""
    torch.set_num_threads(settings.torch_threads)
    threading.Thread(target=_import_base_classes, args=(settings,), daemon=True,
                     name="import-classes").start()

    async def main() -> None:
        process = HostProcess(settings, device, name)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, process.drain)
        liveness.watch(process.host.liveness, process.host.name)
        await process.serve()

    bus.run_async(main())


def _import_base_classes(settings: Settings) -> None:
    if scheme_of(settings.base_model) is not None:  # a plug-in's models: nothing to import
        return
    try:
        model_dir = resolve_model_dir(settings.base_model, settings.cache_dir / "models")
    except Exception:  # noqa: BLE001 - the pools that need it report why it cannot be found
        return
    import_classes(model_dir)
