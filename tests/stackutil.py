"""Helpers for tests that run the real stack: real nats-server, node processes, gateway."""

from __future__ import annotations

import contextlib
import io
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from common.settings import Settings
from lego.stack import Stack, free_port


@contextlib.contextmanager
def running_stack(tmp: Path, nats_url: str, cache_dir: Path, **overrides: object) -> Iterator[Stack]:
    shm_root = Path("/dev/shm") / f"lego-test-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        nats_url=nats_url, cache_dir=cache_dir, shm_root=shm_root, run_dir=tmp / "run",
        torch_threads=1, retry_backoff_s=0.1, **overrides,
    )
    stack = Stack(settings, port=free_port())
    stack.start(timeout_s=240)
    try:
        yield stack
    finally:
        stack.stop(timeout_s=30)
        shutil.rmtree(shm_root, ignore_errors=True)


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
