"""VAE nodes: latents -> uint8 images (decoder) and uint8 image -> latents (encoder: img2img's
image, and a ControlNet's control image where the ControlNet takes latents).

The decoder reproduces ``StableDiffusionPipeline``: ``vae.decode(latents / scaling_factor)``
(SDXL's pipelines: ``latents * latents_std / scaling_factor + latents_mean`` where the VAE's
config has them; SD3's and FLUX's: ``latents / scaling_factor + shift_factor``) then
``VaeImageProcessor.postprocess`` and ``(x * 255).round().astype(uint8)``. Items of equal shape
share one decode only when that gives the same bits as decoding them one by one (checked at
load with a probe; on x86 CPUs a batched convolution usually rounds differently, so they run
one by one there).

The encoder reproduces ``StableDiffusionImg2ImgPipeline.prepare_latents``:
``retrieve_latents(vae.encode(preprocess(PIL image)), generator) * scaling_factor`` with
``generator = torch.Generator("cpu").manual_seed(seed)``, and hands the generator's state on so
that the denoiser continues the same random stream (the noise for ``add_noise``).

Given a ``control_image`` instead, it encodes it as the ControlNet pipelines of the families
whose ControlNets are conditioned on latents do (SD3's, FLUX's: ``control_layout`` says at
what size, how many rows): ``retrieve_latents(vae.encode(preprocess(PIL image, size)),
generator)`` with the same generator, as ``control_latents``, the distribution's samples
unscaled (the denoiser scales them as its ControlNet asks), and the generator's state after.
The pipelines encode it with the VAE they decode with; a node of its own keeps that VAE in the
VAE pools every workflow of the model shares, out of the denoiser's replicas.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.errors import InvalidField
from common.modeldirs import vae_scale_factor
from services.core import OneShotCore, Result, WorkItem
from services.denoiser import control_rows


class _VaeCore(OneShotCore):
    components = ("vae",)

    def load(self) -> None:
        from diffusers.image_processor import VaeImageProcessor

        self.vae = self.weights("vae")
        self.dtype = self.vae.dtype
        self.scaling_factor = self.vae.config.scaling_factor
        self.latent_channels = int(self.vae.config.latent_channels)
        # SDXL-style VAEs may normalise latents by a per-channel mean and std (the SDXL
        # pipelines then use them in place of the plain scaling factor)
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        #: SDXL's per-channel (mean, std) of the latents, where the VAE's config has them
        self.latents_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # SD3's and FLUX's VAEs shift the latents as well as scale them
        self.shift_factor = getattr(config, "shift_factor", None)
        if mean is not None and std is not None:
            shape = (1, self.latent_channels, 1, 1)
            self.latents_stats = (torch.tensor(mean).view(shape).to(self.device, self.dtype),
                                  torch.tensor(std).view(shape).to(self.device, self.dtype))
        self.vae_scale_factor = vae_scale_factor(self.model_dir)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)


class VaeDecoderCore(_VaeCore):
    kind = "vae_decoder"
    ops = ("decode",)

    #: whether equal-shape items may share one decode; None: decided at load by a probe
    batch_exact: bool | None = None

    def load(self) -> None:
        super().load()
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def start(self, item: WorkItem) -> Any:
        self.check_op(item)
        latents = item.inputs.get("latents")
        if latents is None or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise InvalidField("latents", f"needs a (N, {self.latent_channels}, h, w) tensor")
        return super().start(item)

    def run(self, items: list[WorkItem]) -> list[Result]:
        latents = [it.inputs["latents"].to(device=self.device, dtype=self.dtype) for it in items]
        images: dict[int, torch.Tensor] = {}
        if self.batch_exact:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, lat in enumerate(latents):
                groups.setdefault(tuple(lat.shape[1:]), []).append(i)
            for idx in groups.values():
                batch = self._decode(torch.cat([latents[i] for i in idx]))
                start = 0
                for i in idx:
                    n = latents[i].shape[0]
                    images[i] = batch[start : start + n]
                    start += n
        else:
            for i, lat in enumerate(latents):
                images[i] = self._decode(lat)
        return [Result(tensors={"image": images[i]}) for i in range(len(items))]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) latents -> (N, H, W, 3) uint8, as StableDiffusionPipeline does."""
        with torch.inference_mode():
            if self.latents_stats is not None:
                mean, std = self.latents_stats
                latents = latents * std / self.scaling_factor + mean
            elif self.shift_factor is not None:
                latents = latents / self.scaling_factor + self.shift_factor
            else:
                latents = latents / self.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type="np")
        return torch.from_numpy(np.ascontiguousarray((image * 255).round().astype("uint8")))

    def _probe_batching(self) -> bool:
        gen = torch.Generator("cpu").manual_seed(0)
        z = torch.randn(2, self.latent_channels, 8, 8, generator=gen).to(self.device, self.dtype)
        with torch.inference_mode():
            batched = self.vae.decode(z, return_dict=False)[0]
            single = torch.cat(
                [self.vae.decode(z[i : i + 1], return_dict=False)[0] for i in (0, 1)]
            )
        return bool(torch.equal(batched, single))


class VaeEncoderCore(_VaeCore):
    kind = "vae_encoder"
    ops = ("encode_image",)

    def control_layout(self, params: dict[str, Any]) -> tuple[int, int, int, int]:
        """How the family's ControlNet pipeline encodes a control image for a request with
        ``params``: (rows, width, height, the multiple of pixels its image processor rounds
        sizes down to)."""
        raise InvalidField("control_image", "this model family's ControlNets take the control "
                           "image itself (the denoiser's control_image), not its latents")

    def start(self, item: WorkItem) -> Any:
        self.check_op(item)
        name = "control_image" if "control_image" in item.inputs else "image"
        image = item.inputs.get(name)
        if (
            image is None
            or image.dtype != torch.uint8
            or image.ndim != 4
            or image.shape[0] != 1
            or image.shape[-1] != 3
        ):
            raise InvalidField(name, "needs a (1, H, W, 3) uint8 tensor")
        if image.shape[1] < self.vae_scale_factor or image.shape[2] < self.vae_scale_factor:
            raise InvalidField(name, f"must be at least {self.vae_scale_factor} pixels a side")
        seed = item.params.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidField("seed", "must be a non-negative integer")
        if name == "control_image":
            self.control_layout(item.params)  # a size it cannot encode fails here
        return super().start(item)

    def run(self, items: list[WorkItem]) -> list[Result]:
        # one by one: each item samples the latent distribution with its own generator
        return [self._encode(item) for item in items]

    def _encode(self, item: WorkItem) -> Result:
        import PIL.Image
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
            retrieve_latents,
        )

        control = "control_image" in item.inputs
        pil = PIL.Image.fromarray(item.inputs["control_image" if control else "image"][0]
                                  .cpu().numpy())
        generator = torch.Generator("cpu").manual_seed(int(item.params.get("seed", 0)))
        if control:
            rows, width, height, multiple = self.control_layout(item.params)
            image = VaeImageProcessor(vae_scale_factor=multiple).preprocess(
                pil, height=height, width=width)
            image = control_rows(image, rows)
        else:
            image = self.image_processor.preprocess(pil)
        image = image.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            latents = retrieve_latents(self.vae.encode(image), generator=generator)
            if not control:  # a control image's samples: the denoiser scales them
                latents = self._scaled(latents)
        latents = latents.detach().cpu().clone()  # a normal tensor, not an inference one
        name = "control_latents" if control else "image_latents"
        return Result(tensors={name: latents, "generator_state": generator.get_state()})

    def _scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent distribution's samples as the img2img pipelines scale them."""
        if self.latents_stats is not None:
            mean, std = self.latents_stats
            return (latents - mean) * self.scaling_factor / std
        if self.shift_factor is not None:
            return (latents - self.shift_factor) * self.scaling_factor
        return self.scaling_factor * latents
