"""The web page and the cluster view it reads.

    GET /, /ui              the page: a playground (prompt and parameters -> image, with live
                            progress) and the cluster view (pools, replicas, devices)
    GET /ui/static/{name}   its script and style sheet (gateway/static/; no build step)
    GET /v1/cluster         per pool: replicas by state, lag, rates, p50/p99; every live
                            replica with its device; which pools each workflow uses

The cluster JSON is ``common.observe.cluster_json``, what `lego status --json` prints, from a
``ClusterObserver`` the gateway keeps subscribed for its whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from common.errors import NotFound
from common.observe import ClusterObserver, PoolView, cluster_json
from gateway import openapi

STATIC_DIR = Path(__file__).parent / "static"
_MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
#: pages poll about once a second; one sample serves every poll within this period, so the
#: rates (tasks since the previous sample) never span less than the replicas' 1 s report period
MIN_SAMPLE_PERIOD_S = 1.0


class ClusterFeed:
    """One observer for every page that polls: samples at most once per ``min_period_s``."""

    def __init__(self, observer: ClusterObserver, min_period_s: float = MIN_SAMPLE_PERIOD_S):
        self.observer = observer
        self.min_period_s = min_period_s
        self._lock = asyncio.Lock()
        self._sampled_at = -float("inf")
        self._views: dict[str, PoolView] = {}

    async def views(self) -> dict[str, PoolView]:
        async with self._lock:  # concurrent polls share one sample
            if time.monotonic() - self._sampled_at >= self.min_period_s:
                self._views = await self.observer.sample()
                self._sampled_at = time.monotonic()
            return self._views


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs inside the app's own lifespan: the gateway is connected by now.
    observer = ClusterObserver(app.state.gateway.nc)
    await observer.start()
    app.state.cluster_feed = ClusterFeed(observer)
    try:
        yield
    finally:
        await observer.stop()


router = APIRouter(lifespan=_lifespan)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/ui/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    # only the folder's own files: no sub-paths, no dot files
    if "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no static file {name!r}")
    return FileResponse(path, media_type=_MEDIA_TYPES.get(path.suffix),
                        headers={"Cache-Control": "no-cache"})


@router.get("/v1/cluster", responses={200: openapi.ok("the cluster now", "Cluster")})
async def cluster(request: Request) -> JSONResponse:
    """The cluster now: ``models`` (per pool: replicas, ready, starting, draining, lag,
    arrival_rate, completion_rate, shed_rate, p50_ms, p99_ms, placement, ...), ``replicas``
    (every live replica's last report, ``device`` included) and ``workflows`` (name -> pools)."""
    feed: ClusterFeed = request.app.state.cluster_feed
    gw = request.app.state.gateway
    body: dict[str, Any] = cluster_json(await feed.views(), feed.observer.live_statuses())
    body["workflows"] = {
        name: sorted(spec.pools(monolithic=gw.settings.monolithic))
        for name, spec in gw.registry.all().items()
    }
    body["at"] = time.time()
    return JSONResponse(body)
