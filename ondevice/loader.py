"""CPU-first loading: checkpoints and single-component files, every weight on the CPU.

ComfyUI's loaders may put a diffusion model "straight to GPU" (when free VRAM
exceeds free RAM, or under ``--highvram``) and may build text encoders on the
GPU; they also register models in ComfyUI's loaded-model list.  These loaders
ask ComfyUI for CPU placement through its own knobs while they run (the
text encoders' ``initial_device`` option; the smart-memory switch that makes
``unet_inital_load_device`` answer CPU), and afterwards unregister and
offload whatever still landed elsewhere.  When they return, every weight is
on the CPU and none is in ComfyUI's list.

Files are checked before ComfyUI reads them (:mod:`ondevice.files`), so a missing,
empty, truncated, malformed or foreign file gets a clear error naming it.

Thread semantics: loads are serialized by a process-wide lock and hold
:data:`ondevice.comfyui.comfyui_lock` while they switch ComfyUI's module-level
memory mode, so no move of a ComfyUI component and no guarded ComfyUI memory
call runs meanwhile.
"""

from __future__ import annotations

import inspect
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ondevice.comfyui import comfyui_lock, import_comfy
from ondevice.devices import CPU
from ondevice.errors import (
    CheckpointError,
    InvalidArgumentError,
    MissingWeightsError,
    UnknownModelError,
)
from ondevice.files import FileInfo, check_file
from ondevice.placement import offload
from ondevice.strategies import Expand, register_strategy

__all__ = ["Checkpoint", "load_checkpoint", "load_diffusion_model", "load_text_encoders", "load_vae"]

_lock = threading.Lock()
_SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns; parts not asked for, or absent, are ``None``."""

    model: Any
    clip: Any
    vae: Any
    clipvision: Any


def _components(ckpt: Checkpoint) -> list[Any]:
    """The components a checkpoint has; ``on_gpu(ckpt)`` moves them all."""
    components = [component for component in ckpt if component is not None]
    if not components:
        msg = "this Checkpoint has no components (every field is None), so it has no weights to move"
        raise MissingWeightsError(msg)
    return components


register_strategy(Checkpoint, Expand(_components))


def _prefixes(keys: list[str]) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{prefix}.* ({n})" for prefix, n in counts.most_common(8)) or "no tensors"


@contextmanager
def _cpu_first(mm: Any) -> Iterator[None]:
    """Make ComfyUI's own placement heuristics answer "CPU" while a loader runs.

    ``DISABLE_SMART_MEMORY`` makes ``unet_inital_load_device`` return the CPU;
    HIGH_VRAM / SHARED are checked before it, so they are lowered to NORMAL_VRAM.
    """
    with _lock, comfyui_lock:  # ComfyUI's own memory management (guarded by this lock) waits meanwhile
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


@contextmanager
def _read_errors_named(file: Path, what: str) -> Iterator[None]:
    """Name the file in an error safetensors raises while reading it (say, a dtype this torch lacks)."""
    from safetensors import SafetensorError  # noqa: PLC0415

    try:
        yield
    except SafetensorError as exc:
        msg = f"{what} {str(file)!r} could not be read by safetensors: {exc}"
        raise CheckpointError(msg) from exc


def _safe_state_dict(file: Path, info: FileInfo, what: str) -> dict[str, torch.Tensor]:
    if info.safetensors:
        import safetensors.torch  # noqa: PLC0415

        with _read_errors_named(file, what):
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
    file, info = check_file(path, "checkpoint")
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
    with _cpu_first(mm), _read_errors_named(file, "checkpoint"):
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
    file, info = check_file(path, "diffusion model file")
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
    file, info = check_file(path, "VAE file")
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
    checked = [check_file(p, "text encoder file") for p in paths]
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
