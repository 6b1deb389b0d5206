"""Admission control's pure parts: the finish bound over a workflow DAG, steps per node, the
default deadline and its validation, the rejection with its reason and Retry-After, and the
paper's rule (the DiFlow artifact's early abort), and a request's ETA and queue position on
hand-made pool loads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.errors import InvalidRequest, Overloaded
from common.workflow import builtin_workflows
from gateway.admission import (
    DeadlinePolicy,
    Ledger,
    Margin,
    PoolLoad,
    check,
    deadline_s,
    estimate_s,
    finish_bound_s,
    paper_estimate,
    queue_marks,
    queue_position,
    shared_wait_s,
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


def test_a_request_in_parallel_branches_is_ahead_once() -> None:
    """FLUX's two text encoders feed one denoiser: a request queued at both is one request
    ahead of the denoiser, not two; a chain of pools (encoder, then denoiser) adds up."""
    plan = SPECS["flux-txt2img"].compile()
    pools = {name: node.pool for name, node in plan.nodes.items()}
    figures = {"encode": (0.01, 1), "encode_t5": (0.03, 1), "denoise": (0.2, 4),
               "decode": (0.02, 1)}

    def queued(**lags: int) -> dict[str, PoolLoad]:
        return {pools[n]: PoolLoad(lag=lags.get(n, 0), ready=1, work_s=work,
                                   step_s=work / steps, steps_per_task=steps)
                for n, (work, steps) in figures.items()}

    steps = {"encode": 1, "encode_t5": 1, "denoise": 4, "decode": 1}
    idle = finish_bound_s(plan, queued(), steps)
    assert idle == pytest.approx(0.03 + 0.2 + 0.02)
    # 5 requests queued at both encoders: 5 denoiser tasks (1 s) ahead, not 10 (2 s); its
    # own text encodings are done by then
    both = finish_bound_s(plan, queued(encode=5, encode_t5=5), steps)
    assert both == pytest.approx(1.0 + 0.2 + 0.02)
    # 5 more already past the encoders, queued at the denoiser: 10 ahead there
    chain = finish_bound_s(plan, queued(encode=5, encode_t5=5, denoise=5), steps)
    assert chain == pytest.approx(both + 1.0)


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
    assert deadline_s({}, None, None, policy) == 60  # unknown yet: the longest allowed
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


def test_solo_latency_ignores_the_tasks_in_progress() -> None:
    """The solo latency (the default deadline's base) is the request alone on idle pools:
    tasks in progress upstream are not waited for (they made it 1.22 s here, not 0.23 s)."""
    steps = {"encode": 1, "denoise": 4, "decode": 1}
    busy = loads()
    busy[POOL["encode"]] = replace(busy[POOL["encode"]], in_progress=5)
    assert solo_latency_s(PLAN, busy, steps) == pytest.approx(0.23)


def on(devices: str, **lags: int) -> dict[str, PoolLoad]:
    """``loads(**lags)`` with every pool's ready replicas on ``devices`` (comma-separated)."""
    where = frozenset(devices.split(",")) if devices else frozenset()
    return {pool: replace(load, devices=where) for pool, load in loads(**lags).items()}


STEPS = {"encode": 1, "denoise": 4, "decode": 1}  # own work at the least step times: 0.23 s


def test_paper_rule_is_queued_work_per_device_against_the_slack() -> None:
    # 10 denoiser tasks of 0.2 s on 2 devices: 1 s of work each before ours can start
    two = on("gpu:0,gpu:1", denoise=10)
    estimate = paper_estimate(PLAN, two)
    assert (estimate.wait_s, estimate.devices, estimate.in_flight) == (pytest.approx(1.0), 2, 10)
    assert check("txt2img", PLAN, two, 1.3, STEPS, rule="paper") == pytest.approx(1.23)
    with pytest.raises(Overloaded) as err:  # slack 1.2 - 0.23 = 0.97 < 1.0
        check("txt2img", PLAN, two, 1.2, STEPS, rule="paper")
    exc = err.value
    assert exc.http_status == 503 and exc.retry_after_s == 1
    assert exc.details["slack_s"] == pytest.approx(0.97) and exc.details["devices"] == 2
    assert exc.details["queued"][POOL["denoise"]] == 10 and "slack" in exc.message
    # the lego rule divides by the pool's ready replicas (1 here), not by the devices
    with pytest.raises(Overloaded):
        check("txt2img", PLAN, two, 1.3, STEPS)


def test_paper_rule_skips_while_fewer_requests_than_devices_are_in_flight() -> None:
    slow = on("gpu:0,gpu:1,gpu:2", denoise=2)
    slow[POOL["denoise"]] = replace(slow[POOL["denoise"]], work_s=50.0)
    assert paper_estimate(PLAN, slow).wait_s == pytest.approx(50.0)
    assert check("txt2img", PLAN, slow, 1.0, STEPS, rule="paper") > 1.0  # 2 < 3: admitted
    busier = {**slow, POOL["encode"]: replace(slow[POOL["encode"]], in_progress=1)}
    with pytest.raises(Overloaded):  # 3 in flight on 3 devices
        check("txt2img", PLAN, busier, 1.0, STEPS, rule="paper")


def test_paper_rule_waits_at_least_the_longest_piece() -> None:
    """Work does not split across devices: one 3 s task on 4 devices still takes 3 s."""
    four = on("gpu:0,gpu:1,gpu:2,gpu:3", encode=3, denoise=1)
    four[POOL["denoise"]] = replace(four[POOL["denoise"]], work_s=3.0)
    estimate = paper_estimate(PLAN, four)
    assert estimate.in_flight == 4 and estimate.devices == 4
    assert estimate.wait_s == pytest.approx(3.0)  # not (3 x 0.01 + 3) / 4


def test_paper_rule_counts_requests_admitted_since_the_sample() -> None:
    """A burst inside one sampling period: no lag yet, but the admitted requests are in
    flight and their steps are work."""
    burst = on("gpu:0")
    for node, pool in POOL.items():
        burst[pool] = replace(burst[pool], admitted_requests=5, admitted_steps=5 * STEPS[node])
    estimate = paper_estimate(PLAN, burst)
    assert estimate.in_flight == 5
    assert estimate.wait_s == pytest.approx(5 * (0.01 + 0.2 + 0.02))


def test_paper_rule_devices_are_those_of_the_requests_pools() -> None:
    """The workers are the devices the request's pools are ready on, and the work competing
    for them that of the pools there; unknown, every device any pool reports; at least 1."""
    other = "denoiser-other-pool"
    mixed = on("gpu:0", denoise=4)
    mixed[other] = PoolLoad(lag=100, ready=3, work_s=1.0, devices=frozenset({"gpu:5", "gpu:6"}))
    estimate = paper_estimate(PLAN, mixed)
    assert estimate.devices == 1 and estimate.wait_s == pytest.approx(0.8)  # gpu:5-6 apart
    mixed[other] = replace(mixed[other], devices=frozenset({"gpu:0", "gpu:6"}))
    assert paper_estimate(PLAN, mixed).wait_s == pytest.approx(100.8)  # shares gpu:0
    unplaced = on("", denoise=4)
    unplaced[other] = replace(mixed[other], lag=0)
    assert paper_estimate(PLAN, unplaced).devices == 2  # the other pool's devices
    assert paper_estimate(PLAN, on("", denoise=4)).devices == 1


def test_pools_sharing_devices_wait_for_their_work_together() -> None:
    """With device hosts every pool of the request has a copy on each of 4 devices: the per-pool
    bound counts 4 devices for each, but the pools' work takes turns on the same 4."""
    shared = {pool: replace(load, ready=4) for pool, load in
              on("gpu:0,gpu:1,gpu:2,gpu:3", denoise=8, decode=40).items()}
    # per pool: denoise 8 x 0.2 / 4 = 0.4 s, then its own 0.2 s, then decode: 0.62 s
    assert check("txt2img", PLAN, shared, 0.7, STEPS) == pytest.approx(0.62)
    # together: (8 x 0.2 + 40 x 0.02) / 4 = 0.6 s of work ahead, then its own 0.23 s
    assert shared_wait_s(PLAN, shared) == pytest.approx(0.6)
    assert check("txt2img", PLAN, shared, 0.9, STEPS, shared_devices=True) == \
        pytest.approx(0.83)
    with pytest.raises(Overloaded):
        check("txt2img", PLAN, shared, 0.7, STEPS, shared_devices=True)
    # tasks in progress are half done on average
    busy = {**shared, POOL["denoise"]: replace(shared[POOL["denoise"]], in_progress=4)}
    assert shared_wait_s(PLAN, busy) == pytest.approx(0.6 + 4 * 0.2 / 2 / 4)
    # another model's work on those devices counts by the share of it due before this
    # request's deadline (the hosts run the least slack first): none known, none counted
    other = PoolLoad(lag=100, ready=4, work_s=1.0, devices=frozenset({"gpu:0"}))
    with_other = {**shared, "denoiser-other-pool": other}
    assert shared_wait_s(PLAN, with_other) == pytest.approx(0.6)
    assert shared_wait_s(PLAN, with_other, {"denoiser-other-pool": 0.1}.get) == \
        pytest.approx(0.6 + 0.1 * 100 * 1.0 / 4)
    # a pool on other devices does not compete, whatever is due there
    elsewhere = replace(other, devices=frozenset({"gpu:9"}))
    assert shared_wait_s(PLAN, {**shared, "denoiser-other-pool": elsewhere},
                         {"denoiser-other-pool": 1.0}.get) == pytest.approx(0.6)


def booked(ledger: Ledger, request_id: str, deadline_at: float, steps: int = 4) -> None:
    ledger.book(request_id, deadline_at, PLAN, {"encode": 1, "denoise": steps, "decode": 1},
                {pool: replace(load, step_mean_s=load.step_s)
                 for pool, load in loads().items()}, at=0.0)


def test_the_ledger_says_which_share_of_a_pools_work_is_due_first() -> None:
    """Per pool, the work of the admitted requests due by a deadline over all of it: each
    request's nodes at their mean step times (encode 0.01 s, 4 or 12 steps of 0.05 s, decode
    0.02 s)."""
    ledger = Ledger()
    booked(ledger, "soon", 10.0)
    booked(ledger, "later", 30.0, steps=12)
    shares = ledger.due_shares(20.0, at=0.0)
    assert shares[POOL["denoise"]] == pytest.approx(0.2 / (0.2 + 0.6))
    assert shares[POOL["encode"]] == pytest.approx(0.5)
    assert ledger.due_shares(40.0, at=0.0)[POOL["denoise"]] == pytest.approx(1.0)
    assert ledger.due_shares(5.0, at=0.0)[POOL["denoise"]] == pytest.approx(0.0)


def test_the_ledger_follows_progress_and_forgets_what_ended() -> None:
    ledger = Ledger()
    booked(ledger, "a", 10.0)
    booked(ledger, "b", 30.0)
    # a's denoiser reports 3 of 4 steps: its encode is done, a quarter of its denoise is left
    ledger.progressed("a", "denoise", 3, 4)
    shares = ledger.due_shares(20.0, at=0.0)
    assert shares[POOL["encode"]] == pytest.approx(0.0)
    assert shares[POOL["denoise"]] == pytest.approx(0.05 / (0.05 + 0.2))
    # its last stepped node done: forgotten (its decode is what is left)
    ledger.progressed("a", "denoise", 4, 4)
    assert set(ledger.bookings) == {"b"}
    # reports of requests or nodes it does not know change nothing
    ledger.progressed("zzz", "denoise", 1, 4)
    ledger.progressed("b", "nowhere", 1, 4)
    assert ledger.due_shares(40.0, at=0.0)[POOL["denoise"]] == pytest.approx(1.0)
    # past its deadline a request is forgotten: no node runs it any more
    assert ledger.due_shares(40.0, at=31.0) == {}
    assert ledger.bookings == {}
    # and a new booking forgets what is past its deadline first
    booked(ledger, "c", 50.0)
    ledger.book("d", 90.0, PLAN, {}, loads(), at=60.0)
    assert set(ledger.bookings) == {"d"}


def test_eta_is_the_estimate_admission_holds_against_the_deadline() -> None:
    """With no spread in step times, the ETA is what admission holds against the deadline."""
    busy = loads(denoise=10)
    for rule in ("lego", "paper"):
        for shared in (False, True):
            assert estimate_s(PLAN, busy, STEPS, rule, shared) == pytest.approx(
                check("txt2img", PLAN, busy, 100.0, STEPS, rule, shared))


def test_admission_holds_the_slow_steps_against_the_deadline() -> None:
    """Steps spread: the ETA takes a new request's own steps at the mean of recent ones, the
    check at their 90th percentile, so that it admits only what finishes in time when its
    steps run slow; the least step time still bounds from below."""
    busy = loads(denoise=10)
    denoiser = POOL["denoise"]
    busy[denoiser] = replace(busy[denoiser], step_mean_s=0.1, step_p90_s=0.2)
    queued = 10 * 0.2  # the denoiser's queue clears at its measured throughput
    assert finish_bound_s(PLAN, busy, STEPS) == pytest.approx(queued + 4 * 0.05 + 0.02)
    eta = estimate_s(PLAN, busy, STEPS)
    assert eta == pytest.approx(queued + 4 * 0.1 + 0.02)
    assert check("txt2img", PLAN, busy, 100.0, STEPS) == pytest.approx(queued + 4 * 0.2 + 0.02)
    # a deadline the mean would meet but the slow steps would not: rejected
    with pytest.raises(Overloaded):
        check("txt2img", PLAN, busy, eta + 0.1, STEPS)


def test_queue_position_follows_the_pool_handing_out_tasks() -> None:
    """A request enters its first pool's queue behind the tasks queued there and the requests
    admitted since they were counted; each task handed out since moves it up one."""
    busy = loads(encode=3)
    encoder = POOL["encode"]
    busy[encoder] = replace(busy[encoder], admitted_requests=2, delivered=40)
    marks = queue_marks(PLAN, busy)
    assert list(marks) == [encoder]  # it waits on its root node's pool first
    mark = marks[encoder]
    assert (mark.ahead, mark.delivered) == (5, 40)
    assert queue_position(mark, busy[encoder]) == 5
    assert queue_position(mark, replace(busy[encoder], delivered=43)) == 2
    assert queue_position(mark, replace(busy[encoder], delivered=90)) == 0
    assert queue_position(mark, None) == 5  # the pool not seen (yet): as it was


def test_the_estimate_expects_the_step_times_recent_tasks_saw() -> None:
    """The bound takes a new task's steps at the least step time; what admission holds against
    the deadline (and the ETA) takes the step time recent tasks saw (batches shared). Tasks in
    progress at its own pool count as done in both: it joins their batch at the next step."""
    busy = loads()
    denoiser = POOL["denoise"]
    busy[denoiser] = replace(busy[denoiser], in_progress=4, step_mean_s=0.1)
    bound = finish_bound_s(PLAN, busy, STEPS)
    assert bound == pytest.approx(0.01 + 4 * 0.05 + 0.02)  # the bound: unchanged
    assert estimate_s(PLAN, busy, STEPS) == pytest.approx(0.01 + 4 * 0.1 + 0.02)


def test_a_pool_keeps_its_figures_when_its_last_replica_is_gone() -> None:
    """Its replicas died (no report): the pool's measured speed stays, so its workflows keep a
    solo latency (a deadline) and its queue an estimate; fresh figures replace it."""
    from gateway.admission import _remembered

    measured = PoolLoad(lag=0, ready=1, work_s=0.2, step_s=0.05, step_mean_s=0.06,
                        steps_per_task=4)
    gone = _remembered(PoolLoad(lag=3, ready=0), measured)
    assert (gone.lag, gone.ready) == (3, 0)
    assert (gone.work_s, gone.step_s, gone.step_mean_s, gone.steps_per_task) == (
        0.2, 0.05, 0.06, 4)
    fresh = PoolLoad(lag=1, ready=1, work_s=0.3, step_s=0.07)
    assert _remembered(fresh, measured) == fresh


def test_the_margin_grows_while_admitted_requests_miss_and_eases_back() -> None:
    """Pools dropping more of their tasks as late than the target allows widen admission's
    margin (up to its limit); once misses are rare, it shrinks back to 1. Too few tasks in the
    window say nothing."""
    margin = Margin(target=0.05)
    assert margin.update({"denoiser": 5}, {"denoiser": 5}) == 1.0  # too few tasks to judge
    for _ in range(10):  # 20% of the denoiser's tasks expire
        margin.update({"denoiser": 10, "encoder": 10}, {"denoiser": 2})
    grown = margin.factor
    assert 1.1 < grown < margin.limit
    assert margin.miss_share() == pytest.approx(0.2, abs=0.03)  # the first sample fades
    for _ in range(200):
        margin.update({"denoiser": 10, "encoder": 10}, {"denoiser": 2})
    assert margin.factor == margin.limit
    for _ in range(300):  # no misses any more
        margin.update({"denoiser": 10, "encoder": 10}, {})
    assert margin.factor == 1.0
    # the margin multiplies the estimate held against the deadline
    busy = loads(denoise=10)
    estimate = check("txt2img", PLAN, busy, 100.0, STEPS)
    with pytest.raises(Overloaded):
        check("txt2img", PLAN, busy, estimate * 1.5, STEPS, margin=2.0)
    assert check("txt2img", PLAN, busy, estimate * 1.5, STEPS, margin=1.2) == pytest.approx(
        estimate * 1.2)
    off = Margin(target=1.0)  # admission_miss_target: 1, never widened
    for _ in range(50):
        off.update({"denoiser": 10}, {"denoiser": 9})
    assert off.factor == 1.0
