"""The ingress against a real nats-server: a request it keeps failing on is failed through
JetStream's MAX_DELIVERIES advisory, not left queued; a request nobody works on ends at its
deadline; a request outlives an outage of the stream its tasks go to; the admission rule the
settings name is the one applied."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from common import subjects
from common.errors import Overloaded
from common.settings import Settings
from common.workflow import builtin_workflows
from gateway.admission import PoolLoad
from gateway.app import Gateway
from gateway.ingress import DEADLINE_GRACE_S

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



async def test_a_request_outlives_its_tasks_stream_being_unavailable(settings: Settings) -> None:
    """The stream of tasks cannot take writes (here: gone, as while a cluster elects its
    leader) for longer than the ingress's deliveries of a request would last: the ingress
    holds the request and tries again instead of spending its deliveries, so the request is
    planned once the stream is back, never failed for NATS's outage."""
    settings = settings.model_copy(update={"max_deliver": 2, "retry_backoff_s": 0.05,
                                           "ack_wait_s": 1.0, "nats_failover_s": 0})
    gw = Gateway(settings, builtin_workflows(), run_ingress=True)
    await gw.start()
    try:
        config = (await gw.js.stream_info(subjects.TASKS_STREAM)).config
        await gw.js.delete_stream(subjects.TASKS_STREAM)
        await gw.js.publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps({"id": "patient-1", "workflow": "txt2img", "prompt": "x"}),
            headers={"Nats-Msg-Id": "patient-1"},
        )
        await asyncio.sleep(3.0)  # past 2 deliveries' ack wait and backoff
        state = await gw.tracker.get("patient-1")
        assert state is not None and state.status == "queued", state
        await gw.js.add_stream(config)
        async with asyncio.timeout(30):
            while (await gw.js.stream_info(subjects.TASKS_STREAM)).state.messages < 1:
                await asyncio.sleep(0.1)
        state = await gw.tracker.get("patient-1")
        assert state is not None and state.status == "queued", state
    finally:
        await gw.stop()


async def test_request_no_replica_takes_ends_at_its_deadline(settings: Settings) -> None:
    """No node runs at all (a pool scaled to zero, or all its replicas dead): the request still
    ends when its deadline passes, as deadline_exceeded, and its result event is published."""
    gw = Gateway(settings, builtin_workflows(), run_ingress=True)
    await gw.start()
    try:
        results = await gw.js._nc.subscribe(subjects.result_subject("late-1"))
        await gw.js.publish(
            subjects.REQUESTS_SUBJECT,
            orjson.dumps({"id": "late-1", "workflow": "txt2img", "prompt": "x",
                          "deadline_s": 0.5}),
            headers={"Nats-Msg-Id": "late-1"},
        )
        msg = await results.next_msg(timeout=0.5 + DEADLINE_GRACE_S + 10)
        state = await gw.tracker.get("late-1")
        assert state is not None and state.status == "failed"
        assert state.error is not None and state.error.code == "deadline_exceeded"
        assert "had not finished (queued)" in state.error.message
        assert orjson.loads(msg.data)["status"] == "failed"
        assert state.deadline_at is not None and state.finished_at is not None
        assert state.deadline_at <= state.finished_at < state.deadline_at + DEADLINE_GRACE_S + 5
    finally:
        await gw.stop()


@pytest.mark.parametrize("rule", ["lego", "paper"])
async def test_the_admission_rule_setting_picks_the_rule(settings: Settings, rule: str) -> None:
    """Ten denoiser replicas, all on one device, 10 tasks queued: our rule sees ten replicas
    clearing them (0.2 s), the paper's one device (2 s); with a 1 s deadline only the paper's
    rejects, with the same 503 and Retry-After."""
    settings = settings.model_copy(update={"admission_rule": rule, "admission_sample_s": 5.0})
    gw = Gateway(settings, builtin_workflows(), run_ingress=False)
    await gw.start()
    try:
        pools = {n.kind: n.pool for n in gw.ingress.plan(gw.registry.get("txt2img")).nodes.values()}
        one_gpu = frozenset({"gpu:0"})
        figures = {"text_encoder": (0, 0.01), "denoiser": (10, 0.2), "vae_decoder": (0, 0.02)}
        gw.loads.loads = {  # as LoadWatch.refresh would sample them
            pools[kind]: PoolLoad(lag=lag, ready=10 if kind == "denoiser" else 1, work_s=work,
                                  step_s=work, devices=one_gpu)
            for kind, (lag, work) in figures.items()
        }
        raw = {"workflow": "txt2img", "prompt": "x", "steps": 1, "deadline_s": 1.0}
        if rule == "lego":
            assert (await gw.submit(raw)).status == "queued"
        else:
            with pytest.raises(Overloaded) as err:
                await gw.submit(raw)
            assert err.value.http_status == 503 and "Retry-After" in err.value.http_headers()
            assert err.value.details["devices"] == 1
            assert gw.loads.shed[pools["denoiser"]] == 1  # counted for the autoscaler
    finally:
        await gw.stop()
