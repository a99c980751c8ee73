"""Errors raised by ondevice.

Every error derives from :class:`OnDeviceError` and also from the builtin that
matches its cause, so callers can catch either ``OnDeviceError`` or, say,
``TypeError``.  Messages name the input, what was wrong, and the fix.
"""

from __future__ import annotations

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
    another task on this thread's event loop, or waits itself, directly or
    through other threads, for this thread.  Otherwise such a scope waits
    for the holder (see :mod:`ondevice.residency`).  The message names both
    parts and both owners.
    """


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
