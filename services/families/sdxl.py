"""SDXL's nodes, as ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline`` run
them.

- The text encoder node runs BOTH CLIP encoders (``text_encoder``, ``text_encoder_2``: SDXL
  uses them only together) on the prompt, takes each one's penultimate hidden states and
  concatenates them (``prompt_embeds``), and hands on the second one's projected output
  (``pooled_prompt_embeds``). With classifier-free guidance each output is
  ``cat([negative, positive])``; a request without a negative prompt gets zeros for it where
  the model asks for that (``force_zeros_for_empty_prompt``, as the pipeline's default).
- The denoiser is the SD 1.x one (``services.denoiser``) conditioned as well on the pooled
  embeddings and the six time ids (original size, crop corner, target size).
The VAE nodes are the SD ones (they read the latents' mean and std where the VAE has them).
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from common.modeldirs import model_index
from services.core import Result, WorkItem
from services.denoiser import DenoiserCore, DenoiseState
from services.lora import Loras, pipeline_class
from services.text_encoder import PROBE_TEXTS, TextEncoderCore, plain

#: the pipeline's crop corner (``crops_coords_top_left``)
CROP = (0, 0)


class SdxlTextEncoderCore(TextEncoderCore):
    components = ("text_encoder", "text_encoder_2")
    #: the pooled embeddings: every encoder's projected output, concatenated (SD3's), or the
    #: first one's (SDXL's)
    pool_all: bool = False

    def load(self) -> None:
        pairs = []
        for tokenizer, encoder in (("tokenizer", "text_encoder"),
                                   ("tokenizer_2", "text_encoder_2")):
            pairs.append((self.part(tokenizer), self.weights(encoder)))
        self.pairs = pairs
        self.lora_models = [Loras(enc, name, pipeline_class(self.model_dir))
                            for (_, enc), name in zip(pairs, self.components, strict=True)]
        self.tokenizer, self.text_encoder = pairs[0]  # the first counts prompt tokens
        self.max_length = int(self.tokenizer.model_max_length)
        self.dtype = pairs[-1][1].dtype  # the pipeline casts to text_encoder_2's dtype
        self.force_zeros = bool(
            model_index(self.model_dir).get("force_zeros_for_empty_prompt", True))
        self.time_cond_proj_dim = self._unet_config().get("time_cond_proj_dim")
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def _zero_negative(self, item: WorkItem) -> bool:
        """The pipeline zeroes the negative embeddings only when no negative prompt was given
        (None; an empty string is encoded)."""
        return self.force_zeros and item.params.get("negative_prompt") is None

    def run(self, items: list[WorkItem]) -> list[Result]:
        cfg = [self._cfg(it) for it in items]
        encoded = [c and not self._zero_negative(it) for it, c in zip(items, cfg, strict=True)]
        rows = [it.params["prompt"] for it in items] + [
            it.params.get("negative_prompt") or ""
            for it, e in zip(items, encoded, strict=True) if e
        ]
        embeds, pooled = self._encode_rows(rows)
        results = []
        n_neg = len(items)
        for i, (item, guided, neg) in enumerate(zip(items, cfg, encoded, strict=True)):
            positive, positive_pooled = embeds[i : i + 1], pooled[i : i + 1]
            if neg:
                negative, negative_pooled = embeds[n_neg : n_neg + 1], pooled[n_neg : n_neg + 1]
                n_neg += 1
            else:
                negative, negative_pooled = (torch.zeros_like(positive),
                                             torch.zeros_like(positive_pooled))
            if guided:
                positive = torch.cat([negative, positive])
                positive_pooled = torch.cat([negative_pooled, positive_pooled])
            results.append(Result(
                tensors={"prompt_embeds": plain(positive),
                         "pooled_prompt_embeds": plain(positive_pooled)},
                meta=self._meta(item)))
        return results

    def _encode_rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every encoder's penultimate hidden states, concatenated, and the pooled embeddings
        (``pool_all``), for each text; one forward per encoder, or one per row when batching
        is not bit-exact here."""
        hidden: list[torch.Tensor] = []
        projected: list[torch.Tensor] = []
        with torch.inference_mode():
            for tok, enc in self.pairs:
                ids = tok(texts, padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(self.device)
                chunks = self.row_chunks(ids)
                outputs = [enc(chunk, output_hidden_states=True) for chunk in chunks]
                hidden.append(torch.cat([out.hidden_states[-2] for out in outputs]))
                if outputs[0][0].ndim == 2 and (self.pool_all or not projected):
                    projected.append(torch.cat([out[0] for out in outputs]))
        if not projected:
            raise InvalidField(self.components[-1], "needs a text encoder with a projection")
        return torch.cat(hidden, dim=-1).to(self.dtype), torch.cat(projected, dim=-1)

    def _probe_batching(self) -> bool:
        return self.probe_batch_exact(lambda: self._encode_rows(PROBE_TEXTS))


class SdxlDenoiserCore(DenoiserCore):
    def load(self) -> None:
        super().load()
        config = self.unet.config
        self.time_embed_dim = config.addition_time_embed_dim
        self.add_embed_in = self.unet.add_embedding.linear_1.in_features

    def start(self, item: WorkItem) -> DenoiseState:
        pooled = item.inputs.get("pooled_prompt_embeds")
        if pooled is None or pooled.ndim != 2:
            raise InvalidField("pooled_prompt_embeds", "SDXL needs a (rows, dim) tensor")
        state = super().start(item)
        if pooled.shape[0] != item.inputs["prompt_embeds"].shape[0]:
            raise InvalidField("pooled_prompt_embeds", "needs as many rows as prompt_embeds")
        time_ids = 6 * self.time_embed_dim + pooled.shape[-1]
        if time_ids != self.add_embed_in:
            raise InvalidField(
                "pooled_prompt_embeds",
                f"the UNet expects {self.add_embed_in - 6 * self.time_embed_dim} pooled values, "
                f"got {pooled.shape[-1]}", limit=self.add_embed_in - 6 * self.time_embed_dim)
        if not state.cfg:
            pooled = pooled[-1:]
        dtype = state.embeds.dtype
        height, width = (side * self.vae_scale_factor for side in state.latents.shape[-2:])
        # original size, crop corner, target size: the pipeline's defaults
        ids = torch.tensor([[height, width, *CROP, height, width]], dtype=dtype)
        state.added_cond = {
            "text_embeds": pooled.to(device=self.device),
            "time_ids": ids.repeat(state.rows, 1).to(self.device),
        }
        if "image_latents" not in item.inputs and hasattr(state.scheduler, "set_begin_index"):
            state.scheduler.set_begin_index(0)  # as StableDiffusionXLPipeline does
        return state

    def batch_key(self, state: DenoiseState) -> Any:
        return (super().batch_key(state), tuple(state.added_cond["text_embeds"].shape[1:]))
