"""Where a pool's replica memory comes from when its models are not directories.

Placement packs devices by each replica's memory. For models on disk the autoscaler reads the
weights (``Autoscaler._footprint``); a pool whose model spec is of a scheme a plug-in registered
(``services.schemes``; for a whole-workflow pool, the scheme all its models share) asks the
provider that plug-in registered here for the same scheme.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from services.schemes import scheme_of, shared_scheme

if TYPE_CHECKING:
    from common.settings import Settings
    from common.workflow import WorkflowSpec

#: (kind, model, the workflow the pool was found in, every registered workflow, settings) ->
#: bytes one replica holds; for a whole-workflow pool ``kind`` is "monolithic" and ``model``
#: the workflow's name
FootprintProvider = Callable[[str, str, "WorkflowSpec", Iterable["WorkflowSpec"], "Settings"],
                             int]

#: scheme prefix -> its provider
PROVIDERS: dict[str, FootprintProvider] = {}


def register_footprint(prefix: str, provider: FootprintProvider) -> None:
    """Replicas of pools on ``prefix`` models hold what ``provider`` says."""
    PROVIDERS[prefix] = provider


def provider_for(kind: str, model: str, workflow: WorkflowSpec) -> FootprintProvider | None:
    """The provider for a pool of ``kind`` on ``model`` (found in ``workflow``), if a plug-in
    registered one for its scheme; None: read the model directories."""
    if kind == "monolithic":
        scheme = shared_scheme(workflow.models.values())
    else:
        scheme = scheme_of(model)
    return PROVIDERS.get(scheme) if scheme is not None else None
