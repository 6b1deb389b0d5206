"""``Stack.wait_settled``: a benchmark replays its trace once the copies placed at start are
serving, not as soon as every pool has its first (``Stack.start``), so that its first
requests do not pay for the loads still under way. Real NATS; the replicas are status
reports published as a host would."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from common import bus, subjects
from common.messages import ReplicaStatus, encode, now
from common.settings import Settings
from lego.stack import Stack


def _status(replica: str, state: str) -> ReplicaStatus:
    return ReplicaStatus(replica=replica, pool="p", kind="vae_decoder", model="m",
                         state=state, held=0, max_batch=1, load_s=0.0, tasks_done=0,
                         tasks_failed=0, batches=0, batch_items=0, at=now())


def _settled_in(settings: Settings, quiet_s: float, timeout_s: float,
                result: dict[str, object]) -> threading.Thread:
    def run() -> None:
        began = time.monotonic()
        result["settled"] = Stack(settings).wait_settled(quiet_s=quiet_s, timeout_s=timeout_s)
        result["after_s"] = time.monotonic() - began

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def _publish(settings: Settings, script: list[tuple[float, str, str]]) -> None:
    """At each (seconds from now, replica, state), that replica's status."""
    nc = await bus.connect(settings, name="test-statuses")
    began = time.monotonic()
    for at_s, replica, state in script:
        await asyncio.sleep(max(0.0, began + at_s - time.monotonic()))
        await nc.publish(subjects.replica_subject("p"), encode(_status(replica, state)))
    await nc.drain()


async def test_it_waits_till_no_replica_is_starting_or_newly_ready(tmp_path: Path,
                                                                    nats_url: str) -> None:
    settings = Settings(nats_url=nats_url, run_dir=tmp_path)
    result: dict[str, object] = {}
    thread = _settled_in(settings, quiet_s=0.5, timeout_s=10, result=result)
    await asyncio.sleep(0.2)  # its subscription is up
    # a first copy ready at once; a second loading for 0.6 s, then ready; the first reports
    # again (no change)
    await _publish(settings, [(0.0, "a", "ready"), (0.1, "b", "starting"),
                              (0.4, "b", "starting"), (0.7, "b", "ready"), (1.0, "a", "ready")])
    await asyncio.to_thread(thread.join)
    assert result["settled"] is True
    # quiet from b's ready (0.9 s after it began) for 0.5 s: a's repeated report changes nothing
    assert 1.3 <= result["after_s"] < 2.0, result


async def test_a_replica_that_keeps_starting_does_not_settle(tmp_path: Path,
                                                             nats_url: str) -> None:
    settings = Settings(nats_url=nats_url, run_dir=tmp_path)
    result: dict[str, object] = {}
    thread = _settled_in(settings, quiet_s=0.5, timeout_s=1.5, result=result)
    await asyncio.sleep(0.2)
    await _publish(settings, [(0.3 * i, "b", "starting") for i in range(7)])
    await asyncio.to_thread(thread.join)
    assert result["settled"] is False
