"""CPU-first loading: checkpoints and single-component files, every weight on the CPU.

ComfyUI's loaders may put a diffusion model "straight to GPU" (when free VRAM
exceeds free RAM, or under ``--highvram``) and may build text encoders on the
GPU; they also register models in ComfyUI's loaded-model list.  These loaders
ask ComfyUI for CPU placement through its own knobs while they run (the
text encoders' ``initial_device`` option; the smart-memory switch that makes
``unet_inital_load_device`` answer CPU), and afterwards unregister and
offload whatever still landed elsewhere.  When they return, every weight is
on the CPU and none is in ComfyUI's list.

Files are checked before ComfyUI reads them, so a missing, empty, truncated,
or foreign file gets a clear error naming it.

Thread semantics: loads are serialized by a process-wide lock and hold the
residency table's lock while they switch ComfyUI's module-level memory mode,
so no scope and no guarded ComfyUI memory call runs meanwhile.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ondevice.comfyui import import_comfy
from ondevice.devices import CPU
from ondevice.errors import (
    CheckpointError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MissingWeightsError,
    UnknownModelError,
)
from ondevice.placement import offload
from ondevice.residency import table

__all__ = ["Checkpoint", "load_checkpoint", "load_diffusion_model", "load_text_encoders", "load_vae"]

_lock = threading.Lock()
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns; parts not asked for, or absent, are ``None``."""

    model: Any
    clip: Any
    vae: Any
    clipvision: Any


class _FileInfo(NamedTuple):
    safetensors: bool
    keys: list[str]


def _check_file(path: str | os.PathLike[str], what: str) -> tuple[Path, _FileInfo]:
    """Validate ``path`` as a checkpoint file; raise a clear error naming it if it is not one."""
    file = Path(path)
    if not file.exists():
        msg = f"{what} {str(file)!r} does not exist; check the path"
        raise CheckpointNotFoundError(msg)
    if file.is_dir():
        msg = f"{what} {str(file)!r} is a directory; pass the path of a .safetensors (or .ckpt) file inside it"
        raise CheckpointIsADirectoryError(msg)
    size = file.stat().st_size
    if size == 0:
        msg = f"{what} {str(file)!r} is empty (0 bytes); the download or copy did not finish"
        raise CheckpointError(msg)
    with file.open("rb") as handle:
        head = handle.read(8)
        if _is_torch_pickle(head):
            return file, _FileInfo(safetensors=False, keys=[])
        keys = _safetensors_keys(file, handle, head, size, what)
    return file, _FileInfo(safetensors=True, keys=keys)


def _is_torch_pickle(head: bytes) -> bool:
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _safetensors_keys(file: Path, handle: Any, head: bytes, size: int, what: str) -> list[str]:
    not_ckpt = f"{what} {str(file)!r} is not a checkpoint: it is neither a safetensors file nor a torch checkpoint"
    if len(head) < 8:
        raise CheckpointError(not_ckpt)
    (header_len,) = struct.unpack("<Q", head)
    if header_len == 0 or header_len > 100 * 2**20:
        raise CheckpointError(not_ckpt)
    if header_len > size - 8:
        msg = f"{what} {str(file)!r} is truncated inside its safetensors header; download or copy it again"
        raise CheckpointError(msg)
    try:
        header = json.loads(handle.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(not_ckpt) from None
    if not isinstance(header, dict):
        raise CheckpointError(not_ckpt)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not all(_is_tensor_entry(v) for v in tensors.values()):
        raise CheckpointError(not_ckpt)
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if 8 + header_len + end > size:
        msg = (
            f"{what} {str(file)!r} is truncated: its header describes {8 + header_len + end} bytes "
            f"but the file has {size}; download or copy it again"
        )
        raise CheckpointError(msg)
    return list(tensors)


def _is_tensor_entry(entry: object) -> bool:
    """A safetensors header entry: ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}``."""
    if not isinstance(entry, dict):
        return False
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    return (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )


def _prefixes(keys: list[str]) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.most_common(8)) or "no tensors"


@contextmanager
def _cpu_first(mm: Any) -> Iterator[None]:
    """Make ComfyUI's own placement heuristics answer "CPU" while a loader runs.

    ``DISABLE_SMART_MEMORY`` makes ``unet_inital_load_device`` return the CPU;
    HIGH_VRAM / SHARED are checked before it, so they are lowered to NORMAL_VRAM.
    """
    with _lock, table.lock:  # ComfyUI's own memory management (guarded by the table's lock) waits meanwhile
        saved = mm.DISABLE_SMART_MEMORY, mm.vram_state
        mm.DISABLE_SMART_MEMORY = True
        if mm.vram_state in (mm.VRAMState.HIGH_VRAM, mm.VRAMState.SHARED):
            mm.vram_state = mm.VRAMState.NORMAL_VRAM
        try:
            yield
        finally:
            mm.DISABLE_SMART_MEMORY, mm.vram_state = saved


def _te_options(te_model_options: dict[str, Any] | None) -> dict[str, Any]:
    options = dict(te_model_options or {})
    options.setdefault("initial_device", CPU)  # honoured by comfy.sd.CLIP in every version
    return options


def _settle(*components: Any) -> None:
    """Unregister and offload every component that is not ``None``."""
    for component in components:
        if component is None:
            continue
        try:
            offload(component)
        except MissingWeightsError:
            continue  # nothing to move; _require() reports it if it was asked for


def _safe_state_dict(file: Path, info: _FileInfo, what: str) -> dict[str, torch.Tensor]:
    if info.safetensors:
        import safetensors.torch  # noqa: PLC0415

        return safetensors.torch.load_file(str(file), device="cpu")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch.load raises pickle, zip, EOF and runtime errors alike)
        msg = f"{what} {str(file)!r} could not be read as a torch checkpoint ({exc}); is the file complete?"
        raise CheckpointError(msg) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        msg = f"{what} {str(file)!r} holds a {type(data).__name__}, not a state dict of tensors"
        raise CheckpointError(msg)
    return data


def _supported(func: Any, **kwargs: Any) -> dict[str, Any]:
    params = inspect.signature(func).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    vae: bool = True,
    clip: bool = True,
    clipvision: bool = False,
    embedding_directory: str | None = None,
    model_options: dict[str, Any] | None = None,
    te_model_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Load a checkpoint with ComfyUI, every component on the CPU and unregistered.

    Example::

        ckpt = ondevice.load_checkpoint("sd_xl_base_1.0.safetensors")
        with ondevice.on_gpu(ckpt.model):
            ...
    """
    file, info = _check_file(path, "checkpoint")
    mm = import_comfy()
    import comfy.sd  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        "output_vae": vae,
        "output_clip": clip,
        "output_clipvision": clipvision,
        "embedding_directory": embedding_directory,
        "model_options": dict(model_options or {}),
        "te_model_options": _te_options(te_model_options),
    }
    with _cpu_first(mm):
        try:
            if info.safetensors and file.suffix.lower() in _SAFETENSORS_SUFFIXES:
                out = comfy.sd.load_checkpoint_guess_config(str(file), **kwargs)
            else:
                sd = _safe_state_dict(file, info, "checkpoint")
                guess = comfy.sd.load_state_dict_guess_config
                out = guess(sd, **_supported(guess, **kwargs))
        except RuntimeError as exc:
            if "detect model type" not in str(exc):
                raise
            out = None
    if out is None:
        msg = (
            f"checkpoint {str(file)!r}: ComfyUI does not recognize its model family; "
            f"key prefixes found: {_prefixes(info.keys)}. Load it with a loader for its kind "
            "(load_diffusion_model, load_vae, load_text_encoders) or update ComfyUI"
        )
        raise UnknownModelError(msg)
    ckpt = Checkpoint(*out)
    _settle(*ckpt)
    _require(ckpt, file, vae=vae, clip=clip)
    return ckpt


def _require(ckpt: Checkpoint, file: Path, *, vae: bool, clip: bool) -> None:
    missing = []
    if vae and (ckpt.vae is None or getattr(ckpt.vae, "patcher", None) is None):
        missing.append(("VAE", "first_stage_model.", "vae=False", "load_vae"))
    if clip and ckpt.clip is None:
        missing.append(("CLIP", "cond_stage_model. / conditioner.", "clip=False", "load_text_encoders"))
    if missing:
        what = " and ".join(m[0] for m in missing)
        msg = (
            f"checkpoint {str(file)!r} has no {what} weights (no keys under "
            f"{' or '.join(m[1] for m in missing)}); pass {', '.join(m[2] for m in missing)} "
            f"and load them from their own files with {' / '.join(m[3] for m in missing)}"
        )
        raise CheckpointError(msg)


def load_diffusion_model(path: str | os.PathLike[str], *, model_options: dict[str, Any] | None = None) -> Any:
    """Load a diffusion-model-only file (UNet / DiT) as a ``ModelPatcher`` on the CPU, unregistered."""
    file, info = _check_file(path, "diffusion model file")
    mm = import_comfy()
    import comfy.sd  # noqa: PLC0415

    sd = _safe_state_dict(file, info, "diffusion model file")
    with _cpu_first(mm):
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=dict(model_options or {}))
    if model is None:
        msg = (
            f"diffusion model file {str(file)!r}: ComfyUI does not recognize it as a diffusion model; "
            f"key prefixes found: {_prefixes(list(sd))}"
        )
        raise UnknownModelError(msg)
    _settle(model)
    return model


def load_vae(path: str | os.PathLike[str]) -> Any:
    """Load a VAE file as a ``comfy.sd.VAE`` on the CPU, unregistered."""
    file, info = _check_file(path, "VAE file")
    import_comfy()
    import comfy.sd  # noqa: PLC0415

    sd = _safe_state_dict(file, info, "VAE file")
    vae = comfy.sd.VAE(sd=sd)
    if getattr(vae, "patcher", None) is None:
        msg = (
            f"VAE file {str(file)!r} holds no VAE weights ComfyUI recognizes; key prefixes found: {_prefixes(list(sd))}"
        )
        raise UnknownModelError(msg)
    _settle(vae)
    return vae


def load_text_encoders(
    *paths: str | os.PathLike[str],
    kind: str = "stable_diffusion",
    embedding_directory: str | None = None,
    model_options: dict[str, Any] | None = None,
) -> Any:
    """Load one or more text-encoder files as one ``comfy.sd.CLIP`` on the CPU, unregistered.

    ``kind`` names a member of ComfyUI's ``CLIPType`` (``"stable_diffusion"``
    for SD1.x and, with the CLIP-L and CLIP-G files, SDXL; ``"sd3"``, ``"flux"``, ...).
    """
    if not paths:
        msg = "load_text_encoders(): pass at least one text-encoder file path"
        raise InvalidArgumentError(msg)
    checked = [_check_file(p, "text encoder file") for p in paths]
    mm = import_comfy()
    import comfy.sd  # noqa: PLC0415

    names = [member.name.lower() for member in comfy.sd.CLIPType]
    if kind.lower() not in names:
        msg = f"load_text_encoders(kind={kind!r}): unknown kind; use one of {names}"
        raise InvalidArgumentError(msg)
    state_dicts = [_safe_state_dict(f, i, "text encoder file") for f, i in checked]
    with _cpu_first(mm):
        clip = comfy.sd.load_text_encoder_state_dicts(
            state_dicts,
            embedding_directory=embedding_directory,
            clip_type=comfy.sd.CLIPType[kind.upper()],
            model_options=_te_options(model_options),
        )
    _settle(clip)
    return clip
