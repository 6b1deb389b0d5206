"""The idealised cluster's SLO attainment (``emulation.bound``): pure arithmetic, checked on small
instances worked by hand, on the shipped traces against a plain FIFO reference, and for the
schedule's own consistency (no device runs two requests at once, none starts before it
arrives, every admitted one kept finishes by its deadline)."""

from __future__ import annotations

import heapq

import pytest

from emulation.bound import Job, bound, schedule
from emulation.experiment import burst_arrivals
from emulation.profiles import DEFAULT_PROFILE_DIR
from emulation.traces import Arrival, trace_for_scale
from emulation.workloads import load_workload

pytestmark = pytest.mark.timeout(60)
FLUX3 = load_workload("flux3", DEFAULT_PROFILE_DIR)
MIX12 = load_workload("mix12", DEFAULT_PROFILE_DIR)


def fifo_reject_at_arrival(jobs: list[Job], devices: int) -> int:
    """The simple reference: requests in arrival order, each on the device free first, and
    rejected at arrival when it would finish after its deadline. How many it meets."""
    free, met = [0.0] * devices, 0
    for job in sorted(jobs, key=lambda j: j.arrival_s):
        end_s = max(free[0], job.arrival_s) + job.work_s
        if end_s <= job.deadline_s + 1e-9:
            heapq.heapreplace(free, end_s)
            met += 1
    return met


def jobs_of(workload, arrivals: list[Arrival], seed: int = 0) -> list[Job]:
    return [Job(a.at_s, workload.work_s(w), a.at_s + 2.0 * workload.work_s(w))
            for a, w in zip(arrivals, workload.assign(arrivals, seed=seed), strict=True)]


def assert_consistent(jobs: list[Job], devices: int) -> None:
    result = schedule(jobs, devices)
    events = []
    for job, start_s, finish_s, met in zip(jobs, result.start_s, result.finish_s(jobs),
                                           result.met, strict=True):
        if start_s is None:
            assert not met
            continue
        assert start_s >= job.arrival_s
        assert met, "a request the oracle kept missed its deadline"
        events += [(finish_s, -1), (start_s, +1)]  # at a tie, one ends before one starts
    running = 0
    for _, change in sorted(events):
        running += change
        assert running <= devices


def test_one_device_suffices_when_requests_do_not_overlap():
    arrivals = [Arrival(5.0 * i, "A") for i in range(10)]  # 2 s of work every 5 s
    result = bound(FLUX3, arrivals, 1)
    assert result["slo_attainment"] == 1.0
    assert result["requests"] == result["admitted"] == result["met"] == 10
    assert result["by_workflow"] == {"flux-schnell-txt2img": 1.0}


def test_two_simultaneous_requests_with_a_tight_deadline():
    # deadline just above one request's work: on one device only one can make it
    twins = [Arrival(0.0, "B"), Arrival(0.0, "B")]
    assert bound(FLUX3, twins, 1, slo_factor=1.01)["slo_attainment"] == 0.5
    assert bound(FLUX3, twins, 2, slo_factor=1.01)["slo_attainment"] == 1.0
    jobs = [Job(0.0, 1.0, 1.01), Job(0.0, 1.0, 1.01)]
    assert schedule(jobs, 1).met.count(True) == 1
    assert schedule(jobs, 1).admitted == [True, False]  # the second is turned away at once


def test_a_short_request_displaces_an_admitted_long_one_before_it_starts():
    # one device busy until 5; L (4 s) is admitted behind it; S1 (1 s) cannot fit with L, so
    # the oracle drops L, the one with the most work, and keeps S1 and then S2: 3 met, where
    # FIFO-with-reject keeps X and L only
    jobs = [Job(0.0, 5.0, 10.0), Job(0.1, 4.0, 9.2), Job(0.2, 1.0, 6.2), Job(0.3, 1.0, 7.3)]
    result = schedule(jobs, 1)
    assert result.met == [True, False, True, True]
    assert result.admitted == [True, True, True, True]
    assert fifo_reject_at_arrival(jobs, 1) == 2


@pytest.mark.parametrize("workload", [FLUX3, MIX12], ids=lambda w: w.name)
def test_overload_misses_and_more_devices_never_hurt(workload):
    arrivals = trace_for_scale(8.0)
    figures = [bound(workload, arrivals, n)["slo_attainment"] for n in (1, 2, 4, 6, 8, 12)]
    assert figures[-2] < 1.0  # 8 devices at rate scale 8 is past either's capacity
    assert figures == sorted(figures)
    result = bound(workload, arrivals, 8)
    assert result["met"] <= result["admitted"] <= result["requests"] == len(arrivals)
    assert result["offered_rps"] > result["capacity_rps"]


@pytest.mark.parametrize("workload", [FLUX3, MIX12], ids=lambda w: w.name)
def test_never_below_fifo_with_reject_at_arrival_on_the_experiment_traces(workload):
    """Not a theorem (a constructed instance can favour FIFO: see the module docstring), so
    it is checked on what the experiment replays: the sweep's rate scales and burst cells."""
    traces = [trace_for_scale(s) for s in (0.25, 0.5, 1, 2, 4, 6, 8)]
    traces += [burst_arrivals(0.5, factor, workflow=workflow)
               for factor in (4, 16, 64)
               for workflow in (None, workload.popularity[0], workload.popularity[-1])]
    for arrivals in traces:
        for seed in (0, 1):
            jobs = jobs_of(workload, arrivals, seed)
            for devices in (1, 3, 8):
                met = schedule(jobs, devices).met.count(True)
                assert met >= fifo_reject_at_arrival(jobs, devices), (len(jobs), devices)


@pytest.mark.parametrize("workload", [FLUX3, MIX12], ids=lambda w: w.name)
def test_the_schedule_is_one_a_cluster_could_run(workload):
    for scale in (1.0, 4.0, 16.0):
        for devices in (1, 8):
            assert_consistent(jobs_of(workload, trace_for_scale(scale)), devices)


def test_the_same_assignment_as_a_run_and_named_workflows():
    # a Mix-12 run with seed s assigns workflows as bound does with seed s
    arrivals = trace_for_scale(1.0)
    assert bound(MIX12, arrivals, 8, seed=3)["by_workflow"].keys() == \
        set(MIX12.assign(arrivals, seed=3))
    # a trace naming one workflow is all that workflow, on either workload
    named = [Arrival(float(i), "sd3-txt2img") for i in range(5)]
    assert list(bound(MIX12, named, 8)["by_workflow"]) == ["sd3-txt2img"]
    with pytest.raises(ValueError, match="devices"):
        schedule([], 0)
    assert bound(FLUX3, [], 8)["slo_attainment"] is None
