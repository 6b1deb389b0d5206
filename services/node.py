"""A node process: one replica of one model pool (``lego node KIND --model SPEC``)."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from common.bus import run_async
from common.models import resolve_model_dir
from common.settings import Settings
from common.subjects import pool_name
from services.catalog import CORES
from services.runner import NodeRunner

log = logging.getLogger(__name__)


def build_runner(
    kind: str, model: str, settings: Settings, max_batch: int | None = None
) -> NodeRunner:
    if kind not in CORES:
        raise SystemExit(f"unknown node kind {kind!r}; known: {', '.join(sorted(CORES))}")
    core = CORES[kind](
        resolve_model_dir(model, settings.cache_dir / "models"),
        device=settings.device,
        max_batch=max_batch or settings.max_batch,
    )
    return NodeRunner(core, pool_name(kind, model), model, settings)


def run_node(kind: str, model: str, settings: Settings, max_batch: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain: finish and ack what is held, and exit."""
    torch.set_num_threads(settings.torch_threads)
    runner = build_runner(kind, model, settings, max_batch)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.drain)
        await runner.serve()

    run_async(main())
