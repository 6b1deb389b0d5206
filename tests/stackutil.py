"""Helpers for tests that run the real stack: real nats-server, node processes, gateway."""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common.lifetime import stat_fields
from common.settings import Settings
from lego.stack import Child, Stack, free_port
from tests.conftest import nats_server


@contextlib.contextmanager
def running_stack(
    tmp: Path, nats_url: str, cache_dir: Path, progress: Callable[[str], None] | None = None,
    **overrides: object,
) -> Iterator[Stack]:
    shm_root = Path("/dev/shm") / f"lego-test-{uuid.uuid4().hex[:12]}"
    # Functional tests must not fail on this shared machine's scheduling noise: default
    # deadlines (the SLO, 2x solo latency) only apply where a test asks for them.
    overrides.setdefault("slo_min_s", 600.0)
    settings = Settings(
        nats_url=nats_url, cache_dir=cache_dir, shm_root=shm_root, run_dir=tmp / "run",
        torch_threads=1, retry_backoff_s=0.1, **overrides,
    )
    stack = Stack(settings, port=free_port(), progress=progress)
    stack.start(timeout_s=240)
    try:
        yield stack
    finally:
        stack.stop(timeout_s=30)
        shutil.rmtree(shm_root, ignore_errors=True)


@contextlib.contextmanager
def txt2img_stack(tmp: Path, cache_dir: Path, **overrides: object) -> Iterator[Stack]:
    """A stack on a nats-server of its own serving txt2img alone, at its starting replicas
    (``overrides``: more settings)."""
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, workflows=["txt2img"], autoscale=False, **overrides,
    ) as stack:
        yield stack


def stopped(stack: Stack, child: Child, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
    """Send ``child`` ``sig`` and wait for it to end: its exit code. If it does not end within
    ``timeout_s``, it is asked where it waits (SIGUSR1), and the test fails with its log's end."""
    assert child.proc is not None
    child.proc.send_signal(sig)
    try:
        return child.proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        log = (stack.settings.run_dir / "logs" / f"{child.name}.log").read_text(errors="replace")
        raise AssertionError(f"{child.name} did not stop within {timeout_s:g} s; the end of its "
                             f"log:\n{log[-12000:]}") from None


def respawned_gateway(stack: Stack, http: httpx.Client, timeout_s: float = 120) -> None:
    """Start the stack's gateway again and wait until it is ready."""
    gateway = stack.children[0]
    assert gateway.name == "gateway"
    stack._spawn(gateway)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        assert time.monotonic() < deadline, "the gateway did not come back"
        time.sleep(0.2)


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


class ReplicaWatch:
    """Follows the replicas' status reports (``lego.replicas.>``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.latest: dict[str, object] = {}

    async def __aenter__(self) -> ReplicaWatch:
        from common import bus, subjects
        from common.messages import ReplicaStatus, decode

        self.nc = await bus.connect(self.settings, name="test-watch")

        async def on_status(msg: object) -> None:
            status = decode(msg.data, ReplicaStatus)  # type: ignore[attr-defined]
            self.latest[status.replica] = status

        self.sub = await self.nc.subscribe(subjects.REPLICAS_WILDCARD, cb=on_status)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.drain()

    def ready(self, kind: str) -> list:
        return [s for s in self.latest.values() if s.kind == kind and s.state == "ready"]

    async def until(self, predicate, timeout_s: float = 120.0):  # noqa: ANN001, ANN201
        import asyncio

        async with asyncio.timeout(timeout_s):
            while not (found := predicate()):
                await asyncio.sleep(0.05)
        return found


def replica_pid(replica: str) -> int:
    return int(replica.rsplit(":", 1)[1])


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` (not necessarily our child) exits within ``timeout_s``; a zombie
    counts as gone (its parent, e.g. the autoscaler, reaps it on its next tick)."""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = stat_fields(pid)[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


