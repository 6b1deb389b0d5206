"""Where replicas are started and stopped. The autoscaler loop talks to one ``Backend``:

- ``autoscaler.backends.local.LocalBackend`` (the default): node processes on this machine,
  spawned with ``lego node``, pinned to a device (CUDA_VISIBLE_DEVICES or a CPU slot),
  restarted when they crash, drained with SIGTERM when no longer wanted;
- ``autoscaler.backends.kubernetes.KubernetesBackend``: one Deployment per pool, scaled through
  the Deployment ``scale`` subresource; Kubernetes places and restarts the pods;
- whatever a plug-in registers (``register_backend``), by name; `lego autoscaler --backend NAME`
  builds one from ``BACKENDS``, and ``auto`` picks the first registered backend that claims
  the settings, else ``local``.

A backend only carries out decisions; which pool gets how many replicas where is decided by the
pure ``autoscaler.policy`` and ``autoscaler.placement``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol, TypeVar

if TYPE_CHECKING:
    from common.settings import Settings


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


class BackendFactory(Protocol):
    def __call__(self, settings: Settings, *, namespace: str) -> Backend:
        """A backend for ``settings`` (``namespace``: where a platform backend works)."""
        ...


#: name -> how to build it (each imports its module when called: kubernetes is heavy)
BACKENDS: dict[str, BackendFactory] = {}
#: (name, whether it serves these settings), in registration order: what ``auto`` picks
_CLAIMS: list[tuple[str, Callable[[Settings], bool]]] = []


def register_backend(name: str, factory: BackendFactory,
                     claims: Callable[[Settings], bool] | None = None) -> None:
    """Make ``--backend name`` build ``factory``'s backend; ``claims``: ``auto`` picks it for
    settings it returns true on."""
    BACKENDS[name] = factory
    if claims is not None:
        _CLAIMS.append((name, claims))


def auto_backend(settings: Settings) -> str:
    """The backend ``auto`` means: the first registered one that claims ``settings``, else
    ``local``."""
    return next((name for name, claims in _CLAIMS if claims(settings)), "local")


def build_backend(name: str, settings: Settings, *, namespace: str = "legodiffusion") -> Backend:
    """The backend registered as ``name`` (``auto``: ``auto_backend``)."""
    name = auto_backend(settings) if name == "auto" else name
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"backend: unknown {name!r}; registered: {', '.join(sorted(BACKENDS))} "
                         "(the plugins setting loads more)")
    return factory(settings, namespace=namespace)


def _local(settings: Settings, *, namespace: str) -> Backend:
    from autoscaler.backends.local import LocalBackend

    return LocalBackend(settings)


def _kubernetes(settings: Settings, *, namespace: str) -> Backend:
    from autoscaler.backends.kubernetes import KubernetesBackend

    return KubernetesBackend(namespace=namespace)


register_backend("local", _local)
register_backend("kubernetes", _kubernetes)


R = TypeVar("R")


def reconcile(
    running: Sequence[R], devices: list[str], device_of: Callable[[R], str]
) -> tuple[list[R], list[str]]:
    """Which of a pool's ``running`` replicas (oldest first) to drain, and on which devices to
    start new ones, so that it runs one replica per entry of ``devices``. The oldest replicas
    on a wanted device stay: they are warm."""
    wanted = Counter(devices)
    keep = []
    for replica in running:
        if wanted[device_of(replica)] > 0:
            wanted[device_of(replica)] -= 1
            keep.append(replica)
    surplus = [r for r in running if r not in keep]
    return surplus, [d for d, n in sorted(wanted.items()) for _ in range(n)]


class HostedReplica(Protocol):
    """What ``HostedReplicas`` reads of a replica."""

    @property
    def id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def started(self) -> float: ...  # time.monotonic()
    @property
    def stopping(self) -> bool: ...


H = TypeVar("H", bound=HostedReplica)


class HostedReplicas(Generic[H]):
    """What a backend that starts replicas itself (local processes, in-process hosts) keeps: per
    pool its replicas (``HostedReplica``). Subclasses say how one starts (``_start``) and is
    asked to drain (``_stop``)."""

    def __init__(self) -> None:
        self._replicas: dict[str, list[H]] = {}

    def _start(self, launch: PoolLaunch, device: str) -> H:
        raise NotImplementedError

    def _stop(self, replica: H) -> None:
        raise NotImplementedError

    def _info(self) -> dict[str, list[ReplicaInfo]]:
        return {
            pool: [
                ReplicaInfo(r.id, pool, r.device, "stopping" if r.stopping else "running")
                for r in replicas
            ]
            for pool, replicas in self._replicas.items()
        }

    async def scale(self, launch: PoolLaunch, devices: list[str]) -> None:
        replicas = self._replicas.setdefault(launch.pool, [])
        running = sorted((r for r in replicas if not r.stopping), key=lambda r: r.started)
        surplus, start_on = reconcile(running, devices, lambda r: r.device)
        for replica in surplus:
            self._stop(replica)
        for device in start_on:
            replicas.append(self._start(launch, device))
