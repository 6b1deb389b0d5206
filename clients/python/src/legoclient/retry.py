"""When a call is tried again, and how long the client waits first."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

#: the gateway's "try again later": rate limited (429) and overloaded (503), with Retry-After
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Retry:
    """Retries of a call the gateway answered 429 or 503, or that met a connection error.

    A connection that never opened is tried again whatever the call; one that broke after the
    call was sent only for a call that may safely run twice (reads, cancels, and submissions:
    the client gives each an ``id``, and the gateway answers a repeated one with the request it
    already has). The wait before try ``n`` (from 0) is the response's ``Retry-After`` when it
    has one, else ``backoff_s * 2**n`` with jitter; either is capped at ``max_delay_s``.
    ``max_retries=0`` turns retrying off.
    """

    max_retries: int = 4
    backoff_s: float = 0.5
    max_delay_s: float = 30.0

    def after_response(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before trying again after ``response``, or None: don't."""
        if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
            return None
        asked = retry_after_s(response)
        return min(self.max_delay_s, asked if asked is not None else self._backoff(attempt))

    def after_error(self, error: httpx.TransportError, attempt: int,
                    idempotent: bool) -> float | None:
        """Seconds to wait before trying again after ``error``, or None: raise it."""
        never_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
        if attempt >= self.max_retries or not (idempotent or never_sent):
            return None
        return min(self.max_delay_s, self._backoff(attempt))

    def _backoff(self, attempt: int) -> float:
        delay = self.backoff_s * 2 ** attempt
        return delay / 2 + random.uniform(0, delay / 2)  # clients that failed together spread


def retry_after_s(response: httpx.Response) -> float | None:
    """A response's ``Retry-After`` in seconds (it may be seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
