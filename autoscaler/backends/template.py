"""A template process that forks node processes with their imports done: new replicas in a
fraction of a second plus their weights, instead of seconds of imports first.

A ``lego node`` process spends most of its start importing torch, transformers and diffusers
(about 6 s of the 6.3 s to ready on the 2-core CPU host, for a tiny model). The local backend
therefore starts one template process beside the autoscaler: it imports what a node imports
(and the classes of the base model's components), says it is ready, and from then on forks
each replica the backend asks for. The child starts as a fresh ``lego node`` would: its own
session, its log as stderr, its environment, the death signal set to its parent (the
template, which itself ends with the autoscaler), then ``lego.cli.main``. Nothing has run a
tensor operation or started a thread in the template, so the fork is clean (CUDA is not
initialised before a child picks its device; OpenMP reads ``OMP_NUM_THREADS`` at import, so
the template is started with the nodes' value).

The protocol, one JSON object a line: the backend writes ``{"args": [...], "env": {...},
"log": PATH}``; the template answers ``{"pid": N}`` (or ``{"error": ...}``), and reports
``{"exited": N, "code": C}`` when a child it forked ends (negative: killed by that signal,
as ``subprocess`` says). Until the template is ready (or if it cannot start, or dies) the
backend starts plain processes, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from common.lifetime import child_options, set_death_signal

log = logging.getLogger(__name__)

#: how long the backend waits for the template's answer to one fork
ANSWER_TIMEOUT_S = 5.0


# --- the template process ---------------------------------------------------------------------


def _preimport() -> None:
    """What a node imports before it loads weights, and the base model's classes."""
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import lego.cli  # noqa: F401
    import services.node  # noqa: F401
    from common.models import resolve_model_dir
    from common.settings import Settings
    from services.core import import_classes

    settings = Settings()
    with contextlib.suppress(Exception):  # the nodes that need it report why it is missing
        import_classes(resolve_model_dir(settings.base_model, settings.cache_dir / "models"))


def _say(message: dict[str, Any]) -> None:
    os.write(1, orjson.dumps(message) + b"\n")  # one write: lines never interleave


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the node process the request describes; never returns."""
    code = 1
    try:
        import common

        common.STARTED_AT = time.monotonic()  # its start ends here: the rest is its own work
        os.setsid()
        set_death_signal(signal.SIGTERM)
        null = os.open(os.devnull, os.O_RDWR)
        logfile = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(logfile, 2)
        os.close(null)
        os.close(logfile)
        os.environ.clear()  # the node's settings come from its own environment
        os.environ.update(request["env"])
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        sys.argv = ["lego", *request["args"]]
        from lego.cli import main

        code = main(request["args"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in its log, as a crashed process would
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _say({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def serve() -> None:
    """The template's loop: fork a node per request line on stdin, until stdin closes."""
    _preimport()
    _say({"ready": os.getpid()})
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.2)
        _reap(children)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:  # the backend closed it: its replicas end with us (their death signal)
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                request = orjson.loads(line)
                pid = os.fork()
            except Exception as exc:  # noqa: BLE001 - a bad line, or no memory to fork
                _say({"error": f"{type(exc).__name__}: {exc}"})
                continue
            if pid == 0:
                _child(request)
            children.add(pid)
            _say({"pid": pid})


# --- the backend's side -----------------------------------------------------------------------


class ForkedProcess:
    """A node process the template forked, seen as a ``subprocess.Popen`` is (``pid``,
    ``poll``, ``send_signal``, ``kill``, ``wait``): its exit comes from the template's report;
    if the template is gone, from whether the pid still runs (code -1 then)."""

    def __init__(self, pid: int, template: Template) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._template = template

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self._template.exits.get(self.pid)
            if code is not None:
                self.returncode = code
            elif not self._template.alive() and not _running(self.pid):
                self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.05)
        return code


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Template:
    """The backend's handle on its template process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.exits: dict[int, int] = {}
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._closing = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "autoscaler.backends.template"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(log_path, "ab"),  # noqa: SIM115 - the child owns it
            **child_options(env),
        )
        threading.Thread(target=self._read, name="template-reader", daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "ready" in message:
                self._ready.set()
            elif "exited" in message:
                self.exits[message["exited"]] = message["code"]
            else:
                self._answers.put(message)
        self._ready.clear()
        if not self._closing:
            log.warning("the template process ended (%s); node processes start from scratch",
                        self._proc.wait())

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.alive()

    def alive(self) -> bool:
        return self._proc.poll() is None

    def fork(self, args: list[str], env: dict[str, str], log_path: Path) -> ForkedProcess:
        """A new node process running ``lego args``; raises if the template cannot fork."""
        env = {**env, "LEGO_PARENT_PID": str(self._proc.pid)}  # its parent: the template
        request = orjson.dumps({"args": args, "env": env, "log": str(log_path)}) + b"\n"
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
            answer = self._answers.get(timeout=ANSWER_TIMEOUT_S)
        if "pid" not in answer:
            raise RuntimeError(answer.get("error", f"unexpected answer {answer}"))
        return ForkedProcess(answer["pid"], self)

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    serve()
