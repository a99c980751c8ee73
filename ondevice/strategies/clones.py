"""ComfyUI clones made inside a scope: their ``load_device`` follows the scope, then goes back with the original's.

While a scope holds a ``ModelPatcher``, :class:`~ondevice.strategies.comfy.PatcherPart`
points its ``load_device`` at the scope's device (so that ComfyUI's own loads,
a sampler's ``load_models_gpu`` say, find the weights where they are).  ComfyUI's
``clone()`` copies ``load_device``, so a clone made inside the scope (a LoRA
node, ``CLIP.clone()``, a clone of such a clone) names the scope's device too,
which is right while the scope runs and wrong after it: ComfyUI would load that
clone on the scope's device, say ``cuda:1``, where the user's own setting is
``cuda:0``.

:func:`watch` (called when a part first points a patcher) records the clones
made meanwhile through the ``clone`` wrapper that :func:`install` puts on
``comfy.model_patcher.ModelPatcher`` (the one wrap of ComfyUI's classes, undone
by :func:`remove`, with ``install_guard`` / ``remove_guard``); :func:`unwatch`
(when the part restores the original) gives every such clone still naming the
scope's device the original back.  A clone whose ``load_device`` someone set to
another device meanwhile is left as it is.  ComfyUI's ``clone_has_same_weights``
sees nothing of this (no callback or attribute is added to any patcher).

Thread semantics: a clone may be made on any thread; a lock guards the watch list.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import comfy.model_patcher as mp
import torch

__all__ = ["Watch", "install", "remove", "unwatch", "watch"]


@dataclass(eq=False)
class Watch:
    """One pointed patcher: the device its scope points it at, the ``load_device`` to give back, its clones so far."""

    device: torch.device
    original: Any
    clones: list[weakref.ref[Any]] = field(default_factory=list)


_lock = threading.Lock()
# id(patcher) -> (a weak reference to it, its watch): pointed patchers and the clones made from them meanwhile
_watched: dict[int, tuple[weakref.ref[Any], Watch]] = {}
_installed: list[Callable[..., Any]] = []  # the ComfyUI clone that the wrapper wraps, while installed


def _lookup(patcher: Any) -> Watch | None:
    found = _watched.get(id(patcher))
    return found[1] if found is not None and found[0]() is patcher else None


def watch(patcher: Any, device: torch.device, original: Any) -> Watch | None:
    """Record the clones of ``patcher`` (pointed at ``device``; ``original`` its own ``load_device``) until
    :func:`unwatch`; None (nothing to undo) where it is watched already: an outer part of the same patcher watches."""
    with _lock:
        if _lookup(patcher) is not None:
            return None
        made = Watch(device, original)
        _watched[id(patcher)] = (weakref.ref(patcher), made)
        return made


def unwatch(patcher: Any, made: Watch) -> None:
    """Stop watching ``patcher``; every clone made meanwhile that still names the scope's device gets the original."""
    with _lock:
        if _lookup(patcher) is made:
            del _watched[id(patcher)]
        clones = [clone for ref in made.clones if (clone := ref()) is not None]
        for clone in clones:
            if _lookup(clone) is made:
                del _watched[id(clone)]
    for clone in clones:
        if clone.load_device == made.device:
            clone.load_device = made.original


def _wrap(clone: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(clone)
    def clone_watched(self: Any, *args: Any, **kwargs: Any) -> Any:
        made = clone(self, *args, **kwargs)
        if _watched:  # the common case (no scope holds a patcher): one dictionary test
            with _lock:
                watching = _lookup(self)
                if watching is not None and made is not self:
                    watching.clones.append(weakref.ref(made))
                    _watched[id(made)] = (weakref.ref(made), watching)  # its own clones are the scope's too
        return made

    clone_watched.__ondevice_guard__ = True  # type: ignore[attr-defined]
    return clone_watched


def install() -> None:
    """Wrap ``ModelPatcher.clone`` (idempotent; the caller holds ``comfyui_lock``)."""
    current = mp.ModelPatcher.clone
    if _installed or getattr(current, "__ondevice_guard__", False):
        return  # installed (or by another copy of this module, which owns the undo)
    _installed.append(current)
    mp.ModelPatcher.clone = _wrap(current)


def remove() -> None:
    """Give ``ModelPatcher`` its own ``clone`` back, unless someone wrapped the wrapper meanwhile (idempotent)."""
    if not _installed:
        return
    original = _installed.pop()
    if getattr(mp.ModelPatcher.clone, "__wrapped__", None) is original:
        mp.ModelPatcher.clone = original
