"""The guard on ComfyUI's memory management (:func:`install_guard`, undone by :func:`remove_guard`), and what the
residency table asks of ComfyUI: room (:func:`reclaim`) and what it keeps loaded (:func:`kept_by_comfyui`).

These are the changes ondevice makes to ComfyUI, all in this one place: ``free_memory`` and
``load_models_gpu`` wrapped (everywhere they were imported by name), and ``ModelPatcher.clone``
(:mod:`ondevice.strategies.clones`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import comfy.model_management as mm
import torch

from ondevice.comfyui import comfyui_lock
from ondevice.residency import table
from ondevice.strategies import clones
from ondevice.strategies.comfy_books import is_dynamic, registered_entries
from ondevice.strategies.comfy_dynamic import relock_held

__all__ = ["install_guard", "kept_by_comfyui", "reclaim", "remove_guard"]

_GUARDED = ("free_memory", "load_models_gpu")
# id(guard) -> (guard, the ComfyUI function it wraps), for each installed guard; empty when not installed
_guards: dict[int, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _held_entries() -> list[Any]:
    """ComfyUI's entries for every weight a live scope holds."""
    return [entry for holding in table.held() if not holding.forced_off for entry in registered_entries(holding.key)]


def _guard_free_memory(free_memory: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(free_memory)
    def guarded_free_memory(memory_required: Any, device: Any, keep_loaded: Any = (), *args: Any, **kwargs: Any) -> Any:
        with comfyui_lock:
            relock_held()
            keep = [*keep_loaded, *_held_entries()]
            return free_memory(memory_required, device, keep, *args, **kwargs)  # for_dynamic, pins_required, ...

    return guarded_free_memory


def _guard_load_models_gpu(load_models_gpu: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_models_gpu)
    def guarded_load_models_gpu(*args: Any, **kwargs: Any) -> Any:
        with comfyui_lock:
            return load_models_gpu(*args, **kwargs)

    return guarded_load_models_gpu


def _replace_everywhere(replacements: dict[int, tuple[Callable[..., Any], Callable[..., Any]]]) -> None:
    """In every loaded module's namespace, replace each ``old`` of ``{id(old): (old, new)}`` with its ``new``."""
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attribute, value in list(namespace.items()):
            found = replacements.get(id(value))
            if found is not None and found[0] is value:
                setattr(module, attribute, found[1])


def install_guard() -> None:
    """Make ComfyUI's own memory management respect live scopes, and serialize it with ondevice's moves.

    Wraps ``comfy.model_management.free_memory`` and ``load_models_gpu``, and
    ``ModelPatcher.clone`` (:mod:`ondevice.strategies.clones`: clones made
    inside a scope get the original ``load_device`` back at its end), the
    changes ondevice makes to ComfyUI; importing ComfyUI's strategies (the
    first scope over a ComfyUI object) calls it.

    - ``free_memory`` (which ``load_models_gpu``, ``unload_all_models``,
      ``vae.decode`` ... call to make room) gets every held entry added to its
      ``keep_loaded``, ComfyUI's own veto, so ComfyUI never evicts what a scope
      holds; it first locks held dynamic-VRAM weights against comfy-aimdo again
      (ComfyUI's executor resets those locks after every node).  Every other
      argument (``for_dynamic``, ``pins_required``, ``ram_required``, ...)
      passes through unchanged.
    - Both take :data:`ondevice.comfyui.comfyui_lock`, as ondevice's moves of
      ComfyUI components do, because ComfyUI's loaded-model list has no lock.

    Copies of the two functions that other modules imported by name (``from
    comfy.model_management import free_memory``) are replaced too.  Idempotent;
    thread-safe.  Undo with :func:`remove_guard`.

    Example::

        from ondevice.strategies.comfy import install_guard, remove_guard

        remove_guard()  # ComfyUI's functions exactly as they were
        install_guard()  # guarded again
    """
    with comfyui_lock:
        if _guards:
            return
        originals = {name: getattr(mm, name) for name in _GUARDED}
        if any(hasattr(function, "__ondevice_guard__") for function in originals.values()):
            return  # guarded by another copy of this module (reloaded); that copy owns the undo
        guards = {
            "free_memory": _guard_free_memory(originals["free_memory"]),
            "load_models_gpu": _guard_load_models_gpu(originals["load_models_gpu"]),
        }
        for guard in guards.values():
            guard.__ondevice_guard__ = True  # type: ignore[attr-defined]
        _replace_everywhere({id(originals[name]): (originals[name], guards[name]) for name in _GUARDED})
        _guards.update({id(guards[name]): (guards[name], originals[name]) for name in _GUARDED})
        clones.install()


def remove_guard() -> None:
    """Undo :func:`install_guard`: ComfyUI's ``free_memory``, ``load_models_gpu`` and ``clone`` are its own again.

    Every module attribute that holds a guard (``comfy.model_management``'s,
    and copies imported by name before or after the guard was installed) gets
    the original function back.  An attribute that someone else replaced
    meanwhile (a wrapper around the guard) is left as it is.  Afterwards
    ComfyUI may evict what live scopes hold; ``scope.ensure()`` loads it back
    (so does the next entry or exit that moves weights on that device).
    Idempotent; thread-safe; :func:`install_guard` puts the guard back.
    """
    with comfyui_lock:
        _replace_everywhere(dict(_guards))
        clones.remove()
        _guards.clear()


def kept_by_comfyui(device: torch.device) -> int:
    """Bytes of the weights ComfyUI's loaded-model list keeps on ``device`` (its cache between nodes)."""
    patchers = [entry.model for entry in list(mm.current_loaded_models) if entry.device == device]
    return sum(_torch_bytes(patcher) for patcher in patchers if patcher is not None)


def _torch_bytes(patcher: Any) -> int:
    """The bytes of a loaded patcher's weights that torch allocated (a dynamic one's VBAR pages are aimdo's)."""
    if is_dynamic(patcher):
        return int(getattr(patcher.model, "model_loaded_weight_memory", 0))
    return int(patcher.loaded_size())


def reclaim(device: torch.device, nbytes: int) -> None:
    """Let ComfyUI unload models it keeps loaded but no scope holds until ``nbytes`` are free on ``device``."""
    with comfyui_lock:
        mm.free_memory(nbytes, device)  # guarded: never what live scopes (or keeps, prefetches) hold
