"""Request ids are never trusted: an id becomes a KV key, a store path and a subject token, so
every way in checks it against the one rule (``common.subjects.valid_request_id``): the
gateway's routes answer 404 with the error JSON, the stores refuse to touch anything outside
their own keys, and the ingress answers a NATS request with a bad id with an error naming the
field and the rule. Against a real nats-server, a real redis-server and /dev/shm."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
import torch

from common import bus, subjects
from common.errors import InvalidField
from common.messages import RequestState, TensorRef, decode
from common.settings import Settings
from common.store import RedisStore, ShmStore
from common.workflow import builtin_workflows
from gateway.ingress import REPLY_HEADER
from tests.conftest import nats_server
from tests.gatewayutil import ServedGateway, served_gateway

pytestmark = pytest.mark.timeout(120)

#: ids no request can have: each would be a wildcard, a path step or a broken subject
BAD_IDS = ["a b", "*", ">", "..", "a\nb", "abc\n", "x" * 65, "a.b", "../../etc", "é"]


@pytest.mark.parametrize("request_id", ["a", "A-z_09", "x" * 64, "0123456789abcdef"])
def test_valid_ids(request_id: str) -> None:
    assert subjects.valid_request_id(request_id)
    assert subjects.check_request_id(request_id) == request_id


@pytest.mark.parametrize("request_id", [*BAD_IDS, "", None, 7])
def test_invalid_ids_name_the_field_and_the_rule(request_id: object) -> None:
    assert not subjects.valid_request_id(request_id)
    with pytest.raises(InvalidField) as err:
        subjects.check_request_id(request_id)
    assert err.value.field == "id" and err.value.details["limit"] == 64
    assert subjects.REQUEST_ID_RULE in err.value.message


def test_subjects_refuse_bad_ids() -> None:
    for bad in ("*", ">", "a.b", "a b"):
        for subject in (subjects.result_subject, subjects.progress_subject):
            with pytest.raises(InvalidField):
                subject(bad)


# --- the gateway ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[ServedGateway]:
    tmp = tmp_path_factory.mktemp("ids")
    with nats_server(tmp / "nats") as url:
        settings = Settings(nats_url=url, cache_dir=cache_dir, shm_root=tmp / "shm",
                            run_dir=tmp / "run", admission=False)
        with served_gateway(settings, {"txt2img": builtin_workflows()["txt2img"]}) as served:
            yield served


def _segment(request_id: str) -> str:
    # httpx would resolve a literal ".." away; percent-encoded, the server decodes it
    return "%2E%2E" if request_id == ".." else quote(request_id, safe="")


@pytest.mark.parametrize("request_id", BAD_IDS)
def test_routes_answer_404_with_the_error_json(gateway: ServedGateway, request_id: str) -> None:
    segment = _segment(request_id)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for method, path in (("GET", f"/v1/generations/{segment}"),
                             ("GET", f"/v1/generations/{segment}?wait=1"),
                             ("DELETE", f"/v1/generations/{segment}"),
                             ("GET", f"/v1/generations/{segment}/image"),
                             ("GET", f"/v1/generations/{segment}/events")):
            response = http.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            error = response.json()["error"]
            assert error["code"] == "not_found" and error["message"], (method, path)
            if "/" not in request_id:  # else no route matches, so no id is named
                assert error["field"] == "id", (method, path)
        assert http.get("/readyz").status_code == 200  # nothing broke on the way


def test_a_wildcard_id_follows_nobody_elses_request(gateway: ServedGateway) -> None:
    """``GET /v1/generations/>/events`` once subscribed to every request's progress."""
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        accepted = http.post("/v1/generations", json={"prompt": "x", "id": "someone-else"})
        assert accepted.status_code == 202
        for bad in (">", "*"):
            assert http.get(f"/v1/generations/{quote(bad, safe='')}/events").status_code == 404
        assert http.get("/v1/generations/someone-else").json()["status"] == "queued"


# --- the stores -------------------------------------------------------------------------------

async def test_shm_delete_group_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "victim"
    (outside / "data").mkdir(parents=True)
    (outside / "data" / "keep.txt").write_text("mine")
    store = ShmStore(root, tensor_ttl_s=60, result_ttl_s=60)
    await store.put("tmp/r1/n/x", torch.ones(2), ttl_s=60)
    for bad in ("../../victim", "../..", "..", ".", "", "a/../../..", "*", "a\n"):
        with pytest.raises(ValueError, match="request id"):
            await store.delete_group("tmp", bad)
    with pytest.raises(ValueError, match="area"):
        await store.delete_group("../victim", "data")
    assert (outside / "data" / "keep.txt").read_text() == "mine"
    assert await store.keys() == ["tmp/r1/n/x"]


async def test_shm_paths_never_leave_the_root(tmp_path: Path) -> None:
    """A symlink planted in the store cannot carry a write or a delete outside it."""
    root = tmp_path / "store"
    outside = tmp_path / "victim"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    store = ShmStore(root, tensor_ttl_s=60, result_ttl_s=60)
    (root / "tmp" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        await store.put("tmp/linked/keep.txt", torch.ones(2), ttl_s=60)
    with pytest.raises(ValueError, match="outside"):
        await store.delete_group("tmp", "linked")
    ref = TensorRef(store="shm", key="tmp/linked/keep.txt", dtype="uint8", shape=[4], nbytes=4)
    with pytest.raises(ValueError, match="outside"):
        await store.get(ref)
    assert (outside / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("key", ["tmp/a b/n/x", "tmp/*/n/x", "out/x.y/image", "tmp/a\n/n/x",
                                 f"tmp/{'x' * 65}/n/x"])
async def test_both_stores_refuse_keys_of_bad_ids(key: str, tmp_path: Path, redis_url: str) -> None:
    for store in (ShmStore(tmp_path / "store", 60, 60), RedisStore(redis_url)):
        with pytest.raises(ValueError, match="bad tensor key"):
            await store.put(key, torch.ones(1), ttl_s=60)
        await store.close()


async def test_redis_delete_group_refuses_bad_ids(redis_url: str) -> None:
    store = RedisStore(redis_url)
    try:
        await store.client.flushdb()
        await store.put("tmp/r1/n/x", torch.ones(2), ttl_s=60)
        for bad in ("*", "r1*", "..", "a b"):
            with pytest.raises(ValueError, match="request id"):
                await store.delete_group("tmp", bad)
        assert await store.keys() == ["tmp/r1/n/x"]
    finally:
        await store.close()


# --- the ingress over NATS --------------------------------------------------------------------

async def test_a_nats_request_with_a_bad_id_gets_an_error_naming_it(settings: Settings) -> None:
    from gateway.app import Gateway

    gw = Gateway(settings.model_copy(update={"admission": False}),
                 {"txt2img": builtin_workflows()["txt2img"]}, run_ingress=True)
    await gw.start()
    nc = await bus.connect(settings, name="test-client")
    try:
        for bad in ("a b", "x" * 65, "a.b", "abc\n", "*"):
            inbox = nc.new_inbox()
            replies = await nc.subscribe(inbox)
            await nc.jetstream().publish(
                subjects.REQUESTS_SUBJECT,
                orjson.dumps({"id": bad, "workflow": "txt2img", "prompt": "x"}),
                headers={REPLY_HEADER: inbox},
            )
            state = decode((await replies.next_msg(timeout=10)).data, RequestState)
            await replies.unsubscribe()
            assert state.status == "failed" and state.error is not None
            assert state.error.field == "id", bad
            assert subjects.REQUEST_ID_RULE in state.error.message
            assert state.id == ""  # never echoed into a subject or a key
        assert await gw.tracker.get("abc") is None
    finally:
        await bus.close(nc)
        await gw.stop()
