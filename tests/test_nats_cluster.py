"""The stack's NATS on a real cluster: three nats-server processes routed to each other on
loopback, streams, buckets and consumers at R3 (``stream_replicas=3``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from common import bus, subjects
from common.settings import Settings
from tests.stackutil import NatsCluster, nats_cluster

pytestmark = pytest.mark.timeout(240)


async def _replicas(js: JetStreamContext) -> dict[str, dict[str, object]]:
    """Replicas of every stream (KV buckets' included) and durable consumer, and where each
    is led."""
    streams = await js.streams_info()
    replicas: dict[str, object] = {s.config.name: s.config.num_replicas for s in streams}
    leaders: dict[str, object] = {s.config.name: s.cluster.leader for s in streams}
    for stream in streams:
        for info in await js.consumers_info(stream.config.name):
            if info.config.durable_name:
                name = f"{stream.config.name}/{info.name}"
                leaders[name] = info.cluster.leader
                replicas[name] = 1 + len(info.cluster.replicas or []) if info.cluster.leader \
                    else 0
    return {"replicas": replicas, "leaders": leaders}


def test_a_stack_at_three_replicas_raises_what_one_at_one_made(tmp_path: Path) -> None:
    """Streams, buckets and durable consumers an earlier stack made at ``stream_replicas=1``
    are brought to 3 by the next one started with 3: none is left on a single server."""
    with nats_cluster(tmp_path / "nats") as cluster:
        async def run() -> dict[str, dict[str, object]]:
            made: set[str] = set()
            for replicas in (1, 3):
                settings = Settings(nats_url=cluster.url, stream_replicas=replicas)
                nc = await bus.connect(settings, name="test")
                try:
                    js = nc.jetstream()
                    await bus.ensure_topology(js, settings)
                    await bus.ensure_consumer(js, subjects.REQUESTS_STREAM,
                                              subjects.INGRESS_CONSUMER,
                                              subjects.REQUESTS_SUBJECT, settings)
                    if replicas == 1:
                        made = set((await _replicas(js))["replicas"])
                        assert len(made) == 10, made  # 4 streams, 5 buckets, the consumer
                        continue
                    for _ in range(50):  # consumers follow their streams
                        found = await _replicas(js)
                        if set(found["replicas"]) == made \
                                and set(found["replicas"].values()) == {3}:
                            break
                        await asyncio.sleep(0.2)
                    return found
                finally:
                    await bus.close(nc)
            raise AssertionError("unreachable")

        found = asyncio.run(run())
        assert len(found["replicas"]) == 10, found["replicas"]
        assert set(found["replicas"].values()) == {3}, found["replicas"]


def test_nats_url_names_a_clusters_servers(tmp_path: Path) -> None:
    """``nats_url`` takes several servers, comma-separated (or a config file's list), and a
    client connects to one that is alive."""
    settings = Settings(nats_url=["nats://127.0.0.1:1", "nats://127.0.0.1:2"])
    assert settings.nats_url == "nats://127.0.0.1:1,nats://127.0.0.1:2"
    assert settings.nats_servers == ["nats://127.0.0.1:1", "nats://127.0.0.1:2"]

    cluster = NatsCluster(tmp_path)
    try:
        cluster.start()
        cluster.kill("n1")
        settings = Settings(nats_url=cluster.url)

        async def connect() -> int:
            nc = await asyncio.wait_for(bus.connect(settings, name="test"), 10)
            try:
                return nc.connected_url.port
            finally:
                await bus.close(nc)

        assert asyncio.run(connect()) in (cluster.ports["n2"], cluster.ports["n3"])
    finally:
        cluster.stop()


