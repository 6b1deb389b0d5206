"""Profile the denoiser on a device, in the format of ``data/profiles-h800/*.json``, and
compare with the H800 profiles. From the repository root:

    .venv/bin/python scripts/profile_denoiser.py --out data/profiles-h200      # on a GPU
    .venv/bin/python scripts/profile_denoiser.py --tiny --device cpu --out /tmp/p  # a smoke run

Times what our denoiser node runs per step: ONE ``UNet2DConditionModel`` forward of ONE
classifier-free-guidance branch (as the H800 files do), fp16 on CUDA, at each batch size at the
model's native resolution (SD1.5 512x512 = 64x64 latents, SDXL 1024x1024 = 128x128 latents
with its added ``text_embeds`` / ``time_ids``): warm-up, then the median of ``--repeats``
forwards, each bracketed by ``torch.cuda.synchronize``. The UNets are built from the real
configs written below with random weights (the time does not depend on their values):
nothing is downloaded. Loading: ``host_mem_to_gpu_time`` moves the fp16 weights from host
memory to the GPU; ``disk_to_host_mem_time`` reads them back from a safetensors file just
written, so from the page cache (a lower bound). ``gpu_memory_required`` is the weights'
allocation, ``gpu_memory_used`` the peak at that batch (``torch.cuda.max_memory_allocated``).
``--tiny`` builds tiny UNets of the same shape families, so that the script runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

#: unet/config.json of runwayml/stable-diffusion-v1-5 (859.5 M parameters)
SD15_UNET: dict[str, Any] = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
#: unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (2.567 B parameters)
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
#: profile name (as in data/profiles-h800) -> UNet config
MODELS = {"StableDiffusion15": SD15_UNET, "StableDiffusionXL": SDXL_UNET}
TEXT_TOKENS = 77  # CLIP's sequence length
TIME_IDS = 6  # SDXL: original size, crop top-left, target size


def tiny(config: dict[str, Any]) -> dict[str, Any]:
    """The same family of UNet (blocks, cross-attention, SDXL's added conditioning), tiny."""
    small = {**config, "block_out_channels": [32, 64], "layers_per_block": 1,
             "norm_num_groups": 8, "attention_head_dim": [2, 4], "cross_attention_dim": 32,
             "transformer_layers_per_block": 1, "sample_size": 8,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
    if config.get("addition_embed_type") == "text_time":
        small.update(addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + TIME_IDS * 8)
    return small


def forward_inputs(config: dict[str, Any], batch: int, device: str,
                   dtype: torch.dtype) -> dict[str, Any]:
    """Random inputs of one CFG branch of ``batch`` rows at the config's native size."""
    size = config["sample_size"]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    inputs: dict[str, Any] = {
        "sample": randn(batch, config["in_channels"], size, size),
        "timestep": torch.full((batch,), 999, device=device),
        "encoder_hidden_states": randn(batch, TEXT_TOKENS, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - (
            TIME_IDS * config["addition_time_embed_dim"])
        pixels = size * 8
        time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=dtype)
        inputs["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled),
                                       "time_ids": time_ids.repeat(batch, 1).to(device)}
    return inputs


def profile_model(name: str, config: dict[str, Any], device: str, batches: list[int],
                  warmup: int, repeats: int) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32  # CPUs lack fast fp16 convolutions

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in fp16 rather than cast (diffusers warns on a cast)
    try:
        with torch.device(device):  # random init on the device is seconds, not minutes
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(previous)
    unet.eval().to("cpu")  # the host copy a replica loads from
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.safetensors"
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
        started = time.perf_counter()
        load_file(str(path))
        disk_to_host_s = time.perf_counter() - started
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    sync()
    started = time.perf_counter()
    unet.to(device)
    sync()
    host_to_device_s = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    required = torch.cuda.memory_allocated(device) - before if cuda else weights

    results = []
    with torch.inference_mode():
        for batch in batches:
            inputs = forward_inputs(config, batch, device, dtype)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(warmup):
                unet(**inputs, return_dict=False)
            seconds = []
            for _ in range(repeats):
                sync()
                started = time.perf_counter()
                unet(**inputs, return_dict=False)
                sync()
                seconds.append(time.perf_counter() - started)
            used = torch.cuda.max_memory_allocated(device) if cuda else 0
            results.append({"batch_size": batch, "height": config["sample_size"] * 8,
                            "width": config["sample_size"] * 8,
                            "execution_time": statistics.median(seconds),
                            "gpu_memory_used": float(used)})
            del inputs
    del unet
    if cuda:
        torch.cuda.empty_cache()
        props = torch.cuda.get_device_properties(device)
        gpu_type, total = props.name, props.total_memory
    else:
        gpu_type, total = "cpu", 0
    return {
        "gpu_type": gpu_type, "gpu_memory_total": total, "model_name": name,
        "loading": {"disk_to_host_mem_time": disk_to_host_s,
                    "host_mem_to_gpu_time": host_to_device_s,
                    "gpu_memory_required": float(required)},
        "execution": [{"mode": "default", "results": results}],
    }


def comparison(measured: dict[str, Any], reference_dir: Path) -> str:
    """A table of this device's times against the reference profile's, batch by batch."""
    from emulation.profiles import parse_profile

    ours = parse_profile(measured)
    path = reference_dir / f"{ours.name}.json"
    if not path.is_file():
        return f"{ours.name}: no reference profile at {path}"
    reference = json.loads(path.read_text())
    theirs = parse_profile(reference)
    gpu, ref_gpu = measured["gpu_type"], reference["gpu_type"]
    lines = [f"{ours.name}: {gpu} / {ref_gpu}",
             f"{'batch':>5}  {gpu[:14]:>14} s  {ref_gpu[:14]:>14} s  {'ratio':>6}"]
    for r in measured["execution"][0]["results"]:
        b, h, w = r["batch_size"], r["height"], r["width"]
        mine, ref = ours.execution_s(b), theirs.execution_s(b, height=h, width=w)
        lines.append(f"{b:>5}  {mine:>16.4f}  {ref:>16.4f}  {mine / ref:>6.2f}")
    lines.append(f"{'load':>5}  {ours.host_to_device_s:>16.4f}  {theirs.host_to_device_s:>16.4f}"
                 f"  {ours.host_to_device_s / theirs.host_to_device_s:>6.2f}  (host -> GPU)")
    lines.append(f"{'GB':>5}  {ours.memory_bytes / 1e9:>16.3f}  {theirs.memory_bytes / 1e9:>16.3f}"
                 f"  {ours.memory_bytes / theirs.memory_bytes:>6.2f}  (weights on the GPU)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for MODEL.json files")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny UNets (a CPU smoke run)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reference", type=Path, default=REPO / "data" / "profiles-h800")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        config = tiny(MODELS[name]) if args.tiny else MODELS[name]
        measured = profile_model(name, config, args.device, batches, args.warmup, args.repeats)
        (args.out / f"{name}.json").write_text(json.dumps(measured, indent=4) + "\n")
        print(comparison(measured, args.reference), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
