"""Workflows registered at run time, kept in the KV bucket ``lego-workflows`` so every gateway
and ingress replica sees the same set without a restart (a deletion included).

An entry that does not parse (written by an older version, or straight into the bucket) is
skipped with a logged error: it never stops a gateway, ingress or autoscaler from starting."""

from __future__ import annotations

import asyncio
import logging
import re

from nats.js.errors import (
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
)
from nats.js.kv import KeyValue

from common.errors import Conflict, LegoError, UnknownWorkflow
from common.workflow import NAME_PATTERN, WorkflowSpec, builtin_workflows, parse_workflow

log = logging.getLogger(__name__)


class WorkflowRegistry:
    def __init__(self, bucket: KeyValue) -> None:
        self.bucket = bucket
        self._specs: dict[str, WorkflowSpec] = {}
        self._watch_task: asyncio.Task | None = None

    async def start(self, seed: dict[str, WorkflowSpec] | None = None) -> None:
        """Load the registered workflows (writing ``seed`` first) and follow later changes.

        ``seed``: the shipped workflows a stack serves. A shipped workflow registered before
        and not among them is removed: an earlier run on other models (which this run's model
        directory may not be able to serve, as a checkpoint without a safety checker cannot
        serve txt2img-safe), or with other ``workflows``, must not leave it served."""
        for spec in (seed or {}).values():
            await self.add(spec)
        if seed is not None:
            for name in sorted(builtin_workflows().keys() - seed.keys()):
                try:
                    await self.bucket.get(name)
                except (KeyNotFoundError, KeyDeletedError):
                    continue
                log.info("workflow %s is not served by this stack: unregistered", name)
                await self.bucket.delete(name)
        watcher = await self.bucket.watchall()
        first = asyncio.Event()

        async def follow() -> None:
            async for entry in watcher:
                if entry is None:  # initial values delivered
                    first.set()
                    continue
                await self._apply(entry.key, entry.value)
                if entry.delta == 0:
                    first.set()

        self._watch_task = asyncio.create_task(follow())
        await asyncio.wait_for(first.wait(), timeout=10)

    async def _apply(self, name: str, value: bytes | None) -> None:
        """A change of workflow ``name`` seen in the bucket (``value`` empty: deleted)."""
        if not value:
            self._specs.pop(name, None)
            return
        try:
            spec = parse_workflow(value)
        except LegoError as exc:
            log.error("registered workflow %s is not valid, skipped: %s", name, exc)
            self._specs.pop(name, None)
            return
        # its pools are named by its models' bytes: read them once here, off the event loop,
        # not on its first request (common.contents); the entry it replaces serves meanwhile
        await asyncio.to_thread(spec.pools)
        self._specs[name] = spec

    @staticmethod
    async def fetch(bucket: KeyValue, name: str) -> WorkflowSpec:
        """One registered workflow, read once: a node that serves it needs no watcher."""
        try:
            return parse_workflow((await bucket.get(name)).value or b"")
        except (KeyNotFoundError, KeyDeletedError):
            try:
                known = await bucket.keys()
            except NoKeysError:
                known = []
            raise UnknownWorkflow(name, known) from None

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()

    async def add(self, spec: WorkflowSpec) -> None:
        """Register ``spec``, replacing a workflow of that name."""
        await self.bucket.put(spec.name, _encode(spec))
        self._specs[spec.name] = spec

    async def create(self, spec: WorkflowSpec) -> None:
        """Register ``spec``; ``Conflict`` if a workflow of that name is registered (checked
        by the bucket, so two gateways cannot both create it)."""
        try:
            await self.bucket.create(spec.name, _encode(spec))
        except KeyWrongLastSequenceError:
            raise Conflict(f"name: a workflow {spec.name!r} is registered; replace it with "
                           f"PUT /v1/workflows/{spec.name} (admin)", field="name") from None
        self._specs[spec.name] = spec

    async def delete(self, name: str) -> None:
        """Unregister ``name`` (every replica's watcher drops it); ``UnknownWorkflow`` if no
        workflow of that name is registered."""
        if not re.fullmatch(NAME_PATTERN, name):  # no workflow can have it (nor a KV key be it)
            raise UnknownWorkflow(name, list(self._specs))
        try:
            await self.bucket.get(name)
        except (KeyNotFoundError, KeyDeletedError):
            raise UnknownWorkflow(name, list(self._specs)) from None
        await self.bucket.delete(name)
        self._specs.pop(name, None)

    def get(self, name: str) -> WorkflowSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownWorkflow(name, list(self._specs)) from None

    def all(self) -> dict[str, WorkflowSpec]:
        return dict(self._specs)


def _encode(spec: WorkflowSpec) -> bytes:
    return spec.model_dump_json(exclude_defaults=True).encode()
