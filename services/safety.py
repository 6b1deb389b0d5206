"""Safety checker node: flags images with the model's safety checker and blacks them out.

Reproduces ``StableDiffusionPipeline.run_safety_checker`` + ``postprocess``: the feature
extractor sees the uint8 images as PIL images (the pipeline converts its decoded images to PIL
with the same rounding the VAE decoder node uses), the checker flags them, and a flagged image
comes back all zeros (the pipeline's black image). Each item's images are checked in one call,
as the pipeline checks one request's images; several items share one call only when that gives
the same bits (checked at load with a probe).
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import InvalidField
from services.core import OneShotCore, Result, WorkItem


class SafetyCheckerCore(OneShotCore):
    kind = "safety_checker"
    ops = ("check",)
    components = ("safety_checker",)  # the feature extractor has no weights

    #: whether several items may share one checker call; None: decided at load by a probe
    batch_exact: bool | None = None

    def load(self) -> None:
        self.safety_checker = self.weights("safety_checker")
        self.feature_extractor = self.part("feature_extractor")
        self.dtype = self.safety_checker.dtype
        if self.batch_exact is None:
            self.batch_exact = self._probe_batching()

    def start(self, item: WorkItem) -> Any:
        self.check_op(item)
        image = item.inputs.get("image")
        if image is None or image.dtype != torch.uint8 or image.ndim != 4 or image.shape[-1] != 3:
            raise InvalidField("image", "needs a (N, H, W, 3) uint8 tensor")
        return super().start(item)

    def run(self, items: list[WorkItem]) -> list[Result]:
        images = [it.inputs["image"] for it in items]
        if self.batch_exact and len(images) > 1:
            sizes = [img.shape[0] for img in images]
            flags = self._flags(images)
            per_item, start = [], 0
            for n in sizes:
                per_item.append(flags[start : start + n])
                start += n
        else:
            per_item = [self._flags([img]) for img in images]
        results = []
        for img, nsfw in zip(images, per_item, strict=True):
            out = img.detach().cpu().clone()
            for i, flagged in enumerate(nsfw):
                if flagged:
                    out[i] = 0  # the pipeline's black image
            results.append(Result(tensors={"image": out}, meta={"nsfw": nsfw}))
        return results

    def _flags(self, images: list[torch.Tensor]) -> list[bool]:
        """The checker's verdicts for the images of one call (a list of (n, H, W, 3) uint8)."""
        import PIL.Image

        pils = [PIL.Image.fromarray(im.cpu().numpy()) for batch in images for im in batch]
        clip_input = self.feature_extractor(pils, return_tensors="pt").pixel_values
        with torch.inference_mode():
            # the checker only looks at `images` to black them out; we do that ourselves
            placeholder = torch.zeros(len(pils), 1)
            _, has_nsfw = self.safety_checker(
                images=placeholder, clip_input=clip_input.to(device=self.device, dtype=self.dtype)
            )
        return [bool(f) for f in has_nsfw]

    def _probe_batching(self) -> bool:
        """Whether the checker's embeddings for a batch equal those of single images here."""
        import numpy as np
        import PIL.Image

        rng = np.random.RandomState(0)
        pils = [PIL.Image.fromarray(rng.randint(0, 256, (64, 64, 3), np.uint8)) for _ in range(3)]
        clip_input = self.feature_extractor(pils, return_tensors="pt").pixel_values
        clip_input = clip_input.to(device=self.device, dtype=self.dtype)
        vision, projection = self.safety_checker.vision_model, self.safety_checker.visual_projection
        with torch.inference_mode():
            batched = projection(vision(clip_input)[1])
            single = torch.cat([projection(vision(clip_input[i : i + 1])[1]) for i in range(3)])
        return bool(torch.equal(batched, single))
