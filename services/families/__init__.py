"""The cores of the model families whose nodes run differently from SD 1.x/2.x's (the
defaults in ``services.catalog.CORES``), by family and node kind."""

from __future__ import annotations

from common import families
from services.core import ModelCore
from services.families.flux import (
    FluxClipEncoderCore,
    FluxDenoiserCore,
    FluxT5EncoderCore,
    FluxVaeEncoderCore,
)
from services.families.sd3 import Sd3ClipEncoderCore, Sd3DenoiserCore, Sd3VaeEncoderCore
from services.families.sdxl import SdxlDenoiserCore, SdxlTextEncoderCore

FAMILY_CORES: dict[str, dict[str, type[ModelCore]]] = {
    families.SDXL: {"text_encoder": SdxlTextEncoderCore, "denoiser": SdxlDenoiserCore},
    families.SD3: {"text_encoder": Sd3ClipEncoderCore, "denoiser": Sd3DenoiserCore,
                   "vae_encoder": Sd3VaeEncoderCore},
    families.FLUX: {"text_encoder": FluxClipEncoderCore, "t5_encoder": FluxT5EncoderCore,
                    "denoiser": FluxDenoiserCore, "vae_encoder": FluxVaeEncoderCore},
}
