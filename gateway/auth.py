"""Access control on the gateway: API keys (bearer tokens) and a per-key rate limit.

With ``api_keys`` set, every ``/v1/*`` request needs ``Authorization: Bearer KEY`` with one of
them (401 otherwise); health checks, the docs and the web page stay open. With
``rate_limit_rps`` > 0, each key also has a token bucket of ``rate_limit_burst`` requests
refilled at ``rate_limit_rps`` per second (429 with Retry-After when it is empty). Buckets live
in each gateway replica's memory, so N replicas behind a load balancer allow up to N times the
rate; a streaming request (SSE) counts once, when it opens.

Scopes: a key may hold ``admin`` (``api_key_scopes``, or ``api_keys: {name: {token, scopes}}``);
registering, replacing and deleting workflows needs it (403 ``forbidden`` naming the scope
otherwise): a workflow makes nodes load models, so it is the operator's act, not a client's.
Without API keys the API is open, and those acts are allowed only to a client on this host
(loopback, and no ``Forwarded``/``X-Forwarded-For`` header a proxy would add): the default
stack listens on 127.0.0.1 only, but a gateway bound to a public address without keys must
not let anyone on the network point nodes at files.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.errors import Forbidden, RateLimited, Unauthorized
from common.settings import Settings

PROTECTED_PREFIX = "/v1/"
#: the scope that may register, replace and delete workflows
ADMIN = "admin"
#: headers a reverse proxy adds: behind one, a loopback peer says nothing of the client
_FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")


class TokenBucket:
    """``burst`` tokens, refilled continuously at ``rate_per_s``; a request takes one.

    Pure: the caller passes the time, so it is tested with a fake clock."""

    def __init__(self, rate_per_s: float, burst: int, now_s: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate_per_s > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.updated_s = now_s

    def take(self, now_s: float) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be (none is
        taken then, so a client that keeps retrying early does not push its turn back)."""
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.tokens = min(float(self.burst), self.tokens + elapsed_s * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One token bucket per key, created on the key's first request."""

    def __init__(self, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.buckets: dict[str, TokenBucket] = {}

    def check(self, key: str) -> float:
        """0.0 if ``key`` may make a request now, else the seconds it has to wait."""
        now_s = self.clock()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate_per_s, self.burst, now_s)
        return bucket.take(now_s)


_bearer = HTTPBearer(auto_error=False, description="an API key from the gateway's api_keys")


class ApiKeyGuard:
    """The gateway-wide dependency that checks API keys and rate limits on ``/v1/*``.

    The app adds it only when ``api_keys`` is set; it leaves the key's name in
    ``request.state.api_key``."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = dict(settings.api_keys)  # name -> token
        self.scopes = {name: frozenset(scopes) for name, scopes in
                       settings.api_key_scopes.items()}
        self.limiter = (
            RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst, clock)
            if settings.rate_limit_rps > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def key_name(self, token: str) -> str | None:
        """The name of the key ``token`` is, compared in constant time."""
        found = None
        for name, known in self.keys.items():
            if hmac.compare_digest(token.encode(), known.encode()):
                found = name
        return found

    def require(self, request: Request, scope: str = ADMIN) -> None:
        """``Forbidden`` unless the request may act with ``scope``: its API key holds it, or,
        without API keys, it comes from this host (loopback, not through a proxy)."""
        if self.enabled:
            name = getattr(request.state, "api_key", None)
            if scope not in self.scopes.get(name or "", frozenset()):
                raise Forbidden(f"API key {name!r} lacks the scope {scope!r} this needs "
                                "(api_key_scopes)", scope=scope)
            return
        if not _local(request):
            raise Forbidden(f"this needs the scope {scope!r}: without API keys only a client "
                            "on the gateway's host (loopback) has it; configure api_keys with "
                            "an admin key", scope=scope)

    async def __call__(
        self, request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> None:
        request.state.api_key = None
        if not self.enabled or not request.url.path.startswith(PROTECTED_PREFIX):
            return
        if credentials is None:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer KEY'")
        name = self.key_name(credentials.credentials)
        if name is None:
            raise Unauthorized("unknown API key", invalid_token=True)
        request.state.api_key = name
        if self.limiter is not None:
            wait_s = self.limiter.check(name)
            if wait_s > 0:
                raise RateLimited(
                    f"API key {name!r} exceeded {self.limiter.rate_per_s:g} requests/s "
                    f"(burst {self.limiter.burst}); retry in {wait_s:.2f} s",
                    retry_after_s=wait_s,
                )


def _local(request: Request) -> bool:
    """The client is on this host: a loopback peer, with no header a proxy adds."""
    if request.client is None or any(h in request.headers for h in _FORWARDED):
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False
