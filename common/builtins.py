"""The builtins: tiny random models built from fixed configs and fixed seeds, so that building
twice gives byte-identical files, saved with ``save_pretrained(..., safe_serialization=True)`` as
diffusers directories (a pipeline's, or one ControlNet's) that every core and
``DiffusionPipeline.from_pretrained`` load by exactly the code path a real model takes. Most are
diffusers' own fast-test components. Nothing is downloaded: the tokenizers are built in memory
(``common.tokenizers``). Where and when they are built: ``common.models``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import families
from common.tokenizers import build_tiny_t5_tokenizer, build_tiny_tokenizer, tiny_bpe

#: bump when a builtin recipe changes; a cached builtin with another recipe is rebuilt
RECIPE_VERSION = 2
#: the seed every recipe starts from
SEED = 0

TINY_SD = "tiny-sd"
TINY_SDXL = "tiny-sdxl"
TINY_SD3 = "tiny-sd3"
TINY_FLUX = "tiny-flux"
TINY_FLUX_SCHNELL = "tiny-flux-schnell"
TINY_SD_CONTROLNET = "tiny-sd-controlnet"
TINY_SDXL_CONTROLNET = "tiny-sdxl-controlnet"
TINY_SD3_CONTROLNET = "tiny-sd3-controlnet"
TINY_FLUX_CONTROLNET = "tiny-flux-controlnet"
TINY_UPSCALER = "tiny-upscaler"

#: the family (``common.families``) each pipeline builtin is built as
FAMILIES = {TINY_SD: families.SD, TINY_SDXL: families.SDXL, TINY_SD3: families.SD3,
            TINY_FLUX: families.FLUX, TINY_FLUX_SCHNELL: families.FLUX,
            TINY_UPSCALER: families.SD_UPSCALER}

#: the recipe each builtin's components are built from, where another builtin's is the same
#: (the same code, configuration and seed: byte-identical files, which the builtins' tests
#: check); any other component is its builtin's own. Pools by content (``common.contents``)
#: read it, so that they know which builtins share a component without building them.
SHARED_RECIPES: dict[str, dict[str, str]] = {
    TINY_SD: {"vae": "tiny-vae", "tokenizer": "tiny-clip-tokenizer", "text_encoder": "tiny-clip"},
    TINY_SDXL: {"vae": "tiny-vae", "tokenizer": "tiny-clip-tokenizer",
                "tokenizer_2": "tiny-clip-tokenizer", "text_encoder_2": "tiny-clip-g"},
    TINY_UPSCALER: {"vae": "tiny-vae", "tokenizer": "tiny-clip-tokenizer"},
    TINY_SD3: {"vae": "tiny-vae-shifted", "text_encoder_3": "tiny-t5",
               "tokenizer_3": "tiny-t5-tokenizer", "tokenizer": "tiny-clip-tokenizer",
               "tokenizer_2": "tiny-clip-tokenizer", "text_encoder_2": "tiny-clip-g"},
    **{name: {"vae": "tiny-vae-shifted", "text_encoder_2": "tiny-t5",
              "tokenizer_2": "tiny-t5-tokenizer", "tokenizer": "tiny-clip-tokenizer",
              "text_encoder": "tiny-clip", "scheduler": "tiny-flux-scheduler"}
       for name in (TINY_FLUX, TINY_FLUX_SCHNELL)},
}


def build_builtin(name: str, out_dir: Path) -> None:
    """Build builtin ``name`` into ``out_dir`` (an existing, empty directory)."""
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in node logs
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            pipe = BUILDERS[name]()
            pipe.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    index_path = out_dir / "model_index.json"
    if not index_path.is_file():
        return  # one model (a ControlNet), no pipeline
    # without torchvision, transformers 5 instantiates (and records) CLIPImageProcessorPil; name
    # the class a real SD repository names, which every transformers version resolves
    index = json.loads(index_path.read_text())
    if index.get("feature_extractor", [None])[0] == "transformers":
        index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # transformers 5 saves only tokenizer.json; add the classic files so that a slow CLIP
    # tokenizer (and transformers 4.x) loads the directory as it loads a real SD repository
    vocab, merges = tiny_bpe()
    for name, entry in index.items():  # SDXL has tokenizer and tokenizer_2; SD3's third is T5
        tok_dir = out_dir / name
        if not (isinstance(entry, list) and entry[-1] == "CLIPTokenizer"):
            continue
        if not (tok_dir / "vocab.json").exists():
            (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        if not (tok_dir / "merges.txt").exists():
            (tok_dir / "merges.txt").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
            )


# --------------------------------------------------------------------------------------------
# the recipes
# --------------------------------------------------------------------------------------------


def _tiny_text_encoder(tokenizer, hidden: int, intermediate: int, heads: int, layers: int,
                       with_projection: bool = False, **kw):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=intermediate,
        layer_norm_eps=1e-05,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        **kw,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _tiny_vae(**config):
    """The VAE of diffusers' StableDiffusionPipeline fast tests (vae_scale_factor 2), with
    ``config`` added."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
        **config,
    ).eval()


def _tiny_safety_checker(seed: int):
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "vocab_size": 128,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for param in (checker.concept_embeds, checker.special_care_embeds):
            param.copy_(torch.randn(param.shape, generator=gen))
        # thresholds on cosine similarity, high enough that most random images pass
        for param in (checker.concept_embeds_weights, checker.special_care_embeds_weights):
            param.copy_(0.9 + 0.09 * torch.rand(param.shape, generator=gen))
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return checker, feature_extractor


def _tiny_t5(tokenizer, d_model: int):
    """A two-layer T5 encoder for ``tokenizer`` (``build_tiny_t5_tokenizer``), seeded."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(SEED + 2)
    config: dict[str, Any] = dict(  # T5's own keys, some not in T5Config's signature
        vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    return T5EncoderModel(T5Config(**config)).eval()


def _tiny_unet(**config):
    """The UNet of diffusers' StableDiffusionPipeline fast tests, with ``config`` added."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2,
        **config,
    ).eval()


def _build_tiny_sd():
    """diffusers' StableDiffusionPipeline fast-test components plus a tiny safety checker."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    unet = _tiny_unet(cross_attention_dim=8)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # as in real SD 1.x (the pipeline would patch 0 -> 1 on load)
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae()
    torch.manual_seed(SEED)
    text_encoder = _tiny_text_encoder(tokenizer, hidden=8, intermediate=16, heads=2, layers=2)
    torch.manual_seed(SEED)
    safety_checker, feature_extractor = _tiny_safety_checker(SEED)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        image_encoder=None,
        requires_safety_checker=True,
    )


def _build_tiny_sdxl():
    """diffusers' StableDiffusionXLPipeline fast-test layout, smaller: two CLIP text encoders
    (the second with a projection, whose pooled output conditions the UNet with the six time
    ids), a UNet with ``text_time`` added conditioning, Euler, and tiny-sd's VAE."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    hidden, projection, time_dim = 8, 8, 8
    torch.manual_seed(SEED)
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        cross_attention_dim=2 * hidden,  # both encoders' hidden states, concatenated
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    torch.manual_seed(SEED)
    vae = _tiny_vae()
    torch.manual_seed(SEED)
    text_encoder = _tiny_text_encoder(tokenizer, hidden=hidden, intermediate=16, heads=2,
                                      layers=2, projection_dim=projection)
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder.config).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_tiny_sd3():
    """diffusers' StableDiffusion3Pipeline fast-test layout, smaller: CLIP-L and CLIP-G (both
    with projections: their pooled outputs concatenated condition the transformer), a T5
    encoder, an MMDiT transformer, flow matching, and a VAE with a shift factor."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    clip_hidden, t5_dim = 8, 32
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,  # an SD3 ControlNet steers every block but the last
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=t5_dim,  # the CLIP embeddings are padded to the T5 width
        pooled_projection_dim=2 * clip_hidden,
        out_channels=4,
    ).eval()
    torch.manual_seed(SEED)
    vae = _tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5035)
    clips = []
    for seed in (SEED, SEED + 1):  # CLIP-L, CLIP-G
        torch.manual_seed(seed)
        clips.append(_tiny_text_encoder(tokenizer, hidden=clip_hidden, intermediate=16, heads=2,
                                        layers=2, with_projection=True,
                                        projection_dim=clip_hidden))
    text_encoder, text_encoder_2 = clips
    t5_tokenizer = build_tiny_t5_tokenizer()
    text_encoder_3 = _tiny_t5(t5_tokenizer, t5_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def _build_tiny_flux(guidance_embeds: bool = True):
    """diffusers' FluxPipeline fast-test layout: a CLIP text encoder (its pooled output), a T5
    encoder, the FLUX transformer over packed 2x2 latent patches with rotary position ids, flow
    matching shifted by the image's sequence length, and a VAE with a shift factor. FLUX.1-dev
    embeds the (distilled) guidance scale; FLUX.1-schnell (``guidance_embeds=False``) not."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    clip_hidden, t5_dim, latent_channels = 8, 32, 4
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # a 2x2 patch of latents per token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,  # CLIP's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    ).eval()  # type: ignore[attr-defined]  # (diffusers' typing of the class hides nn.Module)
    torch.manual_seed(SEED)
    vae = _tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5035)
    torch.manual_seed(SEED)
    text_encoder = _tiny_text_encoder(tokenizer, hidden=clip_hidden, intermediate=16, heads=2,
                                      layers=2)
    t5_tokenizer = build_tiny_t5_tokenizer()
    text_encoder_2 = _tiny_t5(t5_tokenizer, t5_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _build_tiny_controlnet(**config):
    """A ControlNet for a tiny UNet (diffusers' ControlNet fast-test layout on tiny-sd's UNet
    shape, with ``config`` for the model it serves): its conditioning embedding halves the
    control image once, as the tiny VAE."""
    from diffusers import ControlNetModel

    net = _seeded_controlnet(
        ControlNetModel,
        block_out_channels=(4, 8),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(4, 8),
        norm_num_groups=2,
        **config,
    )
    return _steering(net, [*net.controlnet_down_blocks, net.controlnet_mid_block])


def _build_tiny_sd3_controlnet():
    """An SD3 ControlNet for tiny-sd3's transformer (its shape; one block, which steers the
    first of tiny-sd3's two: diffusers' SD3 transformer adds no ControlNet output to its last
    block): conditioned on the control image's VAE latents, with zeros for the pooled
    projections (the class's default, as SD3.5's ControlNets)."""
    from diffusers import SD3ControlNetModel

    net = _seeded_controlnet(
        SD3ControlNetModel, sample_size=32, patch_size=1, in_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=32, pooled_projection_dim=16, out_channels=4)
    return _steering(net, [net.pos_embed_input.proj, *net.controlnet_blocks])


def _build_tiny_flux_controlnet():
    """A FLUX ControlNet for tiny-flux's transformer (its shape, one double and one single
    block, dev's guidance embedding): conditioned on the control image's packed VAE latents."""
    from diffusers import FluxControlNetModel

    net = _seeded_controlnet(
        FluxControlNetModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    return _steering(net, [net.controlnet_x_embedder, *net.controlnet_blocks,
                           *net.controlnet_single_blocks])


def _seeded_controlnet(cls, **config):
    """A new ControlNet of class ``cls`` from the ControlNets' seed."""
    import torch

    torch.manual_seed(SEED + 3)
    return cls(**config).eval()


def _steering(net, layers):
    """``net`` with random weights in ``layers``: a new ControlNet's input and output layers
    are zeros (it starts as a no-op); a trained one's are not, so give the tiny one small
    random ones: its control image then steers."""
    import torch

    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, 0.2)
    return net


def _build_tiny_upscaler():
    """diffusers' StableDiffusionLatentUpscalePipeline fast-test components (one layer per block).

    The VAE is tiny-sd's (same config, same seed, so the same weights): the upscaler works in
    tiny-sd's latent space (4 channels). Its K-diffusion UNet conditions on its own text
    encoder: cross_attention_dim = text hidden size and time_cond_proj_dim = 128 (noise level
    embedding) + text hidden size (pooled output).
    """
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        UNet2DConditionModel,
    )

    text_hidden = 32
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        block_out_channels=[32, 32, 64, 64],  # the K blocks need this shape (group size 32)
        layers_per_block=1,
        time_cond_proj_dim=128 + text_hidden,
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=text_hidden,
        down_block_types=(
            "KDownBlock2D",
            "KCrossAttnDownBlock2D",
            "KCrossAttnDownBlock2D",
            "KCrossAttnDownBlock2D",
        ),
        in_channels=8,
        mid_block_type=None,
        only_cross_attention=False,
        out_channels=5,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        up_block_types=(
            "KCrossAttnUpBlock2D",
            "KCrossAttnUpBlock2D",
            "KCrossAttnUpBlock2D",
            "KUpBlock2D",
        ),
    ).eval()
    torch.manual_seed(SEED)
    vae = _tiny_vae()
    scheduler = EulerDiscreteScheduler(prediction_type="sample")
    torch.manual_seed(SEED)
    text_encoder = _tiny_text_encoder(
        tokenizer,
        hidden=text_hidden,
        intermediate=37,
        heads=4,
        layers=2,
        hidden_act="quick_gelu",
        projection_dim=32,
    )
    return StableDiffusionLatentUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


BUILDERS: dict[str, Callable[[], Any]] = {
    TINY_SD: _build_tiny_sd,
    TINY_SDXL: _build_tiny_sdxl,
    TINY_SD3: _build_tiny_sd3,
    TINY_FLUX: _build_tiny_flux,
    TINY_FLUX_SCHNELL: functools.partial(_build_tiny_flux, guidance_embeds=False),
    TINY_SD_CONTROLNET: functools.partial(_build_tiny_controlnet, cross_attention_dim=8),
    # tiny-sdxl's UNet conditioning: pooled embeddings and time ids
    TINY_SDXL_CONTROLNET: functools.partial(
        _build_tiny_controlnet, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 8,
        cross_attention_dim=16),
    TINY_SD3_CONTROLNET: _build_tiny_sd3_controlnet,
    TINY_FLUX_CONTROLNET: _build_tiny_flux_controlnet,
    TINY_UPSCALER: _build_tiny_upscaler,
}
