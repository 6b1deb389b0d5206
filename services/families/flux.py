"""FLUX.1's nodes (dev and schnell), as ``FluxPipeline`` runs them.

- The text encoder node runs the CLIP encoder for its pooled output alone
  (``pooled_prompt_embeds``).
- The T5 encoder is a node of its own (kind ``t5_encoder``: FLUX's ``text_encoder_2``), whose
  embeddings are the denoiser's ``prompt_embeds``.
- The denoiser packs the latents in 2x2 patches, runs the FLUX transformer under flow matching
  shifted by the image's sequence length, with dev's guidance embedding (the ``guidance``
  parameter) where the model has one, and true classifier-free guidance (``true_cfg_scale``
  > 1 with a ``negative_prompt``) as a second pass over the negative prompt; it hands on
  unpacked latents, so the VAE decoder is the shared one (which applies the shift factor).

A ControlNet (``FluxControlNetModel``) runs as ``FluxControlNetPipeline`` runs it: on the
positive prompt's pass over the packed control image latents, its block outputs added to the
transformer's in every pass (the negative one reuses them). As for SD3
(``services.families.sd3``), the workflow's VAE encoder node encodes the control image
(``FluxVaeEncoderCore``: resized to the request's size) and the denoiser shifts, scales and
packs the samples. The pipeline samples the control image's latent distribution with the
request's generator before it draws the latents from the same generator, so the VAE encoder
node hands on its generator's state (``generator_state``, as for img2img) and the denoiser
draws the latents where that stream left off: the pipeline's bits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from common.errors import InvalidField
from common.families import true_cfg
from services.core import Result, WorkItem
from services.denoiser import (
    DenoiseState,
    Late,
    _float,
    _int,
    _rows,
    control_inputs,
    embeddings,
    image_size,
    resume,
)
from services.families.sd3 import Sd3DenoiserCore
from services.lora import lora_key
from services.t5_encoder import T5EncoderCore
from services.text_encoder import PROBE_TEXTS, TextEncoderCore, plain
from services.vae import VaeEncoderCore


class FluxClipEncoderCore(TextEncoderCore):
    """CLIP's pooled output (``pooler_output``) of the prompt (``[negative, positive]`` under
    true CFG)."""


    def _cfg(self, item: WorkItem) -> bool:
        return true_cfg(item.params)

    def run(self, items: list[WorkItem]) -> list[Result]:
        rows = []
        for item in items:
            if self._cfg(item):
                rows.append(item.params.get("negative_prompt") or "")
            rows.append(item.params["prompt"])
        pooled = self._pool(rows)
        results, row = [], 0
        for item in items:
            n = 2 if self._cfg(item) else 1
            results.append(Result(tensors={"pooled_prompt_embeds": plain(pooled[row : row + n])},
                                  meta=self._meta(item)))
            row += n
        return results

    def _pool(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        chunks = self.row_chunks(ids)
        with torch.inference_mode():
            out = [self.text_encoder(chunk, output_hidden_states=False).pooler_output
                   for chunk in chunks]
        return torch.cat(out).to(self.text_encoder.dtype)

    def _probe_batching(self) -> bool:
        return self.probe_batch_exact(lambda: self._pool(PROBE_TEXTS))


class FluxT5EncoderCore(T5EncoderCore):
    """SD3's T5 encoder in FLUX's folders."""

    tokenizer_folder, encoder_folder = "tokenizer_2", "text_encoder_2"
    components = ("text_encoder_2",)


@dataclass(eq=False)
class FluxState(DenoiseState):
    img_ids: torch.Tensor | None = None  # (patches, 3): each latent patch's position
    txt_ids: torch.Tensor | None = None  # (tokens, 3): zeros
    embedded_guidance: torch.Tensor | None = None  # (1,): dev's guidance scale; schnell None
    #: (1,): the guidance scale, for a ControlNet with a guidance embedding (else None)
    control_guidance: torch.Tensor | None = None
    #: (1, seq, dim) and (1, dim): the positive prompt's embeddings, what a ControlNet reads
    #: on either guidance branch (a branch view keeps its state's)
    control_text: tuple[torch.Tensor, torch.Tensor] | None = None
    width: int = 0  # pixels, to unpack the latents
    height: int = 0


class FluxDenoiserCore(Sd3DenoiserCore):
    #: whether several rows may share one transformer pass; None: decided at load by a probe
    #: (the pipeline runs the negative prompt's pass apart from the positive one)
    batch_exact: bool | None = None
    controlnet_class = "FluxControlNetModel"

    def load(self) -> None:
        super().load()
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def control_input(self, item: WorkItem, net: Any, cfg: bool,
                      latents: torch.Tensor | None) -> torch.Tensor:
        """The control image's latents as the pipeline conditions on them: shifted, scaled
        and packed, one row (the positive pass's)."""
        from diffusers import FluxPipeline

        if net.input_hint_block is not None or net.union:
            raise InvalidField("controlnet", "FLUX ControlNets with an input hint block or "
                               "control modes (ControlNet-Union) are not served")
        assert latents is not None
        control = self.control_latents(item, 1, latents)
        control = (control - (self.vae_shift or 0.0)) * self.vae_scaling
        return FluxPipeline._pack_latents(control, 1, *control.shape[1:])

    def start(self, item: WorkItem) -> FluxState:
        from diffusers import FluxPipeline
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from diffusers.utils.torch_utils import randn_tensor

        self.check_item(item)
        p = item.params
        steps = _int(p, "steps", 28, minimum=1)
        guidance = _float(p, "guidance", 3.5)
        scale = _float(p, "true_cfg_scale", 1.0)
        seed = _int(p, "seed", 0, minimum=0)
        cfg = true_cfg(p)
        rows = 2 if cfg else 1
        embeds = embeddings(item, "prompt_embeds", 3, cfg, "FLUX", self.joint_dim)
        pooled = embeddings(item, "pooled_prompt_embeds", 2, cfg, "FLUX", self.pooled_dim)
        embeds, dtype = embeds.to(self.device), embeds.dtype
        width, height = self.image_size(p, self.vae_scale_factor * 2)
        # as prepare_latents: 2x2 patches of latents, one token each
        lat_h = 2 * (height // (self.vae_scale_factor * 2))
        lat_w = 2 * (width // (self.vae_scale_factor * 2))
        channels = self.in_channels // 4
        generator = torch.Generator("cpu").manual_seed(seed)
        if item.adapters:  # the pipeline sampled the control image's latents with it first
            resume(generator, item, "a FLUX ControlNet")
        latents = randn_tensor((1, channels, lat_h, lat_w), generator=generator,
                               device=self.device, dtype=dtype)
        control = self._control(item, cfg, latents) if item.adapters else None
        latents = FluxPipeline._pack_latents(latents, 1, channels, lat_h, lat_w)
        img_ids = FluxPipeline._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2,
                                                         self.device, dtype)
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        config = scheduler.config
        sigmas = (None if config.get("use_flow_sigmas")
                  else np.linspace(1.0, 1 / steps, steps))
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps
        embedded = torch.full([1], guidance, device=self.device, dtype=torch.float32)
        control_guidance = None
        if control is not None and self._controlnets[control.model].config.guidance_embeds:
            control_guidance = embedded
        return FluxState(
            request_id=item.request_id, scheduler=scheduler, generator=generator,
            latents=latents, embeds=embeds, guidance=scale, cfg=cfg, timesteps=timesteps,
            t_rows=timesteps[:, None].expand(len(timesteps), rows), extra_step_kwargs={},
            added_cond={"pooled_projections": pooled.to(self.device)},
            img_ids=img_ids, txt_ids=torch.zeros(embeds.shape[1], 3).to(self.device, dtype),
            embedded_guidance=embedded if self.guidance_embeds else None,
            control=control, control_guidance=control_guidance,
            control_text=None if control is None else (embeds[-1:], pooled[-1:].to(self.device)),
            width=width, height=height,
            loras=lora_key(p),
        )

    def batch_key(self, state: DenoiseState) -> Any:
        return (super().batch_key(state), cast(FluxState, state).embedded_guidance is None)

    def _predict(self, states: list[DenoiseState],
                 outputs: Callable[[], list[torch.Tensor] | None] | None = None) -> torch.Tensor:
        flux = cast("list[FluxState]", states)  # this core makes FluxStates only
        cond, _, added = self._conditioning(states)
        assert added is not None  # every state has its pooled projections
        hidden = _rows([self.model_input(s) for s in flux for _ in range(s.rows)])
        timestep = torch.cat([s.t_rows[s.i] for s in flux]).to(hidden.dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.cat([s.embedded_guidance.expand(s.rows) for s in flux
                                  if s.embedded_guidance is not None])
        first = flux[0]  # states step together only with equal shapes: equal ids
        blocks = None
        if first.control is not None:
            # the transformer adds them from its first block's output on
            flat = self._late_outputs(states, outputs, hidden.device)
            net = self._controlnets[first.control.model]
            double, single = len(net.controlnet_blocks), len(net.controlnet_single_blocks)
            repeats = torch.tensor([s.rows for s in flux], device=hidden.device)

            def every_row(outs: list[torch.Tensor]) -> list[torch.Tensor]:
                return [x.repeat_interleave(repeats, dim=0) for x in outs]

            blocks = (Late(lambda: every_row(flat[:double])) if double else None,
                      Late(lambda: every_row(flat[double:])) if single else None)
        return self._forward(hidden, timestep / 1000, guidance, added["pooled_projections"],
                             cond, first.txt_ids, first.img_ids, blocks)

    def _control_outputs(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        """The ControlNet's outputs, double blocks' then single blocks', one row per state: one
        pass over each state's positive row, as the pipeline's, shared by its negative row
        (so a negative branch's view runs it on the positive prompt too)."""
        flux = cast("list[FluxState]", states)  # this core makes FluxStates only
        control = flux[0].control  # states step together with equal ControlNets and scales
        assert control is not None
        net = self._controlnets[control.model]
        text = [s.control_text for s in flux if s.control_text is not None]
        cond, pooled = _rows([t[0] for t in text]), _rows([t[1] for t in text])
        hidden = _rows([s.latents for s in flux])
        timestep = torch.cat([s.t_rows[s.i][-1:] for s in flux]).to(hidden.dtype)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.cat([s.control_guidance for s in flux
                                  if s.control_guidance is not None])
        outputs = [net(
            hidden_states=hidden[a:b], controlnet_cond=control_inputs(flux[a:b]),
            conditioning_scale=control.scale, timestep=timestep[a:b] / 1000,
            guidance=None if guidance is None else guidance[a:b],
            pooled_projections=pooled[a:b], encoder_hidden_states=cond[a:b],
            txt_ids=flux[0].txt_ids, img_ids=flux[0].img_ids, return_dict=False)
            for a, b in self._spans(len(flux))]
        return [torch.cat(parts) for out in zip(*outputs, strict=True) if out[0] is not None
                for parts in zip(*out, strict=True)]

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Row spans that share a pass: all, or one per row when batching is not bit-exact."""
        return [(0, n)] if self.batch_exact or n == 1 else [(r, r + 1) for r in range(n)]

    def _forward(self, hidden, timestep, guidance, pooled, cond, txt_ids, img_ids, blocks=None):
        """One pass over every row, or one per row when batching is not bit-exact here;
        ``blocks``: a ControlNet's outputs per row (``_control_outputs``, split)."""
        double, single = blocks or (None, None)
        return _rows([self.transformer(
            hidden_states=hidden[a:b], timestep=timestep[a:b],
            guidance=None if guidance is None else guidance[a:b],
            pooled_projections=pooled[a:b], encoder_hidden_states=cond[a:b],
            controlnet_block_samples=_rows_of(double, a, b),
            controlnet_single_block_samples=_rows_of(single, a, b),
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            for a, b in self._spans(hidden.shape[0])])

    def _probe_batching(self) -> bool:
        gen = torch.Generator("cpu").manual_seed(0)
        dtype = self.transformer.dtype

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(self.device, dtype)

        args = (rand(2, 4, self.in_channels), torch.tensor([0.9, 0.9]).to(self.device, dtype),
                torch.full([2], 3.5).to(self.device) if self.guidance_embeds else None,
                rand(2, self.pooled_dim), rand(2, 3, self.joint_dim),
                torch.zeros(3, 3).to(self.device, dtype), torch.zeros(4, 3).to(self.device, dtype))
        with torch.inference_mode():
            return self.probe_batch_exact(lambda: self._forward(*args))

    def finish(self, state: DenoiseState) -> Result:
        from diffusers import FluxPipeline

        result = super().finish(state)
        assert isinstance(state, FluxState)
        latents = FluxPipeline._unpack_latents(result.tensors["latents"], state.height,
                                               state.width, self.vae_scale_factor)
        return Result(tensors={"latents": latents.contiguous()})


class FluxVaeEncoderCore(VaeEncoderCore):
    """The VAE encoder, which also encodes a ControlNet's control image as
    ``FluxControlNetPipeline`` does: at the request's size (the model's native size by
    default; multiples of twice the VAE's scale, whole latent patches), once."""

    def control_layout(self, params: dict[str, Any]) -> tuple[int, int, int, int]:
        from common.modeldirs import native_size

        multiple = self.vae_scale_factor * 2
        width, height = image_size(params, native_size(self.model_dir), multiple)
        return 1, width, height, multiple


def _rows_of(blocks: list[torch.Tensor] | None, a: int, b: int) -> list[torch.Tensor] | None:
    """Rows ``a:b`` of each of a ControlNet's outputs, made when the transformer reads them."""
    return None if blocks is None else Late(lambda: [x[a:b] for x in blocks])
