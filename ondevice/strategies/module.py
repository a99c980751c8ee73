"""The strategy for a plain ``torch.nn.Module`` (no ComfyUI needed), and tensor helpers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ondevice.devices import CPU
from ondevice.strategies import Part

__all__ = ["ModulePart", "ModuleStrategy", "all_on", "module_tensors", "placement"]


def module_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter and buffer of ``module``."""
    yield from module.parameters()
    yield from module.buffers()


def all_on(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """True when every tensor lives on ``device`` (an index-less device matches any index)."""
    for tensor in tensors:
        here = tensor.device
        if here.type != device.type or (device.index is not None and here.index != device.index):
            return False
    return True


def placement(tensors: Iterable[torch.Tensor]) -> dict[torch.device, int]:
    """Bytes per device, counting each storage once."""
    seen: set[tuple[torch.device, int]] = set()
    out: dict[torch.device, int] = {}
    for tensor in tensors:
        ident = (tensor.device, tensor.data_ptr() or id(tensor))
        if ident in seen:
            continue
        seen.add(ident)
        out[tensor.device] = out.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
    return out


class ModulePart(Part):
    """A plain module: moved with ``module.to(device)``."""

    path = "module.to"

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def key(self) -> object:
        return self.module

    def tensors(self) -> Iterable[torch.Tensor]:
        return module_tensors(self.module)

    def load(self, device: torch.device) -> None:
        try:
            self.module.to(device)
        except BaseException:
            self.module.to(CPU)
            raise

    def offload(self) -> None:
        self.module.to(CPU)

    def is_on(self, device: torch.device) -> bool:
        return all_on(self.tensors(), device)

    def __repr__(self) -> str:
        return f"ModulePart({type(self.module).__name__})"


class ModuleStrategy:
    """``torch.nn.Module``: one part, the module itself."""

    def parts(self, component: Any) -> Sequence[ModulePart]:
        return [ModulePart(component)]
