"""The T5 text encoder node (kind ``t5_encoder``): SD3's third text encoder and FLUX.1's second.

One core serves both families (FLUX's directories only name its folders otherwise:
``services.families.flux.FluxT5EncoderCore``), so one pool may serve the models of both whose
encoder files are the same bytes (``common.workflow.pool_of``).
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from common.families import guided_request
from services.core import OneShotCore, Result, WorkItem
from services.denoiser import _int
from services.text_encoder import PROBE_TEXTS, check_prompt, plain


class T5EncoderCore(OneShotCore):
    """A T5 text encoder: ``prompt_embeds`` = its last hidden states over the prompt padded
    to ``max_sequence_length`` tokens, ``[negative, positive]`` when the request is guided.

    It does the same for SD3 and FLUX (only the folders differ: ``FluxT5EncoderCore``), so a
    pool of it may serve both families' models (``common.workflow.pool_of``): what differs
    comes with each task. ``max_sequence_length`` is a parameter every workflow with a T5 node
    declares; the request is guided by FLUX's true CFG where its workflow has
    ``true_cfg_scale``, else by SD3's classifier-free guidance (``guidance`` > 1)."""

    kind = "t5_encoder"
    ops = ("encode",)
    #: (tokenizer, encoder) subfolders in the model directory
    tokenizer_folder, encoder_folder = "tokenizer_3", "text_encoder_3"
    components = ("text_encoder_3",)
    batch_exact: bool | None = None

    def load(self) -> None:
        self.tokenizer = self.part(self.tokenizer_folder)
        self.encoder = self.weights(self.encoder_folder)
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def start(self, item: WorkItem) -> Any:
        check_prompt(self, item)
        if "max_sequence_length" not in item.params:
            raise InvalidField("max_sequence_length", "a T5 encoder needs it (the workflow "
                               "declares it)")
        _int(item.params, "max_sequence_length", 0, minimum=1)
        return super().start(item)

    def _cfg(self, item: WorkItem) -> bool:
        return guided_request(item.params)

    def run(self, items: list[WorkItem]) -> list[Result]:
        results = []
        # one forward per padded length; items of one length share it
        for item in items:
            length = int(item.params["max_sequence_length"])
            texts = [item.params["prompt"]]
            if self._cfg(item):
                texts.insert(0, item.params.get("negative_prompt") or "")
            embeds = self._encode(texts, length)
            results.append(Result(tensors={"prompt_embeds": plain(embeds)}))
        return results

    def _encode(self, texts: list[str], length: int) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        ids = ids.to(self.device)
        with torch.inference_mode():
            if self.batch_exact or len(ids) == 1:
                out = self.encoder(ids)[0]
            else:
                out = torch.cat([self.encoder(ids[r : r + 1])[0] for r in range(len(ids))])
        return out.to(self.encoder.dtype)

    def _probe_batching(self) -> bool:
        return self.probe_batch_exact(lambda: self._encode(PROBE_TEXTS, 32))
