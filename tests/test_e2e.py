"""End to end through the real stack: nats-server, the gateway process and one process per
model pool. Every shipped workflow through HTTP, direct NATS, bad input, cancel, idempotency,
runtime workflows and cleanup after load."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import io
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import torch
from legoclient import Generation, LegoClient, LegoError, NatsClient
from PIL import Image

from common.messages import RequestState, decode
from common.models import resolve_model_dir
from common.store import open_store
from gateway.ingress import REPLY_HEADER
from lego.stack import Stack
from tests.conftest import nats_server
from tests.stackutil import png_pixels, respawned_gateway, running_stack, stopped

pytestmark = pytest.mark.timeout(300)


#: what the stack said it was waiting for while it started (its progress line)
STARTING: list[str] = []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, progress=STARTING.append,
    ) as st:
        yield st


def test_starting_says_what_it_waits_for(stack: Stack) -> None:
    assert STARTING[:3] == ["finding the models (a first run builds the tiny ones)",
                            "starting gateway, autoscaler", "starting the gateway"]
    assert STARTING[-1] == "models loaded"
    # between them, how many pools are ready and the kinds still loading, as each one loads
    counts = [re.fullmatch(r"loading models \((\d+) of (\d+) ready\): [a-z_, ]+", line)
              for line in STARTING[3:-1]]
    assert all(counts) and [int(m[1]) for m in counts] == sorted({int(m[1]) for m in counts})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, as the nodes run (diffusers' bits depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def diffusers_image(model_dir: Path, **kw: object) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    with one_thread():
        out = pipe(
            kw["prompt"], negative_prompt=kw["negative_prompt"],
            num_inference_steps=kw["steps"], guidance_scale=kw["guidance"],
            height=kw["height"], width=kw["width"],
            generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="np",
        ).images
    return (out[0] * 255).round().astype(np.uint8)


def test_txt2img_equals_diffusers(stack: Stack, client: LegoClient) -> None:
    params = dict(prompt="a red fox in the snow", negative_prompt="blurry", steps=5,
                  guidance=6.0, height=64, width=48, seed=1234)
    state, png = client.generate("txt2img", **params)
    served = png_pixels(png)
    model_dir = resolve_model_dir(stack.settings.base_model, stack.settings.cache_dir / "models")
    expected = diffusers_image(model_dir, **params)
    assert served.shape == (64, 48, 3)
    assert np.array_equal(served, expected)
    assert [t.node for t in state.timings] == ["encode", "denoise", "decode"]


def test_controlnet_equals_diffusers(stack: Stack, client: LegoClient) -> None:
    """The ControlNet workflow shares the txt2img pools: its ControlNet loads beside the base
    model's UNet in the denoiser pool on first use."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    control = np.random.default_rng(3).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(control).save(buffer, "PNG")
    params = dict(prompt="a red fox in the snow", negative_prompt="blurry", steps=3,
                  guidance=6.0, seed=21, controlnet_conditioning_scale=0.8)
    state, png = client.generate("controlnet", control_image=base64.b64encode(
        buffer.getvalue()).decode(), **params)
    assert stack.workflows["controlnet"].pools() == stack.workflows["txt2img"].pools()
    models = stack.settings.cache_dir / "models"
    spec = stack.workflows["controlnet"]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        resolve_model_dir(spec.models["base"], models), safety_checker=None,
        requires_safety_checker=False,
        controlnet=ControlNetModel.from_pretrained(resolve_model_dir(spec.models["control"],
                                                                     models)))
    pipe.set_progress_bar_config(disable=True)
    with one_thread():
        expected = pipe(params["prompt"], image=Image.fromarray(control),
                        negative_prompt=params["negative_prompt"], num_inference_steps=3,
                        guidance_scale=6.0, controlnet_conditioning_scale=0.8,
                        generator=torch.Generator("cpu").manual_seed(21), output_type="np").images
    assert np.array_equal(png_pixels(png), (expected[0] * 255).round().astype(np.uint8))


def test_img2img_equals_diffusers(stack: Stack, client: LegoClient) -> None:
    """Through the VAE encoder's and the denoiser's processes: the image latents keep their
    channels-last layout across the store, so the UNet rounds as in the pipeline."""
    from diffusers import StableDiffusionImg2ImgPipeline

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    params = dict(prompt="a lighthouse", negative_prompt="fog", steps=4, guidance=7.5,
                  strength=0.6, seed=2)
    _, png = client.generate("img2img", image=base64.b64encode(buffer.getvalue()).decode(),
                             **params)
    model_dir = resolve_model_dir(stack.settings.base_model, stack.settings.cache_dir / "models")
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with one_thread():
        expected = pipe(params["prompt"], image=Image.fromarray(image),
                        negative_prompt=params["negative_prompt"], num_inference_steps=4,
                        strength=0.6, guidance_scale=7.5,
                        generator=torch.Generator("cpu").manual_seed(2), output_type="np").images
    assert np.array_equal(png_pixels(png), (expected[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize(
    ("workflow", "extra", "size"),
    [
        ("txt2img", {}, (64, 64)),
        ("txt2img-safe", {}, (64, 64)),
        ("txt2img-hires", {}, (128, 128)),
        ("img2img", {"strength": 0.6}, (40, 56)),
    ],
)
def test_every_workflow(client: LegoClient, workflow: str, extra: dict, size: tuple) -> None:
    if workflow == "img2img":
        buffer = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
        extra = {**extra, "image": base64.b64encode(buffer.getvalue()).decode()}
    state, png = client.generate(workflow, prompt="a lighthouse", seed=7, **extra)
    assert state.status == "succeeded"
    assert png_pixels(png).shape == (*size, 3)
    if workflow == "txt2img-safe":
        assert state.meta["nsfw"] == [False] or state.meta["nsfw"] == [True]
    if workflow == "img2img":
        assert {t.node for t in state.timings} == {
            "encode", "encode_image", "denoise", "decode"}


def test_direct_nats_request_matches_http(stack: Stack, client: LegoClient) -> None:
    params = {"prompt": "a blue bird", "seed": 99, "steps": 3}
    _, png = client.generate("txt2img", **params)

    async def over_nats() -> tuple[Generation, bytes, list[int]]:
        async with NatsClient(stack.settings.nats_url,
                              gateway_url=stack.gateway_url) as nats_client:
            steps: list[int] = []
            state = await nats_client.generate(
                "txt2img", timeout_s=60, on_progress=lambda p: steps.append(p.step), **params)
            data, media_type = await nats_client.image_file(state)
            assert media_type == "image/png"
            return state, data, steps

    state, data, steps = asyncio.run(over_nats())
    assert state.status == "succeeded"
    assert np.array_equal(png_pixels(data), png_pixels(png))
    assert steps and steps[-1] == 3


def test_bad_requests_get_clear_errors(client: LegoClient, stack: Stack) -> None:
    http = client.http
    r = http.post("/v1/generations", json={"workflow": "nope", "prompt": "x"})
    assert r.status_code == 404 and "unknown workflow 'nope'" in r.json()["error"]["message"]
    r = http.post("/v1/generations", json={"prompt": "x", "width": 4096, "steps": 0})
    assert r.status_code == 422
    errors = {e["field"]: e for e in r.json()["error"]["errors"]}
    assert errors["width"]["limit"] == 2048 and errors["steps"]["limit"] == 1
    r = http.post("/v1/generations", content=b"{not json")
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "body"
    r = http.post("/v1/generations", json=["a list"])
    assert r.status_code == 422
    r = http.post("/v1/generations", content=b"x" * (stack.settings.max_body_bytes + 1))
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    r = http.post("/v1/generations", json={"workflow": "img2img", "prompt": "x",
                                           "image": base64.b64encode(b"GIF89a...").decode()})
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "image"
    r = http.post("/v1/generations", json={"prompt": "x", "id": "bad id!"})
    assert r.status_code == 422 and r.json()["error"]["errors"][0]["field"] == "id"
    assert http.get("/v1/generations/nope").status_code == 404


def test_long_prompt_is_truncated_and_said(client: LegoClient) -> None:
    accepted = client.submit("txt2img", prompt="fox " * 120, seed=1)
    assert any("truncated" in w and "77" in w for w in accepted.warnings)
    state = client.wait(accepted.id, timeout_s=60)
    assert state.status == "succeeded"
    assert any("truncated" in w for w in state.warnings)


def test_malformed_nats_message_gets_an_error_and_consumer_survives(stack: Stack) -> None:
    from common.bus import connect

    async def scenario() -> list[RequestState]:
        nc = await connect(stack.settings, name="test")
        js = nc.jetstream()
        replies = []
        for body in (b"\xff not json", b'{"workflow": "txt2img", "steps": 0}'):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await js.publish("lego.requests", body, headers={REPLY_HEADER: inbox})
            replies.append(decode((await sub.next_msg(timeout=10)).data, RequestState))
            await sub.unsubscribe()
        await nc.drain()
        return replies

    bad_json, bad_field = asyncio.run(scenario())
    assert bad_json.status == "failed" and bad_json.error.field == "body"
    assert bad_field.status == "failed"
    assert {e["field"] for e in bad_field.error.details["errors"]} == {"prompt", "steps"}
    with LegoClient(stack.gateway_url) as c:  # the ingress still serves
        assert c.generate("txt2img", prompt="still alive", steps=1)[0].status == "succeeded"


def test_idempotent_submission(client: LegoClient) -> None:
    first = client.submit("txt2img", id="same-id-1", prompt="a cat", steps=2)
    again = client.submit("txt2img", id="same-id-1", prompt="a cat", steps=2)
    assert again.id == first.id == "same-id-1"
    with pytest.raises(LegoError) as info:
        client.submit("txt2img", id="same-id-1", prompt="a dog", steps=2)
    assert info.value.status == 409
    assert client.wait("same-id-1", timeout_s=60).status == "succeeded"


def test_cancel_drops_work_and_tensors(client: LegoClient, stack: Stack) -> None:
    accepted = client.submit("txt2img", prompt="slow", steps=150, width=128, height=128)
    deadline = time.monotonic() + 60
    while client.status(accepted.id).progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.cancel(accepted.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(LegoError) as info:
        client.image(accepted.id)
    assert info.value.status == 409
    # the denoiser drops it at the next step: it is free for the next request right away
    started = time.monotonic()
    assert client.generate("txt2img", prompt="next", steps=2)[0].status == "succeeded"
    assert time.monotonic() - started < 20
    assert client.status(accepted.id).status == "cancelled"
    assert not [k for k in asyncio.run(_keys(stack)) if accepted.id in k]


async def _keys(stack: Stack) -> list[str]:
    store = open_store(stack.settings)
    try:
        return await store.keys()
    finally:
        await store.close()


def test_workflow_added_at_run_time_reuses_pools(client: LegoClient) -> None:
    spec = next(w for w in client.workflows() if w["name"] == "txt2img")
    spec = {k: v for k, v in spec.items() if k != "pools"}
    spec["name"] = "txt2img-quick"
    spec["params"]["steps"]["default"] = 2
    added = client.add_workflow(spec)
    assert added["pools"] == next(w for w in client.workflows() if w["name"] == "txt2img")["pools"]
    assert "txt2img-quick" in {w["name"] for w in client.workflows()}
    state, _ = client.generate("txt2img-quick", prompt="fast")
    assert state.params["steps"] == 2
    bad = client.http.post("/v1/workflows", content=orjson.dumps({**spec, "output": "x.y"}))
    assert bad.status_code == 422


def test_nothing_left_behind_after_a_load_run(client: LegoClient, stack: Stack) -> None:
    workflows = ["txt2img", "txt2img-safe", "txt2img-hires", "txt2img"] * 3
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(
            lambda w: LegoClient(stack.gateway_url).generate(w, prompt="load", steps=2)[0],
            workflows,
        ))
    assert all(r.status == "succeeded" for r in results)
    keys = asyncio.run(_keys(stack))
    assert not [k for k in keys if k.startswith("tmp/")]
    ids = {r.id for r in results}
    assert ids <= {k.split("/")[1] for k in keys if k.startswith("out/")}
    # requests of different workflows shared a batch somewhere (the pools are shared)
    assert max(t.batch for r in results for t in r.timings) >= 2


def test_openapi_and_health(client: LegoClient) -> None:
    schema = client.http.get("/openapi.json").json()
    assert "/v1/generations" in schema["paths"]
    assert client.http.get("/healthz").json() == {"status": "ok"}
    assert client.http.get("/readyz").status_code == 200


def test_the_gateway_serves_without_torch(stack: Stack, client: LegoClient) -> None:
    """Validation, planning, the image's encoding: the gateway never loads torch (it starts
    seconds sooner, and its first image download does not pay for the import)."""
    upload = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(upload, format="PNG")
    _, png = client.generate("img2img", prompt="a red square", steps=2, seed=4, strength=0.5,
                             image=base64.b64encode(upload.getvalue()).decode())
    assert png_pixels(png).shape == (32, 32, 3)
    gateway = stack.children[0]
    assert gateway.name == "gateway" and gateway.proc is not None
    maps = Path(f"/proc/{gateway.proc.pid}/maps").read_text()
    assert "libtorch" not in maps


def test_sigusr1_makes_the_gateway_log_where_it_waits(stack: Stack) -> None:
    gateway = stack.children[0]
    assert gateway.name == "gateway" and gateway.proc is not None
    log = stack.settings.run_dir / "logs" / "gateway.log"
    before = log.stat().st_size
    gateway.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while b", in serve" not in log.read_bytes()[before:]:  # the ingress's loop
        assert time.monotonic() < deadline, log.read_bytes()[before:]
        time.sleep(0.1)
    assert gateway.proc.poll() is None


def test_gateway_restart_loses_nothing(stack: Stack, client: LegoClient) -> None:
    state, png = client.generate("txt2img", prompt="before the restart", steps=2, seed=3)
    gateway = stack.children[0]
    assert gateway.name == "gateway"
    assert stopped(stack, gateway) in (0, -15)  # uvicorn re-raises SIGTERM after shutting down
    respawned_gateway(stack, client.http)
    again = client.status(state.id)
    assert again.status == "succeeded" and again.params == state.params
    assert client.image(state.id) == png


def test_redis_store_end_to_end(tmp_path: Path, cache_dir: Path, redis_url: str) -> None:
    with nats_server(tmp_path / "nats") as url, running_stack(
        tmp_path, url, cache_dir, redis_url=redis_url
    ) as st, LegoClient(st.gateway_url) as c:
        assert st.settings.store_kind == "redis"
        states = [c.generate(w, prompt="via redis", steps=2, seed=1)[0]
                  for w in ("txt2img", "txt2img-hires")]
        assert all(s.status == "succeeded" for s in states)
        keys = asyncio.run(_keys(st))
        assert not [k for k in keys if k.startswith("tmp/")]
        assert {f"out/{s.id}/image" for s in states} <= set(keys)


def test_status_reports_every_pool(stack: Stack, client: LegoClient, capsys) -> None:  # noqa: ANN001
    import json

    from lego.cli import main

    client.generate("txt2img", prompt="for the status", steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NATS_URL", stack.settings.nats_url)
        assert main(["status", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    kinds = {m["kind"] for m in models.values()}
    assert kinds == {"text_encoder", "denoiser", "vae_encoder", "vae_decoder",
                     "safety_checker", "upscaler"}
    for view in models.values():
        assert view["replicas"] >= 1 and view["ready"] >= 1 and view["lag"] == 0
        assert view["placement"] == {"cpu:0": view["replicas"]}  # the autoscaler placed them
    denoiser = next(m for m in models.values() if m["kind"] == "denoiser")
    assert denoiser["p50_ms"] > 0 and denoiser["mean_batch"] >= 1


def test_admission_rejects_what_cannot_meet_its_deadline(stack: Stack, client: LegoClient) -> None:
    """A burst of slow requests with a tight deadline: those the queue cannot finish in time
    are rejected at once with 503, Retry-After and the reason, over HTTP and over NATS; the
    admitted ones run, and none of the rejected ones left a trace."""
    slow = {"prompt": "slow", "steps": 40, "width": 128, "height": 128}
    started = time.monotonic()
    client.generate("txt2img", **slow)  # the replicas measure such a request
    deadline_s = round(2 * (time.monotonic() - started), 3)  # its SLO: twice its solo latency
    slow["deadline_s"] = deadline_s
    time.sleep(1.5)  # the replicas have reported their figures

    async def burst() -> tuple[list[httpx.Response], LegoError]:
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as http:
            responses = await asyncio.gather(*(
                http.post("/v1/generations", json={**slow, "seed": i}) for i in range(30)
            ))
            # Over NATS, a deadline a tenth of the solo latency: rejected whatever the queue
            # holds by then (the burst's queue drains while the NATS client connects).
            async with NatsClient(stack.settings.nats_url) as nats_client:
                try:
                    await nats_client.generate(**{
                        **slow, "seed": 99, "deadline_s": round(deadline_s / 20, 3)},
                        timeout_s=30)
                except LegoError as exc:
                    return responses, exc
            raise AssertionError("over NATS, the request was not rejected")

    responses, over_nats = asyncio.run(burst())
    rejected = [r for r in responses if r.status_code == 503]
    admitted = [r for r in responses if r.status_code == 202]
    assert rejected and admitted
    error = rejected[0].json()["error"]
    assert error["code"] == "overloaded" and "deadline" in error["message"]
    assert int(rejected[0].headers["Retry-After"]) >= 1
    assert error["deadline_s"] == deadline_s and error["bound_s"] > deadline_s
    assert over_nats.generation.status == "failed" and over_nats.code == "overloaded"
    for r in admitted:  # admitted work ends: done in time, or dropped once late, never stuck
        state = client.wait(r.json()["id"], timeout_s=120)
        assert state.status == "succeeded" or state.error.code == "deadline_exceeded"
    assert client.http.get(f"/v1/generations/{over_nats.generation.id}").status_code == 404
