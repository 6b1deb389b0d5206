"""Both tensor stores against real backends: shared memory and a real redis-server."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import torch

from common.store import RedisStore, ShmStore, TensorStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["shm", "redis"])
async def store(request: pytest.FixtureRequest, shm_root: Path) -> AsyncIterator[TensorStore]:
    if request.param == "shm":
        s: TensorStore = ShmStore(shm_root, tensor_ttl_s=60, result_ttl_s=60)
    else:
        s = RedisStore(request.getfixturevalue("redis_url"))
        await s.client.flushdb()
    yield s
    await s.close()


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(2, 77, 32),
        torch.randn(1, 4, 8, 8, dtype=torch.float16),
        torch.randn(3, 5, dtype=torch.bfloat16),
        torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8),
        torch.tensor(3.5),
        torch.zeros(0, 4),
        torch.arange(12).reshape(3, 4).t(),  # not contiguous
    ],
)
async def test_round_trip(store: TensorStore, tensor: torch.Tensor) -> None:
    ref = await store.put("tmp/r1/node/x", tensor, ttl_s=60)
    assert ref.store == store.kind
    assert ref.shape == list(tensor.shape)
    assert ref.nbytes == tensor.numel() * tensor.element_size()
    back = await store.get(ref)
    assert back.dtype == tensor.dtype
    assert torch.equal(back, tensor)


@pytest.mark.parametrize(
    ("tensor", "order"),
    [
        (torch.randn(1, 4, 6, 5).contiguous(memory_format=torch.channels_last), [0, 2, 3, 1]),
        (torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), [0, 2, 3, 1]),
        (torch.arange(12).reshape(3, 4).t(), [1, 0]),
        (torch.randn(2, 8)[:, ::2], None),  # gaps: dense in no order, stored contiguous
        (torch.randn(2, 3), None),
    ],
)
async def test_a_tensor_comes_back_in_its_layout(store: TensorStore, tensor: torch.Tensor,
                                                 order: list[int] | None) -> None:
    """Kernels round differently on other layouts (a convolution over a channels-last batch),
    so a reader gets the writer's dims in the writer's memory order, not a contiguous copy."""
    ref = await store.put("tmp/r1/node/x", tensor, ttl_s=60)
    assert ref.order == order
    back = await store.get(ref)
    assert torch.equal(back, tensor)
    if order is not None:
        assert back.stride() == tensor.stride()
    else:
        assert back.is_contiguous()
    assert (await store.get_array(ref) == tensor.numpy()).all()
    with pytest.raises(ValueError, match="dim order"):
        await store.get(msgspec.structs.replace(ref, order=[0] * tensor.ndim))


async def test_groups_are_deleted_together(store: TensorStore) -> None:
    for name in ("a", "b"):
        await store.put(f"tmp/r1/n/{name}", torch.ones(3), ttl_s=60)
    await store.put("tmp/r2/n/a", torch.ones(3), ttl_s=60)
    out = await store.put("out/r1/image", torch.ones(3), ttl_s=60)
    assert await store.delete_group("tmp", "r1") == 2
    assert await store.keys() == ["out/r1/image", "tmp/r2/n/a"]
    assert torch.equal(await store.get(out), torch.ones(3))
    with pytest.raises(KeyError):
        await store.get(msgspec.structs.replace(out, key="tmp/r1/n/a"))


async def test_bad_keys_are_refused(store: TensorStore) -> None:
    for key in ("../etc/passwd", "tmp/../../x", "other/r/x", "tmp/r"):
        with pytest.raises(ValueError, match="bad tensor key"):
            await store.put(key, torch.ones(1), ttl_s=60)


async def test_redis_ttl_is_the_safety_net(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.client.flushdb()
    ref = await store.put("tmp/ttl/n/x", torch.ones(4), ttl_s=0.3)
    assert torch.equal(await store.get(ref), torch.ones(4))
    await asyncio.sleep(0.6)
    with pytest.raises(KeyError):
        await store.get(ref)
    assert await store.keys() == []
    await store.close()


async def test_shm_sweep_removes_expired_groups(shm_root: Path) -> None:
    store = ShmStore(shm_root, tensor_ttl_s=30, result_ttl_s=3600)
    await store.put("tmp/old/n/x", torch.ones(4), ttl_s=30)
    await store.put("tmp/new/n/x", torch.ones(4), ttl_s=30)
    await store.put("out/old/image", torch.ones(4), ttl_s=3600)
    past = time.time() - 60
    os.utime(shm_root / "tmp" / "old", (past, past))
    os.utime(shm_root / "out" / "old", (past, past))
    assert await store.sweep() == 1
    assert await store.keys() == ["out/old/image", "tmp/new/n/x"]


async def test_shm_reads_map_without_copying(shm_root: Path) -> None:
    store = ShmStore(shm_root, 60, 60)
    ref = await store.put("tmp/r/n/big", torch.ones(1024, 1024), ttl_s=60)
    a, b = await store.get(ref), await store.get(ref)
    # copy-on-write maps: writing one reader's tensor leaves the stored bytes alone
    a[0, 0] = 5
    assert b[0, 0] == 1
    assert torch.equal(await store.get(ref), torch.ones(1024, 1024))
