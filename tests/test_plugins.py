"""The seams optional machinery plugs into (model schemes, footprints, backends, workflow
sources, the ``plugins`` setting), checked with the emulated cluster, the one plug-in; and
that no production package imports it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import emulation  # noqa: F401 - registers its pieces
from autoscaler.backends import BACKENDS, auto_backend, build_backend
from autoscaler.footprint import provider_for
from common.settings import Settings
from common.workflow import shipped_workflows
from services.node import build_core
from services.schemes import SCHEMES, scheme_of, shared_scheme

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("common", "services", "gateway", "autoscaler")


def test_a_registered_scheme_names_its_specs():
    assert scheme_of("emulated:FluxSchnell") == "emulated:"
    assert scheme_of("builtin:tiny-sd") is None and scheme_of("/models/sd15") is None
    assert shared_scheme(["emulated:A", "emulated:B"]) == "emulated:"
    assert shared_scheme(["emulated:A", "builtin:tiny-sd"]) is None
    assert shared_scheme([]) is None
    assert "emulated:" in SCHEMES


def test_node_cores_and_pipelines_of_a_scheme_come_from_its_factory():
    settings = Settings(workload="flux3", devices=["emu:0"], device_label="emu:0")
    workflows = shipped_workflows(settings)
    spec = workflows["flux-schnell-txt2img"]
    kind, model = next(iter(spec.pools().values()))
    core, pool = build_core(kind, model, settings)
    assert type(core).__name__ == "EmulatedCore" and pool.startswith(kind)
    whole, pool = build_core("monolithic", spec.name, settings, replica="r1")
    assert type(whole).__name__ == "MonolithicCore" and pool == spec.monolithic_pool()


def test_footprints_of_a_scheme_come_from_its_provider():
    settings = Settings(workload="flux3")
    spec = shipped_workflows(settings)["flux-schnell-canny"]
    kind, model = next((k, m) for k, m in spec.pools().values() if k == "denoiser")
    provider = provider_for(kind, model, spec)
    assert provider is not None
    alone = provider(kind, model, spec, [spec], settings)
    assert alone > 0  # with the ControlNet the workflow attaches
    whole = provider_for("monolithic", spec.name, spec)
    assert whole is not None and whole("monolithic", spec.name, spec, [spec], settings) >= alone
    assert provider_for("denoiser", "builtin:tiny-sd", spec) is None


def test_backends_by_name_and_auto():
    assert {"local", "kubernetes", "emulated"} <= set(BACKENDS)
    assert auto_backend(Settings()) == "local"
    assert auto_backend(Settings(workload="flux3")) == "emulated"
    assert auto_backend(Settings(devices=["emu:0", "emu:1"])) == "emulated"
    assert type(build_backend("auto", Settings(workload="flux3"))).__name__ == "EmulatedBackend"
    with pytest.raises(ValueError, match="unknown 'nope'"):
        build_backend("nope", Settings())


def test_an_unknown_workload_names_the_registered_ones():
    with pytest.raises(ValueError, match="flux3, mix12"):
        shipped_workflows(Settings(workload="nope"))


def test_the_emulated_settings_load_the_plugin_in_every_child():
    from emulation.systems import emulated_settings

    settings = emulated_settings(Settings(), system="micro", workload="flux3", devices=2)
    assert settings.plugins == ["emulation"]
    env = settings.child_env()
    code = ("from common.settings import load_settings; from lego.cli import load_plugins; "
            "import sys; s = load_settings(); load_plugins(s.plugins); "
            "from common.workflow import shipped_workflows; "
            "print(sorted(shipped_workflows(s)), 'emulation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.split()[-1] == "True" and "flux-schnell-txt2img" in out


def test_no_production_package_imports_the_plugin():
    for package in PRODUCTION:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    assert name.split(".")[0] != "emulation", f"{path} imports {name}"
