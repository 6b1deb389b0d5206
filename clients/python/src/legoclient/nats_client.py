"""Straight over NATS, without the gateway: ``NatsClient``.

A request is published to ``lego.requests`` (JetStream, de-duplicated by its id); its final
state arrives on ``lego.results.<id>`` and its steps on ``lego.progress.<id>``, both subscribed
to before publishing, so neither can slip past.

The image is not on NATS: the nodes leave raw pixels in the service's tensor store, and the
file (PNG, JPEG, WebP) is encoded by whichever reader asks for it first, which needs the
service's own code and its store. So ``image_file`` reads it from a gateway, over HTTP: pass
``gateway_url`` to use it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import nats
import orjson

from legoclient import _calls as calls
from legoclient.errors import LegoError
from legoclient.http import AsyncLegoClient
from legoclient.models import Generation, Progress
from legoclient.retry import Retry

#: the subjects a client uses (the service names them in ``common/subjects.py``)
REQUESTS_SUBJECT = "lego.requests"
RESULTS_PREFIX = "lego.results."
PROGRESS_PREFIX = "lego.progress."
#: the ids the service accepts (it names subjects after them)
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class NatsClient:
    """``async with NatsClient("nats://host:4222") as client``. ``connect_options`` go to
    ``nats.connect`` as they are (credentials: ``user_credentials``, ``nkeys_seed``, ``user``
    and ``password``; ``tls``; ``inbox_prefix``). ``gateway_url`` (and ``api_key``) are only for
    ``image_file``."""

    def __init__(self, servers: str | list[str] = "nats://127.0.0.1:4222", *,
                 gateway_url: str | None = None, api_key: str | None = None,
                 retry: Retry | None = None, **connect_options: Any) -> None:
        self.servers = servers
        self.connect_options = {"name": "legoclient", **connect_options}
        self.gateway = (AsyncLegoClient(gateway_url, api_key=api_key, retry=retry)
                        if gateway_url else None)

    async def __aenter__(self) -> NatsClient:
        self.nc = await nats.connect(self.servers, **self.connect_options)
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        await self.nc.drain()

    async def generate(self, workflow: str = "txt2img", *, timeout_s: float = 600.0,
                       on_progress: Callable[[Progress], None] | None = None,
                       **params: Any) -> Generation:
        """Publish a request (``params``: the workflow's parameters, and optionally ``id`` and
        ``deadline_s``) and return its final state; ``LegoError`` (``generation``: that state)
        when it did not succeed, ``TimeoutError`` when no result came in ``timeout_s``."""
        request = {"workflow": workflow, **{k: v for k, v in params.items() if v is not None}}
        request.setdefault("id", calls.new_id())
        request_id = request["id"]
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            raise LegoError(0, {"code": "invalid_field", "field": "id", "limit": REQUEST_ID.pattern,
                                "message": f"id: {request_id!r} is not {REQUEST_ID.pattern}"})
        ended: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()

        async def on_result(msg: Any) -> None:
            if not ended.done():
                ended.set_result(Generation.from_json(orjson.loads(msg.data)))

        async def on_step(msg: Any) -> None:
            if on_progress is not None:
                on_progress(Progress.from_json(orjson.loads(msg.data)))

        subs = [await self.nc.subscribe(RESULTS_PREFIX + request_id, cb=on_result),
                await self.nc.subscribe(PROGRESS_PREFIX + request_id, cb=on_step)]
        try:
            await self.js.publish(REQUESTS_SUBJECT, orjson.dumps(request),
                                  headers={"Nats-Msg-Id": request_id})
            state = await asyncio.wait_for(ended, timeout_s)
        finally:
            for sub in subs:
                await sub.unsubscribe()
        if state.status != "succeeded":
            raise LegoError.of(state)
        return state

    async def image_file(self, state: Generation) -> tuple[bytes, str]:
        """The finished image as (file bytes, media type), in the request's
        ``output_format``: the bytes the gateway at ``gateway_url`` serves."""
        if state.status != "succeeded":
            raise LegoError.of(state)
        if self.gateway is None:
            raise RuntimeError("NatsClient.image_file reads the image from a gateway: pass "
                               "gateway_url")
        return await self.gateway._send(calls.image_file(state.id))
