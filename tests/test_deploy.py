"""deploy/, offline: every Kubernetes manifest against the Kubernetes schemas (the client's
models; KEDA's ScaledObject against a JSON Schema of the CRD fields we use) and against each
other (every name a manifest refers to exists), the generated files up to date, the NATS
configurations accepted by the real nats-server, compose.yaml and the Dockerfile consistent with
the `lego` command line and the settings. Nothing here talks to a cluster or a Docker daemon
(except `docker compose config`, where it exists)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import AliasChoices

from autoscaler.backends.hosts import host_processes
from autoscaler.backends.kubernetes import deployment_name
from common import subjects
from common.settings import Settings
from common.workflow import builtin_workflows, shipped_workflows
from lego.cli import build_parser
from lego.stack import nats_server_binary
from tests.kubeapi import load_manifests
from tests.manifests import BUILTIN_KINDS, from_json, generator, to_model

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
NS = "legodiffusion"
IMAGE = "legodiffusion:latest"
#: variables a lego container may set that are not settings
NOT_SETTINGS = {"OMP_NUM_THREADS", "HF_HUB_OFFLINE", "LEGO_CONFIG",
                "POD_NAME"}  # a host pod's name (downward API) for `lego host --name`

# `kubectl apply -f deploy/kubernetes/` applies these (no recursion); keda/ is the alternative
# to autoscaler.yaml, secrets/ an example that must never be applied as it is
APPLIED = sorted(KUBE.glob("*.yaml"))
KEDA = KUBE / "keda" / "scaledobjects.yaml"
SECRET_EXAMPLE = KUBE / "secrets" / "credentials.example.yaml"
# device hosts, one pod per GPU: applied with the rest instead of nodes.yaml
HOSTS = KUBE / "hosts" / "hosts.yaml"
EVERY_MANIFEST = sorted(KUBE.rglob("*.yaml"))
#: what a cluster runs: one Deployment per pool, or device hosts
MODES = {"nodes": APPLIED, "hosts": [p for p in APPLIED if p.name != "nodes.yaml"] + [HOSTS]}


def _settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(a for a in alias.choices if isinstance(a, str))
        else:
            names.add(f"LEGO_{name.upper()}")
    return names


SETTINGS_ENV = _settings_env_names()


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process started with exactly ``env`` would read (types validated)."""
    for name in SETTINGS_ENV | {"LEGO_CONFIG"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _lego_args(argv: list[str]) -> Any:
    """``argv`` (a container's command) parsed by the real `lego` parser."""
    assert argv[0] == "lego", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is not a valid lego command line")


# --- Kubernetes: schemas -----------------------------------------------------------------------

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
#: KEDA's ScaledObject (keda.sh/v1alpha1), the fields we use and their neighbours, after the CRD
#: and https://keda.sh/docs/latest/reference/scaledobject-spec/ ; unknown fields are rejected.
#: ``metadata`` and the HPA ``behavior`` are checked with the client's models instead.
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string", "minLength": 1},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT32, "replicas": _INT32},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {"type": "object"},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": _STRINGS,  # KEDA's metadata values are all strings
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"},
                                               "kind": {"type": "string"}},
                            },
                        },
                        # the nats-jetstream scaler's parameters
                        # (https://keda.sh/docs/latest/scalers/nats-jetstream/)
                        "if": {"properties": {"type": {"const": "nats-jetstream"}}},
                        "then": {
                            "properties": {
                                "metadata": {
                                    "type": "object",
                                    "required": ["natsServerMonitoringEndpoint", "account",
                                                 "stream", "consumer"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "natsServerMonitoringEndpoint": {"type": "string"},
                                        "account": {"type": "string"},
                                        "stream": {"type": "string"},
                                        "consumer": {"type": "string"},
                                        "lagThreshold": {"pattern": "^[1-9][0-9]*$"},
                                        "activationLagThreshold": {"pattern": "^[0-9]+$"},
                                        "useHttps": {"enum": ["true", "false"]},
                                    },
                                }
                            }
                        },
                    },
                },
            },
        },
    },
}


def _validate_scaled_object(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, SCALED_OBJECT_SCHEMA)
    from_json(doc["metadata"], "V1ObjectMeta")
    hpa = doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
    if "behavior" in hpa:  # KEDA embeds autoscaling/v2's HorizontalPodAutoscalerBehavior
        from_json(hpa["behavior"], "V2HorizontalPodAutoscalerBehavior")


@pytest.mark.parametrize("path", EVERY_MANIFEST, ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    docs = load_manifests([path])
    assert docs, f"{path.name} has no documents"
    for doc in docs:
        if doc.get("kind") == "ScaledObject":
            _validate_scaled_object(doc)
        else:
            to_model(doc)  # unknown kinds fail here too
        meta = doc["metadata"]
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == NS, f"{path.name}: {doc['kind']} {meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "legodiffusion"


def test_the_validation_rejects_what_a_cluster_would() -> None:
    """The checks above catch a misspelt field, a wrong type and a missing required field."""
    (_, _, statefulset) = load_manifests([KUBE / "nats.yaml"])
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    for broken in ({"readinessProbe": {"httpGet": {"path": "/", "port": 8222, "prot": 1}}},
                   {"ports": [{"containerPort": "4222"}]}, {"name": None}):
        with pytest.raises(AssertionError):
            to_model({**statefulset, "spec": {**statefulset["spec"], "template": {
                "metadata": statefulset["spec"]["template"]["metadata"],
                "spec": {**statefulset["spec"]["template"]["spec"],
                         "containers": [{**container, **broken}]},
            }}})
    scaled = load_manifests([KEDA])[0]
    for broken_spec in ({"minReplicas": 1}, {"pollingInterval": "5"}, {"triggers": []}):
        with pytest.raises(jsonschema.ValidationError):
            _validate_scaled_object({**scaled, "spec": {**scaled["spec"], **broken_spec}})
    trigger = scaled["spec"]["triggers"][0]
    for metadata in ({**trigger["metadata"], "streamName": "x"},
                     {k: v for k, v in trigger["metadata"].items() if k != "consumer"}):
        with pytest.raises(jsonschema.ValidationError):
            _validate_scaled_object({**scaled, "spec": {**scaled["spec"], "triggers": [
                {**trigger, "metadata": metadata}]}})
    with pytest.raises(AssertionError):  # KEDA's HPA behavior, checked by the client's model
        _validate_scaled_object({**scaled, "spec": {**scaled["spec"], "advanced": {
            "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"window": 3}}}}}})


def test_the_shipped_files() -> None:
    assert {p.name for p in APPLIED} == {
        "namespace.yaml", "settings.yaml", "nats-config.yaml", "nats.yaml", "redis.yaml",
        "gateway.yaml", "autoscaler.yaml", "nodes.yaml",
    }
    assert set(EVERY_MANIFEST) == {*APPLIED, KEDA, SECRET_EXAMPLE, HOSTS}
    (namespace,) = load_manifests([KUBE / "namespace.yaml"])
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == NS


def test_generated_files_are_up_to_date() -> None:
    module = generator()
    assert set(module.GENERATED) == {"nodes.yaml", "keda/scaledobjects.yaml", "nats-config.yaml",
                                     "hosts/hosts.yaml"}
    for name, render in module.GENERATED.items():
        assert (KUBE / name).read_text() == render(), (
            f"deploy/kubernetes/{name} is stale: python deploy/kubernetes/generate.py --write"
        )
    # the NATS cluster runs with exactly the users of deploy/nats-accounts.conf
    (config_map,) = load_manifests([KUBE / "nats-config.yaml"])
    assert config_map["data"]["nats-accounts.conf"] == (DEPLOY / "nats-accounts.conf").read_text()


# --- Kubernetes: the manifests against each other ---------------------------------------------

def _applied(mode: str = "nodes") -> list[dict[str, Any]]:
    return load_manifests(MODES[mode])


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def _secret_keys() -> dict[str, dict[str, str]]:
    """Secret -> its keys and (example) values."""
    return {name: doc["stringData"]
            for name, doc in _by_kind(load_manifests([SECRET_EXAMPLE]), "Secret").items()}


def _env_values(container: dict[str, Any], pod: str = "pod-0") -> dict[str, str]:
    """A container's env, with the example Secret's values where it reads a Secret and
    ``pod`` where it reads its pod's name."""
    secrets = _secret_keys()
    values = {}
    for env in container.get("env", []):
        source = env.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            values[env["name"]] = secrets[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", env
            values[env["name"]] = pod
        else:
            values[env["name"]] = env["value"]
    return values


def _command(container: dict[str, Any], pod: str = "pod-0") -> list[str]:
    """The container's command as Kubernetes runs it: ``$(VAR)`` replaced by its env."""
    env = _env_values(container, pod)
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in container["command"]]


def _env_from(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What the container's envFrom ConfigMaps give it (later ones win, as in Kubernetes); an
    optional one that is not applied gives nothing."""
    config_maps = _by_kind(docs, "ConfigMap")
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        found = config_maps.get(source["configMapRef"]["name"])
        assert found or source["configMapRef"].get("optional"), source
        values.update(found["data"] if found else {})
    return values


def test_names_are_unique() -> None:
    seen = [(d["kind"], d["metadata"]["name"]) for d in load_manifests(EVERY_MANIFEST)]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("mode", MODES)
def test_every_reference_resolves(mode: str) -> None:
    """ConfigMaps, Secrets and their keys, volumes, service accounts, Service selectors and
    their named target ports: what only a real cluster would otherwise report, at run time.
    An optional ConfigMap (the device hosts' settings) must exist in some mode."""
    docs = _applied(mode)
    config_maps = _by_kind(docs, "ConfigMap")
    secrets = _secret_keys()
    accounts = _by_kind(docs, "ServiceAccount")
    for workload in _workloads(docs):
        name = f"{workload['kind']} {workload['metadata']['name']}"
        spec = workload["spec"]
        pod = spec["template"]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
            "labels"].items(), name
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in accounts, name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        volumes.update({c["metadata"]["name"]: c for c in spec.get("volumeClaimTemplates", [])})
        for volume in volumes.values():
            if "configMap" in volume:
                data = config_maps[volume["configMap"]["name"]]["data"]
                assert all(i["key"] in data for i in volume["configMap"].get("items", []))
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                ref = source["configMapRef"]
                assert ref["name"] in config_maps or (ref.get("optional") and any(
                    ref["name"] in _by_kind(_applied(m), "ConfigMap") for m in MODES)), name
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], f"{name}: {env['name']}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: {mount['name']}"
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str):
                    assert port in {p["name"] for p in container["ports"]}, f"{name}: {probe}"
    for service in _by_kind(docs, "Service").values():
        selector = service["spec"]["selector"]
        selected = [w for w in _workloads(docs)
                    if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pods"
        ports = {p["name"]: p["containerPort"]
                 for w in selected for c in _containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]
            assert ports[port["targetPort"]] == port["port"]  # one number per port, everywhere


def _lego_containers(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for workload in _workloads(docs):
        for container in _containers(workload):
            if container["image"].startswith("legodiffusion:"):
                yield workload["metadata"]["name"], container


@pytest.mark.parametrize("mode", MODES)
def test_lego_containers_run_real_commands_with_real_settings(
    mode: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = _applied(mode)
    for config_map in _by_kind(docs, "ConfigMap").values():
        if config_map["metadata"]["name"].startswith("legodiffusion-"):
            assert set(config_map["data"]) <= SETTINGS_ENV | NOT_SETTINGS
    services = _by_kind(docs, "Service")
    pod_users = {generator().POD_SECURITY["runAsUser"]}
    names = set()
    for name, container in _lego_containers(docs):
        names.add(name)
        _lego_args(_command(container))
        env = {e["name"] for e in container.get("env", [])}
        assert env <= SETTINGS_ENV | NOT_SETTINGS, f"{name}: {env - SETTINGS_ENV}"
        assert container["envFrom"][0]["configMapRef"]["name"] == "legodiffusion-settings"
        settings = _settings_from({**_env_from(docs, container), **_env_values(container)},
                                  monkeypatch)
        assert settings.nats_user == "service"
        assert settings.nats_password == _secret_keys()["legodiffusion-credentials"][
            "nats-service-password"]
        for url, port in ((settings.nats_url, 4222), (settings.redis_url, 6379)):
            host = urlsplit(url).hostname
            assert host in services and port in [p["port"] for p in services[host]["spec"]["ports"]]
        pod_users.add(next(w for w in _workloads(docs) if w["metadata"]["name"] == name)[
            "spec"]["template"]["spec"]["securityContext"]["runAsUser"])
    assert {"lego-gateway", "lego-autoscaler"} <= names
    nodes = {n for n in names if n not in ("lego-gateway", "lego-autoscaler")}
    assert nodes == ({"lego-hosts"} if mode == "hosts" else
                     {d["metadata"]["name"] for d in load_manifests([KUBE / "nodes.yaml"])})
    assert pod_users == {10001}  # the image's user (deploy/Dockerfile)
    gateway = dict(_lego_containers([_by_kind(docs, "Deployment")["lego-gateway"]]))
    args = _lego_args(gateway["lego-gateway"]["command"])
    assert args.command == "gateway" and args.seed_builtin and args.port == 8000


def test_device_hosts_are_one_pod_per_gpu_that_the_autoscaler_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hosts/hosts.yaml: `lego host` on the pod's one GPU under its pod name, and the
    autoscaler, reading the hosts' ConfigMap, writes residency for exactly those pods."""
    docs = _applied("hosts")
    hosts = _by_kind(docs, "StatefulSet")["lego-hosts"]
    gpus = hosts["spec"]["replicas"]
    pods = [f"lego-hosts-{i}" for i in range(gpus)]  # a StatefulSet's pod names
    assert gpus >= 1 and hosts["spec"]["podManagementPolicy"] == "Parallel"
    pod = hosts["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > Settings().drain_timeout_s
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name in pods:
        args = _lego_args(_command(container, pod=name))
        assert (args.command, args.device, args.name) == ("host", "cuda:0", name)
        assert subjects.host_key(name) == name  # the pod name is its residency key as is

    (autoscaler,) = _containers(_by_kind(docs, "Deployment")["lego-autoscaler"])
    args = _lego_args(_command(autoscaler))
    settings = _settings_from({**_env_from(docs, autoscaler), **_env_values(autoscaler)},
                              monkeypatch)
    assert args.command == "autoscaler" and host_processes(settings, args.backend)
    assert settings.devices == pods and settings.device_memory_bytes
    # the generator keeps the two in step for any number of GPUs
    module = generator()
    eight = [d for d in yaml.safe_load_all(module.render_hosts(gpus=8)) if d]
    config, statefulset = eight
    assert json.loads(config["data"]["LEGO_DEVICES"]) == [f"lego-hosts-{i}" for i in range(8)]
    assert statefulset["spec"]["replicas"] == 8
    # without the hosts' ConfigMap (one Deployment per pool) it scales Deployments as before
    settings = _settings_from({**_env_from(_applied(), autoscaler), **_env_values(autoscaler)},
                              monkeypatch)
    assert not host_processes(settings, args.backend)


def test_nats_is_a_three_node_jetstream_cluster(tmp_path: Path) -> None:
    docs = load_manifests([KUBE / "nats.yaml", KUBE / "nats-config.yaml"])
    nats = _by_kind(docs, "StatefulSet")["nats"]
    spec = nats["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    headless = _by_kind(docs, "Service")[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    (container,) = _containers(nats)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = _by_kind(docs, "ConfigMap")["nats-config"]["data"]
    conf = config["nats.conf"]
    routes = re.findall(r"nats://(\S+):(\d+)", conf)
    assert routes == [(f"nats-{i}.{spec['serviceName']}", str(ports["cluster"]))
                      for i in range(spec["replicas"])]
    assert f"http: 0.0.0.0:{ports['monitor']}" in conf
    assert f"listen: 0.0.0.0:{ports['client']}" in conf
    # JetStream stores on the pod's claim
    store_dir = re.search(r"store_dir: (\S+)", conf).group(1)
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert store_dir.startswith(mounts[claim["metadata"]["name"]] + "/")
    assert container["command"][-1] == f"{mounts['config']}/nats.conf"
    # every variable the configuration reads is in the pod's environment...
    env = {e["name"] for e in container["env"]}
    assert set(re.findall(r":\s*\$(\w+)", conf + config["nats-accounts.conf"])) == env
    # ...and with them the real nats-server accepts it
    for file, text in config.items():
        (tmp_path / file).write_text(text)
    values = {"POD_NAME": "nats-0", "NATS_SERVICE_PASSWORD": "s", "NATS_CLIENT_PASSWORD": "c"}
    assert set(values) == env
    _nats_config_ok(tmp_path / "nats.conf", values)


def test_keda_scales_every_node_deployment_on_its_pool_consumer() -> None:
    nodes = _by_kind(load_manifests([KUBE / "nodes.yaml"]), "Deployment")
    nats = load_manifests([KUBE / "nats.yaml"])
    headless = _by_kind(nats, "Service")[_by_kind(nats, "StatefulSet")["nats"]["spec"][
        "serviceName"]]
    monitor = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "monitor")
    scaled = load_manifests([KEDA])
    targets = [s["spec"]["scaleTargetRef"] for s in scaled]
    assert sorted(t["name"] for t in targets) == sorted(nodes)  # one each, none missing
    for obj, target in zip(scaled, targets, strict=True):
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        pool = nodes[target["name"]]["metadata"]["annotations"]["legodiffusion.io/pool"]
        assert target["name"] == deployment_name(pool)
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert meta["stream"] == subjects.TASKS_STREAM
        assert meta["consumer"] == subjects.pool_consumer(pool)
        assert meta["account"] == "$G"  # nats-accounts.conf has users, not accounts
        assert meta["natsServerMonitoringEndpoint"] == (
            f"{headless['metadata']['name']}.{NS}.svc.cluster.local:{monitor}"
        )
        assert 1 <= obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
    # the monolithic baseline's ScaledObjects follow its Deployments the same way
    module = generator()
    mono_nodes = {d["metadata"]["annotations"]["legodiffusion.io/pool"]
                  for d in yaml.safe_load_all(module.render(monolithic=True)) if d}
    mono_keda = [d for d in yaml.safe_load_all(module.render_keda(monolithic=True)) if d]
    assert {d["spec"]["triggers"][0]["metadata"]["consumer"] for d in mono_keda} == {
        subjects.pool_consumer(p) for p in mono_nodes
    }


def test_the_secret_is_an_example_with_every_key_used() -> None:
    (secret,) = load_manifests([SECRET_EXAMPLE])
    used = {
        (ref["key"], bool(ref.get("optional")))
        for doc in _applied() if doc["kind"] in ("Deployment", "StatefulSet")
        for container in _containers(doc) for env in container.get("env", [])
        if (ref := env.get("valueFrom", {}).get("secretKeyRef"))
    }
    assert {key for key, _ in used} == set(secret["stringData"])
    assert all(v.startswith("REPLACE-ME") or "REPLACE-ME" in v
               for v in secret["stringData"].values())
    assert SECRET_EXAMPLE not in APPLIED  # never applied by `kubectl apply -f deploy/kubernetes/`


# --- NATS configuration ------------------------------------------------------------------------

def _nats_config_ok(path: Path, env: dict[str, str]) -> None:
    """The real nats-server's verdict on a configuration file (``-t``: parse and check)."""
    found = subprocess.run([nats_server_binary(), "-t", "-c", str(path)],
                           env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=30)
    assert found.returncode == 0, found.stderr


def test_the_compose_nats_config_is_valid_and_needs_the_passwords(tmp_path: Path) -> None:
    for name in ("nats-server.conf", "nats-accounts.conf"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    _nats_config_ok(tmp_path / "nats-server.conf",
                    {"NATS_SERVICE_PASSWORD": "s", "NATS_CLIENT_PASSWORD": "c"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    refused = subprocess.run([nats_server_binary(), "-t", "-c", str(tmp_path / "nats-server.conf")],
                             env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "NATS_SERVICE_PASSWORD" in refused.stderr


# --- compose -----------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z_]+)(?::?[?-][^}]*)?\}")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:?message} interpolation and $$ escape, over a parsed file."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env[m["name"]], value).replace("$$", "$")
    return value


def _compose_variables() -> dict[str, str]:
    """The variables compose.env.example asks for, each given a made-up value."""
    names = re.findall(r"^([A-Z_]+)=", (DEPLOY / "compose.env.example").read_text(), re.M)
    return {name: f"pw-{name.lower()}" for name in names}


def test_compose_asks_for_every_variable_it_uses() -> None:
    used = set(_VARIABLE.findall(COMPOSE.read_text()))
    assert used == set(_compose_variables())
    # never a default password: every variable must be set (${VAR:?...})
    assert all(m.group(0).startswith(f"${{{m['name']}:?")
               for m in _VARIABLE.finditer(COMPOSE.read_text()))


def test_compose_services(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _compose()
    compose = _interpolate(raw, _compose_variables())
    services = compose["services"]
    assert {"nats", "redis", "gateway", "autoscaler"} <= set(services)
    lego = {name: s for name, s in services.items() if s.get("image") == IMAGE}
    assert set(services) - set(lego) == {"nats", "redis"}
    parsed = {}
    for name, service in lego.items():
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
        assert (ROOT / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        parsed[name] = _lego_args(service["command"])
        env = service["environment"]
        assert set(env) <= SETTINGS_ENV | NOT_SETTINGS, f"{name}: {set(env) - SETTINGS_ENV}"
        settings = _settings_from({k: str(v) for k, v in env.items()}, monkeypatch)
        assert settings.nats_user == "service"
        assert settings.nats_password == services["nats"]["environment"]["NATS_SERVICE_PASSWORD"]
        assert settings.redis_password == services["redis"]["environment"]["REDIS_PASSWORD"]
        assert urlsplit(settings.nats_url).hostname == "nats"
        assert urlsplit(settings.redis_url).hostname == "redis"
        assert set(service["depends_on"]) == {"nats", "redis"}
        assert all(d["condition"] == "service_healthy" for d in service["depends_on"].values())

    # every pool of the workflows the gateway registers has its node service
    settings = _settings_from({k: str(v) for k, v in lego["gateway"]["environment"].items()},
                              monkeypatch)
    wanted = {}
    for spec in shipped_workflows(settings).values():
        wanted.update(spec.pools())
    assert settings.workflows == ["txt2img"]
    nodes = {(args.kind, args.model) for args in parsed.values() if args.command == "node"}
    assert nodes == set(wanted.values())
    assert set(wanted.values()) == set(builtin_workflows()["txt2img"].pools().values())

    gateway = parsed["gateway"]
    assert gateway.command == "gateway" and gateway.seed_builtin and gateway.port == 8000
    assert "8000:8000" in lego["gateway"]["ports"]
    autoscaler = parsed["autoscaler"]
    assert autoscaler.command == "autoscaler" and autoscaler.backend == "local"
    assert raw["services"]["autoscaler"]["profiles"] == ["autoscale"]

    nats = services["nats"]
    mounts = dict(volume.split(":")[:2] for volume in nats["volumes"])
    assert mounts["./nats-server.conf"] == nats["command"][-1]
    assert mounts["./nats-accounts.conf"] == str(
        Path(nats["command"][-1]).parent / "nats-accounts.conf")
    assert set(nats["environment"]) == {"NATS_SERVICE_PASSWORD", "NATS_CLIENT_PASSWORD"}
    assert "js-enabled-only" in " ".join(nats["healthcheck"]["test"])


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="docker compose is not installed here; the structural checks above still ran",
)
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    found = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                           env={**os.environ, **_compose_variables()}, capture_output=True,
                           text=True, timeout=60)
    assert found.returncode == 0, found.stderr


# --- the image ---------------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_the_image() -> None:
    steps = _instructions()
    args = {k: v.strip('"') for k, _, v in
            (rest.partition("=") for word, rest in steps if word == "ARG")}
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")  # CPU torch unless told otherwise
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for word, rest in steps if word == "ENV")))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["LEGO_HOST"] == "0.0.0.0"  # a container must listen beyond its loopback
    assert {k for k in env if k.startswith("LEGO_")} <= SETTINGS_ENV
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] == "10001"  # not root; the manifests' runAsUser
    cmd = yaml.safe_load(next(rest for word, rest in reversed(steps) if word == "CMD"))
    assert _lego_args(cmd).command == "up"
    assert any(word == "RUN" and "TORCH_INDEX_URL" in rest and "torch==" in rest
               for word, rest in steps)


def test_the_build_context_keeps_what_the_image_needs() -> None:
    ignored = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text()
               .splitlines() if line.strip() and not line.startswith("#")]
    needed = ["pyproject.toml", "README.md", "common", "services", "gateway", "autoscaler",
              "lego", "data", "common/workflows/txt2img.yaml"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
    assert ".venv" in ignored and ".git" in ignored


# --- the README -------------------------------------------------------------------------------

def test_the_deploy_readme_names_real_settings_and_files() -> None:
    text = (DEPLOY / "README.md").read_text()
    streams = {subjects.REQUESTS_STREAM, subjects.TASKS_STREAM, subjects.RESULTS_STREAM}
    named = set(re.findall(r"\bLEGO_[A-Z_]+\b", text)) - streams
    assert named and named <= SETTINGS_ENV | NOT_SETTINGS, named - SETTINGS_ENV
    for path in set(re.findall(r"\bdeploy/[\w./-]+\w", text)) - {"deploy/.env"}:  # yours
        assert (ROOT / path).exists(), path
    assert set(BUILTIN_KINDS) >= {d["kind"] for d in _applied()}
