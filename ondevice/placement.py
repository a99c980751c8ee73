"""Where components are now (``device_of``, ``placement``) and ``offload`` (to the CPU, now)."""

from __future__ import annotations

from typing import Any

import torch

from ondevice.errors import MissingWeightsError
from ondevice.residency import table
from ondevice.strategies import parts_of
from ondevice.strategies import placement as tensor_placement

__all__ = ["device_of", "offload", "placement"]


def placement(component: Any) -> dict[torch.device, int]:
    """Bytes of ``component``'s weights per device (a partially loaded model spans two)."""
    out: dict[torch.device, int] = {}
    for part in parts_of(component):
        for device, size in tensor_placement(part.tensors()).items():
            out[device] = out.get(device, 0) + size
    return out


def device_of(component: Any) -> torch.device:
    """The device that holds ``component``'s weights (where most bytes are, if they are split).

    Raises :class:`~ondevice.errors.MissingWeightsError` for a component with no weights.
    """
    where = placement(component)
    if not where:
        msg = f"device_of({type(component).__name__}): it has no weights, so it is on no device"
        raise MissingWeightsError(msg)
    return max(where.items(), key=lambda item: item[1])[0]


def offload(*components: Any) -> None:
    """Move every component's weights to the CPU now.

    A component that a live scope holds is offloaded too (with a warning); that
    scope no longer loads it back, and its exit leaves it on the CPU.  A
    component that :func:`ondevice.prefetch` put on the device, or that
    :func:`ondevice.keep` kept there, and that no scope has claimed since, is
    simply taken off again (the prefetch is cancelled, the keep ended).
    """
    parts = [part for component in components for part in parts_of(component)]
    for part in parts:
        table.force_offload(part)
