"""The Kubernetes backend against the stand-in API server (tests/kubeapi.py), and what the
shipped manifests in deploy/kubernetes/ promise it: one Deployment per pool, RBAC for scaling
only. Every manifest's schema and cross-references: tests/test_deploy.py."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from autoscaler.backends import Backend, PoolLaunch
from autoscaler.backends.kubernetes import (
    NODE_SELECTOR,
    DeploymentMissingError,
    KubernetesBackend,
    deployment_name,
)
from common.settings import Settings
from common.subjects import pool_name
from common.workflow import builtin_workflows
from tests.kubeapi import DEPLOY_DIR, KubeApi, load_manifests, running
from tests.manifests import generator as _generator
from tests.manifests import to_model as _deserialize

NS = "legodiffusion"


#: what the manifests serve: the shipped workflows of the default base model's family
SHIPPED = builtin_workflows({"base": "builtin:tiny-sd"})


def _shipped_pools() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for spec in SHIPPED.values():
        found.update(spec.pools())
    return found


POOLS = _shipped_pools()
DENOISER = next(p for p, (kind, _) in POOLS.items() if kind == "denoiser")
DENOISER_LAUNCH = PoolLaunch(DENOISER, *POOLS[DENOISER])
DENOISER_DEPLOYMENT = deployment_name(DENOISER)
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{DENOISER_DEPLOYMENT}/scale"


@pytest.fixture
def kubeapi() -> Iterator[KubeApi]:
    yield from running()


@pytest.fixture
async def backend(kubeapi: KubeApi) -> AsyncIterator[KubernetesBackend]:
    kubeapi.load()  # everything in deploy/kubernetes/, the autoscaler's own Deployment included
    backend = KubernetesBackend(NS, api_server=kubeapi.url)
    await backend.start()
    yield backend
    await backend.close(stop_replicas=False)


def _scale_writes(kubeapi: KubeApi) -> list[tuple[str, str, Any]]:
    return [(r.path, r.content_type, r.body) for r in kubeapi.writes()]


def _states(infos: list[Any]) -> list[str]:
    return [i.state for i in infos]


# --- names -----------------------------------------------------------------------------------

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_deployment_names_are_dns_labels_that_keep_the_hash() -> None:
    assert deployment_name("denoiser-tiny-sd-1a2b3c4d") == "lego-denoiser-tiny-sd-1a2b3c4d"
    assert deployment_name("text_encoder-sd15-1a2b3c4d") == "lego-text-encoder-sd15-1a2b3c4d"
    assert deployment_name("monolithic-txt2img-0f9e8d7c") == "lego-monolithic-txt2img-0f9e8d7c"
    longest = pool_name("safety_checker", "/models/" + "x" * 80)
    name = deployment_name(longest)
    assert len(name) == 63 and name.endswith(longest[-9:]) and DNS_LABEL.match(name)
    # two long model names sharing their first 40 characters stay apart
    other = pool_name("safety_checker", "/models/" + "x" * 81)
    assert deployment_name(other) != name
    # a pool name not in the usual shape still gets a valid, distinct name
    odd = [deployment_name(p) for p in ("Weird__Pool", "weird--pool", "_", "a" * 200)]
    assert len(set(odd)) == 4 and all(DNS_LABEL.match(n) and len(n) <= 63 for n in odd)
    assert deployment_name("a" * 200) == deployment_name("a" * 200)


# --- manifests, offline ----------------------------------------------------------------------

def test_every_shipped_pool_has_its_deployment() -> None:
    deployments = {
        d["metadata"]["name"]: _deserialize(d)
        for d in load_manifests([DEPLOY_DIR / "nodes.yaml"])
    }
    assert set(deployments) == {deployment_name(p) for p in POOLS}
    grace_floor = Settings().drain_timeout_s
    for pool, (kind, model) in POOLS.items():
        dep: k8s.V1Deployment = deployments[deployment_name(pool)]
        labels = dep.metadata.labels
        assert labels["app.kubernetes.io/component"] == "node"
        assert labels["legodiffusion.io/pool"] == pool
        assert dep.metadata.annotations["legodiffusion.io/pool"] == pool
        assert dep.spec.replicas is None  # owned by the autoscaler, not reset by kubectl apply
        # the selector picks this Deployment's pods only, and they carry its labels
        match = dep.spec.selector.match_labels
        assert match and match.items() <= dep.spec.template.metadata.labels.items()
        assert match["app.kubernetes.io/instance"] == dep.metadata.name
        pod = dep.spec.template.spec
        assert pod.termination_grace_period_seconds > grace_floor
        (container,) = pod.containers
        assert container.command == ["lego", "node", kind, "--model", model]
        assert container.image == "legodiffusion:latest"
        assert container.readiness_probe is None
        # settings from the shared ConfigMap (NATS_URL, REDIS_URL, ...: tests/test_deploy.py),
        # passwords from the Secret
        assert [ref.config_map_ref.name for ref in container.env_from] == [
            "legodiffusion-settings"
        ]
        secrets = {e.name: e.value_from.secret_key_ref.key for e in container.env}
        assert secrets == {"LEGO_NATS_PASSWORD": "nats-service-password",
                           "LEGO_REDIS_PASSWORD": "redis-password"}
        assert container.resources.requests and container.resources.limits


def test_generator_follows_the_models_given() -> None:
    text = _generator().render({"base": "/models/sd15"})
    docs = list(yaml.safe_load_all(text))
    commands = {tuple(d["spec"]["template"]["spec"]["containers"][0]["command"]) for d in docs}
    assert ("lego", "node", "denoiser", "--model", "/models/sd15") in commands
    assert deployment_name(pool_name("denoiser", "/models/sd15")) in {
        d["metadata"]["name"] for d in docs
    }


def test_generator_writes_the_monolithic_baseline() -> None:
    docs = list(yaml.safe_load_all(_generator().render(monolithic=True)))
    flows = SHIPPED
    assert {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["command"]
            for d in docs} == {
        deployment_name(spec.monolithic_pool()): ["lego", "node", "monolithic", "--model", name]
        for name, spec in flows.items()
    }


def test_autoscaler_may_scale_and_nothing_more() -> None:
    docs = {d["kind"]: d for d in load_manifests([DEPLOY_DIR / "autoscaler.yaml"])}
    role: k8s.V1Role = _deserialize(docs["Role"])
    granted = {
        (resource, verb)
        for rule in role.rules
        if rule.api_groups == ["apps"]
        for resource in rule.resources
        for verb in rule.verbs
    }
    assert granted == {
        ("deployments", "get"), ("deployments", "list"), ("deployments", "watch"),
        ("deployments/scale", "get"), ("deployments/scale", "update"),
        ("deployments/scale", "patch"),
    }
    binding: k8s.V1RoleBinding = _deserialize(docs["RoleBinding"])
    account = docs["ServiceAccount"]["metadata"]["name"]
    assert binding.role_ref.name == role.metadata.name
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", account)]
    dep: k8s.V1Deployment = _deserialize(docs["Deployment"])
    assert dep.spec.template.spec.service_account_name == account
    assert dep.spec.template.spec.containers[0].command == [
        "lego", "autoscaler", "--backend", "kubernetes", "--namespace", NS,
    ]
    # not a node pool: the backend's selector must not pick it up
    assert dep.metadata.labels["app.kubernetes.io/component"] != "node"


# --- the backend against the stand-in --------------------------------------------------------

async def test_discovers_the_node_deployments_of_the_manifests(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    protocol: Backend = backend  # structural: checked by a type checker, not at run time
    assert protocol.places_replicas is False
    found = await backend.replicas()
    assert set(found) == set(POOLS)  # the autoscaler's own Deployment is not a pool
    for pool, infos in found.items():
        name = deployment_name(pool)
        assert [(i.id, i.pool, i.device, i.state) for i in infos] == [
            (f"{name}/0", pool, "", "running")
        ]
    lists = [r for r in kubeapi.requests if r.method == "GET" and r.path.endswith("/deployments")]
    assert lists and all(r.query["labelSelector"] == NODE_SELECTOR for r in lists)
    assert lists[0].path == f"/apis/apps/v1/namespaces/{NS}/deployments"
    assert kubeapi.writes() == []


async def test_scale_up_and_down_patches_the_scale_subresource(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    await backend.scale(DENOISER_LAUNCH, ["", "", ""])
    await backend.scale(DENOISER_LAUNCH, ["cuda:0"])
    merge = "application/merge-patch+json"
    assert _scale_writes(kubeapi) == [
        (SCALE_PATH, merge, {"spec": {"replicas": 3}}),
        (SCALE_PATH, merge, {"spec": {"replicas": 1}}),
    ]
    assert all(r.query.get("fieldManager") == "lego-autoscaler" for r in kubeapi.writes())
    assert kubeapi.deployment(DENOISER_DEPLOYMENT)["spec"]["replicas"] == 1
    await backend.scale(DENOISER_LAUNCH, [])
    assert kubeapi.deployment(DENOISER_DEPLOYMENT)["spec"]["replicas"] == 0
    assert (await backend.replicas())[DENOISER] == []  # status.replicas omitted at 0


async def test_no_patch_when_the_count_is_unchanged(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    await backend.replicas()
    before = len(kubeapi.requests)
    for _ in range(5):  # a few control-loop ticks wanting what already runs
        await backend.scale(DENOISER_LAUNCH, [""])
    assert len(kubeapi.requests) == before  # not even a read
    await backend.scale(DENOISER_LAUNCH, ["", ""])
    for _ in range(3):
        await backend.scale(DENOISER_LAUNCH, ["", ""])
        await backend.replicas()
    assert len(kubeapi.writes()) == 1


async def test_a_hand_made_change_is_corrected_on_the_next_tick(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    await backend.scale(DENOISER_LAUNCH, ["", ""])
    kubeapi.set_replicas(DENOISER_DEPLOYMENT, 5)  # kubectl scale
    found = await backend.replicas()
    assert _states(found[DENOISER]) == ["running"] * 5
    await backend.scale(DENOISER_LAUNCH, ["", ""])
    assert [w[2] for w in _scale_writes(kubeapi)] == [
        {"spec": {"replicas": 2}}, {"spec": {"replicas": 2}},
    ]


async def test_replicas_follow_the_status_and_mark_the_surplus_stopping(kubeapi: KubeApi) -> None:
    kubeapi.follow = False  # pods take their time to start and to terminate
    kubeapi.load()
    backend = KubernetesBackend(NS, api_server=kubeapi.url)
    await backend.start()
    try:
        await backend.scale(DENOISER_LAUNCH, ["", "", ""])
        assert _states((await backend.replicas())[DENOISER]) == ["running"]  # 1 pod so far
        kubeapi.settle()
        assert _states((await backend.replicas())[DENOISER]) == ["running"] * 3
        await backend.scale(DENOISER_LAUNCH, [""])
        infos = (await backend.replicas())[DENOISER]
        assert [(i.id, i.state) for i in infos] == [
            (f"{DENOISER_DEPLOYMENT}/0", "running"),
            (f"{DENOISER_DEPLOYMENT}/1", "stopping"),
            (f"{DENOISER_DEPLOYMENT}/2", "stopping"),
        ]
        # newer clusters drop terminating pods from status.replicas and count them apart
        kubeapi.set_status(DENOISER_DEPLOYMENT, replicas=1, terminatingReplicas=2)
        assert _states((await backend.replicas())[DENOISER]) == ["running"] + ["stopping"] * 2
        kubeapi.settle()
        assert _states((await backend.replicas())[DENOISER]) == ["running"]
    finally:
        await backend.close(stop_replicas=False)


async def test_unknown_pool_names_the_deployment_and_the_manifests(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    pool = pool_name("denoiser", "/models/not-deployed")
    with pytest.raises(DeploymentMissingError) as caught:
        await backend.scale(PoolLaunch(pool, "denoiser", "/models/not-deployed"), [""])
    message = str(caught.value)
    assert deployment_name(pool) in message and NS in message
    assert "deploy/kubernetes" in message and "apply" in message
    assert kubeapi.writes() == []  # nothing created


async def test_close_with_stop_replicas_scales_every_pool_to_zero(
    backend: KubernetesBackend, kubeapi: KubeApi
) -> None:
    await backend.scale(DENOISER_LAUNCH, ["", ""])
    await backend.close(stop_replicas=True)
    paths = {w[0] for w in _scale_writes(kubeapi)[1:]}
    assert paths == {
        f"/apis/apps/v1/namespaces/{NS}/deployments/{deployment_name(p)}/scale" for p in POOLS
    }
    assert all(w[2] == {"spec": {"replicas": 0}} for w in _scale_writes(kubeapi)[1:])
    for pool in POOLS:
        assert kubeapi.deployment(deployment_name(pool))["spec"]["replicas"] == 0
    assert kubeapi.deployment("lego-autoscaler")["spec"]["replicas"] == 1
    with pytest.raises(RuntimeError, match="start"):
        await backend.replicas()
    await backend.close(stop_replicas=True)  # closing twice is harmless


async def test_close_without_stop_leaves_replicas_alone(kubeapi: KubeApi) -> None:
    kubeapi.load()
    backend = KubernetesBackend(NS, configuration=k8s.Configuration(host=kubeapi.url))
    await backend.start()
    await backend.close(stop_replicas=False)
    assert kubeapi.writes() == []


async def test_falls_back_to_the_kubeconfig(
    kubeapi: KubeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeapi.load()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "stand-in", "cluster": {"server": kubeapi.url}}],
        "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "test", "context": {"cluster": "stand-in", "user": "tester"}}],
        "current-context": "test",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    backend = KubernetesBackend(NS, kubeconfig=tmp_path / "kubeconfig", context="test")
    await backend.start()
    try:
        assert set(await backend.replicas()) == set(POOLS)
    finally:
        await backend.close(stop_replicas=False)


# --- the stand-in itself, through the official client ----------------------------------------

def test_stand_in_speaks_the_client_dialects(kubeapi: KubeApi) -> None:
    kubeapi.load()
    with k8s.ApiClient(k8s.Configuration(host=kubeapi.url)) as api_client:
        _speak_the_client_dialects(k8s.AppsV1Api(api_client), kubeapi)


def _speak_the_client_dialects(apps: k8s.AppsV1Api, kubeapi: KubeApi) -> None:
    scale = apps.read_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS)
    assert (scale.spec.replicas, scale.status.replicas) == (1, 1)
    assert scale.status.selector == f"app.kubernetes.io/instance={DENOISER_DEPLOYMENT}"
    # a list body goes out as a JSON patch, a dict as a strategic merge patch
    ops = [{"op": "replace", "path": "/spec/replicas", "value": 4}]
    assert apps.patch_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS, ops).spec.replicas == 4
    apps.patch_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS, {"spec": {"replicas": 2}})
    assert [r.content_type for r in kubeapi.writes()] == [
        "application/json-patch+json", "application/strategic-merge-patch+json",
    ]
    current = apps.read_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS)
    current.spec.replicas = 3
    replaced = apps.replace_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS, current)
    assert replaced.spec.replicas == 3
    with pytest.raises(ApiException) as conflict:  # a stale resourceVersion
        apps.replace_namespaced_deployment_scale(DENOISER_DEPLOYMENT, NS, current)
    assert conflict.value.status == 409
    dep = apps.read_namespaced_deployment(DENOISER_DEPLOYMENT, NS)
    assert dep.spec.replicas == 3 and dep.status.replicas == 3
    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_deployment_scale("lego-nope", NS)
    assert missing.value.status == 404
    status = json.loads(missing.value.body)
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "NotFound", 404)
    assert status["message"] == 'deployments.apps "lego-nope" not found'
    selected = apps.list_namespaced_deployment(
        NS, label_selector="app.kubernetes.io/component!=node"
    )
    # (Redis is a StatefulSet: its data lives on a volume claim)
    assert sorted(d.metadata.name for d in selected.items) == [
        "lego-autoscaler", "lego-gateway",
    ]
    assert apps.list_namespaced_deployment("elsewhere").items == []
