"""Every node kind (``common.kinds.KINDS``, which says what each one is) and the core that
executes it; the tests check that the two name the same kinds, ops and components.

``services.runner`` (and ``lego``) pick a core class by kind and the model's family
(``core_class``: SD 1.x/2.x's ``CORES[kind]`` unless the family runs the kind its own way,
``services.families``); each core is constructed as ``cls(model_dir, device=...,
max_batch=...)`` and loads its components from a diffusers model directory with
``from_pretrained(model_dir, subfolder=...)``. The footprints (weight bytes per replica) are
what the autoscaler places replicas by.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from common.families import family_of_dir, load_dtype
from common.modeldirs import weights_bytes
from common.workflow import WorkflowSpec
from services.core import ModelCore
from services.denoiser import DenoiserCore
from services.families import FAMILY_CORES
from services.safety import SafetyCheckerCore
from services.t5_encoder import T5EncoderCore
from services.text_encoder import TextEncoderCore
from services.upscaler import UpscalerCore
from services.vae import VaeDecoderCore, VaeEncoderCore

CORES: dict[str, type[ModelCore]] = {
    core.kind: core
    for core in (
        TextEncoderCore,
        T5EncoderCore,
        DenoiserCore,
        VaeDecoderCore,
        VaeEncoderCore,
        SafetyCheckerCore,
        UpscalerCore,
    )
}


def core_class(kind: str, model_dir: Path) -> type[ModelCore]:
    """The core that runs node ``kind`` on ``model_dir``, as its family does."""
    own = FAMILY_CORES.get(family_of_dir(model_dir) or "", {})
    return own.get(kind) or CORES[kind]


def footprint_bytes(kind: str, model_dir: Path, dtype: str = "auto", device: str = "cpu",
                    adapters: Iterable[Path] = ()) -> int:
    """Bytes one replica of the micro node ``kind`` on ``model_dir`` holds on ``device``: its
    components' weights and those of the ``adapters`` it may load (ControlNet directories),
    in the dtype the ``dtype`` setting loads them in there (``common.families.load_dtype``)."""
    loaded = load_dtype(dtype, device, family_of_dir(model_dir))
    return (weights_bytes(model_dir, core_class(kind, model_dir).components, loaded)
            + sum(weights_bytes(adapter, ["."], loaded) for adapter in set(adapters)))


def workflow_components(
    spec: WorkflowSpec, model_dirs: Mapping[str, Path]
) -> dict[Path, tuple[str, ...]]:
    """Per distinct model directory of ``spec`` (``model_dirs``: alias -> directory), the union
    of the components its nodes load: in one process a component is held once, whichever nodes
    use it (the VAE encoder and decoder share one VAE, as a diffusers pipeline does)."""
    found: dict[Path, set[str]] = {}
    for node in spec.nodes.values():
        model_dir = Path(model_dirs[node.model])
        found.setdefault(model_dir, set()).update(core_class(node.kind, model_dir).components)
    return {model_dir: tuple(sorted(parts)) for model_dir, parts in found.items()}


def monolithic_footprint_bytes(spec: WorkflowSpec, model_dirs: Mapping[str, Path],
                               dtype: str = "auto", device: str = "cpu") -> int:
    """Bytes one monolithic replica of ``spec`` holds on ``device``: every distinct model counted
    once, with the ControlNets its nodes attach (in their base model's dtype)."""
    total = 0
    for model_dir, parts in workflow_components(spec, model_dirs).items():
        total += weights_bytes(model_dir, parts,
                               load_dtype(dtype, device, family_of_dir(model_dir)))
    for adapter, base in {(Path(model_dirs[node.controlnet]), Path(model_dirs[node.model]))
                          for node in spec.nodes.values() if node.controlnet}:
        total += weights_bytes(adapter, ["."], load_dtype(dtype, device, family_of_dir(base)))
    return total
