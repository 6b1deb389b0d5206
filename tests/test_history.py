"""The history (``GET /v1/generations``, ``LegoClient.history``, ``lego history``) through the
real stack: newest first, pages without repeats, filters, clear errors, the same answer from
another gateway replica; and the page selection's bounded memory, without NATS."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from legoclient import Generation, LegoClient

from common.bus import connect
from common.history import HistoryQuery, Newest
from common.messages import RequestState
from gateway.ingress import REPLY_HEADER
from lego.stack import Stack
from tests.gatewayutil import served_gateway

pytestmark = pytest.mark.timeout(300)

QUICK = {"prompt": "a lighthouse", "steps": 1, "width": 16, "height": 16}


def add_workflow(client: LegoClient, name: str) -> None:
    """A copy of txt2img under ``name``: the tests' requests are told apart by workflow."""
    spec = next(w for w in client.workflows() if w["name"] == "txt2img")
    client.add_workflow({**{k: v for k, v in spec.items() if k != "pools"}, "name": name})


def every_page(client: LegoClient, **filters: object) -> tuple[list[Generation], int]:
    """Every item, following the cursors; and how many pages it took."""
    items: list[Generation] = []
    cursor, pages = None, 0
    while True:
        page = client.history(cursor=cursor, **filters)
        items += page.items
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            return items, pages


def test_newest_first_and_pages_without_repeats(client: LegoClient) -> None:
    add_workflow(client, "hist-pages")
    ids = [client.submit("hist-pages", id=f"page-{i}", seed=i, **QUICK).id for i in range(7)]
    for request_id in ids:
        assert client.wait(request_id, timeout_s=60).status == "succeeded"
    items, pages = every_page(client, workflow="hist-pages", limit=3)
    assert [item.id for item in items] == ids[::-1]  # newest first, each once
    assert pages == 3  # 3 + 3 + 1
    created = [item.created_at for item in items]
    assert created == sorted(created, reverse=True)
    first = items[0]  # each as GET /v1/generations/{id} shows it
    assert first == client.status(first.id)
    assert first.links["image"] == f"/v1/generations/{first.id}/image"
    # a page of exactly the rest has no cursor
    assert client.history(workflow="hist-pages", limit=7).next_cursor is None
    # a request made between two pages is newer than the cursor: no page repeats or loses one
    page = client.history(workflow="hist-pages", limit=4)
    client.submit("hist-pages", id="page-late", **QUICK)
    rest = client.history(workflow="hist-pages", limit=4, cursor=page.next_cursor)
    assert [i.id for i in page.items + rest.items] == ids[::-1]
    assert client.history(workflow="hist-pages", limit=1).items[0].id == "page-late"


def test_filters(client: LegoClient, stack: Stack) -> None:
    add_workflow(client, "hist-a")
    add_workflow(client, "hist-b")
    done = client.generate("hist-a", id="filter-done", **QUICK)[0]
    since = time.time()
    slow = client.submit("hist-a", id="filter-slow", prompt="slow", steps=150, width=128,
                         height=128)
    client.cancel(slow.id)
    other = client.generate("hist-b", id="filter-other", **QUICK)[0]
    asyncio.run(_publish_invalid(stack, "filter-bad", "hist-b"))  # recorded as failed

    def ids(**filters: object) -> list[str]:
        return [item.id for item in client.history(limit=100, **filters).items]

    assert ids(workflow="hist-a") == ["filter-slow", "filter-done"]
    assert ids(workflow="hist-b") == ["filter-bad", "filter-other"]
    assert ids(workflow="hist-a", status="cancelled") == ["filter-slow"]
    assert ids(workflow="hist-a", status="succeeded") == [done.id]
    assert ids(workflow="hist-b", status="failed") == ["filter-bad"]
    assert ids(workflow="hist-a", since=since) == ["filter-slow"]
    assert set(ids(since=since)) == {"filter-slow", other.id, "filter-bad"}
    assert ids(workflow="no-such-workflow") == []
    everything = ids()
    assert {"filter-done", "filter-slow", "filter-other", "filter-bad"} <= set(everything)
    assert all(i.status == "succeeded"
               for i in client.history(status="succeeded", limit=100).items)


async def _publish_invalid(stack: Stack, request_id: str, workflow: str) -> None:
    """A direct NATS request with a bad field: the ingress records it as failed."""
    nc = await connect(stack.settings, name="test-history")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.jetstream().publish(
        "lego.requests", orjson.dumps({"id": request_id, "workflow": workflow, "steps": 0}),
        headers={REPLY_HEADER: inbox})
    await sub.next_msg(timeout=30)
    await nc.drain()


@pytest.mark.parametrize(("query", "field", "limit"), [
    ({"limit": 101}, "limit", 100),
    ({"limit": 0}, "limit", 100),
    ({"limit": "ten"}, "limit", None),
    ({"status": "done"}, "status", ["queued", "running", "succeeded", "failed", "cancelled"]),
    ({"since": "yesterday"}, "since", None),
    ({"cursor": "not-a-cursor"}, "cursor", None),
])
def test_bad_values_are_422_naming_the_field(
    client: LegoClient, query: dict, field: str, limit: object
) -> None:
    response = client.http.get("/v1/generations", params=query)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field and field in error["message"]
    assert error.get("limit") == limit


def test_any_gateway_replica_answers(client: LegoClient, stack: Stack) -> None:
    add_workflow(client, "hist-replica")
    for i in range(3):
        client.generate("hist-replica", id=f"replica-{i}", seed=i, **QUICK)
    expected = client.history(workflow="hist-replica")
    with served_gateway(stack.settings, run_ingress=False) as other, \
            LegoClient(other.url) as other_client:
        assert other_client.history(workflow="hist-replica") == expected
    assert [i.id for i in expected.items] == ["replica-2", "replica-1", "replica-0"]


def test_lego_history_prints_the_page(client: LegoClient, stack: Stack, capsys) -> None:  # noqa: ANN001
    import json

    from lego.cli import main

    add_workflow(client, "hist-cli")
    for i in range(3):
        client.generate("hist-cli", id=f"cli-{i}", seed=i, **QUICK)
    gateway = ["--gateway", stack.gateway_url]
    assert main(["history", *gateway, "--workflow", "hist-cli", "--limit", "2", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in page["data"]] == ["cli-2", "cli-1"] and page["next_cursor"]
    assert main(["history", *gateway, "--workflow", "hist-cli", "--status", "succeeded"]) == 0
    table = capsys.readouterr().out
    assert all(f"cli-{i}" in table for i in range(3)) and "succeeded" in table
    assert main(["history", *gateway, "--limit", "500"]) == 1
    assert "limit" in capsys.readouterr().err


def test_requests_in_flight_say_where_they_stand(client: LegoClient) -> None:
    """Queued and running requests carry ``queue_position`` (per pool they wait on) and
    ``eta_s``; requests submitted together queue behind each other; ended ones carry
    neither."""
    from concurrent.futures import ThreadPoolExecutor

    add_workflow(client, "standing")
    spec = next(w for w in client.workflows() if w["name"] == "standing")
    with ThreadPoolExecutor(6) as pool:
        accepted = list(pool.map(lambda seed: client.submit("standing", seed=seed, **QUICK),
                                 range(6)))
    first_pools = {p for p in spec["pools"] if p.startswith("text_encoder")}
    positions = []
    for state in accepted:
        if state.status in ("queued", "running"):
            assert state.eta_s >= 0
        if state.status == "queued":
            assert set(state.queue_position) == first_pools
            positions += state.queue_position.values()
    assert max(positions) >= 1  # submitted together: some waited behind others
    for state in accepted:
        final = client.wait(state.id, timeout_s=120)
        assert final.status == "succeeded"
        assert "queue_position" not in final.raw and "eta_s" not in final.raw


def test_a_page_keeps_only_limit_plus_one_states() -> None:
    states = [RequestState(id=f"r{i:05d}", workflow="w" if i % 3 else "v", status="succeeded",
                           created_at=1000.0 + (i * 7919) % 10_000, updated_at=0.0)
              for i in range(10_000)]
    query = HistoryQuery.parse(workflow="w", limit=5)
    newest = Newest(query)
    for state in states:
        newest.offer(state)
        assert len(newest.states) <= 6 and len(newest.heap) <= 6
    expected = sorted((s for s in states if s.workflow == "w"),
                      key=lambda s: (s.created_at, s.id), reverse=True)
    seen: list[str] = []
    cursor = None
    while True:
        paging = Newest(HistoryQuery.parse(workflow="w", limit=100, cursor=cursor))
        for state in states:
            paging.offer(state)
        page, cursor = paging.page()
        seen += [s.id for s in page]
        if cursor is None:
            break
    assert seen == [s.id for s in expected]
    assert newest.page()[0] == expected[:5]
