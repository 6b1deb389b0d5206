"""Per-model GPU profiles (``data/profiles-h800/*.json``): how long one call takes at a batch
size (and resolution), how much device memory the model holds, how long loading it takes.

The emulated executor waits these times instead of running a model, and the
autoscaler can take a pool's service rate and footprint from them. Pure: reading JSON and
arithmetic, no clock.

Between measured batch sizes the time is interpolated linearly; past the largest it is
extrapolated along the last segment (a batch grows at the marginal cost last measured). A
resolution that was not measured is scaled from the nearest measured one in proportion to the
pixel count, which is how convolution and attention-over-patches cost grows to first order.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.families import guided_request
from common.kinds import KINDS

if TYPE_CHECKING:
    from common.workflow import WorkflowSpec

#: the profiles shipped with the repository (copied from the paper's artifact)
DEFAULT_PROFILE_DIR = Path(__file__).resolve().parent.parent / "data" / "profiles-h800"
#: an emulated device's memory by default: the H800 the profiles were measured on
EMULATED_DEVICE_BYTES = 80 * 10**9
#: ``emulated:<Profile>``: a model with no weights, timed by its profile (the model scheme this
#: package registers)
EMULATED_PREFIX = "emulated:"


def emulated_profile(spec: str) -> str:
    """The profile name of an ``emulated:`` model spec."""
    if not spec.startswith(EMULATED_PREFIX):
        raise ValueError(f"{spec!r} is not an emulated model (emulated:<Profile>)")
    return spec[len(EMULATED_PREFIX):]


@dataclass(frozen=True)
class Curve:
    """Execution time against batch size, at one resolution (``pixels`` None: no resolution)."""

    pixels: int | None
    batches: tuple[int, ...]  # ascending
    seconds: tuple[float, ...]

    def at(self, batch: int) -> float:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        b, s = self.batches, self.seconds
        if len(b) == 1:
            return s[0] * batch / b[0]  # one point: proportional
        i = bisect.bisect_left(b, batch)
        if i < len(b) and b[i] == batch:
            return s[i]
        lo = min(max(i - 1, 0), len(b) - 2)  # the segment around it, or the last/first one
        slope = (s[lo + 1] - s[lo]) / (b[lo + 1] - b[lo])
        return max(0.0, s[lo] + slope * (batch - b[lo]))


@dataclass(frozen=True)
class ModelProfile:
    name: str
    memory_bytes: int  # device memory the loaded model needs
    disk_to_host_s: float
    host_to_device_s: float
    device_memory_bytes: int  # of the GPU it was measured on
    curves: dict[str, tuple[Curve, ...]]  # mode -> one curve per measured resolution

    @property
    def load_s(self) -> float:
        """Loading onto a device from host memory (a model evicted but kept in host memory)."""
        return self.host_to_device_s

    @property
    def modes(self) -> list[str]:
        return sorted(self.curves)

    def execution_s(
        self, batch: int = 1, *, mode: str = "default", height: int | None = None,
        width: int | None = None,
    ) -> float:
        """Seconds one call on ``batch`` items takes (one denoiser forward of one CFG branch)."""
        curves = self.curves.get(mode)
        if curves is None:
            raise KeyError(f"{self.name} has no mode {mode!r}; modes: {', '.join(self.modes)}")
        if height is None or width is None or curves[0].pixels is None:
            return curves[0].at(batch)
        pixels = height * width
        # curves[0] has a resolution, so some curve is nearest
        sized = [(c.pixels, c) for c in curves if c.pixels is not None]
        measured, nearest = min(sized, key=lambda found: abs(found[0] - pixels))
        return nearest.at(batch) * pixels / measured


def parse_profile(data: dict[str, Any]) -> ModelProfile:
    curves: dict[str, tuple[Curve, ...]] = {}
    for execution in data["execution"]:
        by_pixels: dict[int | None, dict[int, float]] = {}
        for r in execution["results"]:
            pixels = r["height"] * r["width"] if "height" in r and "width" in r else None
            by_pixels.setdefault(pixels, {})[int(r["batch_size"])] = float(r["execution_time"])
        curves[execution["mode"]] = tuple(
            Curve(pixels, tuple(sorted(points)), tuple(points[b] for b in sorted(points)))
            for pixels, points in sorted(by_pixels.items(), key=lambda kv: kv[0] or 0)
        )
    loading = data["loading"]
    return ModelProfile(
        name=data["model_name"],
        memory_bytes=int(loading["gpu_memory_required"]),
        disk_to_host_s=float(loading["disk_to_host_mem_time"]),
        host_to_device_s=float(loading["host_mem_to_gpu_time"]),
        device_memory_bytes=int(data.get("gpu_memory_total", 0)),
        curves=curves,
    )


@functools.lru_cache(maxsize=8)
def batch_limits(directory: Path | str | None = None) -> dict[str, int]:
    """Per model, the batch size the paper's authors served it with for latency
    (``model_batch.json`` beside or above the profile directory), if there is one."""
    directory = directory or DEFAULT_PROFILE_DIR
    for candidate in (Path(directory) / "model_batch.json",
                      Path(directory).parent / "model_batch.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            return {name: int(modes["latency_mode"]) for name, modes in data.items()}
    return {}


def batch_limit(profile: ModelProfile, limits: Mapping[str, int], mode: str = "default") -> int:
    """The largest batch worth forming: the authors' latency-mode batch where they give one,
    else the largest measured batch that costs at most 1.5 x a single item (beyond it a batch
    only delays its rows)."""
    if profile.name in limits:
        return limits[profile.name]
    curve = profile.curves.get(mode) or next(iter(profile.curves.values()))
    first = curve[0]
    single = first.at(1)
    return max([b for b in first.batches if first.at(b) <= 1.5 * single] or [1])


def load_profiles(directory: Path | str = DEFAULT_PROFILE_DIR) -> dict[str, ModelProfile]:
    """Every ``*.json`` profile in ``directory``, by model name."""
    found = {}
    for path in sorted(Path(directory).glob("*.json")):
        profile = parse_profile(json.loads(path.read_text()))
        found[profile.name] = profile
    if not found:
        raise FileNotFoundError(f"no profiles (*.json) in {directory}")
    return found


@functools.lru_cache(maxsize=8)
def profiles_in(directory: Path | str | None) -> dict[str, ModelProfile]:
    """``load_profiles``, read once per process and directory (shared: do not modify); None:
    the shipped profiles (the ``profile_dir`` setting's default)."""
    return load_profiles(directory or DEFAULT_PROFILE_DIR)


# --- the timing model of the emulated executor (emulation/core.py) ------------------------

def profile_of(spec: str, profiles: Mapping[str, ModelProfile]) -> ModelProfile:
    """The profile of ``emulated:NAME``; ``emulated:A+B`` is one node running models A and B
    one after the other (SD3's CLIP-L and CLIP-G, which one text encoder node runs as the
    real SD3 node does)."""
    name = emulated_profile(spec)
    parts = name.split("+")
    missing = [part for part in parts if part not in profiles]
    if missing:
        raise ValueError(f"{spec}: no profile {missing[0]!r}; profiled: "
                         f"{', '.join(sorted(profiles))}")
    if len(parts) == 1:
        return profiles[name]
    return joined_profile(name, [profiles[part] for part in parts])


def joined_profile(name: str, parts: Sequence[ModelProfile]) -> ModelProfile:
    """Models run one after the other as one: their memory, load times and (resolution-free)
    execution times added, at every batch size any of them was measured at."""
    curves: dict[str, tuple[Curve, ...]] = {}
    for mode in sorted(set.intersection(*(set(p.curves) for p in parts))):
        if any(c.pixels is not None for p in parts for c in p.curves[mode]):
            raise ValueError(f"{name}: only models timed without a resolution run as one")
        batches = sorted({b for p in parts for b in p.curves[mode][0].batches})
        curves[mode] = (Curve(None, tuple(batches), tuple(
            sum(p.curves[mode][0].at(b) for p in parts) for b in batches)),)
    if not curves:
        raise ValueError(f"{name}: its models share no profiled mode")
    return ModelProfile(
        name=name, memory_bytes=sum(p.memory_bytes for p in parts),
        disk_to_host_s=sum(p.disk_to_host_s for p in parts),
        host_to_device_s=sum(p.host_to_device_s for p in parts),
        device_memory_bytes=parts[0].device_memory_bytes, curves=curves)


#: profiles whose resolutions are given in latent pixels (1/8 a side), per ../shared/data/README
_LATENT_UNITS = ("StableDiffusion3", "StableDiffusion35Large", "StableDiffusion3VAE",
                 "StableDiffusion35LargeVAE")


def _profile_size(profile: ModelProfile, height: int, width: int) -> tuple[int, int]:
    if profile.name in _LATENT_UNITS:
        return height // 8, width // 8
    return height, width


#: the profiled mode a node of a kind pays where the profile has it (a VAE's profile times
#: decoding apart); any other: the profile's default
KIND_MODES = {"vae_decoder": "decode_latents"}


def profile_mode(profile: ModelProfile, kind: str | None) -> str:
    """The profiled mode a node of ``kind`` pays (a VAE decoder: ``decode_latents``); None: the
    profile's default."""
    mode = KIND_MODES.get(kind or "")
    if mode is not None and mode in profile.curves:
        return mode
    return "default" if "default" in profile.curves else profile.modes[0]


def call_seconds(profile: ModelProfile, kind: str | None, batch: int, height: int, width: int
                 ) -> float:
    """Profiled seconds of one call of ``profile`` on ``batch`` rows at ``height`` x ``width``,
    in the mode a node of ``kind`` pays (``profile_mode``)."""
    h, w = _profile_size(profile, height, width)
    return profile.execution_s(batch, mode=profile_mode(profile, kind), height=h, width=w)


def cfg_of(params: Mapping[str, Any]) -> bool:
    """Whether guidance doubles a request's rows, by the rule the real nodes follow
    (``common.families.guided_request``: FLUX's true CFG where the workflow has
    ``true_cfg_scale``, else ``guidance`` > 1)."""
    return guided_request(params)


def denoise_step_seconds(
    base: ModelProfile, rows: int, cfg: bool, height: int, width: int,
    controlnet_rows: Mapping[str, tuple[ModelProfile, int]] | None = None,
) -> float:
    """One denoising step of ``rows`` requests; ``controlnet_rows``: per ControlNet, (its
    profile, the rows that use it)."""
    factor = 2 if cfg else 1
    seconds = call_seconds(base, None, rows * factor, height, width)
    for profile, n in (controlnet_rows or {}).values():
        if n:
            seconds += call_seconds(profile, None, n * factor, height, width)
    return seconds


def node_solo_seconds(
    kind: str, profile: ModelProfile, params: Mapping[str, Any],
    adapters: Iterable[ModelProfile] = (),
) -> float:
    """Profiled seconds one request alone spends at a node of ``kind`` on ``profile``."""
    height, width = int(params.get("height", 1024)), int(params.get("width", 1024))
    spec = KINDS[kind]
    if spec.step_param is None:  # with CFG a text encoder encodes the negative prompt too
        return call_seconds(profile, kind, 2 if spec.guided and cfg_of(params) else 1,
                            height, width)
    controlnets = {p.name: (p, 1) for p in adapters}
    step = denoise_step_seconds(profile, 1, cfg_of(params), height, width, controlnets)
    return int(params.get(spec.step_param, 1)) * step


# --- footprints (what placement reserves) --------------------------------------------------

def pipeline_models(spec: WorkflowSpec) -> list[str]:
    """The distinct model specs a whole-workflow replica of ``spec`` holds, ControlNets too."""
    used = [spec.models[n.model] for n in spec.nodes.values()]
    used += [spec.models[n.controlnet] for n in spec.nodes.values() if n.controlnet]
    return list(dict.fromkeys(used))


def footprint_bytes(model: str, profiles: Mapping[str, ModelProfile],
                    adapters: Iterable[str] = ()) -> int:
    """Device memory of one micro replica on ``model`` with the ``adapters`` it may attach."""
    return sum(profile_of(m, profiles).memory_bytes for m in [model, *adapters])


def pool_footprint_bytes(kind: str, model: str, workflow: WorkflowSpec,
                         workflows: Iterable[WorkflowSpec], profiles: Mapping[str, ModelProfile]
                         ) -> int:
    """Device memory of one replica of a pool: a whole workflow's models (``kind``
    "monolithic", found in ``workflow``), or ``model`` with every ControlNet a workflow attaches
    to a node of ``kind`` on it."""
    from common.workflow import attached_adapters

    if kind == "monolithic":
        return sum(profile_of(m, profiles).memory_bytes for m in pipeline_models(workflow))
    return footprint_bytes(model, profiles, attached_adapters(kind, model, workflows))


def solo_latency_s(spec: WorkflowSpec, profiles: Mapping[str, ModelProfile],
                   params: Mapping[str, Any] | None = None) -> float:
    """Profiled seconds one request of ``spec`` takes alone: every node's time, in sequence
    (as one pipeline runs them), with the workflow's default parameters."""
    values = {name: p.default for name, p in spec.params.items() if p.default is not None}
    values.update(params or {})
    total = 0.0
    for node in spec.nodes.values():
        adapters = [profile_of(spec.models[node.controlnet], profiles)] if node.controlnet else []
        total += node_solo_seconds(node.kind, profile_of(spec.models[node.model], profiles),
                                   values, adapters)
    return total


