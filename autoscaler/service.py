"""The autoscaler process (`lego autoscaler`; `lego up` starts one).

Every tick (``autoscale_tick_s``; sooner when admission control reports turning work away,
the first sign of a burst while the queues are short) it reads each pool's JetStream lag and
its replicas' reports (``common.observe``), asks the pure ``policy.decide`` how many replicas
every pool should have within the global budget, packs them onto devices
(``placement.place``) and has the backend start or drain replicas. Pools come from the
registered workflows (KV ``lego-workflows``), so a workflow added at run time gets its pools
without a restart. Every change is logged and published as a ``ScaleEvent`` on
``lego.autoscaler.events``. Its Prometheus metrics (``lego_pool_*``: lag, replicas by state,
desired replicas; scale events) are served on ``autoscaler_metrics_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from autoscaler.backends import Backend, PoolLaunch, ReplicaInfo
from autoscaler.backends.hosts import host_devices
from autoscaler.footprint import provider_for
from autoscaler.placement import Device, place
from autoscaler.policy import (
    Budget,
    PolicyConfig,
    PolicyState,
    PoolObservation,
    PoolSpec,
    decide,
)
from autoscaler.residency import PoolNeed, Residency, copies_wanted
from autoscaler.residency import plan as plan_residency
from common import bus, metrics, subjects
from common.messages import ScaleEvent, encode, now
from common.models import resolve_model_dir
from common.observe import ClusterObserver, PoolView
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.workflow import WorkflowSpec, attached_adapters

log = logging.getLogger(__name__)

#: replica slots per GPU when ``slots`` is not set: a denoiser or a whole pipeline takes all
#: of them (``exclusive_kinds``), small models share a device
DEVICE_SLOTS = 8
#: the least time between two ticks, however fast news of turned-away work comes
MIN_TICK_GAP_S = 0.05


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def devices_of(settings: Settings, slots: int) -> list[Device]:
    """The devices replicas are placed on: the configured GPUs (each with its memory, the
    slots split between them); without them, this host's CPU as one device with every slot,
    or with device hosts as its CPU hosts (``host_devices``). CPU hosts share the machine's
    memory, and each may use all of it: a model too large for a share still starts (a second
    copy of it, which only a backlog asks for, may then not fit)."""
    if not settings.devices and not settings.device_hosts:
        memory = settings.device_memory_bytes or host_memory_bytes()
        return [Device("cpu:0", memory, slots)]
    devices = host_devices(settings)
    base, extra = divmod(slots, len(devices))
    memory = settings.device_memory_bytes or _probe_memory(devices[0])
    return [Device(d, memory, base + (i < extra)) for i, d in enumerate(devices)]


def _probe_memory(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.get_device_properties(index).total_memory)
    return host_memory_bytes()


@dataclass(frozen=True)
class Pool:
    launch: PoolLaunch
    spec: PoolSpec


class Autoscaler:
    def __init__(
        self, settings: Settings, backend: Backend, config: PolicyConfig | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.config = config or PolicyConfig(
            tick_s=settings.autoscale_tick_s,
            stable_window_s=max(settings.scale_down_delay_s, 1.0, settings.autoscale_tick_s),
            downscale_delay_s=settings.scale_down_delay_s,
            keep_idle=settings.keep_idle_replicas,
        )
        self.state: PolicyState | None = None
        self._footprints: dict[str, int] = {}
        self._consumers: set[str] = set()  # pools whose consumer is known to exist
        self._arrivals: dict[str, float] = {}  # pool -> smoothed arrival rate
        self._residency_state: Residency | None = None

    # --- what to scale --------------------------------------------------------------------

    def pools(self, registry: WorkflowRegistry) -> dict[str, Pool]:
        found: dict[str, Pool] = {}
        specs = registry.all().values()
        for spec in specs:
            for pool, (kind, model) in spec.pools(monolithic=self.settings.monolithic).items():
                if pool not in found:
                    launch = PoolLaunch(pool, kind, model)
                    found[pool] = Pool(launch, self._pool_spec(launch, spec, specs))
        return found

    def _pool_spec(
        self, launch: PoolLaunch, workflow: WorkflowSpec, workflows: Iterable[WorkflowSpec]
    ) -> PoolSpec:
        pool, kind = launch.pool, launch.kind
        s = self.settings
        low = s.min_replicas_of(pool, kind)
        gpus = [d for d in s.devices if not d.startswith("cpu")]
        slots = 1  # on one device (which must hold every pool) nothing takes it whole
        if len(gpus) > 1 and kind in s.exclusive_kinds:
            slots = self.slots_per_device()
        elif len(gpus) > 1 and kind in s.one_per_device_kinds:
            slots = self.slots_per_device() // 2 + 1  # more than half: one such per device
        return PoolSpec(
            name=pool,
            min_replicas=low,
            max_replicas=max(s.max_replicas, low, 1),
            scale_to_zero=low == 0,
            slots_per_replica=slots,
            memory_bytes=self._footprint(launch, workflow, workflows),
            max_batch=s.max_batch,
        )

    def _footprint(
        self, launch: PoolLaunch, workflow: WorkflowSpec, workflows: Iterable[WorkflowSpec]
    ) -> int:
        """A replica's memory: the weights it loads, with the ControlNets the workflows attach
        to its pool, in the dtype it loads them in (read from the model directories, once;
        for a plug-in's models, what its provider says: ``autoscaler.footprint``)."""
        if launch.pool not in self._footprints:
            from services import catalog

            def model_dir(spec: str) -> Path:
                return resolve_model_dir(spec, self.settings.cache_dir / "models")

            s = self.settings
            device = s.devices[0] if s.devices else s.device  # (one kind of device)
            provider = provider_for(launch.kind, launch.model, workflow)
            try:
                if provider is not None:
                    size = provider(launch.kind, launch.model, workflow, workflows, s)
                elif launch.kind == "monolithic":
                    dirs = {alias: model_dir(m) for alias, m in workflow.models.items()}
                    size = catalog.monolithic_footprint_bytes(workflow, dirs, s.dtype, device)
                else:
                    adapters = attached_adapters(launch.kind, launch.model, workflows)
                    size = catalog.footprint_bytes(
                        launch.kind, model_dir(launch.model), s.dtype, device,
                        [model_dir(adapter) for adapter in adapters])
            except Exception as exc:  # noqa: BLE001 - placement still works by slots
                log.warning("no memory footprint for %s: %s", launch.pool, exc)
                size = 0
            self._footprints[launch.pool] = size
        return self._footprints[launch.pool]

    def slots_per_device(self) -> int:
        """Replica slots each configured device offers (a whole-device replica takes all)."""
        return max(1, (self.settings.slots or DEVICE_SLOTS * len(self.settings.devices))
                   // max(1, len(self.settings.devices)))

    def budget(self, pools: dict[str, Pool]) -> tuple[Budget, list[Device]]:
        if self.settings.devices:
            slots = self.settings.slots or DEVICE_SLOTS * len(self.settings.devices)
        else:
            slots = self.settings.slots or len(pools) + (os.cpu_count() or 1)
        devices = devices_of(self.settings, slots)
        budget = Budget(slots=slots, devices=len(devices),
                        device_memory_bytes=min(d.memory_bytes for d in devices))
        return budget, devices

    # --- one tick -------------------------------------------------------------------------

    def observe(
        self, views: dict[str, PoolView], running: dict[str, list[ReplicaInfo]],
        pools: dict[str, Pool],
    ) -> dict[str, PoolObservation]:
        observations = {}
        for pool in pools:
            view = views.get(pool, PoolView(pool))
            replicas = sum(1 for r in running.get(pool, []) if r.state == "running")
            # Arrivals counted over one tick are noisy (one task in 0.5 s reads as 2/s): smooth
            # them. A burst still shows at once, as lag.
            rate = view.arrival_rate or 0.0
            rate = self._arrivals[pool] = (rate + self._arrivals.get(pool, rate)) / 2
            observations[pool] = PoolObservation(
                lag=view.lag,
                queued=view.pending,
                arrival_rate=rate,
                completion_rate=view.completion_rate or 0.0,
                replicas=replicas,
                ready=min(view.ready, replicas),
                measured_service_rate_per_replica=view.service_rate,
                held_rate=view.held_rate or 0.0,
            )
        return observations

    async def tick(
        self, registry: WorkflowRegistry, observer: ClusterObserver
    ) -> list[ScaleEvent]:
        pools = self.pools(registry)
        if not pools:
            return []
        for pool in pools.keys() - self._consumers:
            await bus.ensure_consumer(
                observer.js, subjects.TASKS_STREAM, subjects.pool_consumer(pool),
                subjects.task_subject(pool), self.settings,
            )
            self._consumers.add(pool)
        views = await observer.sample()
        for name, view in views.items():
            if name in pools and view.replicas.get("failed") and not view.ready:
                # its replicas cannot load the model: more of them would fail the same way
                spec = pools[name].spec
                pools[name] = replace(pools[name], spec=replace(
                    spec, max_replicas=max(spec.min_replicas, 1)))
        running = await self.backend.replicas()
        observations = self.observe(views, running, pools)
        budget, devices = self.budget(pools)
        specs = {name: pool.spec for name, pool in pools.items()}
        current = {
            pool: [r.device for r in replicas if r.state == "running"]
            for pool, replicas in running.items() if pool in pools
        }
        if self.settings.device_hosts and self.backend.places_replicas:
            placement, reasons = self._residency(pools, observations, devices, current)
        elif self.settings.assignment:  # a static baseline: placed once, never rescaled
            placement = {pool: list(self.settings.assignment.get(pool, [])) for pool in pools}
            reasons = dict.fromkeys(pools, "fixed assignment")
        elif self.state is None and self.settings.initial_replicas:
            # provisioned up front; from the next tick the policy rules (it shrinks a pool only
            # after its stable window, so the provisioning holds until the load is known)
            initial = {pool: max(spec.min_replicas, self.settings.initial_replicas.get(pool, 0))
                       for pool, spec in specs.items()}
            placement = self._place(initial, specs, devices, current)
            reasons = dict.fromkeys(pools, "initial provisioning")
            self.state = PolicyState()
        else:
            decision = decide(time.monotonic(), specs, observations, budget, self.state,
                              self.config)
            self.state, reasons = decision.state, decision.reasons
            placement = self._place(decision.replicas, specs, devices, current)
        events = []
        for pool, assigned in placement.items():
            before = current.get(pool, [])
            if Counter(assigned) == Counter(before):
                continue
            try:
                await self.backend.scale(pools[pool].launch, assigned)
            except Exception as exc:  # noqa: BLE001 - one pool's trouble must not stall others
                log.error("%s: scaling to %d failed: %s", pool, len(assigned), exc)
                continue
            event = ScaleEvent(at=now(), pool=pool, before=len(before), after=len(assigned),
                               reason=reasons[pool], placement=sorted(assigned))
            events.append(event)
            log.info("%s: %d -> %d replicas (%s)", pool, event.before, event.after, event.reason)
        metrics.record_autoscaler(views, {p: len(a) for p, a in placement.items()}, events)
        return events

    def _residency(
        self, pools: dict[str, Pool], observations: dict[str, PoolObservation],
        devices: list[Device], current: dict[str, list[str]],
    ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """Device hosts: which models each device holds (``autoscaler.residency``)."""
        state = self._residency_state or Residency(self.config.stable_window_s)
        at = time.monotonic()
        rates = state.rates(at, {name: obs.arrival_rate for name, obs in observations.items()})
        wants = {}
        for name, pool in pools.items():
            obs = observations[name]
            rate = obs.measured_service_rate_per_replica
            service_s = 1.0 / rate if rate else 0.0
            wants[name] = max(
                pool.spec.min_replicas,
                self.settings.initial_replicas.get(name, 0) if self._residency_state is None
                else 0,
                copies_wanted(rates.get(name, 0.0), service_s, queued=obs.queued,
                              target_wait_s=max(service_s, self.settings.autoscale_tick_s),
                              most=len(devices)),
            )
        held, self._residency_state = state.step(at, wants, rates)
        needs = {name: PoolNeed(name, pool.spec.memory_bytes, held[name])
                 for name, pool in pools.items()}
        placement = plan_residency(needs, devices, current)
        reasons = {name: f"resident on {len(placement[name])} of {len(devices)} devices "
                   f"(wants {held[name]})" for name in pools}
        return placement, reasons

    def _place(
        self, replicas: dict[str, int], specs: dict[str, PoolSpec], devices: list[Device],
        current: dict[str, list[str]],
    ) -> dict[str, list[str]]:
        if self.backend.places_replicas:
            return place(replicas, specs, devices, current).assignment
        return {pool: [""] * n for pool, n in replicas.items()}

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, stop_replicas: bool = True) -> None:
        metrics.serve(self.settings.autoscaler_metrics_port, self.settings.host)
        nc = await bus.connect(self.settings, name="autoscaler")
        js = nc.jetstream()
        buckets = await bus.ensure_topology(js, self.settings)
        registry = WorkflowRegistry(buckets[subjects.WORKFLOW_BUCKET])
        await registry.start()
        observer = ClusterObserver(nc)
        await observer.start()
        await self.backend.start()
        period = self.settings.autoscale_tick_s
        try:
            while not stop.is_set():
                started = time.monotonic()
                observer.news.clear()  # what comes from now on is for the next tick
                try:
                    for event in await self.tick(registry, observer):
                        await nc.publish(subjects.AUTOSCALER_EVENTS, encode(event))
                except Exception:  # noqa: BLE001 - one bad tick must not stop scaling
                    log.exception("autoscaler tick failed")
                # the next tick: after the period, or sooner when admission reports turning
                # work away (a burst the queues do not show), but never within MIN_TICK_GAP_S
                await asyncio.sleep(max(0.0, MIN_TICK_GAP_S - (time.monotonic() - started)))
                wake = [asyncio.ensure_future(stop.wait()),
                        asyncio.ensure_future(observer.news.wait())]
                left = max(0.0, period - (time.monotonic() - started))
                await asyncio.wait(wake, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for waiting in wake:
                    waiting.cancel()
        finally:
            await self.backend.close(stop_replicas=stop_replicas)
            with contextlib.suppress(Exception):  # NATS may be gone already
                await observer.stop()
                await registry.stop()
            await bus.close(nc)
