"""ComfyUI's books on loaded weights: the entries of its loaded-model list (``current_loaded_models``) that
wrap given weights, and whether a patcher is a dynamic-VRAM one.

``LoadedModel.model`` is a weakref property from 2024-12 on (``WEAKREF_LOADED_MODEL``) and may then be
``None``.  Thread semantics: ComfyUI's list has no lock; callers that change it hold ``comfyui_lock``.
"""

from __future__ import annotations

from typing import Any

import comfy.model_management as mm

__all__ = ["WEAKREF_LOADED_MODEL", "is_dynamic", "is_registered", "registered_entries", "remove_entry"]

WEAKREF_LOADED_MODEL = isinstance(getattr(mm.LoadedModel, "model", None), property)


def is_dynamic(patcher: Any) -> bool:
    """Whether ``patcher`` is a dynamic-VRAM one (``ModelPatcherDynamic``, comfy-aimdo): probed, not versioned."""
    probe = getattr(patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def registered_entries(weights: object) -> list[Any]:
    """The ``current_loaded_models`` entries whose patcher wraps ``weights`` (a copy, safe to mutate)."""
    out = []
    for entry in list(mm.current_loaded_models):
        patcher = entry.model  # None once a weakly held patcher was collected
        if patcher is not None and getattr(patcher, "model", None) is weights:
            out.append(entry)
    return out


def is_registered(patcher: Any) -> bool:
    """True when ComfyUI's loaded-model list holds an entry for ``patcher``'s weights."""
    return bool(registered_entries(patcher.model))


def remove_entry(entry: Any) -> None:
    """Take ``entry`` out of ComfyUI's loaded-model list (by identity), without unloading it."""
    models = mm.current_loaded_models
    for index, other in enumerate(models):
        if other is entry:  # by identity: LoadedModel.__eq__ compares patchers
            del models[index]
            return
