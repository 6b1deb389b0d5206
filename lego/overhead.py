"""``lego bench overhead``: where each millisecond of a micro-served request goes.

The embedded stack (tiny models, its own nats-server, the shared-memory store) runs with
tracing to a directory (``trace_dir``); requests go one at a time over HTTP, alternating with
the same models in this process (diffusers' pipeline, as ``lego bench e2e``). Each request's
wall time is then cut along its trace's critical path, so the parts add up to the total:

- ``http_in``: the client's request until the gateway's server span starts;
- ``submit``: the gateway (validation, admission, the state write, the publish) until the
  ingress takes the request;
- ``ingress``: planning, and publishing the root tasks;
- per node on the critical path (``encode.queue`` ...): ``queue`` from its task's publication
  to its fetch, ``load`` its input tensors' store reads, ``execute`` the model,
  ``store`` its output's store writes, ``finish`` (the last node) the request's final state
  write, ``other`` the rest of its part of the path (judging the task, publishing the next);
- ``answer``: from there until the gateway answers (the final state's watch, the response);
- ``image``: the image download's server span;
- ``client``: the rest (the HTTP client, the gaps between its calls).

Tracing costs a little itself; ``lego bench e2e`` measures the same requests with it off.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.settings import Settings

#: what a node span's children are called, and the part each one's time counts to
NODE_PARTS = {"queue_wait": "queue", "store.get": "load", "execute": "execute",
              "store.put": "store", "request.finish": "finish"}


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: float  # epoch seconds
    end: float
    attributes: dict[str, Any] = field(default_factory=dict)


def _epoch(iso: str) -> float:
    """OpenTelemetry's JSON time (UTC, microseconds) as epoch seconds."""
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


def read_spans(directory: Path) -> list[Span]:
    """Every span the stack's processes wrote to ``directory`` (one JSON object a line)."""
    spans = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            raw = json.loads(line)
            if raw.get("start_time") is None or raw.get("end_time") is None:
                continue
            spans.append(Span(raw["name"], raw["context"]["trace_id"], raw["context"]["span_id"],
                              raw.get("parent_id"), _epoch(raw["start_time"]),
                              _epoch(raw["end_time"]), raw.get("attributes") or {}))
    return spans


def _clip(span: Span, lo: float, hi: float) -> float:
    return max(0.0, min(span.end, hi) - max(span.start, lo))


def critical_path(nodes: Sequence[Span]) -> list[Span]:
    """The node spans the request's end waited on, first to last: from the last to start,
    back through the span that published each (the latest one running when it was
    published; a task's span starts at its publication)."""
    path = [max(nodes, key=lambda s: s.start)]
    while True:
        head = path[0]
        before = [s for s in nodes if s.start < head.start <= s.end and s not in path]
        if not before:
            return path
        path.insert(0, max(before, key=lambda s: s.start))


def breakdown(spans: Iterable[Span], request_id: str, client_start: float,
              client_end: float) -> dict[str, float]:
    """One request's wall time (``client_start`` .. ``client_end``, epoch seconds) in parts,
    in seconds, from its spans (its trace's, and its image download's)."""
    spans = list(spans)
    nodes = [s for s in spans if s.attributes.get("lego.request_id") == request_id
             and s.name.startswith("node ")
             and s.attributes.get("lego.outcome", "done") == "done"]  # not handed back
    if not nodes:
        raise ValueError(f"no node spans for request {request_id}")
    trace_id = nodes[0].trace_id
    trace = [s for s in spans if s.trace_id == trace_id]
    [submit] = [s for s in trace if s.name.startswith("POST ") and s.parent_id is None]
    [ingress] = [s for s in trace if s.name == "ingress"]
    image = [s for s in spans if s.name.startswith("GET ") and s.parent_id is None
             and str(s.attributes.get("url.path", "")).endswith(f"{request_id}/image")]
    path = critical_path(nodes)
    parts: dict[str, float] = {
        "http_in": submit.start - client_start,
        "submit": ingress.start - submit.start,
        "ingress": path[0].start - ingress.start,
    }
    # the last node's part ends with its last recorded work (the request's final state)
    last = [c.end for c in trace if c.parent_id == path[-1].span_id] or [path[-1].end]
    bounds = [s.start for s in path[1:]] + [min(max(last), submit.end)]
    for span, until in zip(path, bounds, strict=True):
        node = span.attributes.get("lego.node", span.name.removeprefix("node "))
        own: dict[str, float] = {}
        for child in trace:
            part = NODE_PARTS.get(child.name)
            if part is not None and child.parent_id == span.span_id:
                own[part] = own.get(part, 0.0) + _clip(child, span.start, until)
        own["other"] = until - span.start - sum(own.values())
        parts.update({f"{node}.{part}": seconds for part, seconds in own.items()})
    parts["answer"] = submit.end - bounds[-1]
    parts["image"] = sum(s.end - s.start for s in image)
    parts["client"] = (client_end - client_start) - sum(parts.values())
    return parts


def summarize(rows: Sequence[dict[str, float]], totals: Sequence[float],
              inprocess: Sequence[float]) -> dict[str, Any]:
    """Medians in ms: the total, the in-process run and each part (a part's median over the
    requests; they need not add up exactly to the total's median)."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    parts = {k: round(statistics.median(row.get(k, 0.0) for row in rows) * 1000, 3)
             for k in names}
    total_ms = statistics.median(totals) * 1000
    inprocess_ms = statistics.median(inprocess) * 1000
    return {"total_ms": round(total_ms, 2), "inprocess_ms": round(inprocess_ms, 2),
            "overhead_ms": round(total_ms - inprocess_ms, 2), "parts": parts,
            "requests": len(rows)}


def bench_overhead(settings: Settings, iterations: int) -> dict[str, Any]:
    """``alternate``'s requests with tracing to a temporary directory, summarized."""
    from lego.bench import alternate

    with tempfile.TemporaryDirectory() as tmp:
        traces = Path(tmp) / "traces"
        runs = alternate(settings.model_copy(update={"trace_dir": traces}), iterations,
                         direct=False)
        spans = read_spans(traces)
    rows = [breakdown(spans, run.request_id, run.started_at, run.started_at + run.micro_s)
            for run in runs]
    return summarize(rows, [r.micro_s for r in runs], [r.inprocess_s for r in runs])


def print_overhead(result: dict[str, Any]) -> None:
    print(f"micro-served  {result['total_ms']:8.2f} ms (median of {result['requests']})")
    print(f"in-process    {result['inprocess_ms']:8.2f} ms")
    print(f"overhead      {result['overhead_ms']:8.2f} ms")
    for name, ms in result["parts"].items():
        print(f"  {name:<22}{ms:8.3f} ms")
