"""Pinned host masters: a module's CPU tensors pinned in place, once, so host -> device copies run at link speed.

:func:`pin` registers the memory of each CPU storage of a module with the
device's driver where it lies (no copy, no rounding): on CUDA with
``cudaHostRegister`` (portable: for every GPU; undone by ``cudaHostUnregister``), on the fake GPU with
``torch.fakegpu.host_register``.  A storage pinned already (ComfyUI 0.3.75 and
later pin weights themselves, or the user did) is used as it is: never pinned
twice, never unpinned by ondevice.  Pins stay registered while the module
lives (registration is the one-time cost); they are undone when the module is
garbage collected or by :func:`unpin`.  Each pinned storage is held until
then, so its memory is never freed while registered.

A process-wide cap (:func:`set_pinned_limit`; by default half the machine's
RAM, since pinned memory cannot be paged out) bounds the bytes ondevice pins
(:func:`pinned_bytes`); a module that would pass it, or whose registration
fails (the driver's or the fake GPU's cap), is not pinned at all: :func:`pin`
says why, and its loads copy from pageable memory.  Never an error.

Thread semantics: the books are process-wide, guarded by one lock; a module is
pinned all or nothing, under that lock.

Example::

    from ondevice.pinning import pin, unpin

    pinning = pin(module, torch.device("cuda"))
    if not pinning.pinned:
        print("pageable copies:", pinning.reason)
    unpin(module)
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ondevice.devices import memory_info
from ondevice.errors import InvalidArgumentError

__all__ = ["Pinning", "pin", "pinned_bytes", "pinned_limit", "set_pinned_limit", "unpin"]

log = logging.getLogger("ondevice")

_Register = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Pinning:
    """How :func:`pin` went: ``pinned`` when every CPU tensor of the module is pinned now; else ``reason`` says why.

    ``new_bytes``: what this call pinned (0 when everything was pinned already).
    """

    pinned: bool
    reason: str | None = None
    new_bytes: int = 0


@dataclass(frozen=True)
class _Pin:
    """One storage ondevice registered: a tensor on it (which keeps it alive) and how to undo the registration."""

    tensor: torch.Tensor
    nbytes: int
    unregister: _Register


class _Books:
    """Storages ondevice pinned (by data pointer) and, per module (held weakly), the pointers pinned for it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entrant: a module's finalizer may run inside pin (gc)
        self.pins: dict[int, _Pin] = {}
        self.by_module: dict[int, tuple[weakref.ref[torch.nn.Module], list[int]]] = {}
        self.used = 0
        self.limit: int | None = memory_info("cpu")[1] // 2  # default: half the machine's RAM


_books = _Books()


def pinned_bytes() -> int:
    """Bytes of host memory ondevice has pinned now (storages pinned by others are not counted)."""
    with _books.lock:
        return _books.used


def pinned_limit() -> int | None:
    """The cap on :func:`pinned_bytes`, or None for no cap."""
    return _books.limit


def set_pinned_limit(nbytes: int | None) -> None:
    """Cap the host memory ondevice pins at ``nbytes`` (None: no cap); a module that would pass it is not pinned.

    What is pinned already stays pinned.
    """
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0):
        msg = f"set_pinned_limit(nbytes={nbytes!r}): pass an int number of bytes >= 0, or None for no cap"
        raise InvalidArgumentError(msg)
    _books.limit = nbytes


def pin(module: torch.nn.Module, device: torch.device) -> Pinning:
    """Pin every CPU parameter and buffer of ``module`` in place, for copies to ``device``; all or nothing.

    Storages pinned already (by ondevice for this or another module, by ComfyUI,
    by the user) are left as they are.  Never raises for a cap or a failed
    registration: the result says the module is not pinned, and why.
    """
    backend = _backend(device)
    if backend is None:
        return Pinning(pinned=False, reason=f"no pinned memory for {device.type}")
    register, unregister = backend
    with _books.lock:
        _forget_replaced(module)
        todo = _unpinned_storages(_cpu_tensors(module))
        need = sum(nbytes for _tensor, nbytes in todo.values())
        if _books.limit is not None and _books.used + need > _books.limit:
            reason = f"pinning {need} bytes would pass ondevice's pinned-memory limit ({_books.limit} bytes)"
            return Pinning(pinned=False, reason=reason)
        done: list[int] = []
        for ptr, (tensor, nbytes) in todo.items():
            try:
                register(tensor)
            except RuntimeError as exc:  # the driver's or the fake GPU's cap, an overlapping registration
                _unregister_all(done)
                return Pinning(pinned=False, reason=f"registering {nbytes} bytes failed: {exc}")
            _books.pins[ptr] = _Pin(tensor, nbytes, unregister)
            _books.used += nbytes
            done.append(ptr)
        if done:
            _remember(module, done)
    return Pinning(pinned=True, new_bytes=need)


def unpin(module: torch.nn.Module) -> int:
    """Undo what :func:`pin` registered for ``module``; returns the bytes unpinned (0 if none)."""
    with _books.lock:
        entry = _books.by_module.pop(id(module), None)
        if entry is None or entry[0]() is not module:
            return 0
        return _unregister_all(entry[1])


def _forget_replaced(module: torch.nn.Module) -> None:
    """Unpin what ondevice pinned for ``module`` that it no longer uses, when all of it is on the CPU.

    ComfyUI's own unload (a node outside a scope) copies the weights back into new host memory; the old
    pinned storages would otherwise be kept, and pinned, for as long as the module lives.  While part of the
    module is on a device its old storages may be masters, so nothing is dropped then.
    """
    entry = _books.by_module.get(id(module))
    if entry is None or entry[0]() is not module:
        return
    tensors = [*module.parameters(), *module.buffers()]
    if any(tensor.device.type != "cpu" for tensor in tensors):
        return
    used = {tensor.untyped_storage().data_ptr() for tensor in tensors}
    stale = [ptr for ptr in entry[1] if ptr not in used]
    if stale:
        _unregister_all(stale)
        entry[1][:] = [ptr for ptr in entry[1] if ptr in used]


def _cpu_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu":
            yield tensor


def _unpinned_storages(tensors: Iterable[torch.Tensor]) -> dict[int, tuple[torch.Tensor, int]]:
    """The storages of ``tensors`` not pinned yet, by data pointer: a tensor on each (detached) and its bytes."""
    todo: dict[int, tuple[torch.Tensor, int]] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or ptr in todo or ptr in _books.pins or tensor.is_pinned():
            continue
        todo[ptr] = (tensor.detach(), nbytes)
    return todo


def _remember(module: torch.nn.Module, ptrs: list[int]) -> None:
    """Record ``ptrs`` as pinned for ``module``; unpin them when it is garbage collected."""
    key = id(module)

    def forget(ref: weakref.ref[torch.nn.Module]) -> None:
        with _books.lock:
            if _books.by_module.get(key, (None,))[0] is ref:
                _unregister_all(_books.by_module.pop(key)[1])

    entry = _books.by_module.get(key)
    if entry is not None and entry[0]() is module:
        entry[1].extend(ptrs)
    else:
        _books.by_module[key] = (weakref.ref(module, forget), list(ptrs))


def _unregister_all(ptrs: list[int]) -> int:
    """Unregister the storages at ``ptrs`` (call with the lock held); a failure is logged, never raised."""
    freed = 0
    for ptr in ptrs:
        entry = _books.pins.pop(ptr, None)
        if entry is None:
            continue
        _books.used -= entry.nbytes
        freed += entry.nbytes
        try:
            entry.unregister(entry.tensor)
        except RuntimeError as exc:  # the backend forgot it already (a fake GPU reset): nothing left to undo
            log.debug("ondevice: unpinning %d bytes failed: %r", entry.nbytes, exc)
    return freed


def _backend(device: torch.device) -> tuple[_Register, _Register] | None:
    """How to pin host memory in place for copies to ``device``: (register, unregister), or None."""
    if device.type == "cuda":
        return _cuda_register, _cuda_unregister
    if device.type == "cpu":
        return None
    try:
        module = torch.get_device_module(device)
    except (RuntimeError, AttributeError):  # a device type torch has no module for
        return None
    register, unregister = getattr(module, "host_register", None), getattr(module, "host_unregister", None)
    if callable(register) and callable(unregister):
        return register, unregister
    return None


def _cuda_register(tensor: torch.Tensor) -> None:
    storage = tensor.untyped_storage()
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]  # torch leaves cudart untyped
    flags = 1  # cudaHostRegisterPortable, as ComfyUI registers: pinned for every GPU's context, not only this one's
    torch.cuda.check_error(cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags))


def _cuda_unregister(tensor: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]  # torch leaves cudart untyped
    torch.cuda.check_error(cudart.cudaHostUnregister(tensor.untyped_storage().data_ptr()))
