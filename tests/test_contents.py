"""Pools by content: models whose components are the same bytes share a pool.

Real files throughout: the builtins built into a session cache, copied into plain diffusers
directories; a Hugging Face cache layout made of real blobs and symlinks."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from pathlib import Path

import pytest

from common import contents
from common.contents import components_digest, file_digest, folder_digest
from common.kinds import KINDS, pool_of
from common.modeldirs import is_single_model
from common.models import BUILTIN_PREFIX, builtin_components, builtin_names, resolve_model_dir
from common.workflow import builtin_workflows

SD3, FLUX, FLUX_SCHNELL = "builtin:tiny-sd3", "builtin:tiny-flux", "builtin:tiny-flux-schnell"


@pytest.fixture(scope="module")
def built(cache_dir: Path) -> dict[str, Path]:
    """Every builtin pipeline, built (ControlNets, one model each, have no components)."""
    dirs = {name: resolve_model_dir(BUILTIN_PREFIX + name, cache_dir / "models")
            for name in builtin_names()}
    return {name: path for name, path in dirs.items() if not is_single_model(path)}


def test_builtins_that_name_one_recipe_for_a_component_hold_the_same_bytes(built) -> None:
    """``builtin_components`` is what pools by content trust without building: every pair of
    builtin components with one recipe is byte-identical, and every byte-identical pair is
    named as one recipe (else a pool would be split that could be shared)."""
    recipes, digests = {}, {}
    for name, path in built.items():
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            recipes[name, folder.name] = builtin_components(name).get(
                folder.name, f"{name}/{folder.name}")
            digests[name, folder.name] = folder_digest(folder)
    for a, b in itertools.combinations(sorted(recipes), 2):
        assert (recipes[a] == recipes[b]) == (digests[a] == digests[b]), (a, b)
    shared = {recipe for recipe in recipes.values() if "/" not in recipe}
    assert {"tiny-t5", "tiny-t5-tokenizer", "tiny-vae", "tiny-vae-shifted"} <= shared


def test_sd3_and_flux_share_the_t5_and_vae_pools_and_nothing_family_bound() -> None:
    flows = builtin_workflows()
    sd3, flux = flows["sd3-txt2img"].pools(), flows["flux-txt2img"].pools()
    shared = set(sd3) & set(flux)
    assert sorted(kind for kind, _ in (sd3[p] for p in shared)) == ["t5_encoder",
                                                                    "vae_decoder"]
    assert pool_of("t5_encoder", SD3).startswith("t5_encoder-tiny-t5-")
    # FLUX.1-dev and -schnell differ only in the transformer
    assert {kind: pool_of(kind, FLUX) == pool_of(kind, FLUX_SCHNELL) for kind in (
        "text_encoder", "t5_encoder", "denoiser", "vae_decoder")} == {
        "text_encoder": True, "t5_encoder": True, "denoiser": False, "vae_decoder": True}
    # SD 1.x and SDXL share the VAE (same bytes), not the family-bound text encoder pools
    assert pool_of("vae_decoder", "builtin:tiny-sd") == pool_of("vae_decoder",
                                                                  "builtin:tiny-sdxl")
    assert pool_of("text_encoder", "builtin:tiny-sd") != pool_of("text_encoder",
                                                                   "builtin:tiny-sdxl")


def test_directories_with_the_same_component_bytes_share_a_pool(built, tmp_path) -> None:
    sd3, flux = (Path(shutil.copytree(built[name], tmp_path / name, symlinks=False))
                 for name in ("tiny-sd3", "tiny-flux"))
    t5 = pool_of("t5_encoder", str(sd3))
    # named by what it holds, the class of the encoder, in whichever folder it lies
    assert t5 == pool_of("t5_encoder", str(flux)) and t5.startswith("t5_encoder-t5encodermodel-")
    assert pool_of("vae_decoder", str(sd3)) == pool_of("vae_decoder", str(flux))
    assert pool_of("denoiser", str(sd3)) != pool_of("denoiser", str(flux))
    # a builtin is known by its recipe, a directory by its bytes: two names, each stable
    assert t5 != pool_of("t5_encoder", SD3)
    # one byte changed in FLUX's T5: its own pool
    weights = next((flux / "text_encoder_2").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    pool_of.cache_clear()
    assert pool_of("t5_encoder", str(flux)) != t5
    # a directory that is gone or lacks the component is named by its spec, as a plug-in's
    assert components_digest(str(tmp_path / "missing"), KINDS["vae_decoder"].requires) is None
    assert components_digest("emulated:flux-dev/t5", ("text_encoder_2",)) is None


def test_a_file_digest_is_its_sha256_from_a_hugging_face_blob_name_or_a_cache(
        tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(contents, "DIGEST_DIR", tmp_path / "cache" / "digests")
    data = os.urandom((1 << 20) + 7)  # large enough to be kept in the on-disk cache
    sha = hashlib.sha256(data).hexdigest()
    # a Hugging Face cache snapshot: the large file is a symlink to blobs/<sha256>
    blob = tmp_path / "hub" / "blobs" / sha
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = tmp_path / "hub" / "snapshots" / "rev" / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    plain = tmp_path / "plain" / "model.safetensors"
    plain.parent.mkdir()
    plain.write_bytes(data)
    assert file_digest(snapshot) == file_digest(plain) == sha
    assert folder_digest(snapshot.parent) == folder_digest(plain.parent)
    kept = list((tmp_path / "cache" / "digests").glob("*.json"))
    assert len(kept) == 1  # the plain file's, read by the next process instead of the bytes
    contents._digest.cache_clear()
    os.utime(plain, ns=(1, 1))  # changed since: hashed again
    plain.write_bytes(data[::-1])
    assert file_digest(plain) == hashlib.sha256(data[::-1]).hexdigest()
    assert folder_digest(snapshot.parent) != folder_digest(plain.parent)
