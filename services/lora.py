"""LoRAs per request, loaded into a replica's model as diffusers' pipelines load them: into
SD's and SDXL's UNet, SD3's and FLUX's transformer, and their CLIP text encoders.

A request names its LoRAs (``loras: [{"name", "scale"}]``); their files are
``lora_dir/NAME.safetensors`` (the ``lora_dir`` setting), in any format diffusers reads. A
replica reads a LoRA's file the first time a request needs it, in a worker thread
(``Loras.read``, from ``ModelCore.prepare``) while other requests keep stepping; it adds the
LoRA's layers to the model at the next step boundary (``Loras.activate``, on the step
thread, which alone runs the model), and keeps them for later requests. Each step runs with
exactly its batch's LoRAs at their scales (PEFT's ``set_adapters``), or none. A file that
changed since it was read is read again, so a LoRA is replaced without a restart.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.core import ModelSource

#: a request's LoRAs as a batch key: ((name, scale), ...) in the request's order
LoraKey = tuple[tuple[str, float], ...]

_names = itertools.count()


def lora_key(params: dict[str, Any]) -> LoraKey:
    """The LoRAs ``params`` names (validated by the gateway: ``common.workflow.check_loras``)."""
    return tuple((lora["name"], float(lora.get("scale", 1.0)))
                 for lora in params.get("loras") or ())


@dataclass
class _Read:
    mtime: float
    state_dict: dict
    alphas: dict | None


def pipeline_class(model_dir: Any) -> Any:
    """The diffusers pipeline class ``model_dir`` was saved from: its LoRA loaders read its
    family's LoRA files (their formats differ)."""
    import diffusers

    from common.modeldirs import model_index

    return getattr(diffusers, model_index(model_dir)["_class_name"])


#: the components whose adapters the model itself switches (diffusers' ``PeftAdapterMixin``);
#: a text encoder's go through diffusers' text encoder helpers
_DENOISERS = ("unet", "transformer")


class Loras:
    """The LoRAs one model of a replica holds: ``component`` ``"unet"``, ``"transformer"``,
    ``"text_encoder"`` or ``"text_encoder_2"`` (the part of a LoRA file it takes);
    ``pipeline`` the diffusers pipeline class (``pipeline_class``) whose loaders read the
    family's LoRA files."""

    def __init__(self, model: Any, component: str, pipeline: Any, keep: int = 16) -> None:
        self.model = model
        self.component = component
        self.pipeline = pipeline
        self.keep = keep
        self._read: dict[str, _Read] = {}  # read from disk, not in the model yet
        self._loaded: OrderedDict[str, tuple[float, str]] = OrderedDict()  # name -> (mtime, id)
        self._lock = threading.RLock()
        self._active: tuple[tuple[str, float], ...] | None = None

    def missing(self, loras: LoraKey, source: ModelSource | None) -> bool:
        """Whether a LoRA of ``loras`` is not read yet, or its file changed since (a stat per
        LoRA: cheap enough for the event loop)."""
        for name, _ in loras:
            known = self._read[name].mtime if name in self._read else (
                self._loaded[name][0] if name in self._loaded else None)
            try:
                if known is None or source is None or (
                        source.lora_file(name).stat().st_mtime != known):
                    return True
            except Exception:  # noqa: BLE001 - gone or unreadable: read says why
                return True
        return False

    def read(self, loras: LoraKey, source: ModelSource | None) -> None:
        """Read the files of ``loras`` not read yet (or changed since): a worker thread's work."""
        for name, _ in loras:
            if source is None:
                from common.errors import InvalidField

                raise InvalidField("loras", "this replica serves no LoRAs")
            path = source.lora_file(name)
            mtime = path.stat().st_mtime
            with self._lock:
                loaded = self._loaded.get(name)
                if (loaded and loaded[0] == mtime) or (
                        name in self._read and self._read[name].mtime == mtime):
                    continue
            state_dict, alphas = self._state_dict(path)
            with self._lock:
                self._read[name] = _Read(mtime, state_dict, alphas)

    def activate(self, loras: LoraKey) -> None:
        """Make the model run with exactly ``loras`` (on the step thread, between steps)."""
        with self._lock:  # read() checks what is loaded from a worker thread
            self._activate(loras)

    def _activate(self, loras: LoraKey) -> None:
        from common.errors import InvalidField

        pending = {name: self._read.pop(name) for name, _ in loras if name in self._read}
        for name, read in pending.items():
            self._drop(name)
            adapter = f"lora{next(_names)}"
            self._inject(read, adapter)
            self._loaded[name] = (read.mtime, adapter)
            self._active = None  # a new adapter is active after loading: select again
        unknown = [name for name, _ in loras if name not in self._loaded]
        if unknown:
            raise InvalidField("loras", f"{unknown[0]!r} was not read")
        for name, _ in loras:
            self._loaded.move_to_end(name)
        wanted = tuple(loras)
        if wanted != self._active:
            self._select(wanted)
            self._active = wanted
        while len(self._loaded) > max(self.keep, len(loras)):
            oldest = next(iter(self._loaded))
            if any(oldest == name for name, _ in loras):
                break
            self._drop(oldest)

    # ---------------------------------------------------------------------------------------

    def _state_dict(self, path: Any) -> tuple[dict, dict | None]:
        """A LoRA file's layers and alphas, as the family's pipeline reads them (SD's and
        SDXL's loaders give both, SD3's the layers alone, FLUX's the alphas when asked)."""
        loader = self.pipeline.lora_state_dict
        kwargs = {"return_alphas": True} if "return_alphas" in _parameters(loader) else {}
        out = loader(str(path.parent), weight_name=path.name, **kwargs)
        if isinstance(out, tuple):
            return out[0], (out[1] if len(out) > 1 else None)
        return out, None

    def _inject(self, read: _Read, adapter: str) -> None:
        from common.errors import InvalidField

        if self.component == "unet":
            self.pipeline.load_lora_into_unet(
                read.state_dict, read.alphas, unet=self.model, adapter_name=adapter)
            return
        if self.component == "transformer":
            load = self.pipeline.load_lora_into_transformer
            alphas = ({"network_alphas": read.alphas} if "network_alphas" in _parameters(load)
                      else {})
            load(read.state_dict, transformer=self.model, adapter_name=adapter, **alphas)
            return
        if not any(key.startswith(f"{self.component}.") for key in read.state_dict):
            return  # no layers for this model (a UNet-only LoRA)
        try:
            self.pipeline.load_lora_into_text_encoder(
                read.state_dict, read.alphas, text_encoder=self.model, prefix=self.component,
                adapter_name=adapter)
        except ValueError as exc:  # transformers' PEFT integration checks PEFT's version
            raise InvalidField("loras", f"its text encoder layers cannot load here: {exc}") \
                from None

    def _adapters(self) -> set[str]:
        """The adapters the model has (a LoRA file may hold no layers for this component)."""
        config = getattr(self.model, "peft_config", None) or {}
        return set(config)

    def _select(self, loras: LoraKey) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        present = self._adapters()
        chosen = [(self._loaded[name][1], scale) for name, scale in loras
                  if self._loaded[name][1] in present]
        if not present:
            return
        denoiser = self.component in _DENOISERS
        if not chosen:
            self.model.disable_lora() if denoiser else disable_lora_for_text_encoder(self.model)
            return
        names, weights = [a for a, _ in chosen], [w for _, w in chosen]
        if denoiser:
            self.model.enable_lora()
            self.model.set_adapters(names, weights)
        else:
            enable_lora_for_text_encoder(self.model)
            set_adapters_for_text_encoder(names, self.model, weights)

    def _drop(self, name: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        loaded = self._loaded.pop(name, None)
        if loaded is not None and loaded[1] in self._adapters():
            delete_adapter_layers(self.model, loaded[1])
            self.model.peft_config.pop(loaded[1], None)
            self._active = None


def _parameters(function: Any) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)
