"""What request validation needs to know about a model, read from its directory (tokenizer and
config files only; no weights): token counts for truncation warnings, the native image size."""

from __future__ import annotations

import functools
from pathlib import Path

from common.models import (
    component_config,
    count_tokens,
    load_tokenizer,
    resolve_model_dir,
    vae_scale_factor,
)
from common.workflow import lora_path


class LocalModelInfo:
    """``common.workflow.ModelInfo`` over model directories on this host."""

    def __init__(self, cache_dir: Path, lora_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self.lora_dir = lora_dir

    def lora_problem(self, name: str) -> str | None:
        """A LoRA this host's nodes cannot find (where the gateway sees the ``lora_dir`` the
        nodes read: a directory it cannot see is left to the nodes to check)."""
        if self.lora_dir is None:
            return "this deployment serves no LoRAs (the lora_dir setting is not set)"
        if Path(self.lora_dir).is_dir() and not lora_path(self.lora_dir, name).is_file():
            return f"no LoRA {name!r} in {self.lora_dir}"
        return None

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one instance per process
    def _dir(self, model: str) -> Path:
        return resolve_model_dir(model, self.cache_dir)

    def count_tokens(self, model: str, text: str) -> tuple[int, int]:
        tokenizer = load_tokenizer(self._dir(model))
        return count_tokens(tokenizer, text), int(tokenizer.model_max_length)

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def native_size(self, model: str) -> tuple[int, int]:
        """As diffusers picks it when width/height are omitted: the denoising model's (UNet's,
        or SD3's transformer's) sample_size x VAE scale."""
        model_dir = self._dir(model)
        denoiser = "unet" if (model_dir / "unet").is_dir() else "transformer"
        # FluxPipeline's default_sample_size: its transformer's config has none
        sample = component_config(model_dir, denoiser).get("sample_size", 128)
        if isinstance(sample, list | tuple):
            height, width = sample
        else:
            height = width = sample
        scale = vae_scale_factor(model_dir)
        return width * scale, height * scale
