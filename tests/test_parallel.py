"""CFG parallelism: a denoising step's two guidance branches on two devices. The policy (pure);
every family's split step against its whole step on real tiny models (within 1/255 per pixel:
split guidance rounds differently from batched guidance); and two device hosts on a real
nats-server, one helping the other's steps through the tensor store."""
# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before diffusers/transformers are imported)

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import torch
from nats.errors import NoRespondersError

from common import subjects
from common.messages import (
    BranchResult,
    BranchStep,
    Plan,
    PlanNode,
    RequestState,
    Task,
    TensorRef,
    decode,
    encode,
    now,
)
from common.models import resolve_model_dir
from common.settings import Settings
from common.store import tensor_key
from common.workflow import parse_workflow
from services import parallel
from services.catalog import core_class
from services.core import ModelCore, ModelSource, WorkItem
from services.host import DeviceHost
from tests.test_cores import drive
from tests.test_device_host import Harness

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse on mars", "blurry, low quality"


# --- the policy (pure) -----------------------------------------------------------------------

def test_a_batch_splits_only_where_every_task_allows_it():
    assert parallel.batch_mode(["always", "auto"]) == "auto"
    assert parallel.batch_mode(["always", "off", "always"]) == "off"
    assert parallel.batch_mode(["always"]) == "always"
    assert parallel.batch_mode(["sideways"]) == "off"


def test_auto_splits_while_it_pays_and_tries_again_now_and_then():
    figures = parallel.SplitFigures()
    assert not figures.wants("off", 1, 0.1)
    assert figures.wants("always", 1, 0.1)
    assert figures.wants("auto", 1, 0.1)  # not tried yet: try it
    figures.ran(1, 0.06)
    assert not figures.wants("auto", 1, 0.0)  # no whole step to compare with: measure one
    assert figures.wants("auto", 1, 0.1)  # 0.06 s split against 0.1 s whole: it pays
    assert not figures.wants("auto", 2, 0.1) or figures.split_s.get(2) is None
    for _ in range(20):
        figures.ran(1, 0.2)  # hand-offs grew: now slower than a whole step
    tries = [figures.wants("auto", 1, 0.1) for _ in range(7 * parallel.PROBE_EVERY)]
    # after PROBE_EVERY whole steps, then twice as many after each try that did not pay
    assert [i + 1 for i, tried in enumerate(tries) if tried] == [
        parallel.PROBE_EVERY, 3 * parallel.PROBE_EVERY, 7 * parallel.PROBE_EVERY]
    for _ in range(20):
        figures.ran(1, 0.05)  # it pays again: tries come every PROBE_EVERY once it stops
    assert figures.wants("auto", 1, 0.1) and figures.probe_every == parallel.PROBE_EVERY
    assert figures.wants("always", 1, 0.1)  # always is always


def test_a_step_runs_apart_the_first_part_it_can_while_that_pays():
    figures = {part: parallel.SplitFigures() for part in parallel.PARTS}
    both, control_only = {"cfg": True, "controlnet": True}, {"cfg": False, "controlnet": True}
    parts = ["cfg", "controlnet"]
    assert parallel.step_part("auto", parts, both, figures, 1, 0.1) == "cfg"
    assert parallel.step_part("auto", parts, control_only, figures, 1, 0.1) == "controlnet"
    assert parallel.step_part("auto", ["cfg"], control_only, figures, 1, 0.1) is None
    assert parallel.step_part("off", parts, both, figures, 1, 0.1) is None
    figures["cfg"].ran(1, 0.2)  # the branches apart do not pay: the step runs whole, its
    assert parallel.step_part("auto", parts, both, figures, 1, 0.1) is None  # ControlNet too


def test_a_deadline_is_at_stake_only_where_the_split_decides_it():
    # 10 s of steps left; splitting them at 0.6 of the time saves 4 s
    assert parallel.at_stake(3.0, 10.0, 0.6)  # it makes it whole, by less than the split saves
    assert parallel.at_stake(-3.0, 10.0, 0.6)  # it misses whole, makes it split
    assert not parallel.at_stake(5.0, 10.0, 0.6)  # time to spare: leave the helper be
    assert not parallel.at_stake(-5.0, 10.0, 0.6)  # it misses even split
    assert not parallel.at_stake(float("inf"), 10.0, 0.6)  # no deadline
    assert not parallel.at_stake(0.0, 10.0, 1.2)  # a split that does not pay saves nothing
    figures = parallel.SplitFigures()
    assert figures.ratio(1, 0.1) == parallel.GAIN  # not measured yet
    figures.ran(1, 0.06)
    assert figures.ratio(1, 0.1) == pytest.approx(0.6) and figures.ratio(2, 0.1) == parallel.GAIN


def test_asks_that_no_helper_takes_come_ever_more_seldom():
    assert [parallel.no_helper_steps(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 128,
                                                                  128]
    assert parallel.no_helper_steps(10_000) == parallel.NO_HELPER_MAX


def test_a_device_s_busy_share_counts_its_recent_steps_only():
    busy = parallel.Utilization(window_s=10.0)
    assert busy.share(100.0) == 0.0
    busy.ran(85.0, 89.0)  # wholly before the window
    busy.ran(89.0, 93.0)  # 3 s of it inside
    busy.ran(95.0, 97.0)
    assert busy.share(100.0) == pytest.approx(0.5)
    assert busy.share(120.0) == 0.0


def test_a_workflow_names_its_parallelism_and_the_deployment_gives_the_default():
    spec = {
        "name": "w", "models": {"base": "builtin:tiny-sd"},
        "params": {"prompt": {"type": "string", "required": True},
                   "negative_prompt": {"type": "string", "default": ""},
                   "guidance": {"type": "number", "default": 7.5},
                   "steps": {"type": "integer", "default": 4},
                   "seed": {"type": "integer", "default": 0},
                   "width": {"type": "integer", "default": 64},
                   "height": {"type": "integer", "default": 64}},
        "nodes": {"encode": {"kind": "text_encoder", "model": "base"},
                  "denoise": {"kind": "denoiser", "model": "base",
                              "inputs": {"prompt_embeds": "encode.prompt_embeds"}},
                  "decode": {"kind": "vae_decoder", "model": "base",
                             "inputs": {"latents": "denoise.latents"}}},
        "output": "decode.image",
    }
    plan = parse_workflow(spec).compile(parallel="auto")
    # the nodes whose rows guidance doubles (a node's core says whether it splits them)
    assert plan.nodes["denoise"].parallel == plan.nodes["encode"].parallel == "auto"
    assert plan.nodes["decode"].parallel == "off"
    named = parse_workflow({**spec, "parallel": "always"}).compile(parallel="off")
    assert named.nodes["denoise"].parallel == "always"
    with pytest.raises(Exception, match="parallel"):
        parse_workflow({**spec, "parallel": "sometimes"})


# --- every family's split step, on real tiny models ------------------------------------------

FAMILIES = {"sd": "builtin:tiny-sd", "sdxl": "builtin:tiny-sdxl", "sd3": "builtin:tiny-sd3",
            "flux": "builtin:tiny-flux"}


def _cores(model_dir: Path, kinds: tuple[str, ...]) -> SimpleNamespace:
    found = {}
    for kind in kinds:
        core = core_class(kind, model_dir)(model_dir)
        core.load()
        found[kind] = core
    return SimpleNamespace(**found)


def split_drive(core: ModelCore, helper: ModelCore, items: list[WorkItem]) -> list:
    """Run ``items`` as a home and a helper would: every step's negative branch on
    ``helper`` (its own states, made from the same items), the positive on ``core``."""
    states = [core.start(item) for item in items]
    for item in items:
        if helper.needs_prepare(item):  # its ControlNet, loaded there too
            helper.prepare(item)
    copies = [helper.start(item) for item in items]
    while not all(core.done(s) for s in states):
        assert core.splits(states)
        inputs = core.branch_inputs(states)
        steps = [core.progress(s)[0] for s in states]
        negative = helper.run_branch(copies, 0, inputs.clone(), steps)
        positive = core.run_branch(states, 1, inputs, steps)
        core.join_branches(states, negative, positive)
    return [core.finish(s) for s in states]


def control_drive(core: ModelCore, helper: ModelCore, items: list[WorkItem],
                  order: list[str] | None = None) -> list:
    """Run ``items`` as a home and a helper would with ControlNet parallelism: every step's
    ControlNet on ``helper`` (its own states), the step on ``core``, which takes the
    ControlNet's outputs when its model needs them (noted in ``order``)."""
    states = [core.start(item) for item in items]
    for item in items:
        if helper.needs_prepare(item):
            helper.prepare(item)
    copies = [helper.start(item) for item in items]

    def taken(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if order is not None:
            order.append("outputs")
        return outputs

    while not all(core.done(s) for s in states):
        assert core.control_splits(states)
        inputs = core.branch_inputs(states)
        steps = [core.progress(s)[0] for s in states]
        outputs = helper.run_control(copies, inputs.clone(), steps)
        core.step_controlled(states, lambda outputs=outputs: taken(outputs))
    return [core.finish(s) for s in states]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_split_step_makes_the_whole_steps_image(family: str, cache_dir: Path) -> None:
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(FAMILIES[family], cache_dir / "models")
    t5 = {"sd3": "t5_prompt_embeds", "flux": "prompt_embeds"}.get(family)
    kinds = ("text_encoder", "denoiser", "vae_decoder") + (("t5_encoder",) if t5 else ())
    cores = _cores(model_dir, kinds)
    helper = _cores(model_dir, ("denoiser",)).denoiser  # another device's copy
    requests = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 6.0,
                 "true_cfg_scale": 4.0, "steps": 3, "seed": 11, "max_sequence_length": 32},
                {"prompt": "a red dragon", "negative_prompt": "", "guidance": 3.0,
                 "true_cfg_scale": 2.0, "steps": 3, "seed": 5, "max_sequence_length": 32}]
    items = []
    for i, params in enumerate(requests):
        inputs = dict(drive(cores.text_encoder, [WorkItem(f"r{i}", "encode", params, {})])[0]
                      .tensors)
        if t5:
            inputs[t5] = drive(cores.t5_encoder, [WorkItem(f"r{i}", "encode", params, {})]
                               )[0].tensors["prompt_embeds"]
        items.append(WorkItem(f"r{i}", "denoise", params, inputs))
    whole = drive(cores.denoiser, items)
    split = split_drive(cores.denoiser, helper, items)
    for a, b in zip(whole, split, strict=True):
        images = [drive(cores.vae_decoder, [WorkItem("d", "decode", {}, {
            "latents": r.tensors["latents"]})])[0].tensors["image"].int() for r in (a, b)]
        assert (images[0] - images[1]).abs().max() <= 1  # 1/255 per pixel


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_split_t5_encoding_makes_the_whole_embeddings(family: str, cache_dir: Path) -> None:
    """CFG parallelism of a T5 encoder: each request's negative prompt encoded on a helper
    and its positive one here give the bits of the whole guided pass; an unguided request
    has nothing to split."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(FAMILIES[family], cache_dir / "models")
    core, helper = (_cores(model_dir, ("t5_encoder",)).t5_encoder for _ in range(2))
    guided = {"guidance": 6.0, "true_cfg_scale": 4.0, "max_sequence_length": 32}
    items = [WorkItem(f"r{i}", "encode", {"prompt": prompt, "negative_prompt": negative,
                                          **guided}, {})
             for i, (prompt, negative) in enumerate(((PROMPT, NEGATIVE), ("a red dragon", "")))]
    whole = drive(core, items)
    split = split_drive(core, helper, items)
    for a, b in zip(whole, split, strict=True):
        assert a.tensors["prompt_embeds"].shape[0] == 2  # negative, positive
        assert torch.equal(a.tensors["prompt_embeds"], b.tensors["prompt_embeds"])
    unguided = WorkItem("u", "encode", {"prompt": PROMPT, "guidance": 1.0,
                                        "max_sequence_length": 32}, {})
    assert not core.splits([core.start(unguided)])


# --- two device hosts on a real nats-server ---------------------------------------------------

async def _denoise(h: Harness, request_id: str, pool: str, inputs: dict[str, torch.Tensor],
                   params: dict, mode: str, adapters: tuple[str, ...] = ()) -> torch.Tensor:
    """Publish one denoiser task (its inputs in the store; ``adapters``: its ControlNet) and
    return its latents."""
    plan = Plan(nodes={
        "encode": PlanNode(kind="text_encoder", pool="unused", op="encode"),
        "denoise": PlanNode(kind="denoiser", pool=pool, op="denoise",
                            inputs={"prompt_embeds": "encode.prompt_embeds"}, parallel=mode,
                            adapters=list(adapters))},
        output="denoise.latents")
    refs = {name: await h.store.put(tensor_key("tmp", request_id, "encode", name), tensor, 600)
            for name, tensor in inputs.items()}
    return await _run_task(h, request_id, pool, plan, "denoise", params, refs)


async def _run_task(h: Harness, request_id: str, pool: str, plan: Plan, node: str,
                    params: dict, refs: dict[str, TensorRef]) -> torch.Tensor:
    """Publish ``node``'s task of a request of ``plan`` and return its output."""
    at = now()
    await h.tracker.create(RequestState(id=request_id, workflow="t", status="queued",
                                        created_at=at, updated_at=at))
    task = Task(request_id=request_id, workflow="t", node=node, plan=plan, params=params,
                inputs=refs, submitted_at=at, published_at=at)
    await h.js.publish(f"lego.tasks.{pool}", encode(task))
    (state,) = await h.finished(request_id)
    assert state.image is not None
    return await h.store.get(state.image)


async def _host(h: Harness, name: str, model_dir: Path, pool: str,
                source: ModelSource | None = None, kind: str = "denoiser",
                **settings: object) -> DeviceHost:
    host = DeviceHost(h.settings.model_copy(update=settings), name, device=name)
    ready = asyncio.Event()
    core = core_class(kind, model_dir)(model_dir)
    core.source = source  # where its ControlNets are
    tasks = [asyncio.create_task(host.serve()), asyncio.create_task(
        host.run_pool(core, pool, str(model_dir), f"{pool}@{name}", ready=ready))]
    h.hosts.append((host, tasks))
    await ready.wait()
    return host


@pytest.mark.timeout(120)
async def test_a_helper_busy_lately_helps_only_steps_whose_deadline_is_at_stake(
        settings: Settings, cache_dir: Path) -> None:
    """An idle host busy for most of the last window offers on the urgent branch subject
    only: an ordinary ask finds no helper, an urgent one is taken (and until it has run, the
    host is not idle), unless it came too late to be taken in time; busy nearly all of it, on
    neither. Idle and not busy lately, it offers on both."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    pool = "denoiser-tiny-sd"
    async with Harness(settings.model_copy(update={"host_poll_s": 0.1})) as h:
        helper = await _host(h, "cpu:1", model_dir, pool, parallel="auto",
                             parallel_window_s=30.0)
        async with asyncio.timeout(10):
            while not (helper.branches.offering() and helper.branches.offering(urgent=True)):
                await asyncio.sleep(0.01)
        started = time.perf_counter()
        helper.branches.utilization.ran(started - 20.0, started)  # busy 2/3 of the window
        helper.changed()
        async with asyncio.timeout(10):
            while helper.branches.offering():
                await asyncio.sleep(0.01)
        await helper.nc.flush()  # the server took its withdrawal before the ask
        assert helper.branches.offering(urgent=True) == [f"{pool}@cpu:1"]
        at = now()
        plan = Plan(nodes={"denoise": PlanNode(kind="denoiser", pool=pool, op="denoise")},
                    output="denoise.latents")
        task = Task(request_id="r", workflow="t", node="denoise", plan=plan, params={},
                    inputs={}, submitted_at=at, published_at=at)
        ask = BranchStep(host="cpu:0", tasks=[task], steps=[0], sample=TensorRef(
            store="shm", key="tmp/r/denoise/cfg_sample", dtype="float32", shape=[1], nbytes=4))
        with pytest.raises(NoRespondersError):
            await h.nc.request(subjects.branch_subject(pool), encode(ask), timeout=2)
        idle_while_helping: list[bool] = []
        help_ = helper.branches._help

        async def spying(job: Any) -> None:
            idle_while_helping.append(helper.idle())
            await help_(job)

        helper.branches._help = spying  # type: ignore[method-assign]
        answer = await h.nc.request(subjects.branch_subject(pool, urgent=True), encode(ask),
                                    timeout=2)
        assert decode(answer.data, BranchResult).accepted
        async with asyncio.timeout(10):
            while not idle_while_helping or not helper.idle():
                await asyncio.sleep(0.01)
        # while it helped, a new arrival would have waited behind it: not idle, so its fetch
        # took only queued work, and one that reached it went back to the queue
        assert idle_while_helping == [False]
        # an ask that reached it too late for its acceptance to arrive before its home stops
        # waiting: declined (it would have run a branch nobody waits for)
        async with asyncio.timeout(10):
            while not helper.branches.offering(urgent=True):
                await asyncio.sleep(0.01)
        await helper.nc.flush()  # the server has its offer (subscription) before the ask
        late = msgspec.structs.replace(ask, accept_by=now())
        answer = await h.nc.request(subjects.branch_subject(pool, urgent=True), encode(late),
                                    timeout=2)
        assert "too late" in (decode(answer.data, BranchResult).declined or "")
        assert idle_while_helping == [False]
        # busy nearly all of the window (near capacity): it helps no step at all
        at_s = time.perf_counter()
        helper.branches.utilization.ran(at_s - 30.0, at_s)
        helper.changed()
        async with asyncio.timeout(10):
            while helper.branches.offering(urgent=True):
                await asyncio.sleep(0.01)
        assert helper.branches.offering() == []


@pytest.mark.timeout(180)
async def test_a_home_no_helper_answers_asks_ever_more_seldom_and_still_measures_its_steps(
        settings: Settings, cache_dir: Path) -> None:
    """Alone with a workflow that asks for parallelism at every step, and a helper that
    declines each ask: the host asks at the first step, then after 8 whole steps, then after
    16, ...; and every step, those it asked at included, counts to its step figures (a pool
    that asked at every step once never measured one, and asked at every step for good)."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    cores = _cores(model_dir, ("text_encoder",))
    steps = 30
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 7.5, "steps": steps,
              "seed": 3, "width": 64, "height": 64}
    embeds = drive(cores.text_encoder, [WorkItem("r", "encode", params, {})])[0].tensors[
        "prompt_embeds"]
    pool = "denoiser-tiny-sd"
    async with Harness(settings.model_copy(update={"host_poll_s": 0.1})) as h:
        asked: list[int] = []

        async def decline(msg: Any) -> None:
            asked.extend(decode(msg.data, BranchStep).steps)
            await msg.respond(encode(BranchResult(declined="busy")))

        for urgent in (False, True):
            await h.nc.subscribe(subjects.branch_subject(pool, urgent), cb=decline)
        host = await _host(h, "cpu:1", model_dir, pool)
        await _denoise(h, "r", pool, {"prompt_embeds": embeds}, params, "always")
        expected, step, misses = [], 0, 0
        while step < steps:
            expected.append(step)
            misses += 1
            step += 1 + parallel.no_helper_steps(misses)
        assert asked == expected == [0, 2, 5, 10, 19]
        feed = host.feeds[f"{pool}@cpu:1"]
        assert feed.stats.split_steps == 0
        assert feed._single_steps == steps and feed.step_time_s(1) > 0


@pytest.mark.timeout(180)
async def test_an_idle_host_runs_the_negative_branch_of_another_hosts_steps(
        settings: Settings, cache_dir: Path) -> None:
    """Host 1 holds a request's task; host 2, idle with the same model, runs the negative
    branch of its steps (asked over NATS, tensors through the store). The latents equal the
    whole steps' within float tolerance; with parallelism off, or alone, the steps run whole
    and the latents are the same bits as the core's own."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir("builtin:tiny-sd", cache_dir / "models")
    cores = _cores(model_dir, ("text_encoder", "denoiser"))
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 7.5, "steps": 6,
              "seed": 3, "width": 64, "height": 64}
    embeds = drive(cores.text_encoder, [WorkItem("r", "encode", params, {})])[0].tensors[
        "prompt_embeds"]
    expected = drive(cores.denoiser, [WorkItem("r", "denoise", params,
                                               {"prompt_embeds": embeds})])[0].tensors["latents"]
    pool = "denoiser-tiny-sd"
    async with Harness(settings.model_copy(update={"host_poll_s": 0.1})) as h:
        first = await _host(h, "cpu:1", model_dir, pool)
        alone = await _denoise(h, "alone", pool, {"prompt_embeds": embeds}, params, "always")
        assert torch.equal(alone, expected)  # no helper answered: whole steps
        assert first.feeds[f"{pool}@cpu:1"].stats.split_steps == 0
        # a host offers once parallelism is asked for: by its settings, or a task taken
        assert first.branches.wanted  # it took a task that asks for it
        second = await _host(h, "cpu:2", model_dir, pool, parallel="auto")
        async with asyncio.timeout(10):
            while not second.branches.offering():  # idle with the model: it offers to help
                await asyncio.sleep(0.01)
        latents = await _denoise(h, "split", pool, {"prompt_embeds": embeds}, params, "always")
        feeds = [first.feeds[f"{pool}@cpu:1"], second.feeds[f"{pool}@cpu:2"]]
        split = sum(f.stats.split_steps for f in feeds)
        helped = sum(f.stats.helped_steps for f in feeds)
        assert split == helped >= 1  # every split step was another host's branch
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-3)
        off = await _denoise(h, "off", pool, {"prompt_embeds": embeds}, params, "off")
        assert torch.equal(off, expected)
        assert sum(f.stats.split_steps for f in feeds) == split


@pytest.mark.timeout(180)
async def test_an_idle_host_encodes_the_negative_prompt_of_another_hosts_t5_task(
        settings: Settings, cache_dir: Path) -> None:
    """CFG parallelism of a one-step task: host 2, idle with the same T5 encoder, encodes the
    negative prompt of host 1's guided task, which encodes the positive one; the embeddings
    are the same bits as the whole pass's."""
    torch.set_num_threads(1)
    model_dir = resolve_model_dir("builtin:tiny-sd3", cache_dir / "models")
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 6.0,
              "max_sequence_length": 32}
    expected = drive(_cores(model_dir, ("t5_encoder",)).t5_encoder,
                     [WorkItem("r", "encode", params, {})])[0].tensors["prompt_embeds"]
    pool = "t5_encoder-tiny-sd3"
    plan = Plan(nodes={"encode": PlanNode(kind="t5_encoder", pool=pool, op="encode",
                                          parallel="always")}, output="encode.prompt_embeds")
    async with Harness(settings.model_copy(update={"host_poll_s": 0.1})) as h:
        first, second = [await _host(h, name, model_dir, pool, kind="t5_encoder",
                                     parallel="auto") for name in ("cpu:1", "cpu:2")]
        async with asyncio.timeout(10):  # idle with the model, each offers to help
            while not (first.branches.offering() and second.branches.offering()):
                await asyncio.sleep(0.01)
        embeds = await _run_task(h, "split", pool, plan, "encode", params, {})
        feeds = [first.feeds[f"{pool}@cpu:1"], second.feeds[f"{pool}@cpu:2"]]
        assert sum(f.stats.split_steps for f in feeds) == 1
        assert sum(f.stats.helped_steps for f in feeds) == 1
        assert torch.equal(embeds, expected)


@pytest.mark.timeout(180)
async def test_an_idle_host_runs_the_controlnet_of_another_hosts_steps(
        settings: Settings, cache_dir: Path) -> None:
    """ControlNet parallelism: host 2, idle with the model, runs the ControlNet of each step
    of host 1's task while host 1 runs the UNet's down blocks, and hands its outputs on
    through the store: the latents are the same bits as the whole steps'."""
    import functools

    torch.set_num_threads(1)
    models = cache_dir / "models"
    model_dir = resolve_model_dir("builtin:tiny-sd", models)
    source = ModelSource(functools.partial(resolve_model_dir, cache_dir=models))
    cores = _cores(model_dir, ("text_encoder", "denoiser"))
    cores.denoiser.source = source
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 7.5, "steps": 4,
              "seed": 3, "width": 64, "height": 64, "controlnet_conditioning_scale": 1.0}
    controlnet = ("builtin:tiny-sd-controlnet",)
    image = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    inputs = {**drive(cores.text_encoder, [WorkItem("r", "encode", params, {})])[0].tensors,
              "control_image": image}
    item = WorkItem("r", "denoise", params, inputs, controlnet)
    cores.denoiser.prepare(item)
    expected = drive(cores.denoiser, [item])[0].tensors["latents"]
    pool = "denoiser-tiny-sd"
    async with Harness(settings.model_copy(update={"host_poll_s": 0.1})) as h:
        hosts = [await _host(h, f"cpu:{n}", model_dir, pool, source, parallel="auto",
                             parallel_parts=["controlnet"]) for n in (1, 2)]
        async with asyncio.timeout(10):
            while not all(host.branches.offering() for host in hosts):
                await asyncio.sleep(0.01)
        latents = await _denoise(h, "apart", pool, inputs, params, "always", controlnet)
        feeds = [host.feeds[f"{pool}@cpu:{n}"] for n, host in enumerate(hosts, 1)]
        split = sum(f.stats.split_steps for f in feeds)
        assert split == sum(f.stats.helped_steps for f in feeds) >= 1
        assert torch.equal(latents, expected)
