"""Text encoder node: prompt -> ``prompt_embeds``, as ``StableDiffusionPipeline.encode_prompt``.

Several items are encoded in ONE text-encoder forward when that is bit-identical to encoding
them one by one on this machine and model (checked at load with a probe batch); otherwise they
run one by one. With classifier-free guidance an item's output is ``cat([negative, positive])``.
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from common.modeldirs import component_config
from common.tokenizers import count_tokens
from common.workflow import truncation_warning
from services.core import OneShotCore, Result, WorkItem
from services.lora import Loras, lora_key, pipeline_class


class TextEncoderCore(OneShotCore):
    kind = "text_encoder"
    ops = ("encode",)
    components: tuple[str, ...] = ("text_encoder",)  # the tokenizer has no weights

    #: whether items may share one forward; None: decided at load by a bit-exactness probe
    batch_exact: bool | None = None
    #: whether a request may name LoRAs (their text encoder layers apply here)
    takes_loras = True
    #: whether the batch running now has LoRAs: ``batch_exact`` was probed on the plain
    #: model, and with a LoRA's layers rows encoded together can round differently, on some
    #: CPUs, from one at a time, as the pipeline encodes a prompt and its negative
    with_loras = False

    def load(self) -> None:
        self.tokenizer = self.part("tokenizer")
        self.text_encoder = self.weights("text_encoder")
        self.max_length = int(self.tokenizer.model_max_length)
        self.use_attention_mask = bool(
            getattr(self.text_encoder.config, "use_attention_mask", False)
        )
        self.time_cond_proj_dim = self._unet_config().get("time_cond_proj_dim")
        self.lora_models = [Loras(self.text_encoder, "text_encoder",
                                  pipeline_class(self.model_dir))]
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def _unet_config(self) -> dict[str, Any]:
        """The model's UNet config: whether it guides (diffusers:
        ``do_classifier_free_guidance = guidance > 1 and unet.time_cond_proj_dim is None``)."""
        try:
            return component_config(self.model_dir, "unet")
        except FileNotFoundError:
            return {}

    # ---------------------------------------------------------------------------------------

    def start(self, item: WorkItem) -> Any:
        check_prompt(self, item)
        if lora_key(item.params) and not self.takes_loras:
            raise InvalidField("loras", "this model family's text encoder runs no LoRA yet")
        return super().start(item)

    def batch_key(self, state: Any) -> Any:
        return lora_key(state.item.params)  # one forward runs one set of LoRAs

    def needs_prepare(self, item: WorkItem) -> bool:
        loras = lora_key(item.params)
        return self.takes_loras and any(m.missing(loras, self.source) for m in self.lora_models)

    def prepare(self, item: WorkItem) -> None:
        for model in self.lora_models:
            model.read(lora_key(item.params), self.source)

    def step(self, states: list[Any]) -> None:
        loras = lora_key(states[0].item.params)
        if self.takes_loras:
            for model in self.lora_models:
                model.activate(loras)
        self.with_loras = bool(loras)
        super().step(states)

    def row_chunks(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """``rows`` as one forward's input when batching them is bit-exact here, else one
        row each."""
        if self.batch_exact and not self.with_loras:
            return [rows]
        return [rows[r : r + 1] for r in range(rows.shape[0])]

    def _cfg(self, item: WorkItem) -> bool:
        return float(item.params.get("guidance", 7.5)) > 1 and self.time_cond_proj_dim is None

    def run(self, items: list[WorkItem]) -> list[Result]:
        tok = self.tokenizer
        prompts = [it.params["prompt"] for it in items]
        cfg = [self._cfg(it) for it in items]
        # None and "" both mean [""] to diffusers
        negatives = [
            it.params.get("negative_prompt") or ""
            for it, c in zip(items, cfg, strict=True)
            if c
        ]

        text_inputs = tok(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = [text_inputs.input_ids]
        masks = [text_inputs.attention_mask]
        if negatives:
            uncond = tok(
                negatives,
                padding="max_length",
                max_length=text_inputs.input_ids.shape[1],  # = prompt_embeds.shape[1]
                truncation=True,
                return_tensors="pt",
            )
            ids.append(uncond.input_ids)
            masks.append(uncond.attention_mask)
        # rows: every prompt, then every negative prompt of a guided item
        embeds = self._encode(torch.cat(ids), torch.cat(masks))

        results = []
        n_neg = 0
        for i, (item, guided) in enumerate(zip(items, cfg, strict=True)):
            positive = embeds[i : i + 1]
            if guided:
                negative = embeds[len(items) + n_neg : len(items) + n_neg + 1]
                n_neg += 1
                out = torch.cat([negative, positive])
            else:
                out = positive.clone()
            results.append(Result(tensors={"prompt_embeds": plain(out)}, meta=self._meta(item)))
        return results

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One forward over all rows, or one per row when batching is not bit-exact."""
        input_ids = input_ids.to(self.device)
        masks = (self.row_chunks(attention_mask.to(self.device)) if self.use_attention_mask
                 else None)
        with torch.inference_mode():
            out = torch.cat([
                self.text_encoder(ids, attention_mask=None if masks is None else masks[i])[0]
                for i, ids in enumerate(self.row_chunks(input_ids))
            ])
            return out.to(dtype=self.text_encoder.dtype)

    def _meta(self, item: WorkItem) -> dict[str, Any]:
        warnings = []
        fields = [("prompt", item.params["prompt"])]
        if self._cfg(item):
            fields.append(("negative_prompt", item.params.get("negative_prompt") or ""))
        for field, text in fields:
            n = count_tokens(self.tokenizer, text)
            if n > self.max_length:
                warnings.append(truncation_warning(field, n, self.max_length))
        return {"warnings": warnings} if warnings else {}

    def _probe_batching(self) -> bool:
        """Whether a batched forward gives the same bits as row-by-row forwards here."""
        enc = self.tokenizer(
            PROBE_TEXTS,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.probe_batch_exact(lambda: self._encode(enc.input_ids, enc.attention_mask))


#: what the text encoders' batch-exactness probes encode
PROBE_TEXTS = ["a photo of a cat", "", "a painting of a red house by the sea, detailed"]


def check_prompt(core: OneShotCore, item: WorkItem) -> None:
    """What every text encoder checks of an item: its op, its prompts and its guidance."""
    core.check_op(item)
    params = item.params
    if not isinstance(params.get("prompt"), str):
        raise InvalidField("prompt", "must be a string")
    negative = params.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidField("negative_prompt", "must be a string")
    try:
        float(params.get("guidance", 7.5))
    except (TypeError, ValueError):
        raise InvalidField("guidance", "must be a number") from None


def plain(t: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) CPU tensor that consumers may modify in place."""
    t = t.detach().cpu()
    return t.clone() if t.is_inference() else t
