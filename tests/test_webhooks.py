"""Webhooks through the real stack (nats-server, node processes, the gateway as `lego up`
runs it) to real HTTP receivers on this machine: signed deliveries of the events asked for;
a receiver that fails twice gets the event on the third attempt; one that never answers leaves
a failure in the request's state; clear 422s for bad webhook fields, over HTTP and NATS; a
delivery cut off by the gateway's death is made by the gateway that replaces it. And the pure
parts (allow-list, signature) without NATS."""

from __future__ import annotations

import base64
import http.server
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from common import subjects, webhooks
from common.bus import connect
from common.messages import RequestState, WebhookEvent, decode
from gateway.ingress import REPLY_HEADER
from lego.stack import Stack
from tests.stackutil import respawned_gateway, stopped, txt2img_stack

pytestmark = pytest.mark.timeout(300)

SECRET = "whsec_" + base64.b64encode(b"lego-webhooks-test-key-32-bytes!").decode()
QUICK = {"prompt": "a harbour", "steps": 2, "width": 16, "height": 16}
ATTEMPTS = 3
TIMEOUT_S = 1.0


class Receiver:
    """An HTTP server on a free port that records every POST (headers, body) and answers as
    ``answer(n)`` says for the n-th (1, 2, ...): a status, or None to never answer (it holds
    the connection until ``release``)."""

    def __init__(self, answer: Callable[[int], int | None] = lambda n: 200) -> None:
        self.answer = answer
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.answer(len(receiver.posts))
                if status is None:
                    receiver.released.wait(60)
                    return  # the connection closes without an answer
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.posts]

    def until(self, predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"receiver got {self.events()}"
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(answer: Callable[[int], int | None] = lambda n: 200) -> Receiver:
        made.append(Receiver(answer))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    with txt2img_stack(
        tmp_path_factory.mktemp("webhooks"), cache_dir,
        webhook_allow=["127.0.0.1:*", "*.invalid"], webhook_secret=SECRET,
        webhook_timeout_s=TIMEOUT_S, webhook_max_attempts=ATTEMPTS, webhook_backoff_s=0.2,
        webhook_backoff_max_s=1.0,
    ) as st:
        yield st


class Client:
    """The gateway's HTTP API, as plain as a receiver's owner would call it."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=90)

    def generate(self, **body: object) -> dict:
        """Submit and wait for the end: the final state."""
        response = self.http.post("/v1/generations", params={"wait": 60},
                                  json={"workflow": "txt2img", **QUICK, **body})
        assert response.status_code == 200, response.text
        state = response.json()
        assert state["status"] == "succeeded", state
        return state

    def status(self, request_id: str) -> dict:
        return self.http.get(f"/v1/generations/{request_id}").raise_for_status().json()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Client]:
    c = Client(stack.gateway_url)
    yield c
    c.http.close()


def hook_state(client: Client, request_id: str, done: Callable[[dict], bool],
               timeout_s: float = 60.0) -> dict:
    """The request's ``webhook`` in its state once ``done`` says so."""
    deadline = time.monotonic() + timeout_s
    while True:
        hook = client.status(request_id).get("webhook", {})
        if done(hook):
            return hook
        assert time.monotonic() < deadline, hook
        time.sleep(0.1)


def readme_verify() -> Callable[[str, dict, bytes], bool]:
    """The receiver's check as the README shows it, run as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    [code] = re.findall(r"```python\n(import base64, hashlib, hmac, time\n.*?)```", readme,
                        re.DOTALL)
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - our own README
    return scope["verify_webhook"]


def test_completed_is_delivered_signed(client: Client, receiver) -> None:  # noqa: ANN001
    hook = receiver()
    state = client.generate(webhook_url=hook.url)
    hook.until(lambda: len(hook.posts) == 1)
    headers, body = hook.posts[0]
    assert webhooks.verify(SECRET, headers, body)
    assert readme_verify()(SECRET, headers, body)
    assert not readme_verify()("whsec_" + base64.b64encode(b"another key").decode(), headers,
                               body)
    assert not webhooks.verify(SECRET, headers, body.replace(b"succeeded", b"failed"))
    assert headers["webhook-id"] == f"{state['id']}.completed"
    event = orjson.loads(body)
    assert event["type"] == "generation.completed"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["timestamp"])
    data = event["data"]  # as GET /v1/generations/{id} shows it
    assert data["id"] == state["id"] and data["status"] == "succeeded"
    assert data["links"]["image"] == f"/v1/generations/{state['id']}/image"
    assert "digest" not in data.get("meta", {})
    noted = hook_state(client, state["id"], lambda h: h.get("delivered"))
    assert noted == {"url": hook.url, "events": ["completed"], "delivered": {"completed": 1}}
    time.sleep(1.0)
    assert len(hook.posts) == 1  # delivered once


def test_started_progress_and_completed(client: Client, receiver) -> None:  # noqa: ANN001
    hook = receiver()
    state = client.generate(webhook_url=hook.url,
                               webhook_events=["started", "progress", "completed"])
    hook.until(lambda: {"generation.started", "generation.completed"}
               <= {e["type"] for e in hook.events()})
    noted = hook_state(client, state["id"], lambda h: sum(h.get("delivered", {}).values()) == 4)
    events = hook.events()
    by_type: dict[str, list] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event["data"])
    [started] = by_type["generation.started"]
    assert started["id"] == state["id"] and started["status"] == "running"
    steps = by_type["generation.progress"]  # the denoiser's, one per step
    assert sorted((s["node"], s["step"], s["total"]) for s in steps) == [
        ("denoise", 1, 2), ("denoise", 2, 2)]
    assert all(s["id"] == state["id"] for s in steps)
    assert noted["delivered"] == {"started": 1, "progress": 2, "completed": 1}
    assert by_type["generation.completed"][0]["status"] == "succeeded"
    assert all(webhooks.verify(SECRET, h, b) for h, b in hook.posts)
    assert len({h["webhook-id"] for h, _ in hook.posts}) == len(hook.posts)


def test_receiver_failing_twice_gets_it_on_the_third_attempt(
        client: Client, receiver) -> None:  # noqa: ANN001
    hook = receiver(lambda n: 500 if n <= 2 else 204)
    state = client.generate(webhook_url=hook.url)
    noted = hook_state(client, state["id"], lambda h: h.get("delivered"))
    assert len(hook.posts) == ATTEMPTS
    assert len({h["webhook-id"] for h, _ in hook.posts}) == 1  # one event, three attempts
    assert all(webhooks.verify(SECRET, h, b) for h, b in hook.posts)
    assert noted["delivered"] == {"completed": 1} and "failed" not in noted
    assert noted["last_error"] == (
        f"completed: HTTP 500 Internal Server Error (attempt 2 of {ATTEMPTS})")


def test_receiver_that_never_answers_is_given_up(client: Client, receiver) -> None:  # noqa: ANN001
    hook = receiver(lambda n: None)
    state = client.generate(webhook_url=hook.url)
    noted = hook_state(client, state["id"], lambda h: h.get("failed"))
    assert noted["failed"] == {"completed": 1} and "delivered" not in noted
    assert noted["last_error"] == (
        f"completed: no answer within {TIMEOUT_S:g} s (attempt {ATTEMPTS} of {ATTEMPTS})")
    assert len(hook.posts) == ATTEMPTS
    assert client.status(state["id"])["status"] == "succeeded"  # the request itself is fine


def test_bad_webhooks_are_rejected_naming_the_field(client: Client) -> None:
    def error(**fields: object) -> dict:
        response = client.http.post("/v1/generations", json={**QUICK, **fields})
        assert response.status_code == 422, response.text
        return response.json()["error"]

    refused = error(webhook_url="https://example.com/hook")
    assert refused["field"] == "webhook_url" and "not allowed" in refused["message"]
    assert "127.0.0.1" not in refused["message"]  # the allow-list is not shown
    unresolved = error(webhook_url="http://nothing-here.invalid/hook")
    assert unresolved["field"] == "webhook_url" and "does not resolve" in unresolved["message"]
    long = error(webhook_url="http://127.0.0.1:9/" + "x" * 2100)
    assert long["field"] == "webhook_url" and long["limit"] == webhooks.MAX_URL_CHARS
    assert error(webhook_url="ftp://127.0.0.1/hook")["limit"] == ["http", "https"]
    assert "credentials" in error(webhook_url="http://me:pw@127.0.0.1:9/")["message"]
    events = error(webhook_url="http://127.0.0.1:9/", webhook_events=["finished"])
    assert events["field"] == "webhook_events"
    assert events["limit"] == ["started", "progress", "completed"]
    assert error(webhook_events=["completed"])["field"] == "webhook_events"  # no url
    both = error(steps=0, webhook_events="completed", webhook_url="http://127.0.0.1:9/")
    assert {e["field"] for e in both["errors"]} == {"steps", "webhook_events"}


async def test_bad_webhook_over_nats_is_rejected_in_the_reply(stack: Stack) -> None:
    nc = await connect(stack.settings, name="test-webhooks")
    try:
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        await nc.jetstream().publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps({"id": "hook-nats-1", **QUICK, "webhook_url": "http://x.example/"}),
            headers={"Nats-Msg-Id": "hook-nats-1", REPLY_HEADER: inbox},
        )
        reply = decode((await replies.next_msg(30)).data, RequestState)
    finally:
        await nc.close()
    assert reply.status == "failed" and reply.error is not None
    assert reply.error.code == "invalid_request" and reply.error.field == "webhook_url"


def test_delivery_cut_off_by_the_gateways_death_is_made_after_restart(
        stack: Stack, client: Client, receiver) -> None:  # noqa: ANN001
    """The gateway is killed while its attempt waits on the receiver: the event stays in
    LEGO_WEBHOOKS, unacked, and the restarted gateway delivers it (the same webhook-id)."""
    answers: list[int | None] = [None]  # the first attempt hangs; then 200
    hook = receiver(lambda n: answers[0] if n == 1 else 200)
    state = client.generate(webhook_url=hook.url)
    hook.until(lambda: len(hook.posts) == 1)
    gateway = stack.children[0]
    assert gateway.name == "gateway" and gateway.proc is not None
    assert stopped(stack, gateway, signal.SIGKILL) == -9  # mid-attempt: nothing acked, noted
    hook.released.set()
    respawned_gateway(stack, client.http)
    noted = hook_state(client, state["id"], lambda h: h.get("delivered"))
    assert noted["delivered"] == {"completed": 1}
    assert len(hook.posts) == 2
    assert hook.posts[0][0]["webhook-id"] == hook.posts[1][0]["webhook-id"]
    assert webhooks.verify(SECRET, *hook.posts[1])


# --- without NATS ------------------------------------------------------------------------------

def test_allow_list_patterns() -> None:
    allow = ["hooks.example.com", "*.corp.example", "127.0.0.1:8080", "[::1]:*"]
    assert webhooks.allowed("https://hooks.example.com/x", allow)
    assert webhooks.allowed("https://HOOKS.example.com:8443/x", allow)  # a host pattern: any port
    assert webhooks.allowed("http://a.b.corp.example/x", allow)
    assert webhooks.allowed("http://127.0.0.1:8080/x", allow)
    assert webhooks.allowed("http://[::1]:9000/x", allow)
    assert not webhooks.allowed("http://127.0.0.1:8081/x", allow)
    assert not webhooks.allowed("https://hooks.example.com.evil.test/x", allow)
    assert not webhooks.allowed("https://corp.example/x", allow)
    assert webhooks.field_errors({"webhook_url": "https://hooks.example.com/"}, []) != []


def test_signature_is_standard_webhooks() -> None:
    """The example of the Standard Webhooks specification (its reference libraries' test)."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    payload = b'{"test": 2432232314}'
    key = webhooks.signing_key(secret)
    assert webhooks.signature(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, payload) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    headers = webhooks.headers(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, payload)
    assert webhooks.verify(secret, headers, payload, at=1614265330 + 10)
    assert not webhooks.verify(secret, headers, payload, at=1614265330 + 3600)  # replayed
    assert readme_verify()(secret, headers, payload) is False  # too old for now


def test_event_body_and_backoff() -> None:
    event = WebhookEvent(id="r.completed", request_id="r", event="completed",
                         url="http://h/", at=0.5)
    assert orjson.loads(webhooks.body(event, {"id": "r"})) == {
        "type": "generation.completed", "timestamp": "1970-01-01T00:00:00.500Z",
        "data": {"id": "r"}}
    assert [webhooks.backoff_s(n, 1.0, 5.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


async def test_unknown_host_names_are_told_apart() -> None:
    from common.errors import InvalidRequest
    from gateway.webhooks import check_resolves

    await check_resolves("http://127.0.0.1:9/", 1.0)  # an address: nothing to look up
    await check_resolves("http://localhost:9/", 1.0)
    with pytest.raises(InvalidRequest, match="does not resolve"):
        await check_resolves("http://nothing-here.invalid/", 1.0)
    with pytest.raises(InvalidRequest, match="not a valid host name"):
        await check_resolves("http://a..b/", 1.0)
