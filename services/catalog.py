"""Every node kind and the core that executes it.

``services.runner`` (and ``lego``) pick a core class by kind; each core is constructed as
``CORES[kind](model_dir, device=..., max_batch=...)`` and loads its component from a diffusers
model directory with ``from_pretrained(model_dir, subfolder=...)``.
"""

from __future__ import annotations

from services.core import ModelCore
from services.denoiser import DenoiserCore
from services.safety import SafetyCheckerCore
from services.text_encoder import TextEncoderCore
from services.upscaler import UpscalerCore
from services.vae import VaeDecoderCore, VaeEncoderCore

CORES: dict[str, type[ModelCore]] = {
    core.kind: core
    for core in (
        TextEncoderCore,
        DenoiserCore,
        VaeDecoderCore,
        VaeEncoderCore,
        SafetyCheckerCore,
        UpscalerCore,
    )
}

#: the model_index.json components each kind loads (a directory lacking one cannot host it)
MODEL_SUBDIR_HINT: dict[str, tuple[str, ...]] = {
    "text_encoder": ("tokenizer", "text_encoder"),
    "denoiser": ("unet", "scheduler", "vae"),  # vae: only its config, for vae_scale_factor
    "vae_decoder": ("vae",),
    "vae_encoder": ("vae",),
    "safety_checker": ("safety_checker", "feature_extractor"),
    "upscaler": ("text_encoder", "tokenizer", "unet", "vae", "scheduler"),
}

#: op -> the kind that performs it
OPS: dict[str, str] = {op: kind for kind, core in CORES.items() for op in core.ops}
