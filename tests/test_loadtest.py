"""The Locust load tests against a real stack: each locustfile replays a tiny trace headless
(open loop, every arrival sent) and writes CSV stats showing every request succeeded.

Locust runs as a subprocess: importing it here would monkey-patch this pytest process."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lego.stack import Stack
from tests.conftest import nats_server
from tests.stackutil import running_stack

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                       reason="locust is not installed (pip install -e .[load])"),
]

REPO = Path(__file__).resolve().parent.parent
TRACE = "A 0.5\nB 0.5\nC 1.0\nA 0.5\nC 0\n"  # 5 arrivals over 2.5 s, 0.25 s at --time-scale 10
ARRIVALS = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("loadtest")
    with nats_server(tmp / "nats") as url, \
            running_stack(tmp, url, cache_dir, workflows=["txt2img"]) as st:
        yield st


def run_locust(locustfile: str, host: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    """Run ``locustfile`` headless: (its CSV stats rows by name, its log)."""
    prefix = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", locustfile, "--headless", "--host", host,
         "--csv", str(prefix), "--only-summary", "--steps", "2", "-t", "60s", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    with open(f"{prefix}_stats.csv", newline="") as stats:
        return {row["Name"]: row for row in csv.DictReader(stats)}, log


@pytest.mark.parametrize("locustfile, request_type", [
    ("loadtest/locustfile.py", "POST"), ("loadtest/nats_locustfile.py", "NATS"),
])
def test_trace_replay_succeeds(stack: Stack, tmp_path: Path, locustfile: str,
                               request_type: str) -> None:
    trace = tmp_path / "trace.txt"
    trace.write_text(TRACE)
    host = stack.gateway_url if request_type == "POST" else stack.settings.nats_url
    rows, log = run_locust(locustfile, host, tmp_path, "-u", "1", "--trace", str(trace),
                           "--time-scale", "10", "--tenants", "A=txt2img,B=txt2img,C=txt2img")
    # open loop: exactly the trace's arrivals were sent, and the run ended with the trace
    assert "--run-time limit reached" not in log and f"{ARRIVALS} requests" in log
    assert rows["txt2img"]["Type"] == request_type
    assert int(rows["txt2img"]["Request Count"]) == ARRIVALS
    assert int(rows["Aggregated"]["Failure Count"]) == 0

