"""Per-model GPU profiles (``data/profiles-h800/*.json``): how long one call takes at a batch
size (and resolution), how much device memory the model holds, how long loading it takes.

The emulated executor of issue 4 waits these times instead of running a model, and the
autoscaler can take a pool's service rate and footprint from them. Pure: reading JSON and
arithmetic, no clock.

Between measured batch sizes the time is interpolated linearly; past the largest it is
extrapolated along the last segment (a batch grows at the marginal cost last measured). A
resolution that was not measured is scaled from the nearest measured one in proportion to the
pixel count, which is how convolution and attention-over-patches cost grows to first order.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the profiles shipped with the repository (copied from the paper's artifact)
DEFAULT_PROFILE_DIR = Path(__file__).resolve().parent.parent / "data" / "profiles-h800"


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
        nearest = min(curves, key=lambda c: abs(c.pixels - pixels))  # type: ignore[operator]
        return nearest.at(batch) * pixels / nearest.pixels  # type: ignore[operator]


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


def load_profiles(directory: Path | str = DEFAULT_PROFILE_DIR) -> dict[str, ModelProfile]:
    """Every ``*.json`` profile in ``directory``, by model name."""
    found = {}
    for path in sorted(Path(directory).glob("*.json")):
        profile = parse_profile(json.loads(path.read_text()))
        found[profile.name] = profile
    if not found:
        raise FileNotFoundError(f"no profiles (*.json) in {directory}")
    return found
