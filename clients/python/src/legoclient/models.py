"""Typed results, read from the JSON the gateway (or ``lego.results.<id>``) sends.

Each keeps the JSON object it was read from in ``raw``: a field this version of the client
does not know yet is there, so a newer server never breaks an older client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

#: the statuses a request ends in
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``data`` that are fields of ``cls`` (``raw`` aside)."""
    names = {f.name for f in fields(cls)} - {"raw"}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class ErrorInfo:
    """Why a request was refused or failed: ``field`` and ``limit`` name what was wrong."""

    code: str
    message: str
    node: str | None = None
    field: str | None = None
    limit: Any = dataclasses.field(default=None, hash=False)
    #: everything else the error carried (e.g. ``errors``: every bad field)
    details: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ErrorInfo:
        known = {"code", "message", "node", "field", "limit"}
        details = {k: v for k, v in data.items() if k not in known and k != "details"}
        return cls(code=data.get("code", "error"), message=data.get("message", ""),
                   node=data.get("node"), field=data.get("field"), limit=data.get("limit"),
                   details={**data.get("details", {}), **details})


@dataclass(frozen=True)
class Timing:
    """One node's part of a request: how long its task waited in its queue, ran, waited on
    its device and moved tensors."""

    node: str
    pool: str
    replica: str
    queue_ms: float
    run_ms: float
    io_ms: float
    attempt: int = 1
    batch: int = 1
    held_ms: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timing:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Progress:
    """A node's step: an SSE ``progress`` event, a message on ``lego.progress.<id>``, or the
    ``progress`` of a running request's state (which has no ``id``)."""

    node: str
    step: int
    total: int
    id: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Progress:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Generation:
    """Everything known about one request (``GET /v1/generations/{id}``)."""

    id: str
    workflow: str
    status: str  # queued, running, succeeded, failed, cancelled
    created_at: float
    updated_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    #: the parameters it runs with, defaults and the drawn seed included
    params: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    warnings: tuple[str, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    timings: tuple[Timing, ...] = ()
    error: ErrorInfo | None = None
    #: the step a running request is at, as far as the gateway saw
    progress: Progress | None = None
    #: while it has not ended: per pool it waits on, the tasks still ahead of it there
    queue_position: dict[str, int] = dataclasses.field(default_factory=dict, hash=False)
    #: while it has not ended: the seconds until it should finish, as estimated
    eta_s: float | None = None
    links: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    #: the JSON object it was read from, unknown fields included
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        known = _known(cls, data)
        known["warnings"] = tuple(data.get("warnings", ()))
        known["timings"] = tuple(Timing.from_json(t) for t in data.get("timings", ()))
        if data.get("error") is not None:
            known["error"] = ErrorInfo.from_json(data["error"])
        if data.get("progress") is not None:
            known["progress"] = Progress.from_json(data["progress"])
        return cls(**known, raw=data)

    @property
    def done(self) -> bool:
        """Whether it has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def seed(self) -> int | None:
        return self.params.get("seed")

    @property
    def model_ms(self) -> float:
        """The time its nodes ran, summed."""
        return sum(t.run_ms for t in self.timings)


@dataclass(frozen=True)
class HistoryPage:
    """One page of the requests kept, newest first (``GET /v1/generations``); pass
    ``next_cursor`` back as ``cursor`` for the next page (None: no more)."""

    items: tuple[Generation, ...]
    next_cursor: str | None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryPage:
        return cls(items=tuple(Generation.from_json(g) for g in data.get("data", ())),
                   next_cursor=data.get("next_cursor"), raw=data)
