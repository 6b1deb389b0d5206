"""The seam between a node's model and its transport.

A core executes one model: it loads weights once and advances a batch of work items. It knows
nothing about NATS, the tensor store or messages; ``services.runner`` drives every core the same
way, so a new model (or a plug-in's stand-in for one: ``services.schemes``) is a new core, not a
new copy of the transport.

Every core is iterative: the runner admits new items at each step boundary, calls ``step`` on a
batch of compatible states, and finishes the states that are done. A one-shot model (text
encoder, VAE) is a core whose items finish after a single step (``OneShotCore``).
"""

from __future__ import annotations

import abc
import contextlib
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSource:
    """Where a core finds what requests attach to its model: an adapter's directory by its
    model spec (``WorkItem.adapters``: a ControlNet), a LoRA's file by its name."""

    resolve: Callable[[str], Path]
    lora_dir: Path | None = None

    def lora_file(self, name: str) -> Path:
        from common.errors import InvalidField
        from common.workflow import lora_path

        if self.lora_dir is None:
            raise InvalidField("loras", "this deployment serves no LoRAs (no lora_dir)")
        path = lora_path(self.lora_dir, name)
        if not path.is_file():
            raise InvalidField("loras", f"no LoRA {name!r} in {self.lora_dir}")
        return path


@dataclass
class WorkItem:
    """One task for a node, with its inputs already loaded from the tensor store."""

    request_id: str
    op: str
    params: dict[str, Any]
    inputs: dict[str, torch.Tensor]
    #: model specs of the adapters (ControlNets) the workflow attaches at this node
    adapters: tuple[str, ...] = ()


@dataclass
class Result:
    """What a finished item produced: tensors to store and small metadata to report.

    ``meta`` travels in messages (warnings such as prompt truncation, safety flags), so it
    must stay small and JSON-serialisable.
    """

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


#: Real models load one at a time in a process: diffusers and transformers import lazily when a
#: load first touches a class, and two threads importing one module may see it half-initialised
#: (a device host loads several pools at once). One device's loads share its bandwidth anyway.
_LOADING = threading.RLock()


def import_classes(model_dir: Path) -> None:
    """Import the classes ``model_dir``'s ``model_index.json`` names, under the load lock: what
    its loads would import first (a device host does this while it waits to be told what to
    load). A directory without a ``model_index.json``, or a component that cannot be imported,
    is left to the load that needs it to report."""
    from common.modeldirs import component_class, model_index

    try:
        index = model_index(model_dir)
    except (OSError, ValueError):
        return
    with _LOADING:
        for component, entry in index.items():
            if not component.startswith("_") and isinstance(entry, list):
                with contextlib.suppress(Exception):
                    component_class(model_dir, component)


class ModelCore(abc.ABC):
    """One model, loaded once, advanced in batches. Pure compute: no I/O besides loading."""

    #: node type, e.g. "text_encoder"; names the pool together with the model directory
    kind: str = ""
    #: the ops this core accepts in ``WorkItem.op``
    ops: tuple[str, ...] = ()
    #: the subfolders of the diffusers directory whose weights it loads (its memory footprint)
    components: tuple[str, ...] = ()
    #: whether ``load`` runs under the process's load lock (``_LOADING``); a core that
    #: imports nothing when it loads (an emulated one) need not wait for another's load
    serial_load: bool = True
    #: where the models that requests attach are (ControlNets, LoRAs), set by whoever builds
    #: the core (it knows where models are); None: none here
    source: ModelSource | None = None
    #: whether rows batched into one call give the same bits as one call each (a core that
    #: batches rows decides at load, ``probe_batch_exact``); None: not known (yet)
    batch_exact: bool | None = None
    #: whether it can run a step's guidance branches apart (``splits``): a host offers to run
    #: them for another device's steps only then (``services.branches``)
    guidance_branches: bool = False

    def __init__(self, model_dir: Path, *, device: str = "cpu", max_batch: int = 8,
                 dtype: str = "auto") -> None:
        from common.families import family_of_dir, load_dtype

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.max_batch = max_batch
        #: the dtype its weights are loaded in (the ``dtype`` setting, by family for auto)
        self.torch_dtype = getattr(torch, load_dtype(dtype, str(device), family_of_dir(model_dir)))

    def weights(self, component: str) -> Any:
        """A model component with weights (``unet``, ``text_encoder`` ...), loaded as diffusers
        loads it (the class its ``model_index.json`` names, in ``torch_dtype``), on the device,
        in eval mode."""
        from common.modeldirs import component_class

        # the diffusers or transformers class its model_index.json names
        cls: Any = component_class(self.model_dir, component)
        model = cls.from_pretrained(self.model_dir, subfolder=component,
                                    torch_dtype=self.torch_dtype)
        return model.to(self.device).eval()

    def probe_batch_exact(self, run: Callable[[], Any]) -> bool:
        """Whether ``run`` (which batches rows when ``self.batch_exact`` and runs them one by
        one when not) gives the same bits both ways on this machine and model; a tensor or a
        tuple of tensors."""
        results = []
        for exact in (True, False):
            self.batch_exact = exact
            out = run()
            results.append(out if isinstance(out, tuple) else (out,))
        return all(torch.equal(a, b) for a, b in zip(*results, strict=True))

    def check_op(self, item: WorkItem) -> None:
        """That ``item`` asks for an op this core does."""
        from common.errors import InvalidField

        if item.op not in self.ops:
            raise InvalidField("op", f"{self.kind} does not do {item.op!r}")

    def part(self, component: str) -> Any:
        """A component without weights (a tokenizer, a feature extractor)."""
        from common.modeldirs import component_class

        cls: Any = component_class(self.model_dir, component)  # a tokenizer's class, ...
        return cls.from_pretrained(self.model_dir, subfolder=component)

    @abc.abstractmethod
    def load(self) -> None:
        """Load the weights (and warm up). Called once before any item."""

    def load_serialized(self) -> float:
        """``load``, one at a time in this process where ``serial_load`` asks for it (a feed
        calls this from a worker thread), after importing the classes of a diffusers
        directory's components; returns the seconds until the weights began to load (waiting
        for the process's other loads, those imports)."""
        if not self.serial_load:
            self.load()
            return 0.0
        started = time.perf_counter()
        with _LOADING:
            import_classes(self.model_dir)
            imported_s = time.perf_counter() - started
            self.load()
        return imported_s

    def close(self) -> None:  # noqa: B027 - optional: most cores hold nothing to give back
        """Release what ``load`` took when the replica stops (process exit frees the rest)."""

    def needs_prepare(self, item: WorkItem) -> bool:
        """Whether ``prepare`` has work for ``item`` (cheap: asked on the event loop)."""
        return False

    def prepare(self, item: WorkItem) -> None:  # noqa: B027 - optional
        """Slow preparation an item needs before ``start``: reading what it attaches (a
        ControlNet, LoRAs) from disk. Runs in a worker thread while other items step."""

    @abc.abstractmethod
    def start(self, item: WorkItem) -> Any:
        """Turn an item into per-item state; cheap preparation only."""

    def batch_key(self, state: Any) -> Hashable:
        """States with equal keys may advance together in one ``step`` call."""
        return None

    @abc.abstractmethod
    def step(self, states: list[Any]) -> None:
        """Advance every state by one unit of work, as one batch where the model allows."""

    @abc.abstractmethod
    def done(self, state: Any) -> bool:
        """Whether ``finish`` may be called."""

    def progress(self, state: Any) -> tuple[int, int]:
        """(steps done, steps in total) for progress reports."""
        return (1, 1) if self.done(state) else (0, 1)

    @abc.abstractmethod
    def finish(self, state: Any) -> Result:
        """The outputs of a finished state."""

    # --- a step's two guidance branches on two devices (CFG parallelism) --------------------
    # A step that ``splits`` runs as: ``branch_inputs`` (what the other device needs), the
    # negative branch (0) there and the positive one (1) here, each ``run_branch``, then
    # ``join_branches``; ``services.branches`` moves the tensors between the devices.

    def splits(self, states: list[Any]) -> bool:
        """Whether the next step of ``states`` (a batch) may run its guidance branches apart."""
        return False

    def branch_inputs(self, states: list[Any]) -> torch.Tensor:
        """This step's model input of each state, one row each: what both branches read."""
        raise NotImplementedError(f"{type(self).__name__} does not split its steps")

    def run_branch(self, states: list[Any], branch: int, inputs: torch.Tensor,
                   steps: list[int]) -> torch.Tensor:
        """Guidance branch ``branch`` (0: the negative prompt's, 1: the positive's) of step
        ``steps[i]`` of each state, on ``inputs`` (``branch_inputs``, maybe another device's):
        its predictions, one row per state. The states may be another device's copies, made
        by ``start`` from the same items (a helper's)."""
        raise NotImplementedError(f"{type(self).__name__} does not split its steps")

    def join_branches(self, states: list[Any], negative: torch.Tensor,
                      positive: torch.Tensor) -> None:
        """End the step as ``step`` would from the two branches' predictions."""
        raise NotImplementedError(f"{type(self).__name__} does not split its steps")


    # --- a step's ControlNet on another device (ControlNet parallelism) ----------------------
    # A step that ``control_splits`` runs as: ``branch_inputs`` (what the other device needs),
    # ``run_control`` there (the ControlNet's outputs for every row) while ``step_controlled``
    # runs the step here, taking the outputs only where its model first adds them.

    def control_splits(self, states: list[Any]) -> bool:
        """Whether the next step of ``states`` runs a ControlNet another device may run."""
        return False

    def run_control(self, states: list[Any], inputs: torch.Tensor,
                    steps: list[int]) -> list[torch.Tensor]:
        """The ControlNet's outputs for step ``steps[i]`` of each state, on ``inputs``
        (``branch_inputs``, maybe another device's): a flat list, as ``step_controlled``
        takes them."""
        raise NotImplementedError(f"{type(self).__name__} runs no ControlNet apart")

    def step_controlled(self, states: list[Any],
                        outputs: Callable[[], list[torch.Tensor] | None]) -> None:
        """``step``, the ControlNet's outputs being ``outputs()`` (``run_control``'s, called
        once the model needs them: it may wait; None: the ControlNet runs here then)."""
        raise NotImplementedError(f"{type(self).__name__} runs no ControlNet apart")


class OneShotCore(ModelCore):
    """A core whose items complete in one batched call of ``run``."""

    @abc.abstractmethod
    def run(self, items: list[WorkItem]) -> list[Result]:
        """Run one batch; one result per item, in order."""

    def start(self, item: WorkItem) -> Any:
        return _OneShot(item)

    def step(self, states: list[Any]) -> None:
        for state, result in zip(states, self.run([s.item for s in states]), strict=True):
            state.result = result

    def done(self, state: Any) -> bool:
        return state.result is not None

    def finish(self, state: Any) -> Result:
        return state.result


@dataclass
class _OneShot:
    item: WorkItem
    result: Result | None = None
