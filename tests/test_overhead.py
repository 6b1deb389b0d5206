"""``lego bench overhead``'s analysis: a request's wall time cut along its trace's critical path
(the spans as the stack's processes write them with ``trace_dir``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import telemetry
from common.settings import Settings
from lego.overhead import Span, breakdown, critical_path, read_spans, summarize


def _span(name: str, span_id: str, start: float, end: float, parent: str | None = None,
          trace: str = "t1", **attributes: object) -> Span:
    return Span(name, trace, span_id, parent, start, end, dict(attributes))


def _node(node: str, span_id: str, start: float, end: float, **extra: object) -> Span:
    return _span(f"node {node}", span_id, start, end, None, **{
        "lego.request_id": "r1", "lego.node": node, "lego.outcome": "done", **extra})


def _request() -> list[Span]:
    """Two encoders in parallel (the slower one on the path), a denoiser, a decoder."""
    return [
        _span("POST /v1/generations", "p", 0.010, 0.900),
        _span("ingress", "i", 0.020, 0.030, "p"),
        _node("encode_a", "a", 0.028, 0.100), _node("encode_b", "b", 0.029, 0.060),
        _span("queue_wait", "aq", 0.028, 0.031, "a"),
        _span("execute", "ax", 0.032, 0.080, "a"),
        _span("store.put", "as", 0.081, 0.085, "a"),
        _node("denoise", "d", 0.090, 0.700),
        _span("queue_wait", "dq", 0.090, 0.092, "d"),
        _span("store.get", "dg1", 0.092, 0.094, "d"),
        _span("store.get", "dg2", 0.094, 0.095, "d"),
        _span("execute", "dx", 0.095, 0.680, "d"),
        _node("decode", "v", 0.690, 0.890),
        _span("execute", "vx", 0.700, 0.850, "v"),
        _span("store.put", "vs", 0.851, 0.855, "v"),
        _span("request.finish", "vf", 0.856, 0.870, "v"),
        _node("decode", "v0", 0.600, 0.610, **{"lego.outcome": "handed_back"}),
        _span("GET /v1/generations/{request_id}/image", "g", 0.910, 0.915, trace="t2",
              **{"url.path": "/v1/generations/r1/image"}),
        _span("GET /v1/generations/{request_id}/image", "o", 0.910, 0.915, trace="t3",
              **{"url.path": "/v1/generations/other/image"}),
    ]


def test_the_critical_path_follows_who_published_each_task() -> None:
    nodes = [s for s in _request() if s.name.startswith("node ")
             and s.attributes["lego.outcome"] == "done"]
    assert [s.span_id for s in critical_path(nodes)] == ["a", "d", "v"]


def test_the_parts_add_up_to_the_wall_time() -> None:
    parts = breakdown(_request(), "r1", 0.0, 1.0)
    assert sum(parts.values()) == pytest.approx(1.0)
    assert parts["http_in"] == pytest.approx(0.010)
    assert parts["submit"] == pytest.approx(0.010)
    assert parts["ingress"] == pytest.approx(0.008)  # until the first task's publication
    assert parts["encode_a.queue"] == pytest.approx(0.003)
    assert parts["encode_a.execute"] == pytest.approx(0.048)
    assert parts["encode_a.store"] == pytest.approx(0.004)
    # the encoder's part ends where the denoiser's task was published
    assert parts["encode_a.other"] == pytest.approx(0.062 - 0.055)
    assert parts["denoise.load"] == pytest.approx(0.003)  # both reads
    assert parts["denoise.other"] == pytest.approx(0.600 - 0.590)
    assert parts["decode.execute"] == pytest.approx(0.150)
    assert parts["decode.finish"] == pytest.approx(0.014)  # the final state write
    assert parts["decode.other"] == pytest.approx(0.180 - 0.168)
    assert parts["answer"] == pytest.approx(0.030)  # its end to the gateway's answer
    assert parts["image"] == pytest.approx(0.005)  # its own download only
    assert parts["client"] == pytest.approx(1.0 - 0.900 - 0.005)
    assert not any(k.startswith("encode_b") for k in parts)  # off the path
    with pytest.raises(ValueError, match="no node spans for request r2"):
        breakdown(_request(), "r2", 0.0, 1.0)


def test_summarize_gives_medians_in_ms() -> None:
    rows = [{"submit": 0.001, "x.execute": 0.010}, {"submit": 0.003}, {"submit": 0.002}]
    result = summarize(rows, [0.050, 0.060, 0.070], [0.040, 0.040, 0.045])
    assert result["total_ms"] == 60.0 and result["inprocess_ms"] == 40.0
    assert result["overhead_ms"] == 20.0 and result["requests"] == 3
    assert result["parts"] == {"submit": 2.0, "x.execute": 0.0}


def test_spans_are_read_back_from_the_trace_directory(tmp_path: Path) -> None:
    """What the stack's processes write with ``trace_dir`` is what the analysis reads."""
    assert telemetry.setup_tracing(Settings(trace_dir=tmp_path), "test-overhead")
    try:
        node = telemetry.start_span("node encode", {"lego.request_id": "r9",
                                                    "lego.node": "encode"}, start_s=100.0)
        telemetry.record_span("queue_wait", node, 100.0, 100.25)
        telemetry.end(node)
    finally:
        telemetry.shutdown()
    spans = {s.name: s for s in read_spans(tmp_path)}
    assert spans["queue_wait"].start == pytest.approx(100.0)
    assert spans["queue_wait"].end == pytest.approx(100.25)
    assert spans["queue_wait"].parent_id == spans["node encode"].span_id
    assert spans["node encode"].attributes["lego.request_id"] == "r9"
    assert all(json.loads(line) for path in tmp_path.glob("*.jsonl")
               for line in path.read_text().splitlines())
