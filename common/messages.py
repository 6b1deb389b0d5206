"""Every wire message, as typed msgspec structs encoded as JSON. No pickle, ever.

A client in any language needs two shapes (their JSON Schemas: ``lego schema``):

- a generation request, published to ``lego.requests`` or POSTed to ``/v1/generations``: a flat
  JSON object ``{"workflow": "txt2img", "prompt": "...", "seed": 1, ...}``; besides ``workflow``,
  an optional client-chosen ``id``, an optional ``deadline_s`` (seconds from submission;
  default: the workflow's SLO) and an optional ``webhook_url`` with ``webhook_events``
  (``common.webhooks``), every key is a parameter of the workflow;
- ``RequestState``: the reply to a request, the body of ``GET /v1/generations/{id}`` and the
  completion event on ``lego.results.<id>``.

Everything else here travels between our own processes.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import msgspec

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

#: keys of a generation request that are not workflow parameters
ENVELOPE_KEYS: frozenset[str] = frozenset(
    {"id", "workflow", "deadline_s", "webhook_url", "webhook_events"}
)


#: whether a workflow's denoiser steps (and T5 encodings) run parts on other devices
#: (``services.parallel``)
ParallelMode = Literal["off", "auto", "always"]
#: what part of a denoising step may run on another device: its negative guidance branch
#: (CFG parallelism) or its ControlNet (ControlNet parallelism)
StepPart = Literal["cfg", "controlnet"]


class TensorRef(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where a tensor's bytes are: only this travels, the bytes stay in the store."""

    store: str
    key: str
    dtype: str
    shape: list[int]
    nbytes: int
    #: the dims from outermost to innermost in memory, where that is not their own order (a
    #: channels-last tensor: ``[0, 2, 3, 1]``); a reader gets the writer's layout back, since
    #: kernels round differently on other layouts
    order: list[int] | None = None


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    node: str | None = None
    field: str | None = None
    limit: Any = None
    details: dict[str, Any] = {}


def error_info(exc: Any, node: str | None = None) -> ErrorInfo:
    """The wire form of a ``common.errors.LegoError``: its field and limit lifted out."""
    details = dict(exc.details)
    return ErrorInfo(
        code=exc.code,
        message=exc.message,
        node=node,
        field=details.pop("field", None),
        limit=details.pop("limit", None),
        details=details,
    )


class NodeTiming(msgspec.Struct):
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
    #: held on its device but not running: until its first step, and between its steps while
    #: other work's steps ran (a device runs one step at a time)
    held_ms: float = 0.0


#: the node name of a reference to a tensor the ingress stored (``"request.<param>"``)
REQUEST = "request"


class Ref(NamedTuple):
    """A reference to a tensor, parsed once from its wire text: ``"<node>.<output>"``, another
    node's output, or ``"request.<param>"``, a tensor the ingress stored (an uploaded image).
    Messages keep the text (the wire format stays strings); code reads it as a ``Ref``."""

    node: str
    name: str

    @staticmethod
    def of(text: str) -> Ref:
        """The reference ``text`` spells; ValueError naming it when it is not one."""
        return _parse_ref(text)

    @staticmethod
    def request(param: str) -> Ref:
        """The reference to the tensor the ingress stored for parameter ``param``."""
        return Ref(REQUEST, param)

    @property
    def from_request(self) -> bool:
        return self.node == REQUEST

    def __str__(self) -> str:
        return f"{self.node}.{self.name}"


@functools.lru_cache(maxsize=4096)
def _parse_ref(text: str) -> Ref:
    node, dot, name = text.partition(".")
    if not (node and dot and name):
        raise ValueError(f"{text!r} is not a reference: expected '<node>.<output>' or "
                         f"'{REQUEST}.<param>'")
    return Ref(node, name)


def parse_refs(inputs: Mapping[str, str]) -> dict[str, Ref]:
    """Input name -> the reference its text spells (``PlanNode.inputs``, a workflow node's)."""
    return {input_name: Ref.of(text) for input_name, text in inputs.items()}


class PlanNode(msgspec.Struct):
    """A node of a compiled workflow. ``inputs`` maps an input name to ``"<node>.<output>"`` or
    ``"request.<param>"`` (a tensor the ingress stored, such as an uploaded image); ``sources``
    reads them as ``Ref``s."""

    kind: str
    pool: str
    op: str
    inputs: dict[str, str] = {}
    #: model specs of adapters (ControlNets) applied at this node; they share its pool
    adapters: list[str] = []
    #: estimated compute of this node for this request, seconds (its steps at the step time the
    #: pool has shown; 0 when not yet measured): device hosts order work by the slack it leaves
    est_s: float = 0.0
    #: whether a step's two guidance branches (a T5 encoder's two prompts) may run on two
    #: devices (CFG parallelism, ``services.parallel``): "off", "auto" or "always"
    parallel: str = "off"

    def sources(self) -> dict[str, Ref]:
        """Input name -> the tensor it reads."""
        return parse_refs(self.inputs)


class Plan(msgspec.Struct):
    """The compiled DAG of one request; it travels with every task so nodes stay stateless."""

    nodes: dict[str, PlanNode]
    output: str  # "<node>.<output>": the finished image

    @property
    def output_ref(self) -> Ref:
        return Ref.of(self.output)

    @property
    def output_node(self) -> str:
        return self.output_ref.node

    def predecessors(self, node: str) -> set[str]:
        return {ref.node for ref in self.nodes[node].sources().values() if not ref.from_request}

    def ancestors(self, node: str) -> set[str]:
        """The nodes that run before ``node``: its predecessors, theirs, and so on."""
        return {n for path in self.paths_to(node) for n in path}

    def paths_to(self, node: str) -> list[list[str]]:
        """Every chain of nodes from a root to ``node``'s predecessors, ``node`` left out
        (one empty chain for a root)."""
        preds = sorted(self.predecessors(node))
        if not preds:
            return [[]]
        return [[*path, p] for p in preds for path in self.paths_to(p)]

    def successors(self, node: str) -> list[str]:
        return self._successor_map()[node]

    def _successor_map(self) -> dict[str, list[str]]:
        """Node -> the nodes that read its outputs, in the plan's order."""
        successors: dict[str, list[str]] = {name: [] for name in self.nodes}
        for name in self.nodes:
            for p in self.predecessors(name):
                successors[p].append(name)
        return successors

    def roots(self) -> list[str]:
        return [name for name in self.nodes if not self.predecessors(name)]

    def tail_s(self, node: str) -> float:
        """Estimated work still to run after ``node`` finishes: its longest chain of
        successors, by their ``est_s``."""
        successors = self._successor_map()

        @functools.cache
        def tail(n: str) -> float:
            return max((self.nodes[s].est_s + tail(s) for s in successors[n]), default=0.0)

        return tail(node)


class Task(msgspec.Struct, omit_defaults=True):
    """One unit of work for one pool: run ``plan.nodes[node]`` for ``request_id``."""

    request_id: str
    workflow: str
    node: str
    plan: Plan
    params: dict[str, Any]
    inputs: dict[str, TensorRef]
    submitted_at: float
    published_at: float
    request_tensors: dict[str, TensorRef] = {}  # tensors the ingress stored (uploaded images)
    meta: dict[str, Any] = {}
    timings: list[NodeTiming] = []
    deadline_at: float | None = None  # epoch seconds; work still queued after it is dropped
    #: times a busy device host handed it back to its pool's queue for an idle one to take
    handoffs: int = 0
    #: the request's webhook URL, only when it asked for its progress events there
    progress_webhook: str | None = None

    def expired(self, at: float) -> bool:
        return self.deadline_at is not None and at > self.deadline_at


def merge_meta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge node metadata: warnings accumulate, other keys from ``b`` win."""
    merged = {**a, **b}
    warnings = [*a.get("warnings", []), *(w for w in b.get("warnings", []) if w not in
                                             a.get("warnings", []))]
    if warnings:
        merged["warnings"] = warnings
    return merged


class BranchStep(msgspec.Struct):
    """Part of one denoising step, asked of another device that holds the model
    (``services.branches``): its negative guidance branch (``part`` "cfg": CFG parallelism)
    or its ControlNet ("controlnet"); the batch's tasks (their inputs give the helper each
    request's conditioning), each task's step index, and the step's model inputs, one row per
    task, in the tensor store."""

    host: str  # the asking host: a host does not help itself
    tasks: list[Task]
    steps: list[int]
    sample: TensorRef
    part: StepPart = "cfg"
    accept_by: float | None = None  # epoch seconds: the asking host runs it all after this


class BranchResult(msgspec.Struct, omit_defaults=True):
    """A helper's answers to a ``BranchStep``: first that it took it (``accepted``), then what
    it made, in the tensor store: the branch's predictions, one row per task (``noise``), or
    the ControlNet's outputs (``outputs``); or why it does not run it (the asking host then
    runs it itself)."""

    accepted: bool = False
    noise: TensorRef | None = None
    outputs: list[TensorRef] | None = None
    declined: str | None = None


class JoinState(msgspec.Struct):
    """Partial inputs of a node with several predecessors, kept in KV until all arrived."""

    arrived: list[str]
    inputs: dict[str, TensorRef]
    meta: dict[str, Any]
    timings: list[NodeTiming]


class QueueMark(msgspec.Struct, frozen=True):
    """Where a request entered a pool's queue: ``ahead`` tasks waited before it when the
    pool's consumer had handed out ``delivered`` tasks (its queue position follows from
    how many it has handed out since)."""

    ahead: int
    delivered: int


class Webhook(msgspec.Struct, omit_defaults=True):
    """Where a request's events are POSTed (``common.webhooks``), and how that went: per event
    (started, progress, completed), the deliveries the receiver answered with a 2xx and those
    given up after the last attempt; the error of the latest failed attempt."""

    url: str
    events: list[str]
    delivered: dict[str, int] = {}
    failed: dict[str, int] = {}
    last_error: str | None = None


class RequestState(msgspec.Struct, omit_defaults=True):
    """Everything known about one request; lives in KV ``lego-requests``. The write that ends
    it has ``updated_at == finished_at``; later writes only note webhook deliveries."""

    id: str
    workflow: str
    status: Status
    created_at: float
    updated_at: float
    params: dict[str, Any] = {}
    warnings: list[str] = []
    meta: dict[str, Any] = {}
    timings: list[NodeTiming] = []
    error: ErrorInfo | None = None
    image: TensorRef | None = None
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    #: when it should finish (epoch seconds), as estimated when it was accepted
    eta_at: float | None = None
    #: per pool it waits on first, where it entered that pool's queue
    queue: dict[str, QueueMark] = {}
    webhook: Webhook | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


#: a replica's state, as ``ReplicaStatus.state`` reports it
ReplicaState = Literal["starting", "ready", "draining", "stopped", "failed"]


class ReplicaStatus(msgspec.Struct):
    """What a replica reports about itself, once a second and when it changes state. A replica
    whose model cannot load reports ``failed``, with the ``error``, how many attempts in a row
    failed and when it tries again (``retry_in_s``, from ``at``)."""

    replica: str
    pool: str
    kind: str
    model: str
    state: ReplicaState
    held: int
    max_batch: int
    load_s: float
    tasks_done: int
    tasks_failed: int
    batches: int
    batch_items: int
    at: float
    device: str = "cpu"
    #: latency of recently finished tasks (queue + run + store I/O), milliseconds
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: seconds from process start to ready (imports, weights, warm-up): the cold start
    startup_s: float | None = None
    #: ``startup_s`` in parts that add up to it: ``process`` (exec and the interpreter's start;
    #: 0 for a pool a running host added), ``import`` (imports, connecting, building the core,
    #: waiting for the process's other loads, importing its classes) and ``weights`` (reading
    #: them and warming up)
    startup_parts: dict[str, float] | None = None
    #: compute per task, amortised over the batches it shared (1000/work_ms: tasks/s one replica
    #: sustains at its recent batch sizes), mean of recent tasks
    work_ms: float | None = None
    #: the least compute a recent task took per step (its progress unit; one-shot tasks have
    #: one): ``steps x unit_ms_min`` bounds a task's service time from below
    unit_ms_min: float | None = None
    #: the time a step of a recent task took, mean (batches shared included): what a new task's
    #: steps are likely to take, where ``unit_ms_min`` is the least they can
    unit_ms_mean: float | None = None
    #: the 90th percentile of recent tasks' step times: what admission holds against the
    #: deadline, so that a step slower than the mean (a fuller batch, a busier host) does not
    #: make an admitted request late. Both are ``unit_ms_min`` once the replica has measured no step
    #: for ``figure_max_age_s``: figures from a busier time must not keep turning work away
    unit_ms_p90: float | None = None
    steps_per_task: float | None = None  # mean over recent tasks
    tasks_dropped: int = 0
    #: of those dropped, the tasks whose request could no longer meet its deadline: what
    #: admission let in and should not have
    tasks_expired: int = 0
    #: its Prometheus endpoint's port (``node_metrics_port``; 0 there: the one the OS picked)
    metrics_port: int | None = None
    #: why its model cannot be loaded (state ``failed``)
    error: str | None = None
    failures: int = 0  # attempts to load that failed in a row
    retry_in_s: float | None = None  # until the next attempt (0: under way)
    #: steps whose negative guidance branch another device ran (CFG parallelism), and
    #: branches this replica ran for another device's steps
    split_steps: int = 0
    helped_steps: int = 0


class ResidentPool(msgspec.Struct, frozen=True):
    """A pool made resident on a device host: what `lego node KIND --model MODEL` would serve."""

    pool: str
    kind: str
    model: str


class HostResidency(msgspec.Struct):
    """The pools that should be resident on one device host (KV ``lego-residency``, one key
    per host): the autoscaler writes it, the host loads what is listed and drains the rest."""

    pools: list[ResidentPool] = []

    @classmethod
    def of(cls, value: bytes | None) -> HostResidency:
        """An entry's value; an empty one (the key was deleted or purged) lists nothing."""
        return decode(value, cls) if value else cls()


class ShedReport(msgspec.Struct):
    """What one ingress rejected so far, per pool (cumulative task counts): demand the queues
    never saw, which the autoscaler must still count, or shedding would hide an overload."""

    source: str
    shed: dict[str, int]
    at: float
    #: of those, per pool, the requests whose wait it held most (the pool that needs a replica)
    held: dict[str, int] = {}


class ScaleEvent(msgspec.Struct):
    """The autoscaler changed a pool's replica count (published on ``lego.autoscaler.events``)."""

    at: float
    pool: str
    before: int
    after: int
    reason: str
    placement: list[str] = []


class Progress(msgspec.Struct):
    id: str
    node: str
    step: int
    total: int


class WebhookEvent(msgspec.Struct, omit_defaults=True):
    """One event of a request for its webhook, in stream LEGO_WEBHOOKS until delivered (or
    given up): ``id`` is its ``webhook-id``, the same on every attempt."""

    id: str
    request_id: str
    event: str  # started, progress, completed
    url: str
    at: float  # when it happened
    state: RequestState | None = None  # started, completed: the state then
    progress: Progress | None = None


def now() -> float:
    return time.time()


_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct | dict[str, Any]) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[msgspec.Struct]) -> Any:
    """Decode ``data`` as ``kind``; raises msgspec.ValidationError / DecodeError when malformed."""
    return msgspec.json.decode(data, type=kind)


def json_schema(kind: type[msgspec.Struct]) -> dict[str, Any]:
    return msgspec.json.schema(kind)
