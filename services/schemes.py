"""Model specs served by plug-ins: a spec ``SCHEME:rest`` whose scheme a plug-in registered
names a model whose cores that plug-in builds, instead of a diffusers directory.

``services.node.build_core`` asks ``scheme_of`` first: a registered scheme's factory builds a
micro replica's core (``node``) or, for a workflow whose models all share the scheme, a whole
workflow's core (``pipeline``); any other spec is a model directory (or a builtin). Plug-ins
register when imported (the ``plugins`` setting); nothing here knows which exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from common.settings import Settings
    from common.workflow import WorkflowSpec
    from services.core import ModelCore


class CoreFactory(Protocol):
    """Builds the cores of one scheme's models."""

    def node(self, kind: str, model: str, settings: Settings, *, max_batch: int) -> ModelCore:
        """One replica's core of node ``kind`` on ``model`` (a spec of this scheme)."""
        ...

    def pipeline(self, spec: WorkflowSpec, settings: Settings, *, max_batch: int,
                 replica: str) -> ModelCore:
        """One whole-workflow replica's core (every model of ``spec`` is of this scheme)."""
        ...


#: scheme prefix (with its colon, e.g. ``"name:"``) -> the factory of its cores
SCHEMES: dict[str, CoreFactory] = {}


def register_scheme(prefix: str, factory: CoreFactory) -> None:
    """Serve model specs starting with ``prefix`` (which ends in ``:``) by ``factory``."""
    if not prefix.endswith(":"):
        raise ValueError(f"a scheme prefix ends in ':', got {prefix!r}")
    SCHEMES[prefix] = factory


def scheme_of(spec: str) -> str | None:
    """The registered scheme ``spec`` is of, or None (a model directory or a builtin)."""
    return next((prefix for prefix in SCHEMES if str(spec).startswith(prefix)), None)


def shared_scheme(specs: Iterable[str]) -> str | None:
    """The registered scheme every one of ``specs`` is of, or None (none, or mixed)."""
    found = {scheme_of(spec) for spec in specs}
    return found.pop() if len(found) == 1 else None
