"""The web page in a real headless Chromium (Debian's `chromium`, driven by Playwright without a
browser download) against a real stack: the playground shows the API's field errors, generates
an image with live progress (Server-Sent Events) and shows it (checked on a screenshot against
the PNG the API serves), the cluster view lists the workflow's pools and where their replicas
run, and a gateway with API keys works once the key is entered."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lego.stack import Stack
from tests.conftest import nats_server
from tests.gatewayutil import served_gateway
from tests.stackutil import png_pixels, running_stack

pytestmark = pytest.mark.timeout(300)

UI_TIMEOUT_MS = 120_000  # a generation on a busy 2-core machine, with margin


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ui")
    # one workflow and one replica per pool: all the page needs, and light on a small machine
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, workflows=["txt2img"], autoscale=False
    ) as st:
        yield st


@pytest.fixture(scope="module")
def browser(stack: Stack) -> Iterator[object]:
    """Started after the stack and closed before it: Playwright's sync API holds an event loop
    running in this thread, where the stack's own asyncio.run() calls would then fail."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the web page test needs Debian's chromium (.ci/run installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def context(browser) -> Iterator[object]:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    context.set_default_timeout(UI_TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def page(context, stack: Stack) -> object:  # noqa: ANN001
    page = context.new_page()
    page.goto(f"{stack.gateway_url}/")
    page.wait_for_selector("#param-prompt")
    return page


def generate(page, prompt: str, **params: int) -> str:  # noqa: ANN001
    """Fill the playground's form, generate, wait for the image; the request's id."""
    page.select_option("#workflow", "txt2img")
    page.fill("#param-prompt", prompt)
    for name, value in params.items():
        page.fill(f"#param-{name}", str(value))
    page.click("#generate")
    page.wait_for_selector("#status[data-status=succeeded]", timeout=UI_TIMEOUT_MS)
    return page.get_attribute("#result-image", "data-id")


def test_api_errors_show_next_to_their_fields(page) -> None:  # noqa: ANN001
    page.fill("#param-steps", "999")
    page.click("#generate")
    page.wait_for_selector("#status[data-status=rejected]")
    steps_error = page.inner_text("#error-steps")
    assert "steps" in steps_error and "150" in steps_error  # the field and its limit
    assert "prompt" in page.inner_text("#error-prompt")  # required, and every bad field listed
    listed = page.eval_on_selector_all("#errors li", "items => items.map(i => i.dataset.field)")
    assert set(listed) == {"steps", "prompt"}


def test_playground_generates_and_shows_the_image(page, stack: Stack, tmp_path: Path) -> None:  # noqa: ANN001
    request_id = generate(page, "a lighthouse at dusk", steps=12, width=64, height=48, seed=7)
    with httpx.Client(base_url=stack.gateway_url) as http:
        state = http.get(f"/v1/generations/{request_id}").json()
        png = http.get(f"/v1/generations/{request_id}/image").content
    assert state["status"] == "succeeded"
    assert {k: state["params"][k] for k in ("prompt", "steps", "width", "height", "seed")} == {
        "prompt": "a lighthouse at dusk", "steps": 12, "width": 64, "height": 48, "seed": 7}
    # progress came live over the event stream, step by step
    assert page.get_attribute("#status", "data-transport") == "events"
    assert int(page.get_attribute("#progress", "data-updates")) >= 1
    assert page.eval_on_selector("#progress", "bar => bar.value === bar.max && bar.max > 0")

    # The screenshot shows the image: the page enlarges it with square pixels, so the centre
    # of each enlarged pixel in the <img> element's box (a half-pixel offset of the box does
    # not move a centre out of its block) matches the PNG's pixel, and the PNG mirrored (a
    # different picture with the same colours) does not.
    box = page.eval_on_selector("#result-image", """img => {
        const r = img.getBoundingClientRect();
        return {x: r.left + img.clientLeft + window.scrollX,
                y: r.top + img.clientTop + window.scrollY,
                w: img.clientWidth, h: img.clientHeight};
    }""")
    shot_path = tmp_path / "playground.png"
    page.screenshot(path=str(shot_path), full_page=True)
    expected = png_pixels(png).astype(np.int16)
    height, width = expected.shape[:2]
    assert (height, width) == (48, 64)
    assert box["w"] >= 3 * width and abs(box["w"] / box["h"] - width / height) < 0.05
    shot = np.asarray(Image.open(shot_path).convert("RGB")).astype(np.int16)
    rows = (box["y"] + (np.arange(height) + 0.5) * box["h"] / height).astype(int)
    columns = (box["x"] + (np.arange(width) + 0.5) * box["w"] / width).astype(int)
    seen = shot[rows][:, columns]
    difference = np.abs(seen - expected).mean()
    mirrored = np.abs(seen - expected[:, ::-1]).mean()
    assert difference < 2, (difference, box)
    assert mirrored > 5 * max(difference, 1), (difference, mirrored)


def test_a_request_in_flight_shows_where_it_stands(page) -> None:  # noqa: ANN001
    """The status line of a queued request: its place in each pool it waits on and its ETA,
    from the state's ``queue_position`` and ``eta_s`` (as GET and the event stream send it)."""
    page.evaluate("showState({id: 'r1', status: 'queued', eta_s: 2.46,"
                  " queue_position: {'text_encoder-tiny': 3}})")
    assert page.text_content("#status") == "r1: queued, 3 ahead in text_encoder-tiny, about " \
        "2.5 s left"
    page.evaluate("showState({id: 'r1', status: 'running', eta_s: 0.8,"
                  " queue_position: {'denoiser-tiny': 0}})")
    assert page.text_content("#status") == "r1: running, about 0.8 s left"


def test_cluster_view_lists_the_workflow_pools(page, stack: Stack) -> None:  # noqa: ANN001
    with httpx.Client(base_url=stack.gateway_url) as http:
        workflows = {w["name"]: w for w in http.get("/v1/workflows").json()["workflows"]}
        cluster = http.get("/v1/cluster").json()
    pools = workflows["txt2img"]["pools"]
    assert len(pools) == 3 and cluster["workflows"]["txt2img"] == pools
    assert set(pools) <= set(cluster["models"])

    for pool in pools:
        row = f'#pools tr[data-pool="{pool}"]'
        page.wait_for_selector(f'{row} td[data-col=replicas]:has-text("1 ready")')
        # after two polls the sparklines have points to draw
        page.wait_for_selector(f'{row} td[data-series=lag] polyline', state="attached")
        # and the device view places the pool's replica on the device it reports
        page.wait_for_selector(f'#devices .device li[data-pool="{pool}"]')
    kinds = page.eval_on_selector_all("#pools .pool-kind", "cells => cells.map(c => c.textContent)")
    assert sorted(kinds) == ["denoiser", "text_encoder", "vae_decoder"]
    with httpx.Client(base_url=stack.gateway_url) as http:
        replicas = http.get("/v1/cluster").json()["replicas"]
    devices = page.eval_on_selector_all(
        "#devices .device", "cards => cards.map(c => c.dataset.device)")
    assert sorted(devices) == sorted({r["device"] for r in replicas})
    assert {r["pool"] for r in replicas} == set(pools)


def test_gateway_with_api_keys_works_once_the_key_is_entered(context, stack: Stack) -> None:  # noqa: ANN001
    """A second gateway, in this process, with API keys, on the stack's NATS (its nodes do the
    work): the page is open, its calls are not until the key is entered; an EventSource
    cannot carry the key, so progress is polled."""
    keyed = stack.settings.model_copy(update={"api_keys": {"ui": "s3cret-ui-key"}})
    with served_gateway(keyed, run_ingress=False) as gateway:
        page = context.new_page()
        page.goto(f"{gateway.url}/")
        page.wait_for_selector('#errors li:has-text("API key")')  # GET /v1/workflows: 401
        page.wait_for_selector('#cluster-error:has-text("API key")')
        page.fill("#api-key", "s3cret-ui-key")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#param-prompt")
        request_id = generate(page, "a key to the lighthouse", steps=2, width=32, height=32)
        assert page.get_attribute("#status", "data-transport") == "polling"
        assert page.eval_on_selector("#result-image", "img => img.naturalWidth") == 32
        assert request_id
        page.wait_for_selector("#pools tr[data-pool]")  # the cluster view, with the key
        assert page.is_hidden("#cluster-error")


def test_page_assets_are_served(stack: Stack) -> None:
    with httpx.Client(base_url=stack.gateway_url, follow_redirects=True) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.url.path == "/ui"
        assert page.headers["content-type"].startswith("text/html")
        for name, media in (("app.js", "text/javascript"), ("style.css", "text/css")):
            response = http.get(f"/ui/static/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith(media)
        assert http.get("/ui/static/..%2Fui.py").status_code == 404
        assert http.get("/ui/static/nothing.js").status_code == 404
