"""Node kinds: the one registry of what a node of each kind is and does.

A workflow's node names a kind (``KINDS``) and a model. The kind's entry says everything the
system decides by kind without running it: the op its tasks carry, the tensors it takes and
makes, the components of a model directory its core loads (per family where they differ),
whether a task iterates (a denoiser's ``steps``: progress, admission's work estimate), whether
a ControlNet may be attached, whether classifier-free guidance doubles its rows, whether a
replica takes a whole GPU, and which pool serves it on a model (``pool_of``). The cores that
run each kind live with the nodes (``services.catalog``, one per kind and family), checked
against this registry by the tests.

``MONOLITHIC`` is no node kind: it names a pool that runs a whole workflow in one process.
This module is pure: no NATS, no torch.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common import families
from common.contents import components_digest
from common.modeldirs import model_index
from common.models import BUILTIN_PREFIX, builtin_components, is_builtin
from common.subjects import pool_name

#: the kind of a pool that serves a whole workflow in one process (the monolithic baseline)
MONOLITHIC = "monolithic"


@dataclass(frozen=True)
class KindSpec:
    """The interface of a node kind: its op, the tensors it takes and makes, the params it
    reads; and ``requires``, the components of a diffusers directory (entries of its
    ``model_index.json``, each a subfolder) its core loads, the main one first (a pool by
    content is named after it)."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    #: optional inputs of which a node must take exactly one
    one_of: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    #: ``requires`` of the families whose directories lay the kind's components out otherwise
    family_requires: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: whether its core does the same with the same component bytes in any family's
    #: directory, so that models of several families may share its pool (else a pool by
    #: content serves one family)
    across_families: bool = False
    #: request parameters a workflow with such a node must declare (so that every task
    #: carries them: a pool shared by several families' models has no default of its own)
    params: tuple[str, ...] = ()
    #: the request parameter that says how many steps a task runs, each one scheduling step
    #: and one unit of progress (a denoiser's ``steps``); None: a task runs in one step
    step_param: str | None = None
    #: whether a node may attach a ControlNet (``NodeSpec.controlnet``), run at every step
    takes_adapters: bool = False
    #: whether classifier-free guidance (the request's ``guidance`` > 1) doubles the rows it
    #: runs per request: the negative prompt encoded too, the unconditional prediction made too
    guided: bool = False
    #: whether on GPUs a replica takes a whole device by default (``exclusive_kinds``)
    exclusive: bool = False

    def requires_of(self, family: str | None) -> tuple[str, ...]:
        return self.family_requires.get(family or "", self.requires)

    @property
    def stepped(self) -> bool:
        """Whether a task runs ``step_param`` steps rather than one."""
        return self.step_param is not None


KINDS: dict[str, KindSpec] = {
    # SDXL's (both CLIP encoders in one node) also makes the pooled embeddings
    "text_encoder": KindSpec(
        "encode", (), ("prompt_embeds", "pooled_prompt_embeds"),
        requires=("text_encoder", "tokenizer"),
        family_requires={family: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
                         for family in (families.SDXL, families.SD3)},
        guided=True),
    # a T5 encoder of its own (SD3's third text encoder, FLUX's second), so that models of
    # both families may share it
    "t5_encoder": KindSpec("encode", (), ("prompt_embeds",),
                           requires=("text_encoder_3", "tokenizer_3"),
                           family_requires={families.FLUX: ("text_encoder_2", "tokenizer_2")},
                           across_families=True, params=("max_sequence_length",), guided=True),
    "denoiser": KindSpec(
        "denoise", ("prompt_embeds",), ("latents",),
        # SDXL's and SD3's pooled embeddings, SD3's T5 embeddings; a ControlNet's control
        # image (SD, SDXL) or its latents (SD3, FLUX)
        ("image_latents", "generator_state", "pooled_prompt_embeds", "t5_prompt_embeds",
         "control_image", "control_latents"),
        requires=("unet", "scheduler", "vae"),  # the VAE's config: the latents' scale
        family_requires={family: ("transformer", "scheduler", "vae")
                         for family in (families.SD3, families.FLUX)},
        step_param="steps", takes_adapters=True, guided=True, exclusive=True,
    ),
    # img2img's image, or the control image of a ControlNet that takes latents (SD3's, FLUX's)
    "vae_encoder": KindSpec("encode_image", (), ("image_latents", "control_latents",
                                                 "generator_state"),
                            ("image", "control_image"), one_of=("image", "control_image"),
                            requires=("vae",)),
    # the VAE's config says how latents are scaled and shifted, in every family
    "vae_decoder": KindSpec("decode", ("latents",), ("image",), requires=("vae",),
                            across_families=True),
    "safety_checker": KindSpec("check", ("image",), ("image",),
                               requires=("safety_checker", "feature_extractor")),
    # the whole latent upscale pipeline (its own steps run within one task)
    "upscaler": KindSpec("upscale", ("latents",), ("latents",),
                         requires=("unet", "scheduler", "vae", "text_encoder", "tokenizer")),
}


def adapter_kinds() -> list[str]:
    """The kinds a ControlNet may be attached to."""
    return [kind for kind, spec in KINDS.items() if spec.takes_adapters]


def exclusive_kinds() -> list[str]:
    """The pools' kinds whose replica takes a whole GPU by default: the node kinds that say so
    and a whole workflow's."""
    return [*(kind for kind, spec in KINDS.items() if spec.exclusive), MONOLITHIC]


@functools.lru_cache(maxsize=256)
def pool_of(kind: str, model: str) -> str:
    """The pool that serves node ``kind`` on ``model``.

    Where the bytes of the components the kind loads can be told (``common.contents``: a
    builtin, a readable diffusers directory), the pool is named by them: ``KIND-SLUG-DIGEST``
    with SLUG the main component's recipe (a builtin) or class (a directory), so every model
    whose components are the same bytes lands on the same pool, and the name says which
    components it serves rather than one model. Otherwise (a plug-in's model) by the spec
    (``common.subjects.pool_name``)."""
    spec = KINDS.get(kind)
    family = families.family_of(model)
    if spec is None or (family is None and not is_builtin(model)):
        return pool_name(kind, model)
    components = spec.requires_of(family)
    digest = components_digest(model, components)
    if digest is None:
        return pool_name(kind, model)
    if not spec.across_families:
        digest = hashlib.sha256(f"{family}\0{digest}".encode()).hexdigest()
    return pool_name(kind, _component_slug(model, components[0]), digest=digest)


def _component_slug(model: str, component: str) -> str:
    """What a pool by content is named after: a builtin's recipe of ``component`` (its own name
    unless the component is shared), else the class its directory's index names."""
    if is_builtin(model):
        return builtin_components(model[len(BUILTIN_PREFIX):]).get(
            component, model[len(BUILTIN_PREFIX):])
    try:
        entry = model_index(Path(model).expanduser()).get(component)
    except (OSError, ValueError):
        entry = None
    return str(entry[-1]) if isinstance(entry, list) and entry[-1] else component
