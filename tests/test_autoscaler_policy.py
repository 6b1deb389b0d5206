"""The autoscaler's pure decision (autoscaler.policy) and replica placement (placement).

Time is a FakeClock; `Sim` plays the I/O loop: it feeds observations every tick and lets the
replica count follow each decision at once."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from autoscaler.placement import Device, fits, place
from autoscaler.policy import (
    Budget,
    Decision,
    PolicyConfig,
    PolicyState,
    PoolObservation,
    PoolSpec,
    decide,
)

GB = 1 << 30
TICK_S = 0.5


class FakeClock:
    """Time under the test's control: it moves only when advanced."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def advance(self, dt_s: float = TICK_S) -> float:
        self.now_s += dt_s
        return self.now_s


Load = dict[str, dict]  # pool -> PoolObservation fields other than replicas/ready


class Sim:
    """Drives decide() like the autoscaler loop: one call per tick, replicas follow at once."""

    def __init__(
        self,
        specs: list[PoolSpec],
        *,
        budget: Budget | None = None,
        config: PolicyConfig | None = None,
        replicas: dict[str, int] | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.pools = {s.name: s for s in specs}
        self.budget = budget or Budget(slots=1000)
        self.config = config or PolicyConfig()
        self.replicas = {s.name: s.min_replicas for s in specs} | (replicas or {})
        self.state: PolicyState | None = None
        self.decisions: list[tuple[float, Decision]] = []

    def tick(self, load: Load) -> Decision:
        """Decide at the current time, apply, then advance one tick."""
        observations = {
            name: PoolObservation(
                **({"lag": 0, "arrival_rate": 0.0, "ready": self.replicas[name]} | fields),
                replicas=self.replicas[name],
            )
            for name, fields in load.items()
        }
        decision = decide(
            self.clock.now_s, self.pools, observations, self.budget, self.state, self.config
        )
        self.state = decision.state
        self.decisions.append((self.clock.now_s, decision))
        self.replicas.update(decision.replicas)
        self.clock.advance(self.config.tick_s)
        return decision

    def run(self, seconds: float, load: Load | Callable[[float], Load]) -> list[tuple[float, int]]:
        """Tick for `seconds`; returns (time, replicas of the first pool) per tick."""
        name = next(iter(self.pools))
        trace = []
        end_s = self.clock.now_s + seconds
        while self.clock.now_s < end_s - 1e-9:
            t = self.clock.now_s
            self.tick(load(t) if callable(load) else load)
            trace.append((t, self.replicas[name]))
        return trace


def unet(**kw) -> PoolSpec:
    return PoolSpec("unet", **({"service_rate_per_replica": 20.0} | kw))


# --- scale-up -------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_sudden_backlog_scales_up_within_one_tick():
    sim = Sim([unet()])
    sim.run(10, {"unet": {"arrival_rate": 5.0}})  # 5/s needs 1 replica at 20/s
    assert sim.replicas["unet"] == 1
    backlog_at_s = sim.clock.now_s
    d = sim.tick({"unet": {"lag": 120, "arrival_rate": 5.0}})
    # (5 + 120 / 2.0) * 1.1 / 20 = 3.575 -> 4, decided on the very tick the lag was seen.
    assert d.replicas["unet"] == 4
    assert d.state.pools["unet"].last_scale_up_s == backlog_at_s
    assert d.reasons["unet"].startswith("burst: lag 120 needs 4")


@pytest.mark.timeout(10)
def test_work_turned_away_at_a_busy_pool_adds_one_replica_at_a_time():
    """16/s against 20/s a replica: the mean demand fits one replica (with headroom), but
    admission turns work away (queueing past the deadlines): one more, decided on the tick
    that sees it; none more while that one starts; the next once it is ready and work is
    still turned away."""
    sim = Sim([unet()])
    sim.run(5, {"unet": {"arrival_rate": 16.0}})
    assert sim.replicas["unet"] == 1
    d = sim.tick({"unet": {"arrival_rate": 16.0, "held_rate": 3.0}})
    assert d.replicas["unet"] == 2
    assert "3/s turned away at load 0.80: 2" in d.reasons["unet"]
    # the new replica is starting: ready stays 1, no third one yet
    d = sim.tick({"unet": {"arrival_rate": 16.0, "held_rate": 3.0, "ready": 1}})
    assert d.replicas["unet"] == 2
    d = sim.tick({"unet": {"arrival_rate": 30.0, "held_rate": 1.0}})  # ready, still too few
    assert d.replicas["unet"] == 3


@pytest.mark.timeout(10)
def test_work_turned_away_at_an_idle_pool_adds_nothing():
    """Admission turns work away while the pool is nearly idle (deadlines no replica count
    could meet): no replica is added for it."""
    sim = Sim([unet()])
    sim.run(5, {"unet": {"arrival_rate": 4.0, "held_rate": 1.0}})  # a fifth of one replica
    assert sim.replicas["unet"] == 1


@pytest.mark.timeout(10)
def test_burst_window_max_is_used_when_lag_spikes_and_vanishes_between_ticks():
    sim = Sim([unet()], config=PolicyConfig(upscale_delay_s=0.5))
    sim.tick({"unet": {"lag": 200}})  # wants 6, waits one tick for the delay
    assert sim.replicas["unet"] == 1
    d = sim.tick({"unet": {"lag": 40}})  # now only 2, but 6 is still in the 1 s burst window
    assert d.replicas["unet"] == 6
    assert "6 within 1s" in d.reasons["unet"]


@pytest.mark.timeout(10)
def test_upscale_delay_is_respected_and_reset_when_need_falls():
    sim = Sim([unet()], config=PolicyConfig(upscale_delay_s=2.0, burst_window_s=0.5))
    high = {"unet": {"lag": 120}}
    trace = sim.run(1.5, high)
    assert [r for _, r in trace] == [1, 1, 1]
    sim.run(1.0, {"unet": {}})  # need drops: the pending scale-up is forgotten
    trace = sim.run(2.5, high)
    assert [r for _, r in trace] == [1, 1, 1, 1, 4]  # up exactly 2.0 s after need first rose


# --- bounds, scale to zero, cold start ------------------------------------------------------


@pytest.mark.timeout(10)
def test_min_and_max_bounds():
    sim = Sim([unet(min_replicas=2, max_replicas=5)])
    d = sim.tick({"unet": {"lag": 10_000}})
    assert d.replicas["unet"] == 5
    assert d.reasons["unet"].startswith("max 5")
    trace = sim.run(120, {"unet": {}})
    assert min(r for _, r in trace) == 2 and trace[-1][1] == 2
    assert "min 2" in sim.tick({"unet": {}}).reasons["unet"]


@pytest.mark.timeout(10)
def test_min_is_enforced_at_once_when_below():
    sim = Sim([unet(min_replicas=3)], replicas={"unet": 1})
    assert sim.tick({"unet": {}}).replicas["unet"] == 3


@pytest.mark.timeout(10)
def test_scale_to_zero_after_idle_and_back_to_one_on_new_lag():
    spec = unet(scale_to_zero=True)
    sim = Sim([spec], config=PolicyConfig(scale_to_zero_after_s=60.0))
    sim.run(5, {"unet": {"arrival_rate": 5.0}})
    idle_from_s = sim.clock.now_s - TICK_S  # last tick with arrivals
    trace = sim.run(70, {"unet": {}})
    before = [r for t, r in trace if t < idle_from_s + 60]
    after = [r for t, r in trace if t >= idle_from_s + 60]
    assert before and min(before) == 1
    assert after and set(after) == {0}
    assert sim.state.pools["unet"].last_scale_down_s == pytest.approx(idle_from_s + 60)
    d = sim.tick({"unet": {"lag": 1}})
    assert d.replicas["unet"] == 1


@pytest.mark.timeout(10)
def test_scale_to_zero_pool_at_zero_stays_there_without_work():
    sim = Sim([unet(scale_to_zero=True, min_replicas=0)], replicas={"unet": 0})
    trace = sim.run(10, {"unet": {}})
    assert {r for _, r in trace} == {0}


@pytest.mark.timeout(10)
def test_cold_start_from_zero_ignores_upscale_delay():
    sim = Sim(
        [unet(scale_to_zero=True)],
        config=PolicyConfig(upscale_delay_s=5.0),
        replicas={"unet": 0},
    )
    d = sim.tick({"unet": {"lag": 3}})
    assert d.replicas["unet"] == 1
    assert d.reasons["unet"].startswith("cold start: lag 3 at 0 replicas")
    # The rest of a big backlog waits for the delay like any scale-up.
    trace = sim.run(6, {"unet": {"lag": 200}})
    assert trace[0][1] == 1 and trace[-1][1] == 6  # 100/s * 1.1 / 20


@pytest.mark.timeout(10)
def test_cold_start_without_state_or_profile():
    pools = {"vae": PoolSpec("vae")}
    obs = {"vae": PoolObservation(lag=4, arrival_rate=0.0, replicas=0, ready=0)}
    d = decide(0.0, pools, obs, Budget(slots=4), None)
    # No rate known: the conservative 1 task/s, (4 / 2) * 1.1 -> 3.
    assert d.replicas == {"vae": 3}
    assert "default" in d.reasons["vae"]


def test_one_task_for_an_unmeasured_pool_starts_one_replica():
    """One task is both lag and a burst of arrival rate; at a guessed service rate only the
    backlog counts, so a cold start for one task starts one replica."""
    pools = {"up": PoolSpec("up", min_replicas=0, scale_to_zero=True)}
    obs = {"up": PoolObservation(lag=1, arrival_rate=4.0, replicas=0, ready=0)}
    d = decide(0.0, pools, obs, Budget(slots=8), None)
    assert d.replicas == {"up": 1} and "cold start" in d.reasons["up"]
    # once measured, arrivals count: 4/s in at 2/s per replica, plus the lag
    measured = {"up": PoolObservation(lag=1, arrival_rate=4.0, replicas=1, ready=1,
                                      measured_service_rate_per_replica=2.0)}
    assert decide(0.5, pools, measured, Budget(slots=8), d.state).replicas == {"up": 3}


# --- scale-down -----------------------------------------------------------------------------


def alternating(period_s: float, high: dict, low: dict) -> Callable[[float], Load]:
    return lambda t: {"unet": high if (t % period_s) < period_s / 2 else low}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("period_s", [1.0, 4.0, 20.0, 29.0])
def test_alternating_load_does_not_flap(period_s):
    """Load swinging between two levels faster than the 30 s stable window: after the first
    scale-up the count never moves, even over 10 minutes."""
    high = {"lag": 40, "arrival_rate": 60.0}  # (60 + 20) * 1.1 / 20 = 4.4 -> 5
    low = {"arrival_rate": 5.0}  # -> 1
    sim = Sim([unet()])
    trace = sim.run(600, alternating(period_s, high, low))
    assert trace[0][1] == 5
    assert {r for _, r in trace} == {5}


@pytest.mark.timeout(10)
def test_slow_alternation_longer_than_window_follows_without_oscillating_per_tick():
    # Period 120 s: each level lasts 60 s > the 30 s window, so the count follows the load,
    # changing exactly twice per period, never tick to tick.
    high = {"lag": 40, "arrival_rate": 60.0}
    sim = Sim([unet()])
    trace = sim.run(600, alternating(120.0, high, {"arrival_rate": 5.0}))
    changes = sum(1 for (_, a), (_, b) in zip(trace, trace[1:], strict=False) if a != b)
    assert changes == 2 * 5 - 1  # up at t=0 (from the initial 1), then down/up each half


@pytest.mark.timeout(10)
def test_scale_down_is_slow_one_step_and_monotone():
    sim = Sim([unet()])
    sim.run(5, {"unet": {"lag": 200}})  # -> 6
    assert sim.replicas["unet"] == 6
    last_high_s = sim.clock.now_s - TICK_S
    trace = sim.run(60, {"unet": {"arrival_rate": 5.0}})
    counts = [r for _, r in trace]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert all(r == 6 for t, r in trace if t < last_high_s + 30.0)
    assert all(r == 1 for t, r in trace if t >= last_high_s + 30.0)
    reasons = dict((t, d.reasons["unet"]) for t, d in sim.decisions)
    assert reasons[last_high_s + 29.5].startswith("steady: max need 6 over 30s")
    assert reasons[last_high_s + 30.0].startswith("down: max need 1 over 30s")


@pytest.mark.timeout(10)
def test_stable_window_max_is_honoured():
    # No delay: only the window keeps replicas. A lull shorter than the window sheds nothing;
    # afterwards the count steps down through the window's max, not straight to the floor.
    config = PolicyConfig(stable_window_s=10.0, downscale_delay_s=0.0)
    sim = Sim([unet()], config=config)
    sim.run(20, {"unet": {"arrival_rate": 70.0}})  # 70 * 1.1 / 20 = 3.85 -> 4
    lull = sim.run(9.5, {"unet": {"arrival_rate": 5.0}})
    assert {r for _, r in lull} == {4}
    sim.run(5, {"unet": {"arrival_rate": 70.0}})
    sim.run(5, {"unet": {"arrival_rate": 50.0}})  # -> 3
    last_4_s = sim.clock.now_s - 5 - TICK_S
    trace = sim.run(20, {"unet": {"arrival_rate": 5.0}})
    assert all(r == 4 for t, r in trace if t < last_4_s + 10)
    assert all(r == 3 for t, r in trace if last_4_s + 10 <= t < last_4_s + 15)
    assert trace[-1][1] == 1


@pytest.mark.timeout(10)
def test_downscale_waits_downscale_delay_after_last_scale_up():
    config = PolicyConfig(stable_window_s=5.0, downscale_delay_s=20.0)
    sim = Sim([unet()], config=config)
    sim.run(6, {"unet": {}})  # fill the window first
    up_s = sim.clock.now_s
    sim.tick({"unet": {"lag": 200}})
    trace = sim.run(30, {"unet": {}})
    assert all(r == 6 for t, r in trace if t < up_s + 20)
    assert all(r == 1 for t, r in trace if t >= up_s + 20)
    reasons = dict((t, d.reasons["unet"]) for t, d in sim.decisions)
    assert reasons[up_s + 10].startswith("hold: down to 1 in 10.0s")


@pytest.mark.timeout(10)
def test_no_scale_down_before_window_is_full_after_restart():
    # An autoscaler restart (no state) must not shed replicas on its first quiet tick.
    sim = Sim([unet()], config=PolicyConfig(downscale_delay_s=0.0), replicas={"unet": 6})
    trace = sim.run(40, {"unet": {}})
    assert all(r == 6 for t, r in trace if t < 30.0)
    assert trace[-1][1] == 1
    assert sim.state.pools["unet"].last_scale_down_s == 30.0


# --- budget ---------------------------------------------------------------------------------


def obs(lag: int = 0, rate: float = 0.0, replicas: int = 1, **kw) -> PoolObservation:
    return PoolObservation(lag=lag, arrival_rate=rate, replicas=replicas, ready=replicas, **kw)


def specs(*names: str, **kw) -> dict[str, PoolSpec]:
    return {n: PoolSpec(n, service_rate_per_replica=10.0, **kw) for n in names}


@pytest.mark.timeout(10)
def test_budget_shortage_goes_to_the_bottleneck_pool():
    pools = specs("text_encoder", "unet", "vae")
    observations = {
        "text_encoder": obs(lag=40),  # wants 3, cost 40/10 = 4 per replica at 1
        "unet": obs(lag=200),  # wants 8 (capped), cost 20 at 1, 10 at 2, 6.7 at 3, 5 at 4
        "vae": obs(lag=5),  # wants 1
    }
    d = decide(0.0, pools, observations, Budget(slots=7), None)
    assert d.replicas == {"text_encoder": 1, "unet": 5, "vae": 1}
    assert "budget: 5 of 8" in d.reasons["unet"]
    assert "budget: 1 of 3" in d.reasons["text_encoder"]
    # The workflow weight moves the bottleneck: 4 requests wait on the text encoder.
    observations["text_encoder"] = obs(lag=40, workflow_weight=4.0)  # cost 16, 8, 5.3
    d = decide(0.0, pools, observations, Budget(slots=7), None)
    assert d.replicas == {"text_encoder": 3, "unet": 3, "vae": 1}


@pytest.mark.timeout(10)
def test_budget_respects_slots_per_replica():
    pools = {
        "unet": PoolSpec("unet", slots_per_replica=2, service_rate_per_replica=10.0),
        "vae": PoolSpec("vae", service_rate_per_replica=10.0),
    }
    observations = {"unet": obs(lag=200), "vae": obs(lag=30)}
    d = decide(0.0, pools, observations, Budget(slots=6), None)
    # Protected: 2 + 1 slots; unet (cost 20) takes 2 more slots, then only 1 is left: vae.
    assert d.replicas == {"unet": 2, "vae": 2}
    assert sum(pools[p].slots_per_replica * n for p, n in d.replicas.items()) <= 6


@pytest.mark.timeout(10)
def test_budget_does_not_take_replicas_a_pool_still_needs():
    pools = specs("unet", "vae")
    observations = {"unet": obs(lag=400, replicas=1), "vae": obs(rate=25.0, replicas=3)}
    d = decide(0.0, pools, observations, Budget(slots=4), None)
    assert d.replicas == {"unet": 1, "vae": 3}  # vae needs its 3 even though unet hurts more
    assert "budget: 1 of 8" in d.reasons["unet"]


@pytest.mark.timeout(10)
def test_budget_exceeded_by_current_replicas_sheds_lowest_cost_first():
    pools = specs("unet", "vae")
    observations = {"unet": obs(lag=100, replicas=4), "vae": obs(lag=60, replicas=4)}
    d = decide(0.0, pools, observations, Budget(slots=6), None)
    # Both want 6 and 4; unet costs 100/(10*3) = 3.3 at 3, vae 60/(10*3) = 2 at 3: vae sheds.
    assert d.replicas == {"unet": 4, "vae": 2}
    assert d.state.pools["vae"].last_scale_down_s == 0.0


@pytest.mark.timeout(10)
def test_budget_ties_are_broken_by_pool_name():
    pools = specs("beta", "alpha")
    same = {"beta": obs(lag=100), "alpha": obs(lag=100)}
    d = decide(0.0, pools, same, Budget(slots=3), None)
    assert d.replicas == {"alpha": 2, "beta": 1}
    assert list(d.replicas) == ["alpha", "beta"]
    shed = {"beta": obs(lag=100, replicas=2), "alpha": obs(lag=100, replicas=2)}
    d = decide(0.0, pools, shed, Budget(slots=3), None)
    assert d.replicas == {"alpha": 2, "beta": 1}
    again = decide(
        0.0, dict(reversed(pools.items())), dict(reversed(shed.items())), Budget(slots=3), None
    )
    assert again == d


@pytest.mark.timeout(10)
def test_memory_budget_is_checked_through_placement():
    pools = {
        "unet": PoolSpec("unet", memory_bytes=20 * GB, service_rate_per_replica=10.0),
        "vae": PoolSpec("vae", memory_bytes=1 * GB, service_rate_per_replica=10.0),
    }
    observations = {"unet": obs(lag=100), "vae": obs(lag=5)}
    budget = Budget(slots=8, device_memory_bytes=24 * GB, devices=2)
    d = decide(0.0, pools, observations, budget, None)
    # Slots would allow 7 unet replicas; memory holds one per device, and vae fits beside one.
    assert d.replicas == {"unet": 2, "vae": 1}
    devices = budget.device_list()
    assert [dev.slots for dev in devices] == [4, 4]
    assert fits(d.replicas, pools, devices)


# --- rates, missing observations, purity ----------------------------------------------------


@pytest.mark.timeout(10)
def test_measured_service_rate_overrides_profile():
    pools = {"unet": unet()}  # profile: 20/s
    by_profile = decide(0.0, pools, {"unet": obs(rate=10.0)}, Budget(slots=8), None)
    assert by_profile.replicas["unet"] == 1  # 10 * 1.1 / 20
    measured = obs(rate=10.0, measured_service_rate_per_replica=2.5)
    by_measure = decide(0.0, pools, {"unet": measured}, Budget(slots=8), None)
    assert by_measure.replicas["unet"] == 5  # 10 * 1.1 / 2.5 = 4.4
    assert "measured" in by_measure.reasons["unet"]
    zero = obs(rate=10.0, measured_service_rate_per_replica=0.0)  # nothing measured yet
    assert decide(0.0, pools, {"unet": zero}, Budget(slots=8), None).replicas["unet"] == 1


@pytest.mark.timeout(10)
def test_pool_without_observation_keeps_its_count():
    sim = Sim([unet(), PoolSpec("vae", min_replicas=2)])
    sim.tick({"unet": {"lag": 120}, "vae": {}})
    assert sim.replicas == {"unet": 4, "vae": 2}
    d = sim.tick({"vae": {}})
    assert d.replicas["unet"] == 4
    assert d.reasons["unet"] == "no observation: keep 4"
    fresh = decide(0.0, {"clip": PoolSpec("clip", min_replicas=2)}, {}, Budget(slots=8), None)
    assert fresh.replicas == {"clip": 2}


@pytest.mark.timeout(10)
def test_decide_is_pure_and_deterministic():
    pools = specs("unet", "vae")
    observations = {"unet": obs(lag=100), "vae": obs(rate=3.0)}
    sim = Sim(list(pools.values()))
    sim.run(5, {"unet": {"lag": 30}, "vae": {}})
    state = sim.state
    snapshot = copy.deepcopy((pools, observations, state))
    first = decide(7.0, pools, observations, Budget(slots=5), state)
    second = decide(7.0, pools, observations, Budget(slots=5), state)
    assert first == second
    assert (pools, observations, state) == snapshot
    with pytest.raises(ValueError, match="backwards"):
        decide(1.0, pools, observations, Budget(slots=5), first.state)


@pytest.mark.timeout(10)
def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError):
        PoolSpec("unet", min_replicas=0)  # 0 needs scale_to_zero
    with pytest.raises(ValueError):
        PoolSpec("unet", min_replicas=4, max_replicas=2)
    with pytest.raises(ValueError):
        PoolObservation(lag=-1, arrival_rate=0.0, replicas=1, ready=1)
    with pytest.raises(ValueError):
        PolicyConfig(burst_window_s=60.0)  # longer than the stable window
    with pytest.raises(ValueError):
        Budget(slots=4, device_memory_bytes=GB)


# --- placement ------------------------------------------------------------------------------


def sd_pools() -> dict[str, PoolSpec]:
    # A GPU offers 4 slots; the denoiser takes all of them, small models one each.
    return {
        "unet": PoolSpec("unet", slots_per_replica=4, memory_bytes=10 * GB),
        "text_encoder": PoolSpec("text_encoder", memory_bytes=2 * GB),
        "vae": PoolSpec("vae", memory_bytes=1 * GB),
        "safety": PoolSpec("safety", memory_bytes=1 * GB),
    }


def gpus(n: int, memory: int = 24 * GB, slots: int = 4) -> list[Device]:
    return [Device(f"gpu{i}", memory, slots) for i in range(n)]


@pytest.mark.timeout(10)
def test_placement_packs_small_models_together_and_a_large_one_alone():
    p = place({"unet": 2, "text_encoder": 1, "vae": 1, "safety": 1}, sd_pools(), gpus(3))
    assert p.unplaced == {}
    assert p.assignment == {
        "safety": ["gpu2"],
        "text_encoder": ["gpu2"],
        "unet": ["gpu0", "gpu1"],
        "vae": ["gpu2"],
    }


@pytest.mark.timeout(10)
def test_placement_respects_device_memory():
    pools = {
        "flux": PoolSpec("flux", memory_bytes=22 * GB),
        "t5": PoolSpec("t5", memory_bytes=10 * GB),
        "vae": PoolSpec("vae", memory_bytes=1 * GB),
    }
    p = place({"flux": 2, "t5": 2, "vae": 3}, pools, gpus(3, memory=24 * GB, slots=8))
    # flux fills gpu0 and gpu1 (2 GiB left each), both t5 share gpu2 (4 GiB left); the vae
    # replicas spread, one per device (each the one with the most free slots).
    assert p.assignment == {
        "flux": ["gpu0", "gpu1"],
        "t5": ["gpu2", "gpu2"],
        "vae": ["gpu0", "gpu1", "gpu2"],
    }
    used: dict[str, int] = {}
    for name, ids in p.assignment.items():
        for dev in ids:
            used[dev] = used.get(dev, 0) + pools[name].memory_bytes
    assert all(v <= 24 * GB for v in used.values())


@pytest.mark.timeout(10)
def test_placement_keeps_running_replicas_where_they_are():
    pools = sd_pools()
    current = {"unet": ["gpu2"], "vae": ["gpu1"], "text_encoder": ["gpu1"]}
    wanted = {"unet": 1, "vae": 1, "text_encoder": 1}
    assert place(wanted, pools, gpus(3), current).assignment == current
    grown = place({"unet": 2, "vae": 2, "text_encoder": 1}, pools, gpus(3), current)
    assert grown.assignment == {
        "text_encoder": ["gpu1"],
        "unet": ["gpu2", "gpu0"],  # the running one stays, the new one takes a free GPU
        "vae": ["gpu1", "gpu1"],
    }
    shrunk = place({"unet": 1, "vae": 1}, pools, gpus(3), grown.assignment)
    assert shrunk.assignment == {"unet": ["gpu2"], "vae": ["gpu1"]}
    # A replica on a device that is gone is placed anew.
    moved = place(wanted, pools, gpus(2), current)
    assert moved.assignment["unet"] == ["gpu0"] and moved.unplaced == {}


@pytest.mark.timeout(10)
def test_placement_reports_unplaced_replicas():
    pools = sd_pools()
    p = place({"unet": 3, "vae": 5}, pools, gpus(2))
    # Two GPUs: two unet replicas take them whole; nothing is left for the third or any vae.
    assert p.assignment == {"unet": ["gpu0", "gpu1"], "vae": []}
    assert p.unplaced == {"unet": 1, "vae": 5}
    assert not p.complete and not fits({"unet": 3}, pools, gpus(2))
    assert fits({"unet": 2}, pools, gpus(2))
    assert place({"unet": 3, "vae": 5}, pools, gpus(2)) == p


@pytest.mark.timeout(10)
def test_keep_idle_holds_replicas_until_another_pool_needs_the_room():
    """On a fixed cluster (keep_idle) an idle pool keeps its replicas past its stable window,
    and gives them up as soon as another pool's need does not fit beside them."""
    config = PolicyConfig(tick_s=0.5, stable_window_s=2.0, downscale_delay_s=0.0,
                          keep_idle=True)
    pools = specs("unet", "vae")
    idle = {"unet": obs(replicas=5), "vae": obs(replicas=1)}
    state = None
    for t in range(10):  # 5 s of nothing: far past the 2 s window
        d = decide(t * 0.5, pools, idle, Budget(slots=8), state, config)
        state = d.state
    assert d.replicas == {"unet": 5, "vae": 1}
    assert "nothing else needs the room" in d.reasons["unet"]
    # a need that fits beside the idle replicas leaves them: 5 + 3 <= 8
    d = decide(5.0, pools, {"unet": obs(replicas=5), "vae": obs(lag=50)}, Budget(slots=8),
               state, config)
    assert d.replicas == {"unet": 5, "vae": 3}
    # one that does not (the vae needs 5 or more) makes the idle pool shrink to its need
    busy = {"unet": obs(replicas=5), "vae": obs(lag=100)}
    d = decide(5.0, pools, busy, Budget(slots=8), state, config)
    assert d.replicas["vae"] > 1 and d.replicas["unet"] < 5
    assert sum(d.replicas.values()) <= 8
    # without keep_idle the same idle pool shrinks once its window has passed
    state = None
    for t in range(10):
        d = decide(t * 0.5, pools, idle, Budget(slots=8), state,
                   PolicyConfig(tick_s=0.5, stable_window_s=2.0, downscale_delay_s=0.0))
        state = d.state
    assert d.replicas["unet"] < 5
