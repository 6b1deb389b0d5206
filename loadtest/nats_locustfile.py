"""Locust load test straight over NATS, skipping the gateway, as a direct client does (README,
"Direct NATS"): each request is published to ``lego.requests`` and its result read from
``lego.results.<id>``. From the repository root, with a stack running (``lego up`` prints its
NATS URL):

    locust -f loadtest/nats_locustfile.py --headless -u 4 -t 60s \
        --host nats://127.0.0.1:4222 --csv out/nats
    locust -f loadtest/nats_locustfile.py --headless --host nats://127.0.0.1:4222 \
        --csv out/nats --trace data/traces/generated_trace_n3_rs1.0_st50000_t120_seed666.txt

Without ``--host`` the NATS URL (and credentials) come from the LEGO_* settings. Each request
is reported as request type ``NATS`` under its workflow's name, timed from publish to result.
One NATS connection per Locust process, on an asyncio loop in a native thread
(``loadtest/bridge.py``). Options and the trace replay: ``loadtest/users.py``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import gevent
import gevent.lock
import orjson
from locust import events

from loadtest.bridge import LoopThread
from loadtest.users import LegoUser


class RequestFailed(Exception):
    """The request ended failed or cancelled (its error says why)."""


class NatsConnection:
    """One NATS connection on its own loop thread, shared by the users of a process."""

    def __init__(self, nats_url: str | None) -> None:
        from common import bus  # see loadtest/__init__.py
        from common.settings import load_settings

        self.bridge = LoopThread()
        self.nc = self.bridge.call(bus.connect(load_settings(nats_url=nats_url), name="locust"))
        self.js = self.nc.jetstream()

    def generate(self, body: dict[str, Any], timeout_s: float) -> tuple[Any, float]:
        """Publish a request and wait for its result: (RequestState, seconds from publish to
        result); raises on a timeout or a request that did not succeed."""
        return self.bridge.call(self._generate(body, timeout_s))

    async def _generate(self, body: dict[str, Any], timeout_s: float) -> tuple[Any, float]:
        # What legoclient.NatsClient.generate does, on this process's one connection (its
        # credentials and inbox prefix from the LEGO_* settings), timing publish to result.
        from common import subjects
        from common.messages import RequestState, decode

        request_id = uuid.uuid4().hex
        ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_result(msg: Any) -> None:
            if not ended.done():
                ended.set_result(msg.data)

        # subscribed before publishing, so the result cannot slip past
        sub = await self.nc.subscribe(subjects.result_subject(request_id), cb=on_result)
        started = time.perf_counter()
        try:
            await self.js.publish(
                subjects.REQUESTS_SUBJECT, orjson.dumps({"id": request_id, **body}),
                headers={"Nats-Msg-Id": request_id},  # idempotent, as the README asks
            )
            data = await asyncio.wait_for(ended, timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no result within {timeout_s:g} s") from None
        finally:
            await sub.unsubscribe()
        elapsed_s = time.perf_counter() - started
        state = decode(data, RequestState)
        if state.status != "succeeded":
            reason = state.error.message if state.error else ""
            raise RequestFailed(f"request {state.status}: {reason}")
        return state, elapsed_s

    def close(self, timeout_s: float = 5.0) -> None:
        from common import bus

        try:
            self.bridge.call(bus.close(self.nc, timeout_s))
        finally:
            self.bridge.stop()


_connection: NatsConnection | None = None
_connecting = gevent.lock.Semaphore()


def shared_connection(nats_url: str | None) -> NatsConnection:
    global _connection
    with _connecting:  # users start concurrently; one connects, the others wait for it
        if _connection is None:
            _connection = NatsConnection(nats_url)
    return _connection


@events.init.add_listener
def _import_client(**_: Any) -> None:
    """Import what a connection needs at start-up: done when the first user connects, it would
    take seconds out of the run."""
    import common.bus  # noqa: F401
    import common.messages  # noqa: F401
    import common.settings  # noqa: F401

    gevent.get_hub().loop.update_now()  # as in loadtest.users: these seconds don't count


@events.quitting.add_listener
def _close_connection(**_: Any) -> None:
    global _connection
    if _connection is not None:
        _connection.close()
        _connection = None


class NatsUser(LegoUser):
    host = None  # --host nats://HOST:PORT; else the LEGO_* settings' NATS URL

    def on_start(self) -> None:
        super().on_start()
        self.nats = shared_connection(self.host or None)

    def send(self, workflow: str) -> None:
        body = self.options.request_body(workflow)
        started = time.perf_counter()
        try:
            state, elapsed_s = self.nats.generate(body, self.options.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the user
            self.environment.events.request.fire(
                request_type="NATS", name=workflow, response_length=0, exception=exc,
                response_time=(time.perf_counter() - started) * 1000, context={},
            )
            return
        self.environment.events.request.fire(
            request_type="NATS", name=workflow, response_time=elapsed_s * 1000,
            response_length=state.image.nbytes if state.image else 0, exception=None,
            context={},
        )
