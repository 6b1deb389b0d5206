"""A node process: one replica of one model pool (``lego node KIND --model SPEC``), or of a whole
workflow (``lego node monolithic --model WORKFLOW``, the monolithic baseline)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal

import torch

from common import bus, subjects
from common.errors import UnknownWorkflow
from common.kinds import pool_of
from common.models import resolve_model_dir
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.workflow import WorkflowSpec, shipped_workflows
from services import liveness
from services.catalog import CORES, core_class
from services.core import ModelCore, ModelSource
from services.monolithic import MonolithicCore
from services.runner import NodeRunner
from services.schemes import SCHEMES, scheme_of, shared_scheme

log = logging.getLogger(__name__)


def build_runner(
    kind: str, model: str, settings: Settings, max_batch: int | None = None,
    replica: str | None = None,
) -> NodeRunner:
    """The runner of one replica (``build_core``'s core on a host of its own). ``replica``:
    its id when a process hosts several."""
    core, pool = build_core(kind, model, settings, max_batch, replica)
    return NodeRunner(core, pool, model, settings, replica=replica,
                      rebuild=lambda: build_core(kind, model, settings, max_batch, replica)[0])


def build_core(
    kind: str, model: str, settings: Settings, max_batch: int | None = None,
    replica: str | None = None,
) -> tuple[ModelCore, str]:
    """The core of one replica and its pool: ``model`` is a model spec, or for ``kind ==
    "monolithic"`` the name of the workflow to serve whole (shipped, else read from the
    workflow bucket: call this outside a running event loop then, as ``run_node`` does).
    Models of a scheme a plug-in registered (``services.schemes``) get that plug-in's cores;
    a workflow served whole does when all its models share the scheme."""
    max_batch = max_batch or settings.max_batch
    models_dir = settings.cache_dir / "models"
    core: ModelCore
    if kind == MonolithicCore.kind:
        spec = _workflow(model, settings)
        scheme = shared_scheme(spec.models.values())
        if scheme is not None:
            core = SCHEMES[scheme].pipeline(spec, settings, max_batch=max_batch,
                                            replica=replica or f"{spec.name}@{os.getpid()}")
        else:
            dirs = {alias: resolve_model_dir(m, models_dir) for alias, m in spec.models.items()}
            core = MonolithicCore(spec, dirs, device=settings.device, max_batch=max_batch,
                                  dtype=settings.dtype)
            core.source = ModelSource(dirs.__getitem__, settings.lora_dir)  # LoRAs only
        return core, spec.monolithic_pool()
    if kind in CORES:
        scheme = scheme_of(model)
        if scheme is not None:
            core = SCHEMES[scheme].node(kind, model, settings, max_batch=max_batch)
        else:
            model_dir = resolve_model_dir(model, models_dir)
            core = core_class(kind, model_dir)(
                model_dir, device=settings.device, max_batch=max_batch, dtype=settings.dtype)
            core.source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models_dir),
                                      settings.lora_dir)
        return core, pool_of(kind, model)
    known = ", ".join(sorted([*CORES, MonolithicCore.kind]))
    raise SystemExit(f"unknown node kind {kind!r}; known: {known}")


def _workflow(name: str, settings: Settings) -> WorkflowSpec:
    """A shipped workflow on the configured models (as the gateway seeds them; a plug-in
    workload's with ``settings.workload``), else the one registered at run time under
    ``name``."""
    shipped = shipped_workflows(settings.model_copy(update={"workflows": []}))
    if name in shipped:
        return shipped[name]

    async def fetch() -> WorkflowSpec:
        nc = await bus.connect(settings, name=f"monolithic-{name}")
        try:
            bucket = await nc.jetstream().key_value(subjects.WORKFLOW_BUCKET)
            return await WorkflowRegistry.fetch(bucket, name)
        finally:
            await nc.close()

    try:
        return bus.run_async(fetch())
    except UnknownWorkflow as exc:
        raise SystemExit(str(exc)) from None


def run_node(kind: str, model: str, settings: Settings, max_batch: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: finish and ack what is held, and exit."""
    torch.set_num_threads(settings.torch_threads)
    runner = build_runner(kind, model, settings, max_batch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.drain)
        liveness.watch(runner.host.liveness, runner.replica)
        await runner.serve()

    bus.run_async(main())
