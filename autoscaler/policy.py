"""The autoscaler's decision: replicas per pool from one tick of queue observations.

A pure function, as in Ray Serve's custom policies: ``decide`` takes the time, the pools, what
was observed and the previous ``PolicyState``, and returns replica counts, reasons and the next
state. No I/O, no clock, no randomness. Unlike Ray Serve's defaults it answers a backlog within
one tick and sheds replicas only down to the highest need of a stable window, so it neither
lags a burst nor flaps.

Per pool, ``demand_policy`` (replicas that drain the lag in ``target_backlog_drain_s`` on top
of the arrival rate) is wrapped by ``with_windows`` (burst and stable windows, up/down delays)
and ``with_bounds`` (min/max, scale to zero, cold start). ``allocate`` then fits all pools into
the global budget, handing scarce slots to the bottleneck pool.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from autoscaler.placement import Device, fits

# Tasks/s assumed for a pool with neither a measurement nor a profile: low, so we over-provision.
CONSERVATIVE_SERVICE_RATE = 1.0
_EPS = 1e-9  # float slack for window edges and delays (ticks are sums of 0.5 s)


@dataclass(frozen=True)
class PoolSpec:
    """A pool's static description (from the deployment and the model profile)."""

    name: str
    min_replicas: int = 1
    max_replicas: int = 8
    # Min becomes 0 once the pool had no lag and no arrivals for scale_to_zero_after_s.
    scale_to_zero: bool = False
    slots_per_replica: int = 1  # CPU slots or GPUs one replica takes
    memory_bytes: int = 0  # one replica's footprint on its device
    service_rate_per_replica: float | None = None  # tasks/s from the profile
    max_batch: int = 1  # informational here: the profile/measured rate already includes batching

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or (self.min_replicas == 0 and not self.scale_to_zero):
            raise ValueError(f"{self.name}: min_replicas must be >= 1 (0 needs scale_to_zero)")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"{self.name}: max_replicas must be >= max(min_replicas, 1)")
        if self.slots_per_replica < 1 or self.memory_bytes < 0 or self.max_batch < 1:
            raise ValueError(f"{self.name}: slots_per_replica, max_batch >= 1, memory >= 0")
        rate = self.service_rate_per_replica
        if rate is not None and not rate > 0:
            raise ValueError(f"{self.name}: service_rate_per_replica must be > 0")


@dataclass(frozen=True, kw_only=True)
class PoolObservation:
    """One tick's view of a pool, gathered by the I/O loop."""

    lag: int  # num_pending + num_ack_pending, as KEDA's JetStream scaler counts it
    queued: int = 0  # num_pending: tasks no replica has taken yet
    arrival_rate: float  # tasks/s, smoothed by the caller
    completion_rate: float = 0.0  # tasks/s
    replicas: int  # current, starting ones included
    ready: int
    measured_service_rate_per_replica: float | None = None  # None or 0: not measured yet
    workflow_weight: float = 1.0  # in-flight requests waiting on this pool
    #: requests/s admission control turned away because of the queues, of which this pool
    #: held the wait most (``arrival_rate`` counts them too): work its replicas could have
    #: done in time alone, but not behind its queue
    held_rate: float = 0.0

    def __post_init__(self) -> None:
        # `not x >= 0` also rejects NaN.
        values = (self.lag, self.arrival_rate, self.completion_rate, self.replicas, self.ready,
                  self.held_rate)
        if not all(v >= 0 for v in values) or not self.workflow_weight >= 0:
            raise ValueError(f"observation values must be >= 0: {self}")
        measured = self.measured_service_rate_per_replica
        if measured is not None and not measured >= 0:
            raise ValueError(f"measured_service_rate_per_replica must be >= 0: {measured}")


@dataclass(frozen=True)
class PolicyConfig:
    tick_s: float = 0.5  # the caller's period; windows shorter than it would remember nothing
    target_backlog_drain_s: float = 2.0
    burst_window_s: float = 1.0
    stable_window_s: float = 30.0
    upscale_delay_s: float = 0.0  # how long a higher need must persist before scaling up
    downscale_delay_s: float = 30.0  # quiet time after a pool's last scale-up before it shrinks
    headroom: float = 1.1
    scale_to_zero_after_s: float = 60.0
    #: keep idle replicas while the budget has room for them and every pool's need (a fixed
    #: cluster, where an idle GPU costs nothing and a replica shrunk away means a cold start)
    keep_idle: bool = False

    def __post_init__(self) -> None:
        if not (self.tick_s > 0 and self.target_backlog_drain_s > 0 and self.headroom > 0):
            raise ValueError("tick_s, target_backlog_drain_s and headroom must be > 0")
        if not self.tick_s <= self.burst_window_s <= self.stable_window_s:
            raise ValueError("need tick_s <= burst_window_s <= stable_window_s")
        delays = (self.upscale_delay_s, self.downscale_delay_s, self.scale_to_zero_after_s)
        if not all(d >= 0 for d in delays):
            raise ValueError("delays must be >= 0")


DEFAULT_CONFIG = PolicyConfig()


@dataclass(frozen=True)
class Budget:
    """What all pools share. With ``devices``, replicas must also be placeable: ``slots`` is
    split evenly over the devices, each with ``device_memory_bytes`` (unlimited if None)."""

    slots: int
    device_memory_bytes: int | None = None
    devices: int | None = None

    def __post_init__(self) -> None:
        if self.slots < 0:
            raise ValueError("slots must be >= 0")
        if self.devices is not None and self.devices < 1:
            raise ValueError("devices must be >= 1")
        if self.device_memory_bytes is not None and self.devices is None:
            raise ValueError("device_memory_bytes needs devices (the memory is per device)")

    def device_list(self) -> list[Device] | None:
        if self.devices is None:
            return None
        memory = sys.maxsize if self.device_memory_bytes is None else self.device_memory_bytes
        base, extra = divmod(self.slots, self.devices)
        return [Device(f"device-{i}", memory, base + (i < extra)) for i in range(self.devices)]


@dataclass(frozen=True)
class PoolState:
    """What one pool's policy remembers between ticks."""

    first_seen_s: float
    history: tuple[tuple[float, int], ...] = ()  # (time_s, needed replicas), oldest first
    last_active_s: float | None = None  # last tick with lag or arrivals; None: not since seen
    want_up_since_s: float | None = None  # need above current since then (for upscale delay)
    last_scale_up_s: float | None = None
    last_scale_down_s: float | None = None
    replicas: int | None = None  # last decided count


@dataclass(frozen=True)
class PolicyState:
    """All pools' memory; never mutated (decide builds a new one)."""

    now_s: float | None = None
    pools: Mapping[str, PoolState] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    replicas: dict[str, int]
    reasons: dict[str, str]
    state: PolicyState


@dataclass(frozen=True)
class PoolContext:
    """What a per-pool policy sees."""

    now_s: float
    spec: PoolSpec
    obs: PoolObservation
    config: PolicyConfig
    state: PoolState


@dataclass(frozen=True)
class PoolResult:
    replicas: int
    reason: str
    state: PoolState


PoolPolicy = Callable[[PoolContext], PoolResult]


def service_rate(spec: PoolSpec, obs: PoolObservation) -> tuple[float, str]:
    """Tasks/s one replica completes, and where the number came from."""
    measured = obs.measured_service_rate_per_replica
    if measured:  # 0 means no completions measured yet, not an infinitely slow replica
        return measured, "measured"
    if spec.service_rate_per_replica is not None:
        return spec.service_rate_per_replica, "profile"
    return CONSERVATIVE_SERVICE_RATE, "default"


#: a pool that turns work away while its ready replicas are at least this busy gets one more
#: (against the smoothed arrival rate, which a burst's first tick shows at about half)
SHED_LOAD = 0.25


def demand_policy(ctx: PoolContext) -> PoolResult:
    """Replicas that keep up with arrivals and drain the lag in target_backlog_drain_s; and
    one more than are ready while admission turns away work this pool held back most
    (``admission.bottleneck``) and its replicas are busy (at least ``SHED_LOAD``): the mean
    demand fits, but the queueing its variance makes does not fit the deadlines (at 80% of a
    replica's rate requests wait, on average, twice their own service time). One at a time:
    the next once that one is ready and work is still turned away. A pool nearly idle that
    turns work away (deadlines too short for anything) gets nothing: more replicas would not
    help."""
    obs, cfg = ctx.obs, ctx.config
    rate, source = service_rate(ctx.spec, obs)
    # Without a measured or profiled rate, size by the backlog alone: a one-off task is both
    # lag and a (noisy) arrival rate, and counting it twice at a guessed rate starts several
    # replicas for one task. Once a rate is known, arrivals count too.
    arrivals = obs.arrival_rate if source != "default" else 0.0
    demand = arrivals + obs.lag / cfg.target_backlog_drain_s
    # Round before ceil so float noise (2.0000000001) does not add a replica.
    need = math.ceil(round(demand * cfg.headroom / rate, 9))
    reason = (
        f"lag {obs.lag} needs {need} "
        f"({obs.arrival_rate:.3g}/s in, {rate:.3g}/s per replica, {source})"
    )
    load = obs.arrival_rate / (obs.ready * rate) if obs.ready else 0.0
    if obs.held_rate > 0 and load >= SHED_LOAD and need <= obs.ready:
        need = obs.ready + 1
        reason += f"; {obs.held_rate:.3g}/s turned away at load {load:.2f}: {need}"
    return PoolResult(need, reason, ctx.state)


def _in_window(t_s: float, now_s: float, window_s: float) -> bool:
    # Half-open (now - window, now]: a 1 s window at 0.5 s ticks holds exactly two ticks.
    return t_s > now_s - window_s + _EPS


def _window_max(history: tuple[tuple[float, int], ...], now_s: float, window_s: float) -> int:
    return max(r for t, r in history if _in_window(t, now_s, window_s))


def with_windows(inner: PoolPolicy) -> PoolPolicy:
    """Fast up, slow down: up to the burst-window max at once (after upscale_delay_s); down
    only to the stable-window max, once that window is full and downscale_delay_s has passed
    since the last scale-up. A load that swings faster than the stable window therefore holds
    the replica count at its peak need instead of flapping."""

    def policy(ctx: PoolContext) -> PoolResult:
        rec = inner(ctx)
        cfg, st, now = ctx.config, ctx.state, ctx.now_s
        kept = tuple((t, r) for t, r in st.history if _in_window(t, now, cfg.stable_window_s))
        history = (*kept, (now, rec.replicas))
        burst = _window_max(history, now, cfg.burst_window_s)
        peak = _window_max(history, now, cfg.stable_window_s)
        # Shrink no lower than the floor, so "down to N" names the count we will really reach.
        floor = floor_replicas(ctx)
        stable = max(peak, floor)
        why_stable = (
            f"max need {peak} over {cfg.stable_window_s:g}s" if peak >= floor else f"min {floor}"
        )
        current = ctx.obs.replicas
        want_up_since = None
        if burst > current:
            want_up_since = now if st.want_up_since_s is None else st.want_up_since_s
            wait_s = want_up_since + cfg.upscale_delay_s - now
            if wait_s <= _EPS:
                target, reason = burst, f"burst: {rec.reason}"
                if burst > rec.replicas:
                    reason += f"; {burst} within {cfg.burst_window_s:g}s"
            else:
                target, reason = current, f"up to {burst} in {wait_s:.1f}s: {rec.reason}"
        elif stable < current:
            calm_since = st.first_seen_s if st.last_scale_up_s is None else st.last_scale_up_s
            down_at = max(calm_since + cfg.downscale_delay_s, st.first_seen_s + cfg.stable_window_s)
            if now >= down_at - _EPS:
                target, reason = stable, f"down: {why_stable}; {rec.reason}"
            else:
                target = current
                reason = f"hold: down to {stable} in {down_at - now:.1f}s; {rec.reason}"
        else:
            target, reason = current, f"steady: {why_stable}; {rec.reason}"
        state = replace(rec.state, history=history, want_up_since_s=want_up_since)
        return PoolResult(target, reason, state)

    return policy


def floor_replicas(ctx: PoolContext) -> int:
    """The least a pool may have now: min, or 0 for an idle scale-to-zero pool."""
    spec, obs, st = ctx.spec, ctx.obs, ctx.state
    active = obs.lag > 0 or obs.arrival_rate > 0
    if spec.scale_to_zero and not active:
        idle_since = st.first_seen_s if st.last_active_s is None else st.last_active_s
        # A pool already at zero stays there until work comes: no reason to start it.
        if obs.replicas == 0 or ctx.now_s - idle_since >= ctx.config.scale_to_zero_after_s - _EPS:
            return 0
    # With work queued a pool always gets a replica (the cold-start path), whatever its min.
    return max(spec.min_replicas, 1)


def with_bounds(inner: PoolPolicy) -> PoolPolicy:
    """Clamp to [floor, max_replicas]; applied after the delays, so bounds act at once."""

    def policy(ctx: PoolContext) -> PoolResult:
        rec = inner(ctx)
        spec, obs, now = ctx.spec, ctx.obs, ctx.now_s
        active = obs.lag > 0 or obs.arrival_rate > 0
        state = replace(rec.state, last_active_s=now if active else ctx.state.last_active_s)
        floor = floor_replicas(ctx)
        target, reason = rec.replicas, rec.reason
        if target > spec.max_replicas:
            target, reason = spec.max_replicas, f"max {spec.max_replicas}: {reason}"
        if target < floor:
            if not (obs.replicas == 0 and active):
                reason = f"min {floor}: {reason}"
            target = floor
        if obs.replicas == 0 and active and target > 0:
            reason = f"cold start: lag {obs.lag} at 0 replicas; {reason}"
        if target == 0 and obs.replicas > 0:
            idle_since = state.first_seen_s if state.last_active_s is None else state.last_active_s
            reason = f"scale to zero: idle {now - idle_since:.0f}s; {reason}"
        return PoolResult(target, reason, state)

    return policy


DEFAULT_POLICY: PoolPolicy = with_bounds(with_windows(demand_policy))


def backlog_cost(
    spec: PoolSpec, obs: PoolObservation, config: PolicyConfig, replicas: int
) -> float:
    """Weighted backlog per unit of service: the pool with the highest cost is the bottleneck."""
    work = obs.workflow_weight * (obs.lag + obs.arrival_rate * config.target_backlog_drain_s)
    if work <= 0:
        return 0.0
    if replicas <= 0:
        return math.inf
    return work / (service_rate(spec, obs)[0] * replicas)


def allocate(
    wanted: Mapping[str, int],
    floors: Mapping[str, int],
    current: Mapping[str, int],
    cost: Callable[[str, int], float],
    fits_budget: Callable[[Mapping[str, int]], bool],
) -> dict[str, int]:
    """Fit ``wanted`` into the budget. Every pool keeps its floor and what it has and still
    needs; spare room goes one replica at a time to the pool with the highest ``cost(pool,
    replicas)``. Only when that does not fit (the budget shrank) are replicas shed, from the
    pool whose cost after losing one is lowest. Ties favour the alphabetically first pool."""
    if fits_budget(wanted):
        return dict(wanted)
    alloc = {p: max(floors[p], min(wanted[p], current[p])) for p in sorted(wanted)}
    while not fits_budget(alloc):
        above = [p for p in alloc if alloc[p] > floors[p]] or [p for p in alloc if alloc[p] > 0]
        if not above:
            break
        victim = max(above, key=lambda p: (-cost(p, alloc[p] - 1), p))
        alloc[victim] -= 1
    hungry = {p for p in alloc if alloc[p] < wanted[p]}
    while hungry:
        best = min(hungry, key=lambda p: (-cost(p, alloc[p]), p))
        trial = {**alloc, best: alloc[best] + 1}
        if fits_budget(trial):
            alloc = trial
            if alloc[best] >= wanted[best]:
                hungry.discard(best)
        else:  # allocations only grow, so a pool that does not fit now never will this tick
            hungry.discard(best)
    return alloc


def _budget_check(
    pools: Mapping[str, PoolSpec], budget: Budget
) -> Callable[[Mapping[str, int]], bool]:
    devices = budget.device_list()

    def fits_budget(alloc: Mapping[str, int]) -> bool:
        slots = sum(pools[p].slots_per_replica * n for p, n in alloc.items())
        return slots <= budget.slots and (devices is None or fits(alloc, pools, devices))

    return fits_budget


def decide(
    now_s: float,
    pools: dict[str, PoolSpec],
    observations: dict[str, PoolObservation],
    budget: Budget,
    state: PolicyState | None,
    config: PolicyConfig = DEFAULT_CONFIG,
    *,
    policy: PoolPolicy = DEFAULT_POLICY,
) -> Decision:
    """One tick: per-pool ``policy``, then the global budget. Observations of pools not in
    ``pools`` are ignored; pools without an observation keep their last count (or min)."""
    state = state or PolicyState()
    if state.now_s is not None and now_s < state.now_s:
        raise ValueError(f"time went backwards: {now_s} < {state.now_s}")
    wanted: dict[str, int] = {}
    floors: dict[str, int] = {}
    current: dict[str, int] = {}
    reasons: dict[str, str] = {}
    new_states: dict[str, PoolState] = {}
    for name in sorted(pools):
        spec = pools[name]
        if spec.name != name:
            raise ValueError(f"pool key {name!r} names spec {spec.name!r}")
        old = state.pools.get(name)
        obs = observations.get(name)
        if obs is None:
            keep = spec.min_replicas if old is None or old.replicas is None else old.replicas
            low = 0 if spec.scale_to_zero else spec.min_replicas
            keep = min(max(keep, low), spec.max_replicas)
            wanted[name] = floors[name] = current[name] = keep
            reasons[name] = f"no observation: keep {keep}"
            if old is not None:
                new_states[name] = replace(old, replicas=keep)
            continue
        ctx = PoolContext(now_s, spec, obs, config, old or PoolState(first_seen_s=now_s))
        result = policy(ctx)
        wanted[name], reasons[name], new_states[name] = result.replicas, result.reason, result.state
        floors[name] = min(floor_replicas(ctx), result.replicas)
        current[name] = obs.replicas

    def cost(name: str, replicas: int) -> float:
        obs = observations.get(name)
        return 0.0 if obs is None else backlog_cost(pools[name], obs, config, replicas)

    fits_budget = _budget_check(pools, budget)
    if config.keep_idle:
        kept = {name: max(wanted[name], current[name]) for name in wanted}
        if kept != wanted and fits_budget(kept):
            for name in wanted:
                if kept[name] > wanted[name]:
                    reasons[name] += f"; kept {kept[name]}: nothing else needs the room"
            wanted = floors = kept
    final = allocate(wanted, floors, current, cost, fits_budget)

    for name, count in final.items():
        if count < wanted[name]:
            reasons[name] += f"; budget: {count} of {wanted[name]}"
        obs = observations.get(name)
        if obs is None or name not in new_states:
            continue
        st = replace(new_states[name], replicas=count)
        if count > obs.replicas:
            st = replace(st, last_scale_up_s=now_s)
        elif count < obs.replicas:
            st = replace(st, last_scale_down_s=now_s)
        new_states[name] = st
    return Decision(
        replicas=final, reasons=reasons, state=PolicyState(now_s=now_s, pools=new_states)
    )
