"""Reading a diffusers model directory without loading weights: its ``model_index.json``, a
component's config and class, the bytes of its weights, and the sizes diffusers derives from
the configs (the VAE's scale, the native image size). Pure file reads: no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

#: the classes a directory may hold alone (``config.json`` and its weights, no pipeline):
#: models that a workflow attaches to another one's node
SINGLE_MODELS = ("ControlNetModel", "SD3ControlNetModel", "FluxControlNetModel")


def is_single_model(path: Path) -> bool:
    """Whether ``path`` holds one attachable model (a ControlNet) saved on its own."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("_class_name") in SINGLE_MODELS


def model_index(model_dir: Path | str) -> dict:
    return json.loads((Path(model_dir) / "model_index.json").read_text())


def index_components(model_dir: Path | str) -> frozenset[str]:
    """The components a model directory holds: the entries of its ``model_index.json`` that
    name a class (``"safety_checker": [null, null]``, as diffusers writes a pipeline saved
    without one, does not) and whose subfolder exists. ``OSError`` or ``ValueError`` where
    the index cannot be read."""
    path = Path(model_dir)
    index = model_index(path)
    return frozenset(
        name for name, entry in index.items()
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2
        and entry[0] is not None and entry[1] is not None and (path / name).is_dir()
    )


def component_config(model_dir: Path | str, subfolder: str) -> dict:
    """A component's config (``config.json``, or ``scheduler_config.json`` for a scheduler)."""
    folder = Path(model_dir) / subfolder
    for name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    raise FileNotFoundError(f"{folder}: no config file")


def component_class(model_dir: Path | str, component: str) -> type:
    """The class ``model_index.json`` names for ``component`` (e.g. ``unet`` ->
    ``diffusers.UNet2DConditionModel``), as ``DiffusionPipeline.from_pretrained`` resolves it
    (importing its library)."""
    import importlib

    entry = model_index(model_dir).get(component)
    if not entry or entry[0] is None:
        raise FileNotFoundError(f"{model_dir}: model_index.json has no {component!r} component")
    library, class_name = entry
    if library in ("diffusers", "transformers"):
        module = importlib.import_module(library)
    else:  # a pipeline module of diffusers, e.g. "stable_diffusion" for the safety checker
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    return getattr(module, class_name)


def weights_bytes(model_dir: Path | str, components: Iterable[str],
                  dtype: str | None = None) -> int:
    """Bytes the weights of ``components`` (subfolders of a diffusers directory; ``"."`` for a
    one-model directory such as a ControlNet's) take once a default ``from_pretrained`` has
    loaded them: what a replica holding them needs. With ``dtype`` (``float32``, ``float16``,
    ``bfloat16``: what the cores load in, ``common.families.load_dtype``) a safetensors file's
    floating-point tensors count at that dtype's size, read from its header; else (or for a
    ``.bin`` file, which has no header to read) as stored. Per subfolder only one format counts
    (safetensors, which diffusers and transformers prefer, else ``.bin``) and dtype variants
    such as ``*.fp16.safetensors`` are skipped: a real SD repository ships all of them side by
    side, and summing them would count the same model several times."""
    total = 0
    for component in set(components):
        folder = Path(model_dir) / component
        for suffix in (".safetensors", ".bin"):
            files = [f for f in folder.glob(f"*{suffix}") if "." not in f.name[: -len(suffix)]]
            if files:
                total += sum(_loaded_bytes(f, dtype) for f in files)
                break
    return total


#: bytes per element of the dtypes weights load in, and the safetensors dtypes that are cast
_LOAD_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_FLOATS = {"F64", "F32", "F16", "BF16"}


def _loaded_bytes(path: Path, dtype: str | None) -> int:
    if dtype is None or path.suffix != ".safetensors":
        return path.stat().st_size
    if dtype not in _LOAD_BYTES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(_LOAD_BYTES)}")
    with open(path, "rb") as fh:  # an 8-byte little-endian length, then the JSON header
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] in _FLOATS:
            count = 1
            for side in entry["shape"]:
                count *= side
            total += count * _LOAD_BYTES[dtype]
        else:
            begin, end = entry["data_offsets"]
            total += end - begin
    return total


def vae_scale_factor(model_dir: Path | str) -> int:
    """As the SD pipelines compute it: 2 ** (len(vae.block_out_channels) - 1)."""
    return 2 ** (len(component_config(model_dir, "vae")["block_out_channels"]) - 1)


def native_size(model_dir: Path | str) -> tuple[int, int]:
    """(width, height) as diffusers picks them when a request omits them: the denoising
    model's (UNet's, or SD3's transformer's) sample_size x the VAE's scale (FLUX's pipelines:
    a default_sample_size of 128; its transformer's config has none)."""
    model_dir = Path(model_dir)
    denoiser = "unet" if (model_dir / "unet").is_dir() else "transformer"
    sample = component_config(model_dir, denoiser).get("sample_size", 128)
    if isinstance(sample, list | tuple):
        height, width = sample
    else:
        height = width = sample
    scale = vae_scale_factor(model_dir)
    return width * scale, height * scale
