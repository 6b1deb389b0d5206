"""Prometheus metrics of the real stack: the gateway's ``GET /metrics``, every node's and the
autoscaler's endpoints move with a request, with the right labels; and every metric the Grafana
dashboard queries is one we export."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from legoclient import LegoClient, LegoError
from prometheus_client.parser import text_string_to_metric_families

from common.messages import ReplicaStatus
from lego.stack import free_port
from tests.conftest import nats_server
from tests.stackutil import ReplicaWatch, running_stack

pytestmark = pytest.mark.timeout(300)

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "legodiffusion.json"
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def until(read: Callable[[], Samples], ok: Callable[[Samples], bool], timeout_s: float = 20) -> (
        Samples):
    """Scrape until ``ok`` (replicas report their counters once a second)."""
    deadline = time.monotonic() + timeout_s
    while not ok(samples := read()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return samples


def ready_replicas(settings: object, kinds: set[str]) -> dict[str, ReplicaStatus]:
    """A ready replica of each node kind, once it reports its metrics port."""

    async def watch() -> dict[str, ReplicaStatus]:
        async with ReplicaWatch(settings) as replicas:  # type: ignore[arg-type]
            return await replicas.until(lambda: (found := {
                s.kind: s for s in replicas.latest.values()
                if s.state == "ready" and s.metrics_port}) and set(found) >= kinds and found)

    return asyncio.run(watch())


def test_metrics_move_with_a_request(tmp_path: Path, cache_dir: Path) -> None:
    autoscaler_port = free_port()
    with nats_server(tmp_path / "nats") as url, running_stack(
        tmp_path, url, cache_dir, workflows=["txt2img"], node_metrics_port=0,
        autoscaler_metrics_port=autoscaler_port,
    ) as stack, LegoClient(stack.gateway_url) as client:
        nodes = ready_replicas(stack.settings, {"text_encoder", "denoiser", "vae_decoder"})
        node_urls = {kind: f"http://127.0.0.1:{s.metrics_port}/metrics"
                     for kind, s in nodes.items()}
        gateway_url = f"{stack.gateway_url}/metrics"
        autoscaler_url = f"http://127.0.0.1:{autoscaler_port}/metrics"
        before = {name: scrape(u) for name, u in [("gateway", gateway_url), *node_urls.items()]}

        state, png = client.generate("txt2img", prompt="counted", steps=2, seed=3)
        assert state.status == "succeeded"
        with pytest.raises(LegoError):
            client.submit("no-such-workflow", prompt="x")

        # gateway and ingress: submissions by outcome, requests by final status, store reads
        gw = until(lambda: scrape(gateway_url), lambda s: value(
            s, "lego_requests_finished_total", workflow="txt2img", status="succeeded") >= 1)

        def moved(name: str, samples: Samples, where: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before[where], name, **labels)

        assert moved("lego_requests_total", gw, "gateway", workflow="txt2img",
                     outcome="accepted") == 1
        assert moved("lego_requests_total", gw, "gateway", workflow="unknown",
                     outcome="invalid") == 1
        assert moved("lego_requests_finished_total", gw, "gateway", workflow="txt2img",
                     status="succeeded") == 1
        image_bytes = 64 * 64 * 3  # the image download reads the finished (1, 64, 64, 3) uint8
        assert moved("lego_store_operations_total", gw, "gateway", store="shm", op="get") == 1
        assert moved("lego_store_bytes_total", gw, "gateway", store="shm",
                     op="get") == image_bytes

        # nodes: queue wait, execution, batch sizes, tasks, store I/O, their own report
        exported = set(gw)
        scraped: dict[str, Samples] = {}
        for kind, status in nodes.items():
            pool = status.pool
            samples = until(lambda u=node_urls[kind]: scrape(u), lambda s, p=pool: value(
                s, "lego_node_tasks_total", pool=p, outcome="done") >= 1)
            exported |= set(samples)
            scraped[kind] = samples
            for histogram in ("lego_node_queue_wait_seconds", "lego_node_execution_seconds"):
                assert moved(f"{histogram}_count", samples, kind, pool=pool) == 1, histogram
                assert moved(f"{histogram}_sum", samples, kind, pool=pool) > 0, histogram
            steps = 2 if kind == "denoiser" else 1
            assert moved("lego_node_batch_size_count", samples, kind, pool=pool) == steps
            assert moved("lego_node_batch_size_sum", samples, kind, pool=pool) == steps
            assert value(samples, "lego_node_tasks_total", pool=pool, replica=status.replica,
                         outcome="done") == 1
            assert value(samples, "lego_node_state", pool=pool, state="ready") == 1
            assert value(samples, "lego_node_load_seconds", pool=pool) > 0
            assert value(samples, "lego_node_startup_seconds", pool=pool) >= value(
                samples, "lego_node_load_seconds", pool=pool)
            assert moved("lego_store_operations_total", samples, kind, op="put") == 1
            assert moved("lego_store_bytes_total", samples, kind, op="put") > 0
            reads = 0 if kind == "text_encoder" else 1  # the encoder's input is the prompt
            assert moved("lego_store_operations_total", samples, kind, op="get") == reads
        assert moved("lego_store_bytes_total", scraped["vae_decoder"], "vae_decoder",
                     op="put") == image_bytes

        # the autoscaler: lag per pool, replicas by state, desired counts, scale events
        scaler = scrape(autoscaler_url)
        exported |= set(scaler)
        for status in nodes.values():
            assert ("lego_pool_lag", frozenset({("pool", status.pool)})) in scaler
            assert value(scaler, "lego_pool_replicas", pool=status.pool, state="ready") >= 1
            assert value(scaler, "lego_pool_desired_replicas", pool=status.pool) >= 1
            assert value(scaler, "lego_autoscaler_scale_events_total", pool=status.pool,
                         direction="up") >= 1

    check_dashboard(exported)


def check_dashboard(exported: set[tuple[str, frozenset]]) -> None:
    """Every metric a dashboard query names is exported, with the labels it groups by."""
    labels_of: dict[str, set[str]] = {}
    for name, labels in exported:
        labels_of.setdefault(name, set()).update(k for k, _ in labels)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    titles = {p["title"] for p in panels}
    assert {"Lag per pool", "Replicas by state", "Queue wait p50 / p99 per pool",
            "Execution p50 / p99 per pool", "Mean batch size per pool", "Requests by outcome",
            "Store throughput"} <= titles
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\blego_\w+", expr)
        assert names, expr
        grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for g in by.split(",")}
        for name in names:
            assert name in labels_of, f"{name} (in {expr!r}) is not exported"
            assert grouped <= labels_of[name], f"{expr!r}: {name} has {labels_of[name]}"
