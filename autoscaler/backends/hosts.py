"""Device-host processes: a backend that decides residency instead of starting replicas.

With ``device_hosts`` on real devices every device has one `lego host` process
(``services.hostproc``): `lego up` starts one per configured device, Kubernetes runs one pod
per GPU (the StatefulSet ``lego-hosts``, whose pod names are then the ``devices``). Each host
serves the pools its entry of KV ``lego-residency`` lists. This backend starts nothing:
``scale(launch, devices)`` lists the pool in the entries of those devices and removes it from
the others' (compare-and-set on each entry's revision, read again and retried when another
writer got there first), and the autoscaler's residency planning (``autoscaler.residency``)
decides the device lists.

``replicas()`` reports, per pool, one running replica per device whose entry lists it (what is
decided, not what has loaded yet: readiness comes from the replicas' own reports, as for every
backend). A pool just removed from a device shows as stopping there until its replica reports
``stopped`` or falls silent (``common.observe.REPLICA_EXPIRY_S``). A host that crashed is
restarted by whoever started it (`lego up`'s supervisor, the StatefulSet); meanwhile its tasks
come back to the other hosts after the ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from autoscaler.backends import PoolLaunch, ReplicaInfo
from common import bus, subjects
from common.messages import HostResidency, ReplicaStatus, ResidentPool, decode, encode
from common.observe import REPLICA_EXPIRY_S
from common.settings import Settings

log = logging.getLogger(__name__)

#: the backends whose replicas device-host processes stand in for when ``device_hosts`` is set
#: (a plug-in's backend that hosts replicas in its own process keeps them)
HOST_PLATFORMS = ("local", "kubernetes")


def host_processes(settings: Settings, backend: str) -> bool:
    """Whether `lego host` processes serve the pools: ``device_hosts`` with ``backend`` one of
    ``HOST_PLATFORMS``."""
    return settings.device_hosts and backend in HOST_PLATFORMS


def host_devices(settings: Settings) -> list[str]:
    """One device host per configured device; with none, ``cpu_hosts`` CPU hosts (``cpu:0``,
    ``cpu:1``, ...: by default one per core this process may run on, each running one step
    at a time as a GPU does)."""
    if settings.devices:
        return list(settings.devices)
    return [f"cpu:{i}" for i in range(settings.cpu_hosts or len(os.sched_getaffinity(0)))]


def replica_id(pool: str, key: str) -> str:
    """The id a host gives the replica of ``pool`` it serves (``services.hostproc``)."""
    return f"{pool}@{key}"


#: how an entry's list of pools changes
Edit = Callable[[list[ResidentPool]], list[ResidentPool]]


def _listing(resident: ResidentPool, listed: bool, pools: list[ResidentPool]) -> list[ResidentPool]:
    """``pools`` with ``resident`` in it (``listed``) or not, in pool order."""
    others = [p for p in pools if p.pool != resident.pool]
    return sorted([*others, resident] if listed else others, key=lambda p: p.pool)


class HostsBackend:
    places_replicas = True

    def __init__(self, settings: Settings, devices: list[str] | None = None) -> None:
        self.settings = settings
        #: host key -> the device the autoscaler calls it
        self.devices = {subjects.host_key(d): d for d in devices or host_devices(settings)}
        self._entries: dict[str, tuple[int, HostResidency]] = {}  # key -> (revision, entry)
        self._removed: dict[tuple[str, str], float] = {}  # (pool, key) -> when, monotonic
        self._heard: dict[str, tuple[float, str]] = {}  # replica -> (when, its state)
        self._nc: Any = None

    async def start(self) -> None:
        self._nc = await bus.connect(self.settings, name="autoscaler-hosts")
        buckets = await bus.ensure_topology(self._nc.jetstream(), self.settings)
        self._bucket: KeyValue = buckets[subjects.RESIDENCY_BUCKET]
        self._status_sub = await self._nc.subscribe(subjects.REPLICAS_WILDCARD,
                                                    cb=self._on_status)
        self._watcher = await self._bucket.watchall()
        loaded = asyncio.Event()
        self._following = asyncio.create_task(self._follow(loaded))
        await loaded.wait()  # every entry as it is now, before the first tick reads them

    async def close(self, *, stop_replicas: bool) -> None:
        """With ``stop_replicas`` every host's entry is emptied (they drain all they hold);
        otherwise the hosts keep serving what they hold (pods outlive the autoscaler)."""
        if self._nc is None:
            return
        try:
            if stop_replicas:
                for key in self.devices:
                    await self._change(key, lambda pools: [])
        finally:
            self._following.cancel()
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            await bus.close(self._nc)
            self._nc = None

    # --- reads ----------------------------------------------------------------------------------

    async def _follow(self, loaded: asyncio.Event) -> None:
        async for entry in self._watcher:
            if entry is None:
                loaded.set()
            elif entry.key in self.devices:
                try:
                    listed = HostResidency.of(entry.value)
                except Exception as exc:  # noqa: BLE001 - the next write replaces it
                    log.error("residency of %s (revision %d) unreadable: %s", entry.key,
                              entry.revision, exc)
                    listed = HostResidency()
                self._learn(entry.key, entry.revision, listed)

    def _learn(self, key: str, revision: int, entry: HostResidency) -> None:
        """Keep ``key``'s entry as of ``revision``, unless a newer one is known (our own write
        arrives through the watch after we kept it)."""
        known = self._entries.get(key)
        if known is None or known[0] < revision:
            self._entries[key] = (revision, entry)

    async def _on_status(self, msg: Any) -> None:
        status = decode(msg.data, ReplicaStatus)
        self._heard[status.replica] = (time.monotonic(), status.state)

    async def replicas(self) -> dict[str, list[ReplicaInfo]]:
        found: dict[str, list[ReplicaInfo]] = {}
        for key, (_, entry) in sorted(self._entries.items()):
            for listed in entry.pools:
                found.setdefault(listed.pool, []).append(
                    ReplicaInfo(replica_id(listed.pool, key), listed.pool, self.devices[key],
                                "running"))
        now_s = time.monotonic()
        for (pool, key), since in list(self._removed.items()):
            replica = replica_id(pool, key)
            heard_at, state = self._heard.get(replica, (since, ""))
            last = max(since, heard_at)
            if (heard_at > since and state == "stopped") or now_s - last > REPLICA_EXPIRY_S:
                del self._removed[(pool, key)]
                continue
            found.setdefault(pool, []).append(
                ReplicaInfo(replica, pool, self.devices[key], "stopping"))
        return found

    # --- writes ---------------------------------------------------------------------------------

    async def scale(self, launch: PoolLaunch, devices: list[str]) -> None:
        """List ``launch.pool`` on exactly ``devices`` (one replica per device host)."""
        for device in devices:
            self.devices.setdefault(subjects.host_key(device), device)
        wanted = {subjects.host_key(d) for d in devices}
        resident = ResidentPool(launch.pool, launch.kind, launch.model)
        for key in sorted(self.devices):
            edit = functools.partial(_listing, resident, key in wanted)
            if await self._change(key, edit) and key not in wanted:
                self._removed[(launch.pool, key)] = time.monotonic()

    async def _change(self, key: str, edit: Edit) -> bool:
        """Compare-and-set ``edit(pools)`` into ``key``'s entry; whether it changed anything.
        A conflict (another writer got there first) reads the entry again and retries."""
        known = self._entries.get(key)
        while True:
            if known is None:
                known = await self._read(key)
            revision, entry = known
            pools = edit(list(entry.pools))
            if pools == entry.pools:
                return False
            new = HostResidency(pools)
            try:
                revision = await self._bucket.update(key, encode(new), last=revision)
            except KeyWrongLastSequenceError:
                log.info("residency of %s changed meanwhile; reading it again", key)
                known = None
                continue
            self._learn(key, revision, new)
            return True

    async def _read(self, key: str) -> tuple[int, HostResidency]:
        """``key``'s entry and its revision; a deleted one lists nothing at the revision of its
        deletion, and one never written at revision 0 (what a first write expects)."""
        try:
            entry = await self._bucket.get(key)
        except KeyNotFoundError as missing:
            deleted = getattr(missing, "entry", None)
            return (deleted.revision if deleted is not None else 0), HostResidency()
        # a stored entry has its stream sequence as revision (the field is optional)
        return entry.revision or 0, HostResidency.of(entry.value)
