"""Strategies for ComfyUI components, moved through ComfyUI's own machinery.

Loading is ``comfy.model_management.load_models_gpu([patcher], force_full_load=True)``,
exactly as ComfyUI loads a model "straight to GPU".  Offloading pops every
entry of ``current_loaded_models`` whose patcher wraps the same ``nn.Module``
(clones included) and unloads it in the same step, with the patcher's
``offload_device`` pointed at the CPU for that call, so weights land on the
CPU even under ``--highvram`` / ``--gpu-only``.  ``LoadedModel`` is never
built by hand and no unloaded entry (``model_finalizer is None``) is left
in the list.

Features are probed (``hasattr``), never version strings: ``detach`` exists
from 2024-12 on; ``LoadedModel.model`` is a weakref property from 2024-12 on
and may be ``None``; ``ModelPatcherDynamic`` (2026) must not be force-loaded.

This module imports ComfyUI; :mod:`ondevice.strategies` imports it lazily,
the first time a ComfyUI object is seen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import torch

from ondevice.devices import CPU
from ondevice.errors import MissingWeightsError, OnDeviceError
from ondevice.residency import table
from ondevice.strategies import register_strategy
from ondevice.strategies.module import all_on, module_tensors

__all__ = ["PatcherPart", "is_registered", "registered_entries"]

_WEAKREF_LOADED_MODEL = isinstance(getattr(mm.LoadedModel, "model", None), property)


def _is_dynamic(patcher: Any) -> bool:
    is_dynamic = getattr(patcher, "is_dynamic", None)
    return bool(is_dynamic()) if callable(is_dynamic) else False


def registered_entries(weights: object) -> list[Any]:
    """The ``current_loaded_models`` entries whose patcher wraps ``weights`` (a copy, safe to mutate)."""
    out = []
    for entry in list(mm.current_loaded_models):
        patcher = entry.model  # None once a weakly held patcher was collected
        if patcher is not None and getattr(patcher, "model", None) is weights:
            out.append(entry)
    return out


def is_registered(patcher: Any) -> bool:
    """True when ComfyUI's loaded-model list holds an entry for ``patcher``'s weights."""
    return bool(registered_entries(patcher.model))


def _remove_entry(entry: Any) -> None:
    models = mm.current_loaded_models
    for index, other in enumerate(models):
        if other is entry:  # by identity: LoadedModel.__eq__ compares patchers
            del models[index]
            return


@contextmanager
def _offload_device(patcher: Any, device: torch.device) -> Iterator[None]:
    saved = patcher.offload_device
    patcher.offload_device = device
    try:
        yield
    finally:
        patcher.offload_device = saved


def _unload_entry(entry: Any) -> None:
    """Pop ``entry`` from ComfyUI's list and unload it to the CPU, in one step."""
    _remove_entry(entry)
    if _WEAKREF_LOADED_MODEL and getattr(entry, "model_finalizer", None) is None:
        return  # never loaded, or already unloaded: model_unload() would crash
    patcher = entry.model
    with _offload_device(patcher, CPU):
        entry.model_unload()


def _detach_to_cpu(patcher: Any) -> None:
    """Move weights that ComfyUI no longer tracks (moved by hand, or a failed unload) back to the CPU."""
    try:
        with _offload_device(patcher, CPU):
            if hasattr(patcher, "detach"):
                patcher.detach(unpatch_all=True)
            else:
                patcher.unpatch_model(CPU, unpatch_weights=True)
                patcher.model_patches_to(CPU)
    finally:
        if not all_on(module_tensors(patcher.model), CPU):
            patcher.model.to(CPU)
            patcher.model.device = CPU


class PatcherPart:
    """A ``ModelPatcher``'s weights, moved by ComfyUI.

    ``retarget`` lists ``(object, attribute)`` pairs that must name the scope's
    device while the weights are held (``vae.device``, a ClipVision's
    ``load_device``); :meth:`point_at` sets them and the patcher's
    ``load_device``, :meth:`restore` puts the originals back.
    """

    def __init__(self, patcher: Any, retarget: Sequence[tuple[object, str]] = ()) -> None:
        self.patcher = patcher
        self._retarget = [(patcher, "load_device"), *retarget]
        self._saved: list[tuple[object, str, Any]] | None = None

    @property
    def key(self) -> object:
        return self.patcher.model

    def tensors(self) -> Iterable[torch.Tensor]:
        return module_tensors(self.patcher.model)

    def is_on(self, device: torch.device) -> bool:
        if not is_registered(self.patcher):
            return False
        # a dynamic (comfy-aimdo) patcher faults weights in lazily: registered is as loaded as it gets
        return _is_dynamic(self.patcher) or all_on(self.tensors(), device)

    def same_weights(self, other: object) -> bool:
        """Whether ``other`` (a part over the same nn.Module) applies the same patches."""
        patcher = getattr(other, "patcher", None)
        if patcher is None or patcher is self.patcher:
            return True
        return bool(self.patcher.clone_has_same_weights(patcher))

    def load(self, device: torch.device) -> None:
        try:
            if not self.is_on(device):
                self._unload_all()  # a partial (lowvram) or stale load is not upgraded in place
            mm.load_models_gpu([self.patcher], force_full_load=not _is_dynamic(self.patcher))
            if not _is_dynamic(self.patcher) and not self.is_on(device):
                raise OnDeviceError(self._not_loaded_message(device))
        except BaseException:
            self._unload_all()
            raise

    def offload(self) -> None:
        self._unload_all()

    def _not_loaded_message(self, device: torch.device) -> str:
        name = type(self.patcher.model).__name__
        if mm.vram_state == mm.VRAMState.NO_VRAM:
            return (
                f"ComfyUI runs with --novram (VRAMState.NO_VRAM), so it loads {name} layer by layer and never "
                f"wholly onto {device}; start ComfyUI without --novram to hold components on the GPU"
            )
        return f"ComfyUI did not fully load {name} onto {device}; free device memory or pass a smaller model"

    def _unload_all(self) -> None:
        try:
            for entry in registered_entries(self.patcher.model):
                _unload_entry(entry)
        finally:
            if not all_on(self.tensors(), CPU):
                _detach_to_cpu(self.patcher)
            mm.soft_empty_cache()

    def point_at(self, device: torch.device) -> None:
        """Point the patcher's ``load_device`` (and the retarget attributes) at ``device``; originals are kept."""
        if self._saved is None:
            self._saved = [(obj, name, getattr(obj, name)) for obj, name in self._retarget]
        for obj, name in self._retarget:
            setattr(obj, name, device)

    def restore(self) -> None:
        """Put back what :meth:`point_at` changed."""
        saved, self._saved = self._saved, None
        for obj, name, value in saved or ():
            setattr(obj, name, value)

    def __repr__(self) -> str:
        return f"PatcherPart({type(self.patcher.model).__name__})"


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


def _held_entries() -> list[Any]:
    """ComfyUI's entries for every weight a live scope holds."""
    return [entry for holding in table.held() if not holding.forced_off for entry in registered_entries(holding.key)]


def _guard_comfyui() -> None:
    """Make ComfyUI's own memory management respect live scopes, and serialize it with ondevice's moves.

    ``free_memory`` (which ``load_models_gpu``, ``unload_all_models``, ``vae.decode``
    ... call to make room) gets every held entry added to its ``keep_loaded``, so
    ComfyUI never evicts what a scope holds; both functions take the residency
    table's lock, because ComfyUI's loaded-model list has none.  This is the one
    place ondevice wraps ComfyUI functions; ``keep_loaded`` is ComfyUI's own
    mechanism, its callers just do not know what ondevice holds.
    """
    free_memory, load_models_gpu = mm.free_memory, mm.load_models_gpu
    if getattr(free_memory, "__ondevice_guard__", False):
        return

    @functools.wraps(free_memory)
    def guarded_free_memory(memory_required: Any, device: Any, keep_loaded: Any = (), *args: Any, **kwargs: Any) -> Any:
        with table.lock:
            keep = [*keep_loaded, *_held_entries()]
            return free_memory(memory_required, device, keep, *args, **kwargs)

    @functools.wraps(load_models_gpu)
    def guarded_load_models_gpu(*args: Any, **kwargs: Any) -> Any:
        with table.lock:
            return load_models_gpu(*args, **kwargs)

    for guard in (guarded_free_memory, guarded_load_models_gpu):
        guard.__ondevice_guard__ = True  # type: ignore[attr-defined]
    mm.free_memory, mm.load_models_gpu = guarded_free_memory, guarded_load_models_gpu


def _register() -> None:
    import comfy.clip_vision  # noqa: PLC0415
    import comfy.controlnet  # noqa: PLC0415
    import comfy.sd  # noqa: PLC0415

    register_strategy(mp.ModelPatcher, PatcherStrategy())
    register_strategy(comfy.sd.VAE, VAEStrategy())
    register_strategy(comfy.sd.CLIP, CLIPStrategy())
    register_strategy(comfy.clip_vision.ClipVisionModel, ClipVisionStrategy())
    register_strategy(comfy.controlnet.ControlBase, ControlNetStrategy())
    _guard_comfyui()


_register()
