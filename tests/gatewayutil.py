"""A gateway served in this process (uvicorn in a thread) against the test's real NATS: for
tests that need HTTP (streams included) and a look at the gateway's insides, without nodes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from common.settings import Settings
from common.workflow import WorkflowSpec
from gateway.app import Gateway, create_app
from lego.stack import free_port


@dataclass
class ServedGateway:
    url: str
    gateway: Gateway


@contextlib.contextmanager
def served_gateway(
    settings: Settings,
    seed_workflows: dict[str, WorkflowSpec] | None = None,
    run_ingress: bool = True,
    start_timeout_s: float = 120.0,
) -> Iterator[ServedGateway]:
    app = create_app(settings, seed_workflows, run_ingress)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=5,
    ))
    thread = threading.Thread(target=server.run, name=f"gateway-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:  # set once the lifespan ran (NATS connected) and it listens
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the in-process gateway did not start")
        time.sleep(0.02)
    try:
        yield ServedGateway(f"http://127.0.0.1:{port}", app.state.gateway)
    finally:
        server.should_exit = True
        thread.join(30)
