"""The gateway's REST API: ``LegoClient`` (sync) and ``AsyncLegoClient`` (asyncio), the same
methods, the same retries, the same typed results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from legoclient import _calls as calls
from legoclient.errors import LegoError
from legoclient.models import Generation, HistoryPage, Progress
from legoclient.retry import Retry
from legoclient.sse import SseParser

#: what ``on_event`` gets: a state (the first, then the final one), or a step of a node
Event = Generation | Progress
EventCallback = Callable[[Event], None]
DEFAULT_URL = "http://127.0.0.1:8000"


def _options(base_url: str, timeout_s: float, api_key: str | None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return {"base_url": base_url.rstrip("/"), "timeout": timeout_s, "headers": headers}


def _timed_out(request_id: str, state: Generation | None, timeout_s: float) -> TimeoutError:
    what = f"still {state.status}" if state else "did not end"
    return TimeoutError(f"request {request_id} {what} after {timeout_s:g} s")


class LegoClient:
    """A gateway over HTTP. ``api_key`` is sent as ``Authorization: Bearer``; ``retry`` says
    when a call the gateway refused for now (429, 503: Retry-After is honoured) or that met a
    connection error is tried again. ``http`` is the underlying ``httpx.Client``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 api_key: str | None = None, retry: Retry | None = None) -> None:
        self.http = httpx.Client(**_options(base_url, timeout_s, api_key))
        self.retry = retry or Retry()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LegoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: calls.Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self.http.send(call.request(self.http))
            except httpx.TransportError as exc:
                delay = self.retry.after_error(exc, attempt, call.idempotent)
                if delay is None:
                    raise
            else:
                delay = self.retry.after_response(response, attempt)
                if delay is None:
                    return call.read(calls.checked(response))
            attempt += 1
            time.sleep(delay)

    def submit(self, workflow: str = "txt2img", *, wait_s: float = 0.0,
               **params: Any) -> Generation:
        """Queue a request (``params``: the workflow's parameters, and optionally ``id`` and
        ``deadline_s``); with ``wait_s`` the gateway answers once it ended (or wait_s passed).
        Without an ``id`` the client draws one, so that a retried submission is one request."""
        return self._send(calls.submit(workflow, wait_s, params))

    def status(self, request_id: str, wait_s: float = 0.0) -> Generation:
        """The request's state; with ``wait_s`` once it has ended (or wait_s passed)."""
        return self._send(calls.status(request_id, wait_s))

    def image(self, request_id: str) -> bytes:
        """The finished image's file, in the request's ``output_format`` (PNG by default)."""
        return self._send(calls.image_file(request_id))[0]

    def history(self, *, workflow: str | None = None, status: str | None = None,
                since: float | None = None, limit: int | None = None,
                cursor: str | None = None) -> HistoryPage:
        """One page of the requests kept, newest first; ``since``: epoch seconds (created at
        or after); ``cursor``: the previous page's ``next_cursor``."""
        return self._send(calls.history(
            workflow=workflow, status=status, since=since, limit=limit, cursor=cursor))

    def cancel(self, request_id: str) -> Generation:
        return self._send(calls.cancel(request_id))

    def workflows(self) -> list[dict[str, Any]]:
        """The registered workflow specs, with the pools each runs on."""
        return self._send(calls.workflows())

    def add_workflow(self, spec: dict[str, Any] | str) -> dict[str, Any]:
        """Register a workflow (a spec, or its YAML/JSON text) at run time."""
        return self._send(calls.add_workflow(spec))

    def events(self, request_id: str) -> Iterator[Event]:
        """Follow a request over Server-Sent Events: its state first, a ``Progress`` per step,
        and its final state last, after which the stream ends."""
        with self.http.stream("GET", calls.events_path(request_id),
                              timeout=calls.stream_timeout(self.http)) as response:
            if response.status_code >= 400:
                response.read()
                calls.checked(response)
            parser = SseParser()
            for line in response.iter_lines():
                found = parser.feed(line)
                event = found and calls.event_of(*found)
                if event is not None:
                    yield event

    def wait(self, request_id: str, timeout_s: float = 600.0,
             on_event: EventCallback | None = None) -> Generation:
        """The final state once the request has ended. With ``on_event``, follow its events
        and hand each to ``on_event``; else (or once the stream broke) long-poll."""
        deadline = time.monotonic() + timeout_s
        if on_event is not None:
            try:
                for event in self.events(request_id):
                    on_event(event)
                    if isinstance(event, Generation) and event.done:
                        return event
                    if time.monotonic() > deadline:
                        raise _timed_out(request_id, None, timeout_s)
            except httpx.TransportError:
                pass  # the gateway went away mid-stream: another replica answers the polls
        while True:
            left_s = deadline - time.monotonic()
            state = self.status(request_id, wait_s=max(0.0, min(calls.LONG_POLL_S, left_s)))
            if state.done:
                return state
            if left_s <= 0:
                raise _timed_out(request_id, state, timeout_s)

    def generate(self, workflow: str = "txt2img", *, timeout_s: float = 600.0,
                 on_event: EventCallback | None = None,
                 **params: Any) -> tuple[Generation, bytes]:
        """Submit, wait, and return (final state, image file: PNG unless ``output_format``
        asks for JPEG or WebP); ``LegoError`` when it did not succeed. ``on_event`` follows
        its progress (see ``events``)."""
        # Without a progress display, one round trip: the gateway answers at the end.
        state = self.submit(workflow, wait_s=0.0 if on_event else 1.0, **params)
        if not state.done:
            state = self.wait(state.id, timeout_s, on_event)
        if state.status != "succeeded":
            raise LegoError.of(state)
        return state, self.image(state.id)


class AsyncLegoClient:
    """``LegoClient`` for asyncio: the same methods, awaited (``events`` is an async
    iterator). ``http`` is the underlying ``httpx.AsyncClient``."""

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout_s: float = 30.0,
                 api_key: str | None = None, retry: Retry | None = None) -> None:
        self.http = httpx.AsyncClient(**_options(base_url, timeout_s, api_key))
        self.retry = retry or Retry()

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncLegoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, call: calls.Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self.http.send(call.request(self.http))
            except httpx.TransportError as exc:
                delay = self.retry.after_error(exc, attempt, call.idempotent)
                if delay is None:
                    raise
            else:
                delay = self.retry.after_response(response, attempt)
                if delay is None:
                    return call.read(calls.checked(response))
            attempt += 1
            await asyncio.sleep(delay)

    async def submit(self, workflow: str = "txt2img", *, wait_s: float = 0.0,
                     **params: Any) -> Generation:
        """See ``LegoClient.submit``."""
        return await self._send(calls.submit(workflow, wait_s, params))

    async def status(self, request_id: str, wait_s: float = 0.0) -> Generation:
        return await self._send(calls.status(request_id, wait_s))

    async def image(self, request_id: str) -> bytes:
        return (await self._send(calls.image_file(request_id)))[0]

    async def history(self, *, workflow: str | None = None, status: str | None = None,
                      since: float | None = None, limit: int | None = None,
                      cursor: str | None = None) -> HistoryPage:
        return await self._send(calls.history(
            workflow=workflow, status=status, since=since, limit=limit, cursor=cursor))

    async def cancel(self, request_id: str) -> Generation:
        return await self._send(calls.cancel(request_id))

    async def workflows(self) -> list[dict[str, Any]]:
        return await self._send(calls.workflows())

    async def add_workflow(self, spec: dict[str, Any] | str) -> dict[str, Any]:
        return await self._send(calls.add_workflow(spec))

    async def events(self, request_id: str) -> AsyncIterator[Event]:
        """See ``LegoClient.events``."""
        async with self.http.stream("GET", calls.events_path(request_id),
                                    timeout=calls.stream_timeout(self.http)) as response:
            if response.status_code >= 400:
                await response.aread()
                calls.checked(response)
            parser = SseParser()
            async for line in response.aiter_lines():
                found = parser.feed(line)
                event = found and calls.event_of(*found)
                if event is not None:
                    yield event

    async def wait(self, request_id: str, timeout_s: float = 600.0,
                   on_event: EventCallback | None = None) -> Generation:
        """See ``LegoClient.wait``."""
        deadline = time.monotonic() + timeout_s
        if on_event is not None:
            try:
                async for event in self.events(request_id):
                    on_event(event)
                    if isinstance(event, Generation) and event.done:
                        return event
                    if time.monotonic() > deadline:
                        raise _timed_out(request_id, None, timeout_s)
            except httpx.TransportError:
                pass
        while True:
            left_s = deadline - time.monotonic()
            state = await self.status(request_id,
                                      wait_s=max(0.0, min(calls.LONG_POLL_S, left_s)))
            if state.done:
                return state
            if left_s <= 0:
                raise _timed_out(request_id, state, timeout_s)

    async def generate(self, workflow: str = "txt2img", *, timeout_s: float = 600.0,
                       on_event: EventCallback | None = None,
                       **params: Any) -> tuple[Generation, bytes]:
        """See ``LegoClient.generate``."""
        state = await self.submit(workflow, wait_s=0.0 if on_event else 1.0, **params)
        if not state.done:
            state = await self.wait(state.id, timeout_s, on_event)
        if state.status != "succeeded":
            raise LegoError.of(state)
        return state, await self.image(state.id)
