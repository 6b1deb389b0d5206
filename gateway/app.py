"""The REST gateway (FastAPI). Requests go through the same ingress code as direct NATS clients;
state is read from the KV bucket, so any replica answers for any request.

    POST   /v1/generations               202 {id, status, ...}: queued
    GET    /v1/generations/{id}          the request's state (?wait=S waits for the end)
    GET    /v1/generations               the requests kept, newest first (filters, cursor)
    GET    /v1/generations/{id}/image    the finished image (PNG, JPEG or WebP, as requested)
    GET    /v1/generations/{id}/events   state, per-step progress, final state (SSE; events.py)
    DELETE /v1/generations/{id}          cancel; nodes drop its work at the next step
    POST   /v1/images/generations        OpenAI-compatible images API (openai_api.py)
    GET    /v1/workflows                 registered workflows
    POST   /v1/workflows                 register a new workflow (YAML or JSON) at run time (admin)
    PUT    /v1/workflows/{name}          register or replace the workflow ``name`` (admin)
    DELETE /v1/workflows/{name}          unregister a workflow (admin)
    GET    /healthz, /readyz             liveness, readiness
    GET    /metrics                      Prometheus metrics (common/metrics.py)

With ``api_keys`` set, /v1/* needs ``Authorization: Bearer KEY`` (auth.py); the workflow admin
routes need a key with the ``admin`` scope (without keys: a client on this host). A registered
workflow may name only the models the operator allowed (common/modelrefs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats import errors as nats_errors
from nats.js import errors as nats_js_errors
from redis import exceptions as redis_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from common import bus, heap, history, metrics, output_format, subjects, telemetry
from common.errors import (
    Conflict,
    InvalidField,
    InvalidRequest,
    LegoError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from common.messages import Progress, RequestState, decode, encode
from common.modelinfo import LocalModelInfo
from common.modelrefs import check_model_refs
from common.observe import unstartable
from common.registry import WorkflowRegistry
from common.settings import Settings
from common.store import open_store
from common.tracking import RequestTracker
from common.workflow import WorkflowSpec, parse_workflow, shipped_workflows
from gateway import admission, auth, events, openai_api, openapi, ui
from gateway.admission import LoadWatch
from gateway.ingress import ACCEPTED_HEADER, Ingress, request_digest
from gateway.webhooks import Dispatcher

log = logging.getLogger(__name__)

#: errors of NATS and the tensor store that mean "not reachable now": a 503 with Retry-After
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    nats_errors.ConnectionClosedError, nats_errors.ConnectionReconnectingError,
    nats_errors.NoServersError, nats_errors.NoRespondersError, nats_errors.StaleConnectionError,
    nats_errors.OutboundBufferLimitError, nats_errors.TimeoutError,
    nats_js_errors.ServiceUnavailableError,
    # a stream without a leader past nats_failover_s (its NATS cluster is electing one)
    nats_js_errors.NoStreamResponseError,
    redis_errors.ConnectionError, redis_errors.TimeoutError,
)


class NatsFirst:
    """Without NATS no /v1 call can be answered: say so at once (503, Retry-After) rather
    than after the JetStream calls time out. NATS's client reconnects by itself; /readyz
    says which dependency is missing. A plain ASGI middleware: nothing added to the hot
    path but one attribute read."""

    def __init__(self, app: Any, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        gw = self.gateway
        if (scope["type"] == "http" and scope["path"].startswith("/v1/") and gw.ready
                and not gw.nc.is_connected):
            response = error_response(Unavailable(
                "NATS cannot be reached; the gateway reconnects by itself: retry shortly",
                dependency="nats"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
#: the longest /readyz waits for the store to answer
DEPENDENCY_TIMEOUT_S = 0.5
#: the longest one part of the gateway's shutdown may take (webhooks: their attempt's timeout
#: more); a part that overruns is left, named in the log, and the process ends all the same
STOP_STEP_S = 10.0
#: how long uvicorn lets open requests (a long poll, an event stream) finish at a stop
GRACEFUL_SHUTDOWN_S = 5


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = encode(body) if not isinstance(body, bytes) else body
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def error_response(exc: LegoError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status,
                        headers=exc.http_headers())


def _remember(recent: OrderedDict[str, Any], key: str, value: Any, most: int = 10_000) -> None:
    """Keep ``value`` under ``key`` among the ``most`` latest."""
    recent[key] = value
    recent.move_to_end(key)
    while len(recent) > most:
        recent.popitem(last=False)


class Gateway:
    """The gateway's connections and shared state, opened in the app's lifespan."""

    def __init__(self, settings: Settings, seed_workflows: dict[str, WorkflowSpec] | None,
                 run_ingress: bool) -> None:
        self.settings = settings
        self.seed_workflows = seed_workflows
        self.run_ingress = run_ingress
        self.progress: OrderedDict[str, Progress] = OrderedDict()
        # Final states handed to waiters: a core-NATS KV update can arrive before the stream has
        # stored it, so a read right after could still see the state before the end.
        self.ended: OrderedDict[str, RequestState] = OrderedDict()
        self.ready = False
        self.started_at = time.time()  # the models' `created` in the OpenAI listing

    async def start(self) -> None:
        settings = self.settings
        self.nc = await bus.connect(settings, name="gateway")
        self.js = self.nc.jetstream()
        self.buckets = await bus.ensure_topology(self.js, settings)
        self.store = open_store(settings)
        self.tracker = RequestTracker(self.js, self.buckets, self.store)
        self.registry = WorkflowRegistry(self.buckets[subjects.WORKFLOW_BUCKET])
        await self.registry.start(self.seed_workflows)
        self.loads = LoadWatch(self.nc, settings.admission_sample_s,
                               settings.admission_miss_target)
        await self.loads.start()
        self.ingress = Ingress(
            settings, self.js, self.registry, self.tracker, self.store,
            LocalModelInfo(settings.cache_dir / "models", settings.lora_dir), self.loads,
        )
        self.progress_sub = await self.nc.subscribe(
            subjects.PROGRESS_WILDCARD, cb=self._on_progress
        )
        self.waiters: dict[str, set[asyncio.Future[RequestState]]] = {}
        self.state_sub = await self.nc.subscribe(subjects.STATE_UPDATES, cb=self._on_state)
        await asyncio.to_thread(self._warm_up)
        self.webhooks = Dispatcher(settings, self.js, self.tracker, self.view)  # every replica
        await self.webhooks.start()
        self.stop_event = asyncio.Event()
        self.ingress_task = (
            asyncio.create_task(self.ingress.serve(self.stop_event)) if self.run_ingress else None
        )
        self.ready = True

    def _warm_up(self) -> None:
        """Load the tokenizers validation uses, so the first request does not pay for it. A
        workflow whose model cannot be read is logged and left cold: it must not stop the
        gateway from serving the others (its requests answer the error)."""
        models = self.ingress.models
        if models is None:
            return
        for spec in self.registry.all().values():
            try:
                for param in spec.params.values():
                    if param.tokenizer:
                        models.count_tokens(spec.models[param.tokenizer], "warm up")
            except Exception as exc:  # noqa: BLE001 - whatever fails, the rest are served
                log.error("workflow %s: cannot warm up its models, its requests will fail: "
                          "%s: %s", spec.name, type(exc).__name__, exc)

    def checked_workflow(self, body: bytes) -> WorkflowSpec:
        """The workflow ``body`` registers, its model names replaced by what configuration
        gives them, if it is valid and names only models it may (``check_model_refs``) that
        this gateway can read (``check_models``)."""
        if len(body) > self.settings.max_body_bytes:
            raise PayloadTooLarge("body", len(body), self.settings.max_body_bytes)
        spec = check_model_refs(parse_workflow(body), self.settings)
        self.check_models(spec)
        return spec

    def check_models(self, spec: WorkflowSpec) -> None:
        """``InvalidRequest`` naming each model that validating ``spec``'s requests reads (a
        prompt's tokenizer, a default image size) and this gateway cannot: registered, it
        would fail every request (and the gateway's next start) instead."""
        models = self.ingress.models
        errors: dict[str, InvalidField] = {}
        for name, param in spec.params.items():
            for field, alias in (("tokenizer", param.tokenizer),
                                 ("default_from", param.default_from)):
                if alias is None:
                    continue
                where = f"params.{name}.{field}"
                if alias not in spec.models:
                    errors[where] = InvalidField(where, f"{alias!r} names no model")
                    continue
                if models is None or f"models.{alias}" in errors:
                    continue
                try:
                    if field == "tokenizer":
                        models.count_tokens(spec.models[alias], "")
                    else:
                        models.native_size(spec.models[alias])
                except Exception as exc:  # noqa: BLE001 - whatever fails, it cannot be read
                    errors[f"models.{alias}"] = InvalidField(
                        f"models.{alias}", f"this gateway cannot read {spec.models[alias]!r} "
                        f"({where} needs it): {type(exc).__name__}: {exc}")
        if errors:
            raise InvalidRequest(list(errors.values()))

    async def stop(self) -> None:
        """Stop each part in turn; one that hangs is named in the log and left after
        ``STOP_STEP_S``, so a stop always ends (what it held is delivered again)."""
        self.ready = False
        self.stop_event.set()
        steps: list[tuple[str, Callable[[], Awaitable[Any]], float]] = [
            ("the ingress", self._stop_ingress, STOP_STEP_S),
            ("the webhooks", self.webhooks.stop,
             STOP_STEP_S + self.settings.webhook_timeout_s),
            ("the load watch", self.loads.stop, STOP_STEP_S),
            ("the workflow registry", self.registry.stop, STOP_STEP_S),
            ("the tensor store", self.store.close, STOP_STEP_S),
            ("the NATS connection", lambda: bus.close(self.nc), STOP_STEP_S),
        ]
        for what, step, timeout_s in steps:
            try:
                async with asyncio.timeout(timeout_s):
                    await step()
            except TimeoutError:
                log.error("stopping: %s did not stop within %g s; going on without it",
                          what, timeout_s)
                bus.log_tasks()  # where it waits

    async def _stop_ingress(self) -> None:
        if self.ingress_task:
            await self.ingress_task

    async def dependencies(self) -> dict[str, str]:
        """Each dependency: "ok", or why it cannot be used now."""
        found = {"nats": "ok" if self.nc.is_connected else
                 "unreachable (reconnecting)" if self.nc.is_reconnecting else "not connected"}
        try:
            async with asyncio.timeout(DEPENDENCY_TIMEOUT_S):
                await self.store.ping()
            found["store"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            found["store"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return found

    async def _on_progress(self, msg: Any) -> None:
        progress = decode(msg.data, Progress)
        _remember(self.progress, progress.id, progress)

    async def state(self, request_id: str) -> RequestState:
        """The request's state; ``NotFound`` for an unknown id, and for one no request can have
        (checked before it becomes a KV key or a subject: ``>`` would follow every request)."""
        if not subjects.valid_request_id(request_id):
            raise NotFound(f"id: no request {request_id!r}; ids are {subjects.REQUEST_ID_RULE}",
                           field="id")
        state = await self.tracker.get(request_id)
        if state is None:
            raise NotFound(f"id: no request {request_id!r}", field="id")
        return state if state.done else self.ended.get(request_id, state)

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, refused past ``max_body_bytes`` before it is all read."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge("body", int(declared), limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge("body", len(body), limit)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest([InvalidField("body", f"not valid JSON: {exc}")]) from None

    async def submit(self, raw: Any) -> RequestState:
        """Validate, admit and queue a generation request (the state it was accepted with; an
        idempotent re-submission gets the existing request's)."""
        request_id, spec, valid = self.ingress.parse(raw)
        digest = request_digest(spec.name, {k: v for k, v in raw.items() if k != "id"})
        admitted = await self.ingress.admit_new(request_id, raw, spec, valid)
        state, created = await self.ingress.accept(request_id, spec, valid, digest, admitted)
        deadline_s = admitted.deadline_s
        # A re-submission of a request still queued publishes it again, as it was chosen then:
        # the first try may have stored the state but not the request (a 503 while NATS
        # failed over). Where the first one did arrive, JetStream drops this copy.
        resend = not created and state.status == "queued" \
            and time.time() - state.created_at < bus.DUPLICATE_WINDOW_S
        if resend:
            valid.params.update({k: v for k, v in state.params.items()
                                 if spec.params[k].type != "image"})
            deadline_s = None if state.deadline_at is None \
                else state.deadline_at - state.created_at
        if not (created or resend):
            return state
        if self.run_ingress:
            # this process runs the ingress (its deadline watch included): it plans the request
            # and publishes the root tasks itself, before answering; if it cannot (the store is
            # down), lego.requests keeps the request until an ingress can
            try:
                await self.ingress.plan_accepted(request_id, spec, valid, state.created_at,
                                                 state.deadline_at)
                return state
            except Exception as exc:  # noqa: BLE001 - handed on below, or the publish fails
                log.warning("request %s: could not plan it here (%s: %s); queued in %s for an "
                            "ingress to plan", request_id, type(exc).__name__, exc,
                            subjects.REQUESTS_SUBJECT)
        pinned = self.ingress.pinned({**raw, "id": request_id}, spec, valid, deadline_s)
        await self.js.publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps(pinned),
            headers=telemetry.inject(  # the ingress's span continues this request's trace
                {"Nats-Msg-Id": request_id, ACCEPTED_HEADER: repr(state.created_at)}
            ),
        )
        return state

    async def image(self, state: RequestState) -> tuple[bytes, str]:
        """The finished image of a succeeded request as (file bytes, media type), in the
        format the request asked for (encoded by the first read, cached for the others)."""
        if state.status != "succeeded" or state.image is None:
            raise Conflict(f"request {state.id} is {state.status}; no image", status=state.status)
        try:
            return await output_format.image_file(self.store, state, self.settings.result_ttl_s)
        except KeyError:
            raise NotFound(f"the image of {state.id} has expired") from None

    async def _on_state(self, msg: Any) -> None:
        waiters = self.waiters.get(msg.subject.rsplit(".", 1)[-1])
        if not waiters or not msg.data:
            return
        state = decode(msg.data, RequestState)
        if state.done:
            _remember(self.ended, state.id, state)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(state)

    async def wait(self, request_id: str, timeout_s: float) -> RequestState:
        """The state once the request has ended, or as it is after ``timeout_s``."""
        waiter: asyncio.Future[RequestState] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(request_id, set()).add(waiter)
        try:
            state = await self.state(request_id)  # after subscribing: no end is missed
            if state.done or timeout_s <= 0:
                return state
            try:
                return await asyncio.wait_for(waiter, timeout_s)
            except TimeoutError:
                return await self.state(request_id)
        finally:
            waiters = self.waiters[request_id]
            waiters.discard(waiter)
            if not waiters:
                del self.waiters[request_id]

    def view(self, state: RequestState) -> dict[str, Any]:
        """The public JSON of a request: its state, progress, standing in the queues (while
        it has not ended) and links."""
        body = orjson.loads(encode(state))
        body.get("meta", {}).pop("digest", None)
        body.pop("queue", None)
        progress = self.progress.get(state.id)
        if not state.done:
            if progress:
                body["progress"] = {"node": progress.node, "step": progress.step,
                                    "total": progress.total}
            body.update(self.standing(state, progress))
        body["links"] = {"self": f"/v1/generations/{state.id}"}
        if state.status == "succeeded":
            body["links"]["image"] = f"/v1/generations/{state.id}/image"
        return body


    def standing(self, state: RequestState, progress: Progress | None) -> dict[str, Any]:
        """Where a request that has not ended stands: ``queue_position``, per pool it waits
        on, the tasks still ahead of it there (a queued request waits on its first nodes'
        pools; a running one, as far as this gateway saw its progress, runs in its node's
        pool), and ``eta_s``, the seconds until it should finish: the estimate admission
        made when it was accepted, and at least the work it still has to do."""
        loads = self.loads.loads
        position: dict[str, int] = {}
        remaining_s = 0.0
        if state.status == "queued":
            position = {pool: admission.queue_position(mark, loads.get(pool))
                        for pool, mark in state.queue.items()}
        elif progress is not None:
            try:
                spec = self.registry.get(state.workflow)
            except LegoError:  # the workflow was replaced by one without that node
                spec = None
            plan = None if spec is None else self.ingress.estimated(
                self.ingress.plan(spec), spec, state.params)
            node = None if plan is None else plan.nodes.get(progress.node)
            if plan is not None and node is not None:
                position = {node.pool: 0}
                step_s = loads[node.pool].step_s if node.pool in loads else None
                remaining_s = ((progress.total - progress.step) * (step_s or 0.0)
                               + plan.tail_s(progress.node))
        standing: dict[str, Any] = {"queue_position": position}
        if state.eta_at is not None or remaining_s:
            due_s = 0.0 if state.eta_at is None else state.eta_at - time.time()
            standing["eta_s"] = round(max(due_s, remaining_s, 0.0), 3)
        return standing


def create_app(
    settings: Settings,
    seed_workflows: dict[str, WorkflowSpec] | None = None,
    run_ingress: bool = True,
) -> FastAPI:
    """The gateway app. ``seed_workflows`` are registered at start (``lego up`` passes the
    shipped ones); ``run_ingress`` also consumes ``lego.requests`` in this process."""
    gw = Gateway(settings, seed_workflows, run_ingress)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bus.dump_tasks_on_signal()  # uvicorn runs the loop: its own handlers are for SIGINT/TERM
        await gw.start()
        heap.freeze(collect=True)  # uvicorn runs the loop, not ``bus.run_async``
        yield
        await gw.stop()
        # export the spans still batched: uvicorn ends the process by the signal it caught
        telemetry.shutdown()

    guard = auth.ApiKeyGuard(settings)
    app = FastAPI(
        title="LegoDiffusion",
        version="0.1.0",
        description="Text-to-image workflows micro-served as model nodes on NATS JetStream.",
        lifespan=lifespan,
        dependencies=[Depends(guard)] if guard.enabled else None,  # API keys on /v1/*
    )
    app.state.gateway = gw
    if telemetry.setup_tracing(settings, "lego-gateway"):
        app.add_middleware(telemetry.HttpTracing)  # a trace starts at the HTTP request
    app.include_router(ui.router)  # the web page and GET /v1/cluster
    app.include_router(events.router)  # GET /v1/generations/{id}/events (SSE)
    app.include_router(openai_api.router)  # POST /v1/images/generations

    @app.exception_handler(LegoError)
    async def _lego_error(request: Request, exc: LegoError) -> JSONResponse:
        return error_response(exc)

    app.add_middleware(NatsFirst, gateway=gw)

    for dependency_error in DEPENDENCY_ERRORS:
        @app.exception_handler(dependency_error)
        async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
            dependency = "store" if type(exc).__module__.startswith("redis") else "nats"
            log.warning("%s %s: %s unavailable: %s: %s", request.method, request.url.path,
                        dependency, type(exc).__name__, exc)
            return error_response(Unavailable(
                f"{dependency} did not answer ({type(exc).__name__}); retry shortly",
                dependency=dependency))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # our bug: the error JSON, not plain text (the server logs the traceback)
        return error_response(LegoError(f"internal error ({type(exc).__name__}); see the "
                                        "gateway's log"))

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
        # a query parameter of the wrong type (?limit=ten) answers in the API's error shape
        return error_response(InvalidRequest([
            InvalidField(str(error["loc"][-1]), error["msg"]) for error in exc.errors()
        ]))

    @app.exception_handler(StarletteHTTPException)
    async def _no_route(request: Request, exc: StarletteHTTPException) -> Response:
        # a path no route matches (an id with a "/" in it, say) is a 404 in the API's shape
        if exc.status_code == 404:
            return error_response(NotFound(f"no resource at {request.url.path!r}"))
        if exc.status_code == 405:  # Allow: the methods of every route on the path
            return error_response(MethodNotAllowed(
                request.method, request.url.path, _allowed_methods(app, request)))
        return await http_exception_handler(request, exc)

    openapi.install(app, settings, guard, openai_api.MAX_N)

    @app.post(
        "/v1/generations",
        status_code=202,
        openapi_extra=openapi.body("GenerationRequest"),
        responses={
            200: openapi.ok("with ?wait: it ended in time; its final state", "Generation",
                            ["Location"]),
            202: openapi.ok("queued (with ?wait: it had not ended in time); its state",
                            "Generation", ["Location"]),
            404: openapi.error("unknown workflow"),
            409: openapi.error("the id was given to a request with other fields"),
            413: openapi.error("the body or an image is over its byte limit"),
            422: openapi.error("a field out of its limits, or ?wait out of 0..60; each bad "
                               "one is named"),
            503: openapi.error("overloaded: the deadline cannot be met", ["Retry-After"]),
        },
    )
    async def create_generation(request: Request, wait: Wait = 0.0) -> Response:
        """Queue a generation: 202 with its id. With ``?wait=S`` (up to 60 s) the response waits
        for the end instead: 200 with the final state if it ended in time, else 202."""
        _check_wait(wait)
        state = await gw.submit(await gw.read_json(request))
        request_id = state.id
        if wait > 0:
            state = await gw.wait(request_id, wait)
        return _json(gw.view(state), status=200 if state.done and wait > 0 else 202,
                     headers={"Location": f"/v1/generations/{request_id}"})

    @app.get("/v1/generations",
             responses={200: openapi.ok("a page, newest first", "GenerationPage"),
                        422: openapi.error("a filter, limit or cursor out of its limits")})
    async def list_generations(
        workflow: str | None = None,
        status: Annotated[str | None, Query(json_schema_extra={"enum": history.STATUSES})]
        = None,
        since: Annotated[float | None, Query(description="epoch seconds")] = None,
        limit: Annotated[int | None, Query(json_schema_extra={
            "minimum": 1, "maximum": history.MAX_LIMIT, "default": history.DEFAULT_LIMIT})]
        = None,
        cursor: Annotated[str | None, Query(
            description="a next_cursor from the previous page")] = None,
    ) -> Response:
        """The requests kept (``result_ttl_s`` after their last change), newest first: each as
        GET /v1/generations/{id} shows it. Filters: ``workflow``, ``status``, ``since`` (epoch
        seconds, created at or after). ``limit``: 1 to 100 (default 20); pass ``next_cursor``
        back as ``cursor`` for the next page (null: none left)."""
        query = history.HistoryQuery.parse(workflow, status, since, limit, cursor)
        states, next_cursor = await history.page(gw.js, query)
        return _json({"data": [gw.view(s) for s in states], "next_cursor": next_cursor})

    @app.get("/v1/generations/{request_id}",
             responses={200: openapi.ok("its state", "Generation"),
                        404: openapi.error("no such request (or it expired)"),
                        422: openapi.error("?wait out of 0..60")})
    async def get_generation(request_id: str, wait: Wait = 0.0) -> Response:
        """The request's state; with ``?wait=S`` (up to 60 s) once it has ended."""
        _check_wait(wait)
        return _json(gw.view(await gw.wait(request_id, wait)))

    @app.get("/v1/generations/{request_id}/image", response_class=Response,
             responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                          for t in output_format.MEDIA_TYPES.values()},
                              "description": "the image in the request's output_format"},
                        404: openapi.error("unknown id, or the image expired"),
                        409: openapi.error("the request did not succeed (yet)")})
    async def get_image(request_id: str) -> Response:
        data, media_type = await gw.image(await gw.state(request_id))
        return Response(data, media_type=media_type)

    @app.delete("/v1/generations/{request_id}",
                responses={200: openapi.ok("cancelled: its state (kept, readable, for "
                                           "result_ttl_s)", "Generation"),
                           404: openapi.error("no such request (or it expired)"),
                           409: openapi.error("it has already ended")})
    async def cancel_generation(request_id: str) -> Response:
        state = await gw.state(request_id)
        if state.done:
            raise Conflict(f"request {request_id} already {state.status}", status=state.status)
        cancelled = await gw.tracker.cancel(request_id)
        return _json(gw.view(cancelled or await gw.state(request_id)))

    @app.get("/v1/workflows", responses={200: openapi.ok("the workflows", "Workflows")})
    async def list_workflows() -> Response:
        return _json({"workflows": [_workflow_view(s) for s in gw.registry.all().values()]})

    workflow_body = openapi.body("WorkflowSpec", ("application/json", "application/yaml"),
                                 "the workflow, as JSON or YAML (a workflow file)")
    forbidden = openapi.error("registering workflows needs an API key with the admin scope "
                              "(without API keys: a client on the gateway's host)")
    invalid_workflow = openapi.error("not a valid workflow, or a model it may not name (a URL, "
                                     "a directory outside the model roots, an unknown builtin, "
                                     "a directory its nodes cannot load); each problem is named")

    @app.post(
        "/v1/workflows", status_code=201, openapi_extra=workflow_body,
        responses={201: openapi.ok("registered", "Workflow"),
                   403: forbidden,
                   409: openapi.error("a workflow of that name is registered (replace it with "
                                      "PUT /v1/workflows/{name})"),
                   413: openapi.error("the body is over its byte limit"),
                   422: invalid_workflow},
    )
    async def add_workflow(request: Request) -> Response:
        """Register a new workflow (admin). A name already registered is a 409: replacing one,
        a shipped one included, is PUT /v1/workflows/{name}."""
        guard.require(request, auth.ADMIN)
        spec = await asyncio.to_thread(gw.checked_workflow, await request.body())
        await gw.registry.create(spec)
        return _json(_workflow_view(spec), status=201)

    @app.put(
        "/v1/workflows/{name}", status_code=200, openapi_extra=workflow_body,
        responses={200: openapi.ok("replaced", "Workflow"),
                   201: openapi.ok("registered (there was none of that name)", "Workflow"),
                   403: forbidden,
                   404: openapi.error("no such path (a name with a '/')"),
                   413: openapi.error("the body is over its byte limit"),
                   422: openapi.error("the body's name is not the path's; or " +
                                      invalid_workflow["description"])},
    )
    async def replace_workflow(name: str, request: Request) -> Response:
        """Register the workflow ``name``, replacing one of that name (admin)."""
        guard.require(request, auth.ADMIN)
        spec = await asyncio.to_thread(gw.checked_workflow, await request.body())
        if spec.name != name:
            raise InvalidRequest([InvalidField(
                "name", f"{spec.name!r} is not the workflow this path names, {name!r}")])
        existed = name in gw.registry.all()
        await gw.registry.add(spec)
        return _json(_workflow_view(spec), status=200 if existed else 201)

    @app.delete(
        "/v1/workflows/{name}", status_code=204, response_class=Response,
        responses={204: {"description": "unregistered: no gateway offers it any more (a "
                         "shipped one comes back at the next `lego up`)"},
                   403: forbidden,
                   404: openapi.error("no workflow of that name")},
    )
    async def delete_workflow(name: str, request: Request) -> Response:
        """Unregister the workflow ``name`` (admin)."""
        guard.require(request, auth.ADMIN)
        await gw.registry.delete(name)
        return Response(status_code=204)

    @app.get("/healthz", responses={200: openapi.ok("alive", "Health")})
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={200: openapi.ok("ready", "Readiness"),
                                   503: openapi.ok("not ready", "Readiness")})
    async def readyz() -> Response:
        """Ready when started and every dependency answers; ``dependencies`` says which
        does not (``nats``, ``store``) and why. ``unstartable``: the pools none of whose
        replicas can load their model, with the error (the gateway stays ready: the
        workflows that do not need them are served; theirs answer 503)."""
        dependencies = await gw.dependencies() if gw.ready else {}
        ok = gw.ready and all(v == "ok" for v in dependencies.values())
        failing = unstartable(gw.loads.observer.live_statuses()) if gw.ready else {}
        return _json({"ready": ok, "dependencies": dependencies,
                      "unstartable": {pool: s.error or "" for pool, s in failing.items()}},
                     status=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return app


#: ?wait=S: how long a call may wait for the request's end (checked by ``_check_wait``)
Wait = Annotated[float, Query(description="seconds to wait for the end, 0 to 60",
                              json_schema_extra={"minimum": 0, "maximum": 60})]


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (Starlette's own 405
    names only the first such route's)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _check_wait(wait: float) -> None:
    if not 0 <= wait <= 60:
        raise InvalidRequest([InvalidField("wait", f"{wait} is not between 0 and 60 seconds", 60)])


def _workflow_view(spec: WorkflowSpec) -> dict[str, Any]:
    body = spec.model_dump(exclude_defaults=True)
    body["pools"] = sorted(spec.pools())
    return body


def serve(settings: Settings, seed_builtin: bool = False) -> None:
    """Run the gateway (with an ingress consumer) until interrupted."""
    import uvicorn

    seed = shipped_workflows(settings) if seed_builtin else None
    app = create_app(settings, seed)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                loop="auto", http="auto",  # uvloop and httptools when installed
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)

