"""Device names, resolution, and memory queries (free/total, allocated).

Nothing here initializes CUDA at import.  ``resolve(None)`` picks the GPU that
ComfyUI would use (or CUDA / MPS / XPU when ComfyUI is not loaded); a fake
accelerator from :mod:`ondevice.testing` takes precedence while it is active.

Other accelerators (like the fake one) plug in through :func:`register_backend`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ondevice.errors import InvalidDeviceError

__all__ = [
    "CPU",
    "Backend",
    "DeviceLike",
    "default_gpu",
    "memory_allocated",
    "memory_info",
    "SIZE_HINT",
    "parse_size",
    "register_backend",
    "resolve",
    "synchronize",
]

log = logging.getLogger("ondevice")

CPU = torch.device("cpu")
DeviceLike = torch.device | str | int | None


@dataclass(frozen=True)
class Backend:
    """How ondevice talks to one kind of accelerator that torch does not know natively.

    ``mem_get_info(device) -> (free, total)`` in bytes; ``device_count()``;
    ``synchronize(device)``; ``memory_allocated(device)`` in bytes (when left
    out: total minus free, from ``mem_get_info``).
    """

    device_count: Callable[[], int]
    mem_get_info: Callable[[torch.device], tuple[int, int]]
    synchronize: Callable[[torch.device], None] = lambda device: None
    memory_allocated: Callable[[torch.device], int] | None = None


_backends: dict[str, Backend] = {}
_default_stack: list[torch.device] = []
_lock = threading.Lock()
_warned_cpu = False


def register_backend(device_type: str, backend: Backend | None, *, default: bool = False) -> None:
    """Register (or, with ``backend=None``, remove) an accelerator backend.

    With ``default=True`` the backend's device 0 becomes what ``resolve(None)``
    returns until the backend is removed.
    """
    with _lock:
        if backend is None:
            _backends.pop(device_type, None)
            _default_stack[:] = [d for d in _default_stack if d.type != device_type]
            return
        _backends[device_type] = backend
        if default:
            _default_stack.append(torch.device(device_type, 0))


def _comfy_device() -> torch.device | None:
    mm = sys.modules.get("comfy.model_management")
    if mm is None:
        return None
    device = torch.device(mm.get_torch_device())
    return None if device.type == "cpu" else device


def default_gpu() -> torch.device:
    """The device ``on_gpu(..., device=None)`` targets.

    Order: an active fake accelerator; ComfyUI's ``get_torch_device()`` if
    ComfyUI is loaded and not in CPU mode; CUDA/ROCm; MPS; XPU; else the CPU,
    with one warning per process.
    """
    global _warned_cpu
    if _default_stack:
        return _default_stack[-1]
    device = _comfy_device()
    if device is not None:
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu", xpu.current_device())
    if not _warned_cpu:
        _warned_cpu = True
        log.warning("ondevice: no accelerator found; GPU scopes run on the CPU")
    return CPU


_NATIVE = ("cuda", "xpu", "mtia", "hpu", "npu", "mlu")


def _device_count(device_type: str) -> int:
    """Devices of this type present now (a backend counts only while registered)."""
    if device_type in _backends:
        return _backends[device_type].device_count()
    if device_type == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    if device_type not in _NATIVE:
        return 0
    module = getattr(torch, device_type, None)
    count = getattr(module, "device_count", None)
    return int(count()) if callable(count) else 0


def resolve(device: DeviceLike) -> torch.device:
    """Turn ``None``, ``"cuda:1"``, ``1`` or a ``torch.device`` into a checked ``torch.device``.

    Raises :class:`InvalidDeviceError` (also ``ValueError``) for a malformed
    name, a device type this machine lacks, or an index past the device count.
    """
    if device is None:
        return default_gpu()
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        msg = (
            f"device={device!r} is a {type(device).__name__}; pass None, a string "
            "like 'cuda:0', an int index, or a torch.device"
        )
        raise InvalidDeviceError(msg)
    if isinstance(device, int):
        if device < 0:
            msg = f"device={device!r} is negative; pass a device index >= 0"
            raise InvalidDeviceError(msg)
        device = torch.device(default_gpu().type, device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        msg = f"device={device!r} is not a device name ({exc}); use a name like 'cuda', 'cuda:1' or 'cpu'"
        raise InvalidDeviceError(msg) from None
    if dev.type == "cpu":
        if dev.index not in (None, 0):
            msg = f"device={str(device)!r}: the CPU is one device; use 'cpu'"
            raise InvalidDeviceError(msg)
        return CPU
    count = _device_count(dev.type)
    if not count:
        msg = (
            f"device={str(device)!r}: no {dev.type} device is available on this machine; "
            "pass device=None to use the default GPU, or 'cpu'"
        )
        raise InvalidDeviceError(msg)
    index = 0 if dev.index is None else dev.index
    if index >= count:
        msg = (
            f"device={str(device)!r}: index {index} is past the {count} {dev.type} "
            f"device(s) present; use an index from 0 to {count - 1}"
        )
        raise InvalidDeviceError(msg)
    return torch.device(dev.type, index)


def memory_info(device: DeviceLike) -> tuple[int, int]:
    """``(free, total)`` bytes on ``device``; the CPU reports available system RAM."""
    dev = resolve(device)
    if dev.type in _backends:
        return _backends[dev.type].mem_get_info(dev)
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(total)
    if dev.type == "cpu":
        return _cpu_memory()
    module = getattr(torch, dev.type, None)
    mem_get_info = getattr(module, "mem_get_info", None)
    if callable(mem_get_info):
        free, total = mem_get_info(dev)
        return int(free), int(total)
    msg = f"device={str(dev)!r}: ondevice cannot query memory on {dev.type} devices"
    raise InvalidDeviceError(msg)


def memory_allocated(device: DeviceLike) -> int:
    """Bytes of tensor memory this process has allocated on the accelerator ``device`` now.

    CUDA / ROCm / XPU: torch's ``memory_allocated``; MPS: ``current_allocated_memory``;
    a registered :class:`Backend`: its ``memory_allocated``.  Raises
    :class:`InvalidDeviceError` for the CPU and for devices torch cannot report on.
    """
    dev = resolve(device)
    backend = _backends.get(dev.type)
    if backend is not None:
        if backend.memory_allocated is not None:
            return backend.memory_allocated(dev)
        free, total = backend.mem_get_info(dev)
        return total - free
    if dev.type == "mps":
        return int(torch.mps.current_allocated_memory())
    query = getattr(getattr(torch, dev.type, None), "memory_allocated", None) if dev.type in _NATIVE else None
    if not callable(query):
        msg = f"device={str(dev)!r}: ondevice cannot query allocated memory on {dev.type} devices"
        raise InvalidDeviceError(msg)
    return int(query(dev))


def _cpu_memory() -> tuple[int, int]:
    try:
        import psutil  # noqa: PLC0415  (optional dependency)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")
    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def synchronize(device: torch.device) -> None:
    """Wait until every queued copy on ``device`` is done (a no-op for the CPU)."""
    if device.type in _backends:
        _backends[device.type].synchronize(device)
    elif device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)

SIZE_HINT = "a string like '8GiB', '512MiB', '1.5GiB' or '8GB' (KiB/MiB/GiB are powers of 1024, KB/MB/GB of 1000)"
"""How a memory size may be written, for error messages."""


def parse_size(value: object) -> int | None:
    """Bytes from an int, or from ``"8GiB"``, ``"512MiB"``, ``"1.5GiB"``, ``"8GB"`` (GB = 10**9); None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)) and match[2].lower() in _UNITS:
        return int(float(match[1]) * _UNITS[match[2].lower()])
    return None
