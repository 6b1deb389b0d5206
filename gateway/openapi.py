"""The gateway's OpenAPI document (``GET /openapi.json``), built in one place so that it tells
the truth: every ``$ref`` resolves, every request body and every status a route can answer is
declared with its schema and headers, and a request the schema calls valid is one the gateway
accepts (and the other way round).

- Routes declare their own answers with ``ok``/``error`` (and ``body`` for a request body);
  ``document`` adds what holds for many routes: 401 (with ``WWW-Authenticate``) and the bearer
  scheme on ``/v1/*`` when API keys are on, 429 (``Retry-After``) when they are rate limited,
  503 (``Retry-After``) on ``/v1/*`` for a dependency that cannot be reached, 413 where a body
  is read, and the API's error JSON on every 4xx/5xx (OpenAI's error shape on the OpenAI routes).
- Schemas made elsewhere (msgspec's for ``RequestState``, pydantic's for ``WorkflowSpec``) keep
  their definitions under ``$defs`` with ``#/$defs/...`` refs, which resolve in no OpenAPI
  document: ``hoist`` moves them to ``components/schemas`` and rewrites the refs.
- The generation request depends on the workflow: each registered workflow has its own
  schema (its parameters with their limits, the required ones required, no other key), and
  ``GenerationRequest`` is any of them; likewise the OpenAI images request per model. So the
  document is rebuilt from the registry on every read (a workflow registered at run time
  shows up at once, on every replica).

What JSON Schema cannot say is written in the descriptions: an image parameter must decode to
a PNG/JPEG/WebP within its byte and pixel limits; ``steps x strength`` must be at least 1
where a workflow has both; a workflow spec's graph must be consistent (nodes name known
models and kinds, edges name existing outputs, no cycle).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from common import output_format, webhooks
from common.kinds import KINDS
from common.messages import RequestState, json_schema
from common.subjects import REQUEST_ID_RULE
from common.workflow import LORA_NAME, LORA_SCALE, ParamSpec, WorkflowSpec

if TYPE_CHECKING:
    from common.settings import Settings
    from gateway.auth import ApiKeyGuard

DEFAULT_WORKFLOW = "txt2img"  # the ingress's default (gateway.ingress.DEFAULT_WORKFLOW)
OPENAI_TAG = "OpenAI-compatible"
#: a size pattern lists every allowed value while there are at most this many per side
MAX_SIZE_VALUES = 1024

_REF = "#/components/schemas/"
_DEFS_REF = "#/$defs/"


def ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


# --- what routes declare ----------------------------------------------------------------------

def ok(description: str, schema: str | dict[str, Any] | None = None,
       headers: Iterable[str] = (), media_type: str = "application/json") -> dict[str, Any]:
    """A success response: ``schema`` a component name or a schema."""
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {media_type: {"schema": ref(schema) if isinstance(schema, str)
                                          else schema}}
    if headers:
        answer["headers"] = {name: {"$ref": f"#/components/headers/{name}"} for name in headers}
    return answer


def error(description: str, headers: Iterable[str] = (), openai: bool = False
          ) -> dict[str, Any]:
    """An error response in the API's error JSON (OpenAI's on the OpenAI routes)."""
    return ok(description, "OpenAIError" if openai else "ErrorResponse", headers)


def body(schema: str, media_types: Iterable[str] = ("application/json",),
         description: str | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads a body the signature does not show."""
    request_body: dict[str, Any] = {
        "required": True, "content": {t: {"schema": ref(schema)} for t in media_types}}
    if description:
        request_body["description"] = description
    return {"requestBody": request_body}


# --- schemas that do not depend on the registry ----------------------------------------------

HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "the request's URL", "schema": {"type": "string"}},
    "Retry-After": {"description": "whole seconds to wait before trying again",
                    "required": True, "schema": {"type": "integer", "minimum": 1}},
    "WWW-Authenticate": {"description": 'the scheme: "Bearer", or Bearer error="invalid_token"',
                         "required": True, "schema": {"type": "string"}},
    "Allow": {"description": "the methods the path takes", "required": True,
              "schema": {"type": "string"}},
}

_ERROR = {
    "type": "object",
    "description": "What went wrong: ``code`` (invalid_field, invalid_request, not_found, "
    "unknown_workflow, conflict, payload_too_large, unauthorized, rate_limited, overloaded, "
    "unavailable, ...), a message naming the field and its limit; ``errors``: every bad field "
    "when several are; other keys by code (``retry_after_s``, ``known``, ``status``, ``id``).",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string"},
        "message": {"type": "string"},
        "field": {"type": "string"},
        "limit": {"description": "the limit the field broke (a number, a list of choices, ...)"},
        "errors": {"type": "array", "items": ref("Error")},
        "retry_after_s": {"type": "number"},
        "known": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": True,
}

STATIC_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": _ERROR,
    "ErrorResponse": {"type": "object", "required": ["error"],
                      "properties": {"error": ref("Error")}, "additionalProperties": False},
    "OpenAIError": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]},
                           "code": {"type": ["string", "null"]}},
        }},
    },
    "GenerationPage": {
        "type": "object", "required": ["data", "next_cursor"], "additionalProperties": False,
        "properties": {
            "data": {"type": "array", "items": ref("Generation")},
            "next_cursor": {"type": ["string", "null"],
                            "description": "pass back as ?cursor for the next page; null: "
                            "none left"},
        },
    },
    "Workflows": {"type": "object", "required": ["workflows"], "additionalProperties": False,
                  "properties": {"workflows": {"type": "array", "items": ref("Workflow")}}},
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string", "description": "the workflow's name"},
                       "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"},
                                 "data": {"type": "array", "items": ref("Model")}}},
    "ImagesResponse": {
        "type": "object", "required": ["created", "output_format", "data"],
        "properties": {
            "created": {"type": "integer"},
            "output_format": {"enum": output_format.FORMATS},
            "data": {"type": "array", "items": {"anyOf": [
                {"type": "object", "required": ["b64_json"],
                 "properties": {"b64_json": {"type": "string", "contentEncoding": "base64"}}},
                {"type": "object", "required": ["url"],
                 "properties": {"url": {"type": "string"}}},
            ]}},
        },
    },
    "Cluster": {
        "type": "object", "required": ["models", "replicas", "workflows", "at"],
        "properties": {
            "models": {"type": "object", "description": "per pool: replicas, ready, lag, "
                       "rates, p50_ms, p99_ms, ...", "additionalProperties": {"type": "object"}},
            "replicas": {"type": "array", "items": {"type": "object"},
                         "description": "every live replica's last report"},
            "workflows": {"type": "object", "description": "workflow -> its pools",
                          "additionalProperties": {"type": "array",
                                                   "items": {"type": "string"}}},
            "at": {"type": "number"},
        },
    },
    "GenerationEvent": {
        "description": "One Server-Sent Event of GET /v1/generations/{id}/events: ``state`` "
        "(the request as GET /v1/generations/{id} shows it) or ``progress`` (a node's step).",
        "oneOf": [
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": "state"},
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": ref("Generation")}}},
            {"type": "object", "required": ["event", "data"],
             "properties": {"event": {"const": "progress"},
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": {
                                         "type": "object",
                                         "required": ["id", "node", "step", "total"],
                                         "properties": {"id": {"type": "string"},
                                                        "node": {"type": "string"},
                                                        "step": {"type": "integer"},
                                                        "total": {"type": "integer"}}}}}},
        ],
    },
    "Health": {"type": "object", "required": ["status"], "properties": {"status": {
        "const": "ok"}}},
    "Readiness": {
        "type": "object", "required": ["ready"],
        "properties": {"ready": {"type": "boolean"},
                       "dependencies": {"type": "object", "description": 'each dependency: '
                                        '"ok" or why it cannot be used now',
                                        "additionalProperties": {"type": "string"}},
                       "unstartable": {"type": "object", "description": "pools none of whose "
                                       "replicas can load their model: the error",
                                       "additionalProperties": {"type": "string"}}},
    },
}


def _generation(state: dict[str, Any]) -> dict[str, Any]:
    """The public JSON of a request (``Gateway.view``) from ``RequestState``'s schema."""
    schema = copy.deepcopy(state)
    schema["title"] = "Generation"
    schema["description"] = (
        "A request as the API shows it: its state; while it has not ended, its progress, "
        "queue_position and eta_s; links to itself and, once it succeeded, its image.")
    props = schema["properties"]
    props.pop("queue", None)  # kept for queue_position, not shown
    props.update({
        "progress": {"type": "object", "required": ["node", "step", "total"],
                     "properties": {"node": {"type": "string"}, "step": {"type": "integer"},
                                    "total": {"type": "integer"}}},
        "queue_position": {"type": "object", "additionalProperties": {"type": "integer"},
                           "description": "per pool it waits on: the tasks ahead of it"},
        "eta_s": {"type": "number", "minimum": 0,
                  "description": "seconds until it should finish"},
        "links": {"type": "object", "required": ["self"],
                  "properties": {"self": {"type": "string"}, "image": {"type": "string"}}},
    })
    schema["required"] = [*schema.get("required", []), "links"]
    return schema


def _workflow_view(spec: dict[str, Any]) -> dict[str, Any]:
    """A workflow as GET /v1/workflows shows it: its spec and the pools it uses."""
    schema = copy.deepcopy(spec)
    schema["title"] = "Workflow"
    schema["properties"]["pools"] = {"type": "array", "items": {"type": "string"}}
    schema["required"] = [*schema.get("required", []), "pools"]
    return schema


def _base_components() -> dict[str, Any]:
    schemas: dict[str, Any] = copy.deepcopy(STATIC_SCHEMAS)
    hoist(json_schema(RequestState), schemas)
    schemas["Generation"] = _generation(schemas.pop("RequestState"))
    spec = hoist(WorkflowSpec.model_json_schema(), schemas)
    spec["description"] = (
        "A workflow: its models, parameters (with defaults and limits), nodes and the output "
        "node. The graph must hold together: every node names a known kind and model, every "
        "input names an existing node output or an image parameter (request.<param>), no cycle.")
    schemas["WorkflowSpec"] = spec
    schemas["NodeSpec"]["properties"]["kind"]["enum"] = list(KINDS)  # a validator checks it
    schemas["Workflow"] = _workflow_view(spec)
    return schemas


# --- $defs -> components/schemas -------------------------------------------------------------

def hoist(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` moved into ``schemas`` and every ``#/$defs/X`` ref
    rewritten to ``#/components/schemas/X`` (a definition already there must be the same)."""
    schema = _rewrite(copy.deepcopy(schema))
    for name, definition in schema.pop("$defs", {}).items():
        if name in schemas and schemas[name] != definition:
            raise ValueError(f"two different schemas are named {name!r}")
        schemas[name] = definition
    if set(schema) == {"$ref"} and schema["$ref"].startswith(_REF):
        name = schema["$ref"][len(_REF):]
        return copy.deepcopy(schemas[name])
    return schema


def _rewrite(node: Any) -> Any:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith(_DEFS_REF):
            node["$ref"] = _REF + node["$ref"][len(_DEFS_REF):]
        for value in node.values():
            _rewrite(value)
    elif isinstance(node, list):
        for value in node:
            _rewrite(value)
    return node


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` in ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def dangling(document: dict[str, Any]) -> list[str]:
    """The refs of ``document`` that do not resolve inside it (local refs only)."""
    missing = []
    for target in refs(document):
        node: Any = document
        if not target.startswith("#/"):
            missing.append(target)
            continue
        for part in target[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                missing.append(target)
                break
            node = node[part]
    return missing


# --- request schemas from the registered workflows --------------------------------------------

def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def param_schema(p: ParamSpec, nullable: bool | None = None) -> dict[str, Any]:
    """A workflow parameter's schema, exactly as ``common.workflow.validate_params`` checks
    it; an optional one may be null (its default)."""
    kind = {"string": "string", "integer": "integer", "number": "number",
            "boolean": "boolean", "image": "string", "loras": "array"}[p.type]
    schema: dict[str, Any] = {}
    if p.type == "loras":
        schema["items"] = {
            "type": "object", "additionalProperties": False, "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": LORA_NAME},
                "scale": {"type": "number", "minimum": LORA_SCALE[0],
                          "maximum": LORA_SCALE[1], "default": 1.0}}}
        if p.max_items is not None:
            schema["maxItems"] = p.max_items
    if p.description:
        schema["description"] = p.description
    if p.type == "image":
        schema["contentEncoding"] = "base64"
        limits = [f"at least {p.min_side} pixels a side"]
        if p.max_pixels is not None:
            limits.append(f"at most {p.max_pixels} pixels")
        if p.max_bytes is not None:
            limits.append(f"at most {p.max_bytes} bytes")
        schema["description"] = (f"{p.description + ': ' if p.description else ''}a PNG, "
                                 f"JPEG or WebP image, base64 (or a data: URL), "
                                 f"{', '.join(limits)}")
    if p.type == "string" and p.max_length is not None:
        schema["maxLength"] = p.max_length
    if p.type in ("integer", "number"):
        if p.minimum is not None:
            schema["minimum"] = _num(p.minimum)
        if p.maximum is not None:
            schema["maximum"] = _num(p.maximum)
        if p.multiple_of:
            schema["multipleOf"] = p.multiple_of
    if p.default is not None:
        schema["default"] = p.default
    if p.random:
        schema["description"] = (schema.get("description", "") + " (absent: drawn at "
                                  "random)").strip()
    if nullable is None:
        nullable = not p.required
    schema["type"] = [kind, "null"] if nullable else kind
    if p.choices is not None:
        schema["enum"] = [*p.choices, None] if nullable else list(p.choices)
    return schema


def _envelope(settings: Settings) -> dict[str, dict[str, Any]]:
    """The request keys that are not workflow parameters (``ENVELOPE_KEYS``), but
    ``workflow``; null is their default."""
    fields: dict[str, dict[str, Any]] = {
        "id": {"type": ["string", "null"], "pattern": "^[A-Za-z0-9_-]{1,64}$",
               "minLength": 1, "maxLength": 64,
               "description": f"client-chosen id ({REQUEST_ID_RULE}), an idempotency key: "
               "the same id with the same fields answers the same request; with other "
               "fields, 409. Absent: one is generated."},
        "deadline_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                       "maximum": _num(settings.max_deadline_s),
                       "description": "seconds from submission; absent: the workflow's SLO"},
    }
    if settings.webhook_allow:  # else webhooks are off, and a webhook_url is refused
        fields["webhook_url"] = {
            "type": ["string", "null"], "format": "uri", "maxLength": webhooks.MAX_URL_CHARS,
            "description": "POST the request's events here, signed: an http(s) URL without "
            "credentials whose host the gateway allows (its webhook_allow setting: "
            f"{', '.join(settings.webhook_allow)}) and resolves"}
        fields["webhook_events"] = {
            "type": ["array", "null"], "minItems": 1, "uniqueItems": True,
            "items": {"enum": list(webhooks.EVENTS)}, "default": webhooks.DEFAULT_EVENTS,
            "description": "which events are POSTed (only with a webhook_url)"}
    return fields


def _with_envelope_rules(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``schema`` with what its envelope's fields need of each other: webhook_events only
    with a webhook_url."""
    if settings.webhook_allow:
        schema["if"] = {"required": ["webhook_events"],
                        "properties": {"webhook_events": {"type": "array"}}}
        schema["then"] = {"required": ["webhook_url"],
                          "properties": {"webhook_url": {"type": "string"}}}
    return schema


def generation_request(spec: WorkflowSpec, settings: Settings) -> dict[str, Any]:
    """What POST /v1/generations accepts for ``spec``: its parameters and the envelope."""
    props: dict[str, Any] = {"workflow": {"const": spec.name}}
    props.update(_envelope(settings))
    props.update({name: param_schema(p) for name, p in spec.params.items()})
    for name, p in spec.params.items():
        if p.type == "loras" and settings.lora_dir is None:
            props[name]["maxItems"] = 0
            props[name]["description"] = "none here: this deployment serves no LoRAs"
    required = sorted(name for name, p in spec.params.items() if p.required)
    if spec.name != DEFAULT_WORKFLOW:
        required.insert(0, "workflow")
    notes = [spec.description] if spec.description else []
    if "strength" in spec.params and "steps" in spec.params:
        notes.append("steps x strength must be at least 1 (the steps img2img runs)")
    schema: dict[str, Any] = {"title": f"{spec.name} request", "type": "object",
                              "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    if notes:
        schema["description"] = "; ".join(notes)
    return _with_envelope_rules(schema, settings)


def _values(p: ParamSpec | None) -> list[int] | None:
    """Every value an integer parameter takes, when there are few enough to list."""
    if p is None or p.type != "integer" or p.minimum is None or p.maximum is None:
        return None
    step = p.multiple_of or 1
    first = -(-int(p.minimum) // step) * step
    values = list(range(max(first, step), int(p.maximum) + 1, step))
    return values if len(values) <= MAX_SIZE_VALUES else None


def size_schema(spec: WorkflowSpec) -> dict[str, Any]:
    """OpenAI's ``size``: "auto" or "WIDTHxHEIGHT" within the workflow's width and height."""
    width, height = spec.params.get("width"), spec.params.get("height")
    if width is None or height is None:
        return {"enum": ["auto", None], "description": f"{spec.name} takes no size"}
    widths, heights = _values(width), _values(height)
    if widths is None or heights is None:  # too many to list: the form, and the limits
        side = "[1-9][0-9]{0,4}"
        pattern = f"^(auto|{side}x{side})$"
    else:
        pattern = (f"^(auto|({'|'.join(map(str, widths))})x"
                   f"({'|'.join(map(str, heights))}))$")
    return {"type": ["string", "null"], "pattern": pattern, "example": "512x512",
            "description": "WIDTHxHEIGHT within the workflow's width and height limits (width "
            f"{_limits(width)}, height {_limits(height)}), or auto (its default size)"}


def _limits(p: ParamSpec) -> str:
    parts = []
    if p.minimum is not None:
        parts.append(f">= {_num(p.minimum)}")
    if p.maximum is not None:
        parts.append(f"<= {_num(p.maximum)}")
    if p.multiple_of:
        parts.append(f"a multiple of {p.multiple_of}")
    return ", ".join(parts) or "any"


def images_request(spec: WorkflowSpec, settings: Settings, max_n: int) -> dict[str, Any]:
    """What POST /v1/images/generations accepts with ``model`` = ``spec``: OpenAI's fields,
    and the workflow's other parameters (``extra_body``), nothing else."""
    props: dict[str, Any] = {
        "model": ({"enum": [spec.name, None]} if spec.name == DEFAULT_WORKFLOW
                  else {"const": spec.name}),
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": max_n, "default": 1,
              "description": "images, each its own request; image i gets seed + i (wrapping "
              "past the seed's maximum)"},
        "size": size_schema(spec),
        "response_format": {"enum": ["url", "b64_json", None], "default": "url"},
        "user": {"type": ["string", "null"], "description": "accepted and ignored"},
    }
    envelope = _envelope(settings)
    envelope.pop("id")  # each image gets its own
    props.update(envelope)
    for name, p in spec.params.items():
        if name == "output_quality":
            props["output_compression"] = param_schema(p)
        else:
            props[name] = param_schema(p)
    required = sorted(name for name, p in spec.params.items() if p.required)
    if spec.name != DEFAULT_WORKFLOW:
        required.insert(0, "model")
    schema: dict[str, Any] = {"title": f"{spec.name} images request", "type": "object",
                              "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return _with_envelope_rules(schema, settings)


def _any_of(kind: str, specs: Mapping[str, WorkflowSpec], schemas: dict[str, Any],
            build: Any) -> dict[str, Any]:
    names = []
    for name in sorted(specs):
        component = f"{kind}.{name}"
        schemas[component] = build(specs[name])
        names.append(component)
    if not names:  # nothing registered: every request names an unknown workflow (404)
        return {"type": "object", "description": "no workflow is registered"}
    return {"anyOf": [ref(n) for n in names],
            "description": "one of the registered workflows (GET /v1/workflows)"}


# --- the document ------------------------------------------------------------------------------

def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield path, method, operation


def _add(responses: dict[str, Any], status: int, answer: dict[str, Any]) -> None:
    key = str(status)
    if key not in responses:
        responses[key] = answer
    elif answer["description"] not in responses[key]["description"]:
        responses[key]["description"] += f"; or {answer['description']}"


def document(app: FastAPI, specs: Mapping[str, WorkflowSpec], settings: Settings,
             guard: ApiKeyGuard, max_n: int) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's, completed (see the module's docstring)."""
    doc = copy.deepcopy(FastAPI.openapi(app))  # FastAPI caches the routes' part
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # our 422s have our error shape
        schemas.pop(name, None)
    for name, schema in _base_components().items():
        schemas[name] = schema
    schemas["GenerationRequest"] = _any_of(
        "GenerationRequest", specs, schemas, lambda s: generation_request(s, settings))
    schemas["ImagesRequest"] = _any_of(
        "ImagesRequest", specs, schemas, lambda s: images_request(s, settings, max_n))
    components["headers"] = copy.deepcopy(HEADERS)
    if guard.enabled:
        components.setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "an API key from the gateway's api_keys"}
    else:
        components.pop("securitySchemes", None)
    for path, _, operation in _operations(doc):
        openai = OPENAI_TAG in operation.get("tags", ())
        responses = operation.setdefault("responses", {})
        _fix_validation_error(operation, openai)
        for parameter in operation.get("parameters", []):
            parameter["schema"] = _absent_not_null(parameter.get("schema", {}))
        if not path.startswith("/v1/"):
            operation.pop("security", None)
            continue
        if guard.enabled:
            operation["security"] = [{"HTTPBearer": []}]
            _add(responses, 401, error("missing or unknown API key", ["WWW-Authenticate"],
                                       openai))
            if guard.limiter is not None:
                _add(responses, 429, error("the API key's rate limit is spent", ["Retry-After"],
                                           openai))
        else:
            operation.pop("security", None)
        if "requestBody" in operation:
            _add(responses, 413, error(f"the body is over {settings.max_body_bytes} bytes",
                                       openai=openai))
        _add(responses, 503, error("NATS or the tensor store cannot be reached now",
                                   ["Retry-After"], openai))
    doc["components"] = {k: v for k, v in components.items() if v}
    hoist_all(doc)
    return doc


def _fix_validation_error(operation: dict[str, Any], openai: bool) -> None:
    """FastAPI's own 422 (its HTTPValidationError) where a query parameter can be malformed;
    the gateway answers those in its error shape. Dropped where nothing can be."""
    responses = operation["responses"]
    auto = responses.get("422")
    if auto is None or "HTTPValidationError" not in str(auto):
        return
    if any(p.get("in") == "query" for p in operation.get("parameters", [])):
        responses["422"] = error("a query parameter of the wrong type or out of its limits",
                                 openai=openai)
    else:
        del responses["422"]


def _absent_not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's ``X | None`` schema as X: an optional parameter is absent, never null
    (a query string has no null)."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options or len(options) != 2:
        return schema
    (kept,) = (option for option in options if option != {"type": "null"})
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**kept, **rest}


def hoist_all(doc: dict[str, Any]) -> None:
    """Any ``$defs`` left anywhere in ``doc`` moved into ``components/schemas``."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "$defs" in node:
                for name, definition in node.pop("$defs").items():
                    schemas.setdefault(name, definition)
            for value in list(node.values()):
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(doc)
    _rewrite(doc)


def install(app: FastAPI, settings: Settings, guard: ApiKeyGuard, max_n: int) -> None:
    """Serve ``document`` at /openapi.json, from the registry as it is at each read."""

    def openapi() -> dict[str, Any]:
        registry = getattr(app.state.gateway, "registry", None)  # None before the start
        specs = registry.all() if registry is not None else {}
        return document(app, specs, settings, guard, max_n)

    # FastAPI's documented way to serve a custom schema; its stubs declare a method
    app.openapi = openapi  # type: ignore[method-assign]
