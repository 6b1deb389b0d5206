"""The one error hierarchy, and how each error maps to JetStream acks and HTTP statuses.

    LegoError
    ├── RequestError            the client's fault: never retried        -> term, HTTP 4xx
    │   ├── InvalidField        a field out of its limits               -> 422
    │   ├── PayloadTooLarge     body or image over its byte limit       -> 413
    │   ├── UnknownWorkflow     no such workflow                        -> 404
    │   ├── NotFound            no such request / image                 -> 404
    │   ├── Unauthorized        API key missing or unknown              -> 401 + WWW-Authenticate
    │   ├── Forbidden           the key lacks the scope the call needs  -> 403
    │   ├── MethodNotAllowed    a path without that method              -> 405 + Allow
    │   └── RateLimited         the key's request rate is spent         -> 429 + Retry-After
    ├── Conflict                e.g. an id reused for another request    -> 409
    ├── Overloaded              the deadline cannot be met: rejected     -> 503 + Retry-After
    ├── StillRunning            a synchronous call gave up waiting       -> 504
    ├── ConfigError             a setting is wrong (e.g. NATS refused the credentials): the
    │                           process cannot start
    ├── RetryableError          transient (a store hiccup, a model OOM)  -> nak with backoff
    └── TerminalError           will fail again on any replica           -> term, request failed
        └── DeadlineExceeded    its deadline passed while queued: dropped, not run

An exception that is not a LegoError raised by a model is treated as retryable until the task
has been delivered max_deliver times; then the request fails with that error.
"""

from __future__ import annotations

import math
from typing import Any


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds: round up, at least 1 (0 would invite a hot loop)."""
    return str(max(1, math.ceil(seconds)))


class LegoError(Exception):
    code = "internal"
    http_status = 500
    retryable = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}

    def http_headers(self) -> dict[str, str]:
        """Headers an HTTP error response carries besides the body (e.g. Retry-After)."""
        return {}


class RequestError(LegoError):
    code = "invalid_request"
    http_status = 400


class InvalidField(RequestError):
    """A field is missing, malformed or out of range; names the field and the limit."""

    code = "invalid_field"
    http_status = 422

    def __init__(self, field: str, message: str, limit: Any = None) -> None:
        details: dict[str, Any] = {"field": field}
        if limit is not None:
            details["limit"] = limit
        super().__init__(f"{field}: {message}", **details)
        self.field = field


class InvalidRequest(RequestError):
    """Several field errors at once (every bad field is reported, not just the first)."""

    code = "invalid_request"
    http_status = 422

    def __init__(self, errors: list[InvalidField]) -> None:
        details: dict[str, Any] = {"errors": [e.to_dict() for e in errors]}
        if len(errors) == 1:  # the common case reads like a single field error
            details.update({k: v for k, v in errors[0].details.items()})
        super().__init__("; ".join(e.message for e in errors), **details)
        self.errors = errors


class PayloadTooLarge(RequestError):
    code = "payload_too_large"
    http_status = 413

    def __init__(self, field: str, size: int, limit: int) -> None:
        super().__init__(
            f"{field}: {size} bytes exceed the limit of {limit} bytes",
            field=field,
            limit=limit,
        )


class UnknownWorkflow(RequestError):
    code = "unknown_workflow"
    http_status = 404

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"workflow: unknown workflow {name!r}; known: {', '.join(sorted(known)) or 'none'}",
            field="workflow",
            known=sorted(known),
        )


class NotFound(RequestError):
    code = "not_found"
    http_status = 404


class Unauthorized(RequestError):
    """The gateway requires an API key (``Authorization: Bearer KEY``) and got none it knows."""

    code = "unauthorized"
    http_status = 401

    def __init__(self, message: str, invalid_token: bool = False) -> None:
        super().__init__(message)
        self.invalid_token = invalid_token

    def http_headers(self) -> dict[str, str]:
        # RFC 6750: a present but unknown token says so; a missing one just names the scheme
        return {"WWW-Authenticate": 'Bearer error="invalid_token"' if self.invalid_token
                else "Bearer"}


class Forbidden(RequestError):
    """The caller is known but may not do this: its API key lacks ``scope`` (e.g. ``admin``
    to register a workflow), or without API keys it is not on this host (loopback)."""

    code = "forbidden"
    http_status = 403

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message, scope=scope)
        self.scope = scope


class RateLimited(RequestError):
    """An API key sent requests faster than its rate limit allows."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 3))
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after_header(self.retry_after_s)}


class MethodNotAllowed(RequestError):
    """The path exists, but not with this method; ``Allow`` names those it takes."""

    code = "method_not_allowed"
    http_status = 405

    def __init__(self, method: str, path: str, allowed: list[str]) -> None:
        super().__init__(f"{method} is not allowed on {path!r}; allowed: {', '.join(allowed)}",
                         allowed=allowed)
        self.allowed = allowed

    def http_headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class Conflict(LegoError):
    code = "conflict"
    http_status = 409


class Overloaded(LegoError):
    """Admission control: the work queued ahead plus this request cannot finish in time."""

    code = "overloaded"
    http_status = 503

    def __init__(self, message: str, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 3), **details)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after_header(self.retry_after_s)}


class StillRunning(LegoError):
    """A call that answers at the end (the OpenAI images API) waited its limit; the request
    goes on and can be followed at its own URL."""

    code = "still_running"
    http_status = 504


class ConfigError(LegoError):
    """A setting is wrong in a way no retry fixes (credentials a server refuses, bad TLS)."""

    code = "config_error"
    http_status = 500


class RetryableError(LegoError):
    code = "retryable"
    http_status = 503
    retryable = True


class Unavailable(RetryableError):
    """A dependency (NATS, the tensor store) cannot be reached: try again shortly."""

    code = "unavailable"

    def __init__(self, message: str, retry_after_s: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": retry_after_header(self.retry_after_s)}


class TerminalError(LegoError):
    code = "node_error"
    http_status = 500


class DeadlineExceeded(TerminalError):
    code = "deadline_exceeded"
    http_status = 504
