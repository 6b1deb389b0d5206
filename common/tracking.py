"""Request state and the end of a request's life, shared by the ingress, the nodes and the gateway.

State lives in the JetStream KV bucket ``lego-requests`` (so any gateway replica answers for any
request, and a restart loses nothing). Every change is a compare-and-set, so concurrent writers
(two branches of a DAG, a cancel racing a finish) never overwrite each other, and a request ends
exactly once: whoever moves it to a terminal status publishes the completion event and deletes
its intermediate tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from common import subjects, webhooks
from common.messages import (
    ErrorInfo,
    NodeTiming,
    RequestState,
    Status,
    TensorRef,
    decode,
    encode,
    now,
)
from common.store import TensorStore

log = logging.getLogger(__name__)


class RequestTracker:
    def __init__(
        self,
        js: JetStreamContext,
        buckets: dict[str, KeyValue],
        store: TensorStore,
    ) -> None:
        self.js = js
        self.states = buckets[subjects.STATE_BUCKET]
        self.cancels = buckets[subjects.CANCEL_BUCKET]
        self.store = store

    async def get(self, request_id: str) -> RequestState | None:
        try:
            entry = await self.states.get(request_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode(entry.value, RequestState)

    async def create(self, state: RequestState) -> bool:
        """Store a new request; False when the id is taken (an idempotent re-submission)."""
        data = encode(state)
        try:
            await self.states.create(state.id, data)
        except KeyWrongLastSequenceError:
            # our own write, when an earlier try of it timed out but landed (failover)
            return await self._holds(state.id, data)
        return True

    async def _holds(self, request_id: str, data: bytes) -> bool:
        """Whether the request's stored state is exactly ``data``."""
        try:
            return (await self.states.get(request_id)).value == data
        except KeyNotFoundError:
            return False

    async def update(
        self, request_id: str, change: Callable[[RequestState], RequestState | None],
        *, touch: bool = True,
    ) -> RequestState | None:
        """Apply ``change`` with compare-and-set, retrying on conflicts. ``change`` returns the
        new state, or None to leave it as it is (then None is returned). ``touch``: set
        ``updated_at`` to now (else ``change`` sets it)."""
        while True:
            try:
                entry = await self.states.get(request_id)
            except KeyNotFoundError:
                return None
            # an empty value reads as None: malformed, like any other bad state
            state = decode(entry.value or b"", RequestState)
            new = change(state)
            if new is None:
                return None
            if touch:
                new.updated_at = now()
            data = encode(new)
            try:
                await self.states.update(request_id, data, last=entry.revision)
            except KeyWrongLastSequenceError:
                if await self._holds(request_id, data):
                    return new  # an earlier try of this write timed out but landed
                continue
            return new

    async def mark_running(self, request_id: str) -> RequestState | None:
        """Move a queued request to running (once: None when it was not queued)."""

        def change(state: RequestState) -> RequestState | None:
            if state.status != "queued":
                return None
            state.status = "running"
            state.started_at = now()
            return state

        running = await self.update(request_id, change)
        if running is not None:
            await self._notify(running, "started")
        return running

    async def finish(
        self,
        request_id: str,
        status: Status,
        *,
        error: ErrorInfo | None = None,
        image: TensorRef | None = None,
        meta: dict | None = None,
        timings: list[NodeTiming] | None = None,
    ) -> RequestState | None:
        """End the request once: the first caller wins, later ones get None.

        Publishes the completion event (and enqueues it for the request's webhook) and deletes
        the request's intermediate tensors (and its image unless it succeeded)."""

        def change(state: RequestState) -> RequestState | None:
            if state.done:
                return None
            state.status = status
            # the write that ends it is the one with updated_at == finished_at
            state.finished_at = state.updated_at = now()
            state.started_at = state.started_at or state.finished_at
            state.error = error
            state.image = image
            if meta:
                state.meta.update(meta)
                state.warnings = sorted({*state.warnings, *meta.get("warnings", [])})
            if timings:
                state.timings = timings
            return state

        # Whoever ends it, the request is over: its intermediate tensors go first, so a client
        # that sees the final state never finds them still there (unless the store is down:
        # then they are left to their TTL, and the request still ends).
        await self._delete("tmp", request_id)
        final = await self.update(request_id, change, touch=False)
        if final is None:
            return None
        if status == "cancelled":
            await self.cancels.put(request_id, b"1")
        await self.publish_result(final)
        await self._notify(final, "completed")
        await self.cleanup(request_id, keep_image=status == "succeeded")
        return final

    async def _notify(self, state: RequestState, event: str) -> None:
        """Enqueue the event for the request's webhook, if it asked for it; a failure is
        logged, never raised: the request's own end must go on."""
        try:
            await webhooks.notify(self.js, state, event)
        except Exception as exc:  # noqa: BLE001 - JetStream unreachable
            log.error("could not enqueue the %s webhook of %s: %s", event, state.id, exc)

    async def publish_result(self, state: RequestState, attempt: str = "result") -> None:
        """The completion event. ``attempt`` names it for JetStream's de-duplication: a
        rejection the client may retry past (overload) must not hide the later result."""
        await self.js.publish(
            subjects.result_subject(state.id),
            encode(state),
            headers={"Nats-Msg-Id": f"{state.id}:{attempt}"},
        )

    async def cleanup(self, request_id: str, keep_image: bool) -> None:
        await self._delete("tmp", request_id)
        if not keep_image:
            await self._delete("out", request_id)

    async def _delete(self, area: str, request_id: str) -> None:
        """Delete a request's tensors of ``area``; when the store cannot be reached, log it
        and leave them to their TTL (the store's own, or its sweep): a store outage must not
        keep a request from ending."""
        try:
            await self.store.delete_group(area, request_id)
        except Exception as exc:  # noqa: BLE001 - the store is down; they expire by themselves
            log.warning("could not delete %s tensors of %s (%s); left to their TTL",
                        area, request_id, exc)

    async def cancel(self, request_id: str) -> RequestState | None:
        """Cancel a request that has not ended; nodes drop its work at the next step boundary."""
        return await self.finish(
            request_id,
            "cancelled",
            error=ErrorInfo(code="cancelled", message="cancelled by the client"),
        )
