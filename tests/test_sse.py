"""``GET /v1/generations/{id}/events`` (Server-Sent Events).

Without nodes, against two gateways served in this process on one real nats-server: the test
plays the denoiser (it publishes ``Progress`` on ``lego.progress.<id>`` as the runner does)
and ends the request with a cancel, so every event and the stream's end are exact; the stream
is followed on the replica that did not take the request. Then through the real stack: a real
generation's steps, ``LegoClient.events`` and ``lego generate``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import legoclient
import pytest
from legoclient import Event, Generation, LegoClient, SseParser

from common import bus, subjects
from common.messages import Progress, encode
from common.settings import Settings
from common.workflow import shipped_workflows
from gateway.events import STANDING_S
from lego.cli import main as lego_main
from lego.stack import Stack
from tests.gatewayutil import ServedGateway, served_gateway
from tests.stackutil import png_pixels

pytestmark = pytest.mark.timeout(300)


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict]]:
    """(event, data) of a text/event-stream response, as a browser's EventSource reads it."""
    parser = SseParser()
    async for line in response.aiter_lines():
        found = parser.feed(line)
        if found is not None:
            yield found


@pytest.fixture
def gateways(settings: Settings) -> Iterator[tuple[ServedGateway, ServedGateway]]:
    """Two gateway replicas on one NATS: ``a`` takes requests (with the ingress), ``b`` only
    answers about them."""
    settings = settings.model_copy(update={"admission": False})
    seed = {"txt2img": shipped_workflows(settings)["txt2img"]}
    with served_gateway(settings, seed) as a, served_gateway(settings, run_ingress=False) as b:
        yield a, b


async def test_events_follow_a_request_on_another_replica(
    gateways: tuple[ServedGateway, ServedGateway], settings: Settings
) -> None:
    a, b = gateways
    nc = await bus.connect(settings, name="test-node")
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            accepted = (await http.post(f"{a.url}/v1/generations",
                                        json={"prompt": "a fox", "steps": 3})).json()
            request_id = accepted["id"]
            async with http.stream("GET", f"{b.url}/v1/generations/{request_id}/events") as rsp:
                assert rsp.status_code == 200
                assert rsp.headers["content-type"].startswith("text/event-stream")
                events = sse_events(rsp)
                event, first = await anext(events)
                assert event == "state"
                expected = (await http.get(f"{b.url}/v1/generations/{request_id}")).json()
                assert first == expected  # the same body as GET /v1/generations/{id}
                assert first["status"] == "queued"
                for step in (1, 2, 3):  # what the denoiser's runner publishes per step
                    await nc.publish(subjects.progress_subject(request_id),
                                     encode(Progress(request_id, "denoise", step, 3)))
                    assert await anext(events) == (
                        "progress", {"id": request_id, "node": "denoise", "step": step,
                                     "total": 3})
                assert (await http.delete(f"{a.url}/v1/generations/{request_id}")).is_success
                event, final = await anext(events)
                assert event == "state"
                assert final["status"] == "cancelled"
                assert final == (await http.get(f"{b.url}/v1/generations/{request_id}")).json()
                with pytest.raises(StopAsyncIteration):  # the server closed the stream
                    await anext(events)

            # A request that already ended: its state, then the end of the stream.
            async with http.stream("GET", f"{a.url}/v1/generations/{request_id}/events") as rsp:
                assert [e async for e in sse_events(rsp)] == [("state", final)]
    finally:
        await nc.close()


async def test_events_unknown_id_is_404(gateways: tuple[ServedGateway, ServedGateway]) -> None:
    a, _ = gateways
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(f"{a.url}/v1/generations/no-such-id/events")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_events_client_disconnect_unsubscribes(
    gateways: tuple[ServedGateway, ServedGateway],
) -> None:
    a, b = gateways
    subscriptions = b.gateway.nc._subs  # nats-py's live subscriptions of replica b
    before = len(subscriptions)
    async with httpx.AsyncClient(timeout=30) as http:
        accepted = (await http.post(f"{a.url}/v1/generations", json={"prompt": "x"})).json()
        async with http.stream("GET", f"{b.url}/v1/generations/{accepted['id']}/events") as rsp:
            assert (await anext(sse_events(rsp)))[0] == "state"
            assert len(subscriptions) == before + 1  # the request's progress subject
        # the client went away mid-stream: the gateway notices and unsubscribes
        deadline = time.monotonic() + 20
        while len(subscriptions) > before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(subscriptions) == before
        await http.delete(f"{a.url}/v1/generations/{accepted['id']}")


async def test_a_quiet_stream_resends_where_the_request_stands(
    gateways: tuple[ServedGateway, ServedGateway], settings: Settings
) -> None:
    """No node serves it: the request stays queued, and every STANDING_S the stream says where
    it stands (its position in its first pool's queue and its ETA), as GET does."""
    a, b = gateways
    plan = shipped_workflows(settings)["txt2img"].compile()
    first_pool = plan.nodes[plan.roots()[0]].pool
    async with httpx.AsyncClient(timeout=30) as http:
        accepted = (await http.post(f"{a.url}/v1/generations", json={"prompt": "x"})).json()
        assert set(accepted["queue_position"]) == {first_pool}
        assert accepted["eta_s"] >= 0
        started = time.monotonic()
        async with http.stream("GET", f"{b.url}/v1/generations/{accepted['id']}/events") as rsp:
            events = sse_events(rsp)
            assert (await anext(events))[0] == "state"
            event, again = await anext(events)
            assert event == "state" and again["status"] == "queued"
            assert time.monotonic() - started >= STANDING_S * 0.9
            assert again["queue_position"] == accepted["queue_position"]  # nothing handed out
            assert again["eta_s"] <= accepted["eta_s"]
        await http.delete(f"{a.url}/v1/generations/{accepted['id']}")
        final = (await http.get(f"{a.url}/v1/generations/{accepted['id']}")).json()
        assert "queue_position" not in final and "eta_s" not in final  # it has ended


# --- through the real stack -----------------------------------------------------------------------


def test_events_of_a_real_generation(stack: Stack) -> None:
    with LegoClient(stack.gateway_url) as client:
        # enough steps that the stream opens before the last one (the gateway answers once the
        # request's first task is queued, and a tiny step takes milliseconds)
        accepted = client.submit("txt2img", prompt="a lighthouse", steps=40, seed=5)
        events = list(client.events(accepted.id))
        assert isinstance(events[0], Generation) and events[0].id == accepted.id
        assert isinstance(events[-1], Generation) and events[-1].status == "succeeded"
        assert events[-1] == client.status(accepted.id)
        assert all(isinstance(e, legoclient.Progress) for e in events[1:-1])
        # the denoiser's 40 steps, in order (unless the stream began after the first ones)
        denoise = [(p.node, p.step, p.total) for p in events[1:-1]]
        assert denoise == [("denoise", s, 40) for s in range(41 - len(denoise), 41)]
        assert denoise[-1] == ("denoise", 40, 40)

        seen: list[Event] = []
        state, png = client.generate("txt2img", prompt="a fox", steps=3, seed=1,
                                     on_event=seen.append)
        assert state.status == "succeeded" and png_pixels(png).shape == (64, 64, 3)
        assert isinstance(seen[0], Generation) and seen[-1] == state
        assert legoclient.Progress(id=state.id, node="denoise", step=3, total=3) in seen


def test_lego_generate_uses_the_stream(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    code = lego_main(["generate", "a red fox", "--gateway", stack.gateway_url, "--steps", "2",
                      "--seed", "3", "-o", str(out)])
    assert code == 0
    assert png_pixels(out.read_bytes()).shape == (64, 64, 3)
