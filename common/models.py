"""Model specs: resolve a spec to a diffusers-format directory on disk.

A spec is either a path to a diffusers directory (a ``model_index.json`` layout, e.g. a local
copy of an SD 1.x/2.x repository, or one attachable model such as a ControlNet) or
``builtin:<name>``, one of the tiny random models of ``common.builtins``, built on first use into
``cache_dir/<name>`` and rebuilt when its recipe changes. What a directory holds is read by
``common.modeldirs``.

Several processes may resolve the same builtin at once: one builds into a temporary directory
beside the target, under an exclusive ``fcntl.flock`` on a lock file, and renames it into place
atomically; the others wait on the lock and then use the finished directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.builtins import (
    BUILDERS,
    FAMILIES,
    RECIPE_VERSION,
    SEED,
    SHARED_RECIPES,
    build_builtin,
)
from common.modeldirs import index_components, is_single_model

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
#: what marks a directory of the cache as a builtin we built, and with which recipe
_RECIPE_FILE = "legodiffusion_builtin.json"


def is_builtin(spec: str) -> bool:
    return spec.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return sorted(BUILDERS)


def builtin_family(name: str) -> str | None:
    """The family (``common.families``) builtin ``name`` is built as; None if unknown."""
    return FAMILIES.get(name)


def builtin_components(name: str) -> dict[str, str]:
    """Builtin ``name``'s components built from a recipe other builtins share -> that recipe."""
    return SHARED_RECIPES.get(name, {})


def resolve_model_dir(spec: str, cache_dir: Path) -> Path:
    """The diffusers directory named by ``spec``, building a builtin on first use.

    Raises ``ValueError`` for an unknown builtin and ``FileNotFoundError`` for a path that is
    not a diffusers directory.
    """
    spec = str(spec)
    if is_builtin(spec):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in BUILDERS:
            raise ValueError(f"unknown builtin model {spec!r}; known: {', '.join(builtin_names())}")
        return _ensure_builtin(name, Path(cache_dir).expanduser())
    path = Path(spec).expanduser().resolve()
    if not (path / "model_index.json").is_file() and not is_single_model(path):
        raise FileNotFoundError(f"{spec}: not a diffusers model directory (no model_index.json)")
    return path


def model_components(spec: str) -> frozenset[str] | None:
    """The components model ``spec``'s directory holds (``common.modeldirs.index_components``).
    None where it cannot tell without building or loading anything: a builtin (complete by
    construction), a plug-in's model, a path that is not a diffusers directory (resolving it
    says why)."""
    if is_builtin(spec):
        return None
    try:
        return index_components(Path(spec).expanduser())
    except (OSError, ValueError):
        return None


def _is_current(target: Path) -> bool:
    try:
        recipe = json.loads((target / _RECIPE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recipe.get("recipe") == RECIPE_VERSION and (
        (target / "model_index.json").is_file() or is_single_model(target))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure_builtin(name: str, cache_dir: Path) -> Path:
    target = cache_dir / name
    if _is_current(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / f".{name}.lock"):
        if _is_current(target):  # another process built it while we waited
            return target
        if target.exists() and not (target / _RECIPE_FILE).is_file():
            raise FileExistsError(
                f"{target} exists but is not a LegoDiffusion builtin; move it away or use "
                "another cache_dir"
            )
        # leftovers of a crashed build (only a lock holder builds, so none is in progress)
        for stale in cache_dir.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache_dir))
        log.info("building builtin:%s into %s", name, target)
        try:
            build_builtin(name, tmp)
            (tmp / _RECIPE_FILE).write_text(
                json.dumps({"name": name, "recipe": RECIPE_VERSION, "seed": SEED}) + "\n"
            )
            old = None
            if target.exists():  # an older recipe of ours: move it aside, then swap
                old = cache_dir / f".{name}.tmp-old-{os.getpid()}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
