"""What the cluster observer reads, against a real nats-server: work that admission control
turns away is news to the autoscaler within a fraction of its tick (a burst that the short
queues do not show yet), and rates sampled right after one another are not read as spikes."""

from __future__ import annotations

import asyncio

import pytest

from common import bus, subjects
from common.observe import RATE_WINDOW_S, ClusterObserver
from common.settings import Settings
from common.workflow import builtin_workflows
from gateway.admission import LoadWatch

pytestmark = pytest.mark.timeout(60)


async def test_work_turned_away_is_news_at_once(settings: Settings) -> None:
    """A rejection reaches the observer as news long before the gateway's next periodic
    report (here 30 s away), and its count is in the pools' arrivals."""
    gateway_nc = await bus.connect(settings, name="gateway")
    autoscaler_nc = await bus.connect(settings, name="autoscaler")
    watch = LoadWatch(gateway_nc, period_s=30.0)
    observer = ClusterObserver(autoscaler_nc)
    try:
        await bus.ensure_topology(gateway_nc.jetstream(), settings)
        await observer.start()
        await watch.start()
        plan = builtin_workflows()["txt2img"].compile()
        await autoscaler_nc.flush()
        watch.rejected(plan)
        await asyncio.wait_for(observer.news.wait(), 2.0)
        observer.news.clear()
        for node in plan.nodes.values():
            await bus.ensure_consumer(autoscaler_nc.jetstream(), subjects.TASKS_STREAM,
                                      subjects.pool_consumer(node.pool),
                                      subjects.task_subject(node.pool), settings)
        await observer.sample()
        watch.rejected(plan)  # a second one: news again
        await asyncio.wait_for(observer.news.wait(), 2.0)
        views = await observer.sample()
        assert all(views[n.pool].shed_rate for n in plan.nodes.values())
        # one pool held the rejected request back most: it alone is told to grow
        assert sum(bool(views[n.pool].held_rate) for n in plan.nodes.values()) == 1
    finally:
        await watch.stop()
        await observer.stop()
        await bus.close(gateway_nc)
        await bus.close(autoscaler_nc)


async def test_rates_are_measured_over_a_window(settings: Settings) -> None:
    """Two samples a few milliseconds apart, one task queued between them: the arrival rate
    is that task over at least ``RATE_WINDOW_S``, not over the milliseconds between (a tick
    woken early would otherwise read one task as a burst)."""
    nc = await bus.connect(settings, name="observer")
    observer = ClusterObserver(nc)
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        await bus.ensure_consumer(js, subjects.TASKS_STREAM, subjects.pool_consumer("p"),
                                  subjects.task_subject("p"), settings)
        await observer.start()
        await observer.sample()
        await js.publish(subjects.task_subject("p"), b"{}")
        view = (await observer.sample())["p"]
        assert view.lag == 1
        assert view.arrival_rate is not None
        assert 0 < view.arrival_rate <= 1 / RATE_WINDOW_S + 1e-9, view.arrival_rate
    finally:
        await observer.stop()
        await bus.close(nc)
