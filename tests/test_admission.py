"""Admission control's pure parts: the finish bound over a workflow DAG, steps per node, the
default deadline and its validation, and the rejection with its reason and Retry-After."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import InvalidRequest, Overloaded
from common.workflow import builtin_workflows
from gateway.admission import (
    DeadlinePolicy,
    PoolLoad,
    check,
    deadline_s,
    finish_bound_s,
    solo_latency_s,
    steps_of,
)

SPECS = builtin_workflows()
TXT2IMG = SPECS["txt2img"]
PLAN = TXT2IMG.compile()
POOL = {name: node.pool for name, node in PLAN.nodes.items()}  # encode, denoise, decode


def loads(**lags: int) -> dict[str, PoolLoad]:
    # (work per task, least step time, steps per task)
    figures = {"encode": (0.01, 0.01, 1), "denoise": (0.2, 0.05, 4), "decode": (0.02, 0.02, 1)}
    return {
        POOL[node]: PoolLoad(lag=lags.get(node, 0), ready=1, work_s=work, step_s=step,
                             steps_per_task=steps)
        for node, (work, step, steps) in figures.items()
    }


def test_idle_bound_is_the_solo_latency() -> None:
    steps = steps_of(TXT2IMG, {"steps": 4}, PLAN)
    assert steps == {"encode": 1, "denoise": 4, "decode": 1}
    assert finish_bound_s(PLAN, loads(), steps) == pytest.approx(0.01 + 4 * 0.05 + 0.02)
    assert solo_latency_s(PLAN, loads(), steps) == pytest.approx(0.23)


def test_queues_ahead_raise_the_bound() -> None:
    steps = {"encode": 1, "denoise": 4, "decode": 1}
    # 10 denoiser tasks ahead, one replica at 0.2 s each: 2 s before ours can start
    assert finish_bound_s(PLAN, loads(denoise=10), steps) == pytest.approx(2.0 + 0.2 + 0.02)
    # tasks queued upstream reach the denoiser first, so they count there too
    assert finish_bound_s(PLAN, loads(encode=10), steps) == pytest.approx(2.0 + 0.2 + 0.02)
    # two ready replicas halve the wait
    two = {p: replace(x, ready=2) for p, x in loads(denoise=10).items()}
    assert finish_bound_s(PLAN, two, steps) == pytest.approx(1.0 + 0.2 + 0.02)


def test_steps_admitted_since_the_last_sample_count() -> None:
    """A burst inside one sampling period: the lag sampled is 0, the admitted steps are not."""
    steps = {"encode": 1, "denoise": 4, "decode": 1}
    burst = loads()
    burst[POOL["denoise"]] = replace(burst[POOL["denoise"]], steps_per_task=4, admitted_steps=40)
    # 40 steps at 0.2 s per 4-step task: 2 s of work ahead of ours
    assert finish_bound_s(PLAN, burst, steps) == pytest.approx(2.0 + 0.2 + 0.02)


def test_unmeasured_pools_never_reject() -> None:
    assert finish_bound_s(PLAN, {}) == 0.0
    assert solo_latency_s(PLAN, {POOL["encode"]: PoolLoad(0, 1, 0.01, 0.01)}) is None


def test_img2img_steps_scale_with_strength() -> None:
    spec = SPECS["img2img"]
    plan = spec.compile()
    steps = steps_of(spec, {"steps": 10, "strength": 0.5}, plan)
    assert steps["denoise"] == 5 and set(steps.values()) == {1, 5}


def test_monolithic_node_runs_every_step() -> None:
    plan = TXT2IMG.compile(monolithic=True)
    assert steps_of(TXT2IMG, {"steps": 4}, plan) == {"pipeline": 6}


def test_default_deadline_is_the_slo() -> None:
    policy = DeadlinePolicy(slo_factor=2.0, slo_min_s=0.5, max_deadline_s=60)
    assert deadline_s({}, None, 1.5, policy) == 3.0
    assert deadline_s({}, 0.1, 1.5, policy) == 0.5  # a declared solo latency wins; floored
    assert deadline_s({}, None, None, policy) is None
    assert deadline_s({"deadline_s": 7}, None, 1.5, policy) == 7.0


@pytest.mark.parametrize("bad", [0, -1, "soon", True, 61])
def test_bad_deadlines_name_the_field_and_limit(bad: object) -> None:
    with pytest.raises(InvalidRequest) as err:
        deadline_s({"deadline_s": bad}, None, 1.0, DeadlinePolicy(max_deadline_s=60))
    assert err.value.details["field"] == "deadline_s"
    if bad == 61:
        assert err.value.details["limit"] == 60


def test_rejection_says_why_and_when_to_retry() -> None:
    steps = {"encode": 1, "denoise": 4, "decode": 1}
    assert check("txt2img", PLAN, loads(), 1.0, steps) == pytest.approx(0.23)
    with pytest.raises(Overloaded) as err:
        check("txt2img", PLAN, loads(denoise=20), 1.0, steps)
    exc = err.value
    assert exc.http_status == 503 and exc.code == "overloaded"
    assert exc.retry_after_s == 4  # bound 4.22 s - deadline 1 s, rounded up
    assert exc.details["queued"][POOL["denoise"]] == 20
    assert "deadline" in exc.message


def test_queues_clear_at_the_measured_throughput_own_steps_at_the_fastest() -> None:
    """The work ahead clears at the mean work a task has amortised (slower when replicas
    time-share their device), the request's own steps at the least step time seen."""
    steps = {"encode": 1, "denoise": 4, "decode": 1}
    slow = loads(denoise=10)
    slow[POOL["denoise"]] = replace(slow[POOL["denoise"]], work_s=0.5)  # mean: 0.5 s a task
    assert finish_bound_s(PLAN, slow, steps) == pytest.approx(10 * 0.5 + 4 * 0.05 + 0.02)
    idle = loads()
    idle[POOL["denoise"]] = replace(idle[POOL["denoise"]], work_s=0.5)
    assert finish_bound_s(PLAN, idle, steps) == pytest.approx(0.01 + 4 * 0.05 + 0.02)
