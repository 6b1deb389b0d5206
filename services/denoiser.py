"""Denoiser node: the UNet loop of StableDiffusionPipeline / StableDiffusionImg2ImgPipeline,
with step-level batching across requests.

Every request keeps its own scheduler instance, its own CPU generator and its own latents; a
``step`` runs ONE UNet forward over the rows of all states given (two rows per state with
classifier-free guidance, one without), each row with its own timestep and text embedding, then
applies guidance and the state's own ``scheduler.step``. A request that runs alone produces the
same bits as diffusers; requests that share forwards match their solo results to float
tolerance (a batched convolution may round differently from a single one).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import InvalidField
from common.modeldirs import component_config, model_index, vae_scale_factor
from services.core import ModelCore, Result, WorkItem
from services.lora import LoraKey, Loras, lora_key, pipeline_class

_serials = itertools.count()


@dataclass(frozen=True, eq=False)
class Control:
    """A ControlNet applied at every step, as the family's ControlNet pipeline applies it."""

    model: str  # its model spec
    #: what the ControlNet is conditioned on (``DenoiserCore.control_input``): SD's and SDXL's
    #: the control image, (rows, 3, H, W) in [0, 1]; SD3's and FLUX's its latents
    image: torch.Tensor
    scale: float  # controlnet_conditioning_scale


@dataclass(eq=False)
class DenoiseState:
    request_id: str
    scheduler: Any
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, h, w)
    embeds: torch.Tensor  # (rows, seq, dim): [negative, positive] with guidance, else [positive]
    guidance: float
    cfg: bool
    timesteps: torch.Tensor  # (n,)
    t_rows: torch.Tensor  # (n, rows): the timestep of every row of every step, a view
    extra_step_kwargs: dict[str, Any]
    timestep_cond: torch.Tensor | None = None  # (1, time_cond_proj_dim) for LCM-style UNets
    #: the UNet's ``added_cond_kwargs`` (SDXL: pooled text embeddings, time ids), one row per row
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    control: Control | None = None
    loras: LoraKey = ()
    i: int = 0
    serial: int = field(default_factory=lambda: next(_serials))
    #: a view of one guidance branch of another state (``DenoiserCore.branch_view``): its
    #: ``latents`` are a step's model input, given
    view: bool = False
    views: dict[int, DenoiseState] = field(default_factory=dict)  # branch -> its view

    @property
    def rows(self) -> int:
        return 2 if self.cfg else 1


class DenoiserCore(ModelCore):
    kind = "denoiser"
    ops = ("denoise",)
    components = ("unet",)
    #: whether a workflow may attach a ControlNet here (``controlnet:`` on its node), and a
    #: request name LoRAs (``loras``)
    takes_controlnet = takes_loras = True
    #: the diffusers class of the ControlNets it runs
    controlnet_class = "ControlNetModel"
    guidance_branches = True

    def load(self) -> None:
        self.unet = self.weights("unet")
        self.dtype = self.unet.dtype
        self.in_channels = int(self.unet.config.in_channels)
        self.time_cond_proj_dim = self.unet.config.time_cond_proj_dim
        self.vae_scale_factor = vae_scale_factor(self.model_dir)
        size = self.unet.config.sample_size  # diffusers' default height/width
        size = size if isinstance(size, int) else size[0]
        self.default_size = int(size) * self.vae_scale_factor

        self.scheduler_cls, config = self.scheduler()
        # the SD pipelines patch outdated scheduler configs in __init__; do the same
        if config.get("steps_offset", 1) != 1:
            config["steps_offset"] = 1
        if config.get("clip_sample", False) is True:
            config["clip_sample"] = False
        self.scheduler_config = config
        step_params = set(inspect.signature(self.scheduler_cls.step).parameters)
        self._accepts_eta = "eta" in step_params
        self._accepts_generator = "generator" in step_params
        self._cond_cache: tuple[tuple[int, ...], tuple] | None = None
        self._controlnets: dict[str, Any] = {}
        self.loras = Loras(self.unet, "unet", pipeline_class(self.model_dir))

    def scheduler(self) -> tuple[Any, dict[str, Any]]:
        """The model's scheduler class and (a copy of) its config; each request makes its own
        scheduler from them."""
        import diffusers

        config = dict(component_config(self.model_dir, "scheduler"))
        class_name = config.get("_class_name") or model_index(self.model_dir)["scheduler"][1]
        return getattr(diffusers, class_name), config

    # ---------------------------------------------------------------------------------------

    def start(self, item: WorkItem) -> DenoiseState:
        from diffusers.utils.torch_utils import randn_tensor

        self.check_item(item)
        p = item.params
        steps = _int(p, "steps", 50, minimum=1)
        guidance = _float(p, "guidance", 7.5)
        seed = _int(p, "seed", 0, minimum=0)
        cfg = guidance > 1 and self.time_cond_proj_dim is None

        embeds = item.inputs.get("prompt_embeds")
        if embeds is None or embeds.ndim != 3:
            raise InvalidField("prompt_embeds", "needs a (rows, seq, dim) tensor")
        if cfg and embeds.shape[0] != 2:
            raise InvalidField(
                "prompt_embeds", "guidance > 1 needs [negative, positive] embeddings (2 rows)"
            )
        if not cfg:
            embeds = embeds[-1:]  # the positive row
        embeds = embeds.to(device=self.device)
        dtype = embeds.dtype  # diffusers makes its latents in prompt_embeds.dtype
        control = None
        if item.adapters:
            control = self._control(item, cfg)
            height, width = control.image.shape[-2:]  # the pipeline's size: the image's
            p = {**p, "width": int(width), "height": int(height)}

        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        generator = torch.Generator("cpu").manual_seed(seed)
        scheduler.set_timesteps(steps, device=self.device)

        if "image_latents" in item.inputs:  # img2img, as StableDiffusionImg2ImgPipeline
            strength = _float(p, "strength", 0.8)
            if not 0 <= strength <= 1:
                raise InvalidField("strength", "must be in [0, 1]", limit=[0, 1])
            resume(generator, item, "img2img")
            init_timestep = min(int(steps * strength), steps)
            t_start = max(steps - init_timestep, 0)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            if len(timesteps) == 0:
                raise InvalidField("strength", f"steps * strength must be at least 1 ({steps=})")
            image_latents = item.inputs["image_latents"].to(device=self.device, dtype=dtype)
            if image_latents.ndim != 4 or image_latents.shape[0] != 1:
                raise InvalidField("image_latents", "needs a (1, C, h, w) tensor")
            latent_timestep = timesteps[:1].repeat(1)
            noise = randn_tensor(
                image_latents.shape, generator=generator, device=self.device, dtype=dtype
            )
            latents = scheduler.add_noise(image_latents, noise, latent_timestep)
        else:  # txt2img, as StableDiffusionPipeline.prepare_latents
            width = _int(p, "width", self.default_size, minimum=8)
            height = _int(p, "height", self.default_size, minimum=8)
            for name, value in (("width", width), ("height", height)):
                if value % 8:
                    raise InvalidField(name, "must be divisible by 8")
            timesteps = scheduler.timesteps
            shape = (
                1,
                self.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma

        extra: dict[str, Any] = {}
        if self._accepts_eta:
            extra["eta"] = _float(p, "eta", 0.0)
        if self._accepts_generator:
            extra["generator"] = generator

        timestep_cond = None
        if self.time_cond_proj_dim is not None:
            from diffusers import StableDiffusionPipeline

            w = torch.tensor(guidance - 1).repeat(1)
            timestep_cond = StableDiffusionPipeline.get_guidance_scale_embedding(
                None, w, embedding_dim=self.time_cond_proj_dim
            ).to(device=self.device, dtype=latents.dtype)

        rows = 2 if cfg else 1
        return DenoiseState(
            request_id=item.request_id,
            scheduler=scheduler,
            generator=generator,
            latents=latents,
            embeds=embeds,
            guidance=guidance,
            cfg=cfg,
            timesteps=timesteps,
            t_rows=timesteps[:, None].expand(len(timesteps), rows),
            extra_step_kwargs=extra,
            timestep_cond=timestep_cond,
            control=control,
            loras=lora_key(item.params),
        )

    def check_item(self, item: WorkItem) -> None:
        """What every denoiser checks of an item before its inputs: its op, and that it
        attaches no ControlNet, and names no LoRAs, where this denoiser runs none."""
        self.check_op(item)
        if item.adapters and not self.takes_controlnet:
            raise InvalidField("controlnet", "this denoiser runs no ControlNet")
        if lora_key(item.params) and not self.takes_loras:
            raise InvalidField("loras", "this model family's denoiser runs no LoRA yet")

    def needs_prepare(self, item: WorkItem) -> bool:
        if self.takes_controlnet and any(s not in self._controlnets for s in item.adapters):
            return True
        return self.takes_loras and self.loras.missing(lora_key(item.params), self.source)

    def prepare(self, item: WorkItem) -> None:
        """Load the item's ControlNet and read its LoRAs' files (a worker thread's work)."""
        if self.takes_controlnet:
            for spec in item.adapters:
                self._controlnet(spec)
        if self.takes_loras:
            self.loras.read(lora_key(item.params), self.source)

    def _control(self, item: WorkItem, cfg: bool,
                 latents: torch.Tensor | None = None) -> Control:
        """The item's ControlNet, its conditioning scale and what it is conditioned on
        (``control_input``; ``latents``: the request's initial latents where the family knows
        them before its control input, unpacked)."""
        if "image_latents" in item.inputs:
            raise InvalidField("controlnet", "a ControlNet runs on text to image only here")
        if len(item.adapters) != 1:
            raise InvalidField("controlnet", "one ControlNet per node", limit=1)
        scale = _float(item.params, "controlnet_conditioning_scale", 1.0)
        net = self._controlnet(item.adapters[0])
        return Control(item.adapters[0], self.control_input(item, net, cfg, latents), scale)

    def control_input(self, item: WorkItem, net: Any, cfg: bool,
                      latents: torch.Tensor | None) -> torch.Tensor:
        """The control image as StableDiffusionControlNetPipeline prepares it (``prepare_image``:
        resized to the request's size where it names one, else to a multiple of the VAE's
        scale; in [0, 1]; once per guidance row)."""
        import PIL.Image
        from diffusers.image_processor import VaeImageProcessor

        image = item.inputs.get("control_image")
        if (image is None or image.dtype != torch.uint8 or image.ndim != 4
                or image.shape[0] != 1 or image.shape[-1] != 3):
            raise InvalidField("control_image", "a ControlNet needs a (1, H, W, 3) uint8 image")
        p = item.params
        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor,
                                      do_convert_rgb=True, do_normalize=False)
        sizes = {name: _int(p, name, 0, minimum=8) if name in p else None
                 for name in ("height", "width")}
        pixels = processor.preprocess(PIL.Image.fromarray(image[0].cpu().numpy()), **sizes)
        pixels = pixels.to(dtype=torch.float32).to(device=self.device, dtype=net.dtype)
        return control_rows(pixels, 2 if cfg else 1)

    def _controlnet(self, spec: str) -> Any:
        """The ControlNet of model ``spec`` (of ``controlnet_class``), loaded on first use
        (then kept: the workflows that attach it to this pool share it)."""
        net = self._controlnets.get(spec)
        if net is None:
            import diffusers

            from common.modeldirs import component_config

            if self.source is None:
                raise InvalidField("controlnet", "this node was not told where models are")
            try:
                model_dir = self.source.resolve(spec)
                found = component_config(model_dir, ".").get("_class_name")
            except (OSError, ValueError) as exc:
                raise InvalidField("controlnet", f"{spec}: {exc}") from None
            if found != self.controlnet_class:
                raise InvalidField("controlnet", f"{spec} is a {found}; this model's denoiser "
                                   f"runs a {self.controlnet_class}")
            net = getattr(diffusers, self.controlnet_class).from_pretrained(
                model_dir, torch_dtype=self.torch_dtype)
            net = self._controlnets[spec] = net.to(self.device).eval()
        return net

    def batch_key(self, state: DenoiseState) -> Hashable:
        # states of different latent (or text) shapes cannot share a forward
        control = state.control and (state.control.model, state.control.scale)
        return (tuple(state.latents.shape), tuple(state.embeds.shape[1:]), state.latents.dtype,
                control, state.loras)

    def step(self, states: list[DenoiseState]) -> None:
        self.step_controlled(states, None)

    def _advance(self, states: list[DenoiseState], noise: torch.Tensor) -> None:
        """Guidance and each state's scheduler step, from the model's predictions of every
        row of ``states``."""
        with torch.inference_mode():
            row = 0
            for s in states:
                if s.cfg:
                    uncond, text = noise[row : row + 1], noise[row + 1 : row + 2]
                    pred = uncond + s.guidance * (text - uncond)
                else:
                    pred = noise[row : row + 1]
                row += s.rows
                t = s.timesteps[s.i]
                s.latents = s.scheduler.step(
                    pred, t, s.latents, **s.extra_step_kwargs, return_dict=False
                )[0]
                s.i += 1

    # --- CFG parallelism: a step's guidance branches on two devices ---------------------------

    def splits(self, states: list[DenoiseState]) -> bool:
        return all(s.cfg for s in states)

    def model_input(self, state: DenoiseState) -> torch.Tensor:
        """What the model reads of ``state``'s latents this step (a view's: as given)."""
        if state.view:
            return state.latents
        return state.scheduler.scale_model_input(state.latents, state.timesteps[state.i])

    def branch_inputs(self, states: list[DenoiseState]) -> torch.Tensor:
        return _rows([self.model_input(s) for s in states])

    def run_branch(self, states: list[DenoiseState], branch: int, inputs: torch.Tensor,
                   steps: list[int]) -> torch.Tensor:
        views = self._views(states, branch, inputs, steps)
        if self.takes_loras:
            self.loras.activate(states[0].loras)
        with torch.inference_mode():
            return self._predict(views)

    def _views(self, states: list[DenoiseState], branch: int | None, inputs: torch.Tensor,
               steps: list[int]) -> list[DenoiseState]:
        """``branch_view`` of each state at step ``steps[i]`` on its row of ``inputs``
        (``branch_inputs``, maybe another device's)."""
        views = [self.branch_view(s, branch) for s in states]
        for view, x, i in zip(views, inputs.to(self.device).split(1), steps, strict=True):
            view.latents, view.i = x, i
        return views

    def join_branches(self, states: list[DenoiseState], negative: torch.Tensor,
                      positive: torch.Tensor) -> None:
        # rows as one forward over both branches has them: each state's negative, positive
        negative = negative.to(positive.device)  # another device's, through the store
        self._advance(states, torch.stack([negative, positive], 1).flatten(0, 1))

    def branch_view(self, state: DenoiseState, branch: int | None) -> DenoiseState:
        """``state`` as a state of one row, its guidance branch ``branch``'s conditioning (the
        negative prompt's, 0, or the positive's, 1), or of all its rows (None): what
        ``_predict`` runs that branch of on a given model input; made once a state."""
        if branch is None:  # all rows
            view = state.views.get(-1)
            if view is None:
                view = state.views[-1] = dataclasses.replace(state, serial=next(_serials),
                                                             view=True, views={})
            return view
        view = state.views.get(branch)
        if view is None:
            row = slice(branch, branch + 1)
            control = state.control
            if control is not None and control.image.shape[0] == state.rows:  # one per row
                control = dataclasses.replace(control, image=control.image[row])
            view = state.views[branch] = dataclasses.replace(
                state, embeds=state.embeds[row], cfg=False, t_rows=state.t_rows[:, row],
                added_cond={k: v[row] for k, v in state.added_cond.items()}, control=control,
                serial=next(_serials), view=True, views={})
        return view

    # --- the ControlNet on another device (``ModelCore.control_splits``) -----------------------

    def control_splits(self, states: list[DenoiseState]) -> bool:
        return states[0].control is not None  # states step together with equal ControlNets

    def run_control(self, states: list[DenoiseState], inputs: torch.Tensor,
                    steps: list[int]) -> list[torch.Tensor]:
        views = self._views(states, None, inputs, steps)
        with torch.inference_mode():
            return self._control_outputs(views)

    def step_controlled(self, states: list[DenoiseState],
                        outputs: Callable[[], list[torch.Tensor] | None] | None) -> None:
        """(``outputs`` None: ``step``, the ControlNet, if any, run here.)"""
        if self.takes_loras:
            self.loras.activate(states[0].loras)  # the states of a step share their LoRAs
        with torch.inference_mode():
            self._advance(states, self._predict(states, outputs))

    def _late_outputs(self, states: list[DenoiseState],
                      outputs: Callable[[], list[torch.Tensor] | None] | None,
                      device: torch.device) -> Late:
        """The ControlNet's outputs for ``states``, made when the model first reads them:
        ``outputs()`` (another device's, read from the store: moved to ``device``), else
        ``_control_outputs`` here."""
        def made() -> list[torch.Tensor]:
            given = None if outputs is None else outputs()
            if given is None:
                return self._control_outputs(states)
            return [t.to(device) for t in given]
        return Late(made)

    def _control_outputs(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        """The ControlNet's outputs for every row of ``states``: its down blocks' residuals,
        then its mid block's."""
        sample, timestep, cond, _, added = self._model_args(states)
        control = states[0].control  # states step together with equal ControlNets and scales
        assert control is not None
        down, mid = self._controlnets[control.model](
            sample, timestep, encoder_hidden_states=cond, controlnet_cond=control_inputs(states),
            conditioning_scale=control.scale, guess_mode=False, added_cond_kwargs=added,
            return_dict=False)
        return [*down, mid]

    def _model_args(self, states: list[DenoiseState]) -> tuple[Any, ...]:
        """The UNet's (and its ControlNet's) inputs for every row of ``states``: sample,
        timestep, text embeddings, LCM guidance embeddings, added conditioning."""
        inputs = []
        for s in states:
            x = self.model_input(s)
            inputs.extend([x] * s.rows)
        cond, timestep_cond, added = self._conditioning(states)
        return (_rows(inputs), torch.cat([s.t_rows[s.i] for s in states]), cond, timestep_cond,
                added)

    def _predict(self, states: list[DenoiseState],
                 outputs: Callable[[], list[torch.Tensor] | None] | None = None) -> torch.Tensor:
        """One forward of the model over every row of ``states``: the noise predictions;
        ``outputs``: where the ControlNet's come from (``step_controlled``), else it runs
        here first."""
        sample, timestep, cond, timestep_cond, added = self._model_args(states)
        residuals = {}
        if states[0].control is not None:
            flat = self._late_outputs(states, outputs, sample.device)
            # the UNet adds the down blocks' residuals after its own down blocks, the mid
            # block's after its mid block: it runs those first while the ControlNet runs
            mid = torch.empty(0, dtype=sample.dtype, device=sample.device)

            def down() -> list[torch.Tensor]:
                mid.resize_(flat[-1].shape).copy_(flat[-1])
                return flat[:-1]

            residuals = {"down_block_additional_residuals": Late(down),
                         "mid_block_additional_residual": mid}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=cond,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
            **residuals,
        )[0]

    def _conditioning(
        self, states: list[DenoiseState]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """Per-row text embeddings (and LCM guidance embeddings, and added conditioning),
        concatenated once per set of states: reused while the same states step together."""
        key = tuple(s.serial for s in states)
        if self._cond_cache is not None and self._cond_cache[0] == key:
            return self._cond_cache[1]
        cond = _rows([s.embeds for s in states])
        timestep_cond = None
        if self.time_cond_proj_dim is not None:
            timestep_cond = torch.cat([s.timestep_cond for s in states
                                       if s.timestep_cond is not None])
        added = {name: _rows([s.added_cond[name] for s in states])
                 for name in states[0].added_cond} or None
        self._cond_cache = (key, (cond, timestep_cond, added))
        return cond, timestep_cond, added

    def done(self, state: DenoiseState) -> bool:
        return state.i >= len(state.timesteps)

    def progress(self, state: DenoiseState) -> tuple[int, int]:
        return (state.i, len(state.timesteps))

    def finish(self, state: DenoiseState) -> Result:
        serials = {state.serial, *(v.serial for v in state.views.values())}
        if self._cond_cache is not None and serials & set(self._cond_cache[0]):
            self._cond_cache = None  # do not keep a finished request's embeddings alive
        latents = state.latents.detach().cpu()
        return Result(tensors={"latents": latents.clone() if latents.is_inference() else latents})


class Late(list):
    """A list made on first use (indexed, iterated or measured): a ControlNet's outputs,
    which the model reads only once its first blocks ran, so another device's may still be on
    their way when the step starts."""

    def __init__(self, make: Callable[[], list[Any]]) -> None:
        super().__init__()
        self._make: Callable[[], list[Any]] | None = make

    def _made(self) -> None:
        if self._make is not None:
            made = self._make()  # (raising, it stays unmade)
            self._make = None
            self.extend(made)

    def __len__(self) -> int:
        self._made()
        return super().__len__()

    def __getitem__(self, index: Any) -> Any:
        self._made()
        return super().__getitem__(index)

    def __iter__(self) -> Any:
        self._made()
        return super().__iter__()


def embeddings(item: WorkItem, name: str, ndim: int, cfg: bool, family: str,
               width: int | None = None) -> torch.Tensor:
    """Input ``name`` of ``item``: ``ndim`` dimensions, ``width`` values wide where given, and
    a row per guidance branch: ``[negative, positive]`` when guided, else the positive row (an
    encoder shared by several families may guide by another rule: its negative row is then
    dropped). Else ``InvalidField`` naming it and what ``family``'s denoiser needs."""
    rows = 2 if cfg else 1
    tensor = item.inputs.get(name)
    if tensor is not None and not cfg and tensor.ndim >= 2 and tensor.shape[0] == 2:
        tensor = tensor[-1:]
    if (tensor is None or tensor.ndim != ndim or tensor.shape[0] != rows
            or (width is not None and tensor.shape[-1] != width)):
        layout = "(rows, seq, dim)" if ndim == 3 else "(rows, dim)"
        wide = "" if width is None else f" of {width} values"
        raise InvalidField(name, f"{family} needs a {layout} tensor with {rows} row(s){wide} "
                                 f"({'[negative, positive]' if cfg else 'positive'})",
                           limit=width)
    return tensor


def control_inputs(states: Sequence[DenoiseState]) -> torch.Tensor:
    """What the ControlNet of ``states`` (which step together: one ControlNet) is conditioned
    on, their rows in order."""
    return _rows([s.control.image for s in states if s.control is not None])


def control_rows(image: torch.Tensor, rows: int) -> torch.Tensor:
    """A preprocessed control image once per guidance row, laid out as the ControlNet
    pipelines' ``prepare_image`` lays it out: contiguous (its ``repeat_interleave`` copies the
    image processor's channels-last view; a channels-last batch rounds otherwise in the
    convolutions)."""
    return torch.cat([image] * rows).contiguous()


def resume(generator: torch.Generator, item: WorkItem, why: str) -> None:
    """Continue in ``generator`` the random stream the VAE encoder node drew from (its
    ``generator_state``): ``why`` needs the same generator as the VAE encoder's."""
    state = item.inputs.get("generator_state")
    if state is None:
        raise InvalidField("generator_state", f"{why} needs the VAE encoder's generator")
    generator.set_state(state.to(torch.uint8).cpu())


def image_size(params: dict[str, Any], default: tuple[int, int],
               multiple: int) -> tuple[int, int]:
    """A request's (width, height): ``default`` where it names none, else multiples of
    ``multiple``."""
    sides = []
    for name, fallback in zip(("width", "height"), default, strict=True):
        value = _int(params, name, fallback, minimum=multiple)
        if value % multiple:
            raise InvalidField(name, f"must be divisible by {multiple}", limit=multiple)
        sides.append(value)
    return sides[0], sides[1]


def _rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors) if len(tensors) > 1 else tensors[0]


def _int(params: dict[str, Any], name: str, default: int, minimum: int | None = None) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidField(name, "must be an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidField(name, f"must be at least {minimum}", limit=minimum)
    return value


def _float(params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(name, "must be a number")
    return float(value)
