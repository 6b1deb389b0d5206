"""Latent upscaler node: SD latents (1, 4, h, w) -> (1, 4, 2h, 2w) in the same latent space.

One model package (``StableDiffusionLatentUpscalePipeline``, with its own text encoder, UNet and
scheduler), called exactly as a user would call it with
``generator=torch.Generator("cpu").manual_seed(seed)`` and ``output_type="latent"``. Items run
one by one: each has its own prompt, seed and step count, and the pipeline's scheduler is stateful.
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from common.tokenizers import count_tokens
from common.workflow import truncation_warning
from services.core import OneShotCore, Result, WorkItem


class UpscalerCore(OneShotCore):
    kind = "upscaler"
    ops = ("upscale",)
    #: the whole StableDiffusionLatentUpscalePipeline (its VAE too, though latents skip it)
    components = ("text_encoder", "unet", "vae")

    def load(self) -> None:
        from diffusers import StableDiffusionLatentUpscalePipeline

        self.pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(
            self.model_dir, torch_dtype=self.torch_dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.latent_channels = int(self.pipe.vae.config.latent_channels)
        self.max_length = int(self.pipe.tokenizer.model_max_length)

    def start(self, item: WorkItem) -> Any:
        self.check_op(item)
        p = item.params
        latents = item.inputs.get("latents")
        if (
            latents is None
            or latents.ndim != 4
            or latents.shape[0] != 1
            or latents.shape[1] != self.latent_channels
        ):
            raise InvalidField("latents", f"needs a (1, {self.latent_channels}, h, w) tensor")
        if not isinstance(p.get("prompt"), str):
            raise InvalidField("prompt", "must be a string")
        if p.get("negative_prompt") is not None and not isinstance(p["negative_prompt"], str):
            raise InvalidField("negative_prompt", "must be a string")
        for name, default, minimum in (("seed", 0, 0), ("upscale_steps", 20, 1)):
            value = p.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InvalidField(name, f"must be an integer >= {minimum}", limit=minimum)
        guidance = p.get("upscale_guidance", 9.0)
        if isinstance(guidance, bool) or not isinstance(guidance, int | float):
            raise InvalidField("upscale_guidance", "must be a number")
        return super().start(item)

    def run(self, items: list[WorkItem]) -> list[Result]:
        return [self._upscale(item) for item in items]

    def _upscale(self, item: WorkItem) -> Result:
        p = item.params
        guidance = float(p.get("upscale_guidance", 9.0))
        with torch.inference_mode():
            out = self.pipe(
                prompt=p["prompt"],
                negative_prompt=p.get("negative_prompt") or None,
                image=item.inputs["latents"].to(self.device),
                num_inference_steps=int(p.get("upscale_steps", 20)),
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(int(p.get("seed", 0))),
                output_type="latent",
            ).images
        latents = out.detach().cpu().clone()  # a normal tensor, not an inference one
        warnings = []
        fields = [("prompt", p["prompt"])]
        if guidance > 1:
            fields.append(("negative_prompt", p.get("negative_prompt") or ""))
        for field, text in fields:
            n = count_tokens(self.pipe.tokenizer, text)
            if n > self.max_length:
                warnings.append(truncation_warning(field, n, self.max_length))
        return Result(tensors={"latents": latents}, meta={"warnings": warnings} if warnings else {})
