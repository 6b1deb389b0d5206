"""The profile-driven emulated executor: a model node's core on an emulated GPU.

An ``EmulatedCore`` stands in for a model node (text encoder, denoiser, VAE decoder) on a model
spec ``emulated:<Profile>`` (a file of ``data/profiles-h800``). Instead of running torch it
waits the profiled time of its batch (interpolated between measured batch sizes, scaled to the
resolution) on its ``emulation.device.EmulatedDevice`` and returns zero tensors of the real
shapes and byte sizes, so the data plane carries real bytes. Transport, batching, tensor store,
ingress and autoscaler are the real ones: a host drives this core like any other.

Timing (the model is ``emulation.profiles``'; what one ``step`` charges):
- text encoder: one forward pass of the batch, at twice the batch with classifier-free guidance
  (the negative prompts too);
- denoiser (the stepped kind, ``common.kinds``): one step = one forward pass of the batch, at
  twice the batch with classifier-free guidance (``guidance`` > 1; the profiles time one CFG
  branch), plus, per attached ControlNet, its forward pass over the rows that use it (also
  doubled with CFG);
- VAE decoder: ``decode_latents`` of the batch.

``build_core`` and ``build_pipeline_core`` are what the ``emulated:`` scheme's factory calls
(``services.node.build_core`` through ``services.schemes``).
"""

from __future__ import annotations

import collections
import functools
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import InvalidField
from common.kinds import KINDS
from common.settings import Settings
from common.workflow import WorkflowSpec, attached_adapters
from emulation.device import EmulatedDevice, Owner, device_of
from emulation.profiles import (
    EMULATED_PREFIX,
    ModelProfile,
    batch_limit,
    batch_limits,
    call_seconds,
    cfg_of,
    denoise_step_seconds,
    pipeline_models,
    profile_mode,
    profile_of,
    profiles_in,
)
from emulation.workloads import workload_workflows
from services.catalog import CORES
from services.core import ModelCore, Result, WorkItem
from services.monolithic import MonolithicCore

#: kinds the emulated executor can stand in for (the profiles time these models)
EMULATED_KINDS = ("text_encoder", "t5_encoder", "denoiser", "vae_decoder")

# --- output shapes -------------------------------------------------------------------------

def _clip_width(name: str) -> int:
    """A CLIP text encoder node's embedding width: its encoders' (CLIP-G 1280, the others 768)
    side by side, as SD3's node concatenates CLIP-L's and CLIP-G's."""
    return sum(1280 if part == "CLIP_G" else 768 for part in name.split("+"))


def _latent_channels(name: str) -> int:
    return 16 if name.startswith(("StableDiffusion3", "Flux")) else 4


def output_tensors(kind: str, profile: ModelProfile, rows: int, height: int, width: int
                   ) -> dict[str, torch.Tensor]:
    """Zero tensors of the shapes and dtypes the real node makes (one request: ``rows`` 1):
    every output its kind declares (``common.kinds``)."""
    return {output: _output(output, profile, rows, height, width)
            for output in KINDS[kind].outputs}


def _output(output: str, profile: ModelProfile, rows: int, height: int, width: int
            ) -> torch.Tensor:
    """Zeros of ``output``'s shape and dtype for ``rows`` requests (its embeddings: rows of one
    prompt each), made once per shape: the store only reads them, and making megabytes of
    zeros anew for every task cost the emulator's host the time of a T5 pass."""
    name = profile.name
    if output == "prompt_embeds" and name.startswith("T5"):
        length = 512 if "Flux" in name else 256  # the workflows' max_sequence_length
        return _zeros((rows, length, 4096))
    if output == "prompt_embeds":
        return _zeros((rows, 77, _clip_width(name)))
    if output == "pooled_prompt_embeds":
        return _zeros((rows, _clip_width(name)))
    if output == "latents":
        return _zeros((rows, _latent_channels(name), height // 8, width // 8))
    if output == "image":
        return _zeros((rows, height, width, 3), torch.uint8)
    raise ValueError(f"the emulated executor makes no {output!r}")


#: per transformer base model (a profile name's start): its blocks (FLUX's 19 double blocks
#: weigh two of its 38 single ones), the values per token of a block's output (a token per
#: 16x16 pixels), and what a ControlNet layer weighs in blocks (FLUX's are double blocks). A
#: ControlNet hands on one output per layer, its layers estimated from its profiled memory
#: against the base model's per block (FLUX's XLabs ControlNets: 2 layers; SD3's: 7; SD3.5
#: large's: 10), and the transformer adds the first after its first block
_DIT_CONTROL: dict[str, tuple[int, int, int]] = {  # (blocks, values per token, layer weight)
    "Flux": (76, 3072, 2), "StableDiffusion35Large": (38, 2432, 1),
    "StableDiffusion3": (24, 1536, 1)}
#: a UNet's ControlNet returns a residual per down-block output (SD 1.5: 6.7 M values a row at
#: 512x512; SDXL: 26.8 M at 1024x1024), which the UNet adds after its down blocks (about 0.4
#: of its step)
_UNET_CONTROL_VALUES = {"StableDiffusionXL": (26.8e6, 1024), "StableDiffusion15": (6.7e6, 512)}
_UNET_GATE = 0.4


def _dit(profile: ModelProfile) -> tuple[int, int, int] | None:
    return next((v for k, v in _DIT_CONTROL.items() if profile.name.startswith(k)), None)


def control_gate(profile: ModelProfile) -> float:
    """The share of a base model's step before it first adds its ControlNet's outputs."""
    found = _dit(profile)
    return _UNET_GATE if found is None else found[2] / found[0]


def control_outputs(profile: ModelProfile, controlnet: ModelProfile, guided: list[bool],
                    height: int, width: int) -> list[torch.Tensor]:
    """Zero tensors of the sizes ``controlnet`` on base model ``profile`` hands on a step of
    requests ``guided`` or not (a row per guidance branch; FLUX's one row, which both
    branches share)."""
    rows = len(guided) if profile.name.startswith("Flux") else sum(1 + g for g in guided)
    found = _dit(profile)
    if found is not None:
        blocks, values, weight = found
        layer_bytes = weight * profile.memory_bytes / blocks
        layers = max(1, round(controlnet.memory_bytes / layer_bytes))
        tokens = (height // 16) * (width // 16)
        return [_zeros((rows, tokens, values))] * layers
    per_row, side = next((v for k, v in _UNET_CONTROL_VALUES.items()
                          if profile.name.startswith(k)), _UNET_CONTROL_VALUES["StableDiffusion15"])
    return [_zeros((rows, int(per_row * height * width / side**2)))]


@functools.lru_cache(maxsize=64)
def _zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Zeros of ``shape`` (half precision unless ``dtype``), made once: tens of megabytes take
    longer to make than the ControlNet pass they stand for, and the store only reads them."""
    return torch.zeros(shape, dtype=dtype)


# --- the core ------------------------------------------------------------------------------

@dataclass(eq=False)
class EmulatedState:
    item: WorkItem
    total: int  # steps (a stepped kind's, a denoiser's) or 1
    height: int
    width: int
    cfg: bool
    adapters: tuple[str, ...]
    done_steps: int = 0


@dataclass(eq=False)
class EmulatedCore(ModelCore):
    """One model node on an emulated device; see the module docstring."""

    node_kind: str
    profile: ModelProfile
    #: the emulated GPU it runs on (``device``, the torch device of its tensors, is the CPU)
    gpu: EmulatedDevice
    owner: Owner
    #: ControlNets this node may be asked to attach (model spec -> profile)
    adapter_profiles: dict[str, ModelProfile] = field(default_factory=dict)
    max_batch: int = 8
    #: ControlNets already counted in the owner's memory (a monolithic pipeline holds its own)
    attached: set[str] = field(default_factory=set)
    #: ControlNets to attach when the model loads (those its workflows attach)
    preload: tuple[str, ...] = ()
    #: an emulated load imports nothing: devices load side by side (``ModelCore.serial_load``)
    serial_load = False

    def __post_init__(self) -> None:
        if self.node_kind not in EMULATED_KINDS:
            raise ValueError(f"the emulated executor has no {self.node_kind!r} (profiled: "
                             f"{', '.join(EMULATED_KINDS)})")
        self.kind = self.node_kind
        # it splits what the real node of its kind splits (a denoiser's steps, a T5 pass)
        self.guidance_branches = CORES[self.node_kind].guidance_branches
        self.ops = ()
        self.components = ()
        self.device = torch.device("cpu")  # where its zero tensors are (``output_tensors``)

    def load(self) -> None:
        """Reserve the owner's memory, once per owner (a pipeline's inner cores share one),
        and attach the ControlNets its workflows are known to use: their load is part of the
        replica's start, not of a request's first step."""
        if not self.owner.swap and not self.gpu.resident(self.owner):
            self.gpu.load(self.owner)
            for spec in self.preload:
                self._attach(spec)

    def _attach(self, spec: str) -> None:
        """Load a ControlNet next to the base model (its memory joins the owner's)."""
        self.attached.add(spec)
        held = sum(self.adapter_profiles[a].memory_bytes for a in self.attached)
        self.gpu.load(self.owner, self.owner.memory_bytes + held,
                         self.adapter_profiles[spec].load_s)

    def close(self) -> None:
        self.gpu.free(self.owner)

    def start(self, item: WorkItem) -> EmulatedState:
        p = item.params
        unknown = [a for a in item.adapters if a not in self.adapter_profiles]
        if unknown:
            raise InvalidField("controlnet", f"{unknown[0]} is not a profiled model",
                               sorted(self.adapter_profiles))
        step_param = KINDS[self.node_kind].step_param
        total = int(p.get(step_param, 1)) if step_param else 1
        return EmulatedState(item, total, int(p.get("height", 1024)), int(p.get("width", 1024)),
                             cfg_of(p), tuple(item.adapters))

    def batch_key(self, state: EmulatedState) -> Hashable:
        return (state.height, state.width, state.cfg)

    def step(self, states: list[EmulatedState]) -> None:
        first = states[0]
        kind = KINDS[self.node_kind]
        if kind.stepped:
            seconds = self._denoise_s(states, first.cfg)
        else:  # a text encoder encodes the negative prompts too under CFG
            factor = 2 if first.cfg and kind.guided else 1
            seconds = call_seconds(self.profile, self.node_kind, len(states) * factor,
                                   first.height, first.width)
        self.gpu.run(self.owner, seconds)
        for state in states:
            state.done_steps += 1

    def _denoise_s(self, states: list[EmulatedState], cfg: bool) -> float:
        """A denoising step of ``states`` (one branch's: ``cfg`` False), ControlNets
        included (attached on their first use where no workflow was known to use them)."""
        return sum(self._step_parts(states, cfg))

    def _step_parts(self, states: list[EmulatedState], cfg: bool) -> tuple[float, float]:
        """A denoising step's seconds: the base model's, its ControlNets'."""
        for spec in sorted({a for s in states for a in s.adapters} - self.attached):
            self._attach(spec)
        counts = collections.Counter(a for s in states for a in s.adapters)
        controlnets = {a: (self.adapter_profiles[a], n) for a, n in counts.items()}
        first = states[0]
        base = denoise_step_seconds(self.profile, len(states), cfg, first.height, first.width)
        return base, denoise_step_seconds(self.profile, len(states), cfg, first.height,
                                          first.width, controlnets) - base

    # CFG parallelism: each branch costs a step (a T5 encoder's pass) of one row per state,
    # and the devices hand over tensors of the real sizes through the tensor store: the
    # latents and a prediction of their size; none and one prompt's embeddings

    def splits(self, states: list[EmulatedState]) -> bool:
        return self.guidance_branches and all(s.cfg for s in states)

    def branch_inputs(self, states: list[EmulatedState]) -> torch.Tensor:
        first = states[0]
        if not KINDS[self.node_kind].stepped:
            return torch.zeros(0)  # the prompts come with the task
        return _output("latents", self.profile, len(states), first.height, first.width)

    def run_branch(self, states: list[EmulatedState], branch: int, inputs: torch.Tensor,
                   steps: list[int]) -> torch.Tensor:
        first = states[0]
        if not KINDS[self.node_kind].stepped:
            self.gpu.run(self.owner, call_seconds(self.profile, self.node_kind, len(states),
                                                  first.height, first.width), queued=False)
            return _output("prompt_embeds", self.profile, len(states), first.height,
                           first.width)
        self.gpu.run(self.owner, self._denoise_s(states, cfg=False), queued=False)
        return _output("latents", self.profile, len(states), first.height, first.width)

    def join_branches(self, states: list[EmulatedState], negative: torch.Tensor,
                      positive: torch.Tensor) -> None:
        for state in states:
            state.done_steps += 1

    # ControlNet parallelism: the ControlNet costs its profiled pass on the other device and
    # hands on outputs of its real size; the base model runs its blocks before the first
    # that adds them (``control_gate``), then waits for them

    def control_splits(self, states: list[EmulatedState]) -> bool:
        return KINDS[self.node_kind].stepped and any(s.adapters for s in states)

    def run_control(self, states: list[EmulatedState], inputs: torch.Tensor,
                    steps: list[int]) -> list[torch.Tensor]:
        first = states[0]
        self.gpu.run(self.owner, self._step_parts(states, first.cfg)[1], queued=False)
        controlnet = self.adapter_profiles[next(a for s in states for a in s.adapters)]
        return control_outputs(self.profile, controlnet, [s.cfg for s in states if s.adapters],
                               first.height, first.width)

    def step_controlled(self, states: list[EmulatedState],
                        outputs: Callable[[], list[torch.Tensor] | None]) -> None:
        base, control = self._step_parts(states, states[0].cfg)
        before = base * control_gate(self.profile)
        self.gpu.run(self.owner, before, queued=False)
        if outputs() is None:
            self.gpu.run(self.owner, control, queued=False)
        self.gpu.run(self.owner, base - before, queued=False)
        for state in states:
            state.done_steps += 1

    def done(self, state: EmulatedState) -> bool:
        return state.done_steps >= state.total

    def progress(self, state: EmulatedState) -> tuple[int, int]:
        return state.done_steps, state.total

    def finish(self, state: EmulatedState) -> Result:
        return Result(output_tensors(self.node_kind, self.profile, 1, state.height, state.width))


def batch_limit_of(kind: str, model: str, settings: Settings) -> int:
    """The batch an emulated node of ``kind`` on ``model`` forms at most (``batch_limit``)."""
    profile = profile_of(model, profiles_in(settings.profile_dir))
    limits = batch_limits(settings.profile_dir)
    return batch_limit(profile, limits, profile_mode(profile, kind))


def pipeline_batch_limit(spec: WorkflowSpec, settings: Settings) -> int:
    """A whole-workflow replica batches as far as its stepped nodes do (its denoiser: its
    costliest stage)."""
    return min([batch_limit_of(n.kind, spec.models[n.model], settings)
                for n in spec.nodes.values() if KINDS[n.kind].stepped] or [settings.max_batch])


def pipeline_owner(spec: WorkflowSpec, profiles: Mapping[str, ModelProfile], key: str,
                   swap: bool = False) -> Owner:
    """A monolithic replica's owner: every model of the pipeline, loaded (and swapped) as one."""
    found = [profile_of(m, profiles) for m in pipeline_models(spec)]
    return Owner(key, sum(p.memory_bytes for p in found), sum(p.load_s for p in found), swap)


# --- building cores ------------------------------------------------------------------------

def build_core(kind: str, model: str, settings: Settings, *, max_batch: int,
               owner: Owner | None = None) -> EmulatedCore:
    """A micro replica's core (``owner`` None: it owns its model) or a pipeline's inner one."""
    profiles = profiles_in(settings.profile_dir)
    profile = profile_of(model, profiles)
    adapters = {f"{EMULATED_PREFIX}{name}": p for name, p in profiles.items()}
    max_batch = min(max_batch, batch_limit_of(kind, model, settings))
    return EmulatedCore(
        kind, profile, device_of(settings),
        owner or Owner(f"{kind}:{model}@{uuid.uuid4().hex[:8]}", profile.memory_bytes,
                       profile.load_s, swap=settings.swap),
        adapter_profiles=adapters, max_batch=max_batch,
        # a pipeline's owner already counts its ControlNets
        attached=set(adapters) if owner is not None else set(),
        preload=() if owner is not None else tuple(
            attached_adapters(kind, model, workload_workflows(settings))),
    )


def build_pipeline_core(spec: WorkflowSpec, settings: Settings, *, max_batch: int,
                        replica: str) -> MonolithicCore:
    """A whole-workflow replica (the monolithic baselines): its inner cores share one owner,
    so the pipeline is loaded (and swapped) as one."""
    owner = pipeline_owner(spec, profiles_in(settings.profile_dir), replica, swap=settings.swap)
    max_batch = min(max_batch, pipeline_batch_limit(spec, settings))
    return MonolithicCore(
        spec, {alias: Path(m) for alias, m in spec.models.items()}, max_batch=max_batch,
        make_inner=lambda kind, ref: build_core(kind, str(ref), settings, max_batch=max_batch,
                                                owner=owner),
    )
