"""What both locustfiles share: their options, the tenant -> workflow mapping, the request body
and the users' behaviour. A concrete user only says how to ``send`` one request.

Two modes:

- closed loop (no ``--trace``): each of the ``-u`` users sends ``--workflow`` requests back to
  back, so the concurrency is the user count;
- open loop (``--trace FILE``): the trace's arrivals are sent at their times whatever the
  responses. The users of a process pull arrivals from one shared schedule, sleep until each
  one's time and fire it in a greenlet of its own, so a slow response never delays the next
  send (one user is enough; more change nothing). When the trace is done and its requests
  have ended, the test stops. A distributed run would replay the trace once per worker: run a
  replay in one process (the default).

Options (or the environment variables in brackets): ``--trace FILE`` (LOCUST_TRACE),
``--time-scale K`` (LOCUST_TIME_SCALE: the trace's gaps divided by K), ``--tenants
A=txt2img,B=txt2img`` (LOCUST_TENANTS; default: every tenant -> ``--workflow``),
``--workflow`` (LOCUST_WORKFLOW, txt2img), ``--prompt``, ``--steps`` (default: the workflow's)
and ``--request-timeout`` seconds (60).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import locust.stats
from locust import User, constant, events, task
from locust.env import Environment
from locust.exception import StopUser

log = logging.getLogger(__name__)

DEFAULT_WORKFLOW = "txt2img"


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("LegoDiffusion")
    group.add_argument("--trace", default="", env_var="LOCUST_TRACE",
                       help="replay this trace file (TENANT INTERVAL per line) as an open loop")
    group.add_argument("--time-scale", type=float, default=1.0, env_var="LOCUST_TIME_SCALE",
                       help="divide the trace's gaps by this factor")
    group.add_argument("--tenants", default="", env_var="LOCUST_TENANTS",
                       help="tenant to workflow map, e.g. A=txt2img,B=img2img "
                            "(default: every tenant sends --workflow)")
    group.add_argument("--workflow", default=DEFAULT_WORKFLOW, env_var="LOCUST_WORKFLOW",
                       help="workflow of the closed loop and of unmapped tenants")
    group.add_argument("--prompt", default="a red fox in the snow", env_var="LOCUST_PROMPT")
    group.add_argument("--steps", type=int, default=None, env_var="LOCUST_STEPS",
                       help="denoising steps (default: the workflow's)")
    group.add_argument("--request-timeout", type=float, default=60.0,
                       env_var="LOCUST_REQUEST_TIMEOUT",
                       help="seconds before a request counts as failed")


def parse_tenants(text: str) -> dict[str, str]:
    """``"A=txt2img,B=img2img"`` -> ``{"A": "txt2img", "B": "img2img"}``."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        tenant, sep, workflow = item.partition("=")
        if not sep or not tenant.strip() or not workflow.strip():
            raise ValueError(f"--tenants: expected TENANT=WORKFLOW, got {item!r}")
        mapping[tenant.strip()] = workflow.strip()
    return mapping


@dataclass(frozen=True)
class LoadOptions:
    trace: Path | None = None
    time_scale: float = 1.0
    tenants: dict[str, str] = field(default_factory=dict)
    workflow: str = DEFAULT_WORKFLOW
    prompt: str = "a red fox in the snow"
    steps: int | None = None
    request_timeout_s: float = 60.0

    @classmethod
    def of(cls, environment: Environment) -> LoadOptions:
        parsed = environment.parsed_options
        if parsed is None:  # Locust used as a library: the defaults
            return cls()
        if parsed.time_scale <= 0:
            raise ValueError(f"--time-scale must be > 0, got {parsed.time_scale}")
        return cls(
            trace=Path(parsed.trace) if parsed.trace else None,
            time_scale=parsed.time_scale,
            tenants=parse_tenants(parsed.tenants),
            workflow=parsed.workflow,
            prompt=parsed.prompt,
            steps=parsed.steps,
            request_timeout_s=parsed.request_timeout,
        )

    def workflow_of(self, tenant: str) -> str:
        return self.tenants.get(tenant, self.workflow)

    def request_body(self, workflow: str) -> dict[str, Any]:
        """A generation request (the same JSON over HTTP and NATS), with a fresh seed."""
        body: dict[str, Any] = {"workflow": workflow, "prompt": self.prompt,
                                "seed": random.randrange(2**32)}
        if self.steps is not None:
            body["steps"] = self.steps
        return body


class TraceReplay:
    """The arrivals of a trace, handed out in order to the users of one process, and the
    greenlets of the requests in flight."""

    def __init__(self, options: LoadOptions) -> None:
        from emulation.traces import load_trace, speed_up  # see loadtest/__init__.py

        assert options.trace is not None
        self.arrivals = speed_up(load_trace(options.trace), options.time_scale)
        unmapped = {a.tenant for a in self.arrivals} - set(options.tenants)
        if options.tenants and unmapped:
            raise ValueError(f"--tenants maps no workflow for tenants {sorted(unmapped)} "
                             f"of {options.trace}")
        self.options = options
        self.inflight = gevent.pool.Group()
        self.max_lag_s = 0.0
        self._next = 0
        self._started_at: float | None = None
        self._ended = False

    def take(self) -> tuple[float, str] | None:
        """The next arrival as (monotonic send time, workflow); None when the trace is done."""
        if self._started_at is None:
            self._started_at = time.monotonic()
        if self._next >= len(self.arrivals):
            return None
        arrival = self.arrivals[self._next]
        self._next += 1
        return self._started_at + arrival.at_s, self.options.workflow_of(arrival.tenant)

    def finish(self, environment: Environment) -> None:
        """Wait for the requests in flight, then stop the test (once)."""
        self.inflight.join()
        if self._ended:
            return
        self._ended = True
        log.info("trace %s replayed: %d requests, each sent at most %.1f ms late",
                 self.options.trace, len(self.arrivals), self.max_lag_s * 1000)
        parsed = environment.parsed_options
        runner = environment.runner
        if runner is not None:  # in its own greenlet: stopping kills the users, this one too
            gevent.spawn(runner.quit if parsed is not None and parsed.headless else runner.stop)


_replay: TraceReplay | None = None


@events.init.add_listener
def _check_options(environment: Environment, **_: Any) -> None:
    """Fail at start-up, not in every task, on a bad option or trace file."""
    options = LoadOptions.of(environment)
    if options.trace is not None:
        TraceReplay(options)
    # gevent's timers count from when its loop last read the clock, before Locust's start-up
    # and ours: without this, the --run-time timer, set next, would start seconds in the past
    gevent.get_hub().loop.update_now()


@events.test_stop.add_listener
def _reset_replay(**_: Any) -> None:
    """A stopped test drops its requests in flight; the next start replays from the top."""
    global _replay
    if _replay is not None:
        _replay.inflight.kill(block=False)
        _replay = None


@events.quitting.add_listener
def _write_last_csv(environment: Environment, **_: Any) -> None:
    """Locust rewrites the ``--csv`` files every CSV_STATS_INTERVAL_SEC and not at exit, so a
    run's last second would be missing: let its writer do one more round."""
    if environment.parsed_options is not None and environment.parsed_options.csv_prefix:
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


class LegoUser(User):
    """Sends generation requests: closed loop, or one share of a trace's open loop."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        self.options = LoadOptions.of(self.environment)

    def send(self, workflow: str) -> None:
        """Send one request, wait for its end and report it to Locust's ``request`` event."""
        raise NotImplementedError

    @task
    def generate(self) -> None:
        global _replay
        if self.options.trace is None:
            self.send(self.options.workflow)
            return
        if _replay is None:
            _replay = TraceReplay(self.options)
        replay = _replay
        taken = replay.take()
        if taken is None:
            replay.finish(self.environment)
            raise StopUser()
        send_at, workflow = taken
        gevent.sleep(max(0.0, send_at - time.monotonic()))
        replay.max_lag_s = max(replay.max_lag_s, time.monotonic() - send_at)
        replay.inflight.spawn(self.send, workflow)
