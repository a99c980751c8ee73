"""``fakegpu``: a pure-Python accelerator backend for torch, for tests on machines without a GPU.

:func:`install` renames torch's ``PrivateUse1`` device to ``fakegpu`` (once per
process), registers a ``torch.fakegpu`` device module and a few ``aten`` kernels,
so that ``t.to("fakegpu:0")``, ``torch.zeros(..., device="fakegpu:1")`` and
``module.to("fakegpu")`` work.  Each fake tensor is a :class:`FakeGPUTensor`, a
wrapper whose real data is a CPU tensor (``.elem``); every op unwraps, runs on
the CPU and wraps the result again, so data and math are real.

What behaves like CUDA:

- an op that mixes fake tensors with non-scalar CPU tensors, or two fake
  indices, raises ``RuntimeError: Expected all tensors to be on the same
  device, but found at least two devices, fakegpu:0 and cpu!`` (0-dim CPU
  scalars and CPU index tensors are allowed, as on CUDA);
- memory is accounted per device index: :func:`memory_allocated` is the sum
  of the bytes of the live storages on that device (views share their base's
  storage, a storage is released when the last tensor using it dies), and an
  allocation past the limit (:func:`set_memory_limit`) raises
  :class:`torch.OutOfMemoryError` without allocating anything;
- pinned host memory: ``cpu_tensor.pin_memory()`` returns a pinned copy
  (``pin_memory()`` of a pinned tensor returns it), ``is_pinned()`` is True for
  it and its views, and :func:`host_register` pins an existing tensor's memory
  in place, as ``cudaHostRegister`` does.  :func:`pinned_bytes` counts what is
  pinned now: a ``pin_memory()`` block rounded up to a power of two, as torch's
  caching host allocator takes it, a registered storage at its size.  Past
  :func:`set_pinned_limit`, pinning raises ``RuntimeError`` (as a failing
  ``cudaHostAlloc`` does) and pins nothing.  A ``non_blocking`` copy to the CPU
  (``t.to("cpu", non_blocking=True)``) returns pinned memory, as on CUDA;
- streams and events (``torch.fakegpu.Stream``, ``Event``, ``current_stream``,
  ``default_stream``, ``set_stream``, ``stream(s)``, ``synchronize``: the API of
  ``torch.cuda``, also reached through ``torch.get_device_module(device)``),
  with copies that land late.  Work on the default stream runs at once.  A
  ``non_blocking`` copy issued while another stream is current (to the device,
  device to device, or to pinned host memory) is queued on that stream: its
  destination is filled with garbage at once (NaN, or all bits set for
  integers) and gets its data only when the copy *lands*, as late as CUDA
  allows: when its stream is synchronized (``Stream.synchronize``, an
  ``Event.synchronize`` of an event recorded after it, :func:`synchronize` of
  the device), when an op that reads or writes data runs on its stream (a
  blocking copy too), or when such an op runs on a stream told to wait for it
  (``wait_stream``, ``wait_event``) at a point after the copy was issued.  So
  an op that reads a prefetched tensor without a wait computes NaN instead of
  passing by luck.  A copy from pinned memory reads its source when it lands
  (overwriting a pinned source before the copy is waited for changes the
  result, as on CUDA); a copy from pageable memory reads it when issued; a
  copy into pageable host memory is synchronous.  ``query()`` of a stream or
  event with work pending returns False and lets the work land (so a polling
  loop ends).  A blocking copy (``non_blocking=False``) first lands its
  stream's earlier work, as the host waits for it on CUDA;
- :data:`stats` counts bytes copied to and from the device (the part read
  from or written to pinned memory too) and ops run.  Bytes count when a
  copy is issued.

Thread semantics: the backend is process-wide.  The ledger and the counters
are guarded by one lock; releases found by the garbage collector are queued
and applied at the next query, so every query sees exact numbers.  The
ledger stays exact when a ``KeyboardInterrupt`` lands anywhere, in its own
bookkeeping too: each change is applied by one C call and a queued release
is removed only once applied.  The pinned-memory books work the same way.
The current stream is per thread and per device, as on CUDA; the streams'
queues are guarded by one lock, and queued work leaves its queue only after
it ran (a copy run twice writes the same data), so an interrupt never loses
a copy.  Memory is charged when a copy is issued, as CUDA allocates then.

Known limitations:

- ``data_ptr()`` is 0 and ``untyped_storage()`` is a placeholder without data:
  de-duplicate or serialise device tensors through ``.cpu()``;
- ``torch.empty(..., pin_memory=True)`` (and every factory with
  ``pin_memory=True``) raises ``NotImplementedError``: torch asks the backend's
  C++ hooks for a pinned allocator, which a Python backend cannot provide.
  Allocate, then ``pin_memory()`` or :func:`host_register`.  Pinned memory is
  ordinary pageable memory tracked by storage (a tensor built on the same
  memory through another storage, ``torch.from_numpy`` of its ``numpy()``, is
  not pinned); freed pinned memory is not cached;
- torch's generic stream API (``torch.Stream("fakegpu")``, ``torch.Event``,
  ``torch.accelerator.current_stream``/``set_stream``/``synchronize``) reaches
  torch's no-op device guard for ``PrivateUse1``: every such stream is the
  default stream, so copies on it never land late, and
  ``torch.accelerator.synchronize()`` raises.  Use ``torch.fakegpu``'s (or
  ``torch.get_device_module(device)``'s) streams and events, whose
  ``Stream`` and ``Event`` subclass ``torch.Stream`` and ``torch.Event``;
- a ``non_blocking`` copy on the default stream lands at once (on CUDA the
  host must synchronize before it reads a pinned destination of a
  device -> host copy); ops run at once whatever stream is current (only
  copies are late); ``stream(s)`` does not change the current device (on CUDA
  it does); stream priorities and ``record_stream`` do nothing (there
  is no caching allocator to reuse memory early); a late copy keeps its
  source alive until it lands; ``Event.elapsed_time`` measures host time
  between the two records;
- ``param.data = fake_tensor`` raises "incompatible tensor type" (CUDA allows
  it); ``Module.to``/``_apply``, ``load_state_dict`` and ``copy_`` are fine;
- so ``Module.to`` replaces parameter objects instead of swapping their data in
  place as it does between CPU and CUDA: an old fake parameter that is still
  referenced (by an autograd graph of an output computed with grad enabled, or
  by ``w = module.weight``) stays on the fake device and stays charged after
  the module moves to the CPU.  Run forwards under ``torch.inference_mode()``
  or ``torch.no_grad()`` (as ComfyUI does) before checking memory baselines;
- ``torch.load(..., weights_only=True)`` refuses pickled fake tensors;
- ``torch.autocast("fakegpu")`` applies no casting policy; random ops use the
  CPU generator; there is Python overhead on every op;
- ``PrivateUse1`` can be renamed once per process, so ``fakegpu`` cannot
  coexist with another ``PrivateUse1`` backend (``torch_npu``, ...).  Once
  installed, ``pin_memory()`` without a device (or with ``"fakegpu"``) takes
  fake pinned memory in the whole process, on machines with CUDA too.

Example::

    install()
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        w = torch.ones(4).pin_memory().to("fakegpu", non_blocking=True)
    torch.fakegpu.current_stream().wait_stream(side)  # without it, w * 2 is NaN
    assert (w * 2).tolist() == [2.0] * 4
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = [
    "DEFAULT_MEMORY",
    "DEVICE_TYPE",
    "Event",
    "FakeGPUStats",
    "FakeGPUTensor",
    "Stream",
    "current_device",
    "current_stream",
    "default_stream",
    "device_count",
    "host_register",
    "host_unregister",
    "install",
    "is_installed",
    "max_memory_allocated",
    "mem_get_info",
    "memory_allocated",
    "memory_limit",
    "pinned_bytes",
    "pinned_limit",
    "reset_peak_memory_stats",
    "set_device_count",
    "set_memory_limit",
    "set_pinned_limit",
    "set_stream",
    "stats",
    "stream",
    "synchronize",
]

DEVICE_TYPE = "fakegpu"
DEFAULT_MEMORY = 8 * 1024**3
_MIB = 1024**2
_GIB = 1024**3

aten = torch.ops.aten
_CPU = torch.device("cpu")


# --------------------------------------------------------------------------- counters


@dataclass
class FakeGPUStats:
    """Process-wide counters: bytes copied CPU -> fake device and back, and ops dispatched.

    Bytes are counted on the device side of each copy (``copy_``/``to``) when it is
    issued; ``.item()`` is not counted.  ``to_fake_pinned_bytes`` is the part of
    ``to_fake_bytes`` read from pinned host memory, ``to_cpu_pinned_bytes`` the part
    of ``to_cpu_bytes`` written to it.  :meth:`reset` zeroes every counter.
    """

    to_fake_bytes: int = 0
    to_cpu_bytes: int = 0
    ops: int = 0
    to_fake_pinned_bytes: int = 0
    to_cpu_pinned_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.to_fake_bytes = self.to_cpu_bytes = self.ops = 0
            self.to_fake_pinned_bytes = self.to_cpu_pinned_bytes = 0

    def _add(self, *, to_fake: int = 0, to_cpu: int = 0, ops: int = 0, pinned: bool = False) -> None:
        with self._lock:
            self.to_fake_bytes += to_fake
            self.to_cpu_bytes += to_cpu
            self.ops += ops
            if pinned:
                self.to_fake_pinned_bytes += to_fake
                self.to_cpu_pinned_bytes += to_cpu


stats = FakeGPUStats()


# --------------------------------------------------------------------------- devices and memory


class _Token(weakref.ref["FakeGPUTensor"]):
    """A weak reference to one fake tensor, its key in the ledger's books.

    Its callback is ``deque.append``: one C call, so the release it queues is
    never half done, whatever a signal handler raises.  Hashed and compared by
    identity, so the dict operations that use it run no Python code either.
    """

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__


_Books = dict[object, Any]


class _Ledger:
    """Live fake-device storages, keyed by the CPU storage behind them, with a count of tensors using each.

    The books are one dict: each tracked tensor's :class:`_Token` -> the storage key it is charged to,
    ``("storage", key)`` -> ``(index, nbytes, tensors)``, and ``("device", index)`` -> bytes allocated.
    Every change is staged in a separate dict and applied by a single ``dict.update``, and a dead
    tensor's token leaves the release queue only after its release is applied (a release applied
    twice finds nothing the second time).  So a ``KeyboardInterrupt`` raised between any two
    bytecodes, here or in a finalizer, leaves the books either before or after a change, never
    halfway, and never loses a release.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._books: _Books = {}
        self._dead: collections.deque[_Token] = collections.deque()  # tokens of dead tensors, appended by C
        self._limits: dict[int, int] = {}
        self._peaks: dict[int, int] = {}  # device index -> the most bytes allocated since the last reset
        self._default_limit = DEFAULT_MEMORY
        self.device_count = 1
        self.current = 0

    def limit(self, index: int) -> int:
        return self._limits.get(index, self._default_limit)

    def set_limit(self, limit: int, index: int | None) -> None:
        with self._lock:
            if index is None:
                self._limits.clear()
                self._default_limit = limit
            else:
                self._limits[index] = limit

    def allocated(self, index: int) -> int:
        with self._lock:
            self._drain()
            return int(self._books.get(("device", index), 0))

    def peak(self, index: int) -> int:
        with self._lock:
            self._drain()
            return max(self._peaks.get(index, 0), int(self._books.get(("device", index), 0)))

    def reset_peak(self, index: int) -> None:
        with self._lock:
            self._drain()
            self._peaks[index] = int(self._books.get(("device", index), 0))

    def check(self, index: int, nbytes: int) -> None:
        """Raise :class:`torch.OutOfMemoryError` if ``nbytes`` more would not fit on ``index``."""
        with self._lock:
            self._drain()
            self._check(self._books, index, nbytes)

    def _check(self, staged: _Books, index: int, nbytes: int) -> None:
        free = self.limit(index) - self._read(staged, ("device", index), 0)
        if nbytes > free:
            raise torch.OutOfMemoryError(_oom_message(index, nbytes, self.limit(index), free))

    def track(self, tensor: FakeGPUTensor) -> None:
        """Charge ``tensor``'s storage (once per storage) until the last tensor using it dies.

        Called again after an in-place op changed the tensor's storage or its size
        (``resize_``, ``out=``, ``set_``), it moves the tensor's charge to what it uses now.
        """
        token = tensor._fakegpu_token
        if token is None or token() is not tensor:
            token = _Token(tensor, self._dead.append)
            tensor._fakegpu_token = token  # charged below; uncharged, its release finds nothing
        storage = tensor.elem.untyped_storage()
        key, nbytes = int(storage._cdata), storage.nbytes()
        with self._lock:
            self._drain()
            staged: _Books = {}
            self._stage_release(staged, token)
            if nbytes:
                self._stage_charge(staged, token, key, _index_of(tensor), nbytes)
            self._apply(staged)

    def _drain(self) -> None:
        """Apply the releases of tensors that died since the last call."""
        while self._dead:
            token = self._dead[0]  # leaves the queue only once its release is applied
            staged: _Books = {}
            self._stage_release(staged, token)
            self._apply(staged)
            self._books.pop(token, None)
            self._dead.popleft()

    def _read(self, staged: _Books, key: object, default: Any = None) -> Any:
        return staged[key] if key in staged else self._books.get(key, default)

    def _stage_release(self, staged: _Books, token: _Token) -> None:
        key = self._read(staged, token)
        if key is None:
            return  # never charged, or released already
        index, nbytes, tensors = self._read(staged, ("storage", key))
        staged[token] = None
        if tensors > 1:
            staged["storage", key] = (index, nbytes, tensors - 1)
        else:
            staged["storage", key] = None
            staged["device", index] = self._read(staged, ("device", index), 0) - nbytes

    def _stage_charge(self, staged: _Books, token: _Token, key: int, index: int, nbytes: int) -> None:
        index, counted, tensors = self._read(staged, ("storage", key)) or (index, 0, 0)
        grown = max(nbytes - counted, 0)  # an in-place op (resize_, out=) may have enlarged the storage
        if grown:
            self._check(staged, index, grown)
            staged["device", index] = now = self._read(staged, ("device", index), 0) + grown
            if now > self._peaks.get(index, 0):
                self._peaks[index] = now  # a statistic, not the books: overstated at worst, by a charge interrupted
        staged["storage", key] = (index, counted + grown, tensors + 1)
        staged[token] = key

    def _apply(self, staged: _Books) -> None:
        self._books.update(staged)  # the one step that changes the books: a single C call
        for key in [key for key, value in staged.items() if value is None]:
            self._books.pop(key, None)  # None and absent mean the same; this keeps the dict small


_ledger = _Ledger()


def _oom_message(index: int, nbytes: int, total: int, free: int) -> str:
    return (
        f"{DEVICE_TYPE} out of memory. Tried to allocate {nbytes / _MIB:.2f} MiB. "
        f"{DEVICE_TYPE}:{index} has a total capacity of {total / _GIB:.2f} GiB "
        f"of which {max(free, 0) / _MIB:.2f} MiB is free."
    )


def _device_index(device: torch.device | str | int | None) -> int:
    if device is None:
        return _ledger.current
    if isinstance(device, int):
        return device
    dev = torch.device(device)
    if dev.type != DEVICE_TYPE:
        msg = f"device={str(dev)!r} is not a {DEVICE_TYPE} device"
        raise ValueError(msg)
    return _ledger.current if dev.index is None else dev.index


def _checked_index(device: torch.device | str | int | None) -> int:
    index = _device_index(device)
    if not 0 <= index < _ledger.device_count:
        msg = (
            f"{DEVICE_TYPE} error: invalid device ordinal {index}; {_ledger.device_count} {DEVICE_TYPE} device(s) exist"
        )
        raise RuntimeError(msg)
    return index


def set_device_count(count: int) -> None:
    """Make ``count`` fake devices (``fakegpu:0`` .. ``fakegpu:count-1``) exist."""
    if count < 1:
        msg = f"count={count!r}: a fake accelerator needs at least one device"
        raise ValueError(msg)
    _ledger.device_count = count
    if _ledger.current >= count:
        _ledger.current = 0


def set_memory_limit(limit: int, index: int | None = None) -> None:
    """Set the memory capacity (bytes) of device ``index``, or of every device when ``index`` is None."""
    _ledger.set_limit(int(limit), index)


def memory_limit(device: torch.device | str | int | None = None) -> int:
    """The memory capacity (bytes) of a fake device."""
    return _ledger.limit(_device_index(device))


def memory_allocated(device: torch.device | str | int | None = None) -> int:
    """Bytes of live fake-device storage on ``device`` (each storage counted once)."""
    return _ledger.allocated(_device_index(device))


def max_memory_allocated(device: torch.device | str | int | None = None) -> int:
    """The most bytes of fake-device storage live at once on ``device`` since the last
    :func:`reset_peak_memory_stats` (or since the start), like ``torch.cuda.max_memory_allocated``."""
    return _ledger.peak(_device_index(device))


def reset_peak_memory_stats(device: torch.device | str | int | None = None) -> None:
    """Start :func:`max_memory_allocated` of ``device`` again from what is allocated now."""
    _ledger.reset_peak(_device_index(device))


def mem_get_info(device: torch.device | str | int | None = None) -> tuple[int, int]:
    """``(free, total)`` bytes of a fake device, like ``torch.cuda.mem_get_info``."""
    index = _device_index(device)
    total = _ledger.limit(index)
    return total - _ledger.allocated(index), total


def device_count() -> int:
    """How many fake devices exist."""
    return _ledger.device_count


def current_device() -> int:
    """The index used for ``device="fakegpu"`` without an index."""
    return _ledger.current


def set_device(device: torch.device | str | int) -> None:
    """Change :func:`current_device`."""
    _ledger.current = _checked_index(device)


def empty_cache() -> None:
    """No-op: there is no caching allocator."""


def get_amp_supported_dtype() -> list[torch.dtype]:
    """Dtypes ``torch.autocast("fakegpu")`` accepts."""
    return [torch.float16, torch.bfloat16]


def is_available() -> bool:
    """Always True once installed."""
    return True


# --------------------------------------------------------------------------- pinned host memory


class _PinToken(weakref.ref[torch.UntypedStorage]):
    """A weak reference to one pinned storage; its callback (``deque.append``) queues its release."""

    __slots__ = ("key",)
    key: int
    __hash__ = object.__hash__
    __eq__ = object.__eq__


def _block_size(nbytes: int) -> int:
    """What torch's caching host allocator takes for ``nbytes``: the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


class _Pinned:
    """Pinned host storages: ``storage._cdata`` -> ``(token, bytes charged, registered)``.

    Like the ledger: a dead storage's token is queued by a C call and leaves the
    queue only after its entry is gone, each change to the books is one C call,
    so an interrupt anywhere leaves them exact.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._books: dict[int, tuple[_PinToken, int, bool]] = {}
        self._dead: collections.deque[_PinToken] = collections.deque()
        self.limit: int | None = None

    def _drain(self) -> None:
        while self._dead:
            token = self._dead[0]
            entry = self._books.get(token.key)
            if entry is not None and entry[0] is token:  # the address may hold a newer storage already
                self._books.pop(token.key, None)
            self._dead.popleft()

    def _entry(self, storage: torch.UntypedStorage) -> tuple[_PinToken, int, bool] | None:
        entry = self._books.get(storage._cdata)
        return entry if entry is not None and entry[0]() is storage else None

    def used(self) -> int:
        with self._lock:
            self._drain()
            return sum(charge for _token, charge, _registered in self._books.values())

    def contains(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cpu":
            return False
        with self._lock:
            self._drain()
            return self._entry(tensor.untyped_storage()) is not None

    def check(self, charge: int) -> None:
        """Raise what a failing ``cudaHostAlloc`` raises if ``charge`` more bytes would pass the limit."""
        with self._lock:
            used = self.used()
            if self.limit is not None and used + charge > self.limit:
                msg = (
                    f"{DEVICE_TYPE} error: out of memory: cannot pin {charge / _MIB:.2f} MiB of host memory; "
                    f"{used / _MIB:.2f} MiB of the {self.limit / _MIB:.2f} MiB pinned-memory limit are in use "
                    f"(see {DEVICE_TYPE}.set_pinned_limit)"
                )
                raise RuntimeError(msg)

    def add(self, storage: torch.UntypedStorage, charge: int, *, registered: bool) -> None:
        with self._lock:
            self._drain()
            if self._entry(storage) is not None:
                msg = f"{DEVICE_TYPE} error: part or all of the requested memory range is already pinned"
                raise RuntimeError(msg)
            self.check(charge)
            token = _PinToken(storage, self._dead.append)
            token.key = storage._cdata
            self._books[token.key] = (token, charge, registered)

    def remove_registered(self, storage: torch.UntypedStorage) -> None:
        with self._lock:
            self._drain()
            entry = self._entry(storage)
            if entry is None or not entry[2]:
                msg = f"{DEVICE_TYPE} error: the tensor's memory was not pinned by host_register"
                raise RuntimeError(msg)
            self._books.pop(storage._cdata, None)


_pinned = _Pinned()


def pinned_bytes() -> int:
    """Bytes of host memory pinned now (``pin_memory()`` blocks rounded up to a power of two, registered storages)."""
    return _pinned.used()


def pinned_limit() -> int | None:
    """The cap on :func:`pinned_bytes`, or None for no cap."""
    return _pinned.limit


def set_pinned_limit(limit: int | None) -> None:
    """Cap pinned host memory at ``limit`` bytes (None: no cap); pinning past it raises ``RuntimeError``.

    Memory pinned already stays pinned.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        msg = f"limit={limit!r} is not a pinned-memory cap; pass an int number of bytes >= 0, or None for no cap"
        raise ValueError(msg)
    _pinned.limit = limit


def _cpu_storage(tensor: torch.Tensor, argument: str) -> torch.UntypedStorage:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        where = tensor.device if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        msg = f"{argument}= must be a CPU tensor; got {where}"
        raise TypeError(msg)
    return tensor.untyped_storage()


def host_register(tensor: torch.Tensor) -> None:
    """Pin the memory of ``tensor``'s storage in place, like ``cudaHostRegister`` (no copy, no rounding).

    Every tensor on that storage (views, ``param.data`` re-pointed into it) is then
    pinned, until :func:`host_unregister` or until the storage is freed.  Raises
    ``RuntimeError`` if it is pinned already or the pinned limit would be passed.
    """
    storage = _cpu_storage(tensor, "tensor")
    _pinned.add(storage, storage.nbytes(), registered=True)


def host_unregister(tensor: torch.Tensor) -> None:
    """Undo :func:`host_register`, like ``cudaHostUnregister``; raises ``RuntimeError`` if it was not registered."""
    _pinned.remove_registered(_cpu_storage(tensor, "tensor"))


_IS_PINNED_CPU: Any = None  # torch's own kernels, for what the fake backend does not pin
_PIN_MEMORY_CPU: Any = None
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _is_pinned_cpu(tensor: torch.Tensor, device: torch.device | None = None) -> bool:
    """``aten::is_pinned`` for CPU tensors: True for fake pinned memory, else torch's answer."""
    if _pinned.contains(tensor):
        return True
    return bool(_IS_PINNED_CPU.call_boxed(_CPU_KEYS, tensor, device)) if _IS_PINNED_CPU is not None else False


def _pin_memory_cpu(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``aten::_pin_memory`` for CPU tensors: a copy in fake pinned memory (torch's own for another device)."""
    if device is not None and torch.device(device).type != DEVICE_TYPE:
        if _PIN_MEMORY_CPU is None:
            msg = f"pin_memory(device={str(device)!r}): only {DEVICE_TYPE} pinned memory is available here"
            raise RuntimeError(msg)
        return cast("torch.Tensor", _PIN_MEMORY_CPU.call_boxed(_CPU_KEYS, tensor, device))
    nbytes = _storage_nbytes(tensor.size(), tensor.stride(), tensor.dtype)
    with _pinned._lock:  # the limit is checked and the block charged in one step
        _pinned.check(_block_size(nbytes))
        pinned = torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype)
        pinned.copy_(tensor)
        _pinned.add(pinned.untyped_storage(), _block_size(nbytes), registered=False)
    return pinned


def _pin_fake(tensor: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    msg = f"cannot pin '{tensor.device}' memory: only dense CPU tensors can be pinned"
    raise RuntimeError(msg)


# --------------------------------------------------------------------------- streams and events


_PRIVATEUSE1 = int(torch._C._autograd.DeviceType.PrivateUse1.value)
_order = itertools.count(1)  # the host order of stream work: each queued item and each event record takes a number


class _Queue:
    """Work issued to one stream that has not landed: ``(order, action)`` pairs, oldest first."""

    __slots__ = ("entries", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.entries: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()

    def done(self, until: int) -> bool:
        """Whether all the work issued before ``until`` has landed."""
        entries = self.entries
        return not entries or entries[0][0] >= until


class _Streams:
    """Every stream's queue of late work, the default streams, and each thread's current streams."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.busy: set[_Queue] = set()  # every queue that holds work (and maybe a few that just emptied)
        self.defaults: dict[int, Stream] = {}
        self.local = threading.local()  # .chosen: {device index: Stream}, .entered: [(index, previous)]
        self.ids = itertools.count(1)

    def default(self, index: int) -> Stream:
        stream = self.defaults.get(index)
        if stream is None:
            stream = self.defaults.setdefault(index, Stream._make(index, 0))
        return stream

    def current(self, index: int) -> Stream:
        chosen: dict[int, Stream] | None = getattr(self.local, "chosen", None)
        stream = chosen.get(index) if chosen else None
        return self.default(index) if stream is None else stream

    def select(self, index: int, stream: Stream | None) -> Stream | None:
        """Make ``stream`` (None: the default) current on ``index`` in this thread; return what was chosen."""
        chosen: dict[int, Stream] = dict(getattr(self.local, "chosen", None) or {})
        previous = chosen.pop(index, None)
        if stream is not None and stream.stream_id != 0:
            chosen[index] = stream
        self.local.chosen = chosen  # one store: an interrupt leaves the old or the new choice
        return previous

    def enqueue(self, queue: _Queue, action: Callable[[], None]) -> None:
        with self.lock:
            self.busy.add(queue)  # before the work: a queue with work is always in busy
            queue.entries.append((next(_order), action))

    def land(self, queue: _Queue, until: int | None = None) -> None:
        """Run the work of ``queue`` issued before ``until`` (all of it when None), oldest first."""
        with self.lock:
            entries = queue.entries
            while entries and (until is None or entries[0][0] < until):
                entries[0][1]()  # run, then dequeue: an interrupt leaves it queued, and a rerun does the same
                entries.popleft()
            if not entries:
                self.busy.discard(queue)

    def land_current(self, index: int) -> None:
        """Stream order: what runs now on ``index``'s current stream runs after that stream's earlier work."""
        if self.busy:
            self.land(self.current(index)._queue)

    def land_device(self, index: int) -> None:
        with self.lock:
            for queue in [queue for queue in self.busy if queue.index == index]:
                self.land(queue)


class Stream(torch.Stream):
    """A stream of the fake device, like ``torch.cuda.Stream``: copies issued on it land late (see the module doc).

    ``Stream(device=None, priority=0)``; ``with stream:`` makes it current in this
    thread.  Thread-safe; its work may be issued and waited for from any thread.
    """

    _queue: _Queue

    def __new__(cls, device: torch.device | str | int | None = None, priority: int = 0) -> Stream:  # noqa: PYI034
        return cls._make(_checked_index(device), next(_streams.ids))

    def __init__(self, device: torch.device | str | int | None = None, priority: int = 0) -> None:
        """Nothing to do: ``__new__`` built it (``priority`` is accepted and ignored)."""

    @classmethod
    def _make(cls, index: int, stream_id: int) -> Stream:
        stream = torch.Stream.__new__(cls, stream_id=stream_id, device_index=index, device_type=_PRIVATEUSE1)
        stream._queue = _Queue(index)
        return stream

    def __repr__(self) -> str:
        return f"<torch.{DEVICE_TYPE}.Stream device={self.device} stream_id={self.stream_id}>"

    def query(self) -> bool:
        """Whether all work issued on this stream has landed; if not, it lands now and this call says False."""
        done = not self._queue.entries
        if not done:
            _streams.land(self._queue)
        return done

    def synchronize(self) -> None:
        """Land all work issued on this stream so far."""
        _streams.land(self._queue)

    def wait_event(self, event: torch.Event) -> None:
        """Make work issued on this stream from now on wait for ``event``."""
        _as_event(event).wait(self)

    def wait_stream(self, stream: torch.Stream) -> None:
        """Make work issued on this stream from now on wait for the work issued on ``stream`` so far."""
        self.wait_event(_as_stream(stream).record_event())

    def record_event(self, event: torch.Event | None = None) -> Event:
        """Record ``event`` (a new one when None) on this stream and return it."""
        recorded = Event() if event is None else _as_event(event)
        recorded.record(self)
        return recorded

    def __enter__(self) -> Stream:
        previous = _streams.select(self.device_index, self)
        entered = getattr(_streams.local, "entered", None)
        if entered is None:
            entered = _streams.local.entered = []
        entered.append((self.device_index, previous))
        return self

    def __exit__(self, *exc: object) -> None:
        index, previous = _streams.local.entered.pop()
        _streams.select(index, previous)


class Event(torch.Event):
    """An event of the fake device, like ``torch.cuda.Event``: a point in a stream's work to wait for."""

    _mark: tuple[_Queue, int] | None

    def __new__(cls, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> Event:  # noqa: FBT001, FBT002, PYI034
        return torch.Event.__new__(
            cls, DEVICE_TYPE, enable_timing=enable_timing, blocking=blocking, interprocess=interprocess
        )

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:  # noqa: FBT001, FBT002
        self._timing = enable_timing
        self._mark = None
        self._time = 0.0

    def __repr__(self) -> str:
        state = "not recorded" if self._mark is None else f"recorded on {DEVICE_TYPE}:{self._mark[0].index}"
        return f"<torch.{DEVICE_TYPE}.Event {state}>"

    def record(self, stream: torch.Stream | None = None) -> None:
        """Mark the work issued so far on ``stream`` (the current stream when None)."""
        recorded = current_stream() if stream is None else _as_stream(stream)
        self._time = time.perf_counter()
        self._mark = (recorded._queue, next(_order))  # one store

    def wait(self, stream: torch.Stream | None = None) -> None:
        """Make work issued on ``stream`` (the current one when None) from now on wait for this event.

        Waiting for an event never recorded does nothing, as on CUDA.
        """
        mark = self._mark
        waiting = current_stream() if stream is None else _as_stream(stream)
        if mark is None or mark[0] is waiting._queue or mark[0].done(mark[1]):
            return
        _streams.enqueue(waiting._queue, functools.partial(_streams.land, *mark))

    def query(self) -> bool:
        """Whether the work before this event has landed; if not, it lands now and this call says False."""
        mark = self._mark
        if mark is None or mark[0].done(mark[1]):
            return True
        _streams.land(*mark)
        return False

    def synchronize(self) -> None:
        """Land the work issued before this event."""
        mark = self._mark
        if mark is not None:
            _streams.land(*mark)

    def elapsed_time(self, end_event: torch.Event) -> float:
        """Milliseconds of host time between this event's record and ``end_event``'s."""
        end = _as_event(end_event)
        if not (self._timing and end._timing):
            msg = "Both events must be created with argument 'enable_timing=True'."
            raise RuntimeError(msg)
        if self._mark is None or end._mark is None:
            msg = "Both events must be recorded before calculating elapsed time."
            raise RuntimeError(msg)
        self.synchronize()
        end.synchronize()
        return (end._time - self._time) * 1000.0


def _as_stream(stream: torch.Stream) -> Stream:
    if isinstance(stream, Stream):
        return stream
    if isinstance(stream, torch.Stream) and stream.device_type == _PRIVATEUSE1 and stream.stream_id == 0:
        return _streams.default(stream.device_index)  # torch.Stream("fakegpu") is the default stream
    msg = f"stream={stream!r} is not a {DEVICE_TYPE} stream; create one with torch.{DEVICE_TYPE}.Stream()"
    raise TypeError(msg)


def _as_event(event: torch.Event) -> Event:
    if isinstance(event, Event):
        return event
    msg = f"event={event!r} is not a {DEVICE_TYPE} event; create one with torch.{DEVICE_TYPE}.Event()"
    raise TypeError(msg)


_streams = _Streams()


def current_stream(device: torch.device | str | int | None = None) -> Stream:
    """The stream this thread issues work on for ``device`` (the current device when None)."""
    return _streams.current(_checked_index(device))


def default_stream(device: torch.device | str | int | None = None) -> Stream:
    """The default stream of ``device``: work on it runs at once."""
    return _streams.default(_checked_index(device))


def set_stream(stream: torch.Stream) -> None:
    """Make ``stream`` current on its device in this thread (prefer ``with stream(s):``)."""
    chosen = _as_stream(stream)
    _streams.select(chosen.device_index, chosen)


@contextlib.contextmanager
def stream(stream: torch.Stream | None) -> Iterator[Stream | None]:
    """Make ``stream`` current on its device in this thread for the block (None: change nothing)."""
    if stream is None:
        yield None
        return
    chosen = _as_stream(stream)
    previous = _streams.select(chosen.device_index, chosen)
    try:
        yield chosen
    finally:
        _streams.select(chosen.device_index, previous)


def synchronize(device: torch.device | str | int | None = None) -> None:
    """Land every copy issued on every stream of ``device`` (the current device when None)."""
    _streams.land_device(_device_index(device))


def _poison(tensor: torch.Tensor) -> None:
    """Fill a late copy's destination with what an early reader finds: NaN, or all bits set."""
    with torch.inference_mode():
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.fill_(math.nan)
        elif tensor.dtype == torch.bool:
            tensor.fill_(True)  # noqa: FBT003
        elif tensor.dtype.is_signed:
            tensor.fill_(-1)
        else:
            tensor.fill_(torch.iinfo(tensor.dtype).max)


def _land_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.inference_mode():  # lands wherever it is waited for: under grad mode, on an inference tensor
        dst.copy_(src)


def _issue_late(stream: Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
    _poison(dst)
    _streams.enqueue(stream._queue, functools.partial(_land_copy, dst, src))


def _backend_module() -> types.ModuleType:
    """The ``torch.fakegpu`` module that torch expects of a device backend."""
    module = types.ModuleType(f"torch.{DEVICE_TYPE}", "Fake accelerator registered by ondevice.testing.fakegpu.")
    functions: dict[str, Any] = {
        "current_device": current_device,
        "device_count": device_count,
        "empty_cache": empty_cache,
        "get_amp_supported_dtype": get_amp_supported_dtype,
        "is_available": is_available,
        "is_bf16_supported": lambda *_args, **_kwargs: True,
        "is_initialized": is_available,
        "_is_in_bad_fork": lambda: False,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "mem_get_info": mem_get_info,
        "memory_allocated": memory_allocated,
        "set_device": set_device,
        "synchronize": synchronize,
        "Stream": Stream,
        "Event": Event,
        "current_stream": current_stream,
        "default_stream": default_stream,
        "set_stream": set_stream,
        "stream": stream,
        "host_register": host_register,
        "host_unregister": host_unregister,
        "pinned_bytes": pinned_bytes,
        "set_pinned_limit": set_pinned_limit,
    }
    for name, function in functions.items():
        setattr(module, name, function)
    return module


# --------------------------------------------------------------------------- the tensor


def _index_of(tensor: torch.Tensor) -> int:
    index = tensor.device.index
    return 0 if index is None else index


class FakeGPUTensor(torch.Tensor):
    """A tensor on ``fakegpu:N`` whose data is the CPU tensor ``elem``."""

    elem: torch.Tensor
    _fakegpu_token: _Token | None
    __torch_function__: ClassVar[Any] = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor, index: int) -> FakeGPUTensor:  # noqa: PYI034
        tensor: FakeGPUTensor = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=torch.device(DEVICE_TYPE, index),
            requires_grad=False,
        )
        tensor.elem = elem
        tensor._fakegpu_token = None
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        _streams.land_current(_index_of(self))  # reads the data, like .cpu()
        return f"{repr(self.elem)[:-1]}, device='{self.device}')"

    def tolist(self) -> Any:
        """The data as nested Python lists (torch refuses ``tolist`` on subclasses)."""
        _streams.land_current(_index_of(self))
        return self.elem.tolist()

    def __deepcopy__(self, memo: dict[int, Any]) -> FakeGPUTensor:
        if id(self) in memo:
            return cast("FakeGPUTensor", memo[id(self)])
        with torch.no_grad():
            copy = cast("FakeGPUTensor", self.clone())
        copy.requires_grad_(self.requires_grad)
        if getattr(self, "_is_param", False):
            copy._is_param = True
        memo[id(self)] = copy
        return copy

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        _streams.land_current(_index_of(self))
        return _rebuild, (self.elem.detach().clone(), _index_of(self), self.requires_grad)

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]
        cls,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        stats._add(ops=1)
        kwargs = kwargs or {}
        special = _SPECIAL_OPS.get(func)
        if special is not None:  # copies and stream ops keep stream order themselves
            return special(*args, **kwargs)
        if _streams.busy and not func.is_view and func not in _NO_DATA_OPS:
            _land_before(args, kwargs)
        if _is_composite(func):  # reached here only because inference mode skipped autograd
            out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return _run_on_cpu(func, args, kwargs)


_NO_DATA_OPS = {  # besides views: ops that touch no data, so no kernel runs on a stream
    aten._unsafe_view.default,
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


def _land_before(args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Stream order: an op reading or writing data runs after the work issued before it on its current stream."""
    for tensor in _tensors(args, kwargs):
        if isinstance(tensor, FakeGPUTensor):
            _streams.land_current(_index_of(tensor))
            return


def _is_composite(func: torch._ops.OpOverload) -> bool:
    if func not in _COMPOSITE:
        _COMPOSITE[func] = torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(),  # type: ignore[no-untyped-call]
            "CompositeImplicitAutograd",
        )
    return _COMPOSITE[func]


_COMPOSITE: dict[torch._ops.OpOverload, bool] = {}


def _rebuild(elem: torch.Tensor, index: int, requires_grad: bool) -> torch.Tensor:
    """Unpickle a fake tensor (``torch.save``/``pickle`` store its CPU data)."""
    return elem.to(torch.device(DEVICE_TYPE, index)).requires_grad_(requires_grad)


def _wrap(elem: torch.Tensor, index: int) -> FakeGPUTensor:
    """A fake tensor on ``index`` holding ``elem``, counted in the ledger (may raise OOM)."""
    tensor = FakeGPUTensor(elem, index)
    _ledger.track(tensor)
    return tensor


def _unwrap(tensor: FakeGPUTensor) -> torch.Tensor:
    return tensor.elem


# --------------------------------------------------------------------------- dispatch


_CROSS_DEVICE_OK = {
    aten.index.Tensor,
    aten.index_put.default,
    aten.index_put_.default,
    aten._index_put_impl_.default,
}


def _tensors(args: Any, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    leaves, _ = tree_flatten((args, kwargs))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _check_same_device(func: torch._ops.OpOverload, tensors: Iterable[torch.Tensor]) -> None:
    """Raise CUDA's error when an op mixes devices (0-dim CPU scalars are fine)."""
    if func in _CROSS_DEVICE_OK:
        return
    seen: torch.device | None = None
    for tensor in tensors:
        device = tensor.device
        if device.type == "cpu" and tensor.dim() == 0:
            continue
        if seen is None:
            seen = device
        elif device != seen:
            first, second = (seen, device) if seen.type == DEVICE_TYPE else (device, seen)
            msg = (
                f"Expected all tensors to be on the same device, but found at least two devices, {first} and {second}!"
            )
            raise RuntimeError(msg)


def _device_position(func: torch._ops.OpOverload) -> int | None:
    """Where ``func``'s ``device`` argument sits positionally, if it has one."""
    if func not in _DEVICE_POSITIONS:
        names = [a.name for a in func._schema.arguments]
        _DEVICE_POSITIONS[func] = names.index("device") if "device" in names else None
    return _DEVICE_POSITIONS[func]


_DEVICE_POSITIONS: dict[torch._ops.OpOverload, int | None] = {}


def _as_index(device: torch.device | str | int) -> int | None:
    """The fake index of ``device``, or None for the CPU."""
    dev = torch.device(device)
    return None if dev.type == "cpu" else _checked_index(dev)


def _device_to_cpu(
    func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[torch.device | None, Sequence[Any], dict[str, Any]]:
    """Pull out an explicit ``device`` argument and replace it by the CPU, where the real work runs."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"]), args, {**kwargs, "device": _CPU}
    position = _device_position(func)
    if position is not None and position < len(args) and args[position] is not None:
        device = torch.device(args[position])
        return device, (*args[:position], _CPU, *args[position + 1 :]), kwargs
    return None, args, kwargs


def _run_on_cpu(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    tensors = _tensors(args, kwargs)
    _check_same_device(func, tensors)
    inputs = [t for t in tensors if isinstance(t, FakeGPUTensor)]
    device, args, kwargs = _device_to_cpu(func, args, kwargs)
    target = _index_of(inputs[0]) if device is None else _as_index(device)
    out = func(*tree_map_only(FakeGPUTensor, _unwrap, args), **tree_map_only(FakeGPUTensor, _unwrap, kwargs))
    return _wrap_outputs(func, out, inputs, target)


def _wrap_outputs(func: torch._ops.OpOverload, out: Any, inputs: list[FakeGPUTensor], target: int | None) -> Any:
    owners = {id(t.elem): t for t in inputs if _index_of(t) == target}
    elsewhere = [t for t in inputs if _index_of(t) != target]
    view_of_normal = (
        func.is_view and torch.is_inference_mode_enabled() and bool(inputs) and not inputs[0].is_inference()
    )

    def wrap_one(result: torch.Tensor) -> torch.Tensor:
        owner = owners.get(id(result))
        if owner is not None:  # in-place or out=: hand back the caller's tensor
            _sync_metadata(owner)
            return owner
        if _aliases(result, elsewhere):  # never share storage across devices
            result = result.clone()
        if target is None:
            return result
        if view_of_normal:  # a view of a normal tensor must not be an inference tensor
            with torch.inference_mode(False):
                return _wrap(result, target)
        return _wrap(result, target)

    return tree_map_only(torch.Tensor, wrap_one, out)


def _aliases(result: torch.Tensor, inputs: Iterable[FakeGPUTensor]) -> bool:
    key = result.untyped_storage()._cdata
    return any(t.elem.untyped_storage()._cdata == key for t in inputs)


_META = torch._C.DispatchKeySet(torch._C.DispatchKey.Meta)
_PYTHON = torch._C.DispatchKeySet(torch._C.DispatchKey.Python)


def _sync_metadata(tensor: FakeGPUTensor) -> None:
    """After an op resized ``tensor.elem`` in place (``resize_``, ``out=``), make the wrapper match."""
    elem = tensor.elem
    same = (
        tensor.size() == elem.size()
        and tensor.stride() == elem.stride()
        and tensor.storage_offset() == elem.storage_offset()
    )
    if same:
        return
    with torch._C._ExcludeDispatchKeyGuard(_PYTHON):
        aten.set_.source_Storage_storage_offset.redispatch(
            _META, tensor, tensor.untyped_storage(), elem.storage_offset(), elem.size(), elem.stride()
        )
    _ledger.track(tensor)


def _late_stream(index: int, non_blocking: bool) -> Stream | None:  # noqa: FBT001
    """The side stream a copy on ``index`` is queued on, or None when it runs now (after its stream's earlier work)."""
    stream = _streams.current(index)
    if non_blocking and stream.stream_id != 0:
        return stream
    _streams.land(stream._queue)
    return None


def _to_copy(src: FakeGPUTensor, **kwargs: Any) -> torch.Tensor:
    device = kwargs.pop("device", None)
    kwargs.pop("pin_memory", None)
    non_blocking = bool(kwargs.get("non_blocking", False))
    target = _index_of(src) if device is None else _as_index(device)
    late = _late_stream(_index_of(src), non_blocking)
    if target is not None:
        _ledger.check(target, src.numel() * (kwargs.get("dtype") or src.dtype).itemsize)
    elem: torch.Tensor = aten._to_copy.default(src.elem, **kwargs)
    if target is None and non_blocking:  # like CUDA: a non_blocking copy to the CPU lands in pinned memory
        nbytes = elem.untyped_storage().nbytes()
        _pinned.add(elem.untyped_storage(), _block_size(nbytes), registered=False)
    if late is not None:
        _issue_late(late, elem, src.elem)
    if target is None:
        stats._add(to_cpu=src.elem.nbytes, pinned=non_blocking)
        return elem
    return _wrap(elem, target)


def _copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:  # noqa: FBT001, FBT002
    dst_elem = dst.elem if isinstance(dst, FakeGPUTensor) else dst
    src_elem = src.elem if isinstance(src, FakeGPUTensor) else src
    to_fake = isinstance(dst, FakeGPUTensor) and not isinstance(src, FakeGPUTensor)
    to_cpu = isinstance(src, FakeGPUTensor) and not isinstance(dst, FakeGPUTensor)
    pinned = _pinned.contains(src if to_fake else dst) if to_fake or to_cpu else False
    late_ok = non_blocking and not (to_cpu and not pinned)  # a copy into pageable host memory is synchronous
    late = _late_stream(_index_of(src if isinstance(src, FakeGPUTensor) else dst), late_ok)
    if late is None:
        dst_elem.copy_(src_elem, non_blocking=non_blocking)
    else:  # pageable host memory is read now (staged), pinned and device memory when the copy lands
        _issue_late(late, dst_elem, src_elem.clone() if to_fake and not pinned else src_elem)
    if to_fake:
        stats._add(to_fake=dst_elem.nbytes, pinned=pinned)
    elif to_cpu:
        stats._add(to_cpu=src_elem.nbytes, pinned=pinned)
    return dst


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:  # noqa: FBT001, FBT002
    return _copy(dst, src, non_blocking)


_SPECIAL_OPS: dict[Any, Callable[..., Any]] = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy,
    aten._copy_from.default: _copy_from,
    aten.is_pinned.default: lambda tensor, device=None: False,
    aten._pin_memory.default: _pin_fake,
    aten.record_stream.default: lambda tensor, stream: None,  # no caching allocator reuses memory early
}


# --------------------------------------------------------------------------- factory kernels (PrivateUse1)


def _storage_nbytes(size: Sequence[int], stride: Sequence[int], dtype: torch.dtype) -> int:
    if any(s == 0 for s in size):
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(size, stride, strict=True))) * dtype.itemsize


def _empty_memory_format(
    size: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
    memory_format: torch.memory_format | None = None,
) -> FakeGPUTensor:
    dtype = dtype or torch.get_default_dtype()
    index = _checked_index(device)
    numel = 1
    for s in size:
        numel *= s
    _ledger.check(index, numel * dtype.itemsize)
    elem = torch.empty(size, dtype=dtype, memory_format=memory_format or torch.contiguous_format)
    return _wrap(elem, index)


def _empty_strided(
    size: Sequence[int],
    stride: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
) -> FakeGPUTensor:
    dtype = dtype or torch.get_default_dtype()
    index = _checked_index(device)
    _ledger.check(index, _storage_nbytes(size, stride, dtype))
    return _wrap(torch.empty_strided(size, stride, dtype=dtype), index)


# --------------------------------------------------------------------------- install


_install_lock = threading.Lock()
_installed = False
_libraries: list[torch.library.Library] = []  # kept alive: dropping one unregisters its kernels


def is_installed() -> bool:
    """Whether :func:`install` has run in this process."""
    return _installed


def _register_kernels() -> None:
    """The factory and copy kernels of the fake device, and an autocast pass-through."""
    library = torch.library.Library("aten", "IMPL", "PrivateUse1")  # type: ignore[no-untyped-call]
    library.impl("empty.memory_format", _empty_memory_format)  # type: ignore[no-untyped-call]
    library.impl("empty_strided", _empty_strided)  # type: ignore[no-untyped-call]
    library.impl("_copy_from", _copy_from)  # type: ignore[no-untyped-call]
    autocast = torch.library.Library("_", "IMPL", "AutocastPrivateUse1")  # type: ignore[no-untyped-call]
    autocast.fallback(torch.library.fallthrough_kernel)  # type: ignore[no-untyped-call]  # no casting policy
    _libraries.extend([library, autocast, _register_pinning()])


def _register_pinning() -> torch.library.Library:
    """CPU kernels of ``is_pinned`` and ``_pin_memory`` that know fake pinned memory (torch's own stay reachable)."""
    global _IS_PINNED_CPU, _PIN_MEMORY_CPU
    get_kernel = getattr(torch.library, "get_kernel", None)  # torch 2.9 and later
    if get_kernel is not None:
        _IS_PINNED_CPU = get_kernel("aten::is_pinned", "CPU")
        _PIN_MEMORY_CPU = get_kernel("aten::_pin_memory", "CPU")
    library = torch.library.Library("aten", "IMPL", "CPU")  # type: ignore[no-untyped-call]
    library.impl("is_pinned", _is_pinned_cpu)  # type: ignore[no-untyped-call]
    library.impl("_pin_memory", _pin_memory_cpu)  # type: ignore[no-untyped-call]
    return library


def install() -> None:
    """Register the ``fakegpu`` device with torch (idempotent, thread-safe, once per process).

    Raises ``RuntimeError`` if another backend already took torch's ``PrivateUse1`` slot.
    """
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        taken = torch._C._get_privateuse1_backend_name()
        if taken != "privateuseone":
            msg = (
                f"cannot install the {DEVICE_TYPE} backend: torch's PrivateUse1 device is already "
                f"named {taken!r} in this process (it can be renamed only once)"
            )
            raise RuntimeError(msg)
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend  # noqa: PLC0415

        _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_backend_module())
        _register_kernels()
        _installed = True
