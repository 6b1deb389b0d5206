"""The GPU profiles the emulated executor will wait on: every shipped file parses, measured
points come back exactly, batch sizes in between are interpolated, larger ones extrapolated
along the last segment, and an unmeasured resolution scales with the pixel count."""

from __future__ import annotations

import pytest

from emulation.profiles import Curve, load_profiles, parse_profile

PROFILES = load_profiles()


def test_every_shipped_profile_parses() -> None:
    assert len(PROFILES) >= 39
    flux = PROFILES["Flux1Schnell"]
    assert flux.memory_bytes == 23782396416 and flux.load_s == pytest.approx(2.7358, abs=1e-4)
    assert flux.device_memory_bytes == 85028634624
    assert PROFILES["Flux1VAE"].modes == ["decode_latents", "prepare_image"]


def test_measured_points_are_returned_exactly() -> None:
    flux = PROFILES["Flux1Schnell"]
    assert flux.execution_s(1, height=1024, width=1024) == pytest.approx(0.22370152473449706)
    assert flux.execution_s(8) == pytest.approx(1.6814076900482178)


def test_interpolation_and_extrapolation() -> None:
    curve = Curve(None, (1, 2, 4, 8), (1.0, 1.5, 2.5, 4.5))
    assert curve.at(3) == pytest.approx(2.0)  # halfway between 2 and 4
    assert curve.at(6) == pytest.approx(3.5)
    assert curve.at(16) == pytest.approx(4.5 + 8 * 0.5)  # the last segment's marginal cost
    assert Curve(None, (2,), (1.0,)).at(4) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        curve.at(0)


def test_unmeasured_resolution_scales_with_pixels() -> None:
    sd15 = PROFILES["StableDiffusion15"]
    at_512 = sd15.execution_s(1, height=512, width=512)
    assert sd15.execution_s(1, height=1024, width=1024) == pytest.approx(4 * at_512)


def test_unknown_mode_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="decode_latents"):
        PROFILES["Flux1VAE"].execution_s(1, mode="encode")


def test_profile_without_resolution() -> None:
    profile = parse_profile({
        "model_name": "T", "loading": {"gpu_memory_required": 10, "disk_to_host_mem_time": 1,
                                       "host_mem_to_gpu_time": 2},
        "execution": [{"mode": "default", "results": [
            {"batch_size": 1, "execution_time": 0.1}, {"batch_size": 2, "execution_time": 0.15}]}],
    })
    assert profile.execution_s(2, height=64, width=64) == pytest.approx(0.15)
    assert profile.load_s == 2 and profile.memory_bytes == 10
