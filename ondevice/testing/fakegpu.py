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
- :data:`stats` counts bytes copied to and from the device and ops run.

Thread semantics: the backend is process-wide.  The ledger and the counters
are guarded by one lock; releases found by the garbage collector are queued
and applied at the next query, so every query sees exact numbers.  The
ledger stays exact when a ``KeyboardInterrupt`` lands anywhere, in its own
bookkeeping too: each change is applied by one C call and a queued release
is removed only once applied.

Known limitations:

- ``data_ptr()`` is 0 and ``untyped_storage()`` is a placeholder without data:
  de-duplicate or serialise device tensors through ``.cpu()``;
- after :func:`install`, ``cpu_tensor.pin_memory()`` raises (no pinned allocator);
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
  coexist with another ``PrivateUse1`` backend (``torch_npu``, ...).
"""

from __future__ import annotations

import collections
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

__all__ = [
    "DEFAULT_MEMORY",
    "DEVICE_TYPE",
    "FakeGPUStats",
    "FakeGPUTensor",
    "current_device",
    "device_count",
    "install",
    "is_installed",
    "mem_get_info",
    "memory_allocated",
    "memory_limit",
    "set_device_count",
    "set_memory_limit",
    "stats",
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

    Bytes are counted on the device side of each copy (``copy_``/``to``); ``.item()``
    is not counted.  :meth:`reset` zeroes all three.
    """

    to_fake_bytes: int = 0
    to_cpu_bytes: int = 0
    ops: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self.to_fake_bytes = self.to_cpu_bytes = self.ops = 0

    def _add(self, *, to_fake: int = 0, to_cpu: int = 0, ops: int = 0) -> None:
        with self._lock:
            self.to_fake_bytes += to_fake
            self.to_cpu_bytes += to_cpu
            self.ops += ops


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
            staged["device", index] = self._read(staged, ("device", index), 0) + grown
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


def synchronize(device: torch.device | str | int | None = None) -> None:
    """No-op: every fake copy is synchronous."""


def empty_cache() -> None:
    """No-op: there is no caching allocator."""


def get_amp_supported_dtype() -> list[torch.dtype]:
    """Dtypes ``torch.autocast("fakegpu")`` accepts."""
    return [torch.float16, torch.bfloat16]


def is_available() -> bool:
    """Always True once installed."""
    return True


def _backend_module() -> types.ModuleType:
    """The ``torch.fakegpu`` module that torch expects of a device backend."""
    module = types.ModuleType(f"torch.{DEVICE_TYPE}", "Fake accelerator registered by ondevice.testing.fakegpu.")
    functions: dict[str, Callable[..., Any]] = {
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
        return f"{repr(self.elem)[:-1]}, device='{self.device}')"

    def tolist(self) -> Any:
        """The data as nested Python lists (torch refuses ``tolist`` on subclasses)."""
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
        if special is not None:
            return special(*args, **kwargs)
        if _is_composite(func):  # reached here only because inference mode skipped autograd
            out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return _run_on_cpu(func, args, kwargs)


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


def _to_copy(src: FakeGPUTensor, **kwargs: Any) -> torch.Tensor:
    device = kwargs.pop("device", None)
    kwargs.pop("pin_memory", None)
    target = _index_of(src) if device is None else _as_index(device)
    if target is not None:
        _ledger.check(target, src.numel() * (kwargs.get("dtype") or src.dtype).itemsize)
    elem: torch.Tensor = aten._to_copy.default(src.elem, **kwargs)
    if target is None:
        stats._add(to_cpu=src.elem.nbytes)
        return elem
    return _wrap(elem, target)


def _copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:  # noqa: FBT001, FBT002
    dst_elem = dst.elem if isinstance(dst, FakeGPUTensor) else dst
    src_elem = src.elem if isinstance(src, FakeGPUTensor) else src
    dst_elem.copy_(src_elem, non_blocking=non_blocking)
    if isinstance(dst, FakeGPUTensor) and not isinstance(src, FakeGPUTensor):
        stats._add(to_fake=dst_elem.nbytes)
    elif isinstance(src, FakeGPUTensor) and not isinstance(dst, FakeGPUTensor):
        stats._add(to_cpu=src_elem.nbytes)
    return dst


def _copy_from(src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:  # noqa: FBT001, FBT002
    return _copy(dst, src, non_blocking)


_SPECIAL_OPS: dict[Any, Callable[..., Any]] = {
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy,
    aten._copy_from.default: _copy_from,
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
    _libraries.extend([library, autocast])


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
