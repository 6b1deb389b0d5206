"""The Kubernetes backend: one Deployment per pool, scaled through its ``scale`` subresource.

The Deployments themselves come from ``deploy/kubernetes/nodes.yaml`` (generated from the
shipped workflows by ``deploy/kubernetes/generate.py``); this backend never creates or deletes
them, it only changes ``spec.replicas``. That keeps what runs (image, resources, model) in
reviewed manifests and gives the autoscaler's service account nothing beyond
``deployments/scale``.

Graceful drain: Kubernetes stops a surplus pod with SIGTERM and waits
``terminationGracePeriodSeconds`` before SIGKILL. ``lego node`` drains on SIGTERM (it stops
fetching, finishes and acks the tasks it holds, then exits), so the manifests set the grace
period above ``drain_timeout_s`` (what the local backend allows a draining node before killing
it) and scaling down does not kill a replica mid-task.

Kubernetes chooses the pods to remove and where new ones run, so ``places_replicas`` is False
and ``scale`` only uses the length of its device list.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from autoscaler.backends import PoolLaunch, ReplicaInfo

log = logging.getLogger(__name__)

#: label every LegoDiffusion object carries; with COMPONENT_LABEL=node it selects node pools
PART_OF_LABEL = "app.kubernetes.io/part-of"
PART_OF = "legodiffusion"
COMPONENT_LABEL = "app.kubernetes.io/component"
NODE_COMPONENT = "node"
#: the pool a Deployment serves; the annotation is authoritative because a label value is
#: limited to 63 characters and a pool name is not
POOL_KEY = "legodiffusion.io/pool"
NODE_SELECTOR = f"{PART_OF_LABEL}={PART_OF},{COMPONENT_LABEL}={NODE_COMPONENT}"
DEFAULT_NAMESPACE = "legodiffusion"
FIELD_MANAGER = "lego-autoscaler"

_MAX_NAME = 63  # DNS-1123 label
_PREFIX = "lego-"
_HASH_SUFFIX = re.compile(r"^(?P<head>.*)-(?P<digest>[0-9a-f]{8})$")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class DeploymentMissingError(LookupError):
    """A pool has no Deployment: the manifests were not applied (or are out of date)."""


def deployment_name(pool: str) -> str:
    """The Deployment serving ``pool``: ``lego-`` + the pool name as a DNS-1123 label.

    Pool names end in an 8-hex digest of the model (``denoiser-tiny-sd-7e505616``); when the
    name must be cut to 63 characters the middle is cut and the digest kept, so two long model
    names never collapse onto one Deployment. A pool name without such a digest (or one changed
    by the clean-up) gets a digest of the pool name itself, for the same reason.
    """
    slug = _NOT_DNS.sub("-", pool.lower()).strip("-")
    match = _HASH_SUFFIX.match(slug)
    if match and pool.lower().replace("_", "-") == slug:
        head, digest = match["head"], match["digest"]
    else:
        head, digest = slug, hashlib.sha1(pool.encode()).hexdigest()[:8]
    name = f"{_PREFIX}{head}-{digest}" if head else f"{_PREFIX}{digest}"
    if len(name) > _MAX_NAME:
        head = head[: _MAX_NAME - len(_PREFIX) - len(digest) - 1].rstrip("-")
        name = f"{_PREFIX}{head}-{digest}"
    assert _DNS_LABEL.match(name) and len(name) <= _MAX_NAME, name
    return name


@dataclass(frozen=True)
class _Seen:
    """What the latest listing said about one pool's Deployment."""

    deployment: str
    spec: int
    current: int  # non-terminating pods
    terminating: int


class KubernetesBackend:
    """Scale one Deployment per pool (``deployment_name(pool)``) in one namespace.

    Connection, first match wins: ``configuration`` (a ready ``kubernetes.client.Configuration``),
    ``api_server`` (a URL, no auth: tests and ``kubectl proxy``), ``kubeconfig`` (a file), the
    in-cluster service account, else the client's default kubeconfig (``$KUBECONFIG`` or
    ``~/.kube/config``); ``context`` picks a kubeconfig context other than the current one.

    The client is synchronous, so every call runs in a worker thread. ``scale`` skips the API
    when the replica count it last saw or set already matches, so a 2 Hz control loop costs one
    list per tick and one patch per actual change.
    """

    places_replicas = False

    def __init__(
        self,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        configuration: k8s.Configuration | None = None,
        api_server: str | None = None,
        kubeconfig: str | Path | None = None,
        context: str | None = None,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self._configuration = configuration
        self._api_server = api_server
        self._kubeconfig = kubeconfig
        self._context = context
        self._timeout = request_timeout_s
        self._api_client: k8s.ApiClient | None = None
        self._apps: k8s.AppsV1Api | None = None
        self._seen: dict[str, _Seen] = {}  # pool -> latest listing
        self._spec: dict[str, int] = {}  # pool -> spec.replicas last seen or set

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        configuration = await asyncio.to_thread(self._load_configuration)
        self._api_client = k8s.ApiClient(configuration)
        self._apps = k8s.AppsV1Api(self._api_client)
        await self._list()  # fail early on a wrong address or missing RBAC

    def _load_configuration(self) -> k8s.Configuration:
        if self._configuration is not None:
            return self._configuration
        configuration = k8s.Configuration()
        if self._api_server is not None:
            configuration.host = self._api_server.rstrip("/")
            return configuration
        if self._kubeconfig is None:
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
                log.info("kubernetes: in-cluster service account")
                return configuration
            except ConfigException:
                pass  # not in a pod
        try:
            k8s_config.load_kube_config(
                config_file=str(self._kubeconfig) if self._kubeconfig is not None else None,
                context=self._context,
                client_configuration=configuration,
            )
        except (ConfigException, OSError) as e:
            raise ConfigException(
                f"no Kubernetes API to talk to: not running in a pod and no usable kubeconfig "
                f"({e}); set KUBECONFIG, or give KubernetesBackend kubeconfig= or api_server="
            ) from e
        log.info("kubernetes: kubeconfig, API server %s", configuration.host)
        return configuration

    async def close(self, *, stop_replicas: bool) -> None:
        """Release the client; with ``stop_replicas`` scale every managed Deployment to 0
        (the pods then drain on SIGTERM within their grace period)."""
        if self._apps is None:
            return
        try:
            if stop_replicas:
                await self._list()
                for pool, seen in sorted(self._seen.items()):
                    if seen.spec != 0:
                        await self._patch_replicas(seen.deployment, 0)
                        self._spec[pool] = 0
        finally:
            api_client, self._api_client, self._apps = self._api_client, None, None
            if api_client is not None:
                await asyncio.to_thread(api_client.close)

    # --- reads -------------------------------------------------------------------------------

    async def replicas(self) -> dict[str, list[ReplicaInfo]]:
        """Per pool, one entry per pod the Deployment counts: ``spec.replicas`` running, the
        rest ``stopping``. Pods are not listed (that needs more RBAC and API traffic); the ids
        are ``<deployment>/<i>`` and only the counts are meaningful.

        Surplus pods show up two ways: ``status.replicas`` above ``spec.replicas`` until the
        controller has marked them, and ``status.terminatingReplicas`` (Kubernetes >= 1.33)
        while they drain. ``status.replicas`` falls back to the spec when the Deployment has not
        been observed yet (the API server omits it at 0)."""
        await self._list()
        found: dict[str, list[ReplicaInfo]] = {}
        for pool, seen in self._seen.items():
            running = min(seen.spec, seen.current)
            stopping = max(seen.current - seen.spec, 0) + seen.terminating
            found[pool] = [
                ReplicaInfo(
                    id=f"{seen.deployment}/{i}",
                    pool=pool,
                    device="",
                    state="running" if i < running else "stopping",
                )
                for i in range(running + stopping)
            ]
        return found

    async def _list(self) -> None:
        apps = self._require_started()
        listing = await asyncio.to_thread(
            apps.list_namespaced_deployment,
            self.namespace,
            label_selector=NODE_SELECTOR,
            _request_timeout=self._timeout,
        )
        seen: dict[str, _Seen] = {}
        for item in listing.items:
            if item.metadata is None or item.metadata.name is None:
                continue  # the API server names every object it lists
            pool = _pool_of(item)
            name = item.metadata.name
            if pool is None:
                log.warning("kubernetes: Deployment %s has no %s annotation", name, POOL_KEY)
                continue
            spec = item.spec.replicas if item.spec and item.spec.replicas is not None else 1
            status = item.status
            if status is None or (status.replicas is None and status.observed_generation is None):
                current = spec  # not reconciled yet: nothing better to report
            else:
                current = status.replicas or 0
            terminating = (getattr(status, "terminating_replicas", None) or 0) if status else 0
            seen[pool] = _Seen(name, spec, current, terminating)
        self._seen = seen
        # the listing is fresher than what we set: someone may have scaled by hand
        self._spec = {pool: s.spec for pool, s in seen.items()}

    # --- writes ------------------------------------------------------------------------------

    async def scale(self, launch: PoolLaunch, devices: list[str]) -> None:
        """Set the pool's Deployment to ``len(devices)`` replicas (the devices themselves are
        ignored: Kubernetes places pods). Kubernetes drains the surplus pods with SIGTERM."""
        want = len(devices)
        if self._spec.get(launch.pool) == want:
            return
        seen = self._seen.get(launch.pool)
        name = seen.deployment if seen else deployment_name(launch.pool)
        apps = self._require_started()
        try:
            current = await asyncio.to_thread(
                apps.read_namespaced_deployment_scale,
                name,
                self.namespace,
                _request_timeout=self._timeout,
            )
        except ApiException as e:
            if e.status == 404:
                raise DeploymentMissingError(
                    f"pool {launch.pool} ({launch.kind} --model {launch.model}): no Deployment "
                    f"{name!r} in namespace {self.namespace!r}; the autoscaler does not create "
                    "Deployments: apply the manifests (kubectl apply -f deploy/kubernetes/, "
                    "regenerated with deploy/kubernetes/generate.py for new pools)"
                ) from e
            raise
        if (current.spec.replicas if current.spec else None) != want:
            await self._patch_replicas(name, want)
        self._spec[launch.pool] = want

    async def _patch_replicas(self, name: str, replicas: int) -> None:
        apps = self._require_started()
        log.info("kubernetes: scale %s/%s to %d", self.namespace, name, replicas)
        await asyncio.to_thread(
            apps.patch_namespaced_deployment_scale,
            name,
            self.namespace,
            {"spec": {"replicas": replicas}},
            field_manager=FIELD_MANAGER,
            # explicit: client versions differ in the patch type they pick for a dict body
            _content_type="application/merge-patch+json",
            _request_timeout=self._timeout,
        )

    def _require_started(self) -> k8s.AppsV1Api:
        if self._apps is None:
            raise RuntimeError("KubernetesBackend: call start() first (or it was closed)")
        return self._apps


def _pool_of(item: Any) -> str | None:
    meta = item.metadata
    return (meta.annotations or {}).get(POOL_KEY) or (meta.labels or {}).get(POOL_KEY)
