"""SD3 / SD3.5's nodes, as ``StableDiffusion3Pipeline`` runs them.

- The text encoder node runs CLIP-L and CLIP-G (``text_encoder``, ``text_encoder_2``): their
  penultimate hidden states concatenated (``prompt_embeds``) and their projected outputs
  concatenated (``pooled_prompt_embeds``); a missing negative prompt is ``""``.
- The T5 encoder is a node of its own (kind ``t5_encoder``: ``text_encoder_3``,
  ``services.t5_encoder``), so a T5 pool can serve other models that use the same encoder.
- The denoiser pads the CLIP embeddings to the T5 width, joins both along the sequence, and
  runs the MMDiT transformer under flow matching (one scheduler per request).
The VAE nodes are the shared ones (they apply the VAE's shift factor).

A ControlNet (``SD3ControlNetModel``) runs as ``StableDiffusion3ControlNetPipeline`` runs it:
conditioned on the control image's VAE latents, its block outputs added to the transformer's
at every step. The pipeline's VAE encodes the control image (resized to the request's size;
twice under guidance, each row sampled apart); here the workflow's VAE encoder node does
(``Sd3VaeEncoderCore``: ``control_image`` -> ``control_latents``, the latent distribution's
samples), so the denoiser pool holds the transformer and its ControlNets alone and the VAE
stays in the VAE pools the other workflows share, and the denoiser shifts and scales the
samples as the ControlNet asks (no shift where it zeroes its pooled projections,
``force_zeros_for_pooled_projection``). Same operations on the same tensors: the same bits.

The pipeline samples the control image's latent distribution with torch's global random
generator, not the request's ``generator``; the VAE encoder node samples it with a generator
seeded with the request's seed, which is what the pipeline draws when its caller seeds the
global generator the same way (``torch.manual_seed(seed)``, on a CPU) before the call, as the
tests do. The latents are drawn from a fresh generator of the seed, as the pipeline's
``generator``: the denoiser takes no ``generator_state``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from common.errors import InvalidField
from common.families import guided
from common.modeldirs import component_config, native_size, vae_scale_factor
from services.core import WorkItem
from services.denoiser import (
    DenoiserCore,
    DenoiseState,
    _float,
    _int,
    _rows,
    control_inputs,
    embeddings,
    image_size,
)
from services.families.sdxl import SdxlTextEncoderCore
from services.lora import Loras, lora_key, pipeline_class
from services.vae import VaeEncoderCore


class Sd3ClipEncoderCore(SdxlTextEncoderCore):
    pool_all = True

    def _zero_negative(self, item: WorkItem) -> bool:
        return False  # SD3 encodes a missing negative prompt as ""

    def _cfg(self, item: WorkItem) -> bool:
        return guided(item.params)


class Sd3DenoiserCore(DenoiserCore):
    components = ("transformer",)
    controlnet_class = "SD3ControlNetModel"

    def load(self) -> None:
        self.transformer = self.weights("transformer")
        config = self.transformer.config
        self.in_channels = int(config.in_channels)
        self.patch_size = int(config.patch_size)
        self.joint_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.time_cond_proj_dim = None
        self.vae_scale_factor = vae_scale_factor(self.model_dir)
        self.native_size = native_size(self.model_dir)
        vae = component_config(self.model_dir, "vae")
        #: how the pipelines scale the control image's latents (``vae.config``'s)
        self.vae_scaling, self.vae_shift = vae["scaling_factor"], vae.get("shift_factor")
        self.scheduler_cls, self.scheduler_config = self.scheduler()
        self._cond_cache = None
        self._controlnets = {}
        self.loras = Loras(self.transformer, "transformer", pipeline_class(self.model_dir))

    def check_item(self, item: WorkItem) -> None:
        super().check_item(item)
        if "image_latents" in item.inputs:
            raise InvalidField("image_latents", "this denoiser makes images from text only")

    def image_size(self, params: dict[str, Any], multiple: int) -> tuple[int, int]:
        """The request's (width, height): the native size, else multiples of ``multiple``."""
        return image_size(params, self.native_size, multiple)

    def control_latents(self, item: WorkItem, rows: int, latents: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's samples of the control image (``control_latents``), checked
        against the request's ``latents``: one per row, of their channels and size."""
        if "control_image" in item.inputs:
            raise InvalidField("control_image", "this family's ControlNets take the control "
                               "image's latents (control_latents, from the VAE encoder)")
        control = item.inputs.get("control_latents")
        shape = (rows, *latents.shape[1:])
        if control is None or tuple(control.shape) != shape:
            raise InvalidField("control_latents", f"needs a {shape} tensor: the VAE encoder's "
                               "of the control image at the request's size")
        return control.to(self.device)

    def control_input(self, item: WorkItem, net: Any, cfg: bool,
                      latents: torch.Tensor | None) -> torch.Tensor:
        """The control image's latents as the pipeline conditions on them."""
        if "generator_state" in item.inputs:
            raise InvalidField("generator_state", "SD3 draws its latents from a generator of "
                               "the seed, not the VAE encoder's")
        assert latents is not None
        control = self.control_latents(item, 2 if cfg else 1, latents)
        shift = (0.0 if net.config.force_zeros_for_pooled_projection or self.vae_shift is None
                 else self.vae_shift)
        return (control - shift) * self.vae_scaling

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
        clip = embeddings(item, "prompt_embeds", 3, cfg, "SD3")
        pooled = embeddings(item, "pooled_prompt_embeds", 2, cfg, "SD3")
        t5 = embeddings(item, "t5_prompt_embeds", 3, cfg, "SD3")
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
        control = self._control(item, cfg, latents) if item.adapters else None
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
            added_cond={"pooled_projections": pooled.to(self.device)}, control=control,
            loras=lora_key(p),
        )

    def model_input(self, state: DenoiseState) -> torch.Tensor:
        return state.latents  # the flow-matching pipelines give the model the latents as they are

    def _model_args(self, states: list[DenoiseState]) -> tuple[Any, ...]:
        cond, _, added = self._conditioning(states)
        assert added is not None  # every state has its pooled projections
        hidden = _rows([self.model_input(s) for s in states for _ in range(s.rows)])
        return hidden, torch.cat([s.t_rows[s.i] for s in states]), cond, None, added

    def _control_outputs(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        hidden, timestep, cond, _, added = self._model_args(states)
        pooled = added["pooled_projections"]
        control = states[0].control  # states step together with equal ControlNets and scales
        assert control is not None
        net = self._controlnets[control.model]
        return list(net(
            hidden_states=hidden, timestep=timestep,
            encoder_hidden_states=cond if net.config.joint_attention_dim is not None else None,
            pooled_projections=(torch.zeros_like(pooled)
                                if net.config.force_zeros_for_pooled_projection else pooled),
            controlnet_cond=control_inputs(states), conditioning_scale=control.scale,
            return_dict=False)[0])

    def _predict(self, states: list[DenoiseState],
                 outputs: Callable[[], list[torch.Tensor] | None] | None = None) -> torch.Tensor:
        hidden, timestep, cond, _, added = self._model_args(states)
        blocks = None  # the transformer adds them from its first block's output on
        if states[0].control is not None:
            blocks = self._late_outputs(states, outputs, hidden.device)
        return self.transformer(hidden_states=hidden, timestep=timestep,
                                encoder_hidden_states=cond,
                                pooled_projections=added["pooled_projections"],
                                block_controlnet_hidden_states=blocks, return_dict=False)[0]


class Sd3VaeEncoderCore(VaeEncoderCore):
    """The VAE encoder, which also encodes a ControlNet's control image as
    ``StableDiffusion3ControlNetPipeline`` does: at the request's size (the model's native
    size by default), once per guidance row."""

    def control_layout(self, params: dict[str, Any]) -> tuple[int, int, int, int]:
        patch = int(component_config(self.model_dir, "transformer")["patch_size"])
        width, height = image_size(params, native_size(self.model_dir),
                                   self.vae_scale_factor * patch)
        return 2 if guided(params) else 1, width, height, self.vae_scale_factor
