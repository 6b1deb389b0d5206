"""SD3 / SD3.5's nodes, as ``StableDiffusion3Pipeline`` runs them.

- The text encoder node runs CLIP-L and CLIP-G (``text_encoder``, ``text_encoder_2``): their
  penultimate hidden states concatenated (``prompt_embeds``) and their projected outputs
  concatenated (``pooled_prompt_embeds``); a missing negative prompt is ``""``.
- The T5 encoder is a node of its own (kind ``t5_encoder``: ``text_encoder_3``,
  ``services.t5_encoder``), so a T5 pool can serve other models that use the same encoder.
- The denoiser pads the CLIP embeddings to the T5 width, joins both along the sequence, and
  runs the MMDiT transformer under flow matching (one scheduler per request).
The VAE nodes are the shared ones (they apply the VAE's shift factor).
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from common.models import vae_scale_factor
from services.core import WorkItem
from services.denoiser import DenoiserCore, DenoiseState, _float, _int, _rows, positive
from services.families.sdxl import SdxlTextEncoderCore


class Sd3ClipEncoderCore(SdxlTextEncoderCore):
    pool_all = True
    takes_loras = False  # SD3's LoRAs are not built yet

    def _zero_negative(self, item: WorkItem) -> bool:
        return False  # SD3 encodes a missing negative prompt as ""

    def _cfg(self, item: WorkItem) -> bool:
        return float(item.params.get("guidance", 7.0)) > 1


class Sd3DenoiserCore(DenoiserCore):
    components = ("transformer",)
    takes_controlnet = takes_loras = False  # not built yet for SD3 and FLUX

    def load(self) -> None:
        self.transformer = self.weights("transformer")
        config = self.transformer.config
        self.in_channels = int(config.in_channels)
        self.patch_size = int(config.patch_size)
        self.joint_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.time_cond_proj_dim = None
        self.vae_scale_factor = vae_scale_factor(self.model_dir)
        self.default_size = self.default_sample_size() * self.vae_scale_factor
        self.scheduler_cls, self.scheduler_config = self.scheduler()
        self._cond_cache = None

    def default_sample_size(self) -> int:
        """Latent pixels a side when the request names no size (as the pipeline picks it)."""
        return int(self.transformer.config.sample_size)

    def check_item(self, item: WorkItem) -> None:
        """What every transformer denoiser checks of an item before its inputs."""
        self.check_op(item)
        if item.adapters:
            raise InvalidField("controlnet", "this denoiser runs no ControlNet")
        if "image_latents" in item.inputs:
            raise InvalidField("image_latents", "this denoiser makes images from text only")

    def image_size(self, params: dict[str, Any], multiple: int) -> tuple[int, int]:
        """The request's (width, height): the default size, else multiples of ``multiple``."""
        sides = []
        for name in ("width", "height"):
            value = _int(params, name, self.default_size, minimum=multiple)
            if value % multiple:
                raise InvalidField(name, f"must be divisible by {multiple}", limit=multiple)
            sides.append(value)
        return sides[0], sides[1]

    def start(self, item: WorkItem) -> DenoiseState:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )
        from diffusers.utils.torch_utils import randn_tensor

        self.check_item(item)
        p = item.params
        steps = _int(p, "steps", 28, minimum=1)
        guidance = _float(p, "guidance", 7.0)
        seed = _int(p, "seed", 0, minimum=0)
        cfg = guidance > 1
        rows = 2 if cfg else 1
        clip, pooled, t5 = (positive(item.inputs.get(name), cfg) for name in
                            ("prompt_embeds", "pooled_prompt_embeds", "t5_prompt_embeds"))
        for name, tensor, ndim in (("prompt_embeds", clip, 3), ("pooled_prompt_embeds", pooled, 2),
                                   ("t5_prompt_embeds", t5, 3)):
            if tensor is None or tensor.ndim != ndim or tensor.shape[0] != rows:
                shape = "(rows, seq, dim)" if ndim == 3 else "(rows, dim)"
                raise InvalidField(name, f"SD3 needs a {shape} tensor with {rows} row(s) "
                                         f"({'[negative, positive]' if cfg else 'positive'})")
        if t5.shape[-1] != self.joint_dim or clip.shape[-1] > self.joint_dim:
            raise InvalidField("t5_prompt_embeds", f"the transformer joins {self.joint_dim} "
                               "wide embeddings", limit=self.joint_dim)
        if pooled.shape[-1] != self.pooled_dim:
            raise InvalidField("pooled_prompt_embeds", f"needs {self.pooled_dim} values",
                               limit=self.pooled_dim)
        # as encode_prompt: CLIP padded to the T5 width, then both along the sequence
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5], dim=-2).to(self.device)
        dtype = embeds.dtype
        width, height = self.image_size(p, self.vae_scale_factor * self.patch_size)
        shape = (1, self.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            seq = (shape[2] // self.patch_size) * (shape[3] // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=self.device, **kwargs)
        timesteps = scheduler.timesteps
        return DenoiseState(
            request_id=item.request_id, scheduler=scheduler, generator=generator,
            latents=latents, embeds=embeds, guidance=guidance, cfg=cfg, timesteps=timesteps,
            t_rows=timesteps[:, None].expand(len(timesteps), rows), extra_step_kwargs={},
            added_cond={"pooled_projections": pooled.to(self.device)},
        )

    def _predict(self, states: list[DenoiseState]) -> torch.Tensor:
        cond, _, added = self._conditioning(states)
        return self.transformer(
            hidden_states=_rows([s.latents for s in states for _ in range(s.rows)]),
            timestep=torch.cat([s.t_rows[s.i] for s in states]),
            encoder_hidden_states=cond,
            pooled_projections=added["pooled_projections"],
            return_dict=False,
        )[0]
