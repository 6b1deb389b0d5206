"""The history: the requests kept in KV ``lego-requests``, newest first, filtered and paged.

The bucket holds one entry per request, its latest state, for ``result_ttl_s`` after its last
change: that is all the history there is, and any gateway replica reads the same. A page is read
through a short-lived pull consumer on the bucket's stream, in batches, keeping only the
``limit + 1`` newest matches seen so far, so memory is bounded by the page, never by how many
requests are kept (each page reads every kept state, from ``since`` on when given).

Order is (created_at, id) descending. A cursor is the last returned item's (created_at, id), and
the next page holds only older items: a request never shows on two pages, however the states
change or new requests arrive between the calls (those are newer than any cursor).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import get_args

import msgspec
import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from common import subjects
from common.errors import InvalidField, InvalidRequest
from common.messages import RequestState, Status, decode

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
STATUSES: list[str] = list(get_args(Status))
#: states fetched per round trip
_BATCH = 256
#: a round trip that takes longer ends the page with what was read
_FETCH_TIMEOUT_S = 5.0
#: the server deletes a consumer left behind (its reader died) after this idle time
_CONSUMER_IDLE_S = 30.0
#: a state is stored when last written, at or after its created_at; with ``since`` the scan
#: starts this much earlier, for clocks of the writer and the NATS server that disagree
_CLOCK_MARGIN_S = 60.0


@dataclass(frozen=True)
class HistoryQuery:
    """What a history page asks for; ``before`` is the decoded cursor."""

    workflow: str | None = None
    status: str | None = None
    since: float | None = None
    limit: int = DEFAULT_LIMIT
    before: tuple[float, str] | None = None

    @classmethod
    def parse(cls, workflow: str | None = None, status: str | None = None,
              since: float | None = None, limit: int | None = None,
              cursor: str | None = None) -> HistoryQuery:
        """A query from a client's values; ``InvalidRequest`` names every bad one and its
        limit."""
        errors: list[InvalidField] = []
        if status is not None and status not in STATUSES:
            errors.append(InvalidField("status", f"{status!r} is not one of {STATUSES}",
                                       STATUSES))
        if limit is None:
            limit = DEFAULT_LIMIT
        elif not 1 <= limit <= MAX_LIMIT:
            errors.append(InvalidField("limit", f"{limit} is not between 1 and {MAX_LIMIT}",
                                       MAX_LIMIT))
        if since is not None and not math.isfinite(since):
            errors.append(InvalidField("since", "must be a finite number of epoch seconds"))
        before = None
        if cursor is not None:
            try:
                before = decode_cursor(cursor)
            except ValueError:
                errors.append(InvalidField("cursor", "is not a next_cursor this API returned"))
        if errors:
            raise InvalidRequest(errors)
        return cls(workflow, status, since, limit, before)

    def matches(self, state: RequestState) -> bool:
        return ((self.workflow is None or state.workflow == self.workflow)
                and (self.status is None or state.status == self.status)
                and (self.since is None or state.created_at >= self.since)
                and (self.before is None or (state.created_at, state.id) < self.before))


def encode_cursor(state: RequestState) -> str:
    """An opaque cursor: the next page starts after ``state``."""
    raw = orjson.dumps([state.created_at, state.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, request_id = orjson.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, orjson.JSONDecodeError, TypeError, ValueError):
        raise ValueError(f"not a cursor: {cursor!r}") from None
    if isinstance(created_at, bool) or not isinstance(created_at, int | float) \
            or not isinstance(request_id, str):
        raise ValueError(f"not a cursor: {cursor!r}")
    return float(created_at), request_id


class Newest:
    """The newest ``query.limit + 1`` states offered that match ``query``, by (created_at, id),
    in memory bounded by the page. The same request offered again (a revision written during
    the scan) replaces its state."""

    def __init__(self, query: HistoryQuery) -> None:
        self.query = query
        self.heap: list[tuple[float, str]] = []
        self.states: dict[str, RequestState] = {}

    def offer(self, state: RequestState) -> None:
        if not self.query.matches(state):
            return
        if state.id in self.states:
            self.states[state.id] = state
            return
        key = (state.created_at, state.id)
        if len(self.heap) <= self.query.limit:
            heapq.heappush(self.heap, key)
        elif key > self.heap[0]:
            _, dropped = heapq.heapreplace(self.heap, key)
            del self.states[dropped]
        else:
            return
        self.states[state.id] = state

    def page(self) -> tuple[list[RequestState], str | None]:
        """(the ``limit`` newest, newest first; the next page's cursor, None when none is
        left)."""
        found = [self.states[i] for _, i in sorted(self.heap, reverse=True)]
        chosen = found[:self.query.limit]
        return chosen, encode_cursor(chosen[-1]) if len(found) > self.query.limit else None


async def page(js: JetStreamContext, query: HistoryQuery
               ) -> tuple[list[RequestState], str | None]:
    """A page of the requests kept in the state bucket: (states, next cursor or None)."""
    newest = Newest(query)
    async for state in kept_states(js, query.since):
        newest.offer(state)
    return newest.page()


async def kept_states(js: JetStreamContext, since: float | None = None
                      ) -> AsyncIterator[RequestState]:
    """Every state kept in the bucket (written at or after ``since``, give or take the clock
    margin), a batch at a time."""
    config = ConsumerConfig(
        name=f"history-{uuid.uuid4().hex}",
        filter_subject=subjects.STATE_UPDATES,
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        inactive_threshold=_CONSUMER_IDLE_S,
    )
    if since is None:
        config.deliver_policy = DeliverPolicy.ALL
    else:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        # a since in the future starts the scan now (no later date would be representable)
        start = min(max(0.0, since - _CLOCK_MARGIN_S), time.time())
        config.opt_start_time = datetime.fromtimestamp(start, UTC)
    info = await js.add_consumer(subjects.STATE_STREAM, config)
    sub = await js.pull_subscribe_bind(stream=subjects.STATE_STREAM, name=info.name)
    try:
        pending = info.num_pending or 0  # the field is optional in ConsumerInfo
        # states rewritten during the scan come again at its end: stop after twice what was
        # there at the start, so a busy bucket cannot keep a page going
        budget = 2 * pending + _BATCH
        while pending > 0 and budget > 0:
            try:
                msgs = await sub.fetch(min(_BATCH, pending), timeout=_FETCH_TIMEOUT_S)
            except TimeoutError:
                log.warning("history: the state bucket stopped answering; the page may be short")
                return
            budget -= len(msgs)
            for msg in msgs:
                pending = msg.metadata.num_pending
                if not msg.data or (msg.headers or {}).get("KV-Operation"):
                    continue  # a deleted or purged entry
                try:
                    yield decode(msg.data, RequestState)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("history: skipped an unreadable state %s: %s", msg.subject, exc)
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(subjects.STATE_STREAM, info.name)
        except Exception as exc:  # noqa: BLE001 - it goes by itself once idle
            log.debug("history: consumer %s not deleted: %s", info.name, exc)
