"""Locust load test of the gateway over HTTP.

    pip install locust
    lego up &                        # or any running stack
    locust -f loadtest/locustfile.py --headless -u 4 -r 1 -t 60s \
        --host http://127.0.0.1:8000 --csv loadtest/out

Each user submits a txt2img request and waits for its end with the gateway's ``?wait``.
"""

from __future__ import annotations

import random

from locust import HttpUser, between, task


class GatewayUser(HttpUser):
    wait_time = between(0.5, 2.0)

    @task
    def txt2img(self) -> None:
        body = {"workflow": "txt2img", "prompt": "a red fox", "steps": 4,
                "seed": random.randrange(2**32)}
        with self.client.post("/v1/generations?wait=60", json=body, name="generate",
                              catch_response=True) as response:
            state = response.json() if response.ok else {}
            if state.get("status") != "succeeded":
                response.failure(f"request ended {state.get('status')}: {state.get('error')}")
