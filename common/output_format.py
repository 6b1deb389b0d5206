"""The file format a finished image is delivered in: PNG, JPEG or WebP.

Every workflow takes two parameters for it (``common.workflow`` adds them to each spec):
``output_format`` (``png``, the default, ``jpeg`` or ``webp``) and ``output_quality`` (1..100,
for JPEG and WebP; PNG is lossless and ignores it). The nodes never see them: the image stays
raw pixels in the tensor store, and the first reader that asks for the file (the gateway's
image endpoint, the OpenAI route; ``legoclient.NatsClient.image_file`` reads through the
former) encodes it once and caches the file beside the pixels as ``out/<id>/image.<format>``;
every later read returns those bytes. The cache is in the shared store, so one encoding serves
every gateway replica, and it goes with the image's group when the request's result expires.
"""

from __future__ import annotations

import asyncio
import io
from typing import TYPE_CHECKING, Any

from common.messages import RequestState, now

if TYPE_CHECKING:
    from common.store import TensorStore

#: format name -> media type
MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMATS: list[str] = list(MEDIA_TYPES)
DEFAULT_FORMAT = "png"
DEFAULT_QUALITY = 90
MIN_QUALITY, MAX_QUALITY = 1, 100

#: the two parameters every workflow takes, as ``ParamSpec`` fields
PARAMS: dict[str, dict[str, Any]] = {
    "output_format": {
        "type": "string", "default": DEFAULT_FORMAT, "choices": FORMATS,
        "description": "file format of the image: png (lossless), jpeg or webp",
    },
    "output_quality": {
        "type": "integer", "default": DEFAULT_QUALITY, "minimum": MIN_QUALITY,
        "maximum": MAX_QUALITY,
        "description": "JPEG/WebP quality, 1 (smallest) to 100 (best); PNG ignores it",
    },
}


def output_of(params: dict[str, Any]) -> tuple[str, int]:
    """(format, quality) a request asked for; defaults for one accepted before they existed."""
    return (params.get("output_format", DEFAULT_FORMAT),
            int(params.get("output_quality", DEFAULT_QUALITY)))


def encode_image(pixels: Any, output_format: str, quality: int) -> bytes:
    """``pixels`` ((H, W, 3) or (1, H, W, 3) uint8) as a file of ``output_format``."""
    from PIL import Image

    array = pixels[0] if pixels.ndim == 4 else pixels
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r}; known: {FORMATS}")
    return buffer.getvalue()


def file_key(state: RequestState, output_format: str) -> str:
    """Where the encoded file of ``state``'s image is cached: beside the pixels."""
    assert state.image is not None
    return f"{state.image.key}.{output_format}"


async def image_file(store: TensorStore, state: RequestState,
                     result_ttl_s: float) -> tuple[bytes, str]:
    """The finished image of ``state`` as (file bytes, media type) in the request's format:
    the cached file, or the pixels encoded now and cached for every later read. ``KeyError``
    when the image has expired. ``result_ttl_s`` bounds the cache's life to the image's."""
    assert state.image is not None
    output_format, quality = output_of(state.params)
    key = file_key(state, output_format)
    try:
        return await store.get_bytes(key), MEDIA_TYPES[output_format]
    except KeyError:
        pass
    pixels = await store.get_array(state.image)
    data = await asyncio.to_thread(encode_image, pixels, output_format, quality)
    ended_at = state.finished_at or now()
    await store.put_bytes(key, data, ttl_s=max(1.0, ended_at + result_ttl_s - now()))
    return data, MEDIA_TYPES[output_format]
