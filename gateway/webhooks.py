"""Delivering webhooks (``common.webhooks``): every gateway replica runs a ``Dispatcher`` on the
one durable consumer of stream LEGO_WEBHOOKS, so any replica delivers any request's events
and a pending delivery outlives the replica that tried it last.

One event is POSTed (signed, ``webhook_timeout_s``, no redirects followed) until the receiver
answers 2xx: then it is acked and counted in the request's ``webhook.delivered``; any other
answer, none in time, or no connection naks it with a back-off (``webhook_backoff_s``, doubled
each attempt, at most ``webhook_backoff_max_s``) and notes the error in ``webhook.last_error``;
after ``webhook_max_attempts`` it is given up (``webhook.failed``) and removed. A replica
that dies mid-attempt leaves the event unacked: JetStream hands it to another after the
consumer's ack wait. A host no longer in ``webhook_allow`` is given up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError

from common import subjects, webhooks
from common.errors import InvalidField, InvalidRequest
from common.messages import RequestState, WebhookEvent, decode
from common.settings import Settings
from common.tracking import RequestTracker

log = logging.getLogger(__name__)

#: most characters of a receiver's error kept in the request's state
_MAX_ERROR_CHARS = 300


async def check_resolves(url: str, timeout_s: float) -> None:
    """Reject (``InvalidRequest`` naming ``webhook_url``) a webhook whose host name does not
    exist; one whose lookup is not answered within ``timeout_s``, or fails for now, passes
    (its deliveries fail then, and that is noted in the request's state)."""
    if not webhooks.needs_lookup(url):
        return
    host, port = webhooks.target(url)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
            timeout_s,
        )
    except (TimeoutError, socket.gaierror) as exc:
        if isinstance(exc, socket.gaierror) and exc.errno != socket.EAI_AGAIN:
            raise InvalidRequest([InvalidField(
                "webhook_url", f"host {host} does not resolve ({exc.strerror})")]) from None
        log.info("webhook host %s: no answer from DNS within %.1f s; accepted", host, timeout_s)
    except UnicodeError:  # an empty or overlong label
        raise InvalidRequest([InvalidField(
            "webhook_url", f"host {host} is not a valid host name")]) from None


def consumer_config(settings: Settings) -> ConsumerConfig:
    """The shared consumer: an attempt that outlives its ack wait (its replica died) is handed
    out again; attempts are counted here, not by ``max_deliver``, so none is dropped silently."""
    return ConsumerConfig(
        durable_name=subjects.WEBHOOKS_CONSUMER,
        filter_subject=subjects.WEBHOOKS_WILDCARD,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=2 * settings.webhook_timeout_s + 1,
        max_deliver=-1,
        max_ack_pending=1024,
    )


class Dispatcher:
    """Delivers the events of LEGO_WEBHOOKS from this process until ``stop``. ``view``: the
    request's JSON as the API shows it (the events' ``data``)."""

    def __init__(self, settings: Settings, js: JetStreamContext, tracker: RequestTracker,
                 view: Callable[[RequestState], Any] | None = None) -> None:
        self.settings = settings
        self.js = js
        self.tracker = tracker
        self.view = view or (lambda state: msgspec.to_builtins(state))
        secret = settings.webhook_secret
        self.key = webhooks.signing_key(secret.get_secret_value()) if secret else None
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            await self.js.add_consumer(subjects.WEBHOOKS_STREAM, consumer_config(self.settings))
        except BadRequestError:
            log.debug("webhooks consumer exists with other settings; keeping it")
        self.sub = await self.js.pull_subscribe_bind(
            durable=subjects.WEBHOOKS_CONSUMER, stream=subjects.WEBHOOKS_STREAM)
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                      headers={"user-agent": "LegoDiffusion-Webhooks"})
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop taking events; the attempts in flight get their timeout to finish (what is
        cut off is handed out again after the ack wait)."""
        self._stop.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._inflight:
            _, pending = await asyncio.wait(self._inflight,
                                            timeout=self.settings.webhook_timeout_s + 1)
            for task in pending:
                task.cancel()
        await self.http.aclose()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            await self._slots.acquire()
            try:
                [msg] = await self.sub.fetch(1, timeout=0.5)  # returns on the first arrival
            except Exception as exc:  # noqa: BLE001 - nothing waiting, or NATS reconnecting
                self._slots.release()
                if not isinstance(exc, TimeoutError):
                    log.warning("webhooks: fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                continue
            task = asyncio.create_task(self._handle(msg))
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("webhooks: delivery failed: %r", task.exception())

    async def _handle(self, msg: Msg) -> None:
        try:
            event = decode(msg.data, WebhookEvent)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("webhooks: dropping a malformed event: %s", exc)
            await msg.term()
            return
        if self.key is None or not webhooks.allowed(event.url, self.settings.webhook_allow):
            await msg.term()  # no retry can help
            await self._note(event, delivered=False, gave_up=True, error="not sent: the host "
                             "is no longer in this service's webhook_allow setting")
            return
        error = await self.post(event)
        if error is None:
            await msg.ack()
            await self._note(event, delivered=True)
            return
        attempt, limit = msg.metadata.num_delivered or 1, self.settings.webhook_max_attempts
        error = f"{error} (attempt {attempt} of {limit})"
        if attempt >= limit:
            log.warning("webhooks: gave up %s for %s: %s", event.event, event.request_id, error)
            await msg.term()
            await self._note(event, delivered=False, error=error, gave_up=True)
            return
        delay = webhooks.backoff_s(attempt, self.settings.webhook_backoff_s,
                                   self.settings.webhook_backoff_max_s)
        log.info("webhooks: %s for %s failed: %s; again in %.1f s", event.event,
                 event.request_id, error, delay)
        await msg.nak(delay=delay)
        await self._note(event, delivered=False, error=error)

    async def post(self, event: WebhookEvent) -> str | None:
        """POST ``event`` once, signed; None when the receiver answered 2xx, else what went
        wrong."""
        if event.state is not None:
            data = self.view(event.state)
        else:
            data = msgspec.to_builtins(event.progress)
        payload = webhooks.body(event, data)
        headers = webhooks.headers(self.key or b"", event.id, int(time.time()), payload)
        timeout_s = self.settings.webhook_timeout_s
        try:  # the whole attempt within the timeout; the answer's body is never read
            async with asyncio.timeout(timeout_s), self.http.stream(
                "POST", event.url, content=payload, headers=headers, timeout=timeout_s,
            ) as response:
                status, reason = response.status_code, response.reason_phrase
        except (TimeoutError, httpx.TimeoutException):
            return f"no answer within {timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        if 200 <= status < 300:
            return None
        return f"HTTP {status} {reason}"[:_MAX_ERROR_CHARS]

    async def _note(self, event: WebhookEvent, delivered: bool, error: str | None = None,
                    gave_up: bool = False) -> None:
        """Note the attempt's outcome in the request's state (gone: nothing to note)."""

        def change(state: RequestState) -> RequestState | None:
            hook = state.webhook
            if hook is None:
                return None
            if delivered:
                hook.delivered[event.event] = hook.delivered.get(event.event, 0) + 1
            else:
                hook.last_error = f"{event.event}: {error}"
                if gave_up:
                    hook.failed[event.event] = hook.failed.get(event.event, 0) + 1
            return state

        try:
            await self.tracker.update(event.request_id, change)
        except Exception as exc:  # noqa: BLE001 - the delivery itself is settled
            log.warning("webhooks: could not note %s of %s: %s", event.event, event.request_id,
                        exc)

