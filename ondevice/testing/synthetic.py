"""Synthetic checkpoints: real key names and shapes, small random weights.

:func:`synthetic_checkpoint` writes a safetensors file that ComfyUI's own
``comfy.sd.load_checkpoint_guess_config`` detects as the named model family and
loads as ``(ModelPatcher, CLIP, VAE, None)``. The layout comes from ComfyUI's
own classes, built on the meta device and renamed with ComfyUI's own
``process_*_state_dict_for_saving`` (so the file looks like one ComfyUI saved);
the values are ``randn * 0.02`` from a seeded generator, with norm scales 1,
``position_ids`` an arange and the TAESD latent scale set, so every output is
finite. Writing streams tensor by tensor (memory stays at one tensor) into a
temporary file that is then renamed over ``path``.

``"flux"`` is different: like the released ``flux1-dev.safetensors`` it holds the
diffusion model alone, under the released key names (``double_blocks.0.img_attn.qkv.weight``,
``single_blocks.0.linear1.weight``, ``guidance_in.in_layer.weight``, RMSNorm ``*_norm.scale``,
no prefix), and no text encoders (T5-XXL, CLIP-L) or VAE. It is what ComfyUI's "Load
Diffusion Model" node reads: ``comfy.sd.load_diffusion_model(path)`` (``load_unet`` in
old versions) detects it as ``Flux`` (Flux-dev: with guidance) and returns a
``ModelPatcher``. Its layout is the model ComfyUI's own detection builds from the keys
it reads, and is the same on every ComfyUI version. ComfyUI 2024-11 and 0.3.64
hardcode Flux's width (hidden size 3072, 24 heads, T5 context 4096, pooled 768), so the
mini variant keeps Flux-dev's width and has fewer blocks: it is 1 GiB, not tens of MB.

What each (family, size) holds (fp16 file sizes)::

    sd15 mini   500 keys   151.3 M params  289 MiB   one-level 320-channel UNet (25.8 M), CLIP-L, TAESD
    sd15 full  1130 keys  1066.2 M params  1.99 GiB  SD1.5 UNet (859.5 M), CLIP-L, AutoencoderKL
    sdxl mini  1463 keys   959.7 M params  1.79 GiB  small UNet (139.5 M) keeping what SDXL detection reads,
                                                     CLIP-L, CLIP-G (ComfyUI needs all 32 layers), TAESD
    sdxl full  2515 keys  3468.8 M params  6.46 GiB  SDXL UNet (2567.5 M), CLIP-L, CLIP-G, AutoencoderKL
    flux mini    52 keys   545.5 M params  1.02 GiB  Flux-dev's width, 1 double + 1 single block; a sampling
                                                     step on a 16x16 latent takes about a second on a CPU
    flux full   780 keys 11901.4 M params 22.17 GiB  Flux-dev: 19 double + 38 single blocks (do not write it
                                                     in tests: checkpoint_layout costs nothing)

:func:`cached_checkpoint` writes one such file once per cache directory and
returns its path. Both functions are safe to call from several threads or
processes at once: each writer uses its own temporary file and the last
rename wins (the files are identical).

Example::

    import comfy.sd
    from ondevice.testing.synthetic import cached_checkpoint

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(cached_checkpoint("sd15", "mini")))
    flux = comfy.sd.load_diffusion_model(str(cached_checkpoint("flux", "mini")))  # a ModelPatcher
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ondevice.errors import InvalidArgumentError

__all__ = ["FAMILIES", "FORMAT_VERSION", "SIZES", "cached_checkpoint", "checkpoint_layout", "synthetic_checkpoint"]

FAMILIES = ("sd15", "sdxl", "flux")
SIZES = ("mini", "full")
FORMAT_VERSION = 1  # bump when the bytes written for a (family, size) change; names cached files

# ComfyUI's reference UNet configs (comfy.model_detection.unet_config_from_diffusers_unet).
_SD15_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
_SDXL_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip

# Detection (supported_models.*.matches) compares only model_channels, context_dim, adm_in_channels,
# use_linear_in_transformer, use_temporal_attention and, for SDXL, transformer_depth; the rest can shrink.
_SD15_MINI_UNET = _SD15_UNET | {
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
}
_SDXL_MINI_UNET = _SDXL_UNET | {
    "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0] * 9,
}

# comfy.sd.VAE's config for SD1.x / SDXL's AutoencoderKL.
_KL_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


def _flux_probe(double_blocks: int, single_blocks: int) -> dict[str, tuple[int, ...]]:
    """The keys Flux detection reads, with Flux-dev's shapes (hidden 3072, T5-XXL 4096, CLIP-L pooled 768).

    ComfyUI 2024-11 and 0.3.64 hardcode hidden size 3072, 24 heads and context dim 4096, and 0.3.75 hardcodes
    24 heads of sum(axes_dim) = 128, so only the number of blocks can shrink. ``guidance_in`` makes it Flux-dev.
    """
    probe: dict[str, tuple[int, ...]] = {
        "img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
    }  # fmt: skip
    probe |= {f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(double_blocks)}
    probe |= {f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(single_blocks)}
    return probe


@dataclass(frozen=True)
class _Recipe:
    """A full checkpoint (model, text encoders, VAE), built from a UNet config ComfyUI detects."""

    config_class: str  # name in comfy.supported_models
    unet: Mapping[str, Any] = field(repr=False)
    vae: str  # "taesd" or "kl"


@dataclass(frozen=True)
class _DiffusionModel:
    """A diffusion-model-only file: the keys ComfyUI's detection reads; the class it names gives every other key."""

    config_class: str  # the comfy.supported_models class detection must name
    probe: Mapping[str, tuple[int, ...]] = field(repr=False)  # key -> shape


_RECIPES: dict[tuple[str, str], _Recipe | _DiffusionModel] = {
    ("sd15", "mini"): _Recipe("SD15", _SD15_MINI_UNET, "taesd"),
    ("sd15", "full"): _Recipe("SD15", _SD15_UNET, "kl"),
    ("sdxl", "mini"): _Recipe("SDXL", _SDXL_MINI_UNET, "taesd"),
    ("sdxl", "full"): _Recipe("SDXL", _SDXL_UNET, "kl"),
    ("flux", "mini"): _DiffusionModel("Flux", _flux_probe(double_blocks=1, single_blocks=1)),
    ("flux", "full"): _DiffusionModel("Flux", _flux_probe(double_blocks=19, single_blocks=38)),
}

_SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_POOL_SIZE = 1_048_573  # a prime, so that rows of any real width differ from each other
_CLIP_LOGIT_SCALE = math.log(100.0)


def _check_choice(function: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    valid = ", ".join(repr(c) for c in choices)
    msg = f"{function}({name}=...): got {value!r}; choose one of {valid}"
    raise InvalidArgumentError(msg)


def _recipe(function: str, family: object, size: object) -> _Recipe | _DiffusionModel:
    family = _check_choice(function, "family", family, FAMILIES)
    size = _check_choice(function, "size", size, SIZES)
    return _RECIPES[family, size]


def _check_dtype(dtype: object) -> torch.dtype:
    floats = tuple(d for d in _SAFETENSORS_DTYPES if d.is_floating_point)
    if isinstance(dtype, torch.dtype) and dtype in floats:
        return dtype
    valid = ", ".join(str(d) for d in floats)
    msg = f"synthetic_checkpoint(dtype=...): got {dtype!r}; choose one of {valid}"
    raise InvalidArgumentError(msg)


def _boot_comfy() -> None:
    from ondevice.comfyui import import_comfy  # noqa: PLC0415  (boots ComfyUI for the CPU first)

    import_comfy()


def _comfy_model_config(recipe: _Recipe) -> Any:
    _boot_comfy()
    import comfy.supported_models  # noqa: PLC0415

    return getattr(comfy.supported_models, recipe.config_class)(dict(recipe.unet))


def _vae_module(kind: str) -> torch.nn.Module:
    module: torch.nn.Module
    if kind == "taesd":
        import comfy.taesd.taesd  # noqa: PLC0415

        module = comfy.taesd.taesd.TAESD(latent_channels=4)
    else:
        import comfy.ldm.models.autoencoder  # noqa: PLC0415

        module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(_KL_DDCONFIG), embed_dim=4)
    return module


def _diffusion_model_layout(recipe: _DiffusionModel) -> dict[str, torch.Tensor]:
    """The state dict, on meta, of the model ComfyUI's own detection builds from the probe keys."""
    _boot_comfy()
    import comfy.model_detection  # noqa: PLC0415

    meta = torch.device("meta")
    probe = {key: torch.empty(shape, device=meta) for key, shape in recipe.probe.items()}
    config = comfy.model_detection.model_config_from_unet(probe, "")
    detected = type(config).__name__ if config is not None else None
    if detected != recipe.config_class:
        msg = f"synthetic checkpoint: this ComfyUI detects {recipe.config_class}'s keys as {detected}"
        raise RuntimeError(msg)
    with meta:
        module = config.get_model({}, "", device=meta).diffusion_model.state_dict()
    layout = {_released_key(key): t.to(meta) for key, t in module.items()}
    if set(config.process_unet_state_dict(dict(layout))) != set(module):  # what ComfyUI's loader renames
        msg = f"synthetic checkpoint: this ComfyUI's {detected} does not load the released key names"
        raise RuntimeError(msg)
    built = {key: tuple(layout[key].shape) if key in layout else None for key in recipe.probe}
    if built != recipe.probe:  # the class detection named lacks the shapes detection read: the file would not load
        msg = f"synthetic checkpoint: ComfyUI's {detected} builds {built}, not the shapes its detection read"
        raise RuntimeError(msg)
    return layout


def _released_key(key: str) -> str:
    """The name a released file gives a module key: Flux's RMSNorm scales are ``scale`` there.

    ComfyUI 0.33 names them ``weight`` in its modules and renames ``*_norm.scale`` on load; older versions
    name them ``scale`` too. Every version loads the released names.
    """
    return key[: -len("weight")] + "scale" if key.endswith(("query_norm.weight", "key_norm.weight")) else key


def _layout(recipe: _Recipe | _DiffusionModel) -> tuple[dict[str, torch.Tensor], float]:
    """Checkpoint key -> meta tensor (shape and dtype), and the family's latent scale factor (TAESD's ``vae_scale``)."""
    if isinstance(recipe, _DiffusionModel):
        return _diffusion_model_layout(recipe), 1.0  # no VAE in the file
    config = _comfy_model_config(recipe)
    meta = torch.device("meta")
    with meta:
        unet = config.get_model({}, "", device=meta).diffusion_model.state_dict()
        clip = config.clip_target().clip(device=meta, dtype=torch.float16).state_dict()
        vae = _vae_module(recipe.vae).state_dict()
    layout: dict[str, torch.Tensor] = {}
    layout |= config.process_unet_state_dict_for_saving(unet)
    layout |= config.process_clip_state_dict_for_saving(clip)  # SDXL adds a real position_ids tensor
    layout |= config.process_vae_state_dict_for_saving(vae)
    return {key: t.to(meta) for key, t in layout.items()}, float(config.latent_format.scale_factor)


def checkpoint_layout(family: str = "sd15", size: str = "mini") -> dict[str, torch.Tensor]:
    """Key name -> meta tensor (shape, dtype as ComfyUI builds it) of the synthetic checkpoint; costs no memory.

    Args:
        family: ``"sd15"``, ``"sdxl"`` or ``"flux"`` (diffusion model keys only, no prefix).
        size: ``"mini"`` or ``"full"``.

    Example::

        >>> sum(t.numel() for t in checkpoint_layout("flux", "full").values())
        11901408320
        >>> layout = checkpoint_layout("sd15", "full")
        >>> sum(t.numel() for k, t in layout.items() if k.startswith("model.diffusion_model."))
        859520964
    """
    layout, _ = _layout(_recipe("checkpoint_layout", family, size))
    return layout


class _Noise:
    """``randn * std`` values from a seeded generator, tiled from a pool (fast for billions of values)."""

    def __init__(self, seed: int, dtype: torch.dtype, std: float = 0.02) -> None:
        self._generator = torch.Generator().manual_seed(seed)
        pool = torch.randn(_POOL_SIZE, generator=self._generator).mul_(std).to(dtype)
        self._pool = torch.cat([pool, pool])  # any window of _POOL_SIZE values is one slice

    def fill_(self, out: torch.Tensor) -> torch.Tensor:
        flat = out.view(-1)
        start = int(torch.randint(_POOL_SIZE, (1,), generator=self._generator))
        for begin in range(0, flat.numel(), _POOL_SIZE):
            chunk = flat[begin : begin + _POOL_SIZE]
            chunk.copy_(self._pool[start : start + chunk.numel()])
        return out


def _filler(noise: _Noise, vae_scale: float) -> Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]:
    """A function giving the values of one checkpoint tensor from its key, meta tensor and storage dtype."""

    def fill(key: str, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if key.endswith("position_ids"):
            return torch.arange(meta.shape[-1], dtype=dtype).expand(meta.shape).contiguous()
        out = torch.empty(meta.shape, dtype=dtype)
        if key.endswith("vae_scale"):  # TAESD: the latent format's scale factor, as ComfyUI's TAESD loader sets
            return out.fill_(vae_scale)
        if key.endswith("vae_shift"):
            return out.fill_(0.0)
        if key.endswith("logit_scale"):
            return out.fill_(_CLIP_LOGIT_SCALE)
        if meta.ndim == 1 and key.endswith((".weight", ".scale")):  # LayerNorm / GroupNorm / RMSNorm scales
            return out.fill_(1.0)
        return noise.fill_(out)

    return fill


def _storage_dtype(meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if meta.dtype.is_floating_point else meta.dtype


def _header(layout: Mapping[str, torch.Tensor], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """A safetensors header: tensors stored back to back in layout order, padded to 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, meta in layout.items():
        stored = _storage_dtype(meta, dtype)
        size = meta.numel() * stored.itemsize
        entries[key] = {"dtype": _SAFETENSORS_DTYPES[stored], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    blob = json.dumps(entries, separators=(",", ":")).encode()
    return blob + b" " * (-len(blob) % 8)


def _stream_safetensors(
    file: BinaryIO,
    layout: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    fill: Callable[[str, torch.Tensor, torch.dtype], torch.Tensor],
    metadata: Mapping[str, str],
) -> None:
    header = _header(layout, dtype, metadata)
    file.write(struct.pack("<Q", len(header)))
    file.write(header)
    for key, meta in layout.items():
        tensor = fill(key, meta, _storage_dtype(meta, dtype))
        file.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """An open temporary file next to ``path``, renamed over ``path`` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        tmp.chmod(0o644)  # mkstemp makes 0600; a cache is meant to be read by others
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def synthetic_checkpoint(
    path: str | os.PathLike[str],
    family: str = "sd15",
    size: str = "mini",
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Path:
    """Write a synthetic checkpoint of ``family`` at ``size`` to ``path``; returns the path.

    ComfyUI's ``load_checkpoint_guess_config`` detects the file as ``SD15`` or
    ``SDXL`` and returns ``(ModelPatcher, CLIP, VAE, None)``; text encoding and
    VAE decoding give finite outputs. A ``"flux"`` file is a diffusion model
    alone: ``comfy.sd.load_diffusion_model`` detects it as ``Flux`` and returns a
    ``ModelPatcher`` whose sampling steps give finite outputs. The same
    arguments give the same bytes, on every ComfyUI version.
    Parent folders are created; the file appears whole or not at all. Safe to
    call from several threads or processes.

    Args:
        path: where to write (``.safetensors``); an existing file is replaced.
        family: ``"sd15"``, ``"sdxl"`` or ``"flux"`` (Flux-dev's diffusion model alone).
        size: ``"mini"`` (small UNet and TAESD; two Flux blocks) for fast tests, or ``"full"`` (the real sizes).
        dtype: floating dtype of the stored weights (``position_ids`` stay int64).
        seed: seed of the random values.

    Raises:
        InvalidArgumentError: unknown ``family``, ``size`` or ``dtype``, or a ``seed`` that is not an int.

    Example::

        path = synthetic_checkpoint("/tmp/ckpt/sdxl-mini.safetensors", "sdxl", "mini")
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
        flux = comfy.sd.load_diffusion_model(str(synthetic_checkpoint("/tmp/ckpt/flux-mini.safetensors", "flux")))
    """
    recipe = _recipe("synthetic_checkpoint", family, size)
    dtype = _check_dtype(dtype)
    if not isinstance(seed, int) or isinstance(seed, bool):
        msg = f"synthetic_checkpoint(seed=...): got {seed!r}; pass an int"
        raise InvalidArgumentError(msg)
    if sys.byteorder != "little":  # safetensors stores little-endian; torch writes native order
        msg = "synthetic_checkpoint: needs a little-endian machine"
        raise OSError(msg)
    layout, vae_scale = _layout(recipe)
    fill = _filler(_Noise(seed, dtype), vae_scale)
    metadata = {"ondevice.synthetic": f"{family}-{size}", "ondevice.format_version": str(FORMAT_VERSION),
                "ondevice.seed": str(seed)}  # fmt: skip
    target = Path(path)
    with _atomic_file(target) as file:
        _stream_safetensors(file, layout, dtype, fill, metadata)
    return target


def _default_cache_dir() -> Path:
    env = os.environ.get("ONDEVICE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ondevice"


def cached_checkpoint(
    family: str = "sd15",
    size: str = "mini",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Path of a synthetic checkpoint (fp16, seed 0) in a cache folder, written on first use.

    The folder is ``cache_dir``, else ``$ONDEVICE_CACHE``, else ``~/.cache/ondevice``;
    the file name holds family, size and :data:`FORMAT_VERSION`. A present file
    is returned as is. Processes that race each write a whole file and rename
    it into place; readers never see a partial file.

    Raises:
        InvalidArgumentError: unknown ``family`` or ``size``.
    """
    _recipe("cached_checkpoint", family, size)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    path = folder.expanduser() / f"synthetic-{family}-{size}-v{FORMAT_VERSION}.safetensors"
    if path.is_file():
        return path
    return synthetic_checkpoint(path, family, size)
