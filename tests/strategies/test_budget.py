"""Partial loads within a budget (``PatcherPart.load_partial``): ComfyUI's own low-VRAM path, bounded, fully undone.

The Flux-class mini checkpoint (1 double + 1 single block at Flux-dev's width, 2.18 GB in fp32) runs one sampling
step on a fake GPU smaller than the model, and its output is compared bit for bit with ComfyUI's own low-VRAM run
of the same step on a fake GPU of the same size.  Device memory is read from the fake GPU's ledger at every change,
so the peak is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice import pinning as ondevice_pinning
from ondevice.errors import InvalidArgumentError
from ondevice.strategies.comfy import PatcherPart, registered_entries
from ondevice.testing import FakeGPU, fake_gpu, fakegpu
from ondevice.testing.synthetic import cached_checkpoint
from tests.strategies._lora import lora_clone
from tests.strategies._steps import comfyui_alone, unet_forward
from tests.strategies.test_dynamic import StandInVBAR, _load_dynamic, aimdo, resident_bytes  # noqa: F401  (fixture)
from tests.testing.test_synthetic_flux import _loader, _sample

CPU = torch.device("cpu")
MIB = 2**20
BUDGET = 512 * MIB  # a quarter of the Flux mini
# What a forward needs beside the resident weights: ComfyUI casts each offloaded layer to the device when it runs,
# with NUM_STREAMS more in flight on offload streams, and the activations of a 16x16 latent with 8 text tokens
# (the largest, single_blocks.0.linear1's output, is 72 x 21504 floats: 6 MiB) stay far below 64 MiB.
ACTIVATIONS = 64 * MIB

needs_dynamic_vram = pytest.mark.skipif(
    not hasattr(mp, "ModelPatcherDynamic"), reason="this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)"
)
needs_comfyui_pinning = pytest.mark.skipif(
    not (hasattr(mp.ModelPatcher, "pin_weight_to_device") and hasattr(mm, "pin_memory")),
    reason="this ComfyUI does not pin offloaded weights (no ModelPatcher.pin_weight_to_device / pin_memory)",
)


# ---------------------------------------------------------------------- helpers


def working_set(patcher: Any) -> int:
    """ComfyUI's per-layer working set: the largest castable layer x (NUM_STREAMS + 1), plus the activations."""
    castable = [mm.module_size(m) for m in patcher.model.modules() if hasattr(m, "comfy_cast_weights")]
    return max(castable) * (getattr(mm, "NUM_STREAMS", 0) + 1) + ACTIVATIONS


@contextmanager
def within_budget(patcher: Any, device: torch.device, budget: int | None, via: str = "part") -> Iterator[None]:
    """A scope holding ``patcher`` within ``budget``: ``on_gpu(budget=...)``, or the part as the residency table
    drives it (point_at, load_partial, offload, restore)."""
    if via == "on_gpu":
        how = {"partial": True} if budget is None else {"budget": budget}
        with on_gpu(patcher, device=device, **how):
            yield
        return
    part = PatcherPart(patcher)
    part.point_at(device)
    try:
        part.load_partial(device, budget)
        yield
    finally:
        try:
            part.offload()
        finally:
            part.restore()


def assert_partially_loaded(patcher: Any, device: torch.device, budget: int) -> None:
    """ComfyUI's books: one entry on ``device``, low-VRAM mode, at most ``budget`` bytes loaded, all of it there."""
    [entry] = registered_entries(patcher.model)
    assert entry.device == device and patcher.model.device == device
    assert patcher.model.model_lowvram
    assert 0 <= patcher.loaded_size() <= budget
    assert fakegpu.memory_allocated(device) >= patcher.loaded_size()
    assert PatcherPart(patcher).is_on(device)
    held = [h for h in ondevice.residency.table.held() if h.key is patcher.model]
    if held:  # through on_gpu: the table counts what ComfyUI loaded (eviction and fitting go by it), not the budget
        assert held[0].nbytes == patcher.loaded_size()


def assert_released(patcher: Any, gpu: FakeGPU, baseline: int = 0) -> None:
    """Every tensor on the CPU, ComfyUI's books empty, no cast function or pin left, device memory at ``baseline``."""
    tensors = [*patcher.model.parameters(), *patcher.model.buffers()]
    assert {t.device for t in tensors} == {CPU}
    assert not registered_entries(patcher.model)
    assert patcher.model.device == CPU and not patcher.model.model_lowvram and patcher.loaded_size() == 0
    modules = list(patcher.model.modules())
    assert not [m for m in modules if hasattr(m, "prev_comfy_cast_weights") or getattr(m, "weight_function", None)]
    assert not getattr(patcher, "pinned", set())
    assert not PatcherPart(patcher).is_on(gpu.device)
    assert gpu.memory_allocated() == baseline


@pytest.fixture(scope="module")
def flux() -> Iterator[Any]:
    """The Flux mini, loaded once per module by ComfyUI's own loader to the CPU (2.18 GB in fp32)."""
    patcher = _loader()(str(cached_checkpoint("flux", "mini")))
    yield patcher
    mm.unload_all_models()


def smaller_gpu(patcher: Any) -> FakeGPU:
    """A fake GPU 90% the model's size: ComfyUI cannot load it whole."""
    return fake_gpu(memory=patcher.model_size() * 9 // 10)


@pytest.fixture(scope="module")
def comfyui_low_vram(flux: Any) -> torch.Tensor:
    """ComfyUI's own low-VRAM run of the step: its load_models_gpu on a fake GPU smaller than the model, no ondevice."""
    with smaller_gpu(flux) as gpu:
        out = comfyui_alone(flux, gpu.device, lambda: _sample(flux))
        assert gpu.memory_allocated() == 0
    return out


# ---------------------------------------------------------------------- the Flux-class model, larger than the card


@pytest.mark.parametrize("via", ["part", "on_gpu"])
def test_flux_step_within_a_budget_matches_comfyui_low_vram_run(
    flux: Any, comfyui_low_vram: torch.Tensor, via: str
) -> None:
    """Flux mini on a fake GPU 90% its size, 512 MiB budget: one euler step equals ComfyUI's own low-VRAM run, memory
    never above budget + working set, everything back on the CPU after."""
    with smaller_gpu(flux) as gpu:
        assert gpu.memory < flux.model_size()
        gpu.reset_peak_memory_stats()
        with within_budget(flux, gpu.device, BUDGET, via):
            assert_partially_loaded(flux, gpu.device, BUDGET)
            out = _sample(flux)  # ComfyUI's sampler calls load_models_gpu again: it offers more, the entry refuses
            assert_partially_loaded(flux, gpu.device, BUDGET)
        assert_released(flux, gpu)
        assert not mm.current_loaded_models
    assert torch.equal(out, comfyui_low_vram)
    assert gpu.max_memory_allocated() <= BUDGET + working_set(flux)


def test_partial_without_budget_loads_what_comfyui_chooses(flux: Any, comfyui_low_vram: torch.Tensor) -> None:
    """partial=True (budget None): ComfyUI's own load_models_gpu decides from the free memory; same step, all undone."""
    with smaller_gpu(flux) as gpu:
        with within_budget(flux, gpu.device, None):
            assert PatcherPart(flux).is_on(gpu.device)
            assert 0 < flux.loaded_size() < flux.model_size() and flux.model.model_lowvram
            assert torch.equal(_sample(flux), comfyui_low_vram)
        assert_released(flux, gpu)


# ---------------------------------------------------------------------- the SD1.5 mini UNet


@pytest.fixture(scope="module")
def unet_expected(sd15: ondevice.Checkpoint) -> torch.Tensor:
    """ComfyUI's own full-load output of the UNet step, on a fake GPU."""
    with fake_gpu() as gpu:
        return comfyui_alone(sd15.model, gpu.device, lambda: unet_forward(sd15.model, gpu.device), force_full_load=True)


def test_budget_of_the_model_size_or_more_is_a_full_load(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, unet_expected: torch.Tensor
) -> None:
    """A budget at least the model's size loads every weight (not low-VRAM), on ondevice's staged path."""
    unet = sd15.model
    part = PatcherPart(unet)
    with within_budget(unet, fake_gpu.device, unet.model_size()):
        assert {t.device for t in unet.model.state_dict().values()} == {fake_gpu.device}
        assert unet.loaded_size() == unet.model_size() and not unet.model.model_lowvram
        assert part.is_on(fake_gpu.device)
        assert torch.equal(unet_forward(unet, fake_gpu.device), unet_expected)
    assert_released(unet, fake_gpu)


def test_budget_too_small_for_any_layer_casts_every_layer(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, unet_expected: torch.Tensor
) -> None:
    """budget=0 leaves every weight on the CPU; ComfyUI casts each layer per forward, same output; nothing left."""
    unet = sd15.model
    with within_budget(unet, fake_gpu.device, 0):
        assert_partially_loaded(unet, fake_gpu.device, 0)
        assert fake_gpu.memory_allocated() == 0
        assert torch.equal(unet_forward(unet, fake_gpu.device), unet_expected)
    assert_released(unet, fake_gpu)


@pytest.mark.parametrize("via", ["part", "on_gpu"])
def test_unet_budget_inside_a_scope_holding_its_vae(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, unet_expected: torch.Tensor, via: str
) -> None:
    """A UNet within a budget inside on_gpu(vae): ComfyUI's own load_models_gpu keeps it within the budget on a roomy
    GPU, the VAE stays whole, the UNet alone leaves at the inner exit."""
    unet, vae = sd15.model, sd15.vae
    budget = unet.model_size() // 3
    with on_gpu(vae) as outer:
        held = fake_gpu.memory_allocated()
        with within_budget(unet, outer.device, budget, via):
            assert_partially_loaded(unet, outer.device, budget)
            loaded = unet.loaded_size()
            mm.load_models_gpu([unet])  # as a sampler node would, with gigabytes free
            assert unet.loaded_size() == loaded
            assert_partially_loaded(unet, outer.device, budget)
            assert torch.equal(unet_forward(unet, outer.device), unet_expected)
            assert PatcherPart(vae.patcher).is_on(outer.device)
        assert_released(unet, fake_gpu, baseline=held)
        assert PatcherPart(vae.patcher).is_on(outer.device)
    assert fake_gpu.memory_allocated() == 0


@pytest.fixture
def lora(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> tuple[Any, torch.Tensor]:
    """A LoRA clone of the SD1.5 mini UNet, and its step after ComfyUI's own full load on the fake GPU."""
    clone = lora_clone(sd15.model)
    device = fake_gpu.device
    return clone, comfyui_alone(clone, device, lambda: unet_forward(clone, device), force_full_load=True)


def test_a_lora_clone_inside_a_budget_scope_stays_within_the_budget(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, unet_expected: torch.Tensor, lora: tuple[Any, torch.Tensor]
) -> None:
    """on_gpu(unet, budget=B), then on_gpu(lora clone) inside it: the clone's patches go on within B as well (ComfyUI's
    low-VRAM load with the LoRA), its step equals ComfyUI's own full load of the clone; at the inner exit the base
    weights are back, still within B; everything released after (the swap loaded the whole model before)."""
    unet, (clone, with_lora) = sd15.model, lora
    budget = unet.model_size() // 3
    fake_gpu.reset_peak_memory_stats()
    with on_gpu(unet, budget=budget) as scope:
        with on_gpu(clone):
            assert_partially_loaded(clone, scope.device, budget)
            assert torch.allclose(unet_forward(clone, scope.device), with_lora, rtol=1e-4, atol=1e-5)
        assert_partially_loaded(unet, scope.device, budget)
        assert torch.equal(unet_forward(unet, scope.device), unet_expected)
    assert fake_gpu.max_memory_allocated() <= budget + working_set(unet)
    assert_released(unet, fake_gpu)


def test_a_lora_clone_in_the_same_budget_scope_as_its_base_loads_within_it(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, lora: tuple[Any, torch.Tensor]
) -> None:
    """on_gpu(unet, clone, budget=B): the clone's patches go on within B too, and its step equals ComfyUI's own full
    load of the clone (the table-level case for partial=True, where ComfyUI picks the amount, is in tests/fast)."""
    unet, (clone, with_lora) = sd15.model, lora
    budget = unet.model_size() // 3
    fake_gpu.reset_peak_memory_stats()
    with on_gpu(unet, clone, budget=budget) as scope:
        assert_partially_loaded(clone, scope.device, budget)
        assert torch.allclose(unet_forward(clone, scope.device), with_lora, rtol=1e-4, atol=1e-5)
    assert fake_gpu.max_memory_allocated() <= budget + working_set(unet)
    assert_released(unet, fake_gpu)


def test_is_on_counts_a_partial_load_only_when_ondevice_made_it(sd15: ondevice.Checkpoint) -> None:
    """ComfyUI's own partial load is not "on" for a scope; ondevice's is; a full load after it needs every weight."""
    unet = sd15.model
    part = PatcherPart(unet)
    with fake_gpu(vram_state="NO_VRAM") as gpu:  # ComfyUI's load_models_gpu loads it layer by layer
        seen = comfyui_alone(unet, gpu.device, lambda: torch.tensor([unet.model.model_lowvram, part.is_on(gpu.device)]))
    assert seen.tolist() == [True, False]
    with fake_gpu() as gpu:
        part.point_at(gpu.device)
        try:
            part.load_partial(gpu.device, unet.model_size() // 2)
            assert_partially_loaded(unet, gpu.device, unet.model_size() // 2)
            part.load(gpu.device)  # a full load: the partial one is not enough
            assert {t.device for t in unet.model.state_dict().values()} == {gpu.device}
            assert part.is_on(gpu.device) and not unet.model.model_lowvram
            assert len(registered_entries(unet.model)) == 1
        finally:
            part.offload()
            part.restore()
        assert_released(unet, gpu)


def test_load_that_does_not_fit_the_budget_rolls_back(sd15: ondevice.Checkpoint) -> None:
    """A fake GPU smaller than the budget: out of memory in ComfyUI's load, raised; everything as before, on the CPU."""
    unet = sd15.model
    budget = unet.model_size() // 2
    with fake_gpu(memory=budget // 2) as gpu:
        with pytest.raises(torch.OutOfMemoryError), within_budget(unet, gpu.device, budget):
            pass
        assert_released(unet, gpu)
        assert not mm.current_loaded_models


@pytest.mark.parametrize("budget", [-1, 1.5, True])
def test_budget_that_is_not_a_byte_count_raises_before_anything_moves(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, budget: Any
) -> None:
    """A negative, fractional or boolean budget raises InvalidArgumentError naming it; nothing moves."""
    with pytest.raises(InvalidArgumentError, match=rf"budget={budget!r}"):
        PatcherPart(sd15.model).load_partial(fake_gpu.device, budget)
    assert_released(sd15.model, fake_gpu)


# ---------------------------------------------------------------------- ComfyUI's pinned host copies (0.3.75+)


class CudartShim:
    """``torch.cuda.cudart()`` for ComfyUI's pin_memory / unpin_memory: registers host memory with the fake GPU."""

    def __init__(self, patcher: Any) -> None:
        self.weights = [*patcher.model.parameters()]
        self.registered: dict[int, torch.Tensor] = {}

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802  (CUDA's name)
        [tensor] = [t for t in self.weights if t.device == CPU and t.data_ptr() == ptr]
        torch.fakegpu.host_register(tensor)  # type: ignore[attr-defined]
        self.registered[ptr] = tensor
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        tensor = self.registered.pop(ptr)
        torch.fakegpu.host_unregister(tensor)  # type: ignore[attr-defined]
        return 0


@needs_comfyui_pinning
def test_exit_unpins_what_comfyui_pinned_for_the_offloaded_weights(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI pins the weights its low-VRAM load leaves on the CPU; at exit every such pin is gone, books empty."""
    unet = sd15.model
    ondevice_pinning.unpin(unet.model)  # an earlier full load pinned the masters; ComfyUI never pins those again
    shim = CudartShim(unet)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: shim)
    monkeypatch.setattr(mm, "MAX_PINNED_MEMORY", 2**40)
    monkeypatch.setattr(mm, "PINNED_MEMORY", {})
    monkeypatch.setattr(mm, "TOTAL_PINNED_MEMORY", 0)
    host = fake_gpu.pinned_bytes()
    with within_budget(unet, fake_gpu.device, unet.model_size() // 3):
        assert unet.pinned and shim.registered
        assert fake_gpu.pinned_bytes() > host
    assert (shim.registered, mm.PINNED_MEMORY, mm.TOTAL_PINNED_MEMORY) == ({}, {}, 0)
    assert fake_gpu.pinned_bytes() == host
    assert_released(unet, fake_gpu)


# ---------------------------------------------------------------------- dynamic VRAM (comfy-aimdo, ComfyUI 0.33+)


@needs_dynamic_vram
@pytest.mark.usefixtures("aimdo")
def test_dynamic_patcher_takes_no_budget_but_partial_is_comfyui_dynamic_load(
    fake_gpu: FakeGPU, sd15_checkpoint: Any
) -> None:
    """A budget on a dynamic-VRAM model raises InvalidArgumentError saying why, nothing moved; budget None is
    ComfyUI's dynamic load (staged, paged in per use), and its exit frees everything."""
    unet = _load_dynamic(sd15_checkpoint).model
    part = PatcherPart(unet)
    try:
        with pytest.raises(InvalidArgumentError, match="dynamic VRAM"):
            part.load_partial(fake_gpu.device, 1 << 20)
        assert not registered_entries(unet.model) and fake_gpu.memory_allocated() == 0
        with within_budget(unet, fake_gpu.device, None):
            assert registered_entries(unet.model) and unet.model.device == fake_gpu.device
            assert part.is_on(fake_gpu.device)
        assert {t.device for t in unet.model.state_dict().values()} == {CPU}
        assert not registered_entries(unet.model) and unet.model.device == CPU
        assert resident_bytes() == 0 and fake_gpu.memory_allocated() == 0
    finally:
        StandInVBAR.priority.clear()
