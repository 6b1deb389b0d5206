"""Stopping `lego up` the ways people stop programs: Ctrl-C in its terminal (SIGINT to the process
group), SIGTERM to `lego up` alone, SIGTERM to every process of the stack (systemd, containers),
SIGKILL to `lego up`, and a Ctrl-C while the stack is still starting. Each way ends within the
stop bound and leaves no process of the tree behind; an orderly stop keeps NATS up until every
other process has ended.

Each test starts a real `lego up` (embedded nats-server, gateway, autoscaler and one node
process: txt2img with its denoiser and decoder pools at zero) in a session of its own, as a
terminal would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from common.settings import Settings
from lego.stack import free_port

pytestmark = pytest.mark.timeout(180)

#: the stop bound (``stop_timeout_s``), and what a loaded 2-core machine may add to it
BOUND_S = Settings.model_fields["stop_timeout_s"].default
SLACK_S = 5.0
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Up:
    """A `lego up` process and every process of its tree seen so far (reparented ones too)."""

    proc: subprocess.Popen
    out: Path
    logs: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def tree(self) -> list[psutil.Process]:
        """`lego up` and its descendants now; remembered for ``remaining``."""
        try:
            root = psutil.Process(self.proc.pid)
            found = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        for p in found:
            self.seen.setdefault(p.pid, p)
        return found

    def remaining(self) -> list[psutil.Process]:
        """Every process ever seen in the tree that still runs (a zombie does not)."""
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def wait_until(self, predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.tree()
            if self.proc.poll() is not None:
                raise AssertionError(f"lego up exited with {self.proc.returncode} before "
                                     f"{what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} in {timeout_s:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.1)

    def nodes(self) -> list[psutil.Process]:
        """The processes that hold models: `lego up`'s device hosts (or node processes)."""
        found = []
        for p in self.tree():
            try:
                if p.cmdline()[3:4] in (["host"], ["node"]):  # python -m lego.cli host ...
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def ended_within(self, timeout_s: float) -> float:
        """Seconds until `lego up` and every process of its tree ended; fails past
        ``timeout_s``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.remaining():
                took_s = time.monotonic() - started
                self.proc.wait(5)  # a zombie already: reaped at once
                return took_s
            time.sleep(0.05)
        left = [f"{p.pid} {' '.join(p.cmdline()[:5])}" for p in self.remaining()]
        raise AssertionError(f"still running after {timeout_s:.0f} s: {left}")


@pytest.fixture
def start_up(tmp_path: Path, cache_dir: Path) -> Iterator:
    started: list[Up] = []

    def start(*, wait_ready: bool = True) -> Up:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LEGO_") and k not in ("NATS_URL", "REDIS_URL")}
        run_dir = tmp_path / f"run{len(started)}"
        env.update({
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "LEGO_CACHE_DIR": str(cache_dir), "LEGO_RUN_DIR": str(run_dir),
            "LEGO_SHM_ROOT": f"/dev/shm/lego-test-stop-{os.getpid()}-{len(started)}",
            "LEGO_PORT": str(free_port()), "LEGO_AUTOSCALER_METRICS_PORT": "0",
            "LEGO_WORKFLOWS": '["txt2img"]', "LEGO_REPLICAS": '{"denoiser": 0, "vae_decoder": 0}',
        })
        out = tmp_path / f"up{len(started)}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "lego.cli", "up"], cwd=REPO, env=env,
                                    stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # as a terminal runs a command
        up = Up(proc, out, run_dir / "logs")
        started.append(up)
        if wait_ready:
            up.wait_until(lambda: re.search(r"^ready", up.output(), re.M), 150, "ready line")
            up.tree()
        return up

    yield start
    for up in started:  # a failed test leaves nothing running on a shared machine
        for p in up.remaining():
            p.kill()
        up.proc.wait(10)


def assert_stopped_in_order(up: Up) -> None:
    """An orderly stop: lego up exited 0, the node drained and said so, and nothing saw NATS
    go away (nats-server was stopped after every other process had ended)."""
    assert up.proc.returncode == 0, up.output()[-3000:]
    logs = {p.name: p.read_text(errors="replace") for p in up.logs.glob("*.log")
            if p.name != "nats-server.log"}
    assert any("text_encoder" in line and line.endswith("stopped")
               for text in logs.values() for line in text.splitlines()), logs
    for name, text in logs.items():
        assert "unexpected EOF" not in text and "Connection refused" not in text, (name, text)


@pytest.mark.parametrize("way", ["sigint-to-group", "sigterm-to-lego-up"])
def test_orderly_stop(start_up, way: str) -> None:  # noqa: ANN001
    up = start_up()
    assert len(up.nodes()) == len(os.sched_getaffinity(0))  # a device host per core
    if way == "sigint-to-group":
        os.killpg(up.proc.pid, signal.SIGINT)  # Ctrl-C: its children are not in the group
    else:
        os.kill(up.proc.pid, signal.SIGTERM)
    took_s = up.ended_within(BOUND_S + SLACK_S)
    assert_stopped_in_order(up)
    print(f"{way}: ended in {took_s:.1f} s")


def test_sigterm_to_every_process(start_up) -> None:  # noqa: ANN001
    """nats-server goes at once too: nothing can drain, so the stack does not wait for it."""
    up = start_up()
    for p in up.tree():
        p.send_signal(signal.SIGTERM)
    took_s = up.ended_within(BOUND_S + SLACK_S)
    assert up.proc.returncode == 0
    print(f"SIGTERM to {len(up.seen)} processes: ended in {took_s:.1f} s")


def test_sigkill_to_lego_up(start_up) -> None:  # noqa: ANN001
    """Its children (and the autoscaler's node) notice their parent is gone and exit."""
    up = start_up()
    assert len(up.seen) >= 5  # lego up, nats-server, gateway, autoscaler, a device host
    up.proc.kill()
    took_s = up.ended_within(BOUND_S + SLACK_S)
    print(f"SIGKILL to lego up: its tree ended in {took_s:.1f} s")


def test_ctrl_c_while_starting(start_up) -> None:  # noqa: ANN001
    up = start_up(wait_ready=False)
    up.wait_until(up.nodes, 120, "device host")  # still loading its model
    assert not re.search(r"^ready", up.output(), re.M)
    os.killpg(up.proc.pid, signal.SIGINT)
    took_s = up.ended_within(BOUND_S + SLACK_S)
    assert up.proc.returncode == 0, up.output()[-3000:]
    print(f"Ctrl-C while starting: ended in {took_s:.1f} s")
