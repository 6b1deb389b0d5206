"""A small Python client: over HTTP (``LegoClient``) or straight over NATS (``NatsClient``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson

from common import subjects
from common.messages import Progress, RequestState, TensorRef, decode
from common.settings import Settings

#: called with each Server-Sent Event of a request: ("state", body) or ("progress", step)
EventCallback = Callable[[str, dict[str, Any]], None]
TERMINAL = ("succeeded", "failed", "cancelled")
#: a stream that stays silent this long is dead (the gateway pings every 15 s)
_STREAM_READ_TIMEOUT_S = 60.0


class LegoError(RuntimeError):
    """The gateway refused a request or the request failed; ``body`` is the error JSON."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.body = body


class SseParser:
    """Reads a text/event-stream line by line as a browser's EventSource does: ``feed`` returns
    (event, JSON data) when a blank line ends an event, else None."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, Any] | None:
        if not line:  # a blank line ends an event
            found = (self.event, orjson.loads("\n".join(self.data))) if self.data else None
            self.event, self.data = "message", []
            return found
        if not line.startswith(":"):  # ":" starts a comment (the keep-alive ping)
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self.event = value
            elif name == "data":
                self.data.append(value)
        return None


class LegoClient:
    """Talks to a gateway over HTTP; ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(self, base_url: str, timeout_s: float = 30.0,
                 api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                 headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LegoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"message": response.text}
            raise LegoError(response.status_code, body)
        return response

    def submit(self, workflow: str = "txt2img", *, wait_s: float = 0.0,
               **params: Any) -> dict[str, Any]:
        """Queue a request; with ``wait_s`` the gateway answers once it ended (or wait_s passed)."""
        body = {"workflow": workflow, **{k: v for k, v in params.items() if v is not None}}
        response = self.http.post("/v1/generations", json=body, params={"wait": wait_s},
                                  timeout=wait_s + 30)
        return self._check(response).json()

    def status(self, request_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        response = self.http.get(
            f"/v1/generations/{request_id}", params={"wait": wait_s},
            timeout=wait_s + 30,
        )
        return self._check(response).json()

    def image(self, request_id: str) -> bytes:
        """The finished image's file, in the request's ``output_format`` (PNG by default)."""
        return self._check(self.http.get(f"/v1/generations/{request_id}/image")).content

    def history(self, *, workflow: str | None = None, status: str | None = None,
                since: float | None = None, limit: int | None = None,
                cursor: str | None = None) -> dict[str, Any]:
        """One page of the requests kept, newest first (``GET /v1/generations``):
        ``{"data": [state, ...], "next_cursor": str | None}``; pass ``next_cursor`` back as
        ``cursor`` for the next page. ``since``: epoch seconds (created at or after)."""
        query = {"workflow": workflow, "status": status, "since": since, "limit": limit,
                 "cursor": cursor}
        response = self.http.get("/v1/generations",
                                 params={k: v for k, v in query.items() if v is not None})
        return self._check(response).json()

    def cancel(self, request_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/generations/{request_id}")).json()

    def workflows(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/workflows")).json()["workflows"]

    def add_workflow(self, spec: dict[str, Any] | str) -> dict[str, Any]:
        content = spec if isinstance(spec, str) else orjson.dumps(spec)
        return self._check(self.http.post("/v1/workflows", content=content)).json()

    def events(self, request_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow a request over Server-Sent Events (``GET /v1/generations/{id}/events``):
        ("state", body) first, ("progress", {"id", "node", "step", "total"}) per step, and
        ("state", final body) last, after which the stream ends."""
        timeout = httpx.Timeout(self.http.timeout.connect, read=_STREAM_READ_TIMEOUT_S)
        with self.http.stream("GET", f"/v1/generations/{request_id}/events",
                              timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            parser = SseParser()
            for line in response.iter_lines():
                found = parser.feed(line)
                if found is not None:
                    yield found

    def wait(
        self, request_id: str, timeout_s: float = 600.0, on_event: EventCallback | None = None
    ) -> dict[str, Any]:
        """The final state once the request has ended. With ``on_event``, follow its events
        (SSE) and hand each to ``on_event``; else long-poll, 1 s at a time. A broken stream
        falls back to long-polling."""
        deadline = time.monotonic() + timeout_s
        if on_event is not None:
            try:
                for event, data in self.events(request_id):
                    on_event(event, data)
                    if event == "state" and data["status"] in TERMINAL:
                        return data
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"request {request_id} did not end in {timeout_s} s")
            except httpx.TransportError:
                pass  # the gateway went away mid-stream: another replica answers the polls
        while True:
            state = self.status(request_id, wait_s=1.0)
            if state["status"] in TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {request_id} still {state['status']}")

    def generate(
        self, workflow: str = "txt2img", *, timeout_s: float = 600.0,
        on_event: EventCallback | None = None, **params: Any,
    ) -> tuple[dict[str, Any], bytes]:
        """Submit, wait, and return (final state, image file bytes: PNG unless the params ask
        for another ``output_format``); raises LegoError on failure. ``on_event`` follows the
        request's progress (see ``events``)."""
        # Without a progress display, one round trip: the gateway answers at the end.
        accepted = self.submit(workflow, wait_s=0.0 if on_event else 1.0, **params)
        state = accepted
        if state["status"] not in TERMINAL:
            state = self.wait(accepted["id"], timeout_s, on_event)
        if state["status"] != "succeeded":
            raise LegoError(0, state.get("error") or state)
        return state, self.image(accepted["id"])


class NatsClient:
    """Publishes requests straight to ``lego.requests`` and reads results from NATS; reads the
    image from the tensor store named in the result (same host: shm; else Redis)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> NatsClient:
        from common.bus import connect
        from common.store import open_store

        self.nc = await connect(self.settings, name="lego-client")
        self.js = self.nc.jetstream()
        self.store = open_store(self.settings)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()
        await self.nc.drain()

    async def generate(
        self, request: dict[str, Any], timeout_s: float = 600.0,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> RequestState:
        """Publish ``request`` (a generation request JSON object) and wait for its result."""
        request = {"id": uuid.uuid4().hex, **request}
        request_id = request["id"]
        done: asyncio.Future[RequestState] = asyncio.get_running_loop().create_future()

        async def on_result(msg: Any) -> None:
            if not done.done():
                done.set_result(decode(msg.data, RequestState))

        async def on_step(msg: Any) -> None:
            if on_progress is not None:
                on_progress(decode(msg.data, Progress))

        subs = [
            await self.nc.subscribe(subjects.result_subject(request_id), cb=on_result),
            await self.nc.subscribe(subjects.progress_subject(request_id), cb=on_step),
        ]
        try:
            await self.js.publish(
                subjects.REQUESTS_SUBJECT, orjson.dumps(request),
                headers={"Nats-Msg-Id": request_id},
            )
            return await asyncio.wait_for(done, timeout_s)
        finally:
            for sub in subs:
                await sub.unsubscribe()

    async def image(self, state: RequestState) -> Any:
        """The finished image as a (1, H, W, 3) uint8 tensor."""
        return await self.store.get(_image_of(state))

    async def image_file(self, state: RequestState) -> tuple[bytes, str]:
        """The finished image as (file bytes, media type) in the request's ``output_format``:
        the same bytes the gateway serves (whichever reads it first encodes it, once)."""
        from common.output_format import image_file

        _image_of(state)
        return await image_file(self.store, state, self.settings.result_ttl_s)


def _image_of(state: RequestState) -> TensorRef:
    """Where the image of a finished request is; ``LegoError`` when it has none."""
    if state.image is None:
        raise LegoError(0, state.error.message if state.error else state.status)
    return state.image
