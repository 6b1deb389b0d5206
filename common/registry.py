"""Workflows registered at run time, kept in the KV bucket ``lego-workflows`` so every gateway
and ingress replica sees the same set without a restart."""

from __future__ import annotations

import asyncio
import logging

from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from common.errors import UnknownWorkflow
from common.workflow import WorkflowSpec, builtin_workflows, parse_workflow

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
                except KeyNotFoundError:
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
                if entry.value:
                    self._specs[entry.key] = parse_workflow(entry.value)
                else:
                    self._specs.pop(entry.key, None)
                if entry.delta == 0:
                    first.set()

        self._watch_task = asyncio.create_task(follow())
        await asyncio.wait_for(first.wait(), timeout=10)

    @staticmethod
    async def fetch(bucket: KeyValue, name: str) -> WorkflowSpec:
        """One registered workflow, read once: a node that serves it needs no watcher."""
        try:
            return parse_workflow((await bucket.get(name)).value or b"")
        except KeyNotFoundError:
            try:
                known = await bucket.keys()
            except NoKeysError:
                known = []
            raise UnknownWorkflow(name, known) from None

    async def stop(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()

    async def add(self, spec: WorkflowSpec) -> None:
        await self.bucket.put(spec.name, spec.model_dump_json(exclude_defaults=True).encode())
        self._specs[spec.name] = spec

    def get(self, name: str) -> WorkflowSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownWorkflow(name, list(self._specs)) from None

    def all(self) -> dict[str, WorkflowSpec]:
        return dict(self._specs)
