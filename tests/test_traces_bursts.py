"""Traces that name workflows, spikes on one workflow, and the experiment's pure parts around
them: the burst cells, repeated cells' medians, sustained rates, micro's admission variants.
(The trace format and the workloads' other parts: test_emulation.py.)"""

from __future__ import annotations

import pytest

from common.settings import Settings
from emulation import experiment
from emulation.profiles import DEFAULT_PROFILE_DIR
from emulation.traces import Arrival, parse_trace, spike, trace_for_scale
from emulation.workloads import load_workload

pytestmark = pytest.mark.timeout(60)
FLUX3 = load_workload("flux3", DEFAULT_PROFILE_DIR)
MIX12 = load_workload("mix12", DEFAULT_PROFILE_DIR)


def test_a_trace_line_may_name_a_workflow_on_every_workload():
    arrivals = parse_trace("A 1\nflux-schnell-depth 1\nC 0\n")
    assert FLUX3.assign(arrivals) == ["flux-schnell-txt2img", "flux-schnell-depth",
                                      "flux-schnell-depth"]
    with pytest.raises(ValueError, match="unknown tenant 'D'"):
        FLUX3.assign([Arrival(0.0, "D")])
    # on Mix-12 a named workflow is kept, and the others keep the picks they had without it
    base = trace_for_scale(1.0)
    named = sorted([*base, *(Arrival(a.at_s, "sd3-pose") for a in base[::3])],
                   key=lambda a: a.at_s)
    picks = MIX12.assign(named, seed=2)
    assert [w for a, w in zip(named, picks, strict=True) if a.tenant != "sd3-pose"] == \
        MIX12.assign(base, seed=2)
    assert picks.count("sd3-pose") >= len(base[::3])


def test_shares_count_named_workflows():
    only = [Arrival(float(i), "sd35l-depth") for i in range(4)]
    assert MIX12.shares(only)["sd35l-depth"] == 1.0
    half = [*only, *(Arrival(float(i), "A") for i in range(4))]
    zipf = MIX12.shares([])
    assert MIX12.shares(half)["sd35l-depth"] == pytest.approx(0.5 + 0.5 * zipf["sd35l-depth"])
    assert sum(MIX12.shares(half).values()) == pytest.approx(1.0)
    assert MIX12.shares(trace_for_scale(1.0)) == zipf  # a tenants' trace: Zipf, as before
    assert FLUX3.shares([Arrival(0.0, "flux-schnell-canny")])["flux-schnell-canny"] == 1.0


def test_a_spike_can_hit_one_tenant_at_the_same_times():
    base = [Arrival(float(t), "A" if t % 2 else "B") for t in range(60)]
    mixed = spike(base, at_s=20, length_s=10, factor=4, seed=5)
    hot = spike(base, at_s=20, length_s=10, factor=4, seed=5, tenant="flux-schnell-canny")
    assert [a.at_s for a in hot] == [a.at_s for a in mixed]
    extra = [a for a in hot if a.tenant == "flux-schnell-canny"]
    assert len(extra) == len(hot) - len(base) == pytest.approx(30, abs=1)
    assert all(20 <= a.at_s < 30 for a in extra)
    assert {a.tenant for a in mixed} == {"A", "B"}


def test_burst_cells_hot_and_cold():
    assert experiment.burst_workflow(MIX12, "hot") == MIX12.popularity[0]
    assert experiment.burst_workflow(MIX12, "cold") == MIX12.popularity[-1]
    assert experiment.burst_workflow(MIX12, "all") is None
    assert experiment.burst_workflow(FLUX3, "flux-schnell-depth") == "flux-schnell-depth"
    with pytest.raises(ValueError, match="no 'nope'"):
        experiment.burst_workflow(FLUX3, "nope")
    cold = MIX12.popularity[-1]
    cell = experiment.burst_arrivals(0.5, 8, workflow=cold, seed=1)
    plain = experiment.burst_arrivals(0.5, 8, seed=1)
    assert len(cell) == len(plain) and duration_s_of(cell) < experiment.BURST_WINDOW_S
    assert sum(a.tenant == cold for a in cell) == len(cell) - len(
        experiment.burst_arrivals(0.5, 1))
    # `lego bench slo --burst-factor` builds the same cell from the trace at a rate scale
    assert experiment.slo_arrivals(None, 0.5, burst_factor=8, burst_workflow=cold,
                                   seed=1) == cell
    with pytest.raises(ValueError, match="goes with --burst-factor"):
        experiment.slo_arrivals(None, 0.5, burst_workflow=cold)
    # other seeds draw other times (and, on Mix-12, other workflows for the base)
    assert experiment.burst_arrivals(0.5, 8, seed=2) != plain


def duration_s_of(arrivals: list[Arrival]) -> float:
    return max(a.at_s for a in arrivals)


def _run(seed: int, attainment: float | None, bound: float = 1.0) -> dict:
    return {"seed": seed, "system": "micro", "slo_attainment": attainment,
            "bound_attainment": bound, "p50_s": 2.0 + seed, "p99_s": 3.0, "rejected": seed,
            "dropped_late": 0, "lost": 0, "wall_s": 10.0, "by_workflow": {}}


def test_a_repeated_cell_reports_the_median_and_the_spread():
    runs = [_run(0, 0.9), _run(1, 0.7), _run(2, 0.8, bound=0.95)]
    cell = experiment.combine_runs(runs)
    assert cell["slo_attainment"] == 0.8
    assert (cell["slo_attainment_min"], cell["slo_attainment_max"]) == (0.7, 0.9)
    assert cell["median_seed"] == 2 and cell["p50_s"] == 4.0  # the median run's figures
    assert cell["bound_attainment"] == 1.0 and cell["repeat"] == 3
    assert [r["seed"] for r in cell["runs"]] == [0, 1, 2] and "system" not in cell["runs"][0]
    two = experiment.combine_runs([_run(0, 0.9), _run(1, 0.6)])
    assert two["slo_attainment"] == 0.75 and two["median_seed"] == 1  # the lower middle
    one = experiment.combine_runs([_run(0, 0.5)])
    assert one["slo_attainment"] == one["slo_attainment_min"] == 0.5 and one["repeat"] == 1
    assert experiment.combine_runs([_run(0, None)])["slo_attainment"] is None


def test_a_cell_s_latency_percentiles_are_over_all_its_runs_requests():
    runs = [{**_run(seed, 1.0), experiment.LATENCIES: [1.0 + seed] * 50 + [9.0 + seed]}
            for seed in range(3)]
    cell = experiment.combine_runs(runs)
    # 153 requests: the p99 is the third slowest of all, not the median run's slowest
    assert cell["p50_s"] == 2.0 and cell["p99_s"] == 9.0
    assert experiment.LATENCIES not in cell and experiment.LATENCIES not in cell["runs"][0]


def test_a_run_says_why_each_lost_request_was_lost():
    from lego.burst import Outcome

    done = Outcome("txt2img", 0.0, status="succeeded", served_s=1.0)
    broken = Outcome("txt2img", 0.0, error="ReadTimeout: timed out")
    unfinished = Outcome("txt2img", 0.0)  # still waiting when the replay's wait ended
    result = experiment.summarize([done, broken, unfinished, Outcome("txt2img", 0.0)],
                                  {"txt2img": 2.0}, 1.0, 10.0)
    assert result["lost"] == 3
    assert result["lost_why"] == {"ReadTimeout: timed out": 1, experiment.NO_FINAL_STATE: 2}
    assert experiment.summarize([done], {"txt2img": 2.0}, 1.0, 10.0)["lost_why"] == {}


def test_sustained_uses_the_medians_and_the_bound():
    rows = [{"system": "micro", "rate_scale": s, "slo_attainment": a, "bound_attainment": b}
            for s, a, b in ((1, 0.95, 1.0), (2, 0.91, 1.0), (4, 0.5, 0.93), (8, 0.95, 0.6))]
    assert experiment.sustained(rows, "micro") == 2  # 8 does not count: 4 was missed
    assert experiment.sustained(rows, "micro", "bound_attainment") == 4


def test_sweep_entrants_per_admission_rule():
    base = Settings()
    lego = experiment.sweep_entrants(base, "mix12", "lego")
    assert list(lego) == ["micro", "static", "swap", "mono-autoscale"]
    assert lego["micro"][0] == "micro"
    has_rule = "admission_rule" in Settings.model_fields
    if not has_rule:  # before the paper's rule lands: today's rule runs, "paper" is refused
        assert lego["micro"][1] is base
        with pytest.raises(ValueError, match="no admission_rule"):
            experiment.sweep_entrants(base, "flux3", "both")
        return
    both = experiment.sweep_entrants(base, "flux3", "both")
    assert list(both)[:2] == ["micro", "micro-paper"] and "shepherd" in both
    assert both["micro-paper"][0] == "micro"
    assert both["micro-paper"][1].admission_rule == "paper"  # type: ignore[attr-defined]
    assert both["micro"][1].admission_rule == "lego"  # type: ignore[attr-defined]


def test_repeated_bursts_report_the_spread_of_each_figure():
    from lego.burst import over_runs

    def run(decision_s, lost=0):
        return {"requests": 10, "scale_up_decision_s": decision_s, "scale_up_ready_s": None,
                "slo_attainment": 0.9, "p50_s": 0.1, "p99_s": 0.2, "rejected": 1,
                "dropped_late": 0, "failed_other": 0, "lost": lost}

    runs = [run(0.1 * i) for i in range(1, 10)] + [run(None, lost=1)]
    spread = over_runs(runs)
    decision = spread["scale_up_decision_s"]
    assert decision["runs"] == 9 and decision["max"] == 0.9 and decision["p50"] == 0.5
    assert 0.8 <= decision["p95"] <= 0.9
    assert spread["scale_up_ready_s"] == {"p50": None, "p95": None, "max": None, "runs": 0}
    assert spread["requests"] == 100 and spread["rejected"] == 10 and spread["lost"] == 1
    assert spread["runs"] == runs
