"""The streamed path for a plain ``nn.Module`` larger than its budget: part resident, the rest per forward.

:func:`stream` puts the module's *units* (each submodule that owns parameters or
buffers directly), in registration order, on the device while they fit the
budget (:func:`~ondevice.strategies.module.stage` per unit, each with its own
masters), and gives every other unit a forward pre-hook that stages its own
tensors just before its ``forward`` and a forward hook that points them back
at their CPU masters right after it (zero-copy: nothing is copied back). So
the device holds the budget plus one streamed unit at a time (the largest is
the working set). :func:`unstream` removes the hooks and points the resident
units back at their masters.

Limits, as for accelerate's CPU offload: a unit's weights are on the device
only inside its own ``forward``, so code that reads a streamed unit's tensors
from elsewhere (a parent's ``forward`` calling ``F.linear(x, self.child.weight)``)
finds them on the CPU; and the path is for inference: a streamed unit's weights
leave the device before a backward pass would need them.

Thread semantics: the hooks belong to the module; the residency table loads
and offloads one module's weights one move at a time, and a streamed module
runs forwards as any module does (one at a time per module, as its hooks move
its weights).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ondevice.strategies.module import Staging, point_back, stage

__all__ = ["Streaming", "largest_unit", "stream", "streaming", "unstream"]


@dataclass(frozen=True)
class Streaming:
    """How :func:`stream` split a module: the bytes made resident and the units (by name) streamed per forward."""

    device: torch.device
    resident_bytes: int
    streamed: tuple[str, ...]
    working_set: int  # bytes of the largest streamed unit: what a forward adds beside the resident part
    staging: Staging
    resident: tuple[torch.nn.Module, ...] = ()


_lock = threading.Lock()
_hooks: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Streaming, list[RemovableHandle]]] = (
    weakref.WeakKeyDictionary()
)


def _own_bytes(unit: torch.nn.Module) -> int:
    tensors = [*unit.parameters(recurse=False), *unit.buffers(recurse=False)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _units(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """Each submodule that owns tensors directly, with its name and bytes, in registration order."""
    return [(name, unit, size) for name, unit in module.named_modules() if (size := _own_bytes(unit))]


def largest_unit(module: torch.nn.Module) -> int:
    """Bytes of the largest unit of ``module``: the most a forward streams in at once."""
    return max((size for _, _, size in _units(module)), default=0)


def stream(module: torch.nn.Module, device: torch.device, budget: int) -> Streaming:
    """Make at most ``budget`` bytes of ``module`` resident on ``device`` and stream the rest per forward.

    On failure nothing stays on the device and no hook stays on the module.
    """
    resident: list[torch.nn.Module] = []
    streamed: list[tuple[str, torch.nn.Module, int]] = []
    used = 0
    for name, unit, size in _units(module):
        if used + size <= budget:
            resident.append(unit)
            used += size
        else:
            streamed.append((name, unit, size))
    handles: list[RemovableHandle] = []
    copied, pinned, side = 0, True, None
    staged: list[torch.nn.Module] = []
    try:
        for unit in resident:  # each unit its own masters: a streamed parent never points a resident child back
            staging = stage(unit, device, skip=_children_tensors(unit))
            staged.append(unit)
            copied, pinned, side = copied + staging.copied, pinned and staging.pinned, side or staging.stream
        for _, unit, _ in streamed:
            handles.append(unit.register_forward_pre_hook(_stream_in(device)))
            handles.append(unit.register_forward_hook(_stream_out))
    except BaseException:
        for handle in handles:
            handle.remove()
        for unit in staged:
            point_back(unit)
        raise
    working_set = max((size for _, _, size in streamed), default=0)
    summary = Staging(copied=copied, pinned=pinned and bool(resident), stream=side)
    result = Streaming(device, used, tuple(name for name, _, _ in streamed), working_set, summary, tuple(resident))
    with _lock:
        _hooks[module] = (result, handles)
    return result


def streaming(module: torch.nn.Module) -> Streaming | None:
    """How ``module`` is streamed now, or None where :func:`stream` did not split it (or :func:`unstream` ended it)."""
    with _lock:
        found = _hooks.get(module)
    return None if found is None else found[0]


def unstream(module: torch.nn.Module) -> bool:
    """Remove the hooks :func:`stream` put on ``module``'s units and point the resident units back at their masters
    (zero-copy; a tensor modified on the device stays there, for the caller's offload to copy back)."""
    with _lock:
        found = _hooks.pop(module, None)
    if found is None:
        return False
    for handle in found[1]:
        handle.remove()
    for unit in found[0].resident:
        point_back(unit, copy_others=False)
    return True


def _stream_in(device: torch.device) -> Callable[..., None]:
    def stream_in(unit: torch.nn.Module, args: Any) -> None:
        stage(unit, device, skip=_children_tensors(unit))

    return stream_in


def _stream_out(unit: torch.nn.Module, args: Any, output: Any) -> None:
    point_back(unit, copy_others=False)  # the unit's own tensors: back to their masters, nothing copied


def _children_tensors(unit: torch.nn.Module) -> frozenset[str]:
    """Names (relative to ``unit``) of its children's tensors: each unit streams only what it owns."""
    own = {n for n, _ in (*unit.named_parameters(recurse=False), *unit.named_buffers(recurse=False))}
    every = {n for n, _ in (*unit.named_parameters(), *unit.named_buffers())}
    return frozenset(every - own)
