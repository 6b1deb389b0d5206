"""The model families beyond SD 1.x/2.x, each against its diffusers pipeline: SDXL's nodes
(both CLIP encoders in one node, pooled embeddings and time ids in the denoiser) make the
bits of ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline``, SD3's
(CLIP-L + CLIP-G in one node, T5 in a node of its own, the MMDiT transformer under flow
matching) those of ``StableDiffusion3Pipeline``, and FLUX.1's (CLIP's pooled output, T5, the
FLUX transformer over packed latents, dev's guidance embedding, true CFG) those of
``FluxPipeline``, for dev and schnell: node by node, served whole (monolithic) and
through the real stack; and the shipped workflows follow the base model's family."""
# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before diffusers/transformers are imported)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from legoclient import LegoClient
from legoclient import LegoError as LegoClientError
from PIL import Image

from common import families
from common.families import family_of, family_of_dir
from common.modeldirs import model_index, weights_bytes
from common.models import resolve_model_dir
from common.settings import Settings
from common.workflow import (
    WorkflowSpec,
    builtin_workflows,
    default_workflow,
    other_family_workflows,
    shipped_workflows,
)
from services.catalog import core_class, footprint_bytes
from services.core import ModelCore, WorkItem
from services.families.flux import FluxClipEncoderCore, FluxDenoiserCore, FluxT5EncoderCore
from services.families.sd3 import Sd3ClipEncoderCore, Sd3DenoiserCore
from services.families.sdxl import SdxlDenoiserCore, SdxlTextEncoderCore
from services.monolithic import MonolithicCore
from services.t5_encoder import T5EncoderCore
from tests.conftest import nats_server
from tests.stackutil import png_pixels, running_stack
from tests.test_cores import drive, one, to_uint8

PROMPT = "a photo of an astronaut riding a horse on mars"
SDXL = "builtin:tiny-sdxl"
SD3 = "builtin:tiny-sd3"
FLUX = "builtin:tiny-flux"
FLUX_SCHNELL = "builtin:tiny-flux-schnell"
SD3_CONTROLNET = "builtin:tiny-sd3-controlnet"
FLUX_CONTROLNET = "builtin:tiny-flux-controlnet"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a node runs; diffusers' bits depend on the thread count
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sdxl_dir(cache_dir: Path) -> Path:
    return resolve_model_dir(SDXL, cache_dir / "models")


def _loaded(core: ModelCore) -> ModelCore:
    core.load()
    return core


@pytest.fixture(scope="module")
def cores(sdxl_dir: Path) -> SimpleNamespace:
    torch.set_num_threads(1)
    kinds = ("text_encoder", "denoiser", "vae_decoder", "vae_encoder")
    return SimpleNamespace(**{kind: _loaded(core_class(kind, sdxl_dir)(sdxl_dir))
                              for kind in kinds})


def _pipe(cls_name: str, model_dir: Path, **kw: object):
    import diffusers

    kw = {"add_watermarker": False, **kw}  # SDXL's: off, as the nodes do
    pipe = getattr(diffusers, cls_name).from_pretrained(
        model_dir, **{k: v for k, v in kw.items() if v is not None})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def txt2img_pipe(sdxl_dir: Path):
    return _pipe("StableDiffusionXLPipeline", sdxl_dir)


@pytest.fixture(scope="module")
def img2img_pipe(sdxl_dir: Path):
    return _pipe("StableDiffusionXLImg2ImgPipeline", sdxl_dir)


def source_image(height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)


def pipeline_image(pipe, params: dict, image: np.ndarray | None = None,
                   **extra: object) -> np.ndarray:
    """What the diffusers pipeline makes from ``params`` (a request's, as validated), with
    ``extra`` arguments."""
    kw = dict(negative_prompt=params.get("negative_prompt"),
              num_inference_steps=params["steps"], guidance_scale=params["guidance"],
              generator=torch.Generator("cpu").manual_seed(params["seed"]), output_type="np",
              **extra)
    if image is None:
        kw.update(height=params["height"], width=params["width"])
    else:
        kw.update(image=Image.fromarray(image), strength=params["strength"])
    return to_uint8(pipe(params["prompt"], **kw).images)[0]


def micro_images(cores: SimpleNamespace, requests: list[dict],
                 image: np.ndarray | None = None) -> list[np.ndarray]:
    """The requests node by node through the SDXL cores, all items of a node in one batch."""
    items = lambda op, inputs: [WorkItem(f"r{i}", op, p, x)  # noqa: E731
                                for i, (p, x) in enumerate(zip(requests, inputs, strict=True))]
    texts = drive(cores.text_encoder, items("encode", [{}] * len(requests)))
    inputs = [dict(t.tensors) for t in texts]
    if image is not None:
        encoded = drive(cores.vae_encoder, items(
            "encode_image", [{"image": torch.from_numpy(image)[None]}] * len(requests)))
        for x, e in zip(inputs, encoded, strict=True):
            x.update(e.tensors)
    latents = drive(cores.denoiser, items("denoise", inputs))
    decoded = drive(cores.vae_decoder, items(
        "decode", [{"latents": r.tensors["latents"]} for r in latents]))
    return [r.tensors["image"][0].numpy() for r in decoded]


# --------------------------------------------------------------------------------------------
# families and workflows
# --------------------------------------------------------------------------------------------


def test_a_directory_family_is_read_from_its_model_index(sdxl_dir: Path, tmp_path: Path,
                                                         cache_dir: Path) -> None:
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    assert family_of_dir(sdxl_dir) == family_of(SDXL) == family_of(str(sdxl_dir)) == "sdxl"
    assert family_of_dir(sd_dir) == family_of("builtin:tiny-sd") == "sd"
    assert family_of("builtin:tiny-upscaler") == families.SD_UPSCALER
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomeOtherPipeline"}')
    assert family_of(str(tmp_path)) is None  # unknown: left to the load
    assert family_of("emulated:Flux1Dev") is None
    assert family_of(str(tmp_path / "missing")) is None


@pytest.fixture(scope="module")
def sd3_dir(cache_dir: Path) -> Path:
    return resolve_model_dir(SD3, cache_dir / "models")


@pytest.fixture(scope="module")
def sd3_cores(sd3_dir: Path) -> SimpleNamespace:
    torch.set_num_threads(1)
    kinds = ("text_encoder", "t5_encoder", "denoiser", "vae_decoder")
    return SimpleNamespace(**{kind: _loaded(core_class(kind, sd3_dir)(sd3_dir))
                              for kind in kinds})


@pytest.fixture(scope="module")
def sd3_pipe(sd3_dir: Path):
    return _pipe("StableDiffusion3Pipeline", sd3_dir, add_watermarker=None)


def t5_images(cores: SimpleNamespace, requests: list[dict], t5_port: str) -> list[np.ndarray]:
    """The requests node by node through the cores of a family with a T5 node (SD3's, whose
    denoiser takes T5's embeddings as ``t5_prompt_embeds``; FLUX's, as ``prompt_embeds``),
    all items of a node in one batch."""
    items = lambda op, inputs: [WorkItem(f"r{i}", op, p, x)  # noqa: E731
                                for i, (p, x) in enumerate(zip(requests, inputs, strict=True))]
    clip = drive(cores.text_encoder, items("encode", [{}] * len(requests)))
    t5 = drive(cores.t5_encoder, items("encode", [{}] * len(requests)))
    inputs = [{**c.tensors, t5_port: t.tensors["prompt_embeds"]}
              for c, t in zip(clip, t5, strict=True)]
    latents = drive(cores.denoiser, items("denoise", inputs))
    decoded = drive(cores.vae_decoder, items(
        "decode", [{"latents": r.tensors["latents"]} for r in latents]))
    return [r.tensors["image"][0].numpy() for r in decoded]


def sd3_images(cores: SimpleNamespace, requests: list[dict]) -> list[np.ndarray]:
    """(``max_sequence_length``: sd3-txt2img's default where a request leaves it out)"""
    return t5_images(cores, [{"max_sequence_length": 256, **r} for r in requests],
                     "t5_prompt_embeds")


def flux_images(cores: SimpleNamespace, requests: list[dict]) -> list[np.ndarray]:
    return t5_images(cores, requests, "prompt_embeds")


@pytest.fixture(scope="module", params=[FLUX, FLUX_SCHNELL], ids=["dev", "schnell"])
def flux(request, cache_dir: Path) -> SimpleNamespace:
    """A FLUX builtin's directory, its cores and its pipeline."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(request.param, cache_dir / "models")
    kinds = ("text_encoder", "t5_encoder", "denoiser", "vae_decoder")
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, model_dir)(model_dir))
                               for kind in kinds})
    return SimpleNamespace(dir=model_dir, spec=request.param, cores=cores,
                           pipe=_pipe("FluxPipeline", model_dir, add_watermarker=None))


def test_the_cores_follow_the_family(sdxl_dir: Path, sd3_dir: Path, cache_dir: Path) -> None:
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    assert core_class("text_encoder", sdxl_dir) is SdxlTextEncoderCore
    assert core_class("denoiser", sdxl_dir) is SdxlDenoiserCore
    assert core_class("vae_decoder", sdxl_dir) is core_class("vae_decoder", sd_dir)
    assert core_class("text_encoder", sd_dir) is not SdxlTextEncoderCore
    assert core_class("text_encoder", sd3_dir) is Sd3ClipEncoderCore
    assert core_class("t5_encoder", sd3_dir) is T5EncoderCore
    assert core_class("denoiser", sd3_dir) is Sd3DenoiserCore
    f32 = "float32"  # a CPU's dtype, which footprints count by default
    assert footprint_bytes("denoiser", sd3_dir) == weights_bytes(sd3_dir, ["transformer"], f32)
    assert footprint_bytes("t5_encoder", sd3_dir) == weights_bytes(sd3_dir, ["text_encoder_3"],
                                                                   f32)
    flux_dir = resolve_model_dir(FLUX, cache_dir / "models")
    assert [core_class(kind, flux_dir) for kind in ("text_encoder", "t5_encoder", "denoiser")] \
        == [FluxClipEncoderCore, FluxT5EncoderCore, FluxDenoiserCore]
    assert footprint_bytes("t5_encoder", flux_dir) == weights_bytes(flux_dir, ["text_encoder_2"],
                                                                    f32)
    # FLUX loads in bfloat16 on a GPU, half of float32
    assert footprint_bytes("denoiser", flux_dir, "auto", "cuda") * 2 == footprint_bytes(
        "denoiser", flux_dir)
    # one SDXL text encoder replica holds both encoders
    assert footprint_bytes("text_encoder", sdxl_dir) == weights_bytes(
        sdxl_dir, ["text_encoder", "text_encoder_2"], f32) > weights_bytes(
        sdxl_dir, ["text_encoder"], f32)


def test_shipped_workflows_follow_the_base_models_family(cache_dir: Path) -> None:
    sdxl = Settings(base_model=SDXL, cache_dir=cache_dir)
    sd = Settings(cache_dir=cache_dir)
    assert set(shipped_workflows(sdxl)) == {"sdxl-txt2img", "sdxl-img2img", "sdxl-controlnet"}
    sd3 = Settings(base_model=SD3, cache_dir=cache_dir)
    assert set(shipped_workflows(sd3)) == {"sd3-txt2img", "sd3-controlnet"}
    assert default_workflow(sd3) == "sd3-txt2img"
    assert set(shipped_workflows(Settings(base_model=FLUX, cache_dir=cache_dir))) == {
        "flux-txt2img", "flux-controlnet"}
    # tiny-flux-controlnet is tiny-flux's: on another FLUX model, once named beside it
    schnell = Settings(base_model=FLUX_SCHNELL, cache_dir=cache_dir)
    assert set(shipped_workflows(schnell)) == {"flux-txt2img"}
    assert "made for builtin:tiny-flux" in other_family_workflows(schnell)["flux-controlnet"]
    assert "flux-controlnet" in shipped_workflows(schnell.model_copy(
        update={"models": {"control": FLUX_CONTROLNET}}))
    assert "must be SD3" in other_family_workflows(sd)["sd3-controlnet"]
    assert {"txt2img", "img2img"} <= set(shipped_workflows(sd))
    assert not {"sdxl-txt2img", "sdxl-img2img", "sd3-txt2img", "sd3-controlnet",
                "flux-controlnet"} & set(shipped_workflows(sd))
    assert "txt2img" in other_family_workflows(sdxl)
    assert "must be SDXL" in other_family_workflows(sd)["sdxl-txt2img"]
    assert default_workflow(sdxl) == "sdxl-txt2img" and default_workflow(sd) == "txt2img"
    with pytest.raises(ValueError, match="sdxl-txt2img cannot run here: its base model must "
                                         "be SDXL"):
        shipped_workflows(sd.model_copy(update={"workflows": ["sdxl-txt2img"]}))
    # all of them, unreplaced, for the registry and the manifests
    assert {"txt2img", "sdxl-txt2img"} <= set(builtin_workflows())


# --------------------------------------------------------------------------------------------
# equivalence, node by node
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negative", [None, "", "blurry, low quality"])
@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_sdxl_txt2img_equals_the_pipeline(cores, txt2img_pipe, negative, guidance) -> None:
    params = {"prompt": PROMPT, "steps": 3, "guidance": guidance, "seed": 11,
              "width": 64, "height": 48}
    if negative is not None:
        params["negative_prompt"] = negative
    [served] = micro_images(cores, [params])
    expected = pipeline_image(txt2img_pipe, params)
    assert served.shape == (48, 64, 3) and served.std() > 5  # an image, not a flat field
    assert np.array_equal(served, expected)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_sdxl_img2img_equals_the_pipeline(cores, img2img_pipe, strength) -> None:
    params = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "guidance": 5.0,
              "seed": 5, "strength": strength}
    image = source_image(48, 56)
    [served] = micro_images(cores, [params], image)
    assert served.shape == (48, 56, 3)
    assert np.array_equal(served, pipeline_image(img2img_pipe, params, image))


def test_sdxl_requests_batched_together_match_their_solo_images(cores, txt2img_pipe) -> None:
    requests = [{"prompt": prompt, "steps": 3, "guidance": g, "seed": seed, "width": 64,
                 "height": 64, **neg}
                for prompt, g, seed, neg in [(PROMPT, 5.0, 1, {}),
                                             ("a red house by the sea", 7.0, 2,
                                              {"negative_prompt": "blurry"}),
                                             ("a cat", 5.0, 3, {"negative_prompt": ""})]]
    batched = micro_images(cores, requests)
    for params, served in zip(requests, batched, strict=True):
        expected = pipeline_image(txt2img_pipe, params)
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_the_sdxl_denoiser_names_what_it_lacks(cores) -> None:
    embeds = one(cores.text_encoder, "encode", {"prompt": "a cat", "guidance": 5.0}).tensors
    from common.errors import InvalidField

    with pytest.raises(InvalidField, match="pooled_prompt_embeds"):
        one(cores.denoiser, "denoise", {"steps": 1}, prompt_embeds=embeds["prompt_embeds"])
    with pytest.raises(InvalidField, match="pooled values"):
        one(cores.denoiser, "denoise", {"steps": 1, "guidance": 5.0},
            prompt_embeds=embeds["prompt_embeds"],
            pooled_prompt_embeds=torch.zeros(2, 3))


def test_sdxl_served_whole_equals_the_pipeline(sdxl_dir, txt2img_pipe) -> None:
    spec = builtin_workflows({"base": SDXL})["sdxl-txt2img"]
    core = _loaded(MonolithicCore(spec, {"base": sdxl_dir}))
    assert core.components == ("text_encoder", "text_encoder_2", "unet", "vae")
    params = {"prompt": PROMPT, "steps": 3, "guidance": 5.0, "seed": 4, "width": 64,
              "height": 64}
    served = one(core, "run", params).tensors["image"][0].numpy()
    assert np.array_equal(served, pipeline_image(txt2img_pipe, params))


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_sd3_txt2img_equals_the_pipeline(sd3_cores, sd3_pipe, negative, guidance) -> None:
    params = {"prompt": PROMPT, "negative_prompt": negative, "steps": 3, "guidance": guidance,
              "seed": 11, "width": 64, "height": 48}
    [served] = sd3_images(sd3_cores, [params])
    assert served.shape == (48, 64, 3) and served.std() > 5
    assert np.array_equal(served, pipeline_image(sd3_pipe, params))


def test_sd3_requests_batched_together_match_their_solo_images(sd3_cores, sd3_pipe) -> None:
    requests = [{"prompt": prompt, "negative_prompt": neg, "steps": 3, "guidance": g,
                 "seed": seed, "width": 64, "height": 64}
                for prompt, neg, g, seed in [(PROMPT, "", 7.0, 1),
                                             ("a red house by the sea", "blurry", 4.0, 2),
                                             ("a cat", "", 1.0, 3)]]
    for params, served in zip(requests, sd3_images(sd3_cores, requests), strict=True):
        expected = pipeline_image(sd3_pipe, params)
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_the_sd3_denoiser_names_what_it_lacks(sd3_cores) -> None:
    from common.errors import InvalidField

    params = {"prompt": "a cat", "guidance": 7.0, "max_sequence_length": 16}
    clip = one(sd3_cores.text_encoder, "encode", params).tensors
    with pytest.raises(InvalidField, match="t5_prompt_embeds"):
        one(sd3_cores.denoiser, "denoise", {"steps": 1, "guidance": 7.0}, **clip)
    with pytest.raises(InvalidField, match="max_sequence_length"):
        one(sd3_cores.t5_encoder, "encode", {"prompt": "a cat"})
    t5 = one(sd3_cores.t5_encoder, "encode", params).tensors["prompt_embeds"]
    with pytest.raises(InvalidField, match="2 row"):  # guided: [negative, positive]
        one(sd3_cores.denoiser, "denoise", {"steps": 1, "guidance": 7.0},
            prompt_embeds=clip["prompt_embeds"][1:], pooled_prompt_embeds=clip[
                "pooled_prompt_embeds"], t5_prompt_embeds=t5)


def test_sd3_served_whole_equals_the_pipeline(sd3_dir, sd3_pipe) -> None:
    spec = builtin_workflows({"base": SD3})["sd3-txt2img"]
    core = _loaded(MonolithicCore(spec, {"base": sd3_dir}))
    assert core.components == ("text_encoder", "text_encoder_2", "text_encoder_3",
                               "transformer", "vae")
    params = {"prompt": PROMPT, "negative_prompt": "", "steps": 3, "guidance": 7.0, "seed": 4,
              "width": 64, "height": 64, "max_sequence_length": 256}
    served = one(core, "run", params).tensors["image"][0].numpy()
    assert np.array_equal(served, pipeline_image(sd3_pipe, params))


@pytest.mark.parametrize(("negative", "true_cfg_scale"),
                         [(None, 1.0), ("blurry, low quality", 4.0), ("", 3.0),
                          ("blurry", 1.0)])
def test_flux_txt2img_equals_the_pipeline(flux, negative, true_cfg_scale) -> None:
    params = {"prompt": PROMPT, "steps": 3, "guidance": 3.5, "true_cfg_scale": true_cfg_scale,
              "seed": 11, "width": 64, "height": 48, "max_sequence_length": 512}
    if negative is not None:
        params["negative_prompt"] = negative
    [served] = flux_images(flux.cores, [params])
    assert served.shape == (48, 64, 3) and served.std() > 5
    assert np.array_equal(served, flux_pipeline_image(flux.pipe, params))


def flux_pipeline_image(pipe, params: dict, **extra: object) -> np.ndarray:
    out = pipe(params["prompt"], negative_prompt=params.get("negative_prompt"),
               true_cfg_scale=params["true_cfg_scale"], guidance_scale=params["guidance"],
               num_inference_steps=params["steps"], height=params["height"],
               width=params["width"], max_sequence_length=params["max_sequence_length"],
               generator=torch.Generator("cpu").manual_seed(params["seed"]), output_type="np",
               **extra)
    return to_uint8(out.images)[0]


def test_flux_requests_batched_together_match_their_solo_images(flux) -> None:
    requests = [{"prompt": prompt, "steps": 3, "guidance": g, "true_cfg_scale": tc,
                 "seed": seed, "width": 64, "height": 64, "max_sequence_length": 512, **neg}
                for prompt, g, tc, seed, neg in [
                    (PROMPT, 3.5, 1.0, 1, {}),
                    ("a red house by the sea", 5.0, 4.0, 2, {"negative_prompt": "blurry"}),
                    ("a cat", 2.0, 1.0, 3, {"negative_prompt": ""})]]
    for params, served in zip(requests, flux_images(flux.cores, requests), strict=True):
        expected = flux_pipeline_image(flux.pipe, params)
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_flux_served_whole_equals_the_pipeline(flux) -> None:
    spec = builtin_workflows({"base": flux.spec})["flux-txt2img"]
    core = _loaded(MonolithicCore(spec, {"base": flux.dir}))
    params = {"prompt": PROMPT, "negative_prompt": "fog", "steps": 2, "guidance": 3.5,
              "true_cfg_scale": 2.0, "seed": 4, "width": 64, "height": 64,
              "max_sequence_length": 512}
    served = one(core, "run", params).tensors["image"][0].numpy()
    assert np.array_equal(served, flux_pipeline_image(flux.pipe, params))


# --------------------------------------------------------------------------------------------
# through the real stack
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stack_on(base_model: str, tmp: Path, cache_dir: Path, **overrides: object) -> Iterator:
    """A stack on a nats-server of its own serving the shipped workflows of ``base_model``."""
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, base_model=base_model, autoscale=False, **overrides,
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def sdxl_stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator:
    with stack_on(SDXL, tmp_path_factory.mktemp("sdxl"), cache_dir) as stack:
        yield stack


@pytest.mark.timeout(300)
def test_a_stack_on_an_sdxl_model_serves_its_workflows_as_the_pipelines(
        sdxl_stack, txt2img_pipe, img2img_pipe) -> None:
    assert set(sdxl_stack.workflows) == {"sdxl-txt2img", "sdxl-img2img", "sdxl-controlnet"}
    image = source_image(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    with LegoClient(sdxl_stack.gateway_url) as client:
        params = {"prompt": "a red fox in the snow", "steps": 3, "guidance": 5.0, "seed": 9,
                  "width": 64, "height": 64}
        state, png = client.generate("sdxl-txt2img", **params)
        assert [t.node for t in state.timings] == ["encode", "denoise", "decode"]
        assert np.array_equal(png_pixels(png), pipeline_image(txt2img_pipe, params))
        params = {"prompt": "a lighthouse", "negative_prompt": "fog", "steps": 4,
                  "guidance": 5.0, "seed": 2, "strength": 0.6}
        _, png = client.generate("sdxl-img2img", image=base64.b64encode(buffer.getvalue())
                                 .decode(), **params)
        assert np.array_equal(png_pixels(png), pipeline_image(img2img_pipe, params, image))
        buffer = io.BytesIO()
        Image.fromarray(CONTROL).save(buffer, "PNG")
        state, png = client.generate("sdxl-controlnet", prompt="a lighthouse", steps=2,
                                     seed=4, control_image=base64.b64encode(
                                         buffer.getvalue()).decode())
        assert state.status == "succeeded" and png_pixels(png).shape == (56, 48, 3)


@pytest.fixture(scope="module")
def sd3_stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator:
    with stack_on(SD3, tmp_path_factory.mktemp("sd3"), cache_dir) as stack:
        yield stack


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.timeout(400)
def test_one_stack_serves_sd3_and_flux_on_shared_t5_and_vae_pools_as_the_pipelines(
        sd3_stack, sd3_pipe, sd3_control, flux_control, cache_dir) -> None:
    """The SD3 stack's workflows, and FLUX's registered at run time on the same stack: the
    tiny builtins' T5 and VAE are the same bytes, so the SD3 stack's T5 and VAE decoder
    replicas serve FLUX too, and only FLUX's own CLIP, transformer and VAE encoder (whose
    core follows FLUX's pipeline) get replicas of their own; every image is its pipeline's."""
    assert set(sd3_stack.workflows) == {"sd3-txt2img", "sd3-controlnet"}
    # two text encoder pools (CLIP, T5), the transformer's, the VAE decoder's
    assert sorted(kind for kind, _ in sd3_stack.workflows["sd3-txt2img"].pools().values()) == [
        "denoiser", "t5_encoder", "text_encoder", "vae_decoder"]
    sd3_pools = {pool: kind_model for spec in sd3_stack.workflows.values()
                 for pool, kind_model in spec.pools().items()}
    flux = {name: builtin_workflows()[name].model_copy(update={"name": f"{name}-here"})
            for name in ("flux-txt2img", "flux-controlnet")}
    flux_pools = {pool: kind_model for spec in flux.values()
                  for pool, kind_model in spec.pools().items()}
    assert sorted(sd3_pools[p][0] for p in set(sd3_pools) & set(flux_pools)) == [
        "t5_encoder", "vae_decoder"]
    for pool in set(flux_pools) - set(sd3_pools):
        sd3_stack.add_node(*flux_pools[pool])
    pipe = _pipe("FluxPipeline", resolve_model_dir(FLUX, cache_dir / "models"),
                 add_watermarker=None)
    with LegoClient(sd3_stack.gateway_url) as client:
        for spec in flux.values():
            client.add_workflow(spec.model_dump(mode="json", exclude_none=True))
        params = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "steps": 3,
                  "guidance": 6.0, "seed": 9, "width": 64, "height": 64}
        state, png = client.generate("sd3-txt2img", **params)
        assert {t.node for t in state.timings} == {"encode", "encode_t5", "denoise", "decode"}
        assert np.array_equal(png_pixels(png), pipeline_image(sd3_pipe, params))
        params = sd3_control_params(seed=4, width=64, height=48)
        state, png = client.generate("sd3-controlnet", **{
            **params, "control_image": png_base64(CONTROL)})
        assert {t.node for t in state.timings} == {"encode", "encode_t5", "encode_control",
                                                  "denoise", "decode"}
        assert np.array_equal(png_pixels(png), sd3_control_pipeline_image(
            sd3_control.pipe, params, CONTROL))
        for extra in ({}, {"negative_prompt": "blurry", "true_cfg_scale": 3.0}):
            params = {"prompt": "a red fox in the snow", "steps": 3, "guidance": 4.0,
                      "true_cfg_scale": 1.0, "seed": 9, "width": 64, "height": 64,
                      "max_sequence_length": 512, **extra}
            state, png = client.generate("flux-txt2img-here", **params)
            assert {t.pool for t in state.timings} == set(flux["flux-txt2img"].pools())
            assert np.array_equal(png_pixels(png), flux_pipeline_image(pipe, params))
        params = flux_control_params(seed=4, width=64, height=48)
        _, png = client.generate("flux-controlnet-here", **{
            **params, "control_image": png_base64(CONTROL)})
        assert np.array_equal(png_pixels(png), flux_control_pipeline_image(
            flux_control.pipe, params, CONTROL))
    assert len([c for c in sd3_stack.children if "t5_encoder" in c.argv]) == 1


# --------------------------------------------------------------------------------------------
# ControlNet (SD 1.x): a model of its own, attached to the base model's denoiser
# --------------------------------------------------------------------------------------------

CONTROLNET = "builtin:tiny-sd-controlnet"


@pytest.fixture(scope="module")
def sd(cache_dir: Path) -> SimpleNamespace:
    """tiny-sd's cores (its denoiser told where ControlNets are) and its ControlNet pipeline."""
    import functools

    from diffusers import ControlNetModel

    from services.core import ModelSource

    torch.set_num_threads(1)
    models = cache_dir / "models"
    sd_dir, control_dir = (resolve_model_dir(m, models) for m in ("builtin:tiny-sd", CONTROLNET))
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, sd_dir)(sd_dir))
                               for kind in ("text_encoder", "denoiser", "vae_decoder")})
    cores.denoiser.source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models))
    pipe = _pipe("StableDiffusionControlNetPipeline", sd_dir, add_watermarker=None,
                 controlnet=ControlNetModel.from_pretrained(control_dir), safety_checker=None,
                 requires_safety_checker=False)
    return SimpleNamespace(dir=sd_dir, cores=cores, pipe=pipe, control_dir=control_dir,
                           net=pipe.controlnet)


CONTROL = np.random.default_rng(1).integers(0, 255, (56, 48, 3), dtype=np.uint8)


def controlnet_image(cores: SimpleNamespace, params: dict,
                     control: np.ndarray | None) -> np.ndarray:
    embeds = one(cores.text_encoder, "encode", params).tensors
    adapters, inputs = (), dict(embeds)
    if control is not None:
        adapters, inputs["control_image"] = (CONTROLNET,), torch.from_numpy(control)[None]
    [latents] = drive(cores.denoiser, [WorkItem("r", "denoise", params, inputs, adapters)])
    return one(cores.vae_decoder, "decode", {}, **latents.tensors).tensors["image"][0].numpy()


def controlnet_pipeline_image(pipe, params: dict, control: np.ndarray) -> np.ndarray:
    sizes = {k: params[k] for k in ("width", "height") if k in params}
    out = pipe(params["prompt"], image=Image.fromarray(control),
               negative_prompt=params["negative_prompt"], guidance_scale=params["guidance"],
               num_inference_steps=params["steps"],
               controlnet_conditioning_scale=params["controlnet_conditioning_scale"],
               generator=torch.Generator("cpu").manual_seed(params["seed"]), output_type="np",
               **sizes)
    return to_uint8(out.images)[0]


@pytest.mark.parametrize(("scale", "guidance", "sizes"), [
    (1.0, 7.5, {}), (0.5, 1.0, {}), (1.5, 6.0, {"width": 64, "height": 40})])
def test_controlnet_equals_the_pipeline(sd, scale, guidance, sizes) -> None:
    params = {"prompt": PROMPT, "negative_prompt": "blurry", "guidance": guidance, "steps": 3,
              "seed": 3, "controlnet_conditioning_scale": scale, **sizes}
    served = controlnet_image(sd.cores, params, CONTROL)
    assert served.shape == ((40, 64, 3) if sizes else (56, 48, 3))  # else the image's size
    assert np.array_equal(served, controlnet_pipeline_image(sd.pipe, params, CONTROL))
    # the ControlNet steers: the same request without it makes another image
    plain = controlnet_image(sd.cores, {**params, "width": served.shape[1],
                                        "height": served.shape[0]}, None)
    assert not np.array_equal(served, plain)


def test_sdxl_controlnet_equals_the_pipeline(sdxl_dir: Path, cache_dir: Path) -> None:
    import functools

    from diffusers import ControlNetModel

    from services.core import ModelSource

    models = cache_dir / "models"
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, sdxl_dir)(sdxl_dir))
                               for kind in ("text_encoder", "denoiser", "vae_decoder")})
    cores.denoiser.source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models))
    spec = "builtin:tiny-sdxl-controlnet"
    pipe = _pipe("StableDiffusionXLControlNetPipeline", sdxl_dir, controlnet=ControlNetModel
                 .from_pretrained(resolve_model_dir(spec, models)))
    for scale, guidance, negative in ((1.0, 5.0, None), (0.5, 1.0, "blurry")):
        params = {"prompt": PROMPT, "guidance": guidance, "steps": 3, "seed": 3,
                  "controlnet_conditioning_scale": scale}
        if negative is not None:
            params["negative_prompt"] = negative
        embeds = one(cores.text_encoder, "encode", params).tensors
        item = WorkItem("r", "denoise", params,
                        {**embeds, "control_image": torch.from_numpy(CONTROL)[None]}, (spec,))
        if cores.denoiser.needs_prepare(item):
            cores.denoiser.prepare(item)
        [latents] = drive(cores.denoiser, [item])
        served = one(cores.vae_decoder, "decode", {}, **latents.tensors).tensors["image"][0]
        out = pipe(PROMPT, image=Image.fromarray(CONTROL), negative_prompt=negative,
                   guidance_scale=guidance, num_inference_steps=3,
                   controlnet_conditioning_scale=scale,
                   generator=torch.Generator("cpu").manual_seed(3), output_type="np")
        assert np.array_equal(served.numpy(), to_uint8(out.images)[0])


def test_controlnet_requests_name_what_they_lack(sd) -> None:
    from common.errors import InvalidField

    embeds = one(sd.cores.text_encoder, "encode", {"prompt": "a cat"}).tensors
    with pytest.raises(InvalidField, match="control_image"):
        drive(sd.cores.denoiser, [WorkItem("r", "denoise", {}, embeds, (CONTROLNET,))])
    with pytest.raises(InvalidField, match="builtin:nope"):
        drive(sd.cores.denoiser, [WorkItem("r", "denoise", {}, {
            **embeds, "control_image": torch.from_numpy(CONTROL)[None]}, ("builtin:nope",))])


def test_a_shipped_controlnet_is_not_offered_beside_another_base_model(sd) -> None:
    # tiny-sd's directory: another model spec than the builtin's
    settings = Settings(base_model=str(sd.dir), workflows=[])
    assert "made for builtin:tiny-sd" in other_family_workflows(settings)["controlnet"]
    named = settings.model_copy(update={"models": {"control": CONTROLNET}})
    assert "controlnet" in shipped_workflows(named)


def test_a_denoiser_replica_counts_the_controlnets_its_workflows_attach(sd) -> None:
    """Placement reserves for the ControlNets a replica may load beside its model, in the
    dtype it loads them in (the base model's)."""
    from common.workflow import attached_adapters
    from services.catalog import monolithic_footprint_bytes

    flows = builtin_workflows().values()
    assert attached_adapters("denoiser", "builtin:tiny-sd", flows) == [CONTROLNET]
    assert attached_adapters("text_encoder", "builtin:tiny-sd", flows) == []
    net = weights_bytes(sd.control_dir, ["."], "float32")
    assert net == sum(t.numel() * t.element_size() for t in sd.net.state_dict().values()) > 0
    for dtype, half in (("float32", 1), ("float16", 2)):
        assert footprint_bytes("denoiser", sd.dir, dtype, adapters=[sd.control_dir]) == (
            footprint_bytes("denoiser", sd.dir, dtype) + net // half)
    spec = builtin_workflows()["controlnet"]
    dirs = {"base": sd.dir, "control": sd.control_dir}
    assert monolithic_footprint_bytes(spec, dirs) == monolithic_footprint_bytes(
        builtin_workflows()["txt2img"], {"base": sd.dir}) + net


def test_controlnet_served_whole_equals_the_pipeline(sd, cache_dir: Path) -> None:
    spec = builtin_workflows()["controlnet"]
    models = cache_dir / "models"
    core = _loaded(MonolithicCore(spec, {alias: resolve_model_dir(m, models)
                                         for alias, m in spec.models.items()}))
    params = {"prompt": PROMPT, "negative_prompt": "", "guidance": 7.5, "steps": 2, "seed": 8,
              "controlnet_conditioning_scale": 1.0}
    served = one(core, "run", params, control_image=torch.from_numpy(CONTROL)[None])
    assert np.array_equal(served.tensors["image"][0].numpy(),
                          controlnet_pipeline_image(sd.pipe, params, CONTROL))


# --------------------------------------------------------------------------------------------
# ControlNet for SD3 and FLUX: conditioned on the control image's latents, which the workflow's
# VAE encoder node makes (the pipelines encode the control image with their VAE)
# --------------------------------------------------------------------------------------------


def workflow_images(cores: SimpleNamespace, spec: WorkflowSpec, requests: list[dict],
                    images: dict[str, torch.Tensor], denoise=drive) -> list[np.ndarray]:
    """``spec``'s nodes one after another through ``cores`` (one per node kind), as its plan
    wires them: the items of every request in one batch a node, each prepared first (its
    ControlNet loaded) as a replica prepares it; ``denoise(core, items)`` runs the
    denoiser's."""
    plan = spec.compile()
    outputs: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in requests]
    while plan.output_node not in outputs[0]:
        node = next(n for n in plan.nodes
                    if n not in outputs[0] and plan.predecessors(n) <= outputs[0].keys())
        planned, core = plan.nodes[node], getattr(cores, plan.nodes[node].kind)
        items = []
        for i, (params, done) in enumerate(zip(requests, outputs, strict=True)):
            inputs = {}
            for name, ref in planned.sources().items():
                inputs[name] = images[ref.name] if ref.from_request else done[ref.node][ref.name]
            items.append(WorkItem(f"r{i}", planned.op, params, inputs, tuple(planned.adapters)))
        for item in items:
            if core.needs_prepare(item):
                core.prepare(item)
        run = denoise if planned.kind == "denoiser" else drive
        for done, result in zip(outputs, run(core, items), strict=True):
            done[node] = result.tensors
    out = plan.output_ref
    return [done[out.node][out.name][0].numpy() for done in outputs]


def controlled(model_dir: Path, controlnet: str, cache_dir: Path,
               pipeline: str) -> SimpleNamespace:
    """A T5 family's cores on ``model_dir`` (its denoiser told where ControlNets are), and
    ``pipeline`` with ControlNet ``controlnet``."""
    import functools

    import diffusers

    from services.core import ModelSource

    torch.set_num_threads(1)
    models = cache_dir / "models"
    kinds = ("text_encoder", "t5_encoder", "vae_encoder", "denoiser", "vae_decoder")
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, model_dir)(model_dir))
                               for kind in kinds})
    cores.denoiser.source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models))
    control_dir = resolve_model_dir(controlnet, models)
    net = getattr(diffusers, cores.denoiser.controlnet_class).from_pretrained(control_dir)
    return SimpleNamespace(dir=model_dir, cores=cores, control_dir=control_dir,
                           pipe=_pipe(pipeline, model_dir, add_watermarker=None, controlnet=net))


@pytest.fixture(scope="module")
def sd3_control(sd3_dir: Path, cache_dir: Path) -> SimpleNamespace:
    return controlled(sd3_dir, SD3_CONTROLNET, cache_dir,
                      "StableDiffusion3ControlNetPipeline")


@pytest.fixture(scope="module")
def flux_control(cache_dir: Path) -> SimpleNamespace:
    return controlled(resolve_model_dir(FLUX, cache_dir / "models"), FLUX_CONTROLNET, cache_dir,
                      "FluxControlNetPipeline")


def control_spec(name: str, base: Path) -> WorkflowSpec:
    """Shipped workflow ``name`` on model directory ``base`` with its builtin ControlNet."""
    spec = builtin_workflows()[name]
    return builtin_workflows({"base": str(base), "control": spec.models["control"]})[name]


def sd3_control_params(**overrides: object) -> dict:
    return {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "guidance": 7.0,
            "seed": 3, "width": 48, "height": 56, "max_sequence_length": 256,
            "controlnet_conditioning_scale": 1.0, **overrides}


def sd3_control_pipeline_image(pipe, params: dict, control: np.ndarray) -> np.ndarray:
    # the pipeline samples the control image's latents with torch's global generator: seeded
    # as the VAE encoder node seeds its own
    torch.manual_seed(params["seed"])
    return pipeline_image(pipe, params, control_image=Image.fromarray(control),
                          controlnet_conditioning_scale=params["controlnet_conditioning_scale"])


def flux_control_params(**overrides: object) -> dict:
    return {"prompt": PROMPT, "steps": 3, "guidance": 3.5, "true_cfg_scale": 1.0, "seed": 3,
            "width": 48, "height": 56, "max_sequence_length": 512,
            "controlnet_conditioning_scale": 1.0, **overrides}


def flux_control_pipeline_image(pipe, params: dict, control: np.ndarray) -> np.ndarray:
    return flux_pipeline_image(
        pipe, params, control_image=Image.fromarray(control),
        controlnet_conditioning_scale=params["controlnet_conditioning_scale"])


CONTROL_IMAGE = {"control_image": torch.from_numpy(CONTROL)[None]}


@pytest.mark.parametrize("overrides", [
    {}, {"controlnet_conditioning_scale": 0.5, "guidance": 1.0},
    {"controlnet_conditioning_scale": 1.5, "guidance": 4.0, "negative_prompt": "",
     "width": 64, "height": 40, "seed": 8}])
def test_sd3_controlnet_equals_the_pipeline(sd3_control, overrides) -> None:
    params = sd3_control_params(**overrides)
    spec = control_spec("sd3-controlnet", sd3_control.dir)
    [served] = workflow_images(sd3_control.cores, spec, [params], CONTROL_IMAGE)
    assert served.shape == (params["height"], params["width"], 3) and served.std() > 5
    assert np.array_equal(served,
                          sd3_control_pipeline_image(sd3_control.pipe, params, CONTROL))
    # the ControlNet steers: the same request without it makes another image
    [plain] = sd3_images(sd3_control.cores, [params])
    assert not np.array_equal(served, plain)


@pytest.mark.parametrize("overrides", [
    {}, {"controlnet_conditioning_scale": 0.5, "guidance": 5.0, "negative_prompt": "blurry",
         "true_cfg_scale": 4.0},
    {"controlnet_conditioning_scale": 1.5, "width": 64, "height": 32, "seed": 8}])
def test_flux_controlnet_equals_the_pipeline(flux_control, overrides) -> None:
    params = flux_control_params(**overrides)
    spec = control_spec("flux-controlnet", flux_control.dir)
    [served] = workflow_images(flux_control.cores, spec, [params], CONTROL_IMAGE)
    assert served.shape == (params["height"], params["width"], 3) and served.std() > 5
    assert np.array_equal(served,
                          flux_control_pipeline_image(flux_control.pipe, params, CONTROL))
    [plain] = flux_images(flux_control.cores, [params])
    assert not np.array_equal(served, plain)


def test_controlnet_requests_batched_together_match_their_solo_images(
        sd3_control, flux_control) -> None:
    # with and without guidance (SD3), a negative pass (FLUX): one row or two each
    sd3 = [sd3_control_params(seed=1), sd3_control_params(prompt="a cat", seed=2, guidance=1.0),
           sd3_control_params(prompt="a red house by the sea", seed=3, guidance=5.0)]
    flux = [flux_control_params(seed=1), flux_control_params(prompt="a cat", seed=2,
                                                             guidance=5.0),
            flux_control_params(prompt="a red house by the sea", seed=3,
                                negative_prompt="blurry", true_cfg_scale=3.0)]
    for control, name, requests, expect in (
            (sd3_control, "sd3-controlnet", sd3, sd3_control_pipeline_image),
            (flux_control, "flux-controlnet", flux, flux_control_pipeline_image)):
        served = workflow_images(control.cores, control_spec(name, control.dir), requests,
                                 CONTROL_IMAGE)
        for params, image in zip(requests, served, strict=True):
            expected = expect(control.pipe, params, CONTROL)
            assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1, name


def _two_devices(request, name: str) -> tuple[SimpleNamespace, ModelCore, list[dict]]:
    """The ControlNet fixture of family ``name``, a second denoiser core on its model (another
    device's), and two guided requests that batch together."""
    control = request.getfixturevalue(name.replace("-controlnet", "_control"))
    helper = _loaded(core_class("denoiser", control.dir)(control.dir))
    helper.source = control.cores.denoiser.source
    guided = {"negative_prompt": "blurry", "guidance": 5.0, "true_cfg_scale": 3.0}
    return control, helper, [
        {**sd3_control_params(seed=1), **guided},
        {**sd3_control_params(prompt="a red house by the sea", seed=2), **guided}]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["sd3-controlnet", "flux-controlnet"])
def test_a_split_step_with_a_controlnet_makes_the_whole_steps_image(
        request, name: str) -> None:
    """CFG parallelism with a ControlNet: each device runs it for its branch (FLUX's on the
    positive prompt for both, as the pipeline shares it); the image is the whole steps' within
    1/255 per pixel."""
    from tests.test_parallel import split_drive

    control, helper, requests = _two_devices(request, name)
    spec = control_spec(name, control.dir)
    whole = workflow_images(control.cores, spec, requests, CONTROL_IMAGE)
    split = workflow_images(control.cores, spec, requests, CONTROL_IMAGE,
                            denoise=lambda core, items: split_drive(core, helper, items))
    for a, b in zip(whole, split, strict=True):
        assert a.std() > 5 and np.abs(a.astype(int) - b.astype(int)).max() <= 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["sd", "sd3-controlnet", "flux-controlnet"])
def test_a_controlnet_on_another_device_makes_the_same_image(request, name: str) -> None:
    """ControlNet parallelism: another device runs the ControlNet on each step's model input
    while the base model runs the blocks before the first that adds its outputs (the UNet's
    down blocks, a transformer's first block); the same bits as the whole steps."""
    from tests.test_parallel import control_drive

    control, helper, requests = _two_devices(request, name)
    core, order = control.cores.denoiser, []
    model = getattr(core, "unet", None) or core.transformer
    gate = model.down_blocks[-1] if hasattr(model, "down_blocks") else model.transformer_blocks[0]
    hook = gate.register_forward_hook(lambda *_: order.append("block"))
    try:
        if name == "sd":  # SD's ControlNet reads the control image itself
            items = [WorkItem(f"r{i}", "denoise", params,
                              {**one(control.cores.text_encoder, "encode", params).tensors,
                               **CONTROL_IMAGE}, (CONTROLNET,))
                     for i, params in enumerate(requests)]
            whole = [r.tensors["latents"] for r in drive(core, items)]
            apart = [r.tensors["latents"] for r in control_drive(core, helper, items, order)]
        else:
            spec = control_spec(name, control.dir)
            whole = workflow_images(control.cores, spec, requests, CONTROL_IMAGE)
            apart = workflow_images(control.cores, spec, requests, CONTROL_IMAGE,
                                    denoise=lambda c, items: control_drive(c, helper, items,
                                                                           order))
    finally:
        hook.remove()
    assert all(np.array_equal(a, b) for a, b in zip(whole, apart, strict=True))
    assert order.count("outputs") == requests[0]["steps"]
    taken = [i for i, what in enumerate(order) if what == "outputs"]
    assert all(order[i - 1] == "block" for i in taken)  # after the model's first blocks


def test_sd3_controlnet_served_whole_equals_the_pipeline(sd3_control) -> None:
    control = sd3_control
    spec = control_spec("sd3-controlnet", control.dir)
    core = _loaded(MonolithicCore(spec, {"base": control.dir, "control": control.control_dir}))
    assert core.components == ("text_encoder", "text_encoder_2", "text_encoder_3",
                               "transformer", "vae")  # ControlNets load on first use
    params = sd3_control_params(seed=5, guidance=6.0)
    served = one(core, "run", params, **CONTROL_IMAGE).tensors["image"][0].numpy()
    assert np.array_equal(served, sd3_control_pipeline_image(control.pipe, params, CONTROL))


def test_flux_controlnet_served_whole_equals_the_pipeline(flux_control) -> None:
    spec = builtin_workflows()["flux-controlnet"]
    core = _loaded(MonolithicCore(spec, {"base": flux_control.dir,
                                         "control": flux_control.control_dir}))
    params = flux_control_params(seed=5, negative_prompt="fog", true_cfg_scale=2.0)
    served = one(core, "run", params, **CONTROL_IMAGE).tensors["image"][0].numpy()
    assert np.array_equal(served, flux_control_pipeline_image(flux_control.pipe, params,
                                                              CONTROL))


def test_sd3_and_flux_controlnets_name_what_they_lack(sd3_control, flux_control, sd) -> None:
    from common.errors import InvalidField

    for control, name, params in ((sd3_control, "sd3-controlnet", sd3_control_params()),
                                  (flux_control, "flux-controlnet", flux_control_params())):
        spec = control_spec(name, control.dir)
        denoise = spec.compile().nodes["denoise"]
        item = WorkItem("r", "denoise", params, {}, tuple(denoise.adapters))
        control.cores.denoiser.prepare(item)
        texts = {**one(control.cores.text_encoder, "encode", params).tensors}
        t5 = one(control.cores.t5_encoder, "encode", params).tensors["prompt_embeds"]
        texts["t5_prompt_embeds" if name.startswith("sd3") else "prompt_embeds"] = t5
        encoded = one(control.cores.vae_encoder, "encode_image", params,
                      **CONTROL_IMAGE).tensors
        # FLUX's pipeline drew the control latents from its generator, SD3's not
        state = {"generator_state": encoded["generator_state"]}
        kept, left = (state, {}) if name.startswith("flux") else ({}, state)
        checks = [({**texts, **kept, **CONTROL_IMAGE}, "control_image"),
                  ({**texts, **kept, "control_latents": encoded["control_latents"][:, :2]},
                   "control_latents"),
                  ({**texts, **left, "control_latents": encoded["control_latents"]},
                   "generator_state")]
        for inputs, field in checks:
            with pytest.raises(InvalidField) as caught:
                drive(control.cores.denoiser, [WorkItem("r", "denoise", params, inputs,
                                                        tuple(denoise.adapters))])
            assert caught.value.to_dict()["field"] == field, (name, field)
        # another family's ControlNet
        with pytest.raises(InvalidField, match="is a ControlNetModel; this model's denoiser "
                                               "runs a"):
            control.cores.denoiser.prepare(WorkItem("r", "denoise", params, {}, (CONTROLNET,)))
    # SD's ControlNets take the control image itself: its VAE encoder does not encode one
    sd_encoder = _loaded(core_class("vae_encoder", sd.dir)(sd.dir))
    with pytest.raises(InvalidField, match="take the control image itself"):
        one(sd_encoder, "encode_image", {"seed": 1}, **CONTROL_IMAGE)


def test_a_vae_encoder_node_takes_an_image_or_a_control_image() -> None:
    from common.errors import InvalidRequest
    from common.workflow import parse_workflow

    spec = builtin_workflows()["flux-controlnet"].model_dump()
    spec["nodes"]["encode_control"]["inputs"]["image"] = "request.control_image"
    with pytest.raises(InvalidRequest, match="takes one input of"):
        parse_workflow(spec)
    spec["nodes"]["encode_control"]["inputs"] = {}
    with pytest.raises(InvalidRequest, match="takes one input of"):
        parse_workflow(spec)


# --------------------------------------------------------------------------------------------
# LoRAs per request (SD 1.x): files in lora_dir, on the UNet, each at its scale
# --------------------------------------------------------------------------------------------


def build_lora(sd_dir: Path, lora_dir: Path, name: str, seed: int,
               text_encoder: bool = False) -> Path:
    """A random LoRA for tiny-sd's UNet (and its CLIP text encoder), saved as diffusers saves
    one."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if text_encoder:
        clip = CLIPTextModel.from_pretrained(sd_dir, subfolder="text_encoder")
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "fc1"]), clip)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(clip))
    StableDiffusionPipeline.save_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors",
                                              **layers)
    return lora_dir / f"{name}.safetensors"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("loras")
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    for name, seed in (("style", 1), ("ink", 2)):
        build_lora(sd_dir, path, name, seed)
    build_lora(sd_dir, path, "words", 3, text_encoder=True)
    return path


@pytest.fixture(scope="module")
def lora_cores(cache_dir: Path, lora_dir: Path) -> SimpleNamespace:
    import functools

    from services.core import ModelSource

    torch.set_num_threads(1)
    models = cache_dir / "models"
    sd_dir = resolve_model_dir("builtin:tiny-sd", models)
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, sd_dir)(sd_dir))
                               for kind in ("text_encoder", "denoiser", "vae_decoder")})
    for core in vars(cores).values():
        core.source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models),
                                  lora_dir)
    return cores


def lora_params(loras: list[tuple[str, float]], seed: int = 5, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "negative_prompt": "blurry", "steps": 3, "guidance": 7.5,
            "seed": seed, "width": 64, "height": 64,
            "loras": [{"name": n, "scale": s} for n, s in loras]}


def lora_images(cores: SimpleNamespace, requests: list[dict]) -> list[np.ndarray]:
    """As a replica runs them: each item prepared (its LoRAs read), then one batch a node."""
    def run(core: ModelCore, op: str, inputs: list[dict]) -> list:
        items = [WorkItem(f"r{i}", op, p, x)
                 for i, (p, x) in enumerate(zip(requests, inputs, strict=True))]
        for item in items:
            if core.needs_prepare(item):
                core.prepare(item)
        return drive(core, items)

    texts = run(cores.text_encoder, "encode", [{}] * len(requests))
    latents = run(cores.denoiser, "denoise", [t.tensors for t in texts])
    images = run(cores.vae_decoder, "decode", [r.tensors for r in latents])
    return [r.tensors["image"][0].numpy() for r in images]


def lora_pipeline_image(sd_dir: Path, lora_dir: Path, params: dict) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = _pipe("StableDiffusionPipeline", sd_dir, add_watermarker=None, safety_checker=None,
                 requires_safety_checker=False)
    names = [lora["name"] for lora in params["loras"]]
    for name in names:
        pipe.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors",
                               adapter_name=name)
    if names:
        pipe.set_adapters(names, [lora["scale"] for lora in params["loras"]])
    assert isinstance(pipe, StableDiffusionPipeline)
    return pipeline_image(pipe, params)


def test_loras_equal_the_pipelines_with_the_same_adapters(lora_cores, lora_dir,
                                                          cache_dir: Path) -> None:
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    seen = []
    # one replica: LoRAs loaded, switched, several at once, then none (the plain model)
    for loras in ([("style", 1.0)], [("style", 0.5), ("ink", 1.5)], [], [("ink", -1.0)]):
        params = lora_params(loras)
        [served] = lora_images(lora_cores, [params])
        assert np.array_equal(served, lora_pipeline_image(sd_dir, lora_dir, params)), loras
        seen.append(served)
    assert not any(np.array_equal(seen[2], other) for other in seen[:2] + seen[3:])


def test_a_lora_with_text_encoder_layers_equals_the_pipeline(lora_cores, lora_dir,
                                                             cache_dir: Path) -> None:
    """The CLIP text encoder node takes a LoRA's text encoder layers, as the pipeline's
    ``load_lora_weights`` puts them on its text encoder, beside another LoRA's UNet-only ones."""
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    for loras in ([("words", 1.0)], [("words", 0.6), ("style", 1.0)], [("style", 1.0)]):
        params = lora_params(loras)
        [served] = lora_images(lora_cores, [params])
        assert np.array_equal(served, lora_pipeline_image(sd_dir, lora_dir, params)), loras
    [embeds_with, embeds_without] = [
        drive(lora_cores.text_encoder, [WorkItem("r", "encode", lora_params(loras), {})])[0]
        .tensors["prompt_embeds"] for loras in ([("words", 1.0)], [])]
    assert not torch.equal(embeds_with, embeds_without)  # its text encoder layers count


def test_requests_with_other_loras_batch_apart_and_match_alone(lora_cores, lora_dir,
                                                               cache_dir: Path) -> None:
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    requests = [lora_params([("style", 1.0)], seed=1), lora_params([], seed=2),
                lora_params([("ink", 0.7)], seed=3), lora_params([("style", 1.0)], seed=4)]
    for params, served in zip(requests, lora_images(lora_cores, requests), strict=True):
        expected = lora_pipeline_image(sd_dir, lora_dir, params)
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_a_replaced_lora_file_is_read_again(lora_cores, lora_dir, cache_dir: Path) -> None:
    import shutil

    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    shutil.copy(lora_dir / "style.safetensors", lora_dir / "swap.safetensors")
    [before] = lora_images(lora_cores, [lora_params([("swap", 1.0)])])
    time.sleep(0.01)  # a new modification time
    build_lora(sd_dir, lora_dir, "swap", seed=9)
    params = lora_params([("swap", 1.0)])
    [after] = lora_images(lora_cores, [params])
    assert not np.array_equal(before, after)
    assert np.array_equal(after, lora_pipeline_image(sd_dir, lora_dir, params))


def test_loras_served_whole_equal_the_pipeline(cache_dir: Path, lora_dir: Path) -> None:
    from services.core import ModelSource

    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    core = MonolithicCore(builtin_workflows()["lora"], {"base": sd_dir})
    core.source = ModelSource(lambda spec: sd_dir, lora_dir)
    core.load()
    params = lora_params([("ink", 0.6)], seed=12)
    item = WorkItem("r", "run", params, {})
    assert core.needs_prepare(item)
    core.prepare(item)
    [served] = drive(core, [item])
    assert np.array_equal(served.tensors["image"][0].numpy(),
                          lora_pipeline_image(sd_dir, lora_dir, params))


def test_sdxl_loras_equal_the_pipelines(sdxl_dir: Path, txt2img_pipe,
                                        tmp_path: Path) -> None:
    """A LoRA with layers for the UNet and both CLIP text encoders."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from services.core import ModelSource

    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    for name, cls in (("text_encoder", CLIPTextModel),
                      ("text_encoder_2", CLIPTextModelWithProjection)):
        clip = cls.from_pretrained(sdxl_dir, subfolder=name)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                           target_modules=["q_proj", "out_proj"]), clip)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(clip))
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), weight_name="xl.safetensors",
                                                **layers)
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, sdxl_dir)(sdxl_dir))
                               for kind in ("text_encoder", "denoiser", "vae_decoder")})
    for core in vars(cores).values():
        core.source = ModelSource(lambda spec: sdxl_dir, tmp_path)
    params = {"prompt": PROMPT, "steps": 3, "guidance": 5.0, "seed": 6, "width": 64,
              "height": 64, "loras": [{"name": "xl", "scale": 0.7}]}
    item = WorkItem("r", "denoise", params, {})
    for core in (cores.text_encoder, cores.denoiser):
        if core.needs_prepare(item):
            core.prepare(item)
    [served] = micro_images(cores, [params])
    pipe = _pipe("StableDiffusionXLPipeline", sdxl_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors", adapter_name="xl")
    pipe.set_adapters(["xl"], [0.7])
    assert np.array_equal(served, pipeline_image(pipe, params))
    assert not np.array_equal(served, pipeline_image(txt2img_pipe, params))  # it steers


def transformer_lora(model_dir: Path, pipeline: str, out_dir: Path, name: str, seed: int) -> None:
    """A random LoRA for the transformer of ``model_dir`` (SD3's or FLUX's), saved as
    diffusers saves one."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    cls = getattr(diffusers, pipeline)
    torch.manual_seed(seed)
    transformer = getattr(diffusers, model_index(model_dir)["transformer"][1]).from_pretrained(
        model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    cls.save_lora_weights(str(out_dir), weight_name=f"{name}.safetensors",
                          transformer_lora_layers=convert_state_dict_to_diffusers(
                              get_peft_model_state_dict(transformer)))


def with_loras(model_dir: Path, lora_dir: Path, params: dict) -> SimpleNamespace:
    """Fresh cores of ``model_dir``'s T5 workflow (LoRAs change a model) with the LoRAs of
    ``params`` read, as a replica reads them before a request's first step."""
    from services.core import ModelSource

    kinds = ("text_encoder", "t5_encoder", "denoiser", "vae_decoder")
    cores = SimpleNamespace(**{kind: _loaded(core_class(kind, model_dir)(model_dir))
                               for kind in kinds})
    item = WorkItem("r", "denoise", params, {})
    for core in vars(cores).values():
        core.source = ModelSource(lambda spec: model_dir, lora_dir)
        if core.needs_prepare(item):
            core.prepare(item)
    return cores


def lora_pipe(cls_name: str, model_dir: Path, lora_dir: Path, loras: list[dict]):
    pipe = _pipe(cls_name, model_dir, add_watermarker=None)
    for lora in loras:
        pipe.load_lora_weights(str(lora_dir), weight_name=f"{lora['name']}.safetensors",
                               adapter_name=lora["name"])
    pipe.set_adapters([lora["name"] for lora in loras], [lora["scale"] for lora in loras])
    return pipe


def test_sd3_loras_equal_the_pipelines(sd3_dir: Path, sd3_pipe, tmp_path: Path) -> None:
    for name, seed in (("sd3a", 3), ("sd3b", 4)):
        transformer_lora(sd3_dir, "StableDiffusion3Pipeline", tmp_path, name, seed)
    loras = [{"name": "sd3a", "scale": 0.8}, {"name": "sd3b", "scale": -0.5}]
    params = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "guidance": 6.0,
              "seed": 6, "width": 64, "height": 64, "loras": loras}
    cores = with_loras(sd3_dir, tmp_path, params)
    [served] = sd3_images(cores, [params])
    pipe = lora_pipe("StableDiffusion3Pipeline", sd3_dir, tmp_path, loras)
    assert np.array_equal(served, pipeline_image(pipe, params))
    assert not np.array_equal(served, pipeline_image(sd3_pipe, params))  # it steers
    plain = {**params, "loras": []}  # the same replica without them: the plain model's
    assert np.array_equal(sd3_images(cores, [plain])[0], pipeline_image(sd3_pipe, plain))


def test_flux_loras_equal_the_pipelines(flux, tmp_path: Path) -> None:
    transformer_lora(flux.dir, "FluxPipeline", tmp_path, "fx", 5)
    loras = [{"name": "fx", "scale": 1.2}]
    params = {"prompt": PROMPT, "negative_prompt": "fog", "steps": 3, "guidance": 3.5,
              "true_cfg_scale": 2.0, "seed": 6, "width": 64, "height": 48,
              "max_sequence_length": 512, "loras": loras}
    [served] = flux_images(with_loras(flux.dir, tmp_path, params), [params])
    pipe = lora_pipe("FluxPipeline", flux.dir, tmp_path, loras)
    assert np.array_equal(served, flux_pipeline_image(pipe, params))
    assert not np.array_equal(served, flux_pipeline_image(flux.pipe, params))


def test_lora_errors_name_the_field(lora_cores) -> None:
    from common.errors import InvalidField
    from common.workflow import check_loras

    with pytest.raises(InvalidField, match="no LoRA 'nope'"):
        lora_images(lora_cores, [lora_params([("nope", 1.0)])])
    for value, field in (("style", "loras"), ([{"name": "../x"}], "loras[0].name"),
                         ([{"name": "a", "scale": 9}], "loras[0].scale"),
                         ([{"name": "a", "extra": 1}], "loras[0]"),
                         ([{"name": f"l{i}"} for i in range(5)], "loras")):
        with pytest.raises(InvalidField) as caught:
            check_loras("loras", value, 4)
        assert caught.value.to_dict()["field"] == field
    assert check_loras("loras", [{"name": "a"}, {"name": "a", "scale": 0.5}], 4) == [
        {"name": "a", "scale": 1.5}]  # named twice: one LoRA, its scales added


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


def test_the_weights_dtype_is_the_setting_or_the_familys_on_a_gpu() -> None:
    from common.families import load_dtype

    assert load_dtype("auto", "cpu", "flux") == "float32"  # half precision is slow on a CPU
    assert load_dtype("auto", "cuda:1", "flux") == "bfloat16"
    assert load_dtype("auto", "cuda", "sdxl") == "float16"
    assert load_dtype("auto", "cuda", None) == "float32"
    assert load_dtype("float16", "cpu", "sd") == "float16"
    with pytest.raises(ValueError, match="float8"):
        load_dtype("float8", "cpu", "sd")
    with pytest.raises(ValueError, match="dtype"):
        Settings(dtype="float8")


def test_cores_load_their_weights_in_the_dtype_asked_for(sdxl_dir: Path) -> None:
    cores = SimpleNamespace(**{
        kind: _loaded(core_class(kind, sdxl_dir)(sdxl_dir, dtype="bfloat16"))
        for kind in ("text_encoder", "denoiser", "vae_decoder", "vae_encoder")})
    assert cores.denoiser.unet.dtype == cores.vae_decoder.vae.dtype == torch.bfloat16
    assert all(enc.dtype == torch.bfloat16 for _, enc in cores.text_encoder.pairs)
    params = {"prompt": PROMPT, "steps": 2, "guidance": 5.0, "seed": 1, "width": 64,
              "height": 64}
    [image] = micro_images(cores, [params])
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3) and image.std() > 5


@pytest.mark.timeout(300)
def test_a_stack_serves_loras_from_its_lora_dir(tmp_path_factory, cache_dir: Path,
                                                lora_dir: Path) -> None:
    sd_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    with stack_on("builtin:tiny-sd", tmp_path_factory.mktemp("lora"), cache_dir,
                  lora_dir=lora_dir, workflows=["lora"]) as stack, \
            LegoClient(stack.gateway_url) as client:
        for loras in ([("style", 0.8), ("ink", 0.4)], []):
            params = lora_params(loras, seed=17)
            _, png = client.generate("lora", **params)
            assert np.array_equal(png_pixels(png),
                                  lora_pipeline_image(sd_dir, lora_dir, params))
        with pytest.raises(LegoClientError) as caught:  # the gateway sees the lora_dir
            client.submit("lora", **lora_params([("nope", 1.0)]))
        assert caught.value.status == 422 and "loras[0].name" in str(caught.value)


def test_the_gateway_names_a_lora_it_cannot_serve(cache_dir: Path, lora_dir: Path) -> None:
    from common.errors import InvalidRequest
    from common.modelinfo import LocalModelInfo
    from common.workflow import validate_params

    spec = builtin_workflows()["lora"]
    raw = {"prompt": "a cat", "loras": [{"name": "style"}, {"name": "nope", "scale": 0.5}]}
    for models, field, message in (
            (LocalModelInfo(cache_dir / "models", lora_dir), "loras[1].name", "no LoRA 'nope'"),
            (LocalModelInfo(cache_dir / "models"), "loras[0].name", "serves no LoRAs")):
        with pytest.raises(InvalidRequest) as caught:
            validate_params(spec, raw, models)
        [error] = caught.value.to_dict()["errors"]
        assert error["field"] == field and message in error["message"]
    valid = validate_params(spec, {"prompt": "a cat", "loras": [{"name": "style"}]},
                            LocalModelInfo(cache_dir / "models", lora_dir))
    assert valid.params["loras"] == [{"name": "style", "scale": 1.0}]
