"""A stand-in Kubernetes API server for tests: Deployments in memory, a real HTTP server.

It speaks the few paths, JSON shapes and patch types the autoscaler's Kubernetes backend uses
(Deployments listed by label selector, read, and scaled through the ``scale`` subresource), so
the backend is tested through the official client's real HTTP requests rather than a mocked
client. Every request is recorded (method, path, query, content type, body) for assertions.

Not emulated: pods, controllers, watches, auth, other resources. ``status.replicas`` follows
``spec.replicas`` at once by default; with ``follow=False`` it stays put until ``settle()``,
which emulates pods still terminating.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
_BASE = "/apis/apps/v1/namespaces/{ns}/deployments"
_MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any  # parsed JSON, or None


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        """A ``meta/v1 Status``, the body the real API server answers errors with."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _not_found(name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'deployments.apps "{name}" not found',
        name=name, group="apps", kind="deployments",
    )


def load_manifests(paths: Iterable[Path] | None = None) -> list[dict[str, Any]]:
    """Every YAML document of ``paths`` (default: deploy/kubernetes/*.yaml), in file order."""
    docs: list[dict[str, Any]] = []
    for path in paths if paths is not None else sorted(DEPLOY_DIR.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(Path(path).read_text()) if d)
    return docs


def parse_selector(selector: str) -> list[tuple[str, str, str | None]]:
    """Equality-based selectors: ``k=v``, ``k==v``, ``k!=v``, ``k`` (exists), ``!k``."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in filter(None, (t.strip() for t in selector.split(","))):
        if " in " in raw or " notin " in raw or "(" in raw:
            raise ApiError(400, "BadRequest", f"set-based selector not supported: {raw}")
        if "!=" in raw:
            key, value = raw.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in raw:
            key, value = raw.replace("==", "=", 1).split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif raw.startswith("!"):
            terms.append((raw[1:].strip(), "!", None))
        else:
            terms.append((raw, "exists", None))
    return terms


def _matches(labels: dict[str, str], terms: list[tuple[str, str, str | None]]) -> bool:
    for key, op, value in terms:
        ok = {
            "=": labels.get(key) == value,
            "!=": labels.get(key) != value,
            "exists": key in labels,
            "!": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what strategic merge does on a Scale: it has no lists)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(target: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add``/``replace``/``remove``/``test`` on object members (enough for a Scale)."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        if not parts:
            raise ApiError(422, "Invalid", "json patch on the whole document")
        parent = doc
        for part in parts[:-1]:
            parent = parent.setdefault(part, {})
        leaf = parts[-1]
        if op["op"] in ("add", "replace"):
            if op["op"] == "replace" and leaf not in parent:
                raise ApiError(422, "Invalid", f"replace of missing path {op['path']}")
            parent[leaf] = op["value"]
        elif op["op"] == "remove":
            parent.pop(leaf, None)
        elif op["op"] == "test":
            if parent.get(leaf) != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        else:
            raise ApiError(422, "Invalid", f"json patch op not supported: {op['op']}")
    return doc


class KubeApi:
    """The stand-in server. Use as a context manager; ``url`` is its address."""

    def __init__(self, *, follow: bool = True) -> None:
        self.follow = follow
        self.requests: list[Recorded] = []
        self._deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._version = 1000
        self._port = _free_port()
        self.url = f"http://127.0.0.1:{self._port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self._app(), host="127.0.0.1", port=self._port, log_level="warning",
                           lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, name="kubeapi", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> KubeApi:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("stand-in Kubernetes API server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    # --- state, for tests --------------------------------------------------------------------

    def add(self, manifest: dict[str, Any]) -> None:
        """Create a Deployment as ``kubectl apply`` would (defaults: namespace, replicas=1)."""
        dep = copy.deepcopy(manifest)
        if dep.get("kind") != "Deployment":
            raise ValueError(f"not a Deployment: {dep.get('kind')}")
        meta = dep.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.update(uid=str(uuid.uuid4()), generation=1)
        dep.setdefault("spec", {}).setdefault("replicas", 1)
        with self._lock:
            meta["resourceVersion"] = self._next_version()
            self._deployments[(meta["namespace"], meta["name"])] = dep
            self._set_status(dep, dep["spec"]["replicas"])

    def load(self, docs: Iterable[dict[str, Any]] | None = None) -> list[str]:
        """Add every Deployment of ``docs`` (default: the manifests in deploy/kubernetes/);
        other kinds are ignored. Returns the names added."""
        names = []
        for doc in load_manifests() if docs is None else docs:
            if doc.get("kind") == "Deployment":
                self.add(doc)
                names.append(doc["metadata"]["name"])
        return names

    def deployment(self, name: str, namespace: str = "legodiffusion") -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._get(namespace, name))

    def set_replicas(self, name: str, replicas: int, namespace: str = "legodiffusion") -> None:
        """Change spec.replicas behind the backend's back (``kubectl scale``), not recorded."""
        with self._lock:
            dep = self._get(namespace, name)
            self._write_spec(dep, replicas)

    def set_status(self, name: str, namespace: str = "legodiffusion", **status: Any) -> None:
        """Overwrite status fields, e.g. ``replicas=3`` or ``terminatingReplicas=2``."""
        with self._lock:
            self._get(namespace, name).setdefault("status", {}).update(status)

    def settle(self) -> None:
        """Every Deployment's pods reach their spec (the terminating ones are gone)."""
        with self._lock:
            for dep in self._deployments.values():
                self._set_status(dep, dep["spec"]["replicas"])

    def writes(self) -> list[Recorded]:
        """The recorded requests that could change state (PATCH, PUT)."""
        return [r for r in self.requests if r.method in ("PATCH", "PUT")]

    # --- internals ---------------------------------------------------------------------------

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self._deployments[(namespace, name)]
        except KeyError:
            raise _not_found(name) from None

    @staticmethod
    def _set_status(dep: dict[str, Any], replicas: int) -> None:
        status: dict[str, Any] = {"observedGeneration": dep["metadata"]["generation"]}
        if replicas:  # the real API server omits zero counts
            status.update(replicas=replicas, updatedReplicas=replicas, readyReplicas=replicas,
                          availableReplicas=replicas)
        dep["status"] = status

    def _write_spec(self, dep: dict[str, Any], replicas: Any) -> None:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError(422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}")
        if replicas != dep["spec"]["replicas"]:
            dep["spec"]["replicas"] = replicas
            dep["metadata"]["generation"] += 1
            dep["metadata"]["resourceVersion"] = self._next_version()
            if self.follow:
                self._set_status(dep, replicas)
            else:
                dep["status"]["observedGeneration"] = dep["metadata"]["generation"]

    @staticmethod
    def _scale(dep: dict[str, Any]) -> dict[str, Any]:
        """The ``autoscaling/v1 Scale`` view of a Deployment."""
        meta = dep["metadata"]
        labels = dep["spec"].get("selector", {}).get("matchLabels", {})
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": {"replicas": dep["spec"]["replicas"]},
            "status": {
                "replicas": dep.get("status", {}).get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
            },
        }

    def _app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            raw = await request.body()
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            with self._lock:
                self.requests.append(Recorded(
                    request.method, request.url.path, dict(request.query_params), content_type,
                    body,
                ))
            return await call_next(request)

        @app.exception_handler(ApiError)
        async def api_error(_: Request, e: ApiError) -> JSONResponse:
            return JSONResponse(e.status(), status_code=e.code)

        @app.get(_BASE)
        def list_deployments(ns: str, labelSelector: str = "") -> dict[str, Any]:  # noqa: N803
            terms = parse_selector(labelSelector)
            with self._lock:
                items = [
                    copy.deepcopy(dep) for (dep_ns, _), dep in sorted(self._deployments.items())
                    if dep_ns == ns and _matches(dep["metadata"].get("labels", {}), terms)
                ]
                version = str(self._version)
            return {
                "apiVersion": "apps/v1",
                "kind": "DeploymentList",
                "metadata": {"resourceVersion": version},
                "items": items,
            }

        @app.get(_BASE + "/{name}")
        def read_deployment(ns: str, name: str) -> dict[str, Any]:
            with self._lock:
                return copy.deepcopy(self._get(ns, name))

        @app.get(_BASE + "/{name}/scale")
        def read_scale(ns: str, name: str) -> dict[str, Any]:
            with self._lock:
                return self._scale(self._get(ns, name))

        @app.patch(_BASE + "/{name}/scale")
        async def patch_scale(ns: str, name: str, request: Request) -> dict[str, Any]:
            content_type = request.headers.get("content-type", "").split(";")[0].strip()
            patch = json.loads(await request.body() or b"null")
            with self._lock:
                dep = self._get(ns, name)
                current = self._scale(dep)
                if content_type in _MERGE_TYPES:
                    if not isinstance(patch, dict):
                        raise ApiError(400, "BadRequest", "merge patch must be a JSON object")
                    wanted = merge_patch(current, patch)
                elif content_type == _JSON_PATCH:
                    if not isinstance(patch, list):
                        raise ApiError(400, "BadRequest", "json patch must be a JSON array")
                    wanted = json_patch(current, patch)
                else:
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - "
                                   f"accepted media types include: {', '.join(_MERGE_TYPES)}, "
                                   f"{_JSON_PATCH}")
                self._write_spec(dep, wanted.get("spec", {}).get("replicas"))
                return self._scale(dep)

        @app.put(_BASE + "/{name}/scale")
        async def replace_scale(ns: str, name: str, request: Request) -> dict[str, Any]:
            body = json.loads(await request.body() or b"null")
            if not isinstance(body, dict) or body.get("kind", "Scale") != "Scale":
                raise ApiError(400, "BadRequest", "body must be an autoscaling/v1 Scale")
            with self._lock:
                dep = self._get(ns, name)
                version = body.get("metadata", {}).get("resourceVersion")
                if version and version != dep["metadata"]["resourceVersion"]:
                    raise ApiError(
                        409, "Conflict",
                        f'Operation cannot be fulfilled on deployments.apps "{name}": the object '
                        "has been modified; please apply your changes to the latest version "
                        "and try again",
                        name=name, group="apps", kind="deployments",
                    )
                self._write_spec(dep, body.get("spec", {}).get("replicas"))
                return self._scale(dep)

        return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(**kwargs: Any) -> Iterator[KubeApi]:
    """For fixtures: ``yield from running()`` starts a stand-in and stops it afterwards."""
    with KubeApi(**kwargs) as api:
        yield api
