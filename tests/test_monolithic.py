"""The monolithic baseline (a whole workflow in one core) against the micro nodes it is made of.

A request through ``MonolithicCore`` alone must give the bits the micro cores give node by node
(and, for txt2img, the bits of diffusers' StableDiffusionPipeline); requests that arrive at
different times must batch with each other at every stage and still match their solo results.
Both sides run at one torch thread (see tests/test_cores.py for why that matters).
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before diffusers/transformers are imported)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common import bus, subjects
from common.errors import InvalidField
from common.messages import merge_meta
from common.modeldirs import component_class, weights_bytes
from common.models import resolve_model_dir
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.subjects import pool_name
from common.workflow import WorkflowSpec, builtin_workflows
from services.catalog import CORES, footprint_bytes, monolithic_footprint_bytes
from services.core import ModelCore, WorkItem
from services.monolithic import MonolithicCore
from services.node import build_runner
from tests.test_cores import (  # noqa: F401  (one_thread: the autouse fixture)
    NEGATIVE,
    PROMPT,
    _quiet,
    drive,
    gen,
    one,
    one_thread,
    to_uint8,
)

#: the SD family's workflows on model_dirs (the ControlNet and LoRA ones, which attach models of
#: their own, are served whole in tests/test_families.py)
SPECS = {name: spec for name, spec in builtin_workflows({"base": "builtin:tiny-sd"}).items()
         if name not in ("controlnet", "lora")}
IMAGE = torch.from_numpy(np.random.RandomState(5).randint(0, 256, (1, 64, 64, 3), np.uint8))


@pytest.fixture(scope="module")
def model_dirs(cache_dir) -> dict[str, Path]:
    return {
        alias: resolve_model_dir(f"builtin:tiny-{name}", cache_dir / "models")
        for alias, name in (("base", "sd"), ("upscaler", "upscaler"))
    }


@pytest.fixture(scope="module")
def micro(model_dirs) -> Callable[[str, str], ModelCore]:
    """The micro cores, one loaded per (kind, model alias), as the micro node pools hold them."""
    loaded: dict[tuple[str, str], ModelCore] = {}

    def get(kind: str, alias: str) -> ModelCore:
        if (kind, alias) not in loaded:
            torch.set_num_threads(1)
            loaded[kind, alias] = CORES[kind](model_dirs[alias])
            loaded[kind, alias].load()
        return loaded[kind, alias]

    return get


@pytest.fixture(scope="module")
def mono(model_dirs) -> Callable[[str], MonolithicCore]:
    """A loaded MonolithicCore per builtin workflow."""
    loaded: dict[str, MonolithicCore] = {}

    def get(name: str) -> MonolithicCore:
        if name not in loaded:
            torch.set_num_threads(1)
            loaded[name] = MonolithicCore(SPECS[name], model_dirs)
            loaded[name].load()
        return loaded[name]

    return get


def params_for(name: str, seed: int = 7, steps: int = 3) -> tuple[dict, dict[str, torch.Tensor]]:
    """A request's params (as the ingress validates them) and its image inputs."""
    params = {
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": steps, "guidance": 7.5,
        "seed": seed, "width": 64, "height": 64,
    }
    if name == "txt2img-hires":
        params.update(upscale_steps=2, upscale_guidance=0.0)
    if name == "img2img":
        del params["width"], params["height"]
        params.update(strength=0.75, steps=steps + 1, image={"width": 64, "height": 64})
        return params, {"image": IMAGE}
    return params, {}


def run_micro(micro, spec: WorkflowSpec, params: dict, images: dict) -> tuple[torch.Tensor, dict]:
    """The workflow node by node through the micro cores, tensors handed on as the runner does."""
    plan = spec.compile()
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {}
    while plan.output_node not in outputs:
        node = next(
            n for n in plan.nodes if n not in outputs and plan.predecessors(n) <= outputs.keys()
        )
        inputs = {}
        for name, ref in plan.nodes[node].sources().items():
            inputs[name] = images[ref.name] if ref.from_request else outputs[ref.node][ref.name]
        core = micro(spec.nodes[node].kind, spec.nodes[node].model)
        result = one(core, plan.nodes[node].op, params, **inputs)
        outputs[node], meta = result.tensors, merge_meta(meta, result.meta)
    return outputs[plan.output_ref.node][plan.output_ref.name], meta


# --------------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_monolithic_equals_micro_nodes(name, micro, mono):
    params, images = params_for(name)
    expected, expected_meta = run_micro(micro, SPECS[name], params, images)
    core = mono(name)
    state = core.start(WorkItem("r", "run", params, images))
    assert core.progress(state) == (0, len(SPECS[name].nodes))
    [result] = drive(core, [WorkItem("r", "run", params, images)])
    assert set(result.tensors) == {"image"}
    assert result.tensors["image"].dtype == torch.uint8
    assert torch.equal(result.tensors["image"], expected)  # bit-identical
    assert result.meta == expected_meta
    size = 128 if name == "txt2img-hires" else 64
    assert result.tensors["image"].shape == (1, size, size, 3)


@pytest.mark.timeout(60)
def test_monolithic_txt2img_equals_diffusers(model_dirs, mono):
    from diffusers import StableDiffusionPipeline

    pipe = _quiet(
        StableDiffusionPipeline.from_pretrained(
            model_dirs["base"], safety_checker=None, requires_safety_checker=False
        )
    )
    params, _ = params_for("txt2img", seed=1234, steps=4)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64,
        width=64, generator=gen(1234), output_type="np",
    ).images
    [result] = drive(mono("txt2img"), [WorkItem("r", "run", params, {})])
    assert np.array_equal(result.tensors["image"].numpy(), to_uint8(expected))


# --------------------------------------------------------------------------------------------
# continuous batching
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_continuous_batching_across_requests(mono):
    core = mono("txt2img")
    jobs = [(11, 5), (22, 3), (33, 4)]  # (seed, steps)
    items = [WorkItem(f"r{i}", "run", params_for("txt2img", s, n)[0], {}) for i, (s, n) in
             enumerate(jobs)]
    solo = [drive(core, [item])[0].tensors["image"] for item in items]

    unet = core.cores["denoiser", core.model_dirs["base"]].unet  # type: ignore[attr-defined]
    rows: list[int] = []
    hook = unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    try:
        active = [(0, core.start(items[0]))]
        finished: dict[int, torch.Tensor] = {}
        per_step: list[list[int]] = []

        def step() -> None:  # as services.runner: the oldest task's batch-compatible peers
            key = core.batch_key(active[0][1])
            group = [(i, s) for i, s in active if core.batch_key(s) == key][: core.max_batch]
            rows.clear()
            core.step([s for _, s in group])
            per_step.append(list(rows))
            for i, s in group:
                if core.done(s):
                    finished[i] = core.finish(s).tensors["image"]
                    active.remove((i, s))

        step()  # r0: encode
        step()  # r0: denoise step 1
        active += [(i, core.start(items[i])) for i in (1, 2)]
        while active:
            step()
    finally:
        hook.remove()

    # UNet rows per step (2 per request: guidance): r1 and r2 are encoded while r0 denoises,
    # then all three denoise in one forward; the decodes of r0 and r1 run beside r2's last step
    assert per_step == [[], [2], [2], [6], [6], [6], [2], []]
    for i, expected in enumerate(solo):
        # batched convolutions round differently (see test_step_level_batching): a pixel may be
        # one uint8 level off
        diff = (finished[i].int() - expected.int()).abs().max().item()
        assert diff <= 1, (i, diff)


@pytest.mark.timeout(60)
def test_img2img_runs_branches_side_by_side(mono):
    core = mono("img2img")
    params, images = params_for("img2img")
    state = core.start(WorkItem("r", "run", params, images))
    assert set(state.running) == {"encode", "encode_image"}  # both roots of the join at once
    core.step([state])
    assert set(state.running) == {"denoise"} and core.progress(state) == (2, 6)
    with pytest.raises(InvalidField, match="image"):
        core.start(WorkItem("r", "run", params, {}))
    # one VAE serves encoder and decoder, as its footprint counts it
    base = core.model_dirs["base"]
    vaes = {core.cores[kind, base].vae for kind in ("vae_encoder", "vae_decoder")}  # type: ignore[attr-defined]
    assert len(vaes) == 1


@pytest.mark.timeout(60)
def test_a_failing_request_fails_alone(mono):
    core = mono("txt2img")
    good, _ = params_for("txt2img", steps=1)
    bad = {**good, "width": 60}  # not a multiple of 8: the denoiser refuses it after encoding
    states = [core.start(WorkItem(f"r{i}", "run", p, {})) for i, p in enumerate((good, bad))]
    core.step(states)
    assert not core.done(states[0]) and core.done(states[1])
    with pytest.raises(InvalidField, match="width"):
        core.finish(states[1])
    while not core.done(states[0]):
        core.step([states[0]])
    assert core.finish(states[0]).tensors["image"].shape == (1, 64, 64, 3)


# --------------------------------------------------------------------------------------------
# plans, pools, runners, footprints
# --------------------------------------------------------------------------------------------


def test_monolithic_plan_and_pools():
    for name, spec in SPECS.items():
        plan = spec.compile(monolithic=True)
        pool = pool_name("monolithic", name)
        assert spec.monolithic_pool() == pool
        assert list(plan.nodes) == ["pipeline"] and plan.output == "pipeline.image"
        node = plan.nodes["pipeline"]
        assert (node.kind, node.pool, node.op) == ("monolithic", pool, "run")
        assert node.inputs == ({"image": "request.image"} if name == "img2img" else {})
        assert plan.roots() == ["pipeline"] and plan.output_node == "pipeline"
        assert spec.pools(monolithic=True) == {pool: ("monolithic", name)}
        # the default is unchanged: one plan node and one pool per model node
        assert list(spec.compile().nodes) == list(spec.nodes)
        assert all(kind != "monolithic" for kind, _ in spec.pools().values())


def test_build_runner_for_a_builtin_workflow(cache_dir):
    settings = Settings(cache_dir=cache_dir, max_batch=4)
    runner = build_runner("monolithic", "txt2img", settings)
    assert runner.pool == pool_name("monolithic", "txt2img") and runner.model == "txt2img"
    assert isinstance(runner.core, MonolithicCore) and runner.core.max_batch == 4
    assert runner.core.spec == builtin_workflows()["txt2img"]
    with pytest.raises(SystemExit, match="monolithic"):
        build_runner("nope", "txt2img", settings)


@pytest.mark.timeout(60)
def test_build_runner_for_a_registered_workflow(settings):
    spec = SPECS["txt2img-safe"].model_copy(update={"name": "my-safe"})

    async def register() -> None:
        nc = await bus.connect(settings, name="test")
        buckets = await bus.ensure_topology(nc.jetstream(), settings)
        await WorkflowRegistry(buckets[subjects.WORKFLOW_BUCKET]).add(spec)
        await nc.close()

    bus.run_async(register())
    runner = build_runner("monolithic", "my-safe", settings)
    assert runner.pool == pool_name("monolithic", "my-safe")
    assert runner.core.spec == spec  # type: ignore[attr-defined]
    with pytest.raises(SystemExit, match="unknown workflow 'missing'; known: my-safe"):
        build_runner("monolithic", "missing", settings)


def loaded_bytes(model_dir: Path, *parts: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the tensors ``parts`` of ``model_dir`` hold once loaded in ``dtype``."""
    total = 0
    for part in parts:
        model = component_class(model_dir, part).from_pretrained(model_dir, subfolder=part,
                                                                 torch_dtype=dtype)
        total += sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return total


def test_footprints(model_dirs, tmp_path):
    base, up = model_dirs["base"], model_dirs["upscaler"]
    size = loaded_bytes

    assert footprint_bytes("denoiser", base) == size(base, "unet") > 0
    # in the dtype a replica loads them in: what the dtype setting says on that device
    assert footprint_bytes("denoiser", base, "float16") == size(
        base, "unet", dtype=torch.float16) == size(base, "unet") // 2
    assert footprint_bytes("denoiser", base, "auto", "cuda:0") == size(base, "unet") // 2
    assert footprint_bytes("denoiser", base, "auto", "cpu") == size(base, "unet")
    assert footprint_bytes("upscaler", up) == size(up, "text_encoder", "unet", "vae")
    txt2img = size(base, "text_encoder", "unet", "vae")
    assert monolithic_footprint_bytes(SPECS["txt2img"], model_dirs) == txt2img
    assert monolithic_footprint_bytes(SPECS["img2img"], model_dirs) == txt2img  # one VAE
    assert monolithic_footprint_bytes(SPECS["txt2img-safe"], model_dirs) == txt2img + size(
        base, "safety_checker"
    )
    assert monolithic_footprint_bytes(SPECS["txt2img-hires"], model_dirs) == txt2img + size(
        up, "text_encoder", "unet", "vae"
    )
    core = MonolithicCore(SPECS["txt2img-safe"], model_dirs)
    assert core.components == ("safety_checker", "text_encoder", "unet", "vae")

    # a real SD repository ships formats and dtype variants side by side: one is loaded
    unet = tmp_path / "unet"
    unet.mkdir()
    for name, n in [("diffusion_pytorch_model.safetensors", 100), ("diffusion_pytorch_model.bin",
                    90), ("diffusion_pytorch_model.fp16.safetensors", 50), ("config.json", 7)]:
        (unet / name).write_bytes(b"x" * n)
    assert weights_bytes(tmp_path, ["unet", "vae"]) == 100
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    assert weights_bytes(tmp_path, ["unet"]) == 90
