"""Which models a workflow registered at run time may name (``POST``/``PUT /v1/workflows``).

A registered workflow makes nodes load whatever its ``models`` name, so a reference must be one
the operator allowed:

- ``builtin:<name>`` of a known builtin (``common.models.builtin_names``);
- a spec of a model scheme a plug-in registered (``services.schemes``);
- a name from configuration (``settings.named_models``: ``models``, ``base``, ``upscaler``),
  replaced by the spec it names; a spec equal to a configured one is the operator's too;
- a path (absolute, or relative to the gateway's directory) that, symlinks followed, lies
  inside one of ``settings.model_root_dirs`` and is a diffusers model directory
  (``model_index.json``) holding every component the nodes on it load
  (``common.workflow.missing_components``, as ``servable`` decides for shipped workflows).

Refused: URLs (``scheme://...``: nothing is downloaded), unknown builtins, paths outside the
roots (``..`` or a symlink out of them included), anything not a directory, and a directory
another family's nodes would fail to load. Reads only the file system (``model_index.json``
and subfolder names), no weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import InvalidField, InvalidRequest
from common.models import BUILTIN_PREFIX, builtin_names, is_builtin, model_components
from common.workflow import WorkflowSpec, missing_components

if TYPE_CHECKING:
    from common.settings import Settings

#: a URL of any scheme (``https://``, ``s3://``, ``file://``, ...)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_model_refs(spec: WorkflowSpec, settings: Settings) -> WorkflowSpec:
    """``spec`` with its model names replaced by the specs configuration gives them, if every
    model reference is allowed (see the module); else ``InvalidRequest`` naming each bad
    ``models.<alias>`` and the rule it breaks."""
    from services.schemes import scheme_of

    named = settings.named_models
    configured = set(named.values())
    roots = [Path(os.path.realpath(Path(root).expanduser())) for root in settings.model_root_dirs]
    node_models = {node.model for node in spec.nodes.values()}
    models: dict[str, str] = {}
    errors: dict[str, InvalidField] = {}
    for alias, ref in spec.models.items():
        field = f"models.{alias}"
        ref = named.get(ref, ref)
        models[alias] = ref
        if ref in configured or scheme_of(ref) is not None:
            continue
        if _URL.match(ref):
            errors[field] = InvalidField(field, f"{ref!r} is a URL; a model is a builtin:, a "
                                         "name from configuration or a directory under the "
                                         "model roots (nothing is downloaded)")
        elif is_builtin(ref):
            if ref[len(BUILTIN_PREFIX):] not in builtin_names():
                errors[field] = InvalidField(field, f"unknown builtin {ref!r}", [
                    BUILTIN_PREFIX + name for name in builtin_names()])
        else:
            problem = _directory_problem(ref, roots, needs_index=alias in node_models)
            if problem:
                errors[field] = InvalidField(field, problem)
    if not errors:
        resolved = spec.model_copy(update={"models": models})
        components = {m: model_components(m) for m in set(models.values())
                      if not is_builtin(m) and scheme_of(m) is None}
        for node, lacking in missing_components(resolved, components).items():
            alias = spec.nodes[node].model
            errors.setdefault(f"models.{alias}", InvalidField(
                f"models.{alias}", f"{models[alias]!r} is no model for node {node} "
                f"({spec.nodes[node].kind}): it lacks {', '.join(lacking)}"))
    if errors:
        raise InvalidRequest(list(errors.values()))
    return spec.model_copy(update={"models": models})


def _directory_problem(ref: str, roots: list[Path], needs_index: bool) -> str | None:
    """Why ``ref`` is no model directory a workflow may name, or None."""
    real = Path(os.path.realpath(Path(ref).expanduser()))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        return (f"{ref!r} is outside the model roots ({', '.join(map(str, roots))}); "
                "a model directory must be under one of them (settings model_roots), or be "
                "named in settings models")
    if not real.is_dir():
        return f"{ref!r} is not a directory"
    if needs_index and not (real / "model_index.json").is_file():
        return f"{ref!r} is not a diffusers model directory (no model_index.json)"
    return None
