"""What request validation needs to know about a model, read from its directory (tokenizer and
config files only; no weights, no torch, no transformers): token counts for truncation
warnings, the native image size."""

from __future__ import annotations

import functools
from pathlib import Path

from common.modeldirs import native_size
from common.models import resolve_model_dir
from common.tokenizers import token_counter
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
        counter = token_counter(self._dir(model))
        return counter.count(text), counter.limit

    @functools.lru_cache(maxsize=64)  # noqa: B019
    def native_size(self, model: str) -> tuple[int, int]:
        """As diffusers picks it when width/height are omitted (``common.modeldirs``)."""
        return native_size(self._dir(model))
