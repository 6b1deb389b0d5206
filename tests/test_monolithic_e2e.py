"""`lego up --monolithic` end to end: every shipped workflow served as one node type (the
baseline), through the same gateway, ingress, runner and autoscaler. Each image equals what the
micro-served path makes for the same request (computed here by the micro cores node by node,
which tests/test_cores.py ties to diffusers)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from legoclient import LegoClient
from PIL import Image

from common.models import resolve_model_dir
from common.subjects import pool_name
from lego.stack import Stack
from services.catalog import CORES
from tests.conftest import nats_server
from tests.stackutil import png_pixels, running_stack
from tests.test_monolithic import SPECS, run_micro

pytestmark = pytest.mark.timeout(300)

PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(
    PNG, "PNG")
CASES = {
    "txt2img": {},
    "txt2img-safe": {},
    "txt2img-hires": {"upscale_steps": 2},
    "img2img": {"strength": 0.6, "image": base64.b64encode(PNG.getvalue()).decode()},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("monolithic")
    with nats_server(tmp / "nats") as url, running_stack(tmp, url, cache_dir, monolithic=True,
                                                         workflows=sorted(CASES)) as st:
        yield st


@pytest.fixture(scope="module")
def micro(cache_dir: Path):  # noqa: ANN201
    dirs = {alias: resolve_model_dir(f"builtin:tiny-{name}", cache_dir / "models")
            for alias, name in (("base", "sd"), ("upscaler", "upscaler"))}
    loaded: dict = {}

    def get(kind: str, alias: str):  # noqa: ANN202
        if (kind, alias) not in loaded:
            loaded[kind, alias] = CORES[kind](dirs[alias])
            loaded[kind, alias].load()
        return loaded[kind, alias]

    return get


@pytest.mark.parametrize("workflow", sorted(CASES))
def test_every_workflow_monolithic_equals_micro(stack: Stack, micro, workflow: str) -> None:  # noqa: ANN001
    with LegoClient(stack.gateway_url) as client:
        state, png = client.generate(workflow, prompt="a lighthouse", seed=7, steps=3,
                                     **CASES[workflow])
    assert state.status == "succeeded"
    [timing] = state.timings  # one node ran the whole workflow
    assert timing.node == "pipeline"
    assert timing.pool == pool_name("monolithic", workflow)

    spec = SPECS[workflow]
    params = state.params  # as the ingress validated them (defaults filled in)
    images = {}
    if workflow == "img2img":
        pixels = np.asarray(Image.open(io.BytesIO(PNG.getvalue())).convert("RGB"))
        images["image"] = torch.from_numpy(pixels.copy()).unsqueeze(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the node runs: bit-equal results need equal thread counts
    try:
        expected, _ = run_micro(micro, spec, params, images)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(png_pixels(png), expected[0].numpy())


def test_status_shows_one_pool_per_workflow(stack: Stack, capsys) -> None:  # noqa: ANN001
    import json

    from lego.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NATS_URL", stack.settings.nats_url)
        assert main(["status", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert set(models) == {pool_name("monolithic", name) for name in SPECS}
    assert all(m["kind"] == "monolithic" and m["ready"] >= 1 for m in models.values())
