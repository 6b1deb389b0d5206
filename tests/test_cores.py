"""The model cores against the diffusers pipelines they take apart.

Every equivalence is checked on the builtin tiny models with ``torch.set_num_threads(1)`` on both
sides: the thread count DOES change the last bits of diffusers' own output (1 vs 2 threads on
this 2-core x86 machine, see ``test_thread_count_changes_bits_only_slightly``), so bit-exact
comparisons need equal thread counts; 1 is what a node runs with by default.
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before diffusers/transformers are imported)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.builtins import build_builtin
from common.models import resolve_model_dir
from common.tokenizers import load_tokenizer, token_limit
from services.catalog import CORES
from services.core import ModelCore, Result, WorkItem
from services.denoiser import DenoiserCore
from services.safety import SafetyCheckerCore
from services.text_encoder import TextEncoderCore
from services.upscaler import UpscalerCore
from services.vae import VaeDecoderCore, VaeEncoderCore

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"


# --------------------------------------------------------------------------------------------
# fixtures and a tiny runner
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache(request, tmp_path_factory) -> Path:
    """The session's model cache: conftest's (as nodes use it) when there is one."""
    try:
        return request.getfixturevalue("cache_dir") / "models"
    except pytest.FixtureLookupError:
        return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def sd_dir(model_cache) -> Path:
    return resolve_model_dir("builtin:tiny-sd", model_cache)


@pytest.fixture(scope="session")
def upscaler_dir(model_cache) -> Path:
    return resolve_model_dir("builtin:tiny-upscaler", model_cache)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loaded(core: ModelCore) -> ModelCore:
    core.load()
    return core


@pytest.fixture(scope="session")
def cores(sd_dir) -> SimpleNamespace:
    torch.set_num_threads(1)
    return SimpleNamespace(
        text=_loaded(TextEncoderCore(sd_dir)),
        denoise=_loaded(DenoiserCore(sd_dir)),
        decode=_loaded(VaeDecoderCore(sd_dir)),
        encode=_loaded(VaeEncoderCore(sd_dir)),
        safety=_loaded(SafetyCheckerCore(sd_dir)),
    )


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def sd_pipe(sd_dir):
    from diffusers import StableDiffusionPipeline

    return _quiet(
        StableDiffusionPipeline.from_pretrained(
            sd_dir, safety_checker=None, requires_safety_checker=False
        )
    )


def drive(core: ModelCore, items: list[WorkItem]) -> list[Result]:
    """Run items to completion the way a runner does: batch compatible states, step, finish."""
    states = [core.start(item) for item in items]
    while not all(core.done(s) for s in states):
        groups: dict = {}
        for s in states:
            if not core.done(s):
                groups.setdefault(core.batch_key(s), []).append(s)
        for group in groups.values():
            core.step(group)
    return [core.finish(s) for s in states]


def one(core: ModelCore, op: str, params: dict, **inputs: torch.Tensor) -> Result:
    return drive(core, [WorkItem("req", op, params, inputs)])[0]


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def txt2img_latents(cores, prompt, negative, guidance, seed, steps=4, size=64) -> torch.Tensor:
    embeds = one(
        cores.text,
        "encode",
        {"prompt": prompt, "negative_prompt": negative, "guidance": guidance},
    ).tensors["prompt_embeds"]
    params = {"steps": steps, "guidance": guidance, "seed": seed, "width": size, "height": size}
    return one(cores.denoise, "denoise", params, prompt_embeds=embeds).tensors["latents"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# --------------------------------------------------------------------------------------------
# txt2img
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_txt2img_matches_pipeline(cores, sd_pipe, guidance):
    seed = 1234
    kwargs = dict(
        negative_prompt=NEGATIVE,
        num_inference_steps=4,
        guidance_scale=guidance,
        height=64,
        width=64,
    )
    expected = to_uint8(sd_pipe(PROMPT, generator=gen(seed), output_type="np", **kwargs).images)
    expected_latents = sd_pipe(PROMPT, generator=gen(seed), output_type="latent", **kwargs).images

    embeds = one(
        cores.text, "encode", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": guidance}
    ).tensors["prompt_embeds"]
    pos, neg = sd_pipe.encode_prompt(PROMPT, "cpu", 1, guidance > 1, NEGATIVE)
    assert torch.equal(embeds, torch.cat([neg, pos]) if guidance > 1 else pos)
    assert embeds.shape == (2 if guidance > 1 else 1, 77, 8)

    latents = txt2img_latents(cores, PROMPT, NEGATIVE, guidance, seed)
    assert torch.equal(latents, expected_latents)  # bit-identical, not just close

    image = one(cores.decode, "decode", {}, latents=latents).tensors["image"]
    assert image.dtype == torch.uint8 and image.shape == (1, 64, 64, 3)
    assert np.array_equal(image.numpy(), expected)


@pytest.mark.timeout(60)
def test_thread_count_changes_bits_only_slightly(sd_pipe):
    # The pipeline itself is not bit-stable across intra-op thread counts (1 vs 2 threads differ
    # in the last float bits here), so every equivalence test runs both sides at 1 thread.
    def run(threads):
        torch.set_num_threads(threads)
        return sd_pipe(
            PROMPT, num_inference_steps=4, height=64, width=64, generator=gen(5), output_type="np"
        ).images

    np.testing.assert_allclose(run(1), run(2), rtol=0, atol=1e-5)


@pytest.mark.timeout(60)
def test_text_encoder_batches_bit_identically(cores):
    core = cores.text
    params = [
        {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 7.5},
        {"prompt": "a red dragon", "negative_prompt": "", "guidance": 1.0},
        {"prompt": "an old castle at night", "guidance": 3.0},
    ]
    items = [WorkItem(f"r{i}", "encode", p, {}) for i, p in enumerate(params)]
    calls = []
    hook = core.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        batched = drive(core, items)
    finally:
        hook.remove()
    solo = [drive(core, [item])[0] for item in items]
    for b, s in zip(batched, solo, strict=True):
        assert torch.equal(b.tensors["prompt_embeds"], s.tensors["prompt_embeds"])
    assert [b.tensors["prompt_embeds"].shape[0] for b in batched] == [2, 1, 2]
    # one forward for all 5 rows when batching is bit-exact here (it is on this machine)
    assert len(calls) == (1 if core.batch_exact else 5)


# --------------------------------------------------------------------------------------------
# step-level batching
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_step_level_batching(cores):
    core = cores.denoise
    requests = [  # (prompt, guidance, seed, steps, admitted before global step, img2img)
        ("a photo of a cat", 7.5, 11, 6, 0, False),
        ("a dog in the forest", 1.0, 22, 4, 1, False),  # no guidance: one row
        ("a golden sunset over the sea", 3.0, 33, 5, 2, False),
        ("a red house", 7.5, 44, 4, 3, True),  # img2img, strength 0.75: 3 steps
    ]
    image = torch.from_numpy(np.random.RandomState(3).randint(0, 256, (1, 64, 64, 3), np.uint8))
    items = []
    for i, (prompt, guidance, seed, steps, _, img2img) in enumerate(requests):
        embeds = one(
            cores.text, "encode", {"prompt": prompt, "negative_prompt": "", "guidance": guidance}
        ).tensors["prompt_embeds"]
        params = {"steps": steps, "guidance": guidance, "seed": seed, "width": 64, "height": 64}
        inputs = {"prompt_embeds": embeds}
        if img2img:
            params["strength"] = 0.75
            inputs.update(one(cores.encode, "encode_image", {"seed": seed}, image=image).tensors)
        items.append(WorkItem(f"r{i}", "denoise", params, inputs))
    solo = [drive(core, [item])[0].tensors["latents"] for item in items]

    forwards = []
    hook = core.unet.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[0]))
    try:
        active, finished, step = [], {}, 0
        while len(finished) < len(items):
            for i, req in enumerate(requests):
                if req[4] == step:
                    active.append((i, core.start(items[i])))
            assert len({core.batch_key(s) for _, s in active}) == 1
            core.step([s for _, s in active])
            step += 1
            for i, s in list(active):
                if core.done(s):
                    finished[i] = core.finish(s).tensors["latents"]
                    active.remove((i, s))
    finally:
        hook.remove()

    # one UNet forward per step over every active state's rows (2 with guidance, 1 without);
    # A: steps 0-5, B: 1-4, C: 2-6, D: 3-5
    assert len(forwards) == step == 7
    assert forwards == [2, 3, 5, 7, 7, 6, 2]
    exact = []
    for i, expected in enumerate(solo):
        torch.testing.assert_close(finished[i], expected, rtol=1e-4, atol=1e-5)
        exact.append(torch.equal(finished[i], expected))
    # NOT bit-exact on this CPU: oneDNN convolutions and the small-M GEMMs of the time
    # embedding round differently for 7 rows than for 2, so batched results are only close
    # (max abs diff ~1e-6). A request keeps its own scheduler and generator either way.
    print(f"batched == solo bit-exact: {exact}")


@pytest.mark.timeout(30)
def test_batch_key_separates_shapes(cores):
    embeds = torch.zeros(1, 77, 8)
    small, big = (
        cores.denoise.start(
            WorkItem(
                "r",
                "denoise",
                {"steps": 2, "guidance": 1.0, "seed": 0, "width": w, "height": w},
                {"prompt_embeds": embeds},
            )
        )
        for w in (48, 64)
    )
    assert cores.denoise.batch_key(small) != cores.denoise.batch_key(big)
    assert small.latents.shape == (1, 4, 24, 24)


# --------------------------------------------------------------------------------------------
# img2img
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_img2img_matches_pipeline(cores, sd_dir):
    import PIL.Image
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = _quiet(
        StableDiffusionImg2ImgPipeline.from_pretrained(
            sd_dir, safety_checker=None, requires_safety_checker=False
        )
    )
    array = np.random.RandomState(7).randint(0, 256, size=(64, 64, 3), dtype=np.uint8)
    seed, steps, strength, guidance = 99, 8, 0.75, 7.5
    expected = pipe(
        PROMPT,
        image=PIL.Image.fromarray(array),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt=NEGATIVE,
        generator=gen(seed),
        output_type="np",
    ).images

    encoded = one(cores.encode, "encode_image", {"seed": seed}, image=torch.from_numpy(array)[None])
    assert encoded.tensors["image_latents"].shape == (1, 4, 32, 32)
    assert encoded.tensors["generator_state"].dtype == torch.uint8
    embeds = one(
        cores.text, "encode", {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": guidance}
    ).tensors["prompt_embeds"]
    item = WorkItem(
        "r",
        "denoise",
        {"steps": steps, "guidance": guidance, "seed": seed, "strength": strength},
        {"prompt_embeds": embeds, **encoded.tensors},
    )
    state = cores.denoise.start(item)
    assert cores.denoise.progress(state) == (0, 6)  # int(8 * 0.75) steps
    latents = drive(cores.denoise, [item])[0].tensors["latents"]
    image = one(cores.decode, "decode", {}, latents=latents).tensors["image"]
    assert np.array_equal(image.numpy(), to_uint8(expected))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "EulerAncestralDiscreteScheduler"])
def test_other_schedulers_match_pipelines(cores, sd_dir, tmp_path, scheduler):
    """SD 1.5's PNDM (stateful multistep) and Euler ancestral (init_noise_sigma,
    scale_model_input, set_begin_index, a generator in step) through the same cores."""
    import json

    import diffusers
    import PIL.Image

    model = tmp_path / "model"
    shutil.copytree(sd_dir, model)
    base = diffusers.DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    getattr(diffusers, scheduler).from_config(base.config).save_pretrained(model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", scheduler]
    (model / "model_index.json").write_text(json.dumps(index))
    core = _loaded(DenoiserCore(model))
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    txt2img = _quiet(diffusers.StableDiffusionPipeline.from_pretrained(model, **kwargs))
    img2img = _quiet(diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(model, **kwargs))
    embeds = one(
        cores.text, "encode", {"prompt": PROMPT, "negative_prompt": "", "guidance": 7.5}
    ).tensors["prompt_embeds"]

    expected = txt2img(
        PROMPT, num_inference_steps=5, height=64, width=64, generator=gen(3), output_type="latent"
    ).images
    params = {"steps": 5, "guidance": 7.5, "seed": 3, "width": 64, "height": 64}
    got = one(core, "denoise", params, prompt_embeds=embeds).tensors["latents"]
    assert torch.equal(got, expected)

    array = np.random.RandomState(2).randint(0, 256, size=(64, 64, 3), dtype=np.uint8)
    expected = img2img(
        PROMPT,
        image=PIL.Image.fromarray(array),
        strength=0.6,
        num_inference_steps=10,
        generator=gen(4),
        output_type="latent",
    ).images
    encoded = one(cores.encode, "encode_image", {"seed": 4}, image=torch.from_numpy(array)[None])
    params = {"steps": 10, "guidance": 7.5, "seed": 4, "strength": 0.6}
    got = one(core, "denoise", params, prompt_embeds=embeds, **encoded.tensors)
    assert torch.equal(got.tensors["latents"], expected)


# --------------------------------------------------------------------------------------------
# safety checker
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_safety_checker_matches_pipeline(cores, sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = _quiet(StableDiffusionPipeline.from_pretrained(sd_dir))
    assert pipe.safety_checker is not None
    seeds = [3, 4]
    for seed in seeds:
        out = pipe(
            PROMPT,
            num_inference_steps=4,
            height=64,
            width=64,
            generator=gen(seed),
            output_type="np",
        )
        decoded = one(
            cores.decode, "decode", {}, latents=txt2img_latents(cores, PROMPT, None, 7.5, seed)
        ).tensors["image"]
        checked = one(cores.safety, "check", {}, image=decoded)
        assert checked.meta["nsfw"] == out.nsfw_content_detected
        assert np.array_equal(checked.tensors["image"].numpy(), to_uint8(out.images))

    # several items (2 + 1 images) in one run give the verdicts of separate runs
    rng = np.random.RandomState(1)
    imgs = [torch.from_numpy(rng.randint(0, 256, (n, 64, 64, 3), dtype=np.uint8)) for n in (2, 1)]
    together = drive(
        cores.safety, [WorkItem(f"r{i}", "check", {}, {"image": im}) for i, im in enumerate(imgs)]
    )
    alone = [one(cores.safety, "check", {}, image=im) for im in imgs]
    assert [r.meta for r in together] == [r.meta for r in alone]
    assert [len(r.meta["nsfw"]) for r in together] == [2, 1]


@pytest.mark.timeout(60)
def test_forced_safety_flag_blacks_out(cores, sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    # a copy of the model whose checker must flag everything (cosine >= -1 > threshold -2)
    forced_dir = tmp_path / "forced"
    forced_dir.mkdir()
    shutil.copy(sd_dir / "model_index.json", forced_dir)
    shutil.copytree(sd_dir / "feature_extractor", forced_dir / "feature_extractor")
    checker = StableDiffusionSafetyChecker.from_pretrained(sd_dir, subfolder="safety_checker")
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)
    checker.save_pretrained(forced_dir / "safety_checker", safe_serialization=True)

    core = _loaded(SafetyCheckerCore(forced_dir))
    image = one(
        cores.decode, "decode", {}, latents=txt2img_latents(cores, PROMPT, None, 7.5, 8)
    ).tensors["image"]
    assert image.any()
    out = one(core, "check", {}, image=image)
    assert out.meta == {"nsfw": [True]}
    assert not out.tensors["image"].any() and out.tensors["image"].shape == image.shape
    assert image.any()  # the input was not modified

    pipe = _quiet(StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=checker))
    expected = pipe(
        PROMPT, num_inference_steps=4, height=64, width=64, generator=gen(8), output_type="np"
    )
    assert expected.nsfw_content_detected == [True]
    assert np.array_equal(out.tensors["image"].numpy(), to_uint8(expected.images))


# --------------------------------------------------------------------------------------------
# upscaler
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_upscaler_matches_pipeline(cores, upscaler_dir):
    from diffusers import StableDiffusionLatentUpscalePipeline

    pipe = _quiet(StableDiffusionLatentUpscalePipeline.from_pretrained(upscaler_dir))
    core = _loaded(UpscalerCore(upscaler_dir))
    latents = txt2img_latents(cores, PROMPT, NEGATIVE, 7.5, 21)
    jobs = [(5, 2, 7.5, NEGATIVE), (6, 3, 1.0, "")]
    items = [
        WorkItem(
            f"r{seed}",
            "upscale",
            {
                "prompt": PROMPT,
                "negative_prompt": neg,
                "seed": seed,
                "upscale_steps": steps,
                "upscale_guidance": g,
            },
            {"latents": latents},
        )
        for seed, steps, g, neg in jobs
    ]
    results = drive(core, items)
    for (seed, steps, g, neg), result in zip(jobs, results, strict=True):
        expected = pipe(
            prompt=PROMPT,
            negative_prompt=neg,
            image=latents,
            num_inference_steps=steps,
            guidance_scale=g,
            generator=gen(seed),
            output_type="latent",
        ).images
        assert result.tensors["latents"].shape == (1, 4, 64, 64)
        assert torch.equal(result.tensors["latents"], expected)
    # the upscaled latents decode with tiny-sd's VAE (same latent space)
    image = one(cores.decode, "decode", {}, latents=results[0].tensors["latents"]).tensors["image"]
    assert image.shape == (1, 128, 128, 3)


# --------------------------------------------------------------------------------------------
# prompts, model directories
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_prompt_truncation_warning(cores, sd_dir, sd_pipe):
    assert token_limit(sd_dir) == 77
    tok = load_tokenizer(sd_dir)
    assert load_tokenizer(sd_dir) is tok
    exact = "a " * 75  # 75 + start + end = 77 tokens: fits
    too_long = "a " * 76
    long_negative = "a photo of the cat " * 20
    assert len(tok(exact).input_ids) == 77

    fits = one(cores.text, "encode", {"prompt": exact, "negative_prompt": "", "guidance": 7.5})
    assert fits.meta == {}
    out = one(
        cores.text,
        "encode",
        {"prompt": too_long, "negative_prompt": long_negative, "guidance": 7.5},
    )
    n_neg = len(tok(long_negative).input_ids)
    assert out.meta == {
        "warnings": [
            "prompt: 78 tokens exceed the model's limit of 77; truncated as diffusers does",
            f"negative_prompt: {n_neg} tokens exceed the model's limit of 77; "
            "truncated as diffusers does",
        ]
    }
    pos, neg = sd_pipe.encode_prompt(too_long, "cpu", 1, True, long_negative)
    assert torch.equal(out.tensors["prompt_embeds"], torch.cat([neg, pos]))
    # without guidance the negative prompt is unused, so it does not warn
    out = one(
        cores.text, "encode", {"prompt": exact, "negative_prompt": long_negative, "guidance": 1.0}
    )
    assert out.meta == {}


@pytest.mark.timeout(60)
def test_builtin_build_is_deterministic(sd_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        out.mkdir()
        build_builtin("tiny-sd", out)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert any(str(f).endswith(".safetensors") for f in files)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
        assert filecmp.cmp(first / f, sd_dir / f, shallow=False), f  # and equal to the cache


_RESOLVE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from common.models import resolve_model_dir
print(resolve_model_dir("builtin:tiny-sd", Path(sys.argv[1])))
"""


@pytest.mark.timeout(150)
def test_concurrent_resolve_builds_once(sd_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESOLVE, str(cache)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=140) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(cache / "tiny-sd")}
    assert sum(err.count("building builtin:tiny-sd") for _, err in outs) == 1
    assert sorted(p.name for p in cache.iterdir()) == [".tiny-sd.lock", "tiny-sd"]
    target = cache / "tiny-sd"
    for f in sd_dir.rglob("*"):
        if f.is_file():
            assert filecmp.cmp(f, target / f.relative_to(sd_dir), shallow=False)


@pytest.mark.timeout(30)
def test_resolve_errors_and_catalog(tmp_path):
    with pytest.raises(ValueError, match="unknown builtin"):
        resolve_model_dir("builtin:nope", tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path), tmp_path)
    (tmp_path / "tiny-upscaler").mkdir()  # not ours: never replaced
    with pytest.raises(FileExistsError):
        resolve_model_dir("builtin:tiny-upscaler", tmp_path)
    assert set(CORES) == {
        "text_encoder",
        "t5_encoder",
        "denoiser",
        "vae_decoder",
        "vae_encoder",
        "safety_checker",
        "upscaler",
    }
    assert CORES["vae_encoder"] is VaeEncoderCore and CORES["vae_decoder"] is VaeDecoderCore
