"""The strategy for a plain ``torch.nn.Module`` (no ComfyUI needed), and tensor helpers.

Zero-copy offload: loading a module keeps the CPU tensors it had (its
parameters and buffers, by name) as *masters*: the very tensors, held by
reference, so no host memory is added (and none is freed while the scope
lasts: it is where the weights come back to).  Right after the load each
device tensor's version counter (``tensor._version``) is recorded.  Offloading
points every parameter and buffer whose device tensor is unchanged back at
its master, without copying a byte from the device; the device memory is freed
as the device tensors die.  "Unchanged" means the module still holds the very
tensor the load made, with the same version, dtype, shape, strides and storage.

What is copied back instead, by ``tensor.to("cpu")`` into new host memory as
``module.to("cpu")`` copies (the master is left as it was: it may be shared
with other code, or read-only memory):

- a tensor modified in place on the device: any in-place op on the parameter
  or buffer, on a view of it or on its ``detach()`` (``add_``, ``copy_``,
  ``load_state_dict``, ``torch.nn.init``, an optimizer step), under
  ``no_grad`` or ``inference_mode`` too.  **Writes through ``tensor.data`` are not seen**
  (torch gives ``.data`` its own version counter): they are lost at exit,
  the CPU keeping the weights as they were before the scope; write through
  the tensor itself under ``torch.no_grad()`` instead;
- a parameter with a gradient: fused optimizer steps (``Adam(fused=True)``,
  ``SGD(fused=True)``) write parameters without moving their version counter;
- a parameter or buffer the user replaced (a new object, another dtype);
- every buffer of a batch norm (``torch.nn.modules.batchnorm._NormBase``:
  ``BatchNorm*``, ``SyncBatchNorm``, ``InstanceNorm*``): torch updates running
  statistics inside the kernel without moving the version counter.  Other
  writes that bypass it are not seen either (``F.batch_norm`` called on a
  module's own buffers, custom kernels that write through raw pointers);
- a tensor whose version torch does not track: a parameter created as an
  inference tensor, on CUDA, where the load swaps ``param.data`` and the
  parameter keeps its (absent) version counter;
- gradients, tensors that were not on the CPU when the module was loaded,
  and every tensor of a module whose class overrides ``to`` (moved both ways
  by ``module.to``: it may move more than the tensors).

Pinned loads: a load first pins the masters in place, once per module
(:mod:`ondevice.pinning`; within its cap, never pinning twice what ComfyUI or
the user pinned), then copies them with ``non_blocking=True`` on a side stream
of the target device, records an event and makes the current stream wait on
it, so work queued on the current stream in the block reads landed weights
while the host runs on.  A module that cannot be pinned (past the cap, a failed
registration, a device without pinned memory) is loaded as before, with
``module.to(device)`` from pageable memory; ``last_pinned``, ``last_stream``
and ``last_fallback`` say how the latest load went.

A prefetch (:meth:`ModulePart.prefetch`) is the same load without the wait:
the event is kept per module and :func:`join` (called when a scope claims the
weights) makes the current stream wait on it, so a block that computes with
other weights meanwhile hides the copy.  An offload joins first.

The machinery is reusable: :func:`stage` (copy a module's CPU tensors but
named ones, keep masters), :func:`point_back` (the zero-copy offload,
optionally leaving what it cannot point back where it is) and :func:`join`
serve the ComfyUI fast path (:mod:`ondevice.strategies.comfy`) too.

Thread semantics: masters are kept per module in a process-wide table guarded
by a lock; the residency table moves one module's weights one move at a time.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ondevice.devices import CPU, memory_info
from ondevice.pinning import Pinning, pin
from ondevice.strategies import Part, placement

__all__ = [
    "ModulePart",
    "ModuleStrategy",
    "Staging",
    "all_on",
    "join",
    "module_tensors",
    "point_back",
    "stage",
]


def module_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter and buffer of ``module``."""
    yield from module.parameters()
    yield from module.buffers()


def all_on(tensors: Iterable[torch.Tensor], device: torch.device) -> bool:
    """True when every tensor lives on ``device`` (an index-less device matches any index)."""
    return all(_is_on(tensor.device, device) for tensor in tensors)


def _is_on(here: torch.device, device: torch.device) -> bool:
    """Whether ``here`` is ``device`` (an index-less device matches any index)."""
    return here.type == device.type and (device.index is None or here.index == device.index)


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by its dotted name (a tied tensor under each of its names)."""
    named: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


_Signature = tuple[int, torch.dtype, torch.Size, tuple[int, ...], int, int]


def _signature(tensor: torch.Tensor) -> _Signature | None:
    """What must stay equal for ``tensor`` to count as unmodified; ``None`` where torch tracks no version."""
    try:
        return (
            tensor._version,
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
            int(tensor.storage_offset()),
            int(tensor.untyped_storage()._cdata),  # a `.data =` swap keeps the version but changes the storage
        )
    except RuntimeError:  # an inference tensor ("do not track version counter"), a sparse tensor (no strides)
        return None


@dataclass(frozen=True)
class _Master:
    """One tensor's CPU master (the tensor the module had, not a copy) and the device tensor the load made of it."""

    cpu: torch.Tensor
    device: int  # id() of the device tensor: a weakref on it would make torch.utils.swap_tensors refuse it
    storage: StorageWeakRef  # keeps the storage's record alive, so its address (in the signature) is never reused
    signature: _Signature

    def unchanged(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is that device tensor, not modified since the load.

        A parameter with a gradient counts as modified: fused optimizer steps (``Adam(fused=True)``)
        write it without moving its version counter.
        """
        return (
            id(tensor) == self.device
            and not self.storage.expired()  # type: ignore[no-untyped-call]
            and _signature(tensor) == self.signature
            and tensor.grad is None
        )


class _Masters:
    """Per module (by identity, held weakly): the masters of its tensors that are on a device now."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a module's weakref callback may run inside put (gc)
        self._by_module: dict[int, tuple[weakref.ref[torch.nn.Module], dict[str, _Master]]] = {}

    def put(self, module: torch.nn.Module, masters: dict[str, _Master]) -> None:
        """Keep ``masters`` until :meth:`take` (or until ``module`` dies)."""
        key = id(module)

        def forget(ref: weakref.ref[torch.nn.Module]) -> None:
            with self._lock:
                if self._by_module.get(key, (None,))[0] is ref:
                    del self._by_module[key]

        with self._lock:
            if masters:
                self._by_module[key] = (weakref.ref(module, forget), masters)
            else:
                self._by_module.pop(key, None)

    def take(self, module: torch.nn.Module) -> dict[str, _Master]:
        """The masters kept for ``module``, forgotten here ({} if none)."""
        with self._lock:
            entry = self._by_module.pop(id(module), None)
        if entry is None or entry[0]() is not module:
            return {}
        return entry[1]


_masters = _Masters()


@dataclass(frozen=True)
class Staging:
    """How :func:`stage` went: bytes copied host -> device, from pinned memory or not, on which side stream."""

    copied: int
    pinned: bool
    stream: str | None = None
    fallback: str | None = None  # why the copies came from pageable memory (the pinned-memory cap, ...), or None


class _Landing:
    """Per module (by identity, held weakly): the event its latest side-stream copies record, until joined."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[int, tuple[weakref.ref[torch.nn.Module], Any, torch.device]] = {}

    def put(self, module: torch.nn.Module, event: Any, device: torch.device) -> None:
        with self._lock:
            self._events[id(module)] = (weakref.ref(module), event, device)

    def take(self, module: torch.nn.Module) -> tuple[Any, torch.device] | None:
        with self._lock:
            entry = self._events.pop(id(module), None)
        if entry is None or entry[0]() is not module:
            return None
        return entry[1], entry[2]


_landing = _Landing()


def stage(
    module: torch.nn.Module,
    device: torch.device,
    *,
    skip: frozenset[str] = frozenset(),
    wait: bool = True,
) -> Staging:
    """Copy ``module``'s CPU parameters and buffers to ``device``, keeping the CPU tensors as masters.

    Names in ``skip`` stay where they are (ComfyUI patches them from their CPU
    tensors).  The masters are pinned in place first (within the cap); pinned
    copies run with ``non_blocking`` on a side stream.  With ``wait`` the current
    stream waits for them before this returns (work queued on it reads landed
    weights; the host does not wait); without, :func:`join` makes it wait later
    (a prefetch).  Pageable copies are synchronous.  The masters of tensors that
    were on the device already and are unchanged are kept.  On failure the
    tensors this call moved point back at their masters, and it raises.
    """
    kept = _masters.take(module)  # an earlier load's, for tensors still on the device unchanged
    named = _named_tensors(module)
    before = {name: _master_of(t) for name, t in named.items() if t.device == CPU and name not in skip}
    move = {id(t) for name, t in named.items() if t.device == CPU and name not in skip}
    copied = _bytes_off((t for name, t in named.items() if name not in skip), device)  # before: CUDA swaps in place
    pinning = pin(module, device) if before else Pinning(pinned=False)  # nothing to copy: nothing to pin

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=pinning.pinned) if id(tensor) in move else tensor

    stream = None
    try:
        with torch.inference_mode(False):
            if pinning.pinned:
                stream = _copy_on_side_stream(module, device, to_device, wait=wait)
            elif move:
                module._apply(to_device)  # type: ignore[no-untyped-call]  # torch leaves _apply untyped
    except BaseException:  # copies still queued on the side stream may be dropped: the stream orders reuse
        _masters.put(module, _loaded(module, before, kept))
        point_back(module)  # what the load made is unmodified: no copy; the rest is copied back
        raise
    _masters.put(module, _loaded(module, before, kept))
    return Staging(copied=copied, pinned=pinning.pinned, stream=stream, fallback=pinning.reason)


def _copy_on_side_stream(module: torch.nn.Module, device: torch.device, to_device: Any, *, wait: bool) -> str:
    """Apply ``to_device`` (non-blocking copies) on a side stream of ``device``; returns the stream's name.

    With ``wait`` the current stream waits for the copies at once; else the
    event is kept for :func:`join`.
    """
    backend = torch.get_device_module(device)
    current = backend.current_stream(device)
    side = backend.Stream(device)
    side.wait_stream(current)  # device memory freed by work queued so far is not overwritten while that work runs
    with backend.stream(side):
        module._apply(to_device)  # type: ignore[no-untyped-call]  # torch leaves _apply untyped
        landed = backend.Event()
        landed.record(side)
    for tensor in module_tensors(module):
        if _is_on(tensor.device, device):
            tensor.record_stream(current)  # allocated on the side stream, used on the current one
    if wait:
        current.wait_event(landed)  # without it a forward on the current stream reads weights still in flight
    else:
        _landing.put(module, landed, device)
    return f"{device}:side"


def join(module: torch.nn.Module) -> None:
    """Make the current stream wait for ``module``'s copies that :func:`stage` left in flight (``wait=False``)."""
    found = _landing.take(module)
    if found is not None:
        landed, device = found
        torch.get_device_module(device).current_stream(device).wait_event(landed)


@dataclass(frozen=True)
class PointedBack:
    """How :func:`point_back` went: bytes it copied to the CPU, and the tensors it left on the device (by name)."""

    copied: int
    left: dict[str, int]  # name -> bytes, where copy_others=False left a tensor on the device


def point_back(module: torch.nn.Module, *, copy_others: bool = True) -> PointedBack | None:
    """Offload zero-copy: unchanged device tensors become their masters again.

    With ``copy_others`` every other device tensor is copied to the CPU (into
    new host memory); without, it is left where it is (ComfyUI restores
    patched weights from its own backups, and moves the rest), and the masters
    of those left are kept for a later call.  ``None`` where ``module`` has no
    masters (nothing to point back at).
    """
    masters = _masters.take(module)
    if not masters:
        return None
    join(module)  # an offload before the prefetch was claimed: the copies are done before their source is reused
    inference = any(master.cpu.is_inference() for master in masters.values())
    with torch.inference_mode(inference):  # torch sets .data to an inference tensor only inside it
        result = _repoint(module, masters, copy_others=copy_others)
        if result is None:  # gradients to move too, or torch's overwrite / swap conversion modes
            result = _repoint_apply(module, masters, copy_others=copy_others)
    rest = {name: master for name, master in masters.items() if name in result.left}
    if rest:  # modified, or hidden from ComfyUI's unload by an object patch: a later call may still point it back
        _masters.put(module, rest)
    return result


def _slots(module: torch.nn.Module) -> Iterable[tuple[str, dict[str, Any], str, torch.Tensor]]:
    """Every parameter and buffer slot: (dotted name, the ``_parameters`` / ``_buffers`` dict, key, tensor)."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for slots in (sub._parameters, sub._buffers):
            for key, tensor in slots.items():
                if tensor is not None:
                    yield dot + key, slots, key, tensor


def _repoint(module: torch.nn.Module, masters: dict[str, _Master], *, copy_others: bool) -> PointedBack | None:
    """Set each slot whose device tensor is unchanged to its master, without walking ``_apply``; None if unfit.

    Unfit (nothing changed yet): a parameter with a gradient on the device (``_apply`` moves gradients too),
    or torch's overwrite / swap conversion modes (``torch.__future__``).
    """
    if (
        torch.__future__.get_overwrite_module_params_on_conversion()
        or torch.__future__.get_swap_module_params_on_conversion()
    ):
        return None
    found = list(_slots(module))
    if any(isinstance(t, torch.nn.Parameter) and t.grad is not None and t.device != CPU for *_, t in found):
        return None
    done: dict[int, torch.Tensor] = {}  # id(device tensor) -> what replaces it (tied tensors stay tied)
    copied, left = 0, {}
    for name, slots, key, tensor in found:
        if tensor.device == CPU:
            continue
        new = done.get(id(tensor))
        if new is None:
            master = masters.get(name)
            if master is not None and master.unchanged(tensor):
                cpu = master.cpu
            elif copy_others:
                copied += _nbytes(tensor)
                with torch.inference_mode(False), torch.no_grad():  # a normal tensor, whatever the masters are
                    cpu = tensor.to(CPU)
            else:
                left[name] = _nbytes(tensor)
                continue
            new = _as_slot(tensor, cpu)
            done[id(tensor)] = new
        slots[key] = new
    return PointedBack(copied, left)


def _as_slot(tensor: torch.Tensor, cpu: torch.Tensor) -> torch.Tensor:
    """What a slot holding ``tensor`` holds once its data is ``cpu``: a parameter stays the same Parameter object
    where torch can swap its data (CPU <-> CUDA), else a new Parameter with its ``requires_grad``, as ``_apply``."""
    if not isinstance(tensor, torch.nn.Parameter):
        return cpu
    if torch._has_compatible_shallow_copy_type(tensor, cpu):
        tensor.data = cpu
        return tensor
    return torch.nn.Parameter(cpu, requires_grad=tensor.requires_grad)


def _repoint_apply(module: torch.nn.Module, masters: dict[str, _Master], *, copy_others: bool) -> PointedBack:
    """:func:`point_back` through ``module._apply`` (which also moves gradients)."""
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(device tensor) -> (it, its master)
    for name, tensor in _named_tensors(module).items():
        master = masters.get(name)
        if master is not None and master.unchanged(tensor):
            targets[id(tensor)] = (tensor, master.cpu)
    copied = 0

    def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal copied
        found = targets.get(id(tensor))
        if found is not None and found[0] is tensor:
            return found[1]
        if tensor.device == CPU or not copy_others:
            return tensor
        copied += _nbytes(tensor)
        with torch.inference_mode(False):  # a copy is a normal tensor, whatever the masters are
            return tensor.to(CPU)

    # _apply swaps param.data where it can (CPU <-> CUDA) and makes new Parameters where it cannot (the fake
    # GPU, torch.__future__ overwrite/swap modes); either way requires_grad and Parameter-ness are kept.
    module._apply(to_cpu)  # type: ignore[no-untyped-call]  # torch leaves _apply untyped
    left = {name: _nbytes(t) for name, t in _named_tensors(module).items() if t.device != CPU}
    return PointedBack(copied, left)


class ModulePart(Part):
    """A plain module: loaded by :func:`stage`, offloaded by :func:`point_back` (see the module docstring).

    Both moves run outside ``torch.inference_mode`` (so the device tensors
    track versions and a module used under inference mode never comes back
    made of inference tensors), except that an offload back to masters that
    are inference tensors runs inside it (torch allows no other way).
    """

    path = "module.to"

    last_move: str | None = "module.to"
    """How the latest move of this part went: ``"module.to"`` (every byte copied) or ``"zero-copy"`` (an offload
    that pointed unchanged tensors back at their CPU masters and copied only the others; see ``copied_bytes``)."""

    copied_bytes: int | None = 0
    """Bytes the latest move of this part copied between devices."""

    last_pinned: bool = False
    """Whether the latest move copied from pinned host memory (a load of pinned masters on a side stream)."""

    last_stream: str | None = None
    """The side stream the latest move copied on (``"cuda:0:side"``), or ``None`` for the current stream."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @property
    def key(self) -> object:
        return self.module

    def tensors(self) -> Iterable[torch.Tensor]:
        return module_tensors(self.module)

    def load(self, device: torch.device) -> None:
        self._load(device, wait=True)

    def prefetch(self, device: torch.device) -> None:
        self._load(device, wait=False)

    def join(self) -> None:
        join(self.module)

    def _load(self, device: torch.device, *, wait: bool) -> None:
        if not self._plain_to():
            self._move_all(device)
            return
        staging = stage(self.module, device, wait=wait)
        self.last_pinned, self.last_stream, self.last_fallback = staging.pinned, staging.stream, staging.fallback
        self.last_move, self.copied_bytes = "module.to", staging.copied

    def load_partial(self, device: torch.device, budget: int | None) -> None:
        """At most ``budget`` bytes resident, the other submodules streamed per forward (see
        :mod:`ondevice.strategies.streaming`); ``budget`` None: what is free on the device now, less room for
        the largest submodule streamed in and a tenth of it for activations."""
        from ondevice.strategies.streaming import largest_unit, stream  # noqa: PLC0415  (it imports this module)

        if not self._plain_to():
            super().load_partial(device, budget)
            return
        if budget is None:
            free = memory_info(device)[0]
            budget = max(0, free - largest_unit(self.module) - free // 10)
        streaming = stream(self.module, device, budget)
        staging = streaming.staging
        self.last_pinned, self.last_stream = staging.pinned, staging.stream
        self.last_move, self.copied_bytes = "streamed", staging.copied
        self.last_fallback = f"{len(streaming.streamed)} submodules streamed per forward (budget {budget:,} bytes)"

    def offload(self) -> None:
        from ondevice.strategies.streaming import unstream  # noqa: PLC0415  (it imports this module)

        streamed = unstream(self.module)  # the resident units back on their masters
        self.last_pinned, self.last_stream, self.last_fallback = False, None, None
        pointed = point_back(self.module) if self._plain_to() else None
        if pointed is None:
            self._move_all(CPU)  # after unstream: copies only what was modified on the device
            if streamed:
                self.last_move = "zero-copy"
        else:
            self.last_move, self.copied_bytes = "zero-copy", pointed.copied

    def is_on(self, device: torch.device) -> bool:
        from ondevice.strategies.streaming import streaming  # noqa: PLC0415  (it imports this module)

        split = streaming(self.module)
        if split is not None:  # streamed units are on the CPU between forwards
            return bool(split.device == device)
        return all_on(self.tensors(), device)

    def _plain_to(self) -> bool:
        """Whether ``module.to`` is torch's own (a class that overrides it may move more than its tensors)."""
        return type(self.module).to is torch.nn.Module.to

    def _move_all(self, device: torch.device) -> None:
        """Today's path: ``module.to(device)``, every byte copied; on a failed load, back to the CPU."""
        self.last_pinned, self.last_stream, self.last_fallback = False, None, None
        self.last_move, self.copied_bytes = "module.to", _bytes_off(self.tensors(), device)
        try:
            with torch.inference_mode(False):
                self.module.to(device)
        except BaseException:
            if device != CPU:
                with torch.inference_mode(False):
                    self.module.to(CPU)
            raise

    def __repr__(self) -> str:
        return f"ModulePart({type(self.module).__name__})"


def _master_of(tensor: torch.Tensor) -> torch.Tensor:
    """A reference to ``tensor``'s CPU data that outlives the load: a parameter moved in place (CPU -> CUDA swaps
    ``param.data``) no longer points at it, so keep an alias of its data; a buffer is replaced, so keep it."""
    return tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor


def _loaded(module: torch.nn.Module, before: dict[str, torch.Tensor], kept: dict[str, _Master]) -> dict[str, _Master]:
    """The masters of ``module``'s device tensors after a load: what was on the CPU ``before`` it (by name), and
    the ``kept`` masters of tensors that were on the device already and are still unchanged."""
    masters: dict[str, _Master] = {}
    unseen = _unversioned_writes(module)
    for name, tensor in _named_tensors(module).items():
        if tensor.device == CPU or name in unseen:
            continue
        cpu = before.get(name)
        if cpu is None:
            master = kept.get(name)
            if master is not None and master.unchanged(tensor):
                masters[name] = master
            continue
        signature = _signature(tensor)
        if signature is not None:  # else the offload cannot tell it unmodified, and copies it
            masters[name] = _Master(cpu, id(tensor), StorageWeakRef(tensor.untyped_storage()), signature)  # type: ignore[no-untyped-call]
    return masters


def _unversioned_writes(module: torch.nn.Module) -> set[str]:
    """Names of the buffers that torch updates without moving their version counter: a batch norm's."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules(remove_duplicate=False)
        if isinstance(sub, torch.nn.modules.batchnorm._NormBase)
        for name in sub._buffers
    }


def _bytes_off(tensors: Iterable[torch.Tensor], device: torch.device) -> int:
    """Bytes of ``tensors`` (each once) not on ``device``: what moving them there copies."""
    return sum(size for here, size in placement(tensors).items() if not _is_on(here, device))


class ModuleStrategy:
    """``torch.nn.Module``: one part, the module itself."""

    def parts(self, component: Any) -> Sequence[ModulePart]:
        return [ModulePart(component)]
