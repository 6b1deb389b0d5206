"""The OpenAI-compatible images API through the real stack (with an API key configured), driven
by the official ``openai`` client, unchanged."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from legoclient import LegoClient

from lego.stack import Stack
from tests.conftest import nats_server
from tests.stackutil import png_pixels, running_stack

pytestmark = pytest.mark.timeout(300)

KEY = "sk-lego-test-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("openai")
    with nats_server(tmp / "nats") as url, running_stack(
        tmp, url, cache_dir, workflows=["txt2img"], autoscale=False, api_keys={"test": KEY},
    ) as st:
        yield st


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=KEY, max_retries=0)


def test_b64_json_images_equal_our_api_with_consecutive_seeds(
    stack: Stack, client: openai.OpenAI
) -> None:
    result = client.images.generate(model="txt2img", prompt="a red fox", size="64x48", n=2,
                                    response_format="b64_json",
                                    extra_body={"seed": 11, "steps": 2, "guidance": 5.0})
    assert result.created > 0 and len(result.data) == 2
    images = [png_pixels(base64.b64decode(item.b64_json)) for item in result.data]
    assert images[0].shape == (48, 64, 3)
    assert not np.array_equal(images[0], images[1])
    with LegoClient(stack.gateway_url, api_key=KEY) as lego:
        for seed, image in zip((11, 12), images, strict=True):  # image i has seed + i
            _, png = lego.generate("txt2img", prompt="a red fox", width=64, height=48,
                                   seed=seed, steps=2, guidance=5.0)
            assert np.array_equal(png_pixels(png), image)


def test_url_images(client: openai.OpenAI) -> None:
    result = client.images.generate(model="txt2img", prompt="a lighthouse", size="64x64",
                                    response_format="url", extra_body={"seed": 3, "steps": 2})
    (item,) = result.data
    assert item.b64_json is None and "/v1/generations/" in item.url
    assert item.url.endswith("/image")
    # the image sits behind the same API key
    assert httpx.get(item.url, timeout=30).status_code == 401
    png = httpx.get(item.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png_pixels(png.content).shape == (64, 64, 3)


@pytest.mark.parametrize(("fields", "param"), [
    ({"size": "4096x64"}, "size"),  # past the workflow's 2048
    ({"size": "60x64"}, "size"),  # not a multiple of 8
    ({"size": "big"}, "size"),
    ({"n": 11}, "n"),
    ({"response_format": "webp"}, "response_format"),
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
])
def test_invalid_fields_are_422_naming_the_param(
    client: openai.OpenAI, fields: dict, param: str
) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(**{"model": "txt2img", "prompt": "x", **fields})
    error = caught.value
    assert error.status_code == 422
    assert error.param == param
    assert error.type == "invalid_request_error"
    assert error.code in ("invalid_field", "invalid_request")
    assert error.body["message"]  # the body is OpenAI's error object


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="x")
    assert caught.value.param == "model" and caught.value.code == "unknown_workflow"
    assert "txt2img" in caught.value.message


def test_raw_error_shape(stack: Stack) -> None:
    response = httpx.post(f"{stack.gateway_url}/v1/images/generations",
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "txt2img", "prompt": "x", "size": "4096x64"},
                          timeout=30)
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "size" and "2048" in body["error"]["message"]


def test_models_lists_the_workflows(stack: Stack, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"txt2img"}  # the stack registers only txt2img
    assert models["txt2img"].object == "model" and models["txt2img"].owned_by == "legodiffusion"
    assert client.models.retrieve("txt2img").id == "txt2img"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-workflow")
    assert caught.value.code == "unknown_workflow"
    anonymous = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="wrong",
                              max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
