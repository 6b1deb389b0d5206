"""Workflows: a DAG of model nodes with typed parameters, validated and compiled to a Plan.

A workflow file (YAML or JSON) names its models (diffusers directories or ``builtin:`` specs),
its parameters with defaults and limits, its nodes (a node kind of ``common.kinds`` on a model)
with the edges between them, and which node output is the finished image. This module is pure:
no NATS, no torch. Validation raises ``InvalidRequest`` naming every bad field and its limit.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common import families, output_format
from common.errors import InvalidField, InvalidRequest, PayloadTooLarge
from common.kinds import KINDS, MONOLITHIC, adapter_kinds, pool_of
from common.messages import (
    ENVELOPE_KEYS,
    ParallelMode,
    Plan,
    PlanNode,
    Ref,
    Webhook,
    parse_refs,
)
from common.subjects import pool_name

if TYPE_CHECKING:
    from common.settings import Settings

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "workflows"


def attached_adapters(kind: str, model: str, workflows: Iterable[WorkflowSpec]) -> list[str]:
    """The ControlNets ``workflows`` attach to a node on the pool of ``kind`` on ``model``
    (sorted): what a replica of that pool may load beside its model."""
    pool = pool_of(kind, model)
    return sorted({
        spec.models[node.controlnet]
        for spec in workflows
        for node in spec.nodes.values()
        if node.controlnet and pool_of(node.kind, spec.models[node.model]) == pool
    })


class ParamSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["string", "integer", "number", "boolean", "image", "loras"]
    description: str = ""
    required: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    multiple_of: int | None = None
    max_length: int | None = Field(None, description="characters, for strings")
    choices: list[Any] | None = None
    max_bytes: int | None = Field(None, description="decoded bytes, for images")
    max_items: int | None = Field(None, description="LoRAs a request may name, for loras")
    max_pixels: int | None = Field(None, description="width x height, for images")
    min_side: int = Field(8, description="pixels, for images")
    tokenizer: str | None = Field(
        None, description="model whose tokenizer limits this prompt (reports truncation)"
    )
    random: bool = Field(False, description="pick a random value when absent (seeds)")
    default_from: str | None = Field(
        None, description="model whose native image size is the default (width, height)"
    )


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    model: str
    inputs: dict[str, str] = {}
    controlnet: str | None = Field(
        None, description="model alias of a ControlNet applied at every step (a node of a kind "
        "that takes one: a denoiser)"
    )

    @model_validator(mode="after")
    def _known_kind(self) -> NodeSpec:
        if self.kind not in KINDS:
            raise ValueError(f"unknown node kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.controlnet is not None and not KINDS[self.kind].takes_adapters:
            raise ValueError(f"controlnet: a {self.kind} takes none; "
                             f"only a {' or a '.join(adapter_kinds())} does")
        return self

    def sources(self) -> dict[str, Ref]:
        """Input name -> the tensor it reads (``WorkflowSpec`` checks that each is one)."""
        return parse_refs(self.inputs)


#: what a workflow's name may be (also a KV key of ``lego-workflows`` and a URL path segment)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class WorkflowSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    models: dict[str, str]
    params: dict[str, ParamSpec]
    nodes: dict[str, NodeSpec]
    output: str
    #: seconds one request takes alone; deadlines default to a multiple of it (a number > 0:
    #: not a boolean, nor a string that looks like one)
    solo_latency_s: float | None = Field(None, gt=0, strict=True)
    #: whether its denoising steps (and its T5 encoding) may run their two guidance branches
    #: on two devices (CFG parallelism, ``services.parallel``); None: the deployment's default
    #: (``parallel``)
    parallel: ParallelMode | None = Field(
        None, description="CFG parallelism of its denoiser steps and T5 encoding: off, auto "
        "(when a device "
        "holding the model is idle and it pays), always (when a device is idle); default: "
        "the deployment's")

    @model_validator(mode="after")
    def _output_params(self) -> WorkflowSpec:
        """Every workflow takes ``output_format`` and ``output_quality``; a workflow file may
        declare them only to pick other defaults within the encoder's limits."""
        for name, fields in output_format.PARAMS.items():
            standard = ParamSpec(**fields)
            declared = self.params.setdefault(name, standard)
            free = {"default", "description"}
            if declared.model_dump(exclude=free) != standard.model_dump(exclude=free):
                raise ValueError(f"params.{name}: only its default may be changed; it is "
                                 f"{standard.model_dump(exclude=free, exclude_defaults=True)}")
            try:
                _check_scalar(f"params.{name}.default", standard, declared.default)
            except InvalidField as exc:
                raise ValueError(exc.message) from None
        return self

    @model_validator(mode="after")
    def _check_graph(self) -> WorkflowSpec:
        for name, node in self.nodes.items():
            if node.model not in self.models:
                raise ValueError(f"node {name}: unknown model {node.model!r}")
            if node.controlnet is not None and node.controlnet not in self.models:
                raise ValueError(f"node {name}: unknown controlnet model {node.controlnet!r}")
            kind = KINDS[node.kind]
            for param in kind.params:
                declared = self.params.get(param)
                if declared is None or (declared.default is None and not declared.required):
                    raise ValueError(f"node {name}: a {node.kind} reads params.{param}: "
                                     "declare it with a default (or required)")
            allowed = set(kind.inputs) | set(kind.optional_inputs)
            missing = set(kind.inputs) - set(node.inputs)
            if missing:
                raise ValueError(f"node {name}: missing inputs {sorted(missing)}")
            if kind.one_of and len(set(kind.one_of) & set(node.inputs)) != 1:
                raise ValueError(f"node {name}: {node.kind} takes one input of "
                                 f"{list(kind.one_of)}")
            for input_name, source in node.inputs.items():
                if input_name not in allowed:
                    raise ValueError(f"node {name}: {node.kind} has no input {input_name!r}")
                self._check_source(f"node {name} input {input_name}", source)
        self._check_source("output", self.output)
        self._check_acyclic()
        return self

    def _check_source(self, where: str, source: str) -> None:
        try:
            ref = Ref.of(source)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if ref.from_request:
            spec = self.params.get(ref.name)
            if spec is None or spec.type != "image":
                raise ValueError(f"{where}: {source!r} must name an image parameter")
            return
        if ref.node not in self.nodes:
            raise ValueError(f"{where}: {source!r} names no node")
        if ref.name not in KINDS[self.nodes[ref.node].kind].outputs:
            raise ValueError(f"{where}: {source!r}: node {ref.node} has no output {ref.name!r}")

    def _check_acyclic(self) -> None:
        state: dict[str, int] = {}

        def visit(name: str) -> None:
            if state.get(name) == 1:
                raise ValueError(f"workflow has a cycle through node {name}")
            if state.get(name) == 2:
                return
            state[name] = 1
            for ref in self.nodes[name].sources().values():
                if not ref.from_request:
                    visit(ref.node)
            state[name] = 2

        for name in self.nodes:
            visit(name)

    def monolithic_pool(self) -> str:
        """The pool that serves this whole workflow in one process (the monolithic baseline)."""
        return pool_name(MONOLITHIC, self.name)

    def pools(self, *, monolithic: bool = False) -> dict[str, tuple[str, str]]:
        """pool name -> (node kind, model spec) for every node of this workflow; with
        ``monolithic``, the one pool -> ("monolithic", workflow name)."""
        if monolithic:
            return {self.monolithic_pool(): (MONOLITHIC, self.name)}
        return {
            pool_of(node.kind, self.models[node.model]): (node.kind, self.models[node.model])
            for node in self.nodes.values()
        }

    def compile(self, *, monolithic: bool = False, parallel: str = "off") -> Plan:
        """The DAG of node tasks; with ``monolithic``, one node ``pipeline`` that runs the whole
        workflow and takes every uploaded image the workflow reads (``request.<param>``).
        ``parallel``: the CFG parallelism of its guided nodes (those whose rows guidance
        doubles; a node's core says whether it splits them) where it names none."""
        if monolithic:
            images = sorted({
                ref.name
                for node in self.nodes.values()
                for ref in node.sources().values()
                if ref.from_request
            })
            pipeline = PlanNode(
                kind=MONOLITHIC,
                pool=self.monolithic_pool(),
                op="run",
                inputs={p: str(Ref.request(p)) for p in images},
            )
            return Plan(nodes={"pipeline": pipeline}, output="pipeline.image")
        return Plan(
            nodes={
                name: PlanNode(
                    kind=node.kind,
                    pool=pool_of(node.kind, self.models[node.model]),
                    op=KINDS[node.kind].op,
                    inputs=dict(node.inputs),
                    adapters=[self.models[node.controlnet]] if node.controlnet else [],
                    parallel=(self.parallel or parallel) if KINDS[node.kind].guided else "off",
                )
                for name, node in self.nodes.items()
            },
            output=self.output,
        )


def parse_workflow(data: dict[str, Any] | str | bytes) -> WorkflowSpec:
    """A WorkflowSpec from a mapping or YAML/JSON text; ``InvalidRequest`` when malformed."""
    if isinstance(data, str | bytes):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise InvalidRequest([InvalidField("workflow", f"not YAML or JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise InvalidRequest([InvalidField("workflow", "expected a mapping")])
    try:
        _check_text(data)
    except UnicodeError as exc:  # a lone surrogate (JSON's or YAML's "\ud800") is no text
        raise InvalidRequest([InvalidField("workflow", f"not valid Unicode: {exc}")]) from None
    try:
        return WorkflowSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(
            [
                InvalidField(".".join(str(p) for p in err["loc"]) or "workflow", err["msg"])
                for err in exc.errors()
            ]
        ) from None


def _check_text(node: Any) -> None:
    """Raise ``UnicodeError`` for a string in ``node`` that is no UTF-8 text."""
    if isinstance(node, str):
        node.encode()
    elif isinstance(node, dict):
        for key, value in node.items():
            _check_text(key)
            _check_text(value)
    elif isinstance(node, list):
        for value in node:
            _check_text(value)


def builtin_workflows(models: dict[str, str] | None = None) -> dict[str, WorkflowSpec]:
    """The shipped workflows, with their named models replaced by ``models`` where given;
    a workflow whose model would be replaced by one of another family (``common.families``:
    an SDXL workflow when the base model is SD 1.x) is left out (``family_mismatch`` says
    why)."""
    found = {}
    for spec in _shipped().values():
        if models:
            if family_mismatch(spec, models):
                continue
            replaced = {k: models.get(k, v) for k, v in spec.models.items()}
            spec = spec.model_copy(update={"models": replaced})
        found[spec.name] = spec
    return found


@functools.cache
def _shipped() -> dict[str, WorkflowSpec]:
    specs = (parse_workflow(path.read_text()) for path in sorted(BUILTIN_DIR.glob("*.yaml")))
    return {spec.name: spec for spec in specs}


def family_mismatch(spec: WorkflowSpec, models: Mapping[str, str]) -> str | None:
    """Why ``spec`` cannot run with its models replaced by ``models`` (alias -> spec): a
    replacement of another family than the model the workflow was written for. None when
    every family fits, or is not known (a plug-in's model: left to its load); and a shipped
    ControlNet that ``models`` does not name beside a replaced base model (a builtin's
    ControlNet fits that builtin alone)."""
    from common.families import TITLES, family_of

    for alias, shipped in spec.models.items():
        model = models.get(alias, shipped)
        if model == shipped:
            continue
        wanted, given = family_of(shipped), family_of(model)
        if wanted and given and wanted != given:
            return (f"its {alias} model must be {TITLES[wanted]} ({shipped} is one); "
                    f"{model} is {TITLES[given]}")
    for node in spec.nodes.values():
        base, control = node.model, node.controlnet
        if (control is not None and models.get(base, spec.models[base]) != spec.models[base]
                and control not in models):
            return (f"its ControlNet {spec.models[control]} is made for {spec.models[base]}; "
                    f"name one for {models[base]} (the models setting: "
                    f'{{"{control}": DIR}})')
    return None


# --- request validation ---------------------------------------------------------------------

def truncation_warning(field: str, n_tokens: int, limit: int) -> str:
    """The one wording of a truncation warning (validation and text encoders both report)."""
    return (
        f"{field}: {n_tokens} tokens exceed the model's limit of {limit}; "
        "truncated as diffusers does"
    )


class ModelInfo(Protocol):
    """What validation needs to know about a model; supplied by the caller (it owns the files)."""

    def count_tokens(self, model: str, text: str) -> tuple[int, int]:
        """(tokens in ``text``, the model's token limit)."""
        ...

    def native_size(self, model: str) -> tuple[int, int]:
        """(width, height) the model makes by default, as diffusers picks it."""
        ...

    def lora_problem(self, name: str) -> str | None:
        """Why LoRA ``name`` cannot be served (none configured, no such file), or None."""
        ...


@dataclass
class ValidRequest:
    """A request that passed validation: JSON-safe params, decoded images, warnings; and its
    webhook, if it names one (checked by the ingress: ``common.webhooks``)."""

    params: dict[str, Any]
    images: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    webhook: Webhook | None = None


def validate_params(
    spec: WorkflowSpec, raw: dict[str, Any], models: ModelInfo | None = None
) -> ValidRequest:
    """Check every parameter against its limits; every problem is reported, each naming the
    field and the limit. Absent parameters take their defaults; seeds are drawn here so a
    retried task reproduces the same image."""
    errors: list[InvalidField] = []
    out = ValidRequest(params={})
    for key in raw:
        if key not in spec.params and key not in ENVELOPE_KEYS:
            errors.append(
                InvalidField(
                    key, f"unknown parameter for workflow {spec.name!r}",
                    limit=sorted(spec.params),
                )
            )
    for name, p in spec.params.items():
        value = raw.get(name)
        if value is None:
            if p.required:
                errors.append(InvalidField(name, "is required"))
            elif p.random:
                out.params[name] = secrets.randbelow(int(p.maximum or 2**32) + 1)
            elif p.default_from and models is not None:
                width, height = models.native_size(spec.models[p.default_from])
                out.params[name] = height if name == "height" else width
            elif p.default is not None:
                out.params[name] = p.default
            continue
        try:
            if p.type == "image":
                image = _check_image(name, p, value)
                out.images[name] = image
                out.params[name] = {"width": image.shape[1], "height": image.shape[0]}
            elif p.type == "loras":
                out.params[name] = check_loras(name, value, p.max_items)
                for i, lora in enumerate(out.params[name]):
                    problem = None if models is None else models.lora_problem(lora["name"])
                    if problem is not None:
                        raise InvalidField(f"{name}[{i}].name", problem)
            else:
                out.params[name] = _check_scalar(name, p, value)
                if p.tokenizer and models is not None and isinstance(value, str):
                    count, limit = models.count_tokens(spec.models[p.tokenizer], value)
                    if count > limit:
                        out.warnings.append(truncation_warning(name, count, limit))
        except InvalidField as exc:
            errors.append(exc)
    strength, steps = out.params.get("strength"), out.params.get("steps")
    if not errors and strength is not None and steps is not None and int(steps * strength) < 1:
        # diffusers' img2img runs int(steps * strength) steps and refuses zero
        errors.append(InvalidField(
            "strength", f"steps x strength = {steps * strength:g} runs no step; it must be >= 1",
            1,
        ))
    if errors:
        raise InvalidRequest(errors)
    return out


def _check_scalar(name: str, p: ParamSpec, value: Any) -> Any:
    if p.type == "string":
        if not isinstance(value, str):
            raise InvalidField(name, "must be a string")
        if p.max_length is not None and len(value) > p.max_length:
            raise InvalidField(
                name, f"{len(value)} characters exceed the limit of {p.max_length}", p.max_length
            )
    elif p.type == "boolean":
        if not isinstance(value, bool):
            raise InvalidField(name, "must be true or false")
    else:
        integer = p.type == "integer"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidField(name, "must be an integer" if integer else "must be a number")
        if integer and isinstance(value, float):
            if not value.is_integer():
                raise InvalidField(name, "must be an integer")
            value = int(value)
        if not integer:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise InvalidField(name, "must be a finite number")
        if p.minimum is not None and value < p.minimum:
            raise InvalidField(name, f"{value} is below the minimum of {_num(p.minimum)}",
                               _num(p.minimum))
        if p.maximum is not None and value > p.maximum:
            raise InvalidField(name, f"{value} is above the maximum of {_num(p.maximum)}",
                               _num(p.maximum))
        if p.multiple_of and value % p.multiple_of:
            raise InvalidField(name, f"{value} is not a multiple of {p.multiple_of}",
                               p.multiple_of)
    if p.choices is not None and value not in p.choices:
        raise InvalidField(name, f"{value!r} is not one of {p.choices}", p.choices)
    return value


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


#: a LoRA's name: its file in the ``lora_dir`` setting is ``NAME.safetensors``
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"
def lora_path(lora_dir: Path, name: str) -> Path:
    """Where LoRA ``name`` is: ``lora_dir/NAME.safetensors``."""
    return Path(lora_dir) / f"{name}.safetensors"


#: the scale a request may give a LoRA
LORA_SCALE = (-4.0, 4.0)


def check_loras(name: str, value: Any, max_items: int | None) -> list[dict[str, Any]]:
    """A request's LoRAs, ``[{"name", "scale"}]`` (scale 1.0 when absent); a LoRA named
    twice counts once, with its scales added (a LoRA's effect is linear in its scale)."""
    import re

    if not isinstance(value, list):
        raise InvalidField(name, 'must be a list of {"name", "scale"} objects')
    if max_items is not None and len(value) > max_items:
        raise InvalidField(name, f"{len(value)} LoRAs exceed the limit of {max_items}", max_items)
    loras: list[dict[str, Any]] = []
    for i, entry in enumerate(value):
        field = f"{name}[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "scale"}:
            raise InvalidField(field, 'must be an object with "name" and optionally "scale"')
        lora = entry.get("name")
        if not isinstance(lora, str) or not re.fullmatch(LORA_NAME, lora):
            raise InvalidField(f"{field}.name", "must be a LoRA's name: letters, digits, "
                               "'_', '.', '-', at most 100", LORA_NAME)
        scale = entry.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
                LORA_SCALE[0] <= scale <= LORA_SCALE[1]):
            raise InvalidField(f"{field}.scale", f"must be a number in [{LORA_SCALE[0]:g}, "
                               f"{LORA_SCALE[1]:g}]", list(LORA_SCALE))
        same = next((seen for seen in loras if seen["name"] == lora), None)
        if same is not None:
            same["scale"] += float(scale)
        else:
            loras.append({"name": lora, "scale": float(scale)})
    return loras


def _check_image(name: str, p: ParamSpec, value: Any) -> np.ndarray:
    """Decode a base64 (or data: URL) PNG/JPEG/WebP into an RGB uint8 array (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise InvalidField(name, "must be a base64-encoded image (PNG, JPEG or WebP)")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if p.max_bytes is not None and len(value) * 3 // 4 > p.max_bytes + 3:
        raise PayloadTooLarge(name, len(value) * 3 // 4, p.max_bytes)  # type: ignore[arg-type]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(name, "is not valid base64") from None
    if p.max_bytes is not None and len(data) > p.max_bytes:
        raise PayloadTooLarge(name, len(data), p.max_bytes)  # type: ignore[arg-type]
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if p.max_pixels is not None and width * height > p.max_pixels:
                raise InvalidField(
                    name, f"{width}x{height} pixels exceed the limit of {p.max_pixels}",
                    p.max_pixels,
                )
            if min(width, height) < p.min_side:
                raise InvalidField(
                    name, f"{width}x{height} is smaller than {p.min_side} pixels a side",
                    p.min_side,
                )
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise InvalidField(name, "is not a PNG, JPEG or WebP image") from None


#: a named set of workflows a plug-in serves instead of the shipped ones (``settings.workload``)
WorkflowSource = Callable[["Settings"], dict[str, WorkflowSpec]]
#: workload name -> where its workflows come from (plug-ins register: ``plugins`` setting)
WORKFLOW_SOURCES: dict[str, WorkflowSource] = {}


def register_workflow_source(name: str, source: WorkflowSource) -> None:
    """``settings.workload == name`` serves ``source(settings)`` instead of the shipped ones."""
    WORKFLOW_SOURCES[name] = source


def missing_components(
    spec: WorkflowSpec, components: Mapping[str, frozenset[str] | None]
) -> dict[str, tuple[str, ...]]:
    """Per node of ``spec`` that cannot load, the components its kind ``requires`` that its
    model lacks. ``components``: model spec -> the components that model has (None, or no
    entry: unknown, such as a builtin or a plug-in's model, taken as complete)."""
    missing = {}
    for name, node in spec.nodes.items():
        model = spec.models[node.model]
        have = components.get(model)
        if have is None:
            continue
        wanted = KINDS[node.kind].requires_of(families.family_of(model))
        lacking = tuple(c for c in wanted if c not in have)
        if lacking:
            missing[name] = lacking
    return missing


def servable(
    specs: Mapping[str, WorkflowSpec], components: Mapping[str, frozenset[str] | None]
) -> tuple[dict[str, WorkflowSpec], dict[str, str]]:
    """Split ``specs`` into those their models can serve and, for the others, why not (a
    node's model lacks a component its kind loads: a checkpoint published without a safety
    checker cannot serve a workflow that checks images). ``components`` as for
    ``missing_components``. Pure."""
    kept, left_out = {}, {}
    for name, spec in specs.items():
        missing = missing_components(spec, components)
        if not missing:
            kept[name] = spec
            continue
        left_out[name] = "; ".join(
            f"node {node} ({spec.nodes[node].kind}) needs {', '.join(parts)}, which "
            f"{spec.models[spec.nodes[node].model]} lacks"
            for node, parts in missing.items()
        )
    return kept, left_out


def offered_workflows(settings: Settings) -> tuple[dict[str, WorkflowSpec], dict[str, str]]:
    """The shipped workflows (``shipped_workflows``'s choice) split into those the configured
    models can serve and, for the others, why not (``servable``, on what each model
    directory's ``model_index.json`` and subfolders hold)."""
    from common.models import model_components

    chosen = _chosen_workflows(settings)
    models = {m for spec in chosen.values() for m in spec.models.values()}
    return servable(chosen, {m: model_components(m) for m in models})


def shipped_workflows(settings: Settings) -> dict[str, WorkflowSpec]:
    """The shipped workflows on the configured models, those ``settings.workflows`` names (or
    all of them); with ``settings.workload``, that workload's workflows instead (from the
    source a plug-in registered under its name). A workflow whose model lacks a component one
    of its nodes loads is left out, with a logged warning (``offered_workflows`` says why)."""
    offered, left_out = offered_workflows(settings)
    for name, why in left_out.items():
        log.warning("workflow %s is not offered: %s", name, why)
    return offered


def _configured_models(settings: Settings) -> dict[str, str]:
    return settings.named_models


def other_family_workflows(settings: Settings) -> dict[str, str]:
    """The shipped workflows written for another family than the configured models (SDXL's
    on an SD 1.x base model): not served, and why (``family_mismatch``)."""
    if settings.workload:
        return {}
    models = _configured_models(settings)
    return {name: why for name, spec in _shipped().items()
            if (why := family_mismatch(spec, models))}


def default_workflow(settings: Settings) -> str:
    """What ``lego generate`` runs unless told: text to image on the base model's family
    (``txt2img``, ``sdxl-txt2img`` on an SDXL model)."""
    names = sorted(builtin_workflows(_configured_models(settings)))
    return next((n for n in names if n == "txt2img"),
                next((n for n in names if n.endswith("txt2img")), "txt2img"))


def _chosen_workflows(settings: Settings) -> dict[str, WorkflowSpec]:
    if settings.workload:
        source = WORKFLOW_SOURCES.get(settings.workload)
        if source is None:
            known = ", ".join(sorted(WORKFLOW_SOURCES)) or "none (the plugins setting loads them)"
            raise ValueError(f"workload: unknown {settings.workload!r}; registered: {known}")
        found = source(settings)
    else:
        found = builtin_workflows(_configured_models(settings))
        for name, why in other_family_workflows(settings).items():
            if name in settings.workflows:
                raise ValueError(f"workflows: {name} cannot run here: {why}")
    unknown = set(settings.workflows) - set(found)
    if unknown:
        raise ValueError(f"workflows: unknown {sorted(unknown)}; shipped: {sorted(found)}")
    return {n: s for n, s in found.items() if not settings.workflows or n in settings.workflows}
