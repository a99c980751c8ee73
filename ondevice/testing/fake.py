"""``fake_gpu()``: a fake accelerator for tests, as a context manager, a decorator or ``start()``/``stop()``.

While active, ``fakegpu:0`` (and ``fakegpu:1`` .. with ``device_count=``) is a
real torch device (see :mod:`ondevice.testing.fakegpu`): tensors really move,
math really runs, mixing devices fails like CUDA, and memory has a limit.
Host memory can be pinned (with a cap: ``pinned_limit=``), and copies issued
with ``non_blocking=True`` on a ``torch.fakegpu.Stream`` land only when waited
for, so a missing ``wait_stream`` computes NaN.  When the handle stops, every
late copy lands and the limits go back to their defaults.
``ondevice.devices.resolve(None)`` returns ``fakegpu:0``, and ComfyUI's own
``comfy.model_management`` treats ``fakegpu:0`` as its GPU (patched at start
if ComfyUI is imported, else as soon as ondevice imports it), so
``load_models_gpu``, ``unload_all_models``, ``vae.decode`` ... really move
weights.  ComfyUI is never imported by this module.

Thread semantics: the fake device and ComfyUI's state are process-wide, so one
handle is active at a time.  Re-entering the active handle (nested ``with``,
recursion, a second thread running the same decorated function) counts up and
the last exit stops it; starting a different handle while one is active raises
:class:`~ondevice.errors.FakeGPUActiveError`.

Example::

    with fake_gpu("8GiB") as gpu:
        module.to(gpu.device)
        assert gpu.memory_allocated() == module_bytes
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

from ondevice import comfyui, devices
from ondevice.errors import FakeGPUActiveError, InvalidArgumentError
from ondevice.testing import fakegpu  # importing it installs nothing; start() does

__all__ = ["FakeGPU", "fake_gpu"]

P = ParamSpec("P")
R = TypeVar("R")

_VRAM_STATES = ("DISABLED", "NO_VRAM", "LOW_VRAM", "NORMAL_VRAM", "HIGH_VRAM", "SHARED")

_lock = threading.RLock()
_active: FakeGPU | None = None
_NO_COPIES: tuple[int, ...] = (0, 0, 0, 0)  # bytes to the device, to the CPU, and the pinned part of each


def _parse_memory(memory: str | int, argument: str = "memory", minimum: int = 1) -> int:
    """Bytes from ``8GiB``, ``512MiB``, ``1.5GiB``, ``8GB`` (GB = 10**9) or an int number of bytes."""
    nbytes = devices.parse_size(memory)
    if nbytes is None or nbytes < minimum:
        least = "positive" if minimum > 0 else "non-negative"
        msg = f"{argument}={memory!r} is not a memory size; pass a {least} int number of bytes or {devices.SIZE_HINT}"
        raise InvalidArgumentError(msg)
    return nbytes


def fake_gpu(
    memory: str | int = "8GiB",
    *,
    device_count: int = 1,
    vram_state: str = "NORMAL_VRAM",
    pinned_limit: str | int | None = None,
) -> FakeGPU:
    """A fake accelerator with ``memory`` per device; activate it with ``with``, as a decorator, or ``start()``.

    Args:
        memory: capacity of each fake device: ``"8GiB"``, ``"512MiB"``, ``"8GB"`` or bytes.
        device_count: how many fake devices (``fakegpu:0`` .. ``fakegpu:N-1``) exist.
        vram_state: the ``comfy.model_management.VRAMState`` name ComfyUI runs with
            (``"NORMAL_VRAM"``, ``"LOW_VRAM"``, ``"NO_VRAM"``, ``"HIGH_VRAM"``, ...).
        pinned_limit: a cap on pinned host memory, in the units of ``memory`` (None: no cap, 0: no
            pinning); pinning past it raises ``RuntimeError`` as a failing ``cudaHostAlloc`` does.

    Raises :class:`~ondevice.errors.InvalidArgumentError` (a ``ValueError``) for a bad argument.
    """
    if isinstance(device_count, bool) or not isinstance(device_count, int) or device_count < 1:
        msg = f"device_count={device_count!r} is not a device count; pass an int >= 1"
        raise InvalidArgumentError(msg)
    if vram_state not in _VRAM_STATES:
        msg = f"vram_state={vram_state!r} is not a ComfyUI VRAMState; pass one of {', '.join(_VRAM_STATES)}"
        raise InvalidArgumentError(msg)
    pinned = None if pinned_limit is None else _parse_memory(pinned_limit, "pinned_limit", minimum=0)
    return FakeGPU(_parse_memory(memory), device_count=device_count, vram_state=vram_state, pinned_limit=pinned)


class FakeGPU:
    """One fake accelerator configuration; building it costs nothing, :meth:`start` activates it."""

    def __init__(
        self, memory: int, *, device_count: int = 1, vram_state: str = "NORMAL_VRAM", pinned_limit: int | None = None
    ) -> None:
        self.memory = memory
        self.vram_state = vram_state
        self.device_count = device_count
        self.pinned_limit = pinned_limit
        self._depth = 0
        self._stack: contextlib.ExitStack | None = None
        self._baseline = _NO_COPIES
        self._final: tuple[int, ...] | None = _NO_COPIES

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        pinned = "" if self.pinned_limit is None else f", {self.pinned_limit} bytes pinnable"
        return f"<FakeGPU {self.memory} bytes x {self.device_count} device(s){pinned}, {self.vram_state}, {state}>"

    @property
    def devices(self) -> list[torch.device]:
        """``[fakegpu:0, ..., fakegpu:device_count-1]`` (naming them installs the backend)."""
        fakegpu.install()
        return [torch.device(fakegpu.DEVICE_TYPE, i) for i in range(self.device_count)]

    @property
    def device(self) -> torch.device:
        """``fakegpu:0``, the device ComfyUI and ``resolve(None)`` use while active."""
        return self.devices[0]

    @property
    def active(self) -> bool:
        """Whether this handle is the active fake accelerator."""
        return self._depth > 0

    # ------------------------------------------------------------------ activation

    def start(self) -> FakeGPU:
        """Activate: install the backend, set the limits, register with ondevice, patch ComfyUI if imported."""
        global _active
        with _lock:
            if _active is self:
                self._depth += 1
                return self
            if _active is not None:
                msg = (
                    f"fake_gpu: {_active!r} is already active; stop it before starting another "
                    "(fake accelerators do not nest)"
                )
                raise FakeGPUActiveError(msg)
            self._stack = self._activate()
            self._depth = 1
            _active = self
        return self

    def stop(self) -> None:
        """Deactivate (at the outermost exit): unload ComfyUI's models, restore every patch, unregister."""
        global _active
        with _lock:
            if self._depth == 0:
                return
            self._depth -= 1
            if self._depth > 0:
                return
            _active = None
            stack, self._stack = self._stack, None
            self._final = self._counters()
            if stack is not None:
                stack.close()

    def __enter__(self) -> FakeGPU:  # noqa: PYI034  (start() may refuse; it returns this handle)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Decorate a (sync) function so that each call runs with this fake accelerator active."""
        if inspect.iscoroutinefunction(func) or inspect.isgeneratorfunction(func):
            msg = f"fake_gpu() decorates plain functions only; {func.__qualname__} is a coroutine or generator"
            raise TypeError(msg)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return func(*args, **kwargs)

        return wrapper

    def _activate(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        try:
            fakegpu.install()
            fakegpu.set_device_count(self.device_count)
            fakegpu.set_memory_limit(self.memory)
            fakegpu.set_pinned_limit(self.pinned_limit)
            for index in range(self.device_count):
                fakegpu.reset_peak_memory_stats(index)  # max_memory_allocated counts from this activation
            stack.callback(_reset_backend)
            devices.register_backend("fakegpu", _ondevice_backend(), default=True)
            stack.callback(devices.register_backend, "fakegpu", None)
            mm = sys.modules.get("comfy.model_management")
            if mm is not None:
                _patch_comfy(mm, self, stack)
            else:  # ComfyUI imported later through ondevice (a loader, comfyui_info) is patched then
                stack.callback(comfyui.add_import_hook(lambda mm: _patch_comfy(mm, self, stack)))
            self._baseline, self._final = self._counters(), None
        except BaseException:
            stack.close()
            raise
        return stack

    # ------------------------------------------------------------------ observations

    def _counters(self) -> tuple[int, ...]:
        stats = fakegpu.stats
        return (stats.to_fake_bytes, stats.to_cpu_bytes, stats.to_fake_pinned_bytes, stats.to_cpu_pinned_bytes)

    def _since_start(self) -> tuple[int, ...]:
        now = self._final if self._final is not None else self._counters()
        return tuple(n - b for n, b in zip(now, self._baseline, strict=True))

    @property
    def bytes_to_device(self) -> int:
        """Bytes copied CPU -> fake device since :meth:`start` (frozen at :meth:`stop`)."""
        return self._since_start()[0]

    @property
    def bytes_to_cpu(self) -> int:
        """Bytes copied fake device -> CPU since :meth:`start` (frozen at :meth:`stop`)."""
        return self._since_start()[1]

    @property
    def bytes_to_device_pinned(self) -> int:
        """The part of :attr:`bytes_to_device` read from pinned host memory."""
        return self._since_start()[2]

    @property
    def bytes_to_cpu_pinned(self) -> int:
        """The part of :attr:`bytes_to_cpu` written to pinned host memory."""
        return self._since_start()[3]

    def pinned_bytes(self) -> int:
        """Bytes of host memory pinned now (see :func:`ondevice.testing.fakegpu.pinned_bytes`)."""
        return fakegpu.pinned_bytes() if fakegpu.is_installed() else 0

    def memory_allocated(self, index: int = 0) -> int:
        """Bytes of live storage on ``fakegpu:index``."""
        return fakegpu.memory_allocated(index) if fakegpu.is_installed() else 0

    def max_memory_allocated(self, index: int = 0) -> int:
        """The most bytes live at once on ``fakegpu:index`` since :meth:`reset_peak_memory_stats` or this activation."""
        return fakegpu.max_memory_allocated(index) if fakegpu.is_installed() else 0

    def reset_peak_memory_stats(self, index: int = 0) -> None:
        """Start :meth:`max_memory_allocated` again from what is allocated now."""
        if fakegpu.is_installed():
            fakegpu.reset_peak_memory_stats(index)

    def free_memory(self, index: int = 0) -> int:
        """``memory`` minus :meth:`memory_allocated`."""
        return self.memory - self.memory_allocated(index)


def _reset_backend() -> None:
    for index in range(fakegpu.device_count()):
        fakegpu.synchronize(index)  # no late copy lands after the handle stopped
        fakegpu.set_stream(fakegpu.default_stream(index))
    fakegpu.set_device_count(1)
    fakegpu.set_memory_limit(fakegpu.DEFAULT_MEMORY)
    fakegpu.set_pinned_limit(None)


def _ondevice_backend() -> devices.Backend:
    return devices.Backend(
        device_count=fakegpu.device_count,
        mem_get_info=fakegpu.mem_get_info,
        synchronize=fakegpu.synchronize,
    )


# ---------------------------------------------------------------------- ComfyUI hookup


def _patch_comfy(mm: types.ModuleType, gpu: FakeGPU, stack: contextlib.ExitStack) -> None:
    """Make ``comfy.model_management`` treat ``gpu.device`` as its GPU; ``stack`` undoes it.

    On close the stack first unloads every model (while still patched, so weights
    go back to the CPU), then restores each attribute.
    """
    for name, value in _comfy_replacements(mm, gpu).items():
        if hasattr(mm, name):
            stack.callback(setattr, mm, name, getattr(mm, name))
            setattr(mm, name, value)
    stack.callback(_unload_all, mm, gpu)


def _unload_all(mm: types.ModuleType, gpu: FakeGPU) -> None:
    """Send every model ComfyUI holds on a fake device back to its offload device (the CPU)."""
    mm.unload_all_models()
    for device in gpu.devices[1:]:
        mm.free_memory(1e30, device)


def _is_fake(device: Any) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == "fakegpu"


def _comfy_replacements(mm: types.ModuleType, gpu: FakeGPU) -> dict[str, Any]:
    original_total, original_free = mm.get_total_memory, mm.get_free_memory
    cpu = torch.device("cpu")

    def get_torch_device() -> torch.device:
        return gpu.device

    def get_all_torch_devices(exclude_current: bool = False) -> list[torch.device]:  # noqa: FBT001, FBT002
        return [d for d in gpu.devices if not (exclude_current and d == gpu.device)]

    def get_total_memory(dev: Any = None, torch_total_too: bool = False, **kwargs: Any) -> Any:  # noqa: FBT001, FBT002
        dev = gpu.device if dev is None else dev
        if not _is_fake(dev):
            return original_total(dev, torch_total_too, **kwargs)
        total = fakegpu.memory_limit(dev)
        return (total, fakegpu.memory_allocated(dev)) if torch_total_too else total

    def get_free_memory(dev: Any = None, torch_free_too: bool = False, **kwargs: Any) -> Any:  # noqa: FBT001, FBT002
        dev = gpu.device if dev is None else dev
        if not _is_fake(dev):
            return original_free(dev, torch_free_too, **kwargs)
        free, _total = fakegpu.mem_get_info(dev)
        return (free, 0) if torch_free_too else free  # no caching allocator: torch holds nothing free

    def text_encoder_device() -> torch.device:
        # what ComfyUI picks on an fp16-capable GPU
        gpu_only = bool(getattr(getattr(mm, "args", None), "gpu_only", False))
        roomy = mm.vram_state in (mm.VRAMState.HIGH_VRAM, mm.VRAMState.NORMAL_VRAM)
        return gpu.device if gpu_only or roomy else cpu

    return {
        "get_torch_device": get_torch_device,
        "get_all_torch_devices": get_all_torch_devices,
        "get_total_memory": get_total_memory,
        "get_free_memory": get_free_memory,
        "text_encoder_device": text_encoder_device,
        "vram_state": mm.VRAMState[gpu.vram_state],
        "total_vram": gpu.memory / (1024 * 1024),
    }
