"""Pure tests: workflow specs, DAG checks, parameter validation."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import InvalidRequest, PayloadTooLarge
from common.messages import Plan, Ref, decode, encode
from common.models import model_components
from common.settings import Settings
from common.workflow import (
    builtin_workflows,
    offered_workflows,
    parse_workflow,
    servable,
    validate_params,
)

pytestmark = pytest.mark.timeout(30)


class FakeModels:
    """Token counts without a tokenizer: one token per word plus the two specials."""

    def count_tokens(self, model: str, text: str) -> tuple[int, int]:
        return len(text.split()) + 2, 77

    def native_size(self, model: str) -> tuple[int, int]:
        return 64, 64

    def lora_problem(self, name: str) -> str | None:
        return None if name == "style" else f"no LoRA {name!r}"


def png_b64(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_shipped_workflows_share_pools() -> None:
    flows = builtin_workflows()
    assert {"txt2img", "txt2img-safe", "txt2img-hires", "img2img"} <= set(flows)
    txt2img = set(flows["txt2img"].pools())
    for name in ("txt2img-safe", "txt2img-hires", "img2img"):
        # every workflow reuses the text encoder, denoiser and decoder pools of txt2img
        assert txt2img & set(flows[name].pools()) >= {p for p in txt2img if "vae_encoder" not in p}


def test_img2img_is_a_real_join() -> None:
    plan = builtin_workflows()["img2img"].compile()
    assert sorted(plan.roots()) == ["encode", "encode_image"]
    assert plan.predecessors("denoise") == {"encode", "encode_image"}
    assert plan.successors("encode_image") == ["denoise"]


@pytest.mark.parametrize(
    ("text", "node", "name", "from_request"),
    [
        ("encode.prompt_embeds", "encode", "prompt_embeds", False),
        ("request.image", "request", "image", True),
        ("a.b.c", "a", "b.c", False),  # the node is up to the first dot
    ],
)
def test_refs_parse_once_and_read_back(text: str, node: str, name: str,
                                       from_request: bool) -> None:
    ref = Ref.of(text)
    assert (ref.node, ref.name, ref.from_request) == (node, name, from_request)
    assert str(ref) == text and Ref.of(text) is ref  # cached


@pytest.mark.parametrize("text", ["", "encode", ".image", "encode.", "request.", "."])
def test_malformed_refs_are_refused_by_name(text: str) -> None:
    with pytest.raises(ValueError, match=f"{text!r} is not a reference"):
        Ref.of(text)


def test_plans_read_their_refs_and_keep_the_wire_text() -> None:
    plan = builtin_workflows()["img2img"].compile()
    assert plan.output_ref == Ref("decode", "image") and plan.output_node == "decode"
    assert plan.nodes["encode_image"].sources() == {"image": Ref.request("image")}
    assert plan.nodes["denoise"].sources()["image_latents"] == Ref("encode_image", "image_latents")
    # the wire format stays strings: plans in flight and stored stay readable
    wire = encode(plan)
    assert b'"image":"request.image"' in wire and b'"output":"decode.image"' in wire
    assert decode(wire, Plan) == plan
    monolithic = builtin_workflows()["img2img"].compile(monolithic=True)
    assert monolithic.nodes["pipeline"].inputs == {"image": "request.image"}


def test_model_override_changes_pools() -> None:
    a = builtin_workflows()["txt2img"].pools()
    b = builtin_workflows({"base": "/models/sd15"})["txt2img"].pools()
    assert set(a).isdisjoint(b)


SD_COMPONENTS = {
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def sd_dir(root: Path, name: str, *, index: dict | None = None,
           folders: set[str] | None = None) -> Path:
    """A hand-made diffusers directory: a model_index.json (``index``, default a full SD one)
    and an empty subfolder per name of ``folders`` (default: every component listed)."""
    index = dict(SD_COMPONENTS) if index is None else index
    path = root / name
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False, **index,
    }))
    for folder in index if folders is None else folders:
        (path / folder).mkdir()
    return path


def test_model_components_reads_the_index_and_the_subfolders(tmp_path: Path) -> None:
    full = sd_dir(tmp_path, "full")
    assert model_components(str(full)) == frozenset(SD_COMPONENTS)
    # diffusers writes [null, null] for a pipeline saved without its safety checker
    nulled = sd_dir(tmp_path, "nulled", index={**SD_COMPONENTS, "safety_checker": [None, None]})
    assert "safety_checker" not in model_components(str(nulled))
    # listed, but its folder was deleted
    no_folder = sd_dir(tmp_path, "no-folder", folders=set(SD_COMPONENTS) - {"feature_extractor"})
    assert "feature_extractor" not in model_components(str(no_folder))
    # what it cannot tell without building or loading: no opinion
    assert model_components("builtin:tiny-sd") is None
    assert model_components(str(tmp_path / "nowhere")) is None


def test_workflows_a_model_cannot_serve_are_left_out_with_the_reason(tmp_path: Path) -> None:
    unchecked = {k: v for k, v in SD_COMPONENTS.items() if k != "safety_checker"}
    model = sd_dir(tmp_path, "no-checker", index=unchecked)
    specs = builtin_workflows({"base": str(model)})
    kept, left_out = servable(specs, {str(model): model_components(str(model))})
    assert set(left_out) == {"txt2img-safe"}
    assert "safety_checker" in left_out["txt2img-safe"]
    assert str(model) in left_out["txt2img-safe"]
    assert "feature_extractor" not in left_out["txt2img-safe"]  # it has that one
    assert set(kept) == {"txt2img", "txt2img-hires", "img2img", "lora"}
    # the same through the settings, as lego up and the gateway choose them
    offered, why = offered_workflows(Settings(base_model=str(model)))
    assert set(offered) == set(kept) and why == left_out
    # a model without a VAE serves nothing; unknown models (builtins) are taken as complete
    no_vae = sd_dir(tmp_path, "no-vae", index={k: v for k, v in SD_COMPONENTS.items()
                                               if k != "vae"})
    kept, left_out = servable(builtin_workflows({"base": str(no_vae)}),
                              {str(no_vae): model_components(str(no_vae))})
    assert set(kept) == set() and "vae" in left_out["img2img"]
    assert servable(builtin_workflows(), {})[1] == {}


def test_defaults_and_seed_are_filled() -> None:
    spec = builtin_workflows()["txt2img"]
    valid = validate_params(spec, {"prompt": "a fox"}, FakeModels())
    assert valid.params["steps"] == 4
    assert valid.params["width"] == valid.params["height"] == 64
    assert 0 <= valid.params["seed"] <= 4294967295
    assert valid.warnings == []


@pytest.mark.parametrize(
    ("raw", "field", "limit"),
    [
        ({"prompt": "x", "width": 4}, "width", 8),
        ({"prompt": "x", "width": 4096}, "width", 2048),
        ({"prompt": "x", "height": 100}, "height", 8),
        ({"prompt": "x", "steps": 0}, "steps", 1),
        ({"prompt": "x", "steps": 151}, "steps", 150),
        ({"prompt": "x", "guidance": -1}, "guidance", 0),
        ({"prompt": "x", "guidance": 51}, "guidance", 50),
        ({"prompt": "x", "seed": -1}, "seed", 0),
        ({"prompt": "x" * 4001}, "prompt", 4000),
        ({}, "prompt", None),
        ({"prompt": 3}, "prompt", None),
        ({"prompt": "x", "steps": "many"}, "steps", None),
        ({"prompt": "x", "steps": True}, "steps", None),
        ({"prompt": "x", "guidance": float("nan")}, "guidance", None),
        ({"prompt": "x", "colour": "red"}, "colour", None),
    ],
)
def test_invalid_fields_name_field_and_limit(raw: dict, field: str, limit: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_params(builtin_workflows()["txt2img"], raw, FakeModels())
    errors = info.value.to_dict()["errors"]
    assert [e["field"] for e in errors] == [field]
    if limit is not None:
        assert errors[0]["limit"] == limit
        assert str(limit) in errors[0]["message"]


def test_every_bad_field_is_reported() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_params(builtin_workflows()["txt2img"], {"width": 3, "steps": 0}, FakeModels())
    assert {e.field for e in info.value.errors} == {"prompt", "width", "steps"}


def test_long_prompt_is_accepted_with_a_warning() -> None:
    valid = validate_params(builtin_workflows()["txt2img"], {"prompt": "fox " * 100},
                            FakeModels())
    assert len(valid.warnings) == 1
    assert "prompt: 102 tokens exceed the model's limit of 77" in valid.warnings[0]


def test_images_are_decoded_and_limited() -> None:
    spec = builtin_workflows()["img2img"]
    valid = validate_params(spec, {"prompt": "x", "image": png_b64(48, 32)}, FakeModels())
    assert valid.images["image"].shape == (32, 48, 3)
    assert valid.params["image"] == {"width": 48, "height": 32}
    with pytest.raises(InvalidRequest, match="image: is not a PNG, JPEG or WebP"):
        validate_params(spec, {"prompt": "x", "image": base64.b64encode(b"nope").decode()})
    with pytest.raises(InvalidRequest, match="image: is not valid base64"):
        validate_params(spec, {"prompt": "x", "image": "!!!"})
    with pytest.raises(InvalidRequest, match="1048576"):
        validate_params(spec, {"prompt": "x", "image": png_b64(1100, 1000)})
    with pytest.raises(InvalidRequest, match="smaller than 8 pixels"):
        validate_params(spec, {"prompt": "x", "image": png_b64(4, 4)})
    with pytest.raises(InvalidRequest, match="strength: 1.5 is above the maximum of 1"):
        validate_params(spec, {"prompt": "x", "image": png_b64(8, 8), "strength": 1.5})
    with pytest.raises(InvalidRequest, match="strength: steps x strength = 0.4 runs no step"):
        validate_params(spec, {"prompt": "x", "image": png_b64(8, 8), "strength": 0.1,
                               "steps": 4})
    huge = base64.b64encode(b"\0" * (5 * 1024 * 1024)).decode()
    with pytest.raises(PayloadTooLarge):
        validate_params(spec, {"prompt": "x", "image": huge})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output": "nowhere.image"}, "names no node"),
        ({"output": "encode.nothing"}, "has no output"),
        ({"output": "encode"}, "output: 'encode' is not a reference"),
        ({"nodes": {"a": {"kind": "vae_decoder", "model": "base", "inputs": {"latents": "a"}}},
          "output": "a.image"}, "node a input latents: 'a' is not a reference"),
        ({"nodes": {"a": {"kind": "vae_encoder", "model": "base",
                          "inputs": {"image": "request.prompt"}}}, "output": "a.image_latents"},
         "'request.prompt' must name an image parameter"),
        ({"nodes": {"a": {"kind": "teleporter", "model": "base"}}}, "unknown node kind"),
        ({"nodes": {"a": {"kind": "vae_decoder", "model": "base"}}}, "missing inputs"),
        ({"nodes": {"a": {"kind": "vae_decoder", "model": "nope",
                          "inputs": {"latents": "a.latents"}}}}, "unknown model"),
        ({"nodes": {"a": {"kind": "upscaler", "model": "base", "inputs": {"latents": "b.latents"}},
                    "b": {"kind": "upscaler", "model": "base", "inputs": {"latents": "a.latents"}}},
          "output": "a.latents"}, "cycle"),
        ({"solo_latency_s": False}, "solo_latency_s"),
        ({"solo_latency_s": "2"}, "solo_latency_s"),
        ({"solo_latency_s": 0}, "solo_latency_s"),
        # a T5 pool may serve several families' models: each task must carry the length
        ({"nodes": {"t5": {"kind": "t5_encoder", "model": "base"}}, "output": "t5.prompt_embeds"},
         "a t5_encoder reads params.max_sequence_length"),
    ],
)
def test_bad_workflows_are_refused(change: dict, message: str) -> None:
    spec = builtin_workflows()["txt2img"].model_dump()
    spec.update(change)
    with pytest.raises(InvalidRequest, match=message):
        parse_workflow(spec)
