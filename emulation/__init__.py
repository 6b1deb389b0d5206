"""The emulated GPU cluster: the paper's experiment on a CPU host, as a plug-in.

The real system (NATS JetStream, the tensor store, gateway and ingress, device hosts with their
feeds and step loops, the autoscaler) runs unchanged; only each model's GPU execution is
replaced by a profile-driven executor. No production module imports this package: importing
it (the ``plugins`` setting, which ``emulated_settings`` sets, so every process `lego up`
starts imports it too) registers its pieces through the production seams:

- the model scheme ``emulated:<Profile>`` (``services.schemes``): an ``EmulatedCore`` stands in
  for a text encoder, denoiser or VAE decoder on a profile of ``data/profiles-h800`` (the
  paper's H800 measurements). Its ``step`` waits the profiled time of the batch instead of
  running torch (interpolated between measured batch sizes, extrapolated along the last
  segment, scaled to the resolution by pixel count; CFG doubles a denoiser's rows, each
  attached ControlNet adds its pass) and its outputs are zero tensors of the real shapes and
  byte sizes, so the data plane carries real bytes. A node batches up to the authors'
  latency-mode batch, else the largest measured batch costing at most 1.5x a single item;
- the footprint provider for ``emulated:`` pools (``autoscaler.footprint``): profiled memory,
  with every ControlNet a workflow attaches;
- the backend ``emulated`` (``autoscaler.backends``): replicas as tasks in the autoscaler's
  process, one device host per emulated GPU (micro-serving) or one host per replica (the
  monolithic baselines), so that what shares a device shares its memory ledger and compute;
- the workflow sources ``flux3`` and ``mix12`` (``common.workflow``, ``settings.workload``).

An ``EmulatedDevice`` is one GPU: 80 GB and one compute stream. Making a model resident
reserves its profiled memory and waits its profiled load time; a replica attaches the
ControlNets its workload's workflows use as it starts (another one on first use);
out-of-memory is an error naming the device, the need and what is free. ``time_scale`` K
divides every profiled time (and, through the settings, the autoscaler's tick and delays,
the hosts' eligibility threshold and the traces' gaps) by K; reported latencies are
multiplied back, so runs compare.

Modules, one concept each: ``profiles`` (the timing model), ``traces`` (arrivals), ``workloads``
(Flux-3, Mix-12, the static splits), ``device`` (the emulated GPU), ``core`` (the executor and
its builders), ``backend``, ``systems`` (the compared systems as settings), ``experiment``
(`lego bench slo|sweep`) and ``bound`` (the idealised cluster, `lego bench bound`). Method and
results: docs/emulation.md.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

from autoscaler.backends import register_backend
from autoscaler.footprint import register_footprint
from common.workflow import register_workflow_source
from emulation.profiles import EMULATED_PREFIX
from emulation.workloads import WORKLOADS
from services.schemes import register_scheme

if TYPE_CHECKING:
    from autoscaler.backends import Backend
    from common.settings import Settings
    from common.workflow import WorkflowSpec
    from services.core import ModelCore

class _Cores:
    """The ``emulated:`` scheme's cores, built by ``emulation.core`` (imported when first
    asked: it imports torch, which a gateway never needs)."""

    def node(self, kind: str, model: str, settings: Settings, *, max_batch: int) -> ModelCore:
        from emulation.core import build_core

        return build_core(kind, model, settings, max_batch=max_batch)

    def pipeline(self, spec: WorkflowSpec, settings: Settings, *, max_batch: int,
                 replica: str) -> ModelCore:
        from emulation.core import build_pipeline_core

        return build_pipeline_core(spec, settings, max_batch=max_batch, replica=replica)


def _footprint(kind: str, model: str, workflow: WorkflowSpec, workflows: Iterable[WorkflowSpec],
               settings: Settings) -> int:
    from emulation.profiles import pool_footprint_bytes, profiles_in

    return pool_footprint_bytes(kind, model, workflow, workflows,
                                profiles_in(settings.profile_dir))


def _backend(settings: Settings, *, namespace: str) -> Backend:
    from emulation.backend import EmulatedBackend

    return EmulatedBackend(settings)


def _claims(settings: Settings) -> bool:
    """``auto`` picks the emulated backend for an emulated workload or emulated devices."""
    return settings.workload in WORKLOADS or any(d.startswith("emu")
                                                      for d in settings.devices)


def _workflows(workload: str, settings: Settings) -> dict[str, WorkflowSpec]:
    from emulation.workloads import load_workload

    return load_workload(workload, settings.profile_dir, settings.time_scale).workflows


register_scheme(EMULATED_PREFIX, _Cores())
register_footprint(EMULATED_PREFIX, _footprint)
register_backend("emulated", _backend, claims=_claims)
for _name in WORKLOADS:
    register_workflow_source(_name, functools.partial(_workflows, _name))
