"""Tracing: one OpenTelemetry trace per request, across the gateway, the ingress and every node.

Context travels in NATS message headers as W3C ``traceparent`` (``inject`` when publishing,
the ``headers=`` of ``start_span``/``span`` when consuming). Each process calls
``setup_tracing`` once; tracing is on only when the settings name somewhere to send spans:

- ``otlp_endpoint``: an OTLP/HTTP collector (Jaeger, Tempo, the OpenTelemetry Collector...);
- ``trace_dir``: one JSON-lines file of finished spans per process (tests, debugging).

Off (the default), every function here returns at its first line: no span, no context, no
header is created. The spans of a request::

    POST /v1/generations          (gateway, when the request came over HTTP)
    └─ ingress                    validate, plan, publish the root tasks
       └─ node <name>             one per task, from its publication to its ack
          ├─ queue_wait           published -> fetched
          ├─ store.get            its inputs
          ├─ execute              its core steps (first step start -> last step end)
          ├─ store.put            its outputs
          └─ node <successor>     ... the next node's task, and so on
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.settings import Settings

log = logging.getLogger(__name__)

#: the span exporter's batching delay: spans reach the collector within about this
EXPORT_DELAY_MS = 1000

_propagator = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None  # None: tracing is off in this process
_provider: Any = None
_NOTHING = contextlib.nullcontext()  # what the context managers return when tracing is off


def enabled() -> bool:
    return _tracer is not None


def setup_tracing(
    settings: Settings,
    service: str,
    attributes: Mapping[str, str] | None = None,
    exporter: Any = None,
) -> bool:
    """Turn tracing on in this process if ``settings`` (or an explicit span ``exporter``, e.g.
    an in-memory one in a test) ask for it. Returns whether tracing is on. Never turns it off:
    several components of one process may each call this."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    exporters = [] if exporter is None else [exporter]
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter(endpoint=otlp_traces_url(settings.otlp_endpoint)))
    if settings.trace_dir:
        exporters.append(_jsonl_exporter(settings.trace_dir, service))
    if not exporters:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service, **(attributes or {})})
    provider = TracerProvider(resource=resource)  # flushes at interpreter exit
    for each in exporters:
        provider.add_span_processor(
            BatchSpanProcessor(each, schedule_delay_millis=EXPORT_DELAY_MS)
        )
    _provider, _tracer = provider, provider.get_tracer("legodiffusion")
    log.info("tracing on: %s", ", ".join(type(e).__name__ for e in exporters))
    return True


def shutdown() -> None:
    """Export what is pending and turn tracing off (at exit it happens by itself)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def otlp_traces_url(endpoint: str) -> str:
    """The traces URL of an OTLP/HTTP endpoint given as a base (``http://host:4318``)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def _jsonl_exporter(directory: Any, service: str) -> Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    os.makedirs(directory, exist_ok=True)
    out = open(os.path.join(directory, f"{service}-{os.getpid()}.jsonl"), "a")  # noqa: SIM115
    return ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")


# --- propagation ----------------------------------------------------------------------------


def inject(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the current span's ``traceparent`` (as they are when tracing is off)."""
    if _tracer is not None:
        _propagator.inject(headers)
    return headers


def _parent(headers: Mapping[str, str] | None) -> otel_context.Context | None:
    return _propagator.extract(headers) if headers else None


# --- spans ----------------------------------------------------------------------------------


def _ns(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1e9)


def span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> contextlib.AbstractContextManager:
    """A span around a block, made current (so nested spans and ``inject`` see it): the child
    of the ``traceparent`` in ``headers`` when given, else of the current span. Records an
    exception that leaves the block. A no-op when tracing is off."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(
        name, context=_parent(headers), kind=kind, attributes=attributes
    )


def start_span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    start_s: float | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> trace.Span | None:
    """A span that outlives a block (``end`` it): the child of the ``traceparent`` in
    ``headers`` (a new trace without one), starting at ``start_s`` (epoch seconds; default
    now). None when tracing is off."""
    if _tracer is None:
        return None
    return _tracer.start_span(
        name, context=_parent(headers), kind=kind, attributes=attributes, start_time=_ns(start_s)
    )


def record_span(
    name: str,
    parent: trace.Span | None,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, Any] | None = None,
) -> None:
    """A finished child of ``parent`` that happened between ``start_s`` and ``end_s`` (epoch
    seconds): for what is only known afterwards, like a queue wait."""
    if parent is None or _tracer is None:
        return
    child = _tracer.start_span(
        name, context=trace.set_span_in_context(parent), attributes=attributes,
        start_time=_ns(start_s),
    )
    child.end(end_time=_ns(max(start_s, end_s)))


def within(parent: trace.Span | None) -> contextlib.AbstractContextManager:
    """Make ``parent`` current for a block (without ending it), so the spans and ``inject``
    calls inside belong to it."""
    if parent is None:
        return _NOTHING
    return trace.use_span(parent, end_on_exit=False)


def end(
    span_: trace.Span | None, error: BaseException | None = None, outcome: str | None = None
) -> None:
    """End a span from ``start_span``: an error marks it failed, ``outcome`` says how it ended."""
    if span_ is None:
        return
    if outcome is not None:
        span_.set_attribute("lego.outcome", outcome)
    if error is not None:
        span_.record_exception(error)
        span_.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span_.end()


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add attributes to the current span (when tracing is on and there is one)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


# --- HTTP -----------------------------------------------------------------------------------

#: probes and scrapes would each make a trace of their own: not worth it
_UNTRACED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class HttpTracing:
    """ASGI middleware: one server span per HTTP request, named by its route (the child of a
    client's ``traceparent`` if it sent one). Add it only when tracing is on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _tracer is None or scope["path"] in _UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        with _tracer.start_as_current_span(
            f"{method} {scope['path']}", context=_parent(headers), kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as current:

            async def send_traced(message: dict) -> None:
                if message["type"] == "http.response.start":
                    current.set_attribute("http.response.status_code", message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = scope.get("route")  # set by FastAPI's router once it matched
                path = getattr(route, "path", None)
                if path:
                    current.update_name(f"{method} {path}")
