"""Finding and booting ComfyUI, and probing which of its features are present.

ComfyUI is not on PyPI: an importable ``comfy`` package wins; otherwise the
checkout named by :func:`use_comfyui` or the ``COMFYUI_PATH`` environment
variable is put on ``sys.path``.  On a machine with no CUDA / ROCm / MPS / XPU
ComfyUI is booted in CPU mode (``args.cpu = True`` before
``comfy.model_management`` is first imported).  ``sys.argv`` is never parsed.

Features are probed with ``hasattr`` / ``inspect.signature``, never by
comparing version strings.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ondevice.errors import ComfyUINotFoundError

__all__ = ["ComfyUIInfo", "comfyui_info", "comfyui_lock", "import_comfy", "use_comfyui"]

log = logging.getLogger("ondevice")

_lock = threading.RLock()
_user_path: Path | None = None
_info: ComfyUIInfo | None = None
_import_hooks: list[Callable[[types.ModuleType], None]] = []

comfyui_lock = threading.RLock()
"""Serializes everything that reads or changes ComfyUI's model-management state (its loaded-model list has no
lock of its own): ondevice's moves of ComfyUI components, ComfyUI's ``load_models_gpu`` / ``free_memory`` (once
guarded, see :mod:`ondevice.strategies.comfy`) and ondevice's CPU-first loaders.  Re-entrant.  Never taken
while the residency table's state lock is held, so moves of plain modules never wait for it."""


def add_import_hook(hook: Callable[[types.ModuleType], None]) -> Callable[[], None]:
    """Call ``hook(comfy.model_management)`` right after :func:`import_comfy` first imports ComfyUI.

    Returns a function that removes the hook.  (The fake GPU uses this to point
    a ComfyUI imported while it is active at itself.)
    """
    with _lock:
        _import_hooks.append(hook)

    def remove() -> None:
        with _lock:
            if hook in _import_hooks:
                _import_hooks.remove(hook)

    return remove


def use_comfyui(path: str | os.PathLike[str]) -> None:
    """Name the ComfyUI checkout to use when no ``comfy`` package is importable.

    ``path`` is the checkout's root (the folder that holds ``comfy/``).  Takes
    effect on the next import of ComfyUI; an already imported ComfyUI stays.
    """
    global _user_path
    root = _checkout_root(Path(path), source=f"use_comfyui({str(path)!r})")
    with _lock:
        _user_path = root


def _checkout_root(path: Path, *, source: str) -> Path:
    root = path.expanduser().resolve()
    if not (root / "comfy" / "model_management.py").is_file():
        msg = (
            f"{source}: {str(root)!r} is not a ComfyUI checkout (no comfy/model_management.py "
            "inside); pass the folder that holds ComfyUI's comfy/ package"
        )
        raise ComfyUINotFoundError(msg)
    return root


def _comfy_importable() -> bool:
    return importlib.util.find_spec("comfy") is not None


def _locate() -> None:
    """Make ``import comfy`` work, or raise a clear error saying how."""
    if _comfy_importable():
        return
    if _user_path is not None:
        root = _user_path
    elif os.environ.get("COMFYUI_PATH"):
        root = _checkout_root(Path(os.environ["COMFYUI_PATH"]), source="COMFYUI_PATH")
    else:
        msg = (
            "ComfyUI was not found: no importable 'comfy' package. Set the COMFYUI_PATH "
            "environment variable to your ComfyUI checkout, or call "
            "ondevice.use_comfyui('/path/to/ComfyUI') before using ComfyUI components"
        )
        raise ComfyUINotFoundError(msg)
    if str(root) not in sys.path:
        sys.path.append(str(root))
    importlib.invalidate_caches()


def _has_accelerator() -> bool:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def import_comfy() -> types.ModuleType:
    """Import ComfyUI (booting it for the CPU where needed); returns ``comfy.model_management``."""
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        return mm
    with _lock:
        mm = sys.modules.get("comfy.model_management")
        if mm is not None:
            return mm
        _locate()
        try:
            import comfy.options  # noqa: PLC0415

            comfy.options.enable_args_parsing(False)  # ComfyUI's default; cli_args reads it at import
            import comfy.cli_args  # noqa: PLC0415

            if not _has_accelerator():
                comfy.cli_args.args.cpu = True
            mm = importlib.import_module("comfy.model_management")
        except ImportError as exc:
            msg = f"ComfyUI was found but failed to import ({exc}); install its requirements"
            raise ComfyUINotFoundError(msg) from exc
        for hook in list(_import_hooks):
            hook(mm)
        return mm


@dataclass(frozen=True)
class ComfyUIInfo:
    """Which ComfyUI this is and which of its features ondevice found."""

    version: str
    path: str
    features: dict[str, bool] = field(default_factory=dict)


def comfyui_info() -> ComfyUIInfo:
    """Import ComfyUI if needed and report its version, location and features."""
    global _info
    mm = import_comfy()
    if _info is not None:
        return _info
    import comfy.model_patcher as mp  # noqa: PLC0415
    import comfy.sd  # noqa: PLC0415

    spec = importlib.util.find_spec("comfy")
    locations = list(spec.submodule_search_locations or []) if spec else []
    features = {
        "weakref_loaded_model": isinstance(getattr(mm.LoadedModel, "model", None), property),
        "patcher_detach": hasattr(mp.ModelPatcher, "detach"),
        "dynamic_vram": hasattr(mp, "ModelPatcherDynamic"),
        "aimdo_enabled": _aimdo_enabled(),
        "multi_gpu": hasattr(mm, "get_all_torch_devices"),
        "checkpoint_device_options": "disable_dynamic" in _params(comfy.sd.load_checkpoint_guess_config),
        "free_memory_for_dynamic": "for_dynamic" in _params(mm.free_memory),
        "cpu_mode": mm.cpu_state == mm.CPUState.CPU,
    }
    _info = ComfyUIInfo(version=_version(), path=locations[0] if locations else "", features=features)
    return _info


def _params(func: Any) -> set[str]:
    return set(inspect.signature(func).parameters)


def _aimdo_enabled() -> bool:
    try:
        cmm = importlib.import_module("comfy.memory_management")
    except ImportError:
        return False
    return bool(getattr(cmm, "aimdo_enabled", False))


def _version() -> str:
    try:
        module = importlib.import_module("comfyui_version")
        return str(module.__version__)
    except ImportError:
        pass
    try:
        return f"notcomfy {importlib.metadata.version('notcomfy')} (ComfyUI 2024-11-25)"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
