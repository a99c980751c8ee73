"""A ComfyUI patcher's ``load_device`` while scopes hold its weights, and that of the clones made meanwhile.

While a scope holds a ``ModelPatcher``, :class:`~ondevice.strategies.comfy.PatcherPart`
points its ``load_device`` at the scope's device (:func:`point`), so that ComfyUI's
own loads (a sampler's ``load_models_gpu``) find the weights where they are, and
gives it back when the part lets go (:func:`unpoint`).  ComfyUI's ``clone()``
copies ``load_device``, so a clone made meanwhile (a LoRA node, ``CLIP.clone()``,
a clone of such a clone) names the scope's device too: right while the scope
runs, wrong after it (ComfyUI would load that clone on ``cuda:1`` where the user
set ``cuda:0``).

Each patcher pointed, and each clone made from one while it is pointed, has a
*track* here: its *home* (the ``load_device`` it had before any scope pointed it;
a clone's is its parent's), how many parts point it now, and the track of the
pointed patcher it was made from (*born in*).  A patcher no part points rests on
the device of the track it was born in while that is pointed, else on its home:

- :func:`point` counts one more part (and sets the scope's device);
- :func:`unpoint` counts one fewer; the last sets the patcher's resting device,
  and every clone born in it that no part points and that still names the scope's
  device gets its own home back (a clone whose ``load_device`` was set to another
  device meanwhile is left as it is).

The order in which parts let go does not matter.  Clones are seen through a wrapper
on ``comfy.model_patcher.ModelPatcher.clone`` (:func:`install`, undone by
:func:`remove`, with ``install_guard`` / ``remove_guard``), which adds no callback
or attribute to any patcher: ComfyUI's ``clone_has_same_weights`` sees nothing.

Thread semantics: a lock guards the tracks; ``load_device`` is set under it.  A
clone made on another thread while the last part lets go copied the scope's
device before the wrapper saw it: the wrapper compares the parent's
``load_device`` before and after ComfyUI's clone, and has the clone follow the
parent where that changed and the parent is no longer pointed.  Clones made
while the guard is removed (``remove_guard()`` with scopes live) are not seen.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import comfy.model_patcher as mp
import torch

__all__ = ["install", "point", "remove", "unpoint"]


@dataclass(eq=False)
class _Track:
    ref: weakref.ref[Any]
    home: Any  # load_device when neither it nor any track it was born in (up the chain) is pointed
    born_in: _Track | None = None
    pointers: int = 0  # parts pointing it now
    device: torch.device | None = None  # where they point it (one device at a time: the weights' holding)

    def ancestors(self) -> Iterator[_Track]:
        """The tracks up the chain it was born in, nearest first."""
        born_in = self.born_in
        while born_in is not None:
            yield born_in
            born_in = born_in.born_in

    def pointed_ancestor(self) -> _Track | None:
        """The nearest track up the chain it was born in that parts point now."""
        return next((track for track in self.ancestors() if track.pointers), None)

    def resting(self) -> Any:
        ancestor = self.pointed_ancestor()
        return ancestor.device if ancestor is not None else self.home


_lock = threading.RLock()  # reentrant: a weakref callback may run (garbage collection) while it is held
_tracks: dict[int, _Track] = {}  # id(patcher) -> its track: patchers pointed, and clones born in one still pending
_installed: list[Callable[..., Any]] = []  # the ComfyUI clone that the wrapper wraps, while installed


def _track_of(patcher: Any) -> _Track | None:
    track = _tracks.get(id(patcher))
    return track if track is not None and track.ref() is patcher else None


def _new_track(patcher: Any, home: Any, born_in: _Track | None = None) -> _Track:
    key = id(patcher)

    def forget(ref: weakref.ref[Any]) -> None:
        with _lock:
            if (found := _tracks.get(key)) is not None and found.ref is ref:
                del _tracks[key]

    track = _Track(weakref.ref(patcher, forget), home, born_in)
    _tracks[key] = track
    return track


def point(patcher: Any, device: torch.device) -> None:
    """One more part points ``patcher`` at ``device``: its ``load_device`` is set to it."""
    with _lock:
        track = _track_of(patcher) or _new_track(patcher, patcher.load_device)
        track.pointers += 1
        track.device = device
        patcher.load_device = device


def unpoint(patcher: Any) -> None:
    """One part fewer points ``patcher``; at the last, it and the clones born in it rest (see the module)."""
    with _lock:
        track = _track_of(patcher)
        if track is None or not track.pointers:
            return
        track.pointers -= 1
        if track.pointers:
            return
        for key, other in tuple(_tracks.items()):  # a copy: a collected clone's callback may delete meanwhile
            made = other.ref()
            if made is None or other.pointers or not (other is track or track in other.ancestors()):
                continue
            if other is track or made.load_device == track.device:  # a clone set elsewhere meanwhile stays
                made.load_device = other.resting()
            if other.pointed_ancestor() is None:
                del _tracks[key]


def _record(parent: Any, made: Any) -> None:
    """``made`` was cloned from ``parent``: where ``parent`` is pointed, or was born in a pointed track, track it."""
    with _lock:
        track = _track_of(parent)
        if track is None or _track_of(made) is not None:
            return
        if track.pointers or track.pointed_ancestor() is not None:
            _new_track(made, track.home, track)


def _caught_up(parent: Any, made: Any, seen: Any) -> None:
    """``made`` copied ``seen`` from ``parent``, whose ``load_device`` has changed since: where ``parent`` is no
    longer pointed (its last part let go during the clone), ``made`` follows it there instead of keeping ``seen``."""
    with _lock:
        track = _track_of(made)
        if track is None and made.load_device == seen and _track_of(parent) is None:
            made.load_device = parent.load_device


def _wrap(clone: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(clone)
    def clone_tracked(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen = getattr(self, "load_device", None)
        made = clone(self, *args, **kwargs)
        if made is self:
            return made
        if _tracks:  # the common case (no scope holds a patcher): one dictionary test
            _record(self, made)
        if getattr(self, "load_device", None) != seen and getattr(made, "load_device", None) == seen:
            _caught_up(self, made, seen)  # the parent's scope let go while ComfyUI cloned (another thread)
        return made

    clone_tracked.__ondevice_guard__ = True  # type: ignore[attr-defined]
    return clone_tracked


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
