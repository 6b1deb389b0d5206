"""``GET /v1/generations/{id}/events``: a request's progress as Server-Sent Events.

    event: state      data: the request's JSON, as GET /v1/generations/{id} answers it
    event: progress   data: {"id", "node", "step", "total"}, once per step a node reports
    event: state      data: the state again after STANDING_S without news: its queue_position
                      and eta_s as they are now
    ...
    event: state      data: the final JSON once the request has ended; then the stream closes

A request that already ended gets its one state event. The stream follows NATS (the nodes'
``lego.progress.<id>`` messages and the writes of the request's KV state), not this process's
memory, so any gateway replica serves any request. A comment line (``: ping``) every
``PING_S`` keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from common import subjects
from common.errors import LegoError
from common.messages import Progress, RequestState, decode, encode
from gateway import openapi

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

PING_S = 15.0
#: a request's state is sent again after this long without an event (its standing moves on)
STANDING_S = 1.0
#: how long one wait for the end lasts before it is renewed (the stream itself has no limit)
_WAIT_SLICE_S = 60.0

router = APIRouter()


@router.get(
    "/v1/generations/{request_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": openapi.ref("GenerationEvent")}},
                     "description": "state, progress..., final state (Server-Sent Events)"},
               404: openapi.error("no such request (or it expired)")},
)
async def generation_events(request: Request, request_id: str) -> EventSourceResponse:
    """Follow a request: its state, then each step's progress, then its final state."""
    gateway: Gateway = request.app.state.gateway
    await gateway.state(request_id)  # an unknown id is a 404 before the stream starts
    return EventSourceResponse(follow(gateway, request_id), ping=PING_S, sep="\n")


async def follow(gateway: Gateway, request_id: str) -> AsyncIterator[ServerSentEvent]:
    """The events of one request, until it ends or the client goes away."""
    # Progress and the final state arrive in one queue, in the order NATS delivered them;
    # None: the state is gone (expired), end the stream.
    queue: asyncio.Queue[Progress | RequestState | None] = asyncio.Queue()

    async def on_step(msg: Any) -> None:
        queue.put_nowait(decode(msg.data, Progress))

    # Subscribed before the state is read: no step and no end can fall in between.
    sub = await gateway.nc.subscribe(subjects.progress_subject(request_id), cb=on_step)
    watcher = asyncio.create_task(_until_done(gateway, request_id, queue))
    try:
        state = await gateway.state(request_id)
        yield _state_event(gateway, state)
        if state.done:
            return
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), STANDING_S)
            except TimeoutError:  # nothing new for a while: where it stands now
                try:
                    state = await gateway.state(request_id)
                except LegoError:  # its state expired while followed
                    return
                yield _state_event(gateway, state)
                if state.done:
                    return
                continue
            if isinstance(item, Progress):
                yield ServerSentEvent(encode(item).decode(), event="progress")
                continue
            if item is not None:
                yield _state_event(gateway, item)
            return
    finally:  # also when the client disconnects: the stream's task is cancelled
        watcher.cancel()
        with contextlib.suppress(Exception):  # the connection may be closing already
            await sub.unsubscribe()


async def _until_done(gateway: Gateway, request_id: str,
                      queue: asyncio.Queue[Progress | RequestState | None]) -> None:
    """Put the request's final state in ``queue`` once it has ended."""
    try:
        while not (state := await gateway.wait(request_id, _WAIT_SLICE_S)).done:
            pass
    except LegoError as exc:  # its state expired while followed
        log.debug("stopped following %s: %s", request_id, exc)
        queue.put_nowait(None)
        return
    queue.put_nowait(state)


def _state_event(gateway: Gateway, state: RequestState) -> ServerSentEvent:
    return ServerSentEvent(orjson.dumps(gateway.view(state)).decode(), event="state")
