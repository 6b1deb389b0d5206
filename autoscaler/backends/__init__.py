"""Where replicas are started and stopped. The autoscaler loop talks to one ``Backend``:

- ``autoscaler.backends.local.LocalBackend`` (the default): node processes on this machine,
  spawned with ``lego node``, pinned to a device (CUDA_VISIBLE_DEVICES or a CPU slot),
  restarted when they crash, drained with SIGTERM when no longer wanted;
- ``autoscaler.backends.kubernetes.KubernetesBackend``: one Deployment per pool, scaled through
  the Deployment ``scale`` subresource; Kubernetes places and restarts the pods.

A backend only carries out decisions; which pool gets how many replicas where is decided by the
pure ``autoscaler.policy`` and ``autoscaler.placement``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class PoolLaunch:
    """How to start one replica of a pool: ``lego node KIND --model MODEL``.

    For the monolithic baseline ``kind`` is ``"monolithic"`` and ``model`` the workflow name.
    """

    pool: str
    kind: str
    model: str


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica as the backend sees it (readiness comes from the replica's own reports)."""

    id: str  # backend-specific: a pid for local processes, a pod or deployment name otherwise
    pool: str
    device: str  # where it runs: "cpu:0", "cuda:1", or "" when the backend does not place
    state: Literal["running", "stopping"]


class Backend(Protocol):
    #: whether ``scale`` honours the device list (local) or leaves placement to the platform
    places_replicas: bool

    async def start(self) -> None:
        """Connect / prepare; called once before anything else."""

    async def replicas(self) -> dict[str, list[ReplicaInfo]]:
        """The replicas of every pool this backend manages (stopping ones included)."""

    async def scale(self, launch: PoolLaunch, devices: list[str]) -> None:
        """Make ``launch.pool`` run ``len(devices)`` replicas, one per listed device where the
        backend places replicas. Surplus replicas are drained gracefully (they finish and ack
        what they hold, then exit), never killed mid-task."""

    async def close(self, *, stop_replicas: bool) -> None:
        """Release resources; with ``stop_replicas`` also drain and stop every replica."""
