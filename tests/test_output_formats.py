"""Output formats through the real stack (nats-server, gateway, node processes): PNG, JPEG and
WebP over HTTP, the OpenAI-compatible route (driven by the official client) and direct NATS;
each request's file is encoded once and served from the store's cache after."""

from __future__ import annotations

import asyncio
import base64
import io
import os

import httpx
import numpy as np
import openai
import orjson
import pytest
from legoclient import Generation, LegoClient, NatsClient
from PIL import Image

from common import output_format
from common.messages import RequestState, decode
from common.store import open_store
from lego.stack import Stack
from tests.stackutil import png_pixels

pytestmark = pytest.mark.timeout(300)

PARAMS = {"prompt": "a red fox", "seed": 5, "steps": 2, "width": 64, "height": 48}
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}


@pytest.fixture(scope="module")
def reference(stack: Stack) -> np.ndarray:
    """The PNG's pixels (lossless: exactly what the decoder made)."""
    with LegoClient(stack.gateway_url) as c:
        state, png = c.generate("txt2img", **PARAMS)
    assert state.params["output_format"] == "png" and png.startswith(MAGIC["png"])
    return png_pixels(png)


def decoded(data: bytes, image_format: str, mode: str = "RGB") -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == image_format.upper()
    return np.asarray(image.convert(mode)).astype(np.int16)


def luminance_error(data: bytes, image_format: str, reference: np.ndarray) -> float:
    """Mean absolute difference of brightness from the PNG's (the tiny models paint noise, the
    worst case for the chroma subsampling JPEG and WebP do; brightness keeps every pixel)."""
    expected = np.asarray(Image.fromarray(reference.astype(np.uint8)).convert("L"))
    return float(np.abs(decoded(data, image_format, "L") - expected).mean())


def round_trip(reference: np.ndarray, image_format: str, quality: int) -> np.ndarray:
    """The PNG's pixels through Pillow's own encoder and decoder at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(reference.astype(np.uint8)).save(buffer, format=image_format.upper(),
                                                     quality=quality)
    return decoded(buffer.getvalue(), image_format)


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_lossy_formats_are_served_with_their_media_type_close_to_the_png(
    client: LegoClient, reference: np.ndarray, image_format: str
) -> None:
    state, _ = client.generate("txt2img", output_format=image_format, output_quality=95,
                               **PARAMS)
    assert state.params["output_format"] == image_format
    assert state.params["output_quality"] == 95
    response = client.http.get(f"/v1/generations/{state.id}/image")
    assert response.status_code == 200
    assert response.headers["content-type"] == f"image/{image_format}"
    assert response.content.startswith(MAGIC[image_format])
    pixels = decoded(response.content, image_format)
    assert pixels.shape == reference.shape == (48, 64, 3)
    # the same seed made the same picture: the file is the PNG's pixels at that quality
    assert np.array_equal(pixels, round_trip(reference, image_format, 95))
    assert luminance_error(response.content, image_format, reference) < 4


def test_quality_trades_size_for_fidelity(client: LegoClient, reference: np.ndarray) -> None:
    sizes, errors = {}, {}
    for quality in (10, 95):
        _, data = client.generate("txt2img", output_format="jpeg", output_quality=quality,
                                  **PARAMS)
        sizes[quality] = len(data)
        errors[quality] = luminance_error(data, "jpeg", reference)
    assert sizes[10] < sizes[95]
    assert errors[10] > errors[95]


def test_encoded_once_and_served_from_the_store_after(client: LegoClient, stack: Stack) -> None:
    state, first = client.generate("txt2img", output_format="webp", **PARAMS)
    group = stack.settings.shm_root / "out" / state.id
    assert (group / "image.webp").read_bytes() == first  # cached beside the pixels
    # without the pixels the next read can only come from the cached file
    os.remove(group / "image")
    assert client.image(state.id) == first
    assert client.status(state.id).status == "succeeded"


@pytest.mark.parametrize(("fields", "field", "limit"), [
    ({"output_format": "gif"}, "output_format", ["png", "jpeg", "webp"]),
    ({"output_quality": 0}, "output_quality", 1),
    ({"output_quality": 101}, "output_quality", 100),
    ({"output_quality": 50.5}, "output_quality", None),
    ({"output_format": 3}, "output_format", None),
])
def test_bad_values_are_422_naming_the_field_and_limit(
    client: LegoClient, fields: dict, field: str, limit: object
) -> None:
    response = client.http.post("/v1/generations", json={"prompt": "x", **fields})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field
    assert error.get("limit") == limit


def test_the_api_documents_the_fields(client: LegoClient) -> None:
    schema = client.http.get("/openapi.json").json()
    body = schema["paths"]["/v1/generations"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {
        "$ref": "#/components/schemas/GenerationRequest"}  # any registered workflow's
    fields = schema["components"]["schemas"]["GenerationRequest.txt2img"]["properties"]
    assert fields["output_format"]["enum"] == ["png", "jpeg", "webp", None]  # null: default
    assert fields["output_quality"]["maximum"] == 100
    image = schema["paths"]["/v1/generations/{request_id}/image"]["get"]["responses"]["200"]
    assert set(image["content"]) == {"image/png", "image/jpeg", "image/webp"}
    txt2img = next(w for w in client.workflows() if w["name"] == "txt2img")
    assert txt2img["params"]["output_format"]["default"] == "png"
    assert txt2img["params"]["output_quality"]["minimum"] == 1


def test_openai_route_honours_output_format_and_compression(
    stack: Stack, reference: np.ndarray
) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)
    extra = {"seed": PARAMS["seed"], "steps": PARAMS["steps"]}
    result = client.images.generate(model="txt2img", prompt=PARAMS["prompt"], size="64x48",
                                    response_format="b64_json", output_format="jpeg",
                                    output_compression=95, extra_body=extra)
    assert result.output_format == "jpeg"
    pixels = decoded(base64.b64decode(result.data[0].b64_json), "jpeg")
    assert np.array_equal(pixels, round_trip(reference, "jpeg", 95))
    by_url = client.images.generate(model="txt2img", prompt=PARAMS["prompt"], size="64x48",
                                    response_format="url", output_format="webp",
                                    extra_body=extra)
    response = httpx.get(by_url.data[0].url, timeout=30)
    assert response.headers["content-type"] == "image/webp"
    decoded(response.content, "webp")
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(model="txt2img", prompt="x", output_compression=101)
    assert caught.value.param == "output_compression" and "100" in caught.value.message
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(model="txt2img", prompt="x",
                               output_format="gif")  # type: ignore[arg-type]
    assert caught.value.param == "output_format"


def test_direct_nats_client_gets_the_same_file(stack: Stack, client: LegoClient) -> None:
    """A request over NATS; its file encoded first by a reader beside the store that is not
    the gateway (as ``common.output_format.image_file`` serves any): every reader gets those
    bytes, the gateway's and the NATS client's (which reads through the gateway)."""
    async def over_nats() -> tuple[Generation, bytes, str, bytes]:
        async with NatsClient(stack.settings.nats_url,
                              gateway_url=stack.gateway_url) as nats_client:
            state = await nats_client.generate(
                "txt2img", output_format="jpeg", output_quality=80, timeout_s=60, **PARAMS)
            # the result on lego.results.<id> is the whole RequestState: where the image is
            store = open_store(stack.settings)
            try:
                data, media_type = await output_format.image_file(
                    store, decode(orjson.dumps(state.raw), RequestState),
                    stack.settings.result_ttl_s)
            finally:
                await store.close()
            return state, data, media_type, (await nats_client.image_file(state))[0]

    state, data, media_type, over_gateway = asyncio.run(over_nats())
    assert state.status == "succeeded" and media_type == "image/jpeg"
    assert data.startswith(MAGIC["jpeg"])
    assert over_gateway == data
    assert client.image(state.id) == data  # the gateway serves the file encoded first
