"""How the processes of a stack end together, however they are stopped (Linux).

A stack is a tree of processes: `lego up` starts nats-server, the gateway, the autoscaler (and
device hosts); the autoscaler's local backend starts node replicas. A `lego` process starts
every child with ``child_options``:

- in a session of its own, so a terminal's Ctrl-C (SIGINT to its foreground process group)
  reaches only the parent, which stops its children in order, nats-server last;
- with PR_SET_PDEATHSIG: the kernel sends the child SIGTERM when its parent dies, even of
  SIGKILL;
- with ``LEGO_PARENT_PID`` (``Settings.parent_pid``), so a `lego` child runs ``watch_parent``: a
  thread that notices the parent is gone (also where the death signal was lost: it follows the
  thread that forked), asks the process to stop (SIGTERM to itself, unless the kernel sent it)
  and ends it once it cannot drain anyway (NATS unreachable for ``NATS_GONE_S``) or at the
  latest after ``drain_timeout_s``.

``ProcessTree`` follows processes and their descendants through /proc, so a parent can SIGKILL
what remains of its children's trees at a deadline, grandchildren included, even once their
own parent is gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: NATS unreachable this long: nothing held can be acked any more, so draining is over
NATS_GONE_S = 2.0
_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def _load_prctl() -> Any:
    # looked up in the parent: nothing is loaded between fork and exec
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_prctl = _load_prctl()


def set_death_signal(sig: int) -> None:
    """Have the kernel send this process ``sig`` when its parent dies (Linux; else nothing)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, sig)


def child_options(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keyword arguments for a child that ends with this process: its own
    session, SIGTERM when this process dies, and (with ``env``) ``LEGO_PARENT_PID`` in a copy of
    ``env`` for ``watch_parent``."""
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, before exec
        set_death_signal(signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the death signal was set
            os._exit(1)

    options: dict[str, Any] = {"start_new_session": True, "preexec_fn": die_with_parent}
    if env is not None:
        options["env"] = {**env, "LEGO_PARENT_PID": str(parent)}
    return options


def _death_signal() -> int:
    """The signal the kernel sends this process when its parent dies (0: none)."""
    if _prctl is None:
        return 0
    sig = ctypes.c_int(0)
    _prctl(_PR_GET_PDEATHSIG, ctypes.byref(sig))
    return sig.value


def watch_parent(
    parent_pid: int | None, *, can_drain: Callable[[], bool], drain_timeout_s: float
) -> threading.Thread | None:
    """In a child started with ``child_options``: once ``parent_pid`` is no longer this
    process's parent, stop (SIGTERM to itself, unless the kernel sent it), then end the process
    when ``can_drain()`` (NATS reachable) has been false for ``NATS_GONE_S`` or
    ``drain_timeout_s`` has passed. None: no parent to watch."""
    if parent_pid is None:
        return None
    thread = threading.Thread(target=_watch, args=(parent_pid, can_drain, drain_timeout_s),
                              name="watch-parent", daemon=True)
    thread.start()
    return thread


def _watch(parent_pid: int, can_drain: Callable[[], bool], drain_timeout_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_POLL_S)
    log.warning("parent process %d is gone: stopping", parent_pid)
    if _death_signal() == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + drain_timeout_s
    cut_off_since: float | None = None
    while (now := time.monotonic()) < deadline:
        if can_drain():
            cut_off_since = None
        elif cut_off_since is None:
            cut_off_since = now
        elif now - cut_off_since >= NATS_GONE_S:
            log.warning("NATS is gone with the parent: nothing left to drain; exiting")
            break
        time.sleep(_POLL_S)
    else:
        log.warning("still draining %.0f s after the parent died; exiting", drain_timeout_s)
    logging.shutdown()
    os._exit(1)


def stat_fields(pid: int | str = "self") -> list[str]:
    """The fields of /proc/PID/stat after the command's name: [0] its state, [1] its parent's
    pid, [19] its start time in clock ticks since boot. ``OSError`` once it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process /proc lists."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
        except (OSError, IndexError):  # exited meanwhile
            continue
        table[int(entry.name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


class ProcessTree:
    """Processes followed with their descendants: a pid is known with its start time (a reused
    pid is another process), and stays followed after its parent is gone."""

    def __init__(self, pids: Iterable[int]) -> None:
        table = _table()
        self._known = {pid: table[pid][1] for pid in pids if pid in table}

    def refresh(self) -> list[int]:
        """Take in every descendant of a followed process; the ones still running (zombies are
        not)."""
        table = _table()
        self._known = {pid: started for pid, started in self._known.items()
                       if pid in table and table[pid][1] == started}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(self._known)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in self._known:
                    self._known[child] = table[child][1]
                    todo.append(child)
        return [pid for pid in self._known if table[pid][2] not in ("Z", "X")]

    def kill(self) -> list[int]:
        """SIGKILL every running process of the tree; the pids killed."""
        alive = self.refresh()
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return alive
