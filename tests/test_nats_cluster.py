"""A real NATS cluster's failure: the stack on three nats-server processes routed to each other
on loopback, streams, buckets and consumers at R3 (``stream_replicas=3``); one server SIGKILLed
under load. Nothing accepted is lost and nothing fails because of it; new requests succeed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nats.errors
import orjson
import pytest
from nats.js import JetStreamContext

from common import bus, subjects
from common.settings import Settings
from lego.natscluster import NatsCluster, nats_cluster
from tests.stackutil import running_stack

pytestmark = pytest.mark.timeout(240)

QUICK = {"prompt": "x", "steps": 2, "width": 32, "height": 32}


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


async def _topology(settings: Settings) -> dict[str, dict[str, object]]:
    nc = await bus.connect(settings, name="test-topology")
    try:
        return await _replicas(nc.jetstream())
    finally:
        await bus.close(nc)


async def _lead_from(settings: Settings, server: str, *, but: tuple[str, ...] = (),
                     elsewhere_from: str | None = None) -> dict[str, object]:
    """Move the leader of every stream (buckets' included) and durable consumer to
    ``server`` (a step-down with it as the preferred placement), but those of the streams or
    consumers ``but`` to ``elsewhere_from``; the leaders then."""
    nc = await bus.connect(settings, name="test-leaders")
    try:
        js = nc.jetstream()
        async with asyncio.timeout(60):
            while True:
                leaders = (await _replicas(js))["leaders"]
                wanted = {name: elsewhere_from if name in but else server for name in leaders}
                moves = {name: to for name, to in wanted.items() if leaders[name] != to}
                if not moves:
                    return leaders
                for name, to in moves.items():
                    api = "CONSUMER" if "/" in name else "STREAM"
                    await nc.request(f"$JS.API.{api}.LEADER.STEPDOWN.{name.replace('/', '.')}",
                                     orjson.dumps({"placement": {"preferred": to}}),
                                     timeout=5)
                await asyncio.sleep(0.5)
    finally:
        await bus.close(nc)


def _final(http: httpx.Client, request_id: str, timeout_s: float) -> dict:
    """The request's state once it ended (asking again while the gateway fails over)."""
    deadline = time.monotonic() + timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        try:
            response = http.get(f"/v1/generations/{request_id}?wait=10")
        except httpx.HTTPError:
            time.sleep(0.2)
            continue
        if response.status_code == 200:
            state = response.json()
            if state["status"] in ("succeeded", "failed", "cancelled"):
                return state
        else:
            time.sleep(0.2)
    return state


def test_a_killed_nats_server_loses_and_fails_nothing(cache_dir: Path, tmp_path: Path) -> None:
    """SIGKILL, while requests arrive at 2/s, of the server the gateway is connected to and
    every stream and consumer is led from: every accepted request succeeds, and the stack
    serves new ones after. A 503 at submission during the failover is allowed (the
    client is told to retry) and counted."""
    with nats_cluster(tmp_path / "nats") as cluster, running_stack(
        tmp_path, cluster.url, cache_dir, workflows=["txt2img"], autoscale=False,
        stream_replicas=3,
    ) as stack, httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
        topology = asyncio.run(_topology(stack.settings))
        replicas = topology["replicas"]
        assert {subjects.TASKS_STREAM, f"KV_{subjects.STATE_BUCKET}",
                f"{subjects.REQUESTS_STREAM}/{subjects.INGRESS_CONSUMER}"} <= set(replicas)
        assert set(replicas.values()) == {3}, replicas
        warm = http.post("/v1/generations?wait=60", json=QUICK).json()
        assert warm["status"] == "succeeded", warm

        # the server the gateway is connected to leads every stream and consumer: killing it
        # takes the gateway's connection and every leader at once
        victim = cluster.server_of("gateway")
        assert victim is not None
        asyncio.run(_lead_from(stack.settings, victim))
        answers: list[int] = []
        accepted: list[str] = []

        def submit(seed: int) -> None:
            try:
                response = http.post("/v1/generations", json={**QUICK, "seed": seed})
            except httpx.HTTPError:
                answers.append(0)
                return
            answers.append(response.status_code)
            if response.status_code == 202:
                accepted.append(response.json()["id"])

        with ThreadPoolExecutor(16) as pool:  # open loop: 2/s however long an answer takes
            started = time.monotonic()
            for seed in range(24):
                time.sleep(max(0.0, started + seed / 2 - time.monotonic()))
                if seed == 8:
                    cluster.kill(victim)
                pool.submit(submit, seed)
        print(f"killed {victim}, the gateway's server and every leader; submissions: "
              f"{answers.count(202)} accepted, {answers.count(503)} answered 503")
        assert set(answers) <= {202, 503}, answers
        assert answers.count(503) <= 3, answers  # only while the cluster fails over

        ends = {i: _final(http, i, 30) for i in accepted}
        bad = {i: (s.get("status"), s.get("error")) for i, s in ends.items()
               if s.get("status") != "succeeded"}
        assert not bad, bad

        assert victim not in cluster.alive()
        for seed in range(3):
            after = http.post("/v1/generations?wait=60", json={**QUICK, "seed": 1000 + seed})
            assert after.status_code in (200, 202), after.text
            assert after.json()["status"] == "succeeded", after.json()


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



def test_a_leaderless_stream_past_the_failover_time_is_a_503(
    cache_dir: Path, tmp_path: Path
) -> None:
    """The server leading LEGO_TASKS and LEGO_REQUESTS killed, with no time to wait for their
    new leaders (``nats_failover_s=0``): a submission during the election, which the gateway
    can neither plan (its root task) nor hand on (to lego.requests), is answered 503
    unavailable with Retry-After (try again shortly), never 500; its state was stored but
    nothing was queued, and the client's retry under the same id queues it (it is not taken
    for a duplicate of a request that was never sent)."""
    from common.workflow import shipped_workflows
    from tests.gatewayutil import served_gateway

    with nats_cluster(tmp_path / "nats") as cluster:
        settings = Settings(nats_url=cluster.url, stream_replicas=3, nats_failover_s=0,
                            cache_dir=cache_dir, run_dir=tmp_path / "run", admission=False,
                            shm_root=tmp_path / "shm")
        seed = {"txt2img": shipped_workflows(settings)["txt2img"]}
        with served_gateway(settings, seed) as gw, \
                httpx.Client(base_url=gw.url, timeout=30) as http:
            assert http.post("/v1/generations", json=QUICK).status_code == 202
            kept = cluster.server_of("gateway")
            victim = next(name for name in cluster.alive() if name != kept)
            asyncio.run(_lead_from(settings, str(kept), but=(subjects.TASKS_STREAM,
                                                             subjects.REQUESTS_STREAM),
                                   elsewhere_from=victim))
            cluster.kill(victim)
            answers = []
            for n in range(20):
                body = {**QUICK, "id": f"during-{n}"}
                response = http.post("/v1/generations", json=body)
                answers.append(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"]
                    assert response.json()["error"]["code"] == "unavailable"
                    break
            assert answers[-1] == 503 and set(answers) <= {202, 503}, answers
            # its state was stored, the request not: the client's retry queues it
            for _ in range(100):
                retried = http.post("/v1/generations", json=body)
                if retried.status_code == 202:
                    break
                time.sleep(0.1)
            assert retried.status_code == 202, retried.text

            async def queued() -> int:
                nc = await bus.connect(settings, name="test")
                try:
                    js = nc.jetstream()
                    tasks = -1
                    for _ in range(100):  # the retry may have waited in lego.requests
                        with contextlib.suppress(nats.errors.TimeoutError):  # still electing
                            tasks = (await js.stream_info(subjects.TASKS_STREAM)).state.messages
                        if tasks == len(answers) + 1:
                            break
                        await asyncio.sleep(0.2)
                    return tasks
                finally:
                    await bus.close(nc)

            # one task (txt2img's root) per accepted request: none is missing
            assert asyncio.run(queued()) == len(answers) + 1
