"""Strategies for ComfyUI components, moved through ComfyUI's own machinery.

Loading is ``comfy.model_management.load_models_gpu([patcher], force_full_load=True)``,
exactly as ComfyUI loads a model "straight to GPU".  Offloading pops every
entry of ``current_loaded_models`` whose patcher wraps the same ``nn.Module``
(clones included) and unloads it in the same step, with the patcher's
``offload_device`` pointed at the CPU for that call, so weights land on the
CPU even under ``--highvram`` / ``--gpu-only``.  ``LoadedModel`` is built
by hand only for a partial load within a budget (below), and no unloaded
entry (``model_finalizer is None``) is left in the list.

The fast path (a plain ``ModelPatcher``; path ``"staged"`` in move events):
before ComfyUI's load, ondevice copies every weight that ComfyUI would copy
unchanged to the device itself (:func:`ondevice.strategies.module.stage`:
masters pinned in place, ``non_blocking`` copies on a side stream), so
ComfyUI's load finds them there (its ``module.to`` is then a no-op for them)
and does its bookkeeping (loaded list, ``loaded_size()``, ``model.device``)
and its patching as always.  Weights ComfyUI patches (keys of
``patcher.patches``) and what object patches hide stay on the CPU for it:
ComfyUI backs up the CPU tensor itself (no copy) and computes the patched
weight on the device, so patches never reach the masters.  At exit
(``"zero-copy"``), unchanged device tensors are pointed back at their masters
first (0 bytes device -> host); ComfyUI's unload then restores its patch
backups and copies whatever is left, which is every weight modified in place
on the device outside its patching: such writes are kept (written back).
ComfyUI's own path (``"comfyui"``, ``MoveEvent.reason`` says why) serves a
dynamic-VRAM patcher, ``--novram``, and a model class that overrides ``to``.
Pinning never pins twice what ComfyUI pinned (``tensor.is_pinned()``), and
ComfyUI's ``pin_memory`` refuses what ondevice pinned for the same reason.

Dynamic VRAM (ComfyUI 2026+, ``ModelPatcherDynamic`` over comfy-aimdo): the
patcher is loaded the same way, then its staged weights are locked and
faulted in (:mod:`ondevice.strategies.comfy_dynamic`); at exit the lock is
dropped and ComfyUI's unload frees the pages and its pinned host buffers.

Partial loads (:meth:`PatcherPart.load_partial`: ``budget=``, ``partial=True``)
are ComfyUI's own low-VRAM load: ``LoadedModel.model_load(lowvram_model_memory=budget)``,
registered in ``current_loaded_models`` as ``load_models_gpu`` registers a load
(budget None: ``load_models_gpu`` itself, ComfyUI deciding from the free memory).
The largest modules that fit are loaded; every other module is cast to the
device layer by layer in each forward (``comfy_cast_weights``).  The entry is a
``LoadedModel`` whose ``model_use_more_vram`` never takes ComfyUI's later loads
(a sampler's ``load_models_gpu``) past the budget.  Exit is the same unload:
ComfyUI wipes its cast functions and unpins the host copies it pinned (0.3.75+).

Features are probed (``hasattr``), never version strings: ``detach`` exists
from 2024-12 on; ``LoadedModel.model`` is a weakref property from 2024-12 on
and may be ``None``; ``is_dynamic`` / ``register_load_device`` /
``dynamic_vbars`` exist where ComfyUI has dynamic VRAM.

This module imports ComfyUI; :mod:`ondevice.strategies` imports it lazily,
the first time a ComfyUI object is seen.  Importing it installs the guard
(:func:`install_guard`, in :mod:`ondevice.strategies.comfy_guard`);
:func:`remove_guard` takes it off again.  ComfyUI's loaded-model list is read
through :mod:`ondevice.strategies.comfy_books`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import torch

from ondevice.comfyui import comfyui_lock
from ondevice.devices import CPU
from ondevice.errors import InvalidArgumentError, MissingWeightsError, OnDeviceError
from ondevice.residency import table
from ondevice.scope import count_kept_elsewhere
from ondevice.strategies import Part, clones, register_strategy
from ondevice.strategies.comfy_books import (
    WEAKREF_LOADED_MODEL,
    is_dynamic,
    is_registered,
    registered_entries,
    remove_entry,
)
from ondevice.strategies.comfy_dynamic import fault_in, is_resident, release_vbars, unloading, unlock, vbars
from ondevice.strategies.comfy_guard import install_guard, kept_by_comfyui, reclaim, remove_guard
from ondevice.strategies.module import all_on, join, module_tensors, point_back, stage

__all__ = ["PatcherPart", "install_guard", "is_registered", "registered_entries", "remove_guard"]


# nn.Module -> (patcher, device) of a prefetch whose copies are in flight and whose ComfyUI load waits for join()
_prefetched: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, torch.device]] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------- partial loads (budget=, partial=True)

# nn.Module -> the budget (bytes) of the partial load ondevice made of those weights, None where ComfyUI chose how
# much from the free memory; an entry exists exactly while ondevice holds them loaded that way (weak: ComfyUI owns them)
_partial: weakref.WeakKeyDictionary[torch.nn.Module, int | None] = weakref.WeakKeyDictionary()


class _BudgetedModel(mm.LoadedModel):  # type: ignore[misc]  # ComfyUI is untyped
    """ComfyUI's loaded-model entry for weights ondevice loaded within a budget: ComfyUI never loads past it.

    ComfyUI grows a partially loaded model through ``model_use_more_vram`` (its
    sampler's ``load_models_gpu`` offers the free memory, directly or through
    ``use_more_memory``); this entry takes only what keeps ``loaded_size()``
    within the budget.  A smaller or negative offer (ComfyUI short of room for
    inference) passes unchanged: ComfyUI unloads part, still within the budget.
    """

    def __init__(self, patcher: Any, budget: int) -> None:
        super().__init__(patcher)
        self.budget = budget

    def model_use_more_vram(self, extra_memory: float, *args: Any, **kwargs: Any) -> Any:
        room = self.budget - self.model.loaded_size()
        return super().model_use_more_vram(min(extra_memory, room), *args, **kwargs)


def _load_within(patcher: Any, device: torch.device, budget: int) -> None:
    """ComfyUI's own low-VRAM load of at most ``budget`` bytes, registered as ``load_models_gpu`` registers a load.

    ``LoadedModel.model_load(lowvram_model_memory)`` is the memory-bounded load
    of every ComfyUI version: it loads the largest modules that fit, leaves the
    rest on the CPU with ``comfy_cast_weights`` set (cast to the device per
    forward), and sets ``model_lowvram``, ``model.device`` and ``loaded_size()``.
    """
    if budget > mm.get_free_memory(device):
        mm.free_memory(budget, device)  # guarded: never evicts what live scopes hold
    entry = _BudgetedModel(patcher, budget)
    entry.model_load(budget or 1)  # 1 byte, not 0: ComfyUI reads 0 as "load it all"
    mm.current_loaded_models.insert(0, entry)


def _budget_error(patcher: Any, budget: int, *, dynamic: bool) -> str | None:
    """Why ``budget`` cannot apply to ``patcher``'s load, or ``None``."""
    name = type(patcher.model).__name__
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        return f"budget={budget!r} for {name}: pass a number of bytes >= 0, or None to let ComfyUI choose"
    if dynamic:
        return (
            f"budget={budget!r} does not apply to {name}: it is loaded with ComfyUI's dynamic VRAM (comfy-aimdo), "
            "which pages weights in per use by itself; scope it with partial=True and no budget (ComfyUI's dynamic "
            "load) or whole, or load it with disable_dynamic=True (or start ComfyUI with --disable-dynamic-vram) to "
            "bound it with a budget"
        )
    return None


# ---------------------------------------------------------------------- unloading


def _unload_entry(entry: Any) -> None:
    """Pop ``entry`` from ComfyUI's list and unload it to the CPU, in one step."""
    remove_entry(entry)
    if WEAKREF_LOADED_MODEL and getattr(entry, "model_finalizer", None) is None:
        return  # never loaded, or already unloaded: model_unload() would crash
    patcher = entry.model
    vbar = vbars(patcher).get(entry.device)
    if vbar is not None:
        unlock(vbar)  # ComfyUI's unload frees VBAR pages only above the limit
    with unloading(patcher, entry.device):
        entry.model_unload()


def _detach_to_cpu(patcher: Any) -> None:
    """Move weights that ComfyUI no longer tracks (moved by hand, or a failed unload) back to the CPU."""
    try:
        with unloading(patcher, patcher.load_device):
            if hasattr(patcher, "detach"):
                patcher.detach(unpatch_all=True)
            else:
                patcher.unpatch_model(CPU, unpatch_weights=True)
                patcher.model_patches_to(CPU)
    finally:
        if not all_on(module_tensors(patcher.model), CPU):
            patcher.model.to(CPU)
            patcher.model.device = CPU


class PatcherPart(Part):
    """A ``ModelPatcher``'s weights, moved by ComfyUI.

    ``retarget`` lists ``(object, attribute)`` pairs that must name the scope's
    device while the weights are held (``vae.device``, a ClipVision's
    ``load_device``); :meth:`point_at` sets them and the patcher's
    ``load_device`` (registering the device with a dynamic patcher),
    :meth:`restore` puts the originals back (the patcher's ``load_device``, and
    that of the clones made meanwhile, once no part points it:
    :mod:`ondevice.strategies.clones`).

    On the device means: ComfyUI's loaded list holds the weights for that
    device and every weight is there; for a dynamic patcher, every staged
    weight's VRAM is faulted in and locked (see the module docstring).
    """

    path = "comfyui"

    last_move: str | None = "comfyui"
    """How the latest move went: ``"staged"`` (a load whose weights ondevice copied in before ComfyUI's load),
    ``"zero-copy"`` (an offload that pointed unchanged weights back at their CPU masters), or ``"comfyui"``
    (ComfyUI's own path, every byte copied; ``last_fallback`` says why)."""

    copied_bytes: int | None = None

    def __init__(self, patcher: Any, retarget: Sequence[tuple[object, str]] = ()) -> None:
        self.patcher = patcher
        self._retarget = list(retarget)
        self._saved: list[tuple[object, str, Any]] | None = None  # None: not pointing

    @property
    def key(self) -> object:
        return self.patcher.model

    def tensors(self) -> Iterable[torch.Tensor]:
        return module_tensors(self.patcher.model)

    def nbytes(self) -> int:
        """ComfyUI's own size of the weights, ``model_size()`` (cached by ComfyUI; no walk over the tensors, whose
        storages a dynamic-VRAM load may have replaced)."""
        return int(self.patcher.model_size())

    def resident_nbytes(self, device: torch.device) -> int:
        """ComfyUI's own count of what it loaded, ``loaded_size()`` (a low-VRAM load's cast layers stay on the CPU)."""
        return int(self.patcher.loaded_size()) if self.is_on(device) else 0

    def is_on(self, device: torch.device) -> bool:
        pending = _prefetched.get(self.patcher.model)
        if pending is not None:  # copies in flight; ComfyUI's load (and its patches) follow at join()
            return bool(pending[1] == device)
        if self.patcher.model in _partial:
            return self._partially_on(device, _partial[self.patcher.model])
        if not is_dynamic(self.patcher):
            return is_registered(self.patcher) and all_on(self.tensors(), device)
        # the weights stay CPU tensors; ComfyUI casts them from the VBAR's pages on the device
        return (
            self._registered_on(device)
            and getattr(self.patcher.model, "device", None) == device
            and is_resident(self.patcher, device)
        )

    def _partially_on(self, device: torch.device, budget: int | None) -> bool:
        """Whether ComfyUI holds the weights loaded on ``device``, in part, within ``budget`` (None: any amount)."""
        if not self._registered_on(device) or getattr(self.patcher.model, "device", None) != device:
            return False
        return budget is None or self.patcher.loaded_size() <= budget

    def _patches_loaded(self) -> bool:
        """Whether ComfyUI's loaded entry of the weights has this patcher's patches (not another clone's)."""
        return any(self._same_patches(entry.model) for entry in registered_entries(self.patcher.model))

    def _registered_on(self, device: torch.device) -> bool:
        return any(entry.device == device for entry in registered_entries(self.patcher.model))

    def same_weights(self, other: object) -> bool:
        """Whether ``other`` (a part over the same nn.Module) applies the same patches."""
        patcher = getattr(other, "patcher", None)
        return patcher is None or self._same_patches(patcher)

    def _same_patches(self, patcher: Any) -> bool:
        """Whether ``patcher`` (over the same nn.Module) is this part's, or a clone ComfyUI says has its weights."""
        return patcher is self.patcher or bool(self.patcher.clone_has_same_weights(patcher))

    def load(self, device: torch.device) -> None:
        self._load(device, wait=True)

    def prefetch(self, device: torch.device) -> None:
        """Start the fast path's copies on a side stream; ComfyUI's own load waits for :meth:`join`.

        ComfyUI's load may synchronize the device (0.33.0 does, per module), which would wait for the
        copies, so it runs when a scope claims the weights.  Where the fast path does not apply, a full load.
        """
        if _fast_path_blocker(self.patcher, dynamic=is_dynamic(self.patcher)) is not None:
            self.load(device)
            return
        with comfyui_lock:
            _partial.pop(self.patcher.model, None)  # a full load: a partial one is unloaded first
            try:
                if not self.is_on(device):
                    self._unload_all()
                self._stage(device, wait=False, dynamic=False)
                _prefetched[self.patcher.model] = (self.patcher, device)
            except BaseException:
                self._unload_all()
                raise

    def join(self) -> None:
        """Make the current stream wait for a prefetch's copies, then let ComfyUI load (and patch) the weights."""
        pending = _prefetched.pop(self.patcher.model, None)
        if pending is None:
            return
        patcher, device = pending
        with comfyui_lock:
            try:
                join(patcher.model)
                self._load_through_comfyui(patcher, device, dynamic=False)
            except BaseException:
                self._unload_all()
                raise

    def load_partial(self, device: torch.device, budget: int | None) -> None:
        """Put at most ``budget`` bytes of the weights on ``device``; ComfyUI casts the rest per layer in each forward.

        ComfyUI's own low-VRAM load: the largest modules that fit the budget are
        loaded, every other module with ``comfy_cast_weights`` stays on the CPU and
        is cast to the device layer by layer when it runs, so a forward needs room
        for that working set beside the budget.  ComfyUI's later loads of the
        weights (a sampler's ``load_models_gpu``) never load past the budget.
        ``budget`` None: as much as ComfyUI's ``load_models_gpu`` loads from the
        free memory; the model's size or more: a full load (:meth:`load`).
        :meth:`offload` puts everything on the CPU again (weights, ComfyUI's cast
        functions and pinned host copies included).  A dynamic-VRAM patcher
        streams by itself: ``None`` is ComfyUI's dynamic load, a budget raises
        :class:`~ondevice.errors.InvalidArgumentError` before anything moves.
        On failure everything is left on the CPU and the error raised.
        """
        patcher, model = self.patcher, self.patcher.model
        dynamic = is_dynamic(patcher)
        problem = None if budget is None else _budget_error(patcher, budget, dynamic=dynamic)
        if problem is not None:
            raise InvalidArgumentError(problem)
        with comfyui_lock:
            if model in _partial and _partial[model] == budget and self.is_on(device) and self._patches_loaded():
                return
            if budget is not None and budget >= patcher.model_size():
                self._load(device, wait=True)  # it fits the budget: a full load, on the fast path
                _partial[model] = budget
            else:
                self._load_part(device, budget, dynamic=dynamic)

    def _load_part(self, device: torch.device, budget: int | None, *, dynamic: bool) -> None:
        patcher = self.patcher
        try:
            self._unload_all()  # a full, stale or other-budget load is not reshaped in place
            self._set_comfyui_move(budget, dynamic=dynamic)
            if budget is None:
                mm.load_models_gpu([patcher])  # ComfyUI decides from the free memory, as its samplers do
            else:
                _load_within(patcher, device, budget)
            _partial[patcher.model] = budget
            if not self.is_on(device):
                name = type(patcher.model).__name__
                msg = f"ComfyUI's partial load did not register {name} on {device}; free device memory and retry"
                raise OnDeviceError(msg)
        except BaseException:
            try:
                self._unload_all()
            finally:
                for module in patcher.model.modules():
                    if hasattr(module, "prev_comfy_cast_weights"):  # a low-VRAM load failed before ComfyUI marked it
                        mp.wipe_lowvram_weight(module)  # ComfyUI's unload wipes only a model_lowvram model
            raise

    def _set_comfyui_move(self, budget: int | None, *, dynamic: bool) -> None:
        amount = "as much as ComfyUI chooses" if budget is None else f"at most {budget:,} bytes"
        path = "dynamic VRAM (comfy-aimdo)" if dynamic else "low-VRAM path"
        self.last_pinned, self.last_stream, self.copied_bytes = False, None, None
        self.last_move, self.last_fallback = "comfyui", f"partial load ({amount}): ComfyUI's {path}"

    def _load(self, device: torch.device, *, wait: bool) -> None:
        dynamic = is_dynamic(self.patcher)
        with comfyui_lock:
            _partial.pop(self.patcher.model, None)  # a full load now: is_on asks for every weight again
            try:
                if dynamic:
                    self._unload_all(keep=device)  # ComfyUI's reload reuses pages still resident here
                elif not self.is_on(device):
                    self._unload_all()  # a partial (lowvram) or stale load is not upgraded in place
                self._stage(device, wait=wait, dynamic=dynamic)
                self._load_through_comfyui(self.patcher, device, dynamic=dynamic)
            except BaseException:
                self._unload_all()
                raise

    def _load_through_comfyui(self, patcher: Any, device: torch.device, *, dynamic: bool) -> None:
        mm.load_models_gpu([patcher], force_full_load=not dynamic)
        if dynamic:
            fault_in(patcher, device)
        if not self.is_on(device):
            raise OnDeviceError(self._not_loaded_message(device))

    def _stage(self, device: torch.device, *, wait: bool, dynamic: bool) -> None:
        """Copy the weights ComfyUI's load would copy unchanged onto ``device`` first, from pinned masters.

        ComfyUI's ``load_models_gpu`` then finds them there (its ``module.to`` is a no-op for them) and does
        its bookkeeping (loaded list, ``loaded_size``, ``model.device``) and its patches as always.  Weights
        ComfyUI patches stay on the CPU: it backs up the CPU tensor itself (no copy) and computes the patched
        weight on the device.
        """
        self.last_pinned, self.last_stream, self.copied_bytes = False, None, None
        self.last_move, self.last_fallback = "comfyui", _fast_path_blocker(self.patcher, dynamic=dynamic)
        if self.last_fallback is not None:
            return
        unpin_all_weights = getattr(self.patcher, "unpin_all_weights", None)
        if callable(unpin_all_weights):
            unpin_all_weights()  # what ComfyUI pinned itself (0.3.75+), as its own full load does weight by weight
        skip = _left_to_comfyui(self.patcher)
        _make_room(self.patcher.model, device, skip)
        staging = stage(self.patcher.model, device, skip=skip, wait=wait)
        self.last_move, self.copied_bytes = "staged", staging.copied
        self.last_pinned, self.last_stream, self.last_fallback = staging.pinned, staging.stream, staging.fallback

    def offload(self) -> None:
        self.last_pinned, self.last_stream, self.last_fallback = False, None, None
        with comfyui_lock:
            model = self.patcher.model
            _prefetched.pop(model, None)  # a prefetch no scope claimed: point_back waits for its copies
            pointed = point_back(model, copy_others=False)  # ComfyUI's unload then moves only what is left
            copied = None if pointed is None else _bytes_comfyui_copies(self.patcher, pointed.left)
            self._unload_all()
        self.last_move, self.copied_bytes = ("comfyui", None) if copied is None else ("zero-copy", copied)

    def _not_loaded_message(self, device: torch.device) -> str:
        name = type(self.patcher.model).__name__
        if mm.vram_state == mm.VRAMState.NO_VRAM:
            return (
                f"ComfyUI runs with --novram (VRAMState.NO_VRAM), so it loads {name} layer by layer and never "
                f"wholly onto {device}; start ComfyUI without --novram to hold components on the GPU"
            )
        return f"ComfyUI did not fully load {name} onto {device}; free device memory or pass a smaller model"

    def _unload_all(self, keep: torch.device | None = None) -> None:
        """Unload every ComfyUI entry of the weights to the CPU; with ``keep``, all but that device's."""
        patcher = self.patcher
        try:
            for entry in registered_entries(patcher.model):
                if entry.device != keep:
                    _unload_entry(entry)
        finally:
            try:
                release_vbars(patcher, keep)
            finally:
                if keep is None:
                    _partial.pop(patcher.model, None)
                    self._settle_on_cpu()
                mm.soft_empty_cache()

    def _settle_on_cpu(self) -> None:
        patcher = self.patcher
        point_back(patcher.model, copy_others=False)  # weights an object patch hid from ComfyUI's unload
        if not all_on(self.tensors(), CPU):
            _detach_to_cpu(patcher)
        if getattr(patcher.model, "device", CPU) != CPU:
            patcher.model.device = CPU  # a dynamic patcher's unpatch_model ignores its device_to

    def point_at(self, device: torch.device) -> None:
        """Point the patcher's ``load_device`` (and the retarget attributes) at ``device``; originals are kept.

        A dynamic patcher keeps per-device state (``model.dynamic_pins``) that
        its own ``register_load_device`` creates; ComfyUI's device-selector
        nodes call it in the same way before they retarget a patcher.
        """
        register_load_device = getattr(self.patcher, "register_load_device", None)
        if callable(register_load_device):
            register_load_device(device)
        if self._saved is None:
            self._saved = [(obj, name, getattr(obj, name)) for obj, name in self._retarget]
            clones.point(self.patcher, device)  # load_device, counted per patcher (see ondevice.strategies.clones)
        for obj, name in self._retarget:
            setattr(obj, name, device)

    def restore(self) -> None:
        """Put back what :meth:`point_at` changed; the patcher's ``load_device`` (and its clones') once no part
        points it any more (:mod:`ondevice.strategies.clones`)."""
        saved, self._saved = self._saved, None
        for obj, name, value in saved or ():
            setattr(obj, name, value)
        if saved is not None:
            clones.unpoint(self.patcher)

    def __repr__(self) -> str:
        return f"PatcherPart({type(self.patcher.model).__name__})"


def _fast_path_blocker(patcher: Any, *, dynamic: bool) -> str | None:
    """Why ondevice leaves every copy of ``patcher``'s load to ComfyUI, or ``None`` where it stages them."""
    if dynamic:
        return "dynamic VRAM (comfy-aimdo): ComfyUI stages the weights in its VBAR itself"
    if mm.vram_state == mm.VRAMState.NO_VRAM:
        return "ComfyUI runs with --novram: it loads layer by layer"
    if type(patcher.model).to is not torch.nn.Module.to:
        return f"{type(patcher.model).__name__} overrides to(): moved by ComfyUI only"
    return None


def _make_room(model: torch.nn.Module, device: torch.device, skip: frozenset[str]) -> None:
    """Let ComfyUI evict what it keeps loaded but no scope holds, as its own load would, before ondevice copies."""
    named: dict[str, torch.Tensor] = dict(model.named_parameters())
    named.update(model.named_buffers())
    need = sum(t.numel() * t.element_size() for name, t in named.items() if t.device == CPU and name not in skip)
    if need and need > mm.get_free_memory(device):
        mm.free_memory(need, device)  # guarded: never evicts what live scopes hold


def _left_to_comfyui(patcher: Any) -> frozenset[str]:
    """Names ComfyUI must move itself: weights it patches, and what object patches replace or hide."""
    patched = set(getattr(patcher, "patches", {}) or {})
    hidden = tuple(f"{name}." for name in getattr(patcher, "object_patches", {}) or {})
    if hidden:
        names = [*(n for n, _ in patcher.model.named_parameters()), *(n for n, _ in patcher.model.named_buffers())]
        patched.update(name for name in names if name.startswith(hidden))
    return frozenset(patched)


def _bytes_comfyui_copies(patcher: Any, left: dict[str, int]) -> int:
    """Bytes ComfyUI's unload will copy to the CPU: what :func:`point_back` ``left``, but weights it restores from
    its backups."""
    backup = getattr(patcher, "backup", {}) or {}
    return sum(nbytes for name, nbytes in left.items() if name not in backup)


class PatcherStrategy:
    """A ``ModelPatcher`` (diffusion model, GLIGEN, any patcher): itself."""

    def parts(self, component: Any) -> Sequence[PatcherPart]:
        return [PatcherPart(component)]


class VAEStrategy:
    """``comfy.sd.VAE``: its ``patcher``; ``vae.device`` follows the scope's device."""

    def parts(self, component: Any) -> Sequence[PatcherPart]:
        patcher = getattr(component, "patcher", None)
        if patcher is None:
            msg = (
                "this VAE has no weights (ComfyUI logged 'No VAE weights detected' and built no patcher); "
                "load a checkpoint or VAE file that contains VAE weights"
            )
            raise MissingWeightsError(msg)
        return [PatcherPart(patcher, retarget=[(component, "device")])]


class CLIPStrategy:
    """``comfy.sd.CLIP``: its ``patcher``."""

    def parts(self, component: Any) -> Sequence[PatcherPart]:
        patcher = getattr(component, "patcher", None)
        if patcher is None:
            msg = "this CLIP has no patcher (built with no_init=True and never given one); pass a loaded CLIP"
            raise MissingWeightsError(msg)
        return [PatcherPart(patcher)]


class ClipVisionStrategy:
    """``comfy.clip_vision.ClipVisionModel``: its ``patcher`` (and ``naf`` where present)."""

    def parts(self, component: Any) -> Sequence[PatcherPart]:
        parts = [PatcherPart(component.patcher, retarget=[(component, "load_device")])]
        naf = getattr(component, "naf", None)
        if naf is not None:
            parts.append(PatcherPart(naf))
        return parts


class ControlNetStrategy:
    """``comfy.controlnet.ControlBase``: the patchers of ``get_models()`` (the whole chain)."""

    def parts(self, component: Any) -> Sequence[PatcherPart]:
        models = list(component.get_models())
        if not models:
            msg = (
                f"this {type(component).__name__} has no ModelPatcher to move (ControlLora and T2IAdapter "
                "move their own weights during sampling); pass a ControlNet loaded with weights"
            )
            raise MissingWeightsError(msg)
        return [PatcherPart(p) for p in models]


def _register() -> None:
    import comfy.clip_vision  # noqa: PLC0415
    import comfy.controlnet  # noqa: PLC0415
    import comfy.sd  # noqa: PLC0415

    register_strategy(mp.ModelPatcher, PatcherStrategy())
    register_strategy(comfy.sd.VAE, VAEStrategy())
    register_strategy(comfy.sd.CLIP, CLIPStrategy())
    register_strategy(comfy.clip_vision.ClipVisionModel, ClipVisionStrategy())
    register_strategy(comfy.controlnet.ControlBase, ControlNetStrategy())
    count_kept_elsewhere(kept_by_comfyui)  # what ComfyUI keeps loaded is not memory a scope left behind
    table.add_reclaimer(reclaim)
    install_guard()


_register()
