"""The NATS users of deploy/nats-accounts.conf, enforced by a real nats-server started with that
file: ``client`` may publish a request and read its outcome and nothing else; ``service`` may do
everything the stack does (the whole stack runs as ``service`` while a direct ``client``
submits through it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from common import bus, subjects
from common.kinds import pool_of
from common.messages import Progress, RequestState, decode
from common.settings import Settings
from common.store import open_store
from gateway.ingress import REPLY_HEADER
from lego.stack import free_port, nats_server_binary, wait_port
from tests.stackutil import running_stack

ACCOUNTS = Path(__file__).resolve().parent.parent / "deploy" / "nats-accounts.conf"
#: the inbox prefix a direct client must use (its replies are the only other thing it reads)
CLIENT_INBOX = "_INBOX_client"
POOL = pool_of("denoiser", "builtin:tiny-sd")


@dataclass(frozen=True)
class AuthServer:
    url: str
    log: Path
    service_password: str
    client_password: str

    def service_settings(self, **extra: Any) -> Settings:
        return Settings(nats_url=self.url, nats_user="service",
                        nats_password=self.service_password, **extra)

    def violations(self, user: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines()
                if f'"$G/user:{user}"' in line and "Violation" in line]


@contextlib.contextmanager
def nats_with_accounts(tmp: Path) -> Iterator[AuthServer]:
    """nats-server with JetStream and the shipped users, on a free port."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(ACCOUNTS, tmp / ACCOUNTS.name)
    port = free_port()
    conf = tmp / "server.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{tmp / "jetstream"}" }}\n'
        f"include ./{ACCOUNTS.name}\n"
    )
    server = AuthServer(f"nats://127.0.0.1:{port}", tmp / "nats.log",
                        secrets.token_hex(16), secrets.token_hex(16))
    env = {**os.environ, "NATS_SERVICE_PASSWORD": server.service_password,
           "NATS_CLIENT_PASSWORD": server.client_password}
    with open(server.log, "ab") as log:
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, proc, "nats-server")
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


class Violations:
    """The permission errors the server reports to a connection (nats-py's error callback)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._queue: asyncio.Queue[str] = asyncio.Queue()

    async def record(self, exc: Exception) -> None:
        self.seen.append(str(exc))
        await self._queue.put(str(exc))

    async def next(self, timeout_s: float = 10.0) -> str:
        return await asyncio.wait_for(self._queue.get(), timeout_s)


@contextlib.asynccontextmanager
async def client_connection(server: AuthServer) -> AsyncIterator[tuple[NATS, Violations]]:
    violations = Violations()
    nc = await nats.connect(server.url, user="client", password=server.client_password,
                            inbox_prefix=CLIENT_INBOX, error_cb=violations.record,
                            allow_reconnect=False)
    try:
        yield nc, violations
    finally:
        await nc.close()


async def _barrier(nc: NATS) -> None:
    """Until the server has processed everything sent before: a JetStream publish answers after
    the -ERR of every earlier command (nats-py's flush() PING may overtake buffered commands)."""
    await nc.jetstream().publish(subjects.REQUESTS_SUBJECT, b"{}")


def _into(queue: asyncio.Queue[Msg]) -> Any:
    async def put(msg: Msg) -> None:
        await queue.put(msg)

    return put


def _violation(verb: str, subject: str) -> str:
    return f'nats: permissions violation for {verb} to "{subject.lower()}"'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AuthServer]:
    with nats_with_accounts(tmp_path / "nats") as found:
        yield found


@pytest.fixture
async def service(server: AuthServer) -> AsyncIterator[NATS]:
    """A `service` connection, with the topology created (the JetStream API is open to it)."""
    nc = await bus.connect(server.service_settings(), name="test-service")
    await bus.ensure_topology(nc.jetstream(), server.service_settings())
    yield nc
    await bus.close(nc)


async def test_the_passwords_are_required(server: AuthServer) -> None:
    for credentials in ({}, {"user": "client", "password": "wrong"},
                        {"user": "service", "password": server.client_password}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, allow_reconnect=False, **credentials)


async def test_client_submits_and_reads_its_outcome(server: AuthServer, service: NATS) -> None:
    request_id = uuid.uuid4().hex
    reply_to = f"{CLIENT_INBOX}.{request_id}"
    request = orjson.dumps({"id": request_id, "workflow": "txt2img", "prompt": "a fox"})
    async with client_connection(server) as (client, violations):
        received: dict[str, asyncio.Queue[Msg]] = {}
        for subject in (subjects.result_subject(request_id),
                        subjects.progress_subject(request_id), reply_to):
            received[subject] = asyncio.Queue()
            await client.subscribe(subject, cb=_into(received[subject]))
        ack = await client.jetstream().publish(
            subjects.REQUESTS_SUBJECT, request,
            headers={"Nats-Msg-Id": request_id, REPLY_HEADER: reply_to},
        )
        assert ack.stream == subjects.REQUESTS_STREAM

        # the service side, as the ingress and the nodes do it
        js = service.jetstream()
        settings = server.service_settings()
        ingress = await bus.pull_subscription(
            js, subjects.REQUESTS_STREAM, subjects.INGRESS_CONSUMER,
            subjects.REQUESTS_SUBJECT, settings,
        )
        [msg] = await ingress.fetch(1, timeout=10)
        assert msg.data == request and msg.headers[REPLY_HEADER] == reply_to
        await msg.ack()
        await service.publish(reply_to, b"accepted")
        await service.publish(subjects.progress_subject(request_id), b"step 1 of 4")
        await js.publish(subjects.result_subject(request_id), b"succeeded")

        async with asyncio.timeout(10):
            assert (await received[reply_to].get()).data == b"accepted"
            progress = await received[subjects.progress_subject(request_id)].get()
            assert progress.data == b"step 1 of 4"
            result = await received[subjects.result_subject(request_id)].get()
            assert result.data == b"succeeded"
        await _barrier(client)
        assert violations.seen == []
    assert server.violations("client") == [] and server.violations("service") == []


DENIED_SUBSCRIPTIONS = [
    subjects.TASKS_WILDCARD,           # every pool's work
    subjects.task_subject(POOL),
    subjects.REQUESTS_SUBJECT,         # other clients' requests
    subjects.REPLICAS_WILDCARD,
    subjects.STATE_UPDATES,            # request state in KV
    "_INBOX.>",                        # the services' replies: pulled tasks, KV reads
    "$JS.EVENT.ADVISORY.>",
    ">",
]
DENIED_PUBLISHES = [
    subjects.task_subject(POOL),                          # inject work
    subjects.result_subject("someone-else"),              # forge a result
    subjects.progress_subject("someone-else"),
    subjects.AUTOSCALER_EVENTS,
    f"$KV.{subjects.CANCEL_BUCKET}.someone-else",         # cancel another's request
    f"$JS.API.STREAM.INFO.{subjects.TASKS_STREAM}",
    f"$JS.API.STREAM.DELETE.{subjects.REQUESTS_STREAM}",
    f"$JS.API.CONSUMER.MSG.NEXT.{subjects.TASKS_STREAM}.{subjects.pool_consumer(POOL)}",
]


async def test_client_is_denied_everything_else(server: AuthServer, service: NATS) -> None:
    js = service.jetstream()
    leaked: asyncio.Queue[Msg] = asyncio.Queue()
    async with client_connection(server) as (client, violations):
        for subject in DENIED_SUBSCRIPTIONS:
            await client.subscribe(subject, cb=_into(leaked))
            assert await violations.next() == _violation("subscription", subject)
        for subject in DENIED_PUBLISHES:
            await client.publish(subject, b"{}", reply=f"{CLIENT_INBOX}.x")
            assert await violations.next() == _violation("publish", subject)

        # Nothing the services publish on those subjects reaches the client: a message on a
        # subject it may read, published after them, arrives, and nothing came before it.
        allowed: asyncio.Queue[Msg] = asyncio.Queue()
        allowed_subject = subjects.result_subject("mine")
        await client.subscribe(allowed_subject, cb=_into(allowed))
        await _barrier(client)
        await js.publish(subjects.task_subject(POOL), b"task")
        await service.publish(subjects.replica_subject(POOL), b"status")
        await service.publish("_INBOX.service-reply", b"reply")
        await service.publish(allowed_subject, b"result")
        assert (await asyncio.wait_for(allowed.get(), 10)).data == b"result"
        assert leaked.empty()

        await _barrier(client)
        assert len(violations.seen) == len(DENIED_SUBSCRIPTIONS) + len(DENIED_PUBLISHES)
        assert client.is_connected  # violations are refused, not fatal

    # and the denied publishes had no effect: only the service's task is stored, the streams
    # are still there, nobody was cancelled
    assert (await js.stream_info(subjects.TASKS_STREAM)).state.messages == 1
    assert (await js.stream_info(subjects.REQUESTS_STREAM)).config.name == subjects.REQUESTS_STREAM
    cancels = await js.key_value(subjects.CANCEL_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await cancels.get("someone-else")


@pytest.mark.timeout(300)
def test_the_stack_runs_as_service_and_serves_a_direct_client(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Every process of `lego up` (gateway, ingress, autoscaler, nodes) with the `service`
    user's permissions only, and a direct NATS client with the `client` user's."""
    with nats_with_accounts(tmp_path / "nats") as server, running_stack(
        tmp_path, server.url, cache_dir, nats_user="service",
        nats_password=server.service_password, workflows=["txt2img"],
    ) as stack:
        state, steps = asyncio.run(_submit_directly(server, "a lighthouse at dusk"))
        assert state.status == "succeeded", state.error
        assert steps and {p.node for p in steps} <= {"encode", "denoise", "decode"}
        assert state.image is not None and state.image.shape[0] == 1

        async def image_shape() -> tuple[int, ...]:
            store = open_store(stack.settings)  # the image itself is in the tensor store
            try:
                return tuple((await store.get(state.image)).shape)
            finally:
                await store.close()

        assert asyncio.run(image_shape()) == tuple(state.image.shape)
        assert server.violations("service") == []
        assert server.violations("client") == []


async def _submit_directly(
    server: AuthServer, prompt: str
) -> tuple[RequestState, list[Progress]]:
    request_id = uuid.uuid4().hex
    reply_to = f"{CLIENT_INBOX}.{request_id}"
    async with client_connection(server) as (client, violations):
        accepted: asyncio.Future[RequestState] = asyncio.get_running_loop().create_future()
        done: asyncio.Future[RequestState] = asyncio.get_running_loop().create_future()
        steps: list[Progress] = []

        async def on_reply(msg: Any) -> None:
            accepted.set_result(decode(msg.data, RequestState))

        async def on_result(msg: Any) -> None:
            done.set_result(decode(msg.data, RequestState))

        async def on_progress(msg: Any) -> None:
            steps.append(decode(msg.data, Progress))

        await client.subscribe(reply_to, cb=on_reply)
        await client.subscribe(subjects.result_subject(request_id), cb=on_result)
        await client.subscribe(subjects.progress_subject(request_id), cb=on_progress)
        await client.jetstream().publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps({"id": request_id, "workflow": "txt2img", "prompt": prompt,
                          "steps": 2, "seed": 7}),
            headers={"Nats-Msg-Id": request_id, REPLY_HEADER: reply_to},
        )
        async with asyncio.timeout(120):
            assert (await accepted).status == "queued"
            state = await done
        assert violations.seen == []
        return state, steps
