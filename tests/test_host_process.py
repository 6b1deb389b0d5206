"""Device-host processes against a real nats-server: the backend that writes residency into KV
``lego-residency`` (compare-and-set, stopping replicas), a `lego host` process following its
entry (a pool that fails to load is retried, the others go on), and `lego up` with
``device_hosts`` on two CPU "devices": the same image as diffusers (and so as the default
stack) for the same seed, and no request lost when a host is killed."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from legoclient import LegoClient

from autoscaler.backends import PoolLaunch
from autoscaler.backends.hosts import HostsBackend, host_devices, host_processes
from autoscaler.service import devices_of
from common import bus, subjects
from common.kinds import pool_of
from common.messages import HostResidency, ReplicaStatus, ResidentPool, encode, now
from common.models import resolve_model_dir
from common.settings import Settings, load_settings
from lego.stack import Stack, hosted
from services.hostproc import HostProcess, torch_device
from tests.conftest import nats_server
from tests.stackutil import ReplicaWatch, png_pixels, running_stack, stopped
from tests.test_delivery import SLOW, _submit_slow
from tests.test_e2e import diffusers_image

pytestmark = pytest.mark.timeout(300)


class Residencies:
    """The residency bucket, read and written from a connection of the test's own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Residencies:
        self.nc = await bus.connect(self.settings, name="test-residency")
        self.bucket = (await bus.ensure_topology(self.nc.jetstream(), self.settings))[
            subjects.RESIDENCY_BUCKET]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def pools(self, key: str) -> list[str]:
        return [p.pool for p in HostResidency.of((await self.bucket.get(key)).value).pools]

    async def put(self, key: str, *pools: ResidentPool) -> None:
        await self.bucket.put(key, encode(HostResidency(list(pools))))


def _resident(kind: str, model: str) -> ResidentPool:
    return ResidentPool(pool_of(kind, model), kind, model)


def test_host_keys_and_devices() -> None:
    assert subjects.host_key("cuda:0") == "cuda-0"
    assert subjects.host_key("lego-hosts-3") == "lego-hosts-3"  # a pod name is a key as is
    assert subjects.host_key("node.a:1") == "node-a-1"  # "." would split the subject
    with pytest.raises(ValueError):
        subjects.host_key(":")
    assert torch_device("cpu:1") == "cpu" and torch_device("cuda:1") == "cuda:1"
    settings = Settings(device_hosts=True)
    assert host_processes(settings, "local") and host_processes(settings, "kubernetes")
    assert not host_processes(settings, "emulated")  # it hosts replicas in its own process
    assert not host_processes(Settings(), "local")


def test_a_machine_without_devices_has_a_cpu_host_per_core_and_lego_up_hosts_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cores = len(os.sched_getaffinity(0))
    assert host_devices(Settings()) == [f"cpu:{i}" for i in range(cores)]
    assert host_devices(Settings(cpu_hosts=3)) == ["cpu:0", "cpu:1", "cpu:2"]
    assert host_devices(Settings(devices=["cuda:0"], cpu_hosts=3)) == ["cuda:0"]
    cpus = devices_of(Settings(device_hosts=True, cpu_hosts=2), slots=5)
    assert [(d.id, d.slots) for d in cpus] == [("cpu:0", 3), ("cpu:1", 2)]
    assert [d.id for d in devices_of(Settings(), slots=5)] == ["cpu:0"]  # no hosts: one CPU
    monkeypatch.delenv("LEGO_DEVICE_HOSTS", raising=False)
    monkeypatch.delenv("LEGO_CPU_HOSTS", raising=False)
    # `lego up` and `lego generate`'s embedded stack run device hosts unless told otherwise
    assert hosted(load_settings()).device_hosts
    assert hosted(load_settings(), cpu_hosts=1).cpu_hosts == 1
    monkeypatch.setenv("LEGO_DEVICE_HOSTS", "false")
    monkeypatch.setenv("LEGO_CPU_HOSTS", "4")
    chosen = hosted(load_settings(), cpu_hosts=1)
    assert not chosen.device_hosts and chosen.cpu_hosts == 4


# --- the backend ------------------------------------------------------------------------------

@pytest.fixture
async def backend(settings: Settings) -> AsyncIterator[HostsBackend]:
    backend = HostsBackend(settings, ["cpu:0", "cpu:1"])
    await backend.start()
    yield backend
    await backend.close(stop_replicas=False)


async def _replicas(backend: HostsBackend) -> dict[str, list[tuple[str, str]]]:
    return {pool: sorted((r.device, r.state) for r in infos)
            for pool, infos in (await backend.replicas()).items()}


def _stopped(replica: str, pool: str) -> ReplicaStatus:
    return ReplicaStatus(replica=replica, pool=pool, kind="vae_decoder", model="m",
                         state="stopped", held=0, max_batch=1, load_s=0.0, tasks_done=0,
                         tasks_failed=0, batches=0, batch_items=0, at=now())


async def test_the_backend_lists_each_pool_in_the_entries_of_its_devices(
    settings: Settings, backend: HostsBackend,
) -> None:
    a, b = PoolLaunch("pool-a", "vae_decoder", "m-a"), PoolLaunch("pool-b", "denoiser", "m-b")
    async with Residencies(settings) as kv:
        await backend.scale(a, ["cpu:0", "cpu:1"])
        await backend.scale(b, ["cpu:1"])
        assert await kv.pools("cpu-0") == ["pool-a"]
        assert await kv.pools("cpu-1") == ["pool-a", "pool-b"]
        assert await _replicas(backend) == {
            "pool-a": [("cpu:0", "running"), ("cpu:1", "running")],
            "pool-b": [("cpu:1", "running")],
        }
        entry = HostResidency.of((await kv.bucket.get("cpu-1")).value)
        assert entry.pools[1] == ResidentPool("pool-b", "denoiser", "m-b")

        # another writer got there first: the backend's revision is stale, so it reads the
        # entry again and keeps what the other wrote
        await kv.put("cpu-1", *entry.pools, ResidentPool("pool-x", "upscaler", "m-x"))
        await backend.scale(b, [])
        assert await kv.pools("cpu-1") == ["pool-a", "pool-x"]
        # removed: stopping until its replica says it stopped
        replicas = await _replicas(backend)
        assert replicas["pool-b"] == [("cpu:1", "stopping")]
        assert replicas["pool-x"] == [("cpu:1", "running")]
        await kv.nc.publish(subjects.replica_subject("pool-b"),
                            encode(_stopped("pool-b@cpu-1", "pool-b")))
        async with asyncio.timeout(10):
            while "pool-b" in await backend.replicas():
                await asyncio.sleep(0.05)

        # an autoscaler that starts again finds what is resident
        again = HostsBackend(settings, ["cpu:0", "cpu:1"])
        await again.start()
        try:
            assert await _replicas(again) == {
                "pool-a": [("cpu:0", "running"), ("cpu:1", "running")],
                "pool-x": [("cpu:1", "running")],
            }
            await again.close(stop_replicas=True)  # lego up stopping: every entry emptied
        finally:
            await again.close(stop_replicas=False)
        assert await kv.pools("cpu-0") == [] and await kv.pools("cpu-1") == []


async def test_a_removed_pool_whose_replica_fell_silent_is_gone(
    settings: Settings, backend: HostsBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("autoscaler.backends.hosts.REPLICA_EXPIRY_S", 0.3)
    a = PoolLaunch("pool-a", "vae_decoder", "m-a")
    await backend.scale(a, ["cpu:0"])
    await backend.scale(a, [])  # its host is down: no replica will ever report
    assert await _replicas(backend) == {"pool-a": [("cpu:0", "stopping")]}
    await asyncio.sleep(0.4)
    assert await backend.replicas() == {}


# --- a host process ----------------------------------------------------------------------------

async def test_a_host_serves_what_its_entry_lists_and_retries_a_pool_that_fails(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    process = HostProcess(settings, "cpu:3")
    ready = asyncio.Event()
    serving = asyncio.create_task(process.serve(ready))
    good = _resident("text_encoder", settings.base_model)
    bad = _resident("vae_decoder", "/nonexistent/model")
    replica = f"{good.pool}@cpu-3"
    try:
        await ready.wait()
        async with Residencies(settings) as kv, ReplicaWatch(settings) as watch:
            await kv.put("cpu-3", bad, good)
            [status] = await watch.until(lambda: [s for s in watch.ready("text_encoder")
                                                  if s.replica == replica])
            assert status.device == "cpu:3"

            def failures() -> int:
                return sum(bad.pool in r.getMessage() and "failed to load" in r.getMessage()
                           for r in caplog.records if r.levelno == logging.ERROR)

            await watch.until(lambda: failures() >= 2, timeout_s=30)  # retried, host alive
            assert process.residents[good.pool].task and not serving.done()
            # and reported: failed, with the error, the attempts and when it tries again
            bad_replica = f"{bad.pool}@cpu-3"
            report = await watch.until(lambda: (s := watch.latest.get(bad_replica)) and
                                       s.state == "failed" and s.failures >= 2 and s)
            assert "model_index.json" in report.error and report.kind == "vae_decoder"
            # 1 s after the first failure, doubled after each one since
            assert 0 < report.retry_in_s <= 2.0 ** (report.failures - 1)

            await kv.put("cpu-3")  # nothing resident any more: the pool drains and stops
            await watch.until(lambda: watch.latest[replica].state == "stopped", timeout_s=30)
            await watch.until(lambda: watch.latest[bad_replica].state == "stopped", timeout_s=5)
            await watch.until(lambda: not process.residents, timeout_s=10)
            # listed again: made resident anew
            await kv.put("cpu-3", good)
            await watch.until(lambda: watch.latest[replica].state == "ready", timeout_s=60)
    finally:
        process.drain()
        await asyncio.wait_for(serving, 60)


# --- `lego up` with device hosts on two CPU "devices" ----------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hosts")
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, device_hosts=True, devices=["cpu:0", "cpu:1"],
        workflows=["txt2img"], ack_wait_s=3.0, max_deliver=3,
    ) as st:
        yield st


def _host(stack: Stack, device: str):  # noqa: ANN202 - a lego.stack.Child
    return next(c for c in stack.children if c.name == f"host-{subjects.host_key(device)}")


def test_a_stack_of_device_hosts_makes_the_default_stacks_image(stack: Stack) -> None:
    assert {c.name for c in stack.children} >= {"host-cpu-0", "host-cpu-1"}
    assert not any(c.name.startswith("node-") for c in stack.children)
    params = dict(prompt="a red fox in the snow", negative_prompt="blurry", steps=5,
                  guidance=6.0, height=64, width=48, seed=1234)
    with LegoClient(stack.gateway_url) as client:
        state, png = client.generate("txt2img", **params)
    model_dir = resolve_model_dir(stack.settings.base_model, stack.settings.cache_dir / "models")
    # tests/test_e2e.py: the default stack makes exactly diffusers' image for these
    assert np.array_equal(png_pixels(png), diffusers_image(model_dir, **params))
    replicas = {t.replica for t in state.timings}
    assert all(r.rsplit("@", 1)[1] in ("cpu-0", "cpu-1") for r in replicas)

    async def every_pool_on_both_devices() -> None:  # tiny models: memory for all of them
        async with ReplicaWatch(stack.settings) as watch:
            await watch.until(lambda: len({(s.pool, s.device) for s in watch.latest.values()
                                           if s.state == "ready"}) == 6, timeout_s=60)
            assert {s.device for s in watch.latest.values()} == {"cpu:0", "cpu:1"}
            for status in watch.latest.values():  # loaded in a running process: no start
                parts = status.startup_parts
                assert parts["process"] == 0 and parts["weights"] > 0, parts
                assert sum(parts.values()) == pytest.approx(status.startup_s, abs=0.005)

    asyncio.run(every_pool_on_both_devices())


def test_a_killed_host_loses_no_request(stack: Stack) -> None:
    with LegoClient(stack.gateway_url) as client:
        request_id, holder = asyncio.run(_submit_slow(stack, client, SLOW["seed"]))
        os.kill(_host(stack, holder.device).proc.pid, signal.SIGKILL)
        state = client.wait(request_id, timeout_s=120)
        assert state.status == "succeeded", state
        denoise = next(t for t in state.timings if t.node == "denoise")
        assert denoise.attempt == 2 and denoise.replica != holder.replica
        _, png = client.generate("txt2img", **SLOW)  # undisturbed, on the other host
        assert np.array_equal(png_pixels(client.image(request_id)), png_pixels(png))


def test_sigterm_drains_a_host_and_a_restarted_host_takes_up_its_entry(stack: Stack) -> None:
    with LegoClient(stack.gateway_url) as client:
        request_id, holder = asyncio.run(_submit_slow(stack, client, seed=6, replicas=1))
        host = _host(stack, holder.device)
        assert stopped(stack, host, timeout_s=120) == 0  # drained: finished, acked what it held
        # the only host left is gone; started again (as `lego up`'s supervisor does), it
        # serves what its entry lists, and the request goes on with its next node
        stack._spawn(host)
        state = client.wait(request_id, timeout_s=120)
        assert state.status == "succeeded"
        denoise = next(t for t in state.timings if t.node == "denoise")
        assert denoise.attempt == 1 and denoise.replica == holder.replica


def test_sigusr1_logs_where_each_task_of_a_process_waits() -> None:
    """``kill -USR1`` on a process run by ``bus.run_async`` logs each task's stack and each
    other thread's, so one that seems stuck tells where it waits."""
    code = (
        "import asyncio, logging, threading, time\n"
        "from common.bus import run_async\n"
        "logging.basicConfig()\n"
        "threading.Thread(target=time.sleep, args=(4,), name='sleeper').start()\n"
        "async def parked():\n"
        "    await asyncio.sleep(60)\n"
        "async def main():\n"
        "    task = asyncio.create_task(parked())\n"
        "    await asyncio.sleep(0)\n"
        "    print('up', flush=True)\n"
        "    await asyncio.sleep(3)\n"
        "    task.cancel()\n"
        "run_async(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "of 2, " in err and ", in parked" in err and ", in main" in err
    assert "thread sleeper:" in err and "in _bootstrap" in err.split("thread sleeper:")[1]
