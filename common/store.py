"""The tensor store: intermediate tensors and finished images live here, only refs travel
(and, beside an image, its encoded file once a reader asked for it: ``common.output_format``).

Two stores behind one interface:

- ``ShmStore``: files in a host shared-memory directory (``/dev/shm``); a read maps the file
  copy-on-write, so it costs no copy whatever the size. One host.
- ``RedisStore``: Redis keys with a TTL. Several hosts.

Format: the raw bytes of a tensor in its memory order; dtype, shape and, where its dims are
not laid out in their own order (channels-last), that order travel in the ``TensorRef``, so a
reader gets the writer's layout and its kernels round as the writer's would have. No pickle,
so a store can never execute code on a reader. A put takes a torch tensor or a numpy array
(the gateway stores uploads without importing torch); a get gives a torch tensor.

Keys are ``<area>/<request id>/<name>``; ``area`` is ``tmp`` (intermediates, deleted when the
request ends) or ``out`` (finished images, kept ``result_ttl_s``). Everything under one
``<area>/<request id>`` group is deleted at once, and expires by itself after its TTL if nobody
deletes it (the safety net when a process dies). A key's request id must pass
``subjects.valid_request_id``, and a shared-memory path must resolve inside the store's root: a
key is never a way to read, write or delete anything else.
"""

from __future__ import annotations

import abc
import asyncio
import mmap
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from common import metrics, subjects, telemetry
from common.messages import TensorRef
from common.settings import Settings

if TYPE_CHECKING:
    import torch

#: the dtypes a stored tensor may have (torch's names, which numpy shares but for bfloat16)
DTYPES = ("float32", "float16", "bfloat16", "float64", "uint8", "int8", "int16", "int32",
          "int64", "bool")

AREAS = ("tmp", "out")


def dtype_name(tensor: torch.Tensor | np.ndarray) -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return name


def memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The order of ``tensor``'s dims from outermost to innermost in memory, where it is dense
    in an order other than its own (channels-last); None where it is contiguous, or dense in
    no order (a view with gaps: it is stored contiguous)."""
    if tensor.is_contiguous():
        return None
    strides = tensor.stride()
    order = sorted(range(tensor.ndim), key=lambda d: (-strides[d], d))
    return order if tensor.permute(order).is_contiguous() else None


#: a tensor at least this large is written to the shared-memory store from a worker thread
OFF_LOOP_BYTES = 1 << 20


def tensor_bytes(tensor: torch.Tensor | np.ndarray) -> tuple[memoryview, list[int] | None]:
    """The raw bytes of ``tensor`` in its memory order, and that order (``memory_order``; the
    bytes are copied only if the tensor is dense in no order, or not on the CPU)."""
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor).reshape(-1).view(np.uint8).data, None
    import torch

    tensor = tensor.detach().to("cpu")
    order = memory_order(tensor)
    flat = (tensor.contiguous() if order is None else tensor.permute(order)).reshape(-1)
    return flat.view(torch.uint8).numpy().data, order


def _stored_shape(shape: list[int], order: list[int] | None) -> tuple[list[int], list[int]]:
    """The shape of the bytes as stored, and the permutation that gives ``shape`` back."""
    if order is None:
        return shape, list(range(len(shape)))
    if sorted(order) != list(range(len(shape))):
        raise ValueError(f"bad dim order {order!r} for shape {shape!r}")
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return [shape[d] for d in order], inverse


def array_from_buffer(buffer: bytes | mmap.mmap, dtype: str, shape: list[int],
                      order: list[int] | None = None) -> np.ndarray:
    """A numpy array over ``buffer`` without copying it (read-only); not for bfloat16, which
    numpy has not."""
    if dtype not in DTYPES or dtype == "bfloat16":
        raise ValueError(f"unsupported dtype {dtype!r} for numpy")
    stored, inverse = _stored_shape(shape, order)
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(stored).transpose(inverse)


def tensor_from_buffer(buffer: bytes | mmap.mmap, dtype: str, shape: list[int],
                       order: list[int] | None = None) -> torch.Tensor:
    """A tensor over ``buffer`` without copying it, its dims laid out in ``order``."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    stored, inverse = _stored_shape(shape, order)
    if len(memoryview(buffer)) == 0:
        return torch.empty(stored, dtype=torch_dtype).permute(inverse)
    if isinstance(buffer, bytes):
        with warnings.catch_warnings():
            # Redis hands back immutable bytes; readers never write to inputs.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(buffer, dtype=torch.uint8)
    else:
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
    return raw.view(torch_dtype).reshape(stored).permute(inverse)


def _check_group(area: str, request_id: str) -> None:
    """``<area>/<request id>`` names a group: a known area and a valid request id."""
    if area not in AREAS:
        raise ValueError(f"bad tensor area {area!r}: expected one of {', '.join(AREAS)}")
    if not subjects.valid_request_id(request_id):
        raise ValueError(f"bad request id {request_id!r}: must be {subjects.REQUEST_ID_RULE}")


def _check_key(key: str) -> tuple[str, str]:
    parts = key.split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad tensor key {key!r}: expected <tmp|out>/<request id>/<name>")
    try:
        _check_group(parts[0], parts[1])
    except ValueError as exc:
        raise ValueError(f"bad tensor key {key!r}: {exc}") from None
    return parts[0], parts[1]


class TensorStore(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    async def put(self, key: str, tensor: torch.Tensor | np.ndarray, ttl_s: float) -> TensorRef:
        """Store ``tensor`` under ``key`` (overwriting: re-running a task is harmless)."""

    @abc.abstractmethod
    async def read(self, ref: TensorRef) -> bytes | mmap.mmap:
        """The raw bytes ``ref`` points at (a copy-on-write map where the store allows);
        ``KeyError`` when they are gone."""

    async def get(self, ref: TensorRef) -> torch.Tensor:
        """The tensor ``ref`` points at; ``KeyError`` when it is gone."""
        return tensor_from_buffer(await self.read(ref), ref.dtype, ref.shape, ref.order)

    async def get_array(self, ref: TensorRef) -> np.ndarray:
        """The same as a numpy array (read-only), for readers without torch (the gateway)."""
        return array_from_buffer(await self.read(ref), ref.dtype, ref.shape, ref.order)

    async def put_bytes(self, key: str, data: bytes, ttl_s: float) -> TensorRef:
        """Store a file's bytes (an encoded image) under ``key``, as a 1-D uint8 tensor."""
        return await self.put(key, np.frombuffer(data, dtype=np.uint8), ttl_s)

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """The bytes stored under ``key`` whatever their size; ``KeyError`` when it is gone."""

    @abc.abstractmethod
    async def delete_group(self, area: str, request_id: str) -> int:
        """Delete every tensor of ``<area>/<request id>``; returns how many were deleted."""

    @abc.abstractmethod
    async def keys(self) -> list[str]:
        """Every key currently stored (for tests and leak checks)."""

    async def sweep(self) -> int:
        """Delete expired groups where the backend has no TTL of its own."""
        return 0

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise when the store cannot be used now (its server is down, its root is gone)."""

    async def close(self) -> None:
        return None

    def _ref(self, key: str, tensor: torch.Tensor | np.ndarray, nbytes: int,
             order: list[int] | None = None) -> TensorRef:
        return TensorRef(
            store=self.kind, key=key, dtype=dtype_name(tensor), shape=list(tensor.shape),
            nbytes=nbytes, order=order,
        )

    def _check_ref(self, ref: TensorRef) -> None:
        if ref.store != self.kind:
            raise ValueError(f"tensor {ref.key} is in the {ref.store!r} store, not {self.kind!r}")


class ShmStore(TensorStore):
    """Tensors as files in a shared-memory directory; reads are copy-free maps."""

    kind = "shm"

    def __init__(self, root: Path, tensor_ttl_s: float, result_ttl_s: float) -> None:
        self.root = Path(root)
        self.ttl_s = {"tmp": tensor_ttl_s, "out": result_ttl_s}
        for area in AREAS:
            (self.root / area).mkdir(parents=True, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

    async def ping(self) -> None:
        for area in AREAS:
            if not os.access(self.root / area, os.W_OK):
                raise OSError(f"the shared-memory store {self.root / area} is not writable")

    def _path(self, relative: str) -> str:
        """The absolute path of ``relative`` (a checked key or group: no empty part, no "."
        or ".."), refused if it would resolve outside the root: no part of it below the root
        may be a symbolic link (one planted in the store could point anywhere). As strict as
        comparing its realpath with the root's, at a fraction of the cost (every put and get)."""
        path = self._real_root
        for part in relative.split("/"):
            path = f"{path}/{part}"
            if os.path.islink(path):
                raise ValueError(f"{relative!r} resolves outside the store's root: "
                                 f"{path} is a symbolic link")
        return path

    async def put(self, key: str, tensor: torch.Tensor | np.ndarray, ttl_s: float) -> TensorRef:
        _check_key(key)
        path = self._path(key)
        if tensor.nbytes >= OFF_LOOP_BYTES:  # copying megabytes would stall the event loop
            data, order = await asyncio.to_thread(self._write, path, tensor)
        else:
            data, order = self._write(path, tensor)
        return self._ref(key, tensor, len(data), order)

    @staticmethod
    def _write(path: str, tensor: torch.Tensor | np.ndarray) -> tuple[memoryview, list[int] | None]:
        data, order = tensor_bytes(tensor)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = data
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)  # readers never see a half-written tensor
        return data, order

    async def read(self, ref: TensorRef) -> bytes | mmap.mmap:
        self._check_ref(ref)
        _check_key(ref.key)
        if ref.nbytes == 0:
            return b""
        try:
            fd = os.open(self._path(ref.key), os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(ref.key) from None
        try:
            return mmap.mmap(fd, ref.nbytes, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)

    async def get_bytes(self, key: str) -> bytes:
        _check_key(key)
        try:
            with open(self._path(key), "rb") as file:
                return file.read()
        except FileNotFoundError:
            raise KeyError(key) from None

    async def delete_group(self, area: str, request_id: str) -> int:
        _check_group(area, request_id)
        group = Path(self._path(f"{area}/{request_id}"))
        count = sum(1 for p in group.rglob("*") if p.is_file()) if group.exists() else 0
        shutil.rmtree(group, ignore_errors=True)
        return count

    async def keys(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for area in AREAS
            for p in (self.root / area).rglob("*")
            if p.is_file()
        )

    async def sweep(self) -> int:
        removed = 0
        now = time.time()
        for area in AREAS:
            for group in (self.root / area).iterdir():
                try:
                    expired = group.stat().st_mtime < now - self.ttl_s[area]
                except FileNotFoundError:
                    continue
                if expired:
                    shutil.rmtree(group, ignore_errors=True)
                    removed += 1
        return removed


class RedisStore(TensorStore):
    """Tensors as Redis strings with a TTL, indexed per request group for deletion."""

    kind = "redis"
    PREFIX = "lego:t:"

    def __init__(self, url: str, password: str | None = None) -> None:
        """``password``: Redis AUTH, for a URL without one (a password in the URL wins)."""
        import redis.asyncio as redis

        options: dict = {"password": password} if password else {}
        # a server that does not answer is an error within a second, not a hang
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1.0, **options)

    async def ping(self) -> None:
        await self.client.ping()

    def _index(self, area: str, request_id: str) -> str:
        return f"lego:idx:{area}/{request_id}"

    async def put(self, key: str, tensor: torch.Tensor | np.ndarray, ttl_s: float) -> TensorRef:
        area, request_id = _check_key(key)
        data, order = tensor_bytes(tensor)
        ttl_ms = int(ttl_s * 1000)
        index = self._index(area, request_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.PREFIX + key, data, px=ttl_ms)
            pipe.sadd(index, key)
            pipe.pexpire(index, ttl_ms)
            await pipe.execute()
        return self._ref(key, tensor, len(data), order)

    async def read(self, ref: TensorRef) -> bytes:
        self._check_ref(ref)
        _check_key(ref.key)
        # the client does not decode responses: values are bytes (its types allow str too)
        data = cast("bytes | None", await self.client.get(self.PREFIX + ref.key))
        if data is None:
            raise KeyError(ref.key)
        return data

    async def get_bytes(self, key: str) -> bytes:
        _check_key(key)
        data = cast("bytes | None", await self.client.get(self.PREFIX + key))
        if data is None:
            raise KeyError(key)
        return bytes(data)

    async def delete_group(self, area: str, request_id: str) -> int:
        _check_group(area, request_id)
        index = self._index(area, request_id)
        members = cast("set[bytes]", await self.client.smembers(index))
        keys = [self.PREFIX + m.decode() for m in members]
        deleted = await self.client.delete(*keys) if keys else 0
        await self.client.delete(index)
        return int(deleted)

    async def keys(self) -> list[str]:
        found = [k.decode()[len(self.PREFIX) :] async for k in self.client.scan_iter(
            match=self.PREFIX + "*", count=1000)]
        return sorted(found)

    async def close(self) -> None:
        await self.client.aclose()


class ObservedStore(TensorStore):
    """Another store, its operations and bytes counted (``lego_store_*`` metrics) and, when
    tracing is on, each get and put a span of the current trace."""

    def __init__(self, inner: TensorStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        ops = metrics.STORE_OPERATIONS
        self._ops = {op: ops.labels(inner.kind, op) for op in ("get", "put", "delete")}
        self._bytes = {op: metrics.STORE_BYTES.labels(inner.kind, op) for op in ("get", "put")}

    async def put(self, key: str, tensor: torch.Tensor | np.ndarray, ttl_s: float) -> TensorRef:
        with telemetry.span("store.put", {"lego.store.key": key}):
            ref = await self.inner.put(key, tensor, ttl_s)
        self._ops["put"].inc()
        self._bytes["put"].inc(ref.nbytes)
        return ref

    async def read(self, ref: TensorRef) -> bytes | mmap.mmap:
        with telemetry.span("store.get", {"lego.store.key": ref.key}):
            data = await self.inner.read(ref)
        self._ops["get"].inc()
        self._bytes["get"].inc(ref.nbytes)
        return data

    async def get_bytes(self, key: str) -> bytes:
        with telemetry.span("store.get", {"lego.store.key": key}):
            data = await self.inner.get_bytes(key)
        self._ops["get"].inc()
        self._bytes["get"].inc(len(data))
        return data

    async def delete_group(self, area: str, request_id: str) -> int:
        deleted = await self.inner.delete_group(area, request_id)
        self._ops["delete"].inc(deleted)
        return deleted

    async def keys(self) -> list[str]:
        return await self.inner.keys()

    async def sweep(self) -> int:
        return await self.inner.sweep()

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


def open_store(settings: Settings) -> TensorStore:
    """The store the settings ask for: Redis when a URL is set, else shared memory (observed)."""
    if settings.redis_url:
        return ObservedStore(RedisStore(settings.redis_url, settings.redis_password))
    return ObservedStore(ShmStore(settings.shm_root, settings.tensor_ttl_s, settings.result_ttl_s))


def tensor_key(area: str, request_id: str, *names: str) -> str:
    return "/".join((area, request_id, *names))
