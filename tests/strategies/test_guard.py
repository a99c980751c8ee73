"""The guard on ComfyUI's free_memory / load_models_gpu: installed once, removed exactly, arguments passed through."""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.strategies.comfy import install_guard, registered_entries, remove_guard
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def is_guard(function: object) -> bool:
    return bool(getattr(function, "__ondevice_guard__", False))


@pytest.fixture
def originals() -> Iterator[dict[str, Callable[..., Any]]]:
    """ComfyUI's own two functions; the guard is installed again after the test, whatever it did."""
    install_guard()
    found = {name: getattr(mm, name).__wrapped__ for name in ("free_memory", "load_models_gpu")}
    clone = mp.ModelPatcher.clone.__wrapped__
    try:
        yield {**found, "clone": clone}
    finally:
        remove_guard()
        for name, function in found.items():
            setattr(mm, name, function)
        mp.ModelPatcher.clone = clone
        install_guard()


@pytest.fixture
def node_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module in sys.modules, as a custom node pack that imports functions by name would be."""
    module = types.ModuleType("ondevice_test_custom_node")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_the_guard_is_installed_once(originals: dict[str, Callable[..., Any]]) -> None:
    """Importing the strategies installed the guard; installing again changes nothing."""
    guards = (mm.free_memory, mm.load_models_gpu)
    assert all(is_guard(g) for g in guards)
    install_guard()
    install_guard()
    assert (mm.free_memory, mm.load_models_gpu) == guards
    assert mm.free_memory.__wrapped__ is originals["free_memory"]


def test_remove_restores_exactly_the_originals(originals: dict[str, Callable[..., Any]]) -> None:
    """remove_guard() puts ComfyUI's own functions back (twice is fine); install_guard() guards them again."""
    remove_guard()
    assert mm.free_memory is originals["free_memory"]
    assert mm.load_models_gpu is originals["load_models_gpu"]
    assert mp.ModelPatcher.clone is originals["clone"]
    remove_guard()
    assert mm.free_memory is originals["free_memory"]
    install_guard()
    assert is_guard(mm.free_memory) and mm.free_memory.__wrapped__ is originals["free_memory"]
    assert is_guard(mm.load_models_gpu) and mm.load_models_gpu.__wrapped__ is originals["load_models_gpu"]
    assert is_guard(mp.ModelPatcher.clone) and mp.ModelPatcher.clone.__wrapped__ is originals["clone"]


def test_copies_imported_by_name_are_guarded_and_restored(
    originals: dict[str, Callable[..., Any]], node_module: types.ModuleType
) -> None:
    """A copy imported before the guard is guarded by install, one imported after it is restored by remove."""
    remove_guard()
    node_module.free_memory = mm.free_memory  # imported by name before the guard
    install_guard()
    assert node_module.free_memory is mm.free_memory and is_guard(node_module.free_memory)
    node_module.load_models_gpu = mm.load_models_gpu  # imported by name while guarded
    remove_guard()
    assert node_module.free_memory is originals["free_memory"]
    assert node_module.load_models_gpu is originals["load_models_gpu"]


def test_remove_leaves_someone_elses_wrapper(originals: dict[str, Callable[..., Any]]) -> None:
    """A wrapper put over the guard by someone else survives remove_guard (it still calls the guard)."""
    guard = mm.free_memory

    def theirs(*args: Any, **kwargs: Any) -> Any:
        return guard(*args, **kwargs)

    mm.free_memory = theirs
    remove_guard()
    assert mm.free_memory is theirs
    assert mm.load_models_gpu is originals["load_models_gpu"]


def _extra_parameters() -> list[str]:
    """free_memory's parameters after (memory_required, device, keep_loaded) in this ComfyUI."""
    names = list(inspect.signature(mm.free_memory.__wrapped__).parameters)
    return names[3:]


def test_free_memory_arguments_pass_through(
    originals: dict[str, Callable[..., Any]], monkeypatch: pytest.MonkeyPatch, fake_gpu: FakeGPU
) -> None:
    """Every free_memory argument reaches ComfyUI's own (0.33.0: for_dynamic, pins_required, ram_required)."""
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def recorder(*args: Any, **kwargs: Any) -> list[Any]:
        calls.append((args, kwargs))
        return []

    remove_guard()
    monkeypatch.setattr(mm, "free_memory", recorder)
    install_guard()
    extra = {name: object() for name in _extra_parameters()}
    mm.free_memory(123, fake_gpu.device, [], **extra)
    mm.free_memory(456, fake_gpu.device)
    assert calls == [((123, fake_gpu.device, []), extra), ((456, fake_gpu.device, []), {})]
    remove_guard()


@pytest.mark.skipif("for_dynamic" not in _extra_parameters(), reason="this ComfyUI's free_memory has no for_dynamic")
def test_free_memory_keeps_its_dynamic_signature() -> None:
    """On ComfyUI with dynamic VRAM the guard still shows free_memory's own parameters (inspect.signature)."""
    names = list(inspect.signature(mm.free_memory).parameters)
    assert names[-3:] == ["for_dynamic", "pins_required", "ram_required"]


def test_the_guard_keeps_held_entries_and_its_removal_does_not(
    originals: dict[str, Callable[..., Any]], fake_gpu: FakeGPU, sd15: ondevice.Checkpoint
) -> None:
    """With the guard ComfyUI cannot evict a held model; without it, it can, and scope.ensure() loads it back."""
    with on_gpu(sd15.vae) as scope:
        mm.free_memory(1e30, scope.device)
        assert set(ondevice.placement(sd15.vae)) == {scope.device}
        remove_guard()
        mm.free_memory(1e30, scope.device)
        assert set(ondevice.placement(sd15.vae)) == {CPU}
        scope.ensure()
        with on_gpu(sd15.vae):
            assert set(ondevice.placement(sd15.vae)) == {scope.device}
            assert registered_entries(sd15.vae.patcher.model)
    assert set(ondevice.placement(sd15.vae)) == {CPU}
