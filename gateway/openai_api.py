"""OpenAI-compatible images API: ``POST /v1/images/generations``, and the model listing
(``GET /v1/models``, ``GET /v1/models/{id}``: every workflow is a model).

The official ``openai`` client works unchanged with ``base_url="<gateway>/v1"``::

    client.images.generate(model="txt2img", prompt="a red fox", size="64x64", n=2,
                           response_format="b64_json", extra_body={"seed": 1, "steps": 2})

- ``model`` names the workflow (default ``txt2img``); ``size`` ``"WxH"`` sets width and height
  (``"auto"`` or absent: the workflow's defaults); ``response_format`` is ``"url"`` (default,
  as OpenAI's) or ``"b64_json"`` (the base64 file); ``output_format`` is ``"png"`` (default),
  ``"jpeg"`` or ``"webp"``, and ``output_compression`` (1..100) is its JPEG/WebP quality (our
  ``output_quality``), as in OpenAI's API; ``user`` (a string) is accepted and ignored. A
  field that is null is absent, as in OpenAI's API.
- Every other field (``extra_body``: seed, steps, negative_prompt, guidance, deadline_s, ...)
  goes to the workflow as it is, validated like ``POST /v1/generations``: a field that is
  neither OpenAI's nor a parameter of the workflow is refused (422), as OpenAI's API refuses
  an unrecognized argument; the official client sends only the fields it is given. The
  OpenAPI document says, per model, exactly which fields (``gateway.openapi``).
- ``n`` > 1 runs n requests with seeds seed, seed+1, ..., seed+n-1, wrapping back to the
  seed's minimum past its maximum (without a seed each draws its own); they run concurrently
  and the answer comes once all have ended.
- Answer: ``{"created": UNIX_S, "output_format": FORMAT, "data": [{"b64_json": ...} |
  {"url": ".../v1/generations/ID/image"}]}``. Errors have OpenAI's shape ``{"error":
  {"message", "type", "param", "code"}}`` with our HTTP status; ``param`` names the OpenAI
  field (width and height are ``size``, output_quality is ``output_compression``).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from common import output_format
from common.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidField,
    InvalidRequest,
    LegoError,
    StillRunning,
    TerminalError,
)
from common.messages import RequestState
from common.workflow import ParamSpec, WorkflowSpec
from gateway import openapi

if TYPE_CHECKING:
    from gateway.app import Gateway

DEFAULT_MODEL = "txt2img"
MAX_N = 10  # as OpenAI's dall-e-2
#: how long the call waits for its images (the openai client's own default timeout is 600 s)
WAIT_S = 590.0

_SIZE = re.compile(r"([1-9]\d{0,4})x([1-9]\d{0,4})")  # fullmatch
#: our field names as the OpenAI request spells them
_PARAM_NAMES = {"width": "size", "height": "size", "workflow": "model",
                "output_quality": "output_compression"}
_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}

def openai_error(exc: LegoError) -> JSONResponse:
    """``exc`` in OpenAI's error shape, with its HTTP status and headers (Retry-After, ...)."""
    status = exc.http_status
    kind = _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500
                                        else "server_error")
    field = exc.details.get("field")
    param = None if field is None else _PARAM_NAMES.get(field, field)
    body = {"error": {"message": exc.message, "type": kind, "param": param, "code": exc.code}}
    return JSONResponse(body, status_code=status, headers=exc.http_headers())


class OpenAIRoute(APIRoute):
    """Routes whose errors, the API key check's included, answer in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except LegoError as exc:
                return openai_error(exc)

        return handle


router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI-compatible"])


def model_object(name: str, created: int) -> dict[str, Any]:
    """A workflow as an OpenAI model object (what ``client.models.list()`` reads)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "legodiffusion"}


@router.get("/v1/models", responses={200: openapi.ok("the workflows", "ModelList")})
async def list_models(request: Request) -> Response:
    """The workflows, as OpenAI model objects: stock OpenAI clients list models first."""
    gateway: Gateway = request.app.state.gateway
    created = int(gateway.started_at)
    return JSONResponse({"object": "list", "data": [
        model_object(name, created) for name in sorted(gateway.registry.all())]})


@router.get("/v1/models/{model}",
            responses={200: openapi.ok("the workflow", "Model"),
                       404: openapi.error("unknown model (workflow)", openai=True)})
async def get_model(model: str, request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return JSONResponse(model_object(gateway.registry.get(model).name, int(gateway.started_at)))


@router.post(
    "/v1/images/generations",
    openapi_extra=openapi.body("ImagesRequest"),
    responses={
        200: openapi.ok("the images, once all are done", "ImagesResponse"),
        404: openapi.error("unknown model (workflow)", openai=True),
        409: openapi.error("an image's request was cancelled", openai=True),
        422: openapi.error("a field out of its limits (`param` names it)", openai=True),
        500: openapi.error("a node failed an image's request (`code` says how)", openai=True),
        503: openapi.error("overloaded: the deadline cannot be met", ["Retry-After"],
                           openai=True),
        504: openapi.error("an image missed its deadline, or was not done after the wait "
                           "limit (it goes on: follow it at /v1/generations/ID)", openai=True),
    },
)
async def create_images(request: Request) -> Response:
    """Generate ``n`` images with a workflow and answer once they are done (OpenAI's API)."""
    gateway: Gateway = request.app.state.gateway
    raws, response_format = to_requests(await gateway.read_json(request),
                                        gateway.registry.all())
    for raw in raws:  # every image valid before any is queued
        gateway.ingress.parse(raw)
    accepted: list[RequestState] = []
    try:
        for raw in raws:
            accepted.append(await gateway.submit(raw))
    except LegoError:  # e.g. overloaded half way: the others are not wanted alone
        for state in accepted:
            await gateway.tracker.cancel(state.id)
        raise
    finals = await asyncio.gather(*(gateway.wait(s.id, WAIT_S) for s in accepted))
    data = []
    for state in finals:
        _check_succeeded(state)
        if response_format == "b64_json":
            image, _ = await gateway.image(state)
            data.append({"b64_json": base64.b64encode(image).decode()})
        else:
            base = str(request.base_url).rstrip("/")
            data.append({"url": f"{base}/v1/generations/{state.id}/image"})
    return JSONResponse({"created": int(time.time()),
                         "output_format": output_format.output_of(finals[0].params)[0],
                         "data": data})


def to_requests(body: Any, specs: Mapping[str, WorkflowSpec] | None = None
                ) -> tuple[list[dict[str, Any]], str]:
    """An OpenAI images request as our generation requests (one per image), and the
    response format. Every malformed OpenAI field is reported at once; ``specs``, the
    registered workflows, bound the seeds of the images (seed + i wraps past the maximum).
    A field that is null is absent, as in OpenAI's API."""
    if not isinstance(body, dict):
        raise InvalidRequest([InvalidField("body", "must be a JSON object")])
    fields = dict(body)
    user = fields.pop("user", None)  # OpenAI's end-user id for abuse monitoring: unused here
    workflow = fields.pop("model", None)
    workflow = DEFAULT_MODEL if workflow is None else workflow
    n = fields.pop("n", None)
    n = 1 if n is None else n
    size = fields.pop("size", None)
    response_format = fields.pop("response_format", None)
    response_format = "url" if response_format is None else response_format
    errors: list[InvalidField] = []
    for ours, theirs in (("workflow", "model"), ("id", None),
                         ("output_quality", "output_compression")):
        if ours in fields:
            errors.append(InvalidField(ours, f"not a field of this API; use {theirs}" if theirs
                                       else "not a field of this API (each image gets its own)"))
    if user is not None and not isinstance(user, str):
        errors.append(InvalidField("user", "must be a string"))
    if isinstance(n, float) and n.is_integer():  # 2.0 is an integer in JSON Schema too
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        errors.append(InvalidField("n", f"must be an integer from 1 to {MAX_N}", MAX_N))
    if size not in (None, "auto"):
        match = _SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            errors.append(InvalidField("size", "must be 'WIDTHxHEIGHT' (e.g. '512x512') or "
                                       "'auto'"))
        else:
            fields["width"], fields["height"] = int(match[1]), int(match[2])
    if response_format not in ("url", "b64_json"):
        errors.append(InvalidField("response_format", "must be 'url' or 'b64_json'"))
    if errors:
        raise InvalidRequest(errors)
    if "output_compression" in fields:
        fields["output_quality"] = fields.pop("output_compression")
    seed = fields.get("seed")
    spec = (specs or {}).get(workflow) if isinstance(workflow, str) else None
    seeds = spec.params.get("seed") if spec is not None else None
    raws = []
    for i in range(n):
        raw = {**fields, "workflow": workflow}
        if isinstance(seed, int) and not isinstance(seed, bool):
            raw["seed"] = _nth_seed(seed, i, seeds)
        raws.append(raw)
    return raws, response_format


def _nth_seed(seed: int, i: int, param: ParamSpec | None) -> int:
    """Image i's seed: ``seed + i``, wrapped back to the minimum past the parameter's maximum
    (an out-of-range ``seed`` stays as it is, for validation to name)."""
    nth = seed + i
    if param is None or param.maximum is None:
        return nth
    low, high = int(param.minimum or 0), int(param.maximum)
    if low <= seed <= high < nth:
        nth = low + (nth - low) % (high - low + 1)
    return nth


def _check_succeeded(state: RequestState) -> None:
    """Raise the error of a request that did not succeed (or has not ended)."""
    if not state.done:
        raise StillRunning(
            f"request {state.id} is still {state.status} after {WAIT_S:g} s; follow it at "
            f"/v1/generations/{state.id}", id=state.id,
        )
    if state.status == "succeeded":
        return
    if state.status == "cancelled":
        raise Conflict(f"request {state.id} was cancelled", id=state.id)
    info = state.error
    message = f"request {state.id} failed: {info.message if info else 'unknown error'}"
    if info is not None and info.code == DeadlineExceeded.code:
        raise DeadlineExceeded(message, id=state.id)
    details = {"id": state.id, **({"field": info.field} if info and info.field else {})}
    error = TerminalError(message, **details)
    if info is not None:
        error.code = info.code  # the node's own code (e.g. node_error) says more than ours
    raise error
