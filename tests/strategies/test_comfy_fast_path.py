"""The ComfyUI fast path (pinned masters staged before ComfyUI's load, zero-copy offload) against ComfyUI's own path.

Every output inside a scope is compared bit for bit with the same work done by ComfyUI alone
(``load_models_gpu(force_full_load=True)`` on the same fake GPU); byte counts come from the fake GPU's
copy counters, never from hard-coded sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice import pinning as ondevice_pinning
from ondevice.strategies.comfy import PatcherPart, registered_entries
from ondevice.testing import FakeGPU, capture_moves, fake_gpu
from tests.strategies._lora import lora_clone
from tests.strategies._steps import comfyui_alone, unet_forward, vae_decode

CPU = torch.device("cpu")

# ---------------------------------------------------------------------- helpers


def tensors(patcher: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the patcher's weights, by name."""
    named: dict[str, torch.Tensor] = dict(patcher.model.named_parameters())
    named.update(patcher.model.named_buffers())
    return named


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Originals:
    """The CPU tensors a model has now: by reference, and a copy of their values."""

    def __init__(self, patcher: Any) -> None:
        self.refs = tensors(patcher)
        assert {t.device for t in self.refs.values()} == {CPU}
        self.values = {name: t.detach().clone() for name, t in self.refs.items()}

    def assert_back(self, patcher: Any, *, except_: frozenset[str] = frozenset()) -> None:
        """Every tensor of ``patcher`` is on the CPU with its original value, and no original was written."""
        now = tensors(patcher)
        assert {name for name, t in now.items() if t.device != CPU} == set()
        written = [name for name, t in self.refs.items() if not torch.equal(t, self.values[name])]
        assert written == [], "patches or writes reached the CPU tensors the model had before the scope"
        changed = [name for name, t in now.items() if name not in except_ and not torch.equal(t, self.values[name])]
        assert changed == []


_expected: dict[str, torch.Tensor] = {}


def expected_forward(name: str, patcher: Any, gpu: FakeGPU) -> torch.Tensor:
    """ComfyUI's own UNet output for ``patcher`` (computed once per module and name)."""
    if name not in _expected:
        _expected[name] = comfyui_alone(
            patcher, gpu.device, lambda: unet_forward(patcher, gpu.device), force_full_load=True
        )
    return _expected[name]


def entries_of(patcher: Any) -> list[Any]:
    return [e for e in mm.current_loaded_models if e.model is not None and e.model.model is patcher.model]


def assert_comfyui_books(patcher: Any, device: torch.device) -> None:
    """ComfyUI's bookkeeping says the weights are fully loaded on ``device``."""
    [entry] = entries_of(patcher)
    assert entry.device == device
    assert patcher.loaded_size() == patcher.model_size()
    assert patcher.model.device == device
    assert not getattr(patcher.model, "model_lowvram", False)
    assert {t.device for t in tensors(patcher).values()} == {device}


@pytest.fixture
def no_pins(sd15: ondevice.Checkpoint) -> Iterator[None]:
    """The UNet's CPU tensors not pinned by ondevice (earlier tests pinned the masters); unpinned again after."""
    ondevice_pinning.unpin(sd15.model.model)
    yield
    ondevice_pinning.unpin(sd15.model.model)


# ---------------------------------------------------------------------- 1. unmodified weights


def test_unmodified_weights_zero_copy_exit_and_identical_outputs(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """Unmodified weights: exit copies 0 bytes, memory at baseline, ComfyUI's books consistent, UNet bit-identical."""
    model = sd15.model
    expected = expected_forward("base", model, fake_gpu)
    originals = Originals(model)
    base, to_device = fake_gpu.memory_allocated(), fake_gpu.bytes_to_device
    with on_gpu(model) as scope:  # no move listener: a listener synchronizes the device, hiding a missing wait
        assert fake_gpu.bytes_to_device - to_device == model.model_size()  # each byte once: ComfyUI copied none
        assert_comfyui_books(model, scope.device)
        got = unet_forward(model, scope.device)
        to_cpu = fake_gpu.bytes_to_cpu
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert fake_gpu.memory_allocated() == base
    assert torch.equal(got, expected)
    originals.assert_back(model)
    assert all(tensors(model)[n].data_ptr() == t.data_ptr() for n, t in originals.refs.items())  # the masters
    assert not entries_of(model)
    with capture_moves() as moves, on_gpu(model):
        pass
    assert [(m.path, m.copied) for m in moves] == [("staged", model.model_size()), ("zero-copy", 0)]


def test_vae_decode_inside_is_bit_identical(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """ComfyUI's own vae.decode inside on_gpu(vae) equals its decode without ondevice; exit copies 0 bytes."""
    vae = sd15.vae
    saved = vae.device, vae.patcher.load_device
    vae.device = vae.patcher.load_device = fake_gpu.device
    try:
        expected = vae_decode(vae)  # ComfyUI loads the VAE itself
    finally:
        mm.unload_all_models()
        vae.device, vae.patcher.load_device = saved
    originals = Originals(vae.patcher)
    base = fake_gpu.memory_allocated()
    with on_gpu(vae) as scope:
        assert_comfyui_books(vae.patcher, scope.device)
        got = vae_decode(vae)
        to_cpu = fake_gpu.bytes_to_cpu
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert fake_gpu.memory_allocated() == base
    assert torch.equal(got, expected)
    originals.assert_back(vae.patcher)


# ---------------------------------------------------------------------- 2. LoRA-style patches


def test_lora_clone_matches_comfyui_and_never_touches_the_masters(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A LoRA + diff clone: outputs equal ComfyUI's own; patches never reach the CPU tensors; originals after."""
    clone = lora_clone(sd15.model)
    expected = expected_forward("lora", clone, fake_gpu)
    assert not torch.equal(expected, expected_forward("base", sd15.model, fake_gpu))  # the patches change outputs
    originals = Originals(clone)
    base, to_cpu = fake_gpu.memory_allocated(), fake_gpu.bytes_to_cpu
    with on_gpu(clone) as scope:
        assert fake_gpu.bytes_to_cpu == to_cpu  # ComfyUI's backups are the CPU tensors, not copies of staged ones
        assert_comfyui_books(clone, scope.device)
        patched = {key: tensors(clone)[key].cpu() for key in clone.patches}
        assert all(not torch.equal(patched[key], originals.values[key]) for key in clone.patches)
        got = unet_forward(clone, scope.device)
        to_cpu = fake_gpu.bytes_to_cpu
    assert torch.equal(got, expected)
    assert fake_gpu.bytes_to_cpu == to_cpu  # ComfyUI restores patched weights from its CPU backups
    assert fake_gpu.memory_allocated() == base
    originals.assert_back(clone)
    originals.assert_back(sd15.model)


@pytest.mark.parametrize("outer", ["base", "lora"])
def test_base_and_lora_clone_nested(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, outer: str) -> None:
    """Base and LoRA clone nested either way: each scope computes with its own weights; originals after."""
    patchers = {"base": sd15.model, "lora": lora_clone(sd15.model)}
    expected = {name: expected_forward(name, p, fake_gpu) for name, p in patchers.items()}
    inner = "lora" if outer == "base" else "base"
    originals = Originals(sd15.model)
    base = fake_gpu.memory_allocated()
    with on_gpu(patchers[outer]) as scope:
        assert torch.equal(unet_forward(patchers[outer], scope.device), expected[outer])
        with on_gpu(patchers[inner]):
            assert torch.equal(unet_forward(patchers[inner], scope.device), expected[inner])
        assert torch.equal(unet_forward(patchers[outer], scope.device), expected[outer])
    assert fake_gpu.memory_allocated() == base
    originals.assert_back(sd15.model)
    assert not entries_of(sd15.model)


# ---------------------------------------------------------------------- 3. in-place modification on the device


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_weight_modified_in_place_is_written_back(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, mode: Callable[[], Any]
) -> None:
    """param.add_(1) on the device inside the scope: the CPU gets the new value, and only its bytes are copied."""
    model = sd15.model
    name = next(n for n, p in model.model.named_parameters() if p.dim() == 4 and n not in model.patches)
    originals = Originals(model)
    try:
        with on_gpu(model):
            with mode():
                tensors(model)[name].add_(1)
            modified = tensors(model)[name].cpu()
            to_cpu = fake_gpu.bytes_to_cpu
        assert fake_gpu.bytes_to_cpu - to_cpu == nbytes(modified)
        assert torch.equal(tensors(model)[name], modified)
        assert torch.equal(modified, originals.values[name] + 1)
        assert torch.equal(originals.refs[name], originals.values[name])  # the master itself was not written
        originals.assert_back(model, except_=frozenset({name}))
    finally:
        with torch.no_grad():
            tensors(model)[name].copy_(originals.values[name])  # the module's checkpoint, shared by later tests


# ---------------------------------------------------------------------- 4. the pinned-memory cap


def test_pinned_cap_falls_back_to_pageable_copies(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, no_pins: None) -> None:
    """set_pinned_limit(0): pageable copies, reported in the move event; outputs identical; exit copies 0 bytes."""
    model = sd15.model
    expected = expected_forward("base", model, fake_gpu)
    originals = Originals(model)
    limit = ondevice_pinning.pinned_limit()
    ondevice_pinning.set_pinned_limit(0)
    try:
        pinned, host = fake_gpu.bytes_to_device_pinned, fake_gpu.pinned_bytes()
        with capture_moves() as moves, on_gpu(model) as scope:
            assert (fake_gpu.bytes_to_device_pinned, fake_gpu.pinned_bytes()) == (pinned, host)
            got = unet_forward(model, scope.device)
            to_cpu = fake_gpu.bytes_to_cpu
    finally:
        ondevice_pinning.set_pinned_limit(limit)
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert torch.equal(got, expected)
    assert not any(t.is_pinned() for t in originals.refs.values())
    assert all(tensors(model)[n].data_ptr() == t.data_ptr() for n, t in originals.refs.items())  # zero-copy still
    [load] = [m for m in moves if m.target != CPU]
    assert load.pinned is False
    assert "limit" in (load.reason or ""), f"the event does not say why the copies were pageable: {load}"


# ---------------------------------------------------------------------- 5. object patches


def object_patched_clone(patcher: Any) -> Any:
    """A clone with a new model_sampling (as the ModelSampling nodes add) and a replaced output block."""
    clone = patcher.clone()
    sampling = copy.deepcopy(patcher.get_model_object("model_sampling"))
    with torch.no_grad():
        sampling.log_sigmas.add_(0.5)  # another timestep for each sigma: outputs change
    clone.add_object_patch("model_sampling", sampling)
    out = copy.deepcopy(patcher.get_model_object("diffusion_model.out"))
    with torch.no_grad():
        for parameter in out.parameters():
            parameter.mul_(2)
    clone.add_object_patch("diffusion_model.out", out)
    return clone


def test_object_patches(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """Object patches (model_sampling, a submodule): outputs equal ComfyUI's; nothing left on the device after."""
    clone = object_patched_clone(sd15.model)
    expected = expected_forward("object patches", clone, fake_gpu)
    assert not torch.equal(expected, expected_forward("base", sd15.model, fake_gpu))
    originals = Originals(clone)  # the original model_sampling and output block are in the tree outside a scope
    patches = [t for obj in clone.object_patches.values() for t in (*obj.parameters(), *obj.buffers())]
    assert patches
    base = fake_gpu.memory_allocated()
    with on_gpu(clone) as scope:
        assert clone.model.model_sampling is clone.object_patches["model_sampling"]
        got = unet_forward(clone, scope.device)
    assert torch.equal(got, expected)
    assert fake_gpu.memory_allocated() == base
    assert clone.model.model_sampling is not clone.object_patches["model_sampling"]
    originals.assert_back(clone)
    assert {t.device for obj in clone.object_patches.values() for t in (*obj.parameters(), *obj.buffers())} == {CPU}


# ---------------------------------------------------------------------- 6. never pinned twice (ComfyUI 0.3.75+)

needs_comfyui_pinning = pytest.mark.skipif(
    not (hasattr(mp.ModelPatcher, "pin_weight_to_device") and hasattr(mm, "pin_memory")),
    reason="this ComfyUI does not pin weights itself (no ModelPatcher.pin_weight_to_device / pin_memory)",
)


@pytest.fixture
def comfyui_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """ComfyUI's pinned-memory books empty and pinning enabled (it is off without CUDA); restored after."""
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 2**40)
    monkeypatch.setattr(mm, "PINNED_MEMORY", {})
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0)


@needs_comfyui_pinning
def test_comfyui_does_not_pin_ondevice_masters(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, comfyui_pins: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a scope pinned the masters, ComfyUI's pin_memory / pin_weight_to_device refuse them; its books stay."""
    model = sd15.model
    with on_gpu(model):
        pass

    def no_cudart() -> object:
        pytest.fail("ComfyUI tried to register memory that ondevice pinned already")

    monkeypatch.setattr(torch.cuda, "cudart", no_cudart)
    weights = dict(model.model.named_parameters())
    assert all(w.is_pinned() and isinstance(w, torch.nn.Parameter) for w in weights.values())
    assert not any(mm.pin_memory(w) for w in weights.values())
    for key in weights:
        model.pin_weight_to_device(key)
    assert (model.pinned, mm.PINNED_MEMORY, mm.TOTAL_PINNED_MEMORY) == (set(), {}, 0)


class CudartShim:
    """``torch.cuda.cudart()`` for ComfyUI's pin_memory / unpin_memory: registers with the fake GPU, by pointer."""

    def __init__(self, patcher: Any) -> None:
        self.patcher = patcher
        self.registered: dict[int, torch.Tensor] = {}

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802  (CUDA's name)
        [tensor] = [t for t in tensors(self.patcher).values() if t.device == CPU and t.data_ptr() == ptr]
        assert nbytes(tensor) == size
        torch.fakegpu.host_register(tensor)  # type: ignore[attr-defined]
        self.registered[ptr] = tensor
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        tensor = self.registered.pop(ptr, None)
        if tensor is None:
            return 713  # cudaErrorHostMemoryNotRegistered
        torch.fakegpu.host_unregister(tensor)  # type: ignore[attr-defined]
        return 0


@needs_comfyui_pinning
def test_weights_comfyui_pinned_are_not_pinned_again_nor_leaked(
    fake_gpu: FakeGPU,
    sd15: ondevice.Checkpoint,
    no_pins: None,
    comfyui_pins: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights ComfyUI pinned: never registered twice, not in ondevice's count, and unpinned by ComfyUI after."""
    model = sd15.model
    shim = CudartShim(model)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: shim)
    fake = torch.get_device_module(fake_gpu.device)
    doubles: list[str] = []
    host_register = fake.host_register

    def register_once(tensor: torch.Tensor) -> None:
        try:
            host_register(tensor)
        except RuntimeError as exc:
            doubles.append(str(exc))
            raise

    monkeypatch.setattr(fake, "host_register", register_once)
    host_before = fake_gpu.pinned_bytes()
    keys = [name for name, _ in model.model.named_parameters()][:3]
    try:
        for key in keys:
            model.pin_weight_to_device(key)  # as ComfyUI's partial unload does with offloaded weights
        assert model.pinned == set(keys) and len(shim.registered) == len(keys)
        ondevice_before = ondevice_pinning.pinned_bytes()
        with on_gpu(model):
            by_comfyui = sum(nbytes(t) for t in shim.registered.values())
            by_ondevice = ondevice_pinning.pinned_bytes() - ondevice_before
            assert fake_gpu.pinned_bytes() - host_before == by_ondevice + by_comfyui  # no byte counted twice
        assert doubles == []
        model.unpin_all_weights()  # ComfyUI's own unpin (ModelPatcher.__del__, detach, ...)
        assert shim.registered == {}, "ComfyUI's registrations were orphaned: ComfyUI can never unpin them"
        assert (mm.PINNED_MEMORY, mm.TOTAL_PINNED_MEMORY) == ({}, 0)
        ondevice_pinning.unpin(model.model)
        assert fake_gpu.pinned_bytes() == host_before
    finally:
        for tensor in shim.registered.values():
            fake.host_unregister(tensor)
        model.pinned.clear()


def test_pins_do_not_pile_up_when_comfyui_reloads_between_scopes(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, no_pins: None
) -> None:
    """ComfyUI's own load/unload between scopes (new CPU tensors) does not leave the old masters pinned and held."""
    model = sd15.model
    with on_gpu(model):
        pass
    pinned = ondevice_pinning.pinned_bytes()
    for _ in range(2):
        # a sampler node outside any scope
        comfyui_alone(model, fake_gpu.device, lambda: torch.empty(0), force_full_load=True)
        with on_gpu(model):
            pass
    assert ondevice_pinning.pinned_bytes() == pinned


# ---------------------------------------------------------------------- 7. ComfyUI calls inside a scope


def test_comfyui_calls_inside_a_scope_keep_the_held_model(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A clone's scope, load_models_gpu and unload_all_models inside a scope: nothing moves, exit copies 0 bytes."""
    model, clone = sd15.model, sd15.model.clone()
    expected = expected_forward("base", model, fake_gpu)
    originals = Originals(model)
    base = fake_gpu.memory_allocated()
    with on_gpu(model) as scope:
        with on_gpu(clone):
            assert torch.equal(unet_forward(clone, scope.device), expected)
        loaded = fake_gpu.bytes_to_device
        mm.load_models_gpu([model])  # as a node would
        mm.load_models_gpu([clone])
        mm.unload_all_models()
        assert fake_gpu.bytes_to_device == loaded
        assert len(registered_entries(model.model)) == 1
        assert {t.device for t in tensors(model).values()} == {scope.device}
        assert torch.equal(unet_forward(model, scope.device), expected)
        to_cpu = fake_gpu.bytes_to_cpu
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert fake_gpu.memory_allocated() == base
    originals.assert_back(model)
    assert not registered_entries(model.model)


# ---------------------------------------------------------------------- 8. failure mid-load


@pytest.mark.parametrize("where", ["staging", "comfyui patching"])
def test_load_that_does_not_fit_leaves_everything_on_the_cpu(sd15: ondevice.Checkpoint, where: str) -> None:
    """OOM while staging, or in ComfyUI's patching after it (the part's own load: a scope is refused before that, by
    the table's memory check): raised; weights, masters and memory as before."""
    patcher = lora_clone(sd15.model)
    patched = sum(nbytes(tensors(patcher)[key]) for key in patcher.patches)
    room = patcher.model_size() // 2 if where == "staging" else patcher.model_size() - patched // 2
    with fake_gpu(memory=room) as gpu:
        originals = Originals(patcher)
        with pytest.raises(ondevice.OutOfDeviceMemory), on_gpu(patcher):
            pass
        assert gpu.bytes_to_device == 0  # refused before anything moved
        part = PatcherPart(patcher)
        part.point_at(gpu.device)
        try:
            with pytest.raises(torch.OutOfMemoryError):
                part.load(gpu.device)
        finally:
            part.restore()
        if where == "comfyui patching":
            assert gpu.bytes_to_device >= patcher.model_size() - patched  # the staging went through
        assert gpu.memory_allocated() == 0
        originals.assert_back(patcher)
        assert not entries_of(patcher)
        for entry in mm.current_loaded_models:
            assert getattr(entry, "model_finalizer", True) is not None
