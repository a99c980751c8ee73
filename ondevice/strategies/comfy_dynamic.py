"""Dynamic VRAM (ComfyUI 2026+, ``ModelPatcherDynamic`` over comfy-aimdo): holding a patcher's staged weights
resident.

ComfyUI's load stages a dynamic patcher's weights in an aimdo VBAR (virtual GPU memory with nothing
behind it yet).  :func:`fault_in` locks the staged range against aimdo's eviction
(``ModelVBAR.set_watermark_limit``) and faults every weight's pages in, so the VRAM is taken at entry or
the entry fails; :func:`unlock` drops the lock at exit so ComfyUI's unload frees the pages;
:func:`relock_held` locks again what live scopes hold (ComfyUI's executor resets the limits after every
node).  docs/dynamic-vram.md says what that guarantees and what it cannot.  ``dynamic_vbars`` is probed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ondevice.devices import CPU
from ondevice.errors import OnDeviceError
from ondevice.residency import table
from ondevice.strategies.comfy_books import is_dynamic

__all__ = ["fault_in", "is_resident", "release_vbars", "relock_held", "unloading", "unlock", "vbars"]

# VBAR -> bytes aimdo reported resident right after ondevice faulted the staged weights in and locked
# them; an entry exists exactly while ondevice holds that VBAR's pages (weak: ComfyUI owns the VBAR).
_resident: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def vbars(patcher: Any) -> dict[Any, Any]:
    """ComfyUI's per-device VBARs of a dynamic patcher's weights (``{}`` for a plain patcher)."""
    vbars = getattr(patcher.model, "dynamic_vbars", None)
    return vbars if isinstance(vbars, dict) else {}


def _lock(vbar: Any) -> None:
    """Make the VBAR's staged range unevictable by aimdo (torch allocations, other models' faults, free_memory)."""
    vbar.set_watermark_limit(vbar.offset)


def unlock(vbar: Any) -> None:
    _resident.pop(vbar, None)
    vbar.set_watermark_limit(0)


def _staged(patcher: Any) -> list[tuple[Any, int, int]]:
    """The aimdo allocations ``(vbar, address, size)`` ComfyUI's load gave the weights (``module._v``), in order."""
    allocations = [m._v for m in patcher.model.modules() if getattr(m, "_v", None) is not None]
    return sorted(allocations, key=lambda allocation: allocation[1])


def fault_in(patcher: Any, device: torch.device) -> None:
    """Lock the staged weights' VRAM and fault every page in; raise :class:`OnDeviceError` if aimdo runs short.

    Faulting allocates the pages only; ComfyUI's cast copies each weight in at
    its first use (aimdo's page serials tell it the page is new) and reuses it
    after that.  Each page is unpinned again at once: the lock, not the pin,
    keeps it.
    """
    name = type(patcher.model).__name__
    vbar = vbars(patcher).get(device)
    if vbar is None:
        msg = f"ComfyUI's dynamic VRAM load of {name} made no VBAR for {device}; load it without dynamic VRAM"
        raise OnDeviceError(msg)
    staged = _staged(patcher)
    if any(owner is not vbar for owner, _, _ in staged):
        msg = (
            f"{name}'s weights are staged in the dynamic VRAM (comfy-aimdo VBAR) of another device, and ComfyUI "
            f"does not move a dynamic model between GPUs; scope it on the device it was first loaded on, or load "
            f"it with disable_dynamic=True (or start ComfyUI with --disable-dynamic-vram) to use {device}"
        )
        raise OnDeviceError(msg)
    _lock(vbar)
    faulted: list[tuple[Any, int, int]] = []
    try:
        for owner, address, size in staged:
            if owner.fault(address, size) is None:
                total = sum(size for _, _, size in staged)
                msg = (
                    f"ComfyUI's dynamic VRAM (comfy-aimdo) could not make all {total:,} bytes of {name}'s weights "
                    f"resident on {device} beside what is held there; free device memory, scope fewer components "
                    "at once, or start ComfyUI with --disable-dynamic-vram"
                )
                raise OnDeviceError(msg)
            faulted.append((owner, address, size))
    finally:
        for owner, address, size in faulted:
            owner.unpin(address, size)
    _resident[vbar] = vbar.loaded_size()


def is_resident(patcher: Any, device: torch.device) -> bool:
    """Whether every page ondevice faulted in for ``device`` is still resident."""
    vbar = vbars(patcher).get(device)
    if vbar is None or vbar not in _resident:
        return False
    return bool(vbar.loaded_size() >= _resident[vbar])


def release_vbars(patcher: Any, keep: torch.device | None = None) -> None:
    """Unlock the weights' VBARs (but ``keep``'s) and free pages ComfyUI's unload left (it stops at a lock)."""
    if not is_dynamic(patcher):
        return
    for device, vbar in list(vbars(patcher).items()):
        if device == keep:
            continue
        unlock(vbar)
        if vbar.loaded_size() > 0:
            with unloading(patcher, device):
                patcher.partially_unload(CPU, 1e32)  # ComfyUI's own: frees the VBAR pages, then its backups


def relock_held() -> None:
    """Lock again what live scopes hold: ComfyUI's executor resets every VBAR's limit after each node."""
    for holding in table.held():
        patcher = getattr(holding.part, "patcher", None)
        vbar = None if holding.forced_off or patcher is None else vbars(patcher).get(holding.device)
        if vbar is not None and vbar in _resident:
            _lock(vbar)


@contextmanager
def unloading(patcher: Any, device: Any) -> Iterator[None]:
    """Point ``load_device`` at the device the weights are loaded on and ``offload_device`` at the CPU.

    A dynamic patcher's unload reads its per-device state through ``load_device``
    (VBAR, pinned host buffers); a scope may have pointed it elsewhere meanwhile.
    """
    saved = patcher.load_device, patcher.offload_device
    patcher.load_device, patcher.offload_device = device, CPU
    try:
        yield
    finally:
        patcher.load_device, patcher.offload_device = saved
