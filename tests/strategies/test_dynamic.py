"""Scopes over ComfyUI's dynamic-VRAM patchers (``ModelPatcherDynamic``, ComfyUI 2026+) on the fake GPU.

ComfyUI's own loaders build the patchers (with ``CoreModelPatcher`` switched
as ``main.py`` does) and ComfyUI's own ``load_models_gpu`` / ``model_unload``
run.  comfy-aimdo's native library loads without a GPU (its pinned host
buffers are real), but its VBARs need a CUDA device, so :class:`StandInVBAR`
stands in for ``comfy_aimdo.model_vbar.ModelVBAR`` on the fake GPU: the same
methods and the rules of aimdo's ``src/model-vbar.c`` (pages faulted in on
demand, evicted lowest priority first from the top down, never below a
VBAR's watermark limit, pinned pages skipped), each resident page a real
fake-GPU allocation.  The tests need ComfyUI with dynamic VRAM (0.33+).

Only diffusion models are loaded here: ComfyUI's dynamic load of the VAE and
CLIP assigns ``param.data`` across devices (for parameters of non-leaf
modules), which the fake GPU cannot do (see ``ondevice.testing.fakegpu``);
they go through the same ``PatcherPart``, and scripts/gpu_check.py runs
them on a real GPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher as mp
import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.residency import table
from ondevice.strategies.comfy import PatcherPart, registered_entries
from ondevice.testing import FakeGPU

pytestmark = pytest.mark.skipif(
    not hasattr(mp, "ModelPatcherDynamic"), reason="this ComfyUI has no dynamic VRAM (ModelPatcherDynamic)"
)

CPU = torch.device("cpu")
PAGE = 1 << 20  # the stand-in's page; aimdo's is 32 MiB, and nothing in ondevice depends on it


class _Page:
    def __init__(self) -> None:
        self.memory: torch.Tensor | None = None  # the page's VRAM while resident
        self.pins = 0
        self.serial = 0


class StandInVBAR:
    """``comfy_aimdo.model_vbar.ModelVBAR`` on the fake GPU, with the rules of aimdo's model-vbar.c."""

    priority: list[StandInVBAR] = []  # lowest priority first, as aimdo's list from lowest_priority up

    def __init__(self, size: int, device: int) -> None:
        self.device = device
        self.max_size = size
        self.offset = 0
        self.base_addr = (1 << 40) * (len(self.priority) + 1)
        self.nr_pages = -(-size // PAGE)
        self.watermark = self.nr_pages
        self.watermark_limit = 0
        self.pages = [_Page() for _ in range(self.nr_pages)]
        self.priority.append(self)

    # -- the methods ComfyUI and ondevice call
    def prioritize(self, malloc_async_clamp: Any = None) -> None:
        self.priority.remove(self)
        self.priority.append(self)
        self.watermark = self.nr_pages

    def deprioritize(self) -> None:
        self.priority.remove(self)
        self.priority.insert(0, self)

    def alloc(self, num_bytes: int) -> tuple[StandInVBAR, int, int]:
        self.offset = (self.offset + 511) & ~511
        if self.offset + num_bytes > self.max_size:
            raise MemoryError("VBAR OOM")
        address = self.base_addr + self.offset
        self.offset += num_bytes
        return (self, address, num_bytes)

    def fault(self, address: int, size: int) -> list[int] | None:
        first, end = self._pages(address, size)
        if end > self.watermark:
            return None
        signature = []
        for index in range(first, end):
            page = self.pages[index]
            if page.memory is None:
                if not self._allocate(page) or end > self.watermark:
                    return None
                page.serial += 1
            signature.append(page.serial)
        for index in range(first, end):
            self.pages[index].pins += 1
        return signature

    def unpin(self, address: int, size: int) -> None:
        first, end = self._pages(address, size)
        for index in range(first, min(end, self.nr_pages)):
            page = self.pages[index]
            page.pins = max(0, page.pins - 1)
            if index >= self.watermark:
                self._free(page)

    def loaded_size(self) -> int:
        return sum(page.memory is not None for page in self.pages) * PAGE

    def set_watermark_limit(self, size_bytes: int) -> None:
        self.watermark_limit = -(-int(size_bytes) // PAGE)

    def set_watermark(self, size_bytes: int) -> None:
        watermark = min(-(-int(size_bytes) // PAGE), self.nr_pages)
        for page in self.pages[watermark : self.watermark]:
            self._free(page)
        self.watermark = watermark

    def free_memory(self, size_bytes: int) -> int:
        wanted, freed = -(-int(size_bytes) // PAGE), 0
        while wanted and self.watermark > self.watermark_limit:
            if self._free(self.pages[self.watermark - 1]):
                wanted, freed = wanted - 1, freed + 1
            self.watermark -= 1
        return freed * PAGE

    def get_nr_pages(self) -> int:
        return self.nr_pages

    def get_watermark(self) -> int:
        return self.watermark

    def get_residency(self) -> list[int]:
        return [(page.memory is not None) | (2 if page.pins else 0) for page in self.pages]

    # -- aimdo's internals
    def _pages(self, address: int, size: int) -> tuple[int, int]:
        offset = address - self.base_addr
        return offset // PAGE, -(-(offset + size) // PAGE)

    def _allocate(self, page: _Page) -> bool:
        while True:
            try:
                page.memory = torch.empty(PAGE, dtype=torch.uint8, device=torch.device("fakegpu", self.device))
            except torch.OutOfMemoryError:
                if not evict(PAGE, self.device):
                    return False
            else:
                return True

    @staticmethod
    def _free(page: _Page) -> bool:
        if page.memory is None or page.pins:
            return False
        page.memory = None
        return True


def evict(nbytes: int, device: int = 0) -> int:
    """What aimdo does when a torch allocation finds the device full (``vbars_free``): free pages; bytes freed."""
    wanted, freed = -(-nbytes // PAGE), 0
    for vbar in [v for v in StandInVBAR.priority if v.device == device]:
        while wanted and vbar.watermark > vbar.watermark_limit:
            if vbar._free(vbar.pages[vbar.watermark - 1]):
                wanted, freed = wanted - 1, freed + 1
            vbar.watermark -= 1
    return freed * PAGE


def reset_watermark_limits() -> None:
    """What ComfyUI's executor does after every node (``vbars_reset_watermark_limits``)."""
    for vbar in StandInVBAR.priority:
        vbar.watermark_limit = 0


@pytest.fixture(scope="module")
def aimdo() -> Iterator[type[StandInVBAR]]:
    """comfy-aimdo's library loaded (host buffers work without a GPU) and its VBAR replaced by the stand-in."""
    import comfy_aimdo.control  # noqa: PLC0415
    import comfy_aimdo.host_buffer  # noqa: PLC0415
    import comfy_aimdo.model_vbar  # noqa: PLC0415

    if not comfy_aimdo.control.init("cuda"):
        pytest.skip("comfy-aimdo's native library does not load on this platform")
    if comfy_aimdo.host_buffer.lib is None:  # bound at import, before init(): as main.py orders it, rebind
        importlib.reload(comfy_aimdo.host_buffer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy_aimdo.model_vbar, "ModelVBAR", StandInVBAR)
        yield StandInVBAR


@pytest.fixture
def dynamic(aimdo: type[StandInVBAR], fake_gpu: FakeGPU, sd15_checkpoint: Path) -> Iterator[ondevice.Checkpoint]:
    """The mini SD1.5 checkpoint loaded by ondevice with ComfyUI's dynamic-VRAM patchers (as main.py sets up)."""
    yield _load_dynamic(sd15_checkpoint)
    StandInVBAR.priority.clear()


def _load_dynamic(path: Path) -> ondevice.Checkpoint:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mp, "CoreModelPatcher", mp.ModelPatcherDynamic)
        ckpt = ondevice.load_checkpoint(path)
    assert all(c.patcher.is_dynamic() for c in (ckpt.clip, ckpt.vae)) and ckpt.model.is_dynamic()
    return ckpt


def patcher_of(component: Any) -> Any:
    return getattr(component, "patcher", component)


def vbar_of(component: Any, device: torch.device) -> StandInVBAR:
    vbar: StandInVBAR = patcher_of(component).model.dynamic_vbars[device]
    return vbar


def staged(component: Any) -> list[tuple[StandInVBAR, int, int]]:
    """Every aimdo allocation ComfyUI's load gave the component's weights (``module._v``)."""
    return [m._v for m in patcher_of(component).model.modules() if hasattr(m, "_v")]


def all_resident(component: Any) -> bool:
    """Whether every page of every staged weight holds VRAM."""
    pages = [vbar.pages[i] for vbar, address, size in staged(component) for i in range(*vbar._pages(address, size))]
    return bool(pages) and all(page.memory is not None for page in pages)


def resident_bytes(device: int = 0) -> int:
    return sum(vbar.loaded_size() for vbar in StandInVBAR.priority if vbar.device == device)


def assert_released(component: Any, gpu: FakeGPU, baseline: int) -> None:
    patcher = patcher_of(component)
    assert set(ondevice.placement(component)) == {CPU}
    assert patcher.model.device == CPU
    assert not registered_entries(patcher.model)
    assert resident_bytes() == 0
    assert gpu.memory_allocated() == baseline


def test_scope_faults_every_weight_in_and_returns_the_vram(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """Inside on_gpu every staged weight of a dynamic model holds VRAM; after it, all of that VRAM is free."""
    component = dynamic.model
    base = fake_gpu.memory_allocated()
    with on_gpu(component) as scope:
        assert registered_entries(patcher_of(component).model)
        assert patcher_of(component).model.device == scope.device
        assert all_resident(component)
        assert fake_gpu.memory_allocated() - base >= resident_bytes() > 0
    assert_released(component, fake_gpu, base)


def test_is_on_needs_the_weights_resident_on_that_device(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """A dynamic patcher that ComfyUI only staged (nothing faulted in) is not on the device, nor on another one."""
    part = PatcherPart(dynamic.model)
    mm.load_models_gpu([dynamic.model])  # what a ComfyUI node does: staged, no VRAM behind it yet
    assert registered_entries(dynamic.model.model) and resident_bytes() == 0
    assert not part.is_on(fake_gpu.device)
    assert not part.is_on(torch.device("fakegpu", 1))
    with on_gpu(dynamic.model):
        assert part.is_on(fake_gpu.device)
        assert not part.is_on(torch.device("fakegpu", 1))
        evict(1 << 40)  # aimdo may evict once ComfyUI reset the lock (after a node): seen, and loaded back
        reset_watermark_limits()
        evict(1 << 40)
        assert not part.is_on(fake_gpu.device)
        table.restore()
        assert part.is_on(fake_gpu.device) and all_resident(dynamic.model)
    assert_released(dynamic.model, fake_gpu, 0)


def test_scope_on_another_device_registers_it(
    aimdo: type[StandInVBAR], fake_gpu_two: Any, sd15_checkpoint: Path
) -> None:
    """on_gpu(dynamic, device='fakegpu:1') registers that device with the patcher (no KeyError) and runs there."""
    ckpt = _load_dynamic(sd15_checkpoint)
    dev1 = torch.device("fakegpu", 1)
    try:
        assert dev1 not in ckpt.model.model.dynamic_pins
        with on_gpu(ckpt.model, device=dev1):
            assert dev1 in ckpt.model.model.dynamic_pins
            assert ckpt.model.model.device == dev1
            assert all_resident(ckpt.model) and vbar_of(ckpt.model, dev1).device == 1
            assert fake_gpu_two.memory_allocated(0) == 0
        assert ckpt.model.load_device == torch.device("fakegpu", 0)
        assert ckpt.model.model.device == CPU
        assert resident_bytes(1) == 0
        assert fake_gpu_two.memory_allocated(1) == 0
    finally:
        StandInVBAR.priority.clear()


def test_scope_on_a_second_device_after_the_first_says_why_it_cannot(
    aimdo: type[StandInVBAR], fake_gpu_two: Any, sd15_checkpoint: Path
) -> None:
    """A dynamic model scoped on fakegpu:0, then on fakegpu:1: its weights stay staged in device 0's VBAR, so the
    second scope raises a clear OnDeviceError (not an out-of-memory message about an empty device), holding nothing."""
    ckpt = _load_dynamic(sd15_checkpoint)
    dev0, dev1 = torch.device("fakegpu", 0), torch.device("fakegpu", 1)
    try:
        with on_gpu(ckpt.model, device=dev0):
            pass
        with (
            pytest.raises(ondevice.OnDeviceError, match="does not move a dynamic model between GPUs"),
            on_gpu(ckpt.model, device=dev1),
        ):
            pass
        assert ckpt.model.model.device == CPU
        assert fake_gpu_two.memory_allocated(0) == fake_gpu_two.memory_allocated(1) == 0
    finally:
        StandInVBAR.priority.clear()


def test_point_at_registers_the_device(dynamic: ondevice.Checkpoint) -> None:
    """PatcherPart.point_at gives a dynamic patcher ComfyUI's per-device pin state for the new device."""
    part = PatcherPart(dynamic.vae.patcher, retarget=[(dynamic.vae, "device")])
    dev1 = torch.device("fakegpu", 1)
    part.point_at(dev1)
    try:
        assert dynamic.vae.patcher.loaded_ram_size() == 0  # reads model.dynamic_pins[load_device]
        assert dynamic.vae.device == dynamic.vae.patcher.load_device == dev1
    finally:
        part.restore()
    assert dynamic.vae.patcher.load_device == torch.device("fakegpu", 0)


def test_exit_says_the_weights_are_on_the_cpu(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """After the scope, model.device is the CPU (ComfyUI's dynamic unpatch_model ignores its device_to)."""
    with on_gpu(dynamic.model):
        assert dynamic.model.model.device == fake_gpu.device
    assert dynamic.model.model.device == CPU
    assert dynamic.model.current_loaded_device() == CPU
    assert ondevice.device_of(dynamic.model) == CPU


def test_aimdo_cannot_evict_what_a_scope_holds(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """Allocation pressure, ComfyUI's free_memory and unload_all_models leave a held dynamic model resident."""
    with on_gpu(dynamic.model):
        held = resident_bytes()
        assert evict(1 << 40) == 0  # a torch allocation that finds the device full
        mm.free_memory(1e30, fake_gpu.device)  # a non-dynamic load making room
        mm.unload_all_models()
        assert all_resident(dynamic.model) and resident_bytes() == held
        assert registered_entries(dynamic.model.model)
    assert_released(dynamic.model, fake_gpu, 0)


def test_an_unheld_dynamic_model_stays_evictable(
    dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU, sd15_checkpoint: Path
) -> None:
    """Only what a scope holds is locked: another dynamic model used inside on_gpu(model) can be evicted."""
    other = _load_dynamic(sd15_checkpoint).model
    with on_gpu(dynamic.model):
        mm.load_models_gpu([other])  # ComfyUI loads it itself, as a node does
        vbar, address, size = staged(other)[0]
        assert vbar.fault(address, size) is not None  # its first layer faulted in by a forward
        vbar.unpin(address, size)
        assert vbar.loaded_size() > 0
        evict(1 << 40)
        assert vbar.loaded_size() == 0
        assert all_resident(dynamic.model)
    mm.unload_all_models()
    assert_released(dynamic.model, fake_gpu, 0)


def test_the_guard_locks_again_after_comfyui_reset_the_limits(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """ComfyUI's executor resets aimdo's limits after each node; its next free_memory locks held weights again."""
    with on_gpu(dynamic.model):
        reset_watermark_limits()
        mm.free_memory(0, fake_gpu.device)  # the next node's load_models_gpu asks to make room first
        assert evict(1 << 40) == 0
        assert all_resident(dynamic.model)


def test_not_enough_vram_raises_and_holds_nothing(aimdo: type[StandInVBAR], sd15_checkpoint: Path) -> None:
    """A dynamic model whose weights do not fit: the scope is refused (OutOfDeviceMemory) before anything moves; the
    part's own load, past the table's check, raises OnDeviceError naming dynamic VRAM; nothing stays either way."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(memory=8 * PAGE) as gpu:
        ckpt = _load_dynamic(sd15_checkpoint)
        try:
            with pytest.raises(ondevice.OutOfDeviceMemory, match="needed"), on_gpu(ckpt.model):
                pass
            assert_released(ckpt.model, gpu, 0)
            part = PatcherPart(ckpt.model)
            part.point_at(gpu.device)
            try:
                with pytest.raises(ondevice.OnDeviceError, match="--disable-dynamic-vram"):
                    part.load(gpu.device)
            finally:
                part.restore()
            assert_released(ckpt.model, gpu, 0)
        finally:
            StandInVBAR.priority.clear()


def test_clone_scopes_share_the_resident_weights(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """A clone of a held dynamic model neither faults again nor frees at its inner exit."""
    clone = dynamic.model.clone()
    with on_gpu(dynamic.model):
        held = resident_bytes()
        with on_gpu(clone):
            assert resident_bytes() == held
        assert all_resident(dynamic.model) and resident_bytes() == held
    assert_released(dynamic.model, fake_gpu, 0)


def test_comfyui_reloading_the_held_model_keeps_its_vram(dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU) -> None:
    """ComfyUI's own load_models_gpu on a held dynamic model (as sampling does) keeps every page resident."""
    with on_gpu(dynamic.model):
        held = resident_bytes()
        mm.load_models_gpu([dynamic.model.clone()])
        assert all_resident(dynamic.model) and resident_bytes() == held
    assert_released(dynamic.model, fake_gpu, 0)


def test_unload_behind_ondevice_keeps_the_pages_and_is_repaired(
    dynamic: ondevice.Checkpoint, fake_gpu: FakeGPU
) -> None:
    """ComfyUI's model_unload of a held dynamic model stops at the lock; the next scope check registers it again."""

    def serials() -> list[int]:
        return [page.serial for vbar in StandInVBAR.priority for page in vbar.pages]

    with on_gpu(dynamic.model) as scope:
        held, before = resident_bytes(), serials()
        for entry in registered_entries(dynamic.model.model):
            mm.current_loaded_models.remove(entry)
            entry.model_unload()  # as a custom node might, bypassing free_memory
        assert resident_bytes() == held
        scope.ensure()
        assert registered_entries(dynamic.model.model) and all_resident(dynamic.model)
        assert resident_bytes() == held and serials() == before  # the same pages: nothing to copy again
    assert_released(dynamic.model, fake_gpu, 0)
