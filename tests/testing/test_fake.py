"""``fake_gpu()``: activation styles, argument checks, ondevice registration and the ComfyUI hookup."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator

import pytest
import torch

import ondevice.devices
from ondevice.errors import FakeGPUActiveError, InvalidArgumentError, InvalidDeviceError, OnDeviceError
from ondevice.testing import fake, fakegpu
from ondevice.testing.fake import FakeGPU, fake_gpu


def fakedev(index: int = 0) -> torch.device:
    """``fakegpu:index`` (the name parses once the backend is installed, which tests do not do at import)."""
    fakegpu.install()
    return torch.device("fakegpu", index)


CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_leftover_activation() -> Iterator[None]:
    """Fail a test that leaves a fake GPU active, after stopping it so later tests run clean."""
    yield
    leftover = fake._active
    while fake._active is not None:
        fake._active.stop()
    assert leftover is None, "the test left a fake GPU active"


@pytest.fixture
def mm() -> types.ModuleType:
    """ComfyUI's model_management (tests/conftest.py booted ComfyUI in CPU mode)."""
    return sys.modules["comfy.model_management"]


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


def devices_of(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in [*module.parameters(), *module.buffers()]}


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("8GB", 8 * 10**9),
        ("1.5GiB", 3 * 2**29),
        (" 64 kib ", 64 * 1024),
        (123456, 123456),
    ],
)
def test_memory_is_parsed(memory: str | int, expected: int) -> None:
    """memory= accepts GiB/MiB (1024-based), GB (1000-based) strings, decimals and int bytes."""
    assert fake_gpu(memory).memory == expected


@pytest.mark.parametrize("memory", ["8XB", "", "GiB", "-1GiB", "0MiB", "8 Gi B", 0, -5, True, 1.5, None])
def test_bad_memory_raises(memory: object) -> None:
    """A bad memory= raises InvalidArgumentError naming the argument and the accepted forms."""
    with pytest.raises(InvalidArgumentError, match=r"memory=.*'8GiB'.*'512MiB'") as info:
        fake_gpu(memory)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"device_count": 0}, "device_count="), ({"vram_state": "LOTS"}, "vram_state=")]
)
def test_bad_options_raise(kwargs: dict[str, object], name: str) -> None:
    """A bad device_count= or vram_state= raises InvalidArgumentError naming it."""
    with pytest.raises(InvalidArgumentError, match=name):
        fake_gpu(**kwargs)  # type: ignore[arg-type]


def test_building_activates_nothing() -> None:
    """fake_gpu() only describes the device: nothing is registered until start()."""
    gpu = fake_gpu("1GiB", device_count=2)
    assert not gpu.active
    assert ondevice.devices.resolve(None).type != "fakegpu"
    assert gpu.devices == [fakedev(), fakedev(1)]
    assert gpu.device == fakedev()


# ---------------------------------------------------------------- activation styles


def test_context_manager_registers_default_device() -> None:
    """Inside `with fake_gpu()` resolve(None) is fakegpu:0; outside it is not."""
    with fake_gpu() as gpu:
        assert gpu.active
        assert ondevice.devices.resolve(None) == fakedev()
        assert torch.zeros(2).to(gpu.device).device == fakedev()
    assert not gpu.active
    assert ondevice.devices.resolve(None).type != "fakegpu"


def test_decorator_activates_per_call() -> None:
    """A decorated function runs with the fake GPU active on every call, and inactive after."""
    gpu = fake_gpu("1GiB")
    seen = []

    @gpu
    def body(value: int) -> int:
        seen.append(ondevice.devices.resolve(None))
        return value * 2

    assert body(3) == 6
    assert not gpu.active
    assert body(4) == 8
    assert seen == [fakedev(), fakedev()]
    assert body.__name__ == "body"


def test_decorator_rejects_coroutines() -> None:
    """Decorating an async function raises TypeError instead of activating around nothing."""

    async def body() -> None:
        return None

    with pytest.raises(TypeError, match="plain functions"):
        fake_gpu()(body)


def test_start_stop() -> None:
    """start() activates and returns the handle; stop() deactivates; a second stop() is harmless."""
    gpu = fake_gpu()
    assert gpu.start() is gpu
    assert ondevice.devices.resolve(None) == fakedev()
    gpu.stop()
    gpu.stop()
    assert ondevice.devices.resolve(None).type != "fakegpu"


def test_different_handles_do_not_nest() -> None:
    """Starting a second handle while one is active raises FakeGPUActiveError; the first stays usable."""
    with fake_gpu() as outer:
        with pytest.raises(FakeGPUActiveError, match="already active") as info:
            fake_gpu().start()
        assert isinstance(info.value, OnDeviceError)
        assert isinstance(info.value, RuntimeError)
        assert outer.active
        assert ondevice.devices.resolve(None) == fakedev()


def test_same_handle_reenters() -> None:
    """Re-entering the active handle counts up; only the outermost exit deactivates it."""
    gpu = fake_gpu()
    with gpu:
        with gpu:
            assert gpu.active
        assert gpu.active
        assert ondevice.devices.resolve(None) == fakedev()
    assert not gpu.active


def test_exception_inside_still_stops() -> None:
    """An exception in the with-block propagates and the fake GPU is stopped."""
    gpu = fake_gpu()
    with pytest.raises(KeyError), gpu:
        raise KeyError("boom")
    assert not gpu.active


# ---------------------------------------------------------------- observations


def test_counters_since_start_and_frozen_at_stop() -> None:
    """bytes_to_device / bytes_to_cpu count copies since start() and keep their value after stop()."""
    torch.zeros(10).to("fakegpu:0").cpu()  # copies before start() do not count
    with fake_gpu() as gpu:
        assert (gpu.bytes_to_device, gpu.bytes_to_cpu) == (0, 0)
        t = torch.zeros(100).to(gpu.device)
        t.cpu()
        assert (gpu.bytes_to_device, gpu.bytes_to_cpu) == (400, 400)
    t.cpu()
    assert (gpu.bytes_to_device, gpu.bytes_to_cpu) == (400, 400)


def test_memory_allocated_and_free_memory() -> None:
    """memory_allocated rises by what lives on the device; free_memory is memory minus that."""
    with fake_gpu("1MiB") as gpu:
        before = gpu.memory_allocated()
        t = torch.zeros(1000, device=gpu.device)
        assert gpu.memory_allocated() - before == 4000
        assert gpu.free_memory() == 2**20 - gpu.memory_allocated()
        assert ondevice.devices.memory_info(None) == (gpu.free_memory(), 2**20)
        del t
        assert gpu.memory_allocated() == before


def test_memory_limit_raises_oom() -> None:
    """Allocating past memory= raises torch.OutOfMemoryError."""
    with fake_gpu("1MiB") as gpu, pytest.raises(torch.OutOfMemoryError, match="fakegpu out of memory"):
        torch.zeros(2**20, device=gpu.device)


def test_device_count() -> None:
    """device_count=2 makes fakegpu:1 resolvable; fakegpu:2 is rejected by ondevice.devices."""
    with fake_gpu(device_count=2) as gpu:
        assert ondevice.devices.resolve("fakegpu:1") == gpu.devices[1]
        assert torch.ones(1, device="fakegpu:1").device == gpu.devices[1]
        with pytest.raises(InvalidDeviceError, match="index 2"):
            ondevice.devices.resolve("fakegpu:2")


def test_stop_restores_backend_defaults() -> None:
    """After stop() the backend is back to one device with the default capacity."""
    with fake_gpu("1MiB", device_count=3):
        assert fakegpu.device_count() == 3
    assert fakegpu.device_count() == 1
    assert fakegpu.memory_limit(0) == fakegpu.DEFAULT_MEMORY


# ---------------------------------------------------------------- ComfyUI hookup


PATCHED = ["get_torch_device", "get_total_memory", "get_free_memory", "text_encoder_device", "vram_state", "total_vram"]


def test_comfy_sees_the_fake_gpu(mm: types.ModuleType) -> None:
    """While active, ComfyUI's device and memory queries report fakegpu:0 and its capacity."""
    with fake_gpu("2GiB") as gpu:
        assert mm.get_torch_device() == fakedev()
        assert mm.vae_device() == fakedev()
        assert mm.text_encoder_device() == fakedev()
        assert mm.vram_state == mm.VRAMState.NORMAL_VRAM
        assert mm.get_total_memory() == 2 * 2**30
        assert mm.get_total_memory(fakedev(), torch_total_too=True) == (2 * 2**30, gpu.memory_allocated())
        assert mm.get_free_memory(fakedev()) == gpu.free_memory()
        assert mm.get_free_memory(fakedev(), torch_free_too=True) == (gpu.free_memory(), 0)
        assert mm.get_total_memory(CPU) > 0  # delegated to ComfyUI's own psutil query
    assert mm.get_torch_device() == CPU


def test_comfy_attributes_restored_exactly(mm: types.ModuleType) -> None:
    """stop() puts back the very objects that were patched."""
    before = {name: getattr(mm, name) for name in PATCHED}
    with fake_gpu(vram_state="LOW_VRAM"):
        assert all(getattr(mm, name) is not before[name] for name in PATCHED if name != "total_vram")
        assert mm.vram_state == mm.VRAMState.LOW_VRAM
        assert mm.text_encoder_device() == CPU  # a low-VRAM GPU keeps the text encoder on the CPU
    assert {name: getattr(mm, name) for name in PATCHED} == before
    assert all(getattr(mm, name) is before[name] for name in PATCHED)


def test_comfy_multi_gpu_helper_patched_when_present(mm: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Newer ComfyUI's get_all_torch_devices lists the fake devices while active, and is restored."""

    def original(exclude_current: bool = False) -> list[torch.device]:  # noqa: FBT001, FBT002
        return [CPU]

    monkeypatch.setattr(mm, "get_all_torch_devices", original, raising=False)
    with fake_gpu(device_count=2) as gpu:
        assert mm.get_all_torch_devices() == gpu.devices
        assert mm.get_all_torch_devices(exclude_current=True) == gpu.devices[1:]
    assert mm.get_all_torch_devices is original


def test_comfy_load_and_unload_move_real_weights(mm: types.ModuleType) -> None:
    """load_models_gpu moves a patcher's weights to fakegpu:0, charging exactly their bytes; unload gives them back."""
    import comfy.model_patcher  # noqa: PLC0415

    module = mlp()
    size = nbytes(module)
    with fake_gpu("1GiB") as gpu:
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=gpu.device, offload_device=CPU)
        gc.collect()
        base, free = gpu.memory_allocated(), mm.get_free_memory(gpu.device)
        mm.load_models_gpu([patcher], force_full_load=True)
        gc.collect()
        assert devices_of(module) == {fakedev()}
        assert gpu.memory_allocated() - base == size
        assert free - mm.get_free_memory(gpu.device) == size
        assert gpu.bytes_to_device == size
        with torch.no_grad():  # an autograd graph would keep the fake weights alive
            assert module(torch.randn(2, 32, device=gpu.device)).device == fakedev()
        mm.unload_all_models()
        gc.collect()
        assert devices_of(module) == {CPU}
        assert gpu.memory_allocated() == base
        assert mm.get_free_memory(gpu.device) == free


def test_stop_unloads_comfy_models(mm: types.ModuleType) -> None:
    """Leaving fake_gpu() with a model still loaded sends it back to the CPU and frees the device."""
    import comfy.model_patcher  # noqa: PLC0415

    module = mlp()
    with fake_gpu("1GiB") as gpu:
        gc.collect()
        base = gpu.memory_allocated()
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=gpu.device, offload_device=CPU)
        mm.load_models_gpu([patcher], force_full_load=True)
        assert devices_of(module) == {fakedev()}
    gc.collect()
    assert devices_of(module) == {CPU}
    assert gpu.memory_allocated() == base
    assert not mm.current_loaded_models


def test_without_comfy_nothing_is_patched(mm: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """When ComfyUI is not imported, fake_gpu() works with plain torch and touches no ComfyUI attribute."""
    monkeypatch.delitem(sys.modules, "comfy.model_management")
    before = mm.get_torch_device
    with fake_gpu() as gpu:
        assert mm.get_torch_device is before
        assert ondevice.devices.resolve(None) == fakedev()
        assert torch.nn.Linear(2, 2).to(gpu.device).weight.device == fakedev()


def test_imports_stay_light_and_start_installs() -> None:
    """import ondevice(.testing) loads neither fakegpu nor ComfyUI; the backend is installed by start(), not import."""
    code = textwrap.dedent(
        """
        import sys
        import torch
        import ondevice, ondevice.testing
        heavy = [m for m in sys.modules if m == "comfy" or m.startswith("comfy.") or m.endswith("fakegpu")]
        assert not heavy, heavy
        gpu = ondevice.testing.fake_gpu()
        assert torch._C._get_privateuse1_backend_name() == "privateuseone"
        with gpu:
            assert torch.ones(1).to(gpu.device).device.type == "fakegpu"
        assert "comfy" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fakegpu_handle_type() -> None:
    """fake_gpu() returns a FakeGPU whose repr says its size and state."""
    gpu = fake_gpu("1GiB")
    assert isinstance(gpu, FakeGPU)
    assert "inactive" in repr(gpu)
    with gpu:
        assert " active" in repr(gpu)
