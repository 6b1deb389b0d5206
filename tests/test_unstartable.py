"""Parts that cannot start, against real servers (nats-server, the gateway, node processes):
a model directory without a safety checker serves every workflow but the one that checks
images, and says so; a pool whose model cannot load is reported with its error and retried
with a back-off, while the workflows that do not need it serve."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from legoclient import LegoClient

from common import bus, subjects
from common.models import resolve_model_dir
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.workflow import builtin_workflows, offered_workflows
from tests.conftest import nats_server
from tests.stackutil import ReplicaWatch, png_pixels, running_stack

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent


def copy_builtin(cache_dir: Path, name: str, to: Path) -> Path:
    """A copy of builtin ``name`` (built into ``cache_dir`` on first use) at ``to``."""
    shutil.copytree(resolve_model_dir(f"builtin:{name}", cache_dir / "models"), to)
    return to


def without_safety_checker(cache_dir: Path, to: Path) -> Path:
    """tiny-sd as many published checkpoints are: no safety checker (diffusers writes
    ``[null, null]`` for it when a pipeline is saved without one)."""
    model = copy_builtin(cache_dir, "tiny-sd", to)
    shutil.rmtree(model / "safety_checker")
    index = json.loads((model / "model_index.json").read_text())
    index.update(safety_checker=[None, None], requires_safety_checker=False)
    (model / "model_index.json").write_text(json.dumps(index))
    return model


def test_generate_on_a_model_without_a_safety_checker(tmp_path: Path, cache_dir: Path) -> None:
    """`lego generate --model DIR` makes its image with the embedded stack; txt2img-safe is
    not offered for DIR, and the command says why."""
    model = without_safety_checker(cache_dir, tmp_path / "no-checker")
    shm_root = Path("/dev/shm") / f"lego-test-{uuid.uuid4().hex[:12]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGO_") and k != "NATS_URL"}
    env.update(
        LEGO_CACHE_DIR=str(cache_dir), LEGO_RUN_DIR=str(tmp_path / "run"),
        LEGO_SHM_ROOT=str(shm_root), LEGO_TORCH_THREADS="1", HF_HUB_OFFLINE="1",
        # the workflows the model can and cannot serve, and no more pools: fewer processes
        LEGO_WORKFLOWS='["txt2img", "txt2img-safe"]',
    )

    def lego(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lego.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout_s)

    try:
        # the workflow the model cannot serve is refused before any stack starts
        refused = lego("generate", "a red fox", "--model", str(model), "--workflow",
                       "txt2img-safe", timeout_s=60)
        assert refused.returncode == 2, refused.stderr
        assert "txt2img-safe cannot run on" in refused.stderr
        assert "safety_checker" in refused.stderr
        out = tmp_path / "fox.png"
        done = lego("generate", "a red fox", "--model", str(model), "--seed", "1",
                    "--steps", "2", "-o", str(out), timeout_s=200)
        assert done.returncode == 0, done.stderr[-3000:]
        assert png_pixels(out.read_bytes()).shape == (64, 64, 3)
        assert "not offered  txt2img-safe" in done.stderr, done.stderr[-3000:]
        assert f"{model} lacks" in done.stderr
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)


def test_a_pool_that_cannot_load_is_reported_and_the_rest_serves(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture,
) -> None:
    """txt2img-hires on an upscaler whose weights are truncated: the stack becomes ready and
    names the pool that cannot start; txt2img serves; txt2img-hires answers 503 with the
    pool's error; /v1/cluster and `lego status --json` show it; the one replica tries again
    with a growing back-off instead of crash-looping."""
    upscaler = copy_builtin(cache_dir, "tiny-upscaler", tmp_path / "broken-upscaler")
    weights = upscaler / "unet" / "diffusion_pytorch_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with nats_server(tmp_path / "nats") as url, running_stack(
        tmp_path, url, cache_dir, workflows=["txt2img", "txt2img-hires"],
        upscaler_model=str(upscaler),
    ) as stack:
        [pool] = stack.failed_pools
        assert pool.startswith("upscaler") and stack.workflows_using(pool) == ["txt2img-hires"]
        assert "diffusion_pytorch_model.safetensors" in stack.failed_pools[pool]

        async def attempts() -> list:
            """The first failed report of each attempt, for three attempts in a row."""
            seen: dict[int, object] = {}
            async with ReplicaWatch(stack.settings) as watch:
                def third() -> bool:
                    for s in watch.latest.values():
                        if s.pool == pool and s.state == "failed":
                            seen.setdefault(s.failures, s)
                    return len(seen) >= 3 and max(seen) >= min(seen) + 2
                await watch.until(third, timeout_s=60)
            return [seen[n] for n in sorted(seen)[-3:]]

        first, second, third = asyncio.run(attempts())
        # one replica, tried again in its process with a doubling wait: no crash loop
        assert first.replica == second.replica == third.replica
        assert third.failures == second.failures + 1 == first.failures + 2
        assert second.retry_in_s > 1.3 * first.retry_in_s
        assert third.retry_in_s > 1.3 * second.retry_in_s

        with LegoClient(stack.gateway_url) as client:
            state, png = client.generate("txt2img", prompt="a fox", seed=1, steps=2)
        assert state.status == "succeeded" and png_pixels(png).shape == (64, 64, 3)

        refused = httpx.post(f"{stack.gateway_url}/v1/generations",
                             json={"workflow": "txt2img-hires", "prompt": "a fox"}, timeout=30)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unavailable" and pool in error["message"]
        assert int(refused.headers["Retry-After"]) >= 1

        cluster = httpx.get(f"{stack.gateway_url}/v1/cluster", timeout=30).json()
        view = cluster["models"][pool]
        assert view["failed"] == 1 and view["ready"] == 0 and view["failures"] >= 1
        assert "diffusion_pytorch_model.safetensors" in view["error"]
        assert cluster["models"][next(p for p in cluster["models"] if p.startswith("denoiser"))][
            "ready"] >= 1
        # the gateway stays ready (txt2img serves) and its readiness names the pool and why
        readiness = httpx.get(f"{stack.gateway_url}/readyz", timeout=30)
        assert readiness.status_code == 200
        assert readiness.json()["unstartable"] == {pool: view["error"]}

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("NATS_URL", stack.settings.nats_url)
            from lego.cli import main

            assert main(["status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)["models"][pool]
        assert status["failed"] == 1 and status["error"] == view["error"]



async def test_a_stack_on_a_model_without_a_checker_unregisters_the_earlier_safe_workflow(
    settings: Settings, cache_dir: Path, tmp_path: Path,
) -> None:
    """The workflows an earlier run registered (on the builtin model) do not outlive a run on
    a directory that cannot serve one of them: the gateway's seed is what the stack serves."""
    model = without_safety_checker(cache_dir, tmp_path / "no-checker")
    nc = await bus.connect(settings, name="test-registry")
    try:
        bucket = (await bus.ensure_topology(nc.jetstream(), settings))[subjects.WORKFLOW_BUCKET]
        earlier = WorkflowRegistry(bucket)
        await earlier.start(builtin_workflows())  # a `lego up` on the builtin model
        await earlier.stop()
        offered, left_out = offered_workflows(settings.model_copy(update={"base_model":
                                                                          str(model)}))
        assert set(left_out) == {"txt2img-safe"}
        now = WorkflowRegistry(bucket)
        await now.start(offered)  # `lego up --model DIR`
        await now.stop()
        assert set(now.all()) == set(offered)
        assert now.all()["txt2img"].models["base"] == str(model)
        unseeded = WorkflowRegistry(bucket)  # a gateway that seeds nothing removes nothing
        await unseeded.start()
        await unseeded.stop()
        assert set(unseeded.all()) == set(offered)
    finally:
        await nc.close()
