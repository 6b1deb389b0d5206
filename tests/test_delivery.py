"""Delivery guarantees against real processes: a replica killed with SIGKILL mid-task loses
nothing, SIGTERM drains, and a task that keeps failing fails its request after max_deliver."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from legoclient import LegoClient

from lego.stack import Stack
from tests.conftest import nats_server
from tests.stackutil import ReplicaWatch, png_pixels, replica_pid, running_stack, wait_gone

pytestmark = pytest.mark.timeout(300)

SLOW = {"prompt": "a slow one", "steps": 60, "width": 128, "height": 128, "seed": 5}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("delivery")
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, ack_wait_s=3.0, max_deliver=3
    ) as st:
        yield st


async def _submit_slow(stack: Stack, client: LegoClient, seed: int, replicas: int = 2):  # noqa: ANN202
    """Once ``replicas`` denoisers are ready, submit a slow request; return (id, its replica)."""
    async with ReplicaWatch(stack.settings) as watch:
        await watch.until(lambda: len(watch.ready("denoiser")) >= replicas)
        request_id = client.submit("txt2img", **{**SLOW, "seed": seed}).id
        await watch.until(lambda: client.status(request_id).progress, timeout_s=60)
        [holder] = await watch.until(
            lambda: [s for s in watch.ready("denoiser") if s.held > 0], timeout_s=10
        )
        return request_id, holder


def test_sigkill_mid_task_loses_nothing(stack: Stack) -> None:
    stack.add_node("denoiser")
    with LegoClient(stack.gateway_url) as client:
        request_id, holder = asyncio.run(_submit_slow(stack, client, SLOW["seed"]))
        os.kill(replica_pid(holder.replica), signal.SIGKILL)
        state = client.wait(request_id, timeout_s=120)
        assert state.status == "succeeded", state
        denoise = next(t for t in state.timings if t.node == "denoise")
        assert denoise.attempt == 2 and denoise.replica != holder.replica
        # the re-run is deterministic: the same image as an undisturbed run
        _, png = client.generate("txt2img", **SLOW)
        assert np.array_equal(png_pixels(client.image(request_id)), png_pixels(png))


def test_sigterm_drains(stack: Stack) -> None:
    stack.add_node("denoiser")
    with LegoClient(stack.gateway_url) as client:
        request_id, holder = asyncio.run(_submit_slow(stack, client, seed=6))
        pid = replica_pid(holder.replica)
        os.kill(pid, signal.SIGTERM)
        state = client.wait(request_id, timeout_s=120)
        assert state.status == "succeeded"
        denoise = next(t for t in state.timings if t.node == "denoise")
        assert denoise.attempt == 1 and denoise.replica == holder.replica
        assert wait_gone(pid, timeout_s=30)


def test_task_a_node_cannot_run_fails_its_request_at_once(stack: Stack) -> None:
    with LegoClient(stack.gateway_url) as client:
        spec = next(w for w in client.workflows() if w["name"] == "txt2img")
        spec = {k: v for k, v in spec.items() if k != "pools"}
        # The decoder gets text embeddings instead of latents: no replica can ever run it.
        spec["name"] = "broken"
        spec["nodes"]["decode"]["inputs"] = {"latents": "encode.prompt_embeds"}
        spec["nodes"].pop("denoise")
        client.add_workflow(spec)
        state = client.wait(client.submit("broken", prompt="x").id, timeout_s=60)
    assert state.status == "failed"
    assert state.error.node == "decode"
    assert state.error.details["attempts"] == 1  # terminal: not retried
    assert "latents" in state.error.message


def test_task_whose_replicas_all_died_fails_its_request(tmp_path: Path, cache_dir: Path) -> None:
    """max_deliver=1: the only delivery dies with its replica, JetStream gives up and says so
    (MAX_DELIVERIES advisory), and the ingress fails the request instead of dropping it."""
    with nats_server(tmp_path / "nats") as url, running_stack(
        tmp_path, url, cache_dir, ack_wait_s=2.0, max_deliver=1
    ) as st, LegoClient(st.gateway_url) as client:
        request_id, holder = asyncio.run(_submit_slow(st, client, seed=8, replicas=1))
        os.kill(replica_pid(holder.replica), signal.SIGKILL)
        state = client.wait(request_id, timeout_s=60)
    assert state.status == "failed"
    assert state.error.code == "max_deliveries"
    assert state.error.node == "denoise"
