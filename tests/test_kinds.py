"""The node kinds' registry (``common.kinds``) and what is derived from it: the catalog of
cores runs exactly its kinds, and the checks made by kind elsewhere (steps, ControlNets,
guidance, whole-device replicas, the emulated outputs) follow a kind's entry, not its name."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import InvalidRequest
from common.kinds import KINDS, MONOLITHIC, exclusive_kinds
from common.settings import Settings
from common.workflow import builtin_workflows, parse_workflow
from emulation.core import EMULATED_KINDS, output_tensors
from emulation.profiles import call_seconds, load_profiles, node_solo_seconds
from gateway.admission import steps_of
from services.catalog import CORES
from services.families import FAMILY_CORES

pytestmark = pytest.mark.timeout(60)


def test_the_catalog_runs_every_kind_and_no_other() -> None:
    assert set(CORES) == set(KINDS)
    assert MONOLITHIC not in KINDS
    for kind, core in CORES.items():
        assert core.kind == kind and core.ops == (KINDS[kind].op,)
        assert set(core.components) <= set(KINDS[kind].requires), kind


def test_family_cores_are_the_kinds_cores_on_their_layout() -> None:
    for family, cores in FAMILY_CORES.items():
        for kind, core in cores.items():
            assert issubclass(core, CORES[kind]), (family, kind)
            assert core.kind == kind and core.ops == (KINDS[kind].op,)
            assert set(core.components) <= set(KINDS[kind].requires_of(family)), (family, kind)


def test_the_denoiser_is_the_stepped_kind() -> None:
    assert [k for k, s in KINDS.items() if s.stepped] == ["denoiser"]
    assert KINDS["denoiser"].step_param == "steps"
    assert [k for k, s in KINDS.items() if s.takes_adapters] == ["denoiser"]
    assert Settings().exclusive_kinds == exclusive_kinds() == ["denoiser", MONOLITHIC]


def _workflow(kind: str, **denoise: object) -> dict:
    """The controlnet workflow with its denoising node of ``kind`` (and ``denoise``'s fields)."""
    data = builtin_workflows()["controlnet"].model_dump(exclude_none=True)
    data["params"]["refine_steps"] = {"type": "integer", "default": 3}
    data["nodes"]["denoise"].update(kind=kind, **denoise)
    return data


def test_a_stepped_kind_runs_its_step_param(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kind named otherwise is stepped by its entry: its steps, its ControlNet."""
    monkeypatch.setitem(KINDS, "refiner", replace(KINDS["denoiser"], step_param="refine_steps"))
    spec = parse_workflow(_workflow("refiner"))
    assert spec.compile().nodes["denoise"].adapters == ["builtin:tiny-sd-controlnet"]
    steps = steps_of(spec, {"steps": 7, "refine_steps": 5}, spec.compile())
    assert steps == {"encode": 1, "denoise": 5, "decode": 1}
    monkeypatch.setitem(KINDS, "refiner", replace(KINDS["denoiser"], step_param=None))
    steps = steps_of(spec, {"steps": 7, "refine_steps": 5}, spec.compile())
    assert steps == {"encode": 1, "denoise": 1, "decode": 1}


def test_a_controlnet_only_on_a_kind_that_takes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(KINDS, "refiner", replace(KINDS["denoiser"], takes_adapters=False))
    with pytest.raises(InvalidRequest, match="a refiner takes none; only a denoiser does"):
        parse_workflow(_workflow("refiner"))
    data = _workflow("denoiser")
    data["nodes"]["decode"]["controlnet"] = "control"
    with pytest.raises(InvalidRequest, match="a vae_decoder takes none"):
        parse_workflow(data)


def test_emulated_nodes_make_their_kinds_outputs() -> None:
    profile = load_profiles()["StableDiffusion15"]
    assert set(EMULATED_KINDS) <= set(KINDS)
    for kind in EMULATED_KINDS:
        assert set(output_tensors(kind, profile, 1, 64, 64)) == set(KINDS[kind].outputs)


def test_emulated_timing_follows_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Classifier-free guidance doubles a guided kind's rows; a stepped kind pays its steps."""
    profiles = load_profiles()
    clip, unet = profiles["CLIP_SD15"], profiles["StableDiffusion15"]
    params = {"guidance": 7.5, "steps": 3, "height": 512, "width": 512}
    once = call_seconds(clip, "text_encoder", 1, 512, 512)
    assert node_solo_seconds("text_encoder", clip, params) == call_seconds(
        clip, "text_encoder", 2, 512, 512)
    monkeypatch.setitem(KINDS, "text_encoder", replace(KINDS["text_encoder"], guided=False))
    assert node_solo_seconds("text_encoder", clip, params) == once
    step = node_solo_seconds("denoiser", unet, {**params, "steps": 1})
    assert node_solo_seconds("denoiser", unet, params) == pytest.approx(3 * step)
