"""``Lego-Reply-To``: the ingress publishes its reply with the service account's rights, so the
header may name only a client's inbox. Pure checks of the rule, then the ingress against a real
nats-server: a reply aimed at a KV bucket writes nothing there, an inbox still gets it, and a
request whose header is refused goes on (its outcome on its results subject)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from common import bus, subjects
from common.kinds import pool_of
from common.messages import RequestState, decode
from common.settings import Settings
from common.workflow import builtin_workflows
from gateway.app import Gateway
from gateway.ingress import REPLY_HEADER

pytestmark = pytest.mark.timeout(120)

PREFIXES = ["_INBOX", "_INBOX_client", "replies.tenant-a."]


@pytest.mark.parametrize("subject", ["_INBOX.x", "_INBOX.abc.def", "_INBOX_client.r1",
                                     "replies.tenant-a.42"])
def test_inboxes_are_allowed(subject: str) -> None:
    assert subjects.reply_allowed(subject, PREFIXES)


@pytest.mark.parametrize("subject", [
    f"$KV.{subjects.CANCEL_BUCKET}.someone-else",     # cancel another's request
    "$JS.API.STREAM.DELETE.LEGO_REQUESTS",           # the JetStream API
    "$SYS.REQ.SERVER.PING",
    "$KV.x", "$JS", "$O.bucket.x",
    subjects.task_subject("denoiser-x"),             # inject work
    subjects.result_subject("someone-else"),         # forge a result
    "lego.requests", "lego",
    "_INBOX.*", "_INBOX.>", "_INBOX.a*", "_INBOX.>x", ">", "*",
    "_INBOX", "_INBOX.", "_INBOX..x", "_INBOXx.y", "_INBOX.a b", "_INBOX.a\r\nPUB x",
    "_INBOX.a\tb", "replies.tenant-b.1", "other.x", "", "_INBOX." + "x" * 300, None, 7,
])
def test_everything_else_is_refused(subject: object) -> None:
    assert not subjects.reply_allowed(subject, PREFIXES)


def test_a_configured_prefix_cannot_open_reserved_subjects() -> None:
    for prefix in ("$KV", "$JS.API", "lego", "lego.results"):
        assert not subjects.reply_allowed(f"{prefix}.x", [prefix])


@pytest.fixture
async def ingress(settings: Settings) -> AsyncIterator[tuple[Gateway, NATS]]:
    gw = Gateway(settings.model_copy(update={"admission": False}),
                 {"txt2img": builtin_workflows()["txt2img"]}, run_ingress=True)
    await gw.start()
    nc = await bus.connect(settings, name="test-client")
    try:
        yield gw, nc
    finally:
        await bus.close(nc)
        await gw.stop()


async def _publish(nc: NATS, request_id: str, reply_to: str, **body: object) -> None:
    await nc.jetstream().publish(
        subjects.REQUESTS_SUBJECT,
        orjson.dumps({"id": request_id, "workflow": "txt2img", "prompt": "x", **body}),
        headers={"Nats-Msg-Id": request_id, REPLY_HEADER: reply_to},
    )


async def test_a_reply_to_a_kv_bucket_writes_nothing(ingress: tuple[Gateway, NATS]) -> None:
    gw, nc = ingress
    leaked: list[Msg] = []

    async def record(msg: Msg) -> None:
        leaked.append(msg)

    # literal subjects, so a subscription sees what reaches them (the denoiser's queue gets
    # no task here: only the text encoder's, the roots of the requests that go on)
    refused = [f"$KV.{subjects.CANCEL_BUCKET}.victim-1",
               subjects.task_subject(pool_of("denoiser", "builtin:tiny-sd")),
               "elsewhere.x"]
    for subject in refused:
        await nc.subscribe(subject, cb=record)
    results = await nc.subscribe(subjects.result_subject("bad-steps-1"))
    for i, subject in enumerate(refused):
        await _publish(nc, f"attacker-{i}", subject)
    # refused header and an invalid request: the error still reaches its results subject
    await _publish(nc, "bad-steps-1", refused[0], steps=0)
    inbox = await nc.subscribe("_INBOX.test-reply")
    await _publish(nc, "honest-1", "_INBOX.test-reply")

    # the ingress handles requests in order: once the inbox has its reply, it is done with
    # the others, and what it published for them has reached this connection before it
    accepted = decode((await inbox.next_msg(timeout=20)).data, RequestState)
    assert accepted.id == "honest-1" and accepted.status == "queued"
    failed = decode((await results.next_msg(timeout=10)).data, RequestState)
    assert failed.status == "failed" and failed.error is not None
    await nc.flush()
    assert leaked == []
    cancels = await nc.jetstream().key_value(subjects.CANCEL_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await cancels.get("victim-1")
    for i in range(len(refused)):  # each went on, as if it had sent no header
        state = await gw.tracker.get(f"attacker-{i}")
        assert state is not None and state.status == "queued"


async def test_configured_prefixes_get_replies(settings: Settings) -> None:
    settings = settings.model_copy(update={"reply_prefixes": ["replies.tenant-a"],
                                           "nats_inbox_prefix": "_INBOX_mine"})
    gw = Gateway(settings.model_copy(update={"admission": False}),
                 {"txt2img": builtin_workflows()["txt2img"]}, run_ingress=True)
    await gw.start()
    nc = await bus.connect(settings.model_copy(update={"nats_inbox_prefix": None}), name="t")
    try:
        for i, subject in enumerate(("replies.tenant-a.7", "_INBOX_mine.7", "_INBOX.7")):
            sub = await nc.subscribe(subject)
            await _publish(nc, f"configured-{i}", subject)
            assert decode((await sub.next_msg(timeout=20)).data, RequestState).id == \
                f"configured-{i}"
        assert "_INBOX_client" not in gw.ingress.reply_prefixes  # the setting replaced it
    finally:
        await bus.close(nc)
        await gw.stop()
