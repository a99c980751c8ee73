"""Errors raised by ondevice.

Every error derives from :class:`OnDeviceError` and also from the builtin that
matches its cause, so callers can catch either ``OnDeviceError`` or, say,
``TypeError``.  Messages name the input, what was wrong, and the fix.
"""

from __future__ import annotations

import torch

__all__ = [
    "CheckpointError",
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "ComfyUINotFoundError",
    "FakeGPUActiveError",
    "InvalidArgumentError",
    "InvalidDeviceError",
    "MissingWeightsError",
    "NoStrategyError",
    "OnDeviceError",
    "OutOfDeviceMemory",
    "ResidencyConflictError",
    "UnknownModelError",
]


class OnDeviceError(Exception):
    """Base class of every error ondevice raises."""


class NoStrategyError(OnDeviceError, TypeError):
    """No strategy knows how to move an object of this type."""


class InvalidDeviceError(OnDeviceError, ValueError):
    """A device argument is malformed, unknown, or not present on this machine."""


class InvalidArgumentError(OnDeviceError, ValueError):
    """An argument other than a device has a bad value (a memory size, a family name, ...)."""


class MissingWeightsError(OnDeviceError, ValueError):
    """A component has no weights to move (for example a VAE built without weights)."""


class ResidencyConflictError(OnDeviceError, RuntimeError):
    """A live scope holds a component in a way that a new scope cannot wait out.

    Raised when the component is held on one device and asked for on another,
    and when the same weights are asked for with other patches (a ComfyUI
    clone with a LoRA, say) while a scope of another thread or asyncio task
    holds them, where waiting for that scope would never end: the holder is
    another task on this thread's event loop (and the scope waits on that
    loop's thread: ``with``, not ``async with``), or waits itself, directly or
    through other threads, for this thread.  Otherwise such a scope waits
    for the holder (see :mod:`ondevice.residency`).  The message names both
    parts and both owners.
    """


class OutOfDeviceMemory(OnDeviceError, MemoryError, torch.cuda.OutOfMemoryError):  # noqa: N818  (the name issue 8 asks for)
    """A scope's components do not fit on the device, now (``wait=False``), in time (``timeout=``) or ever.

    Also a ``MemoryError``, and a ``torch.OutOfMemoryError`` so that code catching torch's (ComfyUI's
    executor, say) treats it as one.  Raised by the residency table's memory policy before anything
    moves, and after a load that ran out of device memory all the same (ComfyUI's headroom,
    fragmentation), once everything that scope loaded is back on the CPU; then ``__cause__`` is the
    ``torch.OutOfMemoryError``.  The message states every attribute and the fixes.

    Attributes:
        device: the device asked for.
        needed: bytes the scope needed to load there.
        free: bytes free there when it gave up.
        held: what ondevice holds there: ``(component, bytes, holder)``, the holder being the owners
            (threads, asyncio tasks) of the live scopes, ``"kept"`` or ``"prefetched"``.
        total: the device's memory, in bytes (``None`` where unknown).
    """

    def __init__(
        self,
        message: str,
        *,
        device: torch.device,
        needed: int,
        free: int,
        held: list[tuple[str, int, str]],
        total: int | None = None,
    ) -> None:
        super().__init__(message)
        self.device, self.needed, self.free, self.held, self.total = device, needed, free, held, total

    def __reduce__(self) -> tuple[object, ...]:
        fields = {"device": self.device, "needed": self.needed, "free": self.free, "held": self.held}
        return (_rebuild_out_of_memory, (str(self), fields, self.total))


def _rebuild_out_of_memory(message: str, fields: dict[str, object], total: int | None) -> OutOfDeviceMemory:
    return OutOfDeviceMemory(message, total=total, **fields)  # type: ignore[arg-type]


class ComfyUINotFoundError(OnDeviceError, ImportError):
    """ComfyUI's ``comfy`` package could not be found or imported."""


class CheckpointError(OnDeviceError, ValueError):
    """A checkpoint file is unreadable, truncated, or lacks what was asked for."""


class CheckpointNotFoundError(OnDeviceError, FileNotFoundError):
    """A checkpoint path does not exist."""


class CheckpointIsADirectoryError(CheckpointError, IsADirectoryError):
    """A checkpoint path names a directory, not a file."""


class UnknownModelError(CheckpointError):
    """ComfyUI does not recognize the model family stored in a checkpoint."""


class FakeGPUActiveError(OnDeviceError, RuntimeError):
    """A fake accelerator was started while another one is already active (they do not nest)."""
