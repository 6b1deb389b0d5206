"""The one exception of the client."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from legoclient.models import ErrorInfo

if TYPE_CHECKING:
    from legoclient.models import Generation


class LegoError(RuntimeError):
    """The gateway refused a call (``status``: its HTTP status), or a request did not succeed
    (``status`` 0; ``generation``: its final state).

    ``code``, ``message``, ``field`` and ``limit`` come from the error JSON
    (``{"error": {"code", "message", "field", "limit", ...}}``); ``details`` holds the rest
    (``errors``: every bad field, with its own field and limit); ``body`` is the JSON as sent;
    ``retry_after_s`` is the Retry-After the gateway asked for (429, 503).
    """

    def __init__(self, status: int, body: Any, *, retry_after_s: float | None = None,
                 generation: Generation | None = None) -> None:
        error = body.get("error", body) if isinstance(body, dict) else body
        info = (ErrorInfo.from_json(error) if isinstance(error, dict)
                else ErrorInfo(code="error", message=str(error)))
        super().__init__(f"HTTP {status}: {info.message}" if status else info.message)
        self.status = status
        self.body = body
        self.info = info
        self.code = info.code
        self.message = info.message
        self.field = info.field
        self.limit = info.limit
        self.details = info.details
        self.retry_after_s = retry_after_s
        self.generation = generation

    @classmethod
    def of(cls, generation: Generation) -> LegoError:
        """The error of a request that ended without succeeding."""
        error = generation.raw.get("error") or {
            "code": generation.status, "message": f"request {generation.id} {generation.status}"}
        return cls(0, error, generation=generation)
