"""Locust load test of the gateway over HTTP. From the repository root, with a stack running
(``lego up``):

    locust -f loadtest/locustfile.py --headless -u 4 -t 60s \
        --host http://127.0.0.1:8000 --csv out/http
    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 --csv out/http \
        --trace data/traces/generated_trace_n3_rs1.0_st50000_t120_seed666.txt --time-scale 4

Each request is one ``POST /v1/generations?wait=S`` answered when it ends (S is the request
timeout, at most the gateway's 60 s), reported under its workflow's name. Options and the
trace replay: ``loadtest/users.py``.
"""

from __future__ import annotations

from locust import HttpUser
from urllib3 import PoolManager

from loadtest.users import LegoUser

#: the gateway's limit on ``?wait``
MAX_WAIT_S = 60.0


class GatewayUser(LegoUser, HttpUser):
    # An open loop can hold many requests at once: keep their connections instead of opening
    # and discarding one per request beyond urllib3's default of 10.
    pool_manager = PoolManager(maxsize=256, block=False)

    def send(self, workflow: str) -> None:
        wait_s = min(self.options.request_timeout_s, MAX_WAIT_S)
        with self.client.post(
            "/v1/generations", params={"wait": wait_s}, json=self.options.request_body(workflow),
            name=workflow, timeout=wait_s + 30, catch_response=True,
        ) as response:
            if response.status_code != 200:  # 0: no response (the reason is in the failure)
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            state = response.json()
            if state.get("status") != "succeeded":
                error = state.get("error") or {}
                response.failure(f"request {state.get('status')}: {error.get('message', '')}")
