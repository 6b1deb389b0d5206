"""Liveness: a node process that is stuck ends itself, so its supervisor replaces it.

Readiness says a replica serves; liveness says it still makes progress. Every loop of a device
host survives errors by design (they log, back off and go on), so what can still go wrong is a
stall: a step that never returns (a wedged driver, a deadlock in a model) or an event loop
blocked so long that the replica neither fetches nor sends its in-progress acks. A watchdog
thread, outside the event loop, checks both once a second; past ``liveness_timeout_s`` it logs
why and ends the process with ``EXIT_STUCK``. Whatever supervises it (`lego up`, the
autoscaler's local backend, Kubernetes) starts a new one, and JetStream redelivers the tasks the
stuck one held after the ack wait: a stall costs a restart, never a wedged pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: the exit status of a process that ended itself for being stuck
EXIT_STUCK = 70
_tickers: set[asyncio.Task] = set()  # referenced, so that they are not collected


class Liveness:
    """What the watchdog watches: the event loop's last tick and the step in progress."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.ticked_at = clock()
        self.step_since: float | None = None

    def tick(self) -> None:
        """The event loop ran (called from it, about once a second)."""
        self.ticked_at = self.clock()

    def step_started(self) -> None:
        self.step_since = self.clock()

    def step_ended(self) -> None:
        self.step_since = None

    def stuck(self) -> str | None:
        """Why the process is stuck, or None while it makes progress (or with no timeout)."""
        if self.timeout_s <= 0:
            return None
        now = self.clock()
        if self.step_since is not None and now - self.step_since > self.timeout_s:
            return f"a step has run for {now - self.step_since:.0f} s"
        if now - self.ticked_at > self.timeout_s:
            return f"the event loop has not run for {now - self.ticked_at:.0f} s"
        return None


def watch(liveness: Liveness, name: str, *, period_s: float = 1.0,
          exit: Callable[[int], None] = os._exit) -> threading.Thread:
    """From the event loop: tick ``liveness`` every ``period_s`` from it, and start the
    watchdog thread, which, once ``liveness`` is stuck, logs why and calls ``exit``."""

    async def ticker() -> None:
        while True:
            liveness.tick()
            await asyncio.sleep(period_s)

    _tickers.add(task := asyncio.get_running_loop().create_task(ticker()))
    task.add_done_callback(_tickers.discard)

    def run() -> None:
        while True:
            time.sleep(period_s)
            why = liveness.stuck()
            if why is not None:
                log.critical("%s is stuck (%s, past liveness_timeout_s %g s): exiting so that "
                             "it is replaced", name, why, liveness.timeout_s)
                logging.shutdown()
                exit(EXIT_STUCK)
                return

    thread = threading.Thread(target=run, name=f"liveness-{name}", daemon=True)
    thread.start()
    return thread
