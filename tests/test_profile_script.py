"""scripts/profile_denoiser.py in its CPU smoke mode: its profiles are what
``emulation.profiles.parse_profile`` reads, at the batch sizes and resolutions asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from emulation.profiles import parse_profile

REPO = Path(__file__).resolve().parent.parent


def test_tiny_profiles_parse(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/profile_denoiser.py", "--tiny", "--device", "cpu",
         "--out", str(tmp_path), "--warmup", "1", "--repeats", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("StableDiffusion15", "StableDiffusionXL"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        profile = parse_profile(data)
        assert profile.name == name
        [curve] = profile.curves["default"]
        assert curve.batches == (1, 2, 4, 8)
        assert curve.pixels == 64 * 64  # the tiny UNets' native size: 8x8 latents
        assert all(s > 0 for s in curve.seconds)
        assert profile.memory_bytes > 0 and profile.host_to_device_s >= 0
        # the comparison against the H800 profile of the same model, one row per batch
        assert f"{name}: cpu / NVIDIA H800" in done.stdout
