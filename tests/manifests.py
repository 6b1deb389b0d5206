"""The shipped Kubernetes manifests, offline: their generator as a module, and every document
checked against the official kubernetes client's models.

The client's models are generated from the Kubernetes OpenAPI schema: deserialising a document
into its model checks every field's type and the required fields, and the client drops what it
does not know, so a round trip that loses nothing means no misspelt or misplaced field anywhere
in the document. Used by tests/test_deploy.py (every shipped manifest) and
tests/test_k8s_backend.py (typed access to the Deployments and RBAC objects)."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

from kubernetes import client as k8s

from tests.kubeapi import DEPLOY_DIR

#: kind -> (apiVersion, client model) of every built-in kind the manifests may use
BUILTIN_KINDS: dict[str, tuple[str, str]] = {
    "Namespace": ("v1", "V1Namespace"),
    "ConfigMap": ("v1", "V1ConfigMap"),
    "Secret": ("v1", "V1Secret"),
    "Service": ("v1", "V1Service"),
    "ServiceAccount": ("v1", "V1ServiceAccount"),
    "Deployment": ("apps/v1", "V1Deployment"),
    "StatefulSet": ("apps/v1", "V1StatefulSet"),
    "Role": ("rbac.authorization.k8s.io/v1", "V1Role"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "V1RoleBinding"),
}


def from_json(data: Any, model: str) -> Any:
    """``data`` deserialised into the client model named ``model`` (e.g. "V1ObjectMeta"),
    asserting that nothing was dropped or changed on the way."""
    api = k8s.ApiClient()
    try:
        obj = api.deserialize(json.dumps(data), model, "application/json")
    except ValueError as exc:  # a wrong type or a missing required field
        raise AssertionError(f"{model}: {exc}") from exc
    back = api.sanitize_for_serialization(obj)
    difference = first_difference(data, back)
    assert difference is None, f"{model}: {difference}"
    return obj


def to_model(doc: dict[str, Any]) -> Any:
    """A built-in manifest document as its client model, checked strictly (see the module)."""
    kind = doc.get("kind")
    assert kind in BUILTIN_KINDS, f"not a built-in kind this project uses: {kind!r}"
    api_version, model = BUILTIN_KINDS[kind]
    assert doc.get("apiVersion") == api_version, f"{kind}: apiVersion {doc.get('apiVersion')!r}"
    return from_json(doc, model)


def first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """Where ``actual`` first differs from ``expected`` (a field the model dropped, a value it
    coerced), or None."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in expected:
            if key not in actual:
                return f"{path}.{key}: unknown field (or null)"
            found = first_difference(expected[key], actual[key], f"{path}.{key}")
            if found:
                return found
        extra = set(actual) - set(expected)
        return f"{path}: fields added: {sorted(extra)}" if extra else None
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{path}: {len(expected)} items became {len(actual)}"
        for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
            found = first_difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    if type(expected) is not type(actual) or expected != actual:
        return f"{path}: {expected!r} became {actual!r}"
    return None


def generator() -> ModuleType:
    """deploy/kubernetes/generate.py, imported as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("k8s_generate", DEPLOY_DIR / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
