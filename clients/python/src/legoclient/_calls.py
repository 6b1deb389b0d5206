"""What each gateway call sends and how its answer reads: one description serves the sync and
the async client, which only differ in how they send it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from legoclient.errors import LegoError
from legoclient.models import Generation, HistoryPage, Progress
from legoclient.retry import retry_after_s

#: extra seconds a call that waits on the server (``?wait=S``) allows beyond its wait
WAIT_MARGIN_S = 30.0
#: a stream that stays silent this long is dead (the gateway pings every 15 s)
STREAM_READ_TIMEOUT_S = 60.0
#: the longest a single long-poll asks the gateway to wait (it allows 60 s)
LONG_POLL_S = 10.0


def new_id() -> str:
    """A request id of the client's choosing: a retried submission carries the same one."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    read: Callable[[httpx.Response], Any]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | str | None = None
    #: None: the client's timeout
    timeout_s: float | None = None
    #: whether it may run twice (a retry after the connection broke mid-call)
    idempotent: bool = True

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        timeout = http.timeout if self.timeout_s is None else httpx.Timeout(self.timeout_s)
        return http.build_request(self.method, self.path, params=self.params, json=self.json,
                                  content=self.content, timeout=timeout)


def checked(response: httpx.Response) -> httpx.Response:
    """``response``, or ``LegoError`` with the gateway's error JSON when it is an error."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text}
        raise LegoError(response.status_code, body, retry_after_s=retry_after_s(response))
    return response


def _generation(response: httpx.Response) -> Generation:
    return Generation.from_json(response.json())


def submit(workflow: str, wait_s: float, params: dict[str, Any]) -> Call:
    body = {"workflow": workflow, **{k: v for k, v in params.items() if v is not None}}
    body.setdefault("id", new_id())  # a retry after a broken connection is the same request
    return Call("POST", "/v1/generations", _generation, params={"wait": wait_s}, json=body,
                timeout_s=wait_s + WAIT_MARGIN_S)


def status(request_id: str, wait_s: float) -> Call:
    return Call("GET", f"/v1/generations/{request_id}", _generation, params={"wait": wait_s},
                timeout_s=wait_s + WAIT_MARGIN_S)


def image_file(request_id: str) -> Call:
    return Call("GET", f"/v1/generations/{request_id}/image",
                lambda r: (r.content, r.headers.get("content-type", "")))


def history(**query: Any) -> Call:
    return Call("GET", "/v1/generations", lambda r: HistoryPage.from_json(r.json()),
                params={k: v for k, v in query.items() if v is not None})


def cancel(request_id: str) -> Call:
    return Call("DELETE", f"/v1/generations/{request_id}", _generation)


def workflows() -> Call:
    return Call("GET", "/v1/workflows", lambda r: r.json()["workflows"])


def add_workflow(spec: dict[str, Any] | str) -> Call:
    content = spec if isinstance(spec, str) else orjson.dumps(spec)
    return Call("POST", "/v1/workflows", lambda r: r.json(), content=content, idempotent=False)


def events_path(request_id: str) -> str:
    return f"/v1/generations/{request_id}/events"


def stream_timeout(http: httpx.Client | httpx.AsyncClient) -> httpx.Timeout:
    return httpx.Timeout(http.timeout.connect, read=STREAM_READ_TIMEOUT_S)


def event_of(name: str, data: Any) -> Generation | Progress | None:
    """A Server-Sent Event of a request as a typed value; None for one this client does not
    know (a newer gateway's)."""
    if name == "state":
        return Generation.from_json(data)
    if name == "progress":
        return Progress.from_json(data)
    return None
