"""The ingress against a real nats-server: a request it keeps failing on is failed through
JetStream's MAX_DELIVERIES advisory, not left queued."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from common import subjects
from common.settings import Settings
from common.workflow import builtin_workflows
from gateway.app import Gateway

pytestmark = pytest.mark.timeout(120)


async def test_request_the_ingress_keeps_failing_on_is_failed(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_deliver": 2, "retry_backoff_s": 0.05})
    gw = Gateway(settings, builtin_workflows(), run_ingress=True)
    await gw.start()
    try:
        async def broken_plan(*args: object) -> None:
            raise RuntimeError("the planner is broken")

        gw.ingress._plan = broken_plan  # type: ignore[method-assign]
        await gw.js.publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps({"id": "doomed-1", "workflow": "txt2img", "prompt": "x"}),
            headers={"Nats-Msg-Id": "doomed-1"},
        )
        async with asyncio.timeout(60):
            state = await gw.tracker.get("doomed-1")
            while state is None or not state.done:
                await asyncio.sleep(0.1)
                state = await gw.tracker.get("doomed-1")
        assert state.status == "failed"
        assert state.error is not None and "failed on this request 2 times" in state.error.message
    finally:
        await gw.stop()

