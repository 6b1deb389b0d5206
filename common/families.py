"""Model families: which diffusers pipeline a model directory is laid out for.

A family decides how a node kind runs on a model (SDXL's text encoder node runs two CLIP
encoders and hands on their pooled embedding; its denoiser conditions on time ids), so the
cores are chosen per (kind, family) and a shipped workflow is offered only on a base model of
its family. The family is read from ``model_index.json``'s ``_class_name`` (the pipeline class
``save_pretrained`` recorded); nothing is loaded, so the gateway may ask too. The families'
guidance rules (which requests are guided) are here too, for the nodes that serve several.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SD = "sd"
SDXL = "sdxl"
SD3 = "sd3"
FLUX = "flux"
SD_UPSCALER = "sd-upscaler"

#: pipeline class -> family; every pipeline of a family loads the same directory layout
PIPELINES = {
    "StableDiffusionPipeline": SD,
    "StableDiffusionImg2ImgPipeline": SD,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusionXLImg2ImgPipeline": SDXL,
    "StableDiffusion3Pipeline": SD3,
    "FluxPipeline": FLUX,
    "StableDiffusionLatentUpscalePipeline": SD_UPSCALER,
}

#: what each family is called in messages
TITLES = {SD: "Stable Diffusion 1.x/2.x", SDXL: "SDXL", SD3: "SD3/SD3.5", FLUX: "FLUX.1",
          SD_UPSCALER: "SD latent upscaler"}


#: the dtype each family's weights run in on a GPU, as diffusers' documentation loads them
GPU_DTYPES = {SD: "float16", SDXL: "float16", SD3: "float16", FLUX: "bfloat16",
              SD_UPSCALER: "float16"}
DTYPES = ("auto", "float32", "float16", "bfloat16")


def load_dtype(setting: str, device: str, family: str | None) -> str:
    """The dtype a model's weights are loaded in: ``setting`` itself, or for ``"auto"``
    float32 on a CPU (half precision is slow or unsupported there) and the family's GPU dtype
    elsewhere."""
    if setting not in DTYPES:
        raise ValueError(f"dtype: {setting!r} is not one of {', '.join(DTYPES)}")
    if setting != "auto":
        return setting
    if device.split(":")[0] == "cpu":
        return "float32"
    return GPU_DTYPES.get(family or "", "float32")


def true_cfg(params: Mapping[str, Any]) -> bool:
    """Whether ``FluxPipeline`` guides a request with a second pass: only for a negative prompt
    and a ``true_cfg_scale`` > 1."""
    return (float(params.get("true_cfg_scale", 1.0)) > 1
            and params.get("negative_prompt") is not None)


def guided(params: Mapping[str, Any], default: float = 7.0) -> bool:
    """Whether classifier-free guidance runs (diffusers' rule: ``guidance`` > 1)."""
    return float(params.get("guidance", default)) > 1


def guided_request(params: Mapping[str, Any]) -> bool:
    """Whether a request is guided (its negative prompt encoded, its denoiser's rows doubled),
    by the rule of the family whose parameters it carries: FLUX's true CFG where its workflow
    has ``true_cfg_scale``, else classifier-free guidance. What a node that serves several
    families decides by (the T5 encoder; an emulated model)."""
    return true_cfg(params) if "true_cfg_scale" in params else guided(params)


def family_of_dir(model_dir: Path | str) -> str | None:
    """The family of a diffusers directory, or None when it names no pipeline we know (a
    directory we cannot read is left to the load that needs it to report)."""
    try:
        index = json.loads((Path(model_dir) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return PIPELINES.get(str(index.get("_class_name")))


def family_of(spec: str) -> str | None:
    """The family of a model spec: a builtin's by its recipe, a directory's by its
    ``model_index.json``; None for anything else (a plug-in's model, a missing path)."""
    from common.models import BUILTIN_PREFIX, builtin_family

    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_family(spec[len(BUILTIN_PREFIX):])
    if ":" in spec.split("/", 1)[0] and not Path(spec).expanduser().exists():
        return None  # a scheme's spec (``emulated:...``), not a path
    return family_of_dir(Path(spec).expanduser())
