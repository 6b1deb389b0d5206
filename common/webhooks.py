"""Webhooks: a request may name a ``webhook_url`` (and ``webhook_events``: any of started,
progress, completed; default completed) to which its events are POSTed, signed.

Who does what:

- the ingress checks the fields at submission (``field_errors``; the gateway also resolves the
  host, ``gateway.webhooks.check_resolves``) and records ``RequestState.webhook``;
- whoever moves the request on enqueues the event in stream LEGO_WEBHOOKS (``notify``): the
  tracker when the request starts and when it ends, the node that reports a step (only for a
  request that asked for progress: its tasks carry ``progress_webhook``);
- every gateway replica delivers from that stream through one shared durable consumer
  (``gateway.webhooks.Dispatcher``): at least once, retried with back-off, noted in the state.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id`` (the same on every attempt of one event), ``webhook-timestamp`` (seconds) and
``webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``. The key is
the ``webhook_secret`` setting: ``whsec_<base64>`` is decoded (the Standard Webhooks form),
any other string is used as its UTF-8 bytes. This module is pure apart from ``notify``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
from nats.js import JetStreamContext

from common import subjects
from common.errors import InvalidField
from common.messages import Progress, RequestState, Webhook, WebhookEvent, encode, now

EVENTS = ("started", "progress", "completed")
DEFAULT_EVENTS = ["completed"]
SCHEMES = ("http", "https")
MAX_URL_CHARS = 2048
#: how old a signed timestamp a receiver accepts (Standard Webhooks' suggestion)
TOLERANCE_S = 300
SECRET_PREFIX = "whsec_"


def target(url: str) -> tuple[str, int]:
    """(host, port) a valid webhook URL names; the host lower-case, an IPv6 one in brackets."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return host, parts.port or (443 if parts.scheme == "https" else 80)


def _matches(pattern: str, text: str) -> bool:
    """Whether ``text`` is ``pattern`` with each ``*`` standing for any characters (nothing
    else is special: an IPv6 host's brackets are literal)."""
    parts = (re.escape(part) for part in pattern.lower().split("*"))
    return re.fullmatch(".*".join(parts), text) is not None


def allowed(url: str, patterns: list[str]) -> bool:
    """Whether ``url``'s host matches one of the allow-list ``patterns``: a pattern of the
    host (``*.example.com``) or of host:port (``127.0.0.1:8080``, ``localhost:*``,
    ``[::1]:*``)."""
    host, port = target(url)
    return any(_matches(p, host) or _matches(p, f"{host}:{port}") for p in patterns)


def _url_error(url: Any, patterns: list[str]) -> InvalidField | None:
    if not isinstance(url, str) or not url:
        return InvalidField("webhook_url", "must be an http(s) URL")
    if len(url) > MAX_URL_CHARS:
        return InvalidField("webhook_url", f"{len(url)} characters exceed the limit of "
                            f"{MAX_URL_CHARS}", MAX_URL_CHARS)
    if any(c.isspace() or not c.isprintable() for c in url):
        return InvalidField("webhook_url", "must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as exc:
        return InvalidField("webhook_url", f"is not a valid URL: {exc}")
    if parts.scheme not in SCHEMES or not parts.hostname:
        return InvalidField("webhook_url", "must be an http:// or https:// URL with a host",
                            list(SCHEMES))
    if parts.username is not None or parts.password is not None:
        return InvalidField("webhook_url", "must not carry credentials (the request's state "
                            "shows the URL; receivers check the signature instead)")
    if not patterns:
        return InvalidField("webhook_url", "webhooks are not enabled on this service (its "
                            "webhook_allow setting is empty)")
    if not allowed(url, patterns):
        host, port = target(url)
        return InvalidField("webhook_url", f"host {host}:{port} is not allowed (not in this "
                            "service's webhook_allow setting)")
    return None


def _events_error(events: Any) -> InvalidField | None:
    if (not isinstance(events, list) or not events
            or not all(isinstance(e, str) and e in EVENTS for e in events)
            or len(set(events)) != len(events)):
        return InvalidField("webhook_events", "must be a non-empty list of distinct events "
                            f"of {', '.join(EVENTS)}", list(EVENTS))
    return None


def field_errors(raw: dict[str, Any], patterns: list[str]) -> list[InvalidField]:
    """What is wrong with a request's ``webhook_url`` and ``webhook_events``, each error
    naming its field and limit; ``patterns``: the ``webhook_allow`` setting."""
    url, events = raw.get("webhook_url"), raw.get("webhook_events")
    errors = []
    if url is not None:
        errors.append(_url_error(url, patterns))
    elif events is not None:
        errors.append(InvalidField("webhook_events", "needs a webhook_url"))
    if events is not None:
        errors.append(_events_error(events))
    return [e for e in errors if e is not None]


def of(raw: dict[str, Any]) -> Webhook | None:
    """The webhook of a request that passed ``field_errors``, if it names one."""
    url = raw.get("webhook_url")
    if url is None:
        return None
    return Webhook(url=url, events=list(raw.get("webhook_events") or DEFAULT_EVENTS))


def needs_lookup(url: str) -> bool:
    """Whether the host is a name to resolve (not an IP address)."""
    host = target(url)[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


# --- producing events --------------------------------------------------------------------------

def event_id(request_id: str, event: str, progress: Progress | None = None) -> str:
    """``webhook-id`` of an event, also its Nats-Msg-Id (a repeated enqueue is dropped)."""
    if progress is not None:
        return f"{request_id}.progress.{progress.node}.{progress.step}"
    return f"{request_id}.{event}"


async def notify(js: JetStreamContext, state: RequestState, event: str) -> None:
    """Enqueue ``event`` (started, completed) of ``state`` if its request asked for it."""
    hook = state.webhook
    if hook is None or event not in hook.events:
        return
    await _enqueue(js, WebhookEvent(
        id=event_id(state.id, event), request_id=state.id, event=event, url=hook.url,
        at=now(), state=state,
    ))


async def notify_progress(js: JetStreamContext, url: str, progress: Progress) -> None:
    """Enqueue one step of progress for the webhook ``url`` (the task's ``progress_webhook``)."""
    await _enqueue(js, WebhookEvent(
        id=event_id(progress.id, "progress", progress), request_id=progress.id,
        event="progress", url=url, at=now(), progress=progress,
    ))


async def _enqueue(js: JetStreamContext, event: WebhookEvent) -> None:
    await js.publish(subjects.webhook_subject(event.request_id, event.event), encode(event),
                     headers={"Nats-Msg-Id": event.id})


# --- the body and its signature ----------------------------------------------------------------

def body(event: WebhookEvent, data: Any) -> bytes:
    """``{"type": "generation.<event>", "timestamp": ISO 8601 of when it happened, "data"}``."""
    at = datetime.fromtimestamp(event.at, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps({"type": f"generation.{event.event}",
                         "timestamp": at.replace("+00:00", "Z"), "data": data})


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``webhook_secret``: ``whsec_<base64>`` decoded, else its UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except binascii.Error:
            pass  # not base64 after all: the string itself is the key
    return secret.encode()


def signature(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> str:
    """``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``."""
    signed = f"{msg_id}.{timestamp}.".encode() + payload
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, msg_id: str, timestamp: int, payload: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, msg_id, timestamp, payload),
    }


def verify(secret: str, received: dict[str, str], payload: bytes, at: float | None = None,
           tolerance_s: float = TOLERANCE_S) -> bool:
    """What a receiver checks: a ``v1`` signature of the body under the secret, with a
    timestamp within ``tolerance_s`` of now (a replayed old delivery fails). ``received``:
    the request's headers, lower-case names."""
    try:
        timestamp = int(received["webhook-timestamp"])
        msg_id = received["webhook-id"]
    except (KeyError, ValueError):
        return False
    if abs((now() if at is None else at) - timestamp) > tolerance_s:
        return False
    expected = signature(signing_key(secret), msg_id, timestamp, payload)
    return any(hmac.compare_digest(expected, candidate)
               for candidate in received.get("webhook-signature", "").split())


def backoff_s(attempt: int, first_s: float, most_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1, 2, ...): ``first_s`` doubled each time."""
    return min(most_s, first_s * 2 ** (attempt - 1))
