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
