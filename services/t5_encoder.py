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
    ``true_cfg_scale``, else by SD3's classifier-free guidance (``guidance`` > 1).

    A guided request's two prompts may be encoded on two devices (CFG parallelism,
    ``services.branches``): the negative on a helper, the positive here. Each prompt is
    encoded alone either way or batched only where that gives the same bits
    (``batch_exact``), so the split embeddings are the whole ones. T5-XXL's pass is the only
    encoder pass worth it: a CLIP encoder's takes about as long as the hand-off."""

    kind = "t5_encoder"
    ops = ("encode",)
    #: (tokenizer, encoder) subfolders in the model directory
    tokenizer_folder, encoder_folder = "tokenizer_3", "text_encoder_3"
    components = ("text_encoder_3",)
    batch_exact: bool | None = None
    guidance_branches = True

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
            texts = [item.params["prompt"]]
            if self._cfg(item):
                texts.insert(0, _negative(item))
            embeds = self._encode(texts, _length(item))
            results.append(Result(tensors={"prompt_embeds": plain(embeds)}))
        return results

    # CFG parallelism: branch 0 encodes the negative prompts, branch 1 the positive ones; the
    # prompts come with the task, so the other device needs no tensor of this one

    def splits(self, states: list[Any]) -> bool:
        return (all(self._cfg(s.item) for s in states)
                and len({_length(s.item) for s in states}) == 1)

    def branch_inputs(self, states: list[Any]) -> torch.Tensor:
        return torch.zeros(0)

    def run_branch(self, states: list[Any], branch: int, inputs: torch.Tensor,
                   steps: list[int]) -> torch.Tensor:
        texts = [_negative(s.item) if branch == 0 else s.item.params["prompt"] for s in states]
        return plain(self._encode(texts, _length(states[0].item)))

    def join_branches(self, states: list[Any], negative: torch.Tensor,
                      positive: torch.Tensor) -> None:
        for row, state in enumerate(states):
            embeds = torch.cat([negative[row : row + 1], positive[row : row + 1]])
            state.result = Result(tensors={"prompt_embeds": embeds})

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


def _negative(item: WorkItem) -> str:
    return item.params.get("negative_prompt") or ""


def _length(item: WorkItem) -> int:
    return int(item.params["max_sequence_length"])
