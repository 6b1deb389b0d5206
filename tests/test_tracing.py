"""Tracing: off by default and then inert; on, one trace per request across processes.

The end-to-end test runs the real stack (gateway, ingress, one node process per pool) with
``otlp_endpoint`` pointing at a tiny OTLP/HTTP collector in this test, which decodes the
protobuf the exporters send, and checks every request's trace: one trace id from the gateway
through every node, with queue-wait, execution and store spans, and the right parents.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from legoclient import LegoClient, NatsClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from PIL import Image

from common import telemetry
from common.settings import Settings
from tests.conftest import nats_server
from tests.stackutil import running_stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _tracing_off_after() -> Iterator[None]:
    yield
    telemetry.shutdown()  # tracing is per process: leave none on for other tests


# --- in one process ---------------------------------------------------------------------------


def test_off_by_default_creates_nothing() -> None:
    assert not telemetry.setup_tracing(Settings(), "test")
    assert not telemetry.enabled()
    assert telemetry.inject({"Nats-Msg-Id": "x"}) == {"Nats-Msg-Id": "x"}
    assert telemetry.start_span("s", headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16
                                              + "-01"}) is None
    with telemetry.span("s") as inside:
        assert inside is None
    assert telemetry.within(None) is telemetry.span("t")  # the one shared no-op


def test_trace_dir_spans_and_propagation(tmp_path: Path) -> None:
    """Spans as JSON lines, one file per process; a context injected into headers is continued
    by whoever extracts it."""
    assert telemetry.setup_tracing(Settings(trace_dir=tmp_path), "test-svc")
    with telemetry.span("publisher", {"lego.node": "a"}):
        headers = telemetry.inject({"Nats-Msg-Id": "r:a"})
    assert headers["traceparent"].startswith("00-")
    consumer = telemetry.start_span("consumer", headers=headers, start_s=time.time() - 0.5)
    telemetry.record_span("queue_wait", consumer, time.time() - 0.5, time.time())
    with telemetry.within(consumer), telemetry.span("child"):
        pass
    telemetry.end(consumer, ValueError("boom"), "failed")
    telemetry.shutdown()
    [path] = tmp_path.glob("test-svc-*.jsonl")
    spans = {s["name"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert set(spans) == {"publisher", "consumer", "queue_wait", "child"}
    trace_ids = {s["context"]["trace_id"] for s in spans.values()}
    assert len(trace_ids) == 1
    assert spans["consumer"]["parent_id"] == spans["publisher"]["context"]["span_id"]
    for name in ("queue_wait", "child"):
        assert spans[name]["parent_id"] == spans["consumer"]["context"]["span_id"]
    assert spans["consumer"]["status"]["status_code"] == "ERROR"
    assert spans["consumer"]["attributes"]["lego.outcome"] == "failed"
    assert spans["publisher"]["resource"]["attributes"]["service.name"] == "test-svc"


def test_otlp_url() -> None:
    assert telemetry.otlp_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert telemetry.otlp_traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"


# --- a tiny OTLP/HTTP collector -----------------------------------------------------------------


@dataclass
class SpanRecord:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)


class Collector:
    """Receives OTLP/HTTP protobuf exports (``POST /v1/traces``) and keeps their spans."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, export: ExportTraceServiceRequest) -> None:
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                with self.lock:
                    self.spans += [SpanRecord(
                        name=s.name, service=resource["service.name"],
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                    ) for s in scope.spans]

    def trace_of(self, request_id: str) -> list[SpanRecord]:
        """Every span of the trace(s) that carry ``request_id``."""
        with self.lock:
            spans = list(self.spans)
        ids = {s.trace_id for s in spans if s.attributes.get("lego.request_id") == request_id}
        return [s for s in spans if s.trace_id in ids]

    def wait_for(self, request_id: str, names: set[str], timeout_s: float = 30.0) -> list:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace_of(request_id)
            if names <= {s.name for s in spans} or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)

    @contextlib.contextmanager
    def running(self) -> Iterator[Collector]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


def _value(value: object) -> object:
    return getattr(value, value.WhichOneof("value"))  # type: ignore[attr-defined]


# --- through the real stack -------------------------------------------------------------------


def _png_b64() -> str:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _check_trace(spans: list[SpanRecord], request_id: str, nodes: dict[str, str]) -> dict:
    """One trace; ``nodes``: node -> the node whose span is its parent ("ingress" for roots).
    Returns the node spans by node."""
    assert len({s.trace_id for s in spans}) == 1, "one trace per request"
    by_id = {s.span_id: s for s in spans}
    ingress = [s for s in spans if s.name == "ingress"]
    assert len(ingress) == 1 and ingress[0].service == "lego-gateway"
    assert ingress[0].attributes["lego.request_id"] == request_id
    node_spans = {s.attributes["lego.node"]: s for s in spans if s.name.startswith("node ")}
    assert set(node_spans) == set(nodes)
    for node, parent in nodes.items():
        span = node_spans[node]
        assert span.service == "lego-node"
        assert span.attributes["lego.request_id"] == request_id
        assert span.attributes["lego.outcome"] == "done"
        expected_parent = ingress[0] if parent == "ingress" else node_spans[parent]
        assert span.parent_id == expected_parent.span_id, f"{node}'s parent is {parent}"
        children = [s for s in spans if s.parent_id == span.span_id]
        names = [s.name for s in children]
        assert names.count("queue_wait") == 1 and names.count("execute") == 1, names
        assert "store.put" in names  # its outputs, or the finished image
        for child in children:
            if child.name.startswith("node "):
                continue  # a successor's task: it outlives its publisher's
            assert span.start_ns <= child.start_ns <= child.end_ns <= span.end_ns, child.name
        [wait] = [s for s in children if s.name == "queue_wait"]
        assert wait.start_ns == span.start_ns  # a task's span starts when it was published
    # every span hangs off the one root
    roots = [s for s in spans if s.parent_id not in by_id]
    assert len(roots) == 1
    return node_spans


def test_one_trace_per_request_through_the_stack(tmp_path: Path, cache_dir: Path) -> None:
    with Collector().running() as collector, nats_server(tmp_path / "nats") as url, \
            running_stack(tmp_path, url, cache_dir, otlp_endpoint=collector.url,
                          workflows=["txt2img", "img2img"], autoscale=False) as stack, \
            LegoClient(stack.gateway_url) as client:
        state, _ = client.generate("txt2img", prompt="a traced fox", steps=2, seed=1)
        want = {"POST /v1/generations", "ingress", "node encode", "node denoise",
                "node decode", "execute", "queue_wait", "store.get", "store.put"}
        spans = collector.wait_for(state.id, want)
        assert want <= {s.name for s in spans}, sorted({s.name for s in spans})
        nodes = _check_trace(spans, state.id, {
            "encode": "ingress", "denoise": "encode", "decode": "denoise"})
        [http] = [s for s in spans if s.name == "POST /v1/generations"]
        assert http.parent_id == "" and http.service == "lego-gateway"
        assert http.attributes["lego.outcome"] == "accepted"
        assert [s for s in spans if s.name == "ingress"][0].parent_id == http.span_id
        # the nodes that read inputs read them inside their own span
        for node in ("denoise", "decode"):
            assert any(s.name == "store.get" and s.parent_id == nodes[node].span_id
                       for s in spans)
        [execute] = [s for s in spans
                     if s.name == "execute" and s.parent_id == nodes["denoise"].span_id]
        assert execute.attributes["lego.steps"] == 2

        # a join (img2img: the image encoder and the text encoder both feed the denoiser): the
        # request's uploaded image is stored in the ingress's span, and the last predecessor
        # to arrive publishes the denoiser's task
        state, _ = client.generate("img2img", prompt="a traced cat", image=_png_b64(),
                                   strength=0.5, steps=2, seed=2)
        # (each process exports on its own, about once a second: wait for all of them)
        want = {"ingress", "node encode", "node encode_image", "node denoise", "node decode"}
        spans = collector.wait_for(state.id, want)
        # whichever predecessor arrived last published the denoiser's task: its parent
        node_spans = {s.attributes["lego.node"]: s for s in spans if s.name.startswith("node ")}
        parent = next(n for n in ("encode", "encode_image")
                      if node_spans["denoise"].parent_id == node_spans[n].span_id)
        _check_trace(spans, state.id, {"encode": "ingress", "encode_image": "ingress",
                                          "denoise": parent, "decode": "denoise"})
        ingress = next(s for s in spans if s.name == "ingress")
        assert any(s.name == "store.put" and s.parent_id == ingress.span_id for s in spans)

        # straight over NATS, without a traceparent: the ingress starts the trace
        async def over_nats() -> str:
            async with NatsClient(stack.settings.nats_url) as nats_client:
                result = await nats_client.generate(
                    "txt2img", prompt="direct", steps=1, timeout_s=60)
                return result.id

        request_id = asyncio.run(over_nats())
        spans = collector.wait_for(request_id, {"ingress", "node encode", "node denoise",
                                                "node decode"})
        _check_trace(spans, request_id, {"encode": "ingress", "denoise": "encode",
                                         "decode": "denoise"})
        assert next(s for s in spans if s.name == "ingress").parent_id == ""
