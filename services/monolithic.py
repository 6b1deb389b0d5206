"""The monolithic baseline: a whole workflow in one process, like one diffusers pipeline per
replica, served by the same runner, transport and autoscaler as the micro nodes.

Every performance claim of the micro-service design is measured against this core, so it is
tuned as well as a single process allows: it runs the very inner cores the micro nodes run
(bit-identical results), loads each (node kind, model) once, keeps intermediate tensors in
memory, runs independent DAG branches side by side, and batches continuously across requests
at every stage.

Scheduling: the runner steps the group of its oldest task's ``batch_key``. A key per stage would
park a newly arrived request at the text encoder until the oldest request had run its whole
pipeline, which is static batching. So every state shares one key, and one ``step`` is one
iteration of the whole replica: each held request advances its in-progress node(s) by one unit,
the nodes of all requests grouped by (inner core, inner batch key) into one inner batch each. A
new request joins at the next step boundary: its prompt is encoded while the others denoise,
then its denoising joins theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import InvalidField
from common.kinds import KINDS
from common.messages import merge_meta
from common.workflow import WorkflowSpec
from services.catalog import core_class, workflow_components
from services.core import ModelCore, ModelSource, Result, WorkItem

#: an inner core: (node kind, model directory)
CoreKey = tuple[str, Path]


@dataclass(eq=False)
class PipelineState:
    """One request's way through the workflow DAG, all in memory (nothing goes to the store)."""

    request_id: str
    params: dict[str, Any]
    images: dict[str, torch.Tensor]  # the request's image inputs, by parameter name
    running: dict[str, Any] = field(default_factory=dict)  # node -> inner core state
    outputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # finished nodes
    steps: dict[str, tuple[int, int]] = field(default_factory=dict)  # finished nodes' progress
    meta: dict[str, Any] = field(default_factory=dict)
    #: a failure of this request alone (a successor refused its inputs): raised by ``finish``,
    #: so the runner fails this task without failing the others that stepped with it
    error: Exception | None = None


class MonolithicCore(ModelCore):
    kind = "monolithic"
    ops = ("run",)

    def __init__(
        self,
        spec: WorkflowSpec,
        model_dirs: Mapping[str, Path],
        *,
        device: str = "cpu",
        max_batch: int = 8,
        dtype: str = "auto",
        make_inner: Callable[[str, Path], ModelCore] | None = None,
    ) -> None:
        """``model_dirs``: the spec's model aliases -> resolved diffusers directories.
        ``make_inner(kind, model_dir)`` builds an inner core (default: the catalog's core for
        the kind; a plug-in's model scheme passes its own, with model specs for directories)."""
        missing = {node.model for node in spec.nodes.values()} - set(model_dirs)
        if missing:
            raise ValueError(f"{spec.name}: no model directory for {sorted(missing)}")
        dirs = {alias: Path(path) for alias, path in model_dirs.items()}
        self.make_inner = make_inner or (
            lambda kind, model_dir: core_class(kind, model_dir)(
                model_dir, device=device, max_batch=max_batch, dtype=dtype)
        )
        first = next(iter(spec.nodes.values())).model  # ModelCore wants one directory
        super().__init__(dirs[first], device=device, max_batch=max_batch, dtype=dtype)
        self.spec = spec
        self.plan = spec.compile()
        self.model_dirs = dirs
        #: every node's inner core; nodes of one kind on one model directory share it
        self.node_cores: dict[str, CoreKey] = {
            name: (node.kind, dirs[node.model]) for name, node in spec.nodes.items()
        }
        by_model = workflow_components(spec, dirs)
        self.components = tuple(sorted({c for parts in by_model.values() for c in parts}))
        self.images = set(spec.compile(monolithic=True).nodes["pipeline"].inputs)
        self.cores: dict[CoreKey, ModelCore] = {}
        #: model spec -> directory, for the adapters its nodes attach
        self.spec_dirs = {spec.models[alias]: path for alias, path in dirs.items()
                          if alias in spec.models}

    def load(self) -> None:
        self.load_serialized()

    def load_serialized(self) -> float:
        """Load every inner core, each one under the process's load lock where it asks for it
        (a real model; ``ModelCore.serial_load``), not the whole pipeline under it: emulated
        pipelines (the baselines, every device's in one process) load side by side, as
        emulated micro replicas do. Returns the seconds they waited for it and imported their
        classes."""
        imported_s = 0.0
        for kind, model_dir in dict.fromkeys(self.node_cores.values()):
            core = self.make_inner(kind, model_dir)
            # the workflow's ControlNets; LoRAs where this core was told
            core.source = ModelSource(self.spec_dirs.__getitem__,
                                      self.source.lora_dir if self.source else None)
            imported_s += core.load_serialized()
            self.cores[(kind, model_dir)] = core
        # One VAE per model serves encoder and decoder, as in a pipeline (and as its footprint,
        # ``workflow_components``, counts it); the second copy is freed here.
        vaes: dict[Path, Any] = {}
        for (kind, model_dir), core in self.cores.items():
            if KINDS[kind].requires[:1] == ("vae",) and hasattr(core, "vae"):
                core.vae = vaes.setdefault(model_dir, core.vae)
        return imported_s

    def close(self) -> None:
        for core in self.cores.values():
            core.close()

    def _node_items(self, item: WorkItem) -> list[tuple[ModelCore, WorkItem]]:
        """Each node's inner core and what it attaches for ``item`` (no inputs yet)."""
        return [(self.cores[self.node_cores[name]],
                 WorkItem(item.request_id, node.op, item.params, {}, tuple(node.adapters)))
                for name, node in self.plan.nodes.items()]

    def needs_prepare(self, item: WorkItem) -> bool:
        return any(core.needs_prepare(inner) for core, inner in self._node_items(item))

    def prepare(self, item: WorkItem) -> None:
        """Every node's preparation (ControlNets, LoRAs), before the request's first step."""
        for core, inner in self._node_items(item):
            if core.needs_prepare(inner):
                core.prepare(inner)

    def start(self, item: WorkItem) -> PipelineState:
        self.check_op(item)
        missing = sorted(self.images - item.inputs.keys())
        if missing:
            raise InvalidField(missing[0], "is required: the image was not passed on")
        state = PipelineState(item.request_id, item.params, dict(item.inputs))
        self._start_ready(state)  # the roots; a refusal fails this request at admission
        return state

    def batch_key(self, state: PipelineState) -> Hashable:
        """One key for all: ``step`` groups the nodes itself (see the module docstring)."""
        return None

    def step(self, states: list[PipelineState]) -> None:
        groups: dict[tuple[CoreKey, Hashable], list[Any]] = {}
        for state in states:
            for node, inner in state.running.items():
                key = self.node_cores[node]
                groups.setdefault((key, self.cores[key].batch_key(inner)), []).append(inner)
        for (key, _), inners in groups.items():
            core = self.cores[key]
            for i in range(0, len(inners), core.max_batch):
                core.step(inners[i : i + core.max_batch])
        for state in states:
            try:
                self._advance(state)
            except Exception as exc:  # noqa: BLE001 - this request's failure, raised in finish
                state.error = exc

    def _advance(self, state: PipelineState) -> None:
        """Finish the nodes that are done, keep their outputs, start what they unblocked."""
        for node, inner in list(state.running.items()):
            core = self.cores[self.node_cores[node]]
            if core.done(inner):
                del state.running[node]
                state.steps[node] = core.progress(inner)
                result = core.finish(inner)
                state.outputs[node] = result.tensors
                state.meta = merge_meta(state.meta, result.meta)
        self._start_ready(state)

    def _start_ready(self, state: PipelineState) -> None:
        """Start every node whose predecessors have all finished (a join waits for all)."""
        for name, node in self.plan.nodes.items():
            if name in state.running or name in state.outputs:
                continue
            if not self.plan.predecessors(name) <= state.outputs.keys():
                continue
            inputs = {}
            for input_name, ref in node.sources().items():
                tensors = state.images if ref.from_request else state.outputs[ref.node]
                inputs[input_name] = tensors[ref.name]
            core = self.cores[self.node_cores[name]]
            item = WorkItem(state.request_id, node.op, state.params, inputs, tuple(node.adapters))
            if core.needs_prepare(item):  # in the step: one process serves the whole workflow
                core.prepare(item)
            state.running[name] = core.start(item)

    def done(self, state: PipelineState) -> bool:
        return state.error is not None or self.plan.output_node in state.outputs

    def progress(self, state: PipelineState) -> tuple[int, int]:
        """Steps over the whole workflow; a node not started yet counts as one step to go."""
        parts = [
            state.steps.get(name)
            or (
                self.cores[self.node_cores[name]].progress(state.running[name])
                if name in state.running
                else (0, 1)
            )
            for name in self.plan.nodes
        ]
        return sum(done for done, _ in parts), sum(total for _, total in parts)

    def finish(self, state: PipelineState) -> Result:
        if state.error is not None:
            raise state.error
        out = self.plan.output_ref
        return Result(tensors={"image": state.outputs[out.node][out.name]}, meta=state.meta)
