"""The systems compared on the emulated cluster, as settings of one stack.

Every system runs the same processes (gateway with ingress, the autoscaler process hosting the
emulated replicas, NATS, the tensor store) on the same emulated devices; they differ only in
what is a replica and who decides where replicas run:

- ``micro``: one pool per model, shared by every workflow; our autoscaler; admission control.
- ``mono-autoscale``: one pool per workflow (a whole pipeline per replica, one per device);
  our autoscaler; admission control.
- ``static``: whole pipelines on a fixed split of the devices, in proportion to each workflow's
  share of the work (3/3/2 on Flux-3, as in the paper); never rescaled.
- ``shepherd``: the Shepherd-like 4/2/2 split (Flux-3 only).
- ``swap``: Clockwork-like; every device may run every workflow: each workflow has a replica on
  every device, loaded when it runs, evicting the least recently used pipelines (whole
  pipelines, at their profiled load times).

The baselines only drop requests already past their deadline (the runner does this for every
system); they do not reject at the door.
"""

from __future__ import annotations

from pathlib import Path

from common.settings import Settings
from emulation.profiles import DEFAULT_PROFILE_DIR, EMULATED_DEVICE_BYTES
from emulation.traces import trace_for_scale
from emulation.workloads import flux3_split, load_workload, micro_provision, static_split

SYSTEMS = ("micro", "static", "swap", "shepherd", "mono-autoscale")


def emulated_settings(
    base: Settings, *, system: str | None = None, workload: str | None = None,
    devices: int | None = None, profile_dir: Path | None = None,
    time_scale: float | None = None,
) -> Settings:
    """``base`` set up to run ``system`` on ``workload`` over ``devices`` emulated GPUs."""
    system = system or "micro"
    if system not in SYSTEMS:
        raise ValueError(f"system: unknown {system!r}; known: {', '.join(SYSTEMS)}")
    workload = workload or "flux3"
    n = devices or 8
    ids = [f"emu:{i}" for i in range(n)]
    profile_dir = profile_dir or base.profile_dir or DEFAULT_PROFILE_DIR
    loaded = load_workload(workload, profile_dir, time_scale or 1.0)
    update: dict = {
        # every process of the stack imports the plug-in: it registers the emulated pieces
        "plugins": list(dict.fromkeys([*base.plugins, "emulation"])),
        "workload": workload, "devices": ids, "device_memory_bytes": EMULATED_DEVICE_BYTES,
        # the autoscaler reacts on the emulated clock too
        "autoscale_tick_s": max(0.05, base.autoscale_tick_s / (time_scale or 1.0)),
        "scale_down_delay_s": base.scale_down_delay_s / (time_scale or 1.0),
        "admission_sample_s": max(0.05, base.admission_sample_s / (time_scale or 1.0)),
        "host_eligible_s": base.host_eligible_s / (time_scale or 1.0),
        "parallel_window_s": base.parallel_window_s / (time_scale or 1.0),
        # a task fetched by a host that got busy may be handed on past every other device
        "host_max_handoffs": max(base.host_max_handoffs, n),
        "profile_dir": profile_dir, "time_scale": time_scale or 1.0, "workflows": [],
        "slo_min_s": 0.0, "autoscale": True, "max_replicas": n,
        "monolithic": system != "micro", "admission": system in ("micro", "mono-autoscale"),
        "swap": system == "swap", "assignment": {}, "replicas": {}, "initial_replicas": {},
        # the baselines serve one pipeline after another, first come first served, and drop
        # a request only once its deadline has passed (as the paper's artifact runs them)
        "host_scheduler": "least_slack" if system == "micro" else "fifo",
        "drop_doomed": system == "micro",
        # attainment counts a request rejected and one dropped late alike, so admission holds
        # its estimate alone against the deadline, as the paper's systems do, without the
        # margin a service widens to keep its promise to the requests it admits
        "admission_miss_target": 1.0,
        # a fixed cluster: an idle device costs nothing, so pools shrink only for another's need
        "keep_idle_replicas": True, "exclusive_kinds": base.exclusive_kinds,
        "one_per_device_kinds": base.one_per_device_kinds,
        # replicas of one (emulated) GPU each batch as the profiles allow
        "max_batch": base.max_batch,
    }
    pools = {name: spec.monolithic_pool() for name, spec in loaded.workflows.items()}
    shares = loaded.shares(trace_for_scale(1.0))
    if system == "shepherd" and workload != "flux3":
        raise ValueError("shepherd: the Shepherd-like 4/2/2 split is defined for flux3 only")
    if workload == "flux3":
        split = flux3_split(loaded, "shepherd" if system == "shepherd" else "static", ids)
    else:
        split = static_split(loaded, shares, ids, EMULATED_DEVICE_BYTES)
    if system == "micro":
        # one device host per GPU, serving every model resident on it and running the most
        # urgent step next; the autoscaler decides residency, starting from copies in
        # proportion to each model's expected work and filling memory from there
        update["device_hosts"] = True
        update["initial_replicas"] = micro_provision(loaded, shares, n, small_devices=0)
        update["exclusive_kinds"] = []
        update["one_per_device_kinds"] = []
    elif system == "mono-autoscale":
        # one pipeline per device: the static split's dedicated replicas to start with; every
        # pipeline may go to zero (Mix-12 has more workflows than devices) and cold-start
        exclusive = {w: devs for w, devs in split.items() if len(devs) > 1
                     or sum(d == devs[0] for ds in split.values() for d in ds) == 1}
        update["initial_replicas"] = {pools[w]: len(d) for w, d in exclusive.items()}
        if workload != "flux3":
            update["replicas"] = dict.fromkeys(pools.values(), 0)
    elif system in ("static", "shepherd"):
        update["assignment"] = {pools[w]: devs for w, devs in split.items()}
    elif system == "swap":
        update["assignment"] = {pool: list(ids) for pool in pools.values()}
    return base.model_copy(update=update)
