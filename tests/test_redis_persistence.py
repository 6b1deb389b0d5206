"""Finished images survive a restart of Redis as the shipped deployments run it (compose and
Kubernetes: an append-only file on a persistent volume): a real redis-server started with
compose's flags is SIGKILLed after a request succeeded and started again on the same
directory, and the image is still served, the same bytes."""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from redis import Redis
from redis.exceptions import RedisError

from lego.stack import free_port
from tests.conftest import redis_server_binary
from tests.stackutil import txt2img_stack

pytestmark = pytest.mark.timeout(240)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
QUICK = {"prompt": "a kept image", "steps": 2, "width": 32, "height": 32, "seed": 3}


def _flags(command: str) -> list[str]:
    """redis-server's arguments in a container's ``sh -c 'exec redis-server ...'``, without the
    password (the test's server has none)."""
    words = shlex.split(command.replace("$$", "$"))
    args = words[words.index("redis-server") + 1:]
    at = args.index("--requirepass")
    return args[:at] + args[at + 2:]


def _option(flags: list[str], name: str) -> str | None:
    return flags[flags.index(name) + 1] if name in flags else None


def compose_flags() -> list[str]:
    redis = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["redis"]
    flags = _flags(redis["command"][-1])
    mounts = dict(volume.split(":")[:2] for volume in redis["volumes"])
    assert mounts.get("redis-data") == _option(flags, "--dir"), "the AOF is on the volume"
    return flags


def kubernetes_flags() -> list[str]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "redis.yaml").read_text()))
    [workload] = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    [container] = workload["spec"]["template"]["spec"]["containers"]
    flags = _flags(container["command"][-1])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == _option(flags, "--dir")]
    claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
    assert mount["name"] in claims, "the AOF is on a PersistentVolumeClaim, not an emptyDir"
    return flags


def test_both_deployments_keep_an_append_only_file() -> None:
    for flags in (compose_flags(), kubernetes_flags()):
        assert _option(flags, "--appendonly") == "yes", flags
        assert _option(flags, "--appendfsync") == "everysec", flags


def test_finished_images_survive_a_redis_restart(cache_dir: Path, tmp_path: Path) -> None:
    flags = compose_flags()
    at = flags.index("--dir")
    flags = flags[:at] + flags[at + 2:]
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(
            [redis_server_binary(), *flags, "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        with Redis(port=port, socket_timeout=1) as client:
            while time.monotonic() < deadline:  # PONG once the append-only file is replayed
                assert proc.poll() is None, "redis-server exited"
                with contextlib.suppress(RedisError):
                    if client.ping():
                        return proc
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    redis = start()
    try:
        with txt2img_stack(tmp_path, cache_dir, redis_url=f"redis://127.0.0.1:{port}/0"
                           ) as stack, httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            state = http.post("/v1/generations?wait=60", json=QUICK).json()
            assert state["status"] == "succeeded", state
            image = http.get(f"/v1/generations/{state['id']}/image")
            assert image.status_code == 200
            time.sleep(1.5)  # appendfsync everysec: what is older than a second is on disk

            redis.send_signal(signal.SIGKILL)
            redis.wait(10)
            redis = start()

            deadline = time.monotonic() + 20
            while True:  # the gateway's store client reconnects on its next call
                again = http.get(f"/v1/generations/{state['id']}/image")
                if again.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert again.status_code == 200, again.text
            assert again.content == image.content
            after = http.post("/v1/generations?wait=60", json={**QUICK, "seed": 4}).json()
            assert after["status"] == "succeeded", after
    finally:
        if redis.poll() is None:
            redis.terminate()
            redis.wait(10)
