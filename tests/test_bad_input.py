"""Bad input: clear errors that are also the matching builtin, and nothing left on the GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ondevice
from ondevice import gpu_scoped, on_gpu
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def net() -> torch.nn.Module:
    return torch.nn.Linear(8, 8)


@pytest.mark.parametrize("thing", [object(), "unet", 42, [torch.nn.Linear(2, 2)]])
def test_non_model_object_is_a_type_error(fake_gpu: FakeGPU, thing: Any) -> None:
    """An object with no strategy raises NoStrategyError, also a TypeError, naming its type and the fix."""
    with pytest.raises(TypeError) as info, on_gpu(thing):
        pass
    assert isinstance(info.value, ondevice.NoStrategyError)
    assert type(thing).__name__ in str(info.value)
    assert "register_strategy" in str(info.value)


def test_none_is_a_type_error(fake_gpu: FakeGPU) -> None:
    """None raises NoStrategyError naming None."""
    with pytest.raises(ondevice.NoStrategyError, match="None"), on_gpu(None):
        pass


def test_bad_component_moves_nothing(fake_gpu: FakeGPU) -> None:
    """A bad component among good ones fails before any of them moves."""
    m = net()
    base = fake_gpu.memory_allocated()
    with pytest.raises(TypeError), on_gpu(m, object()):
        pass
    assert set(ondevice.placement(m)) == {CPU}
    assert fake_gpu.memory_allocated() == base


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "not a device", -1, 1.5])
def test_malformed_device_is_a_value_error(fake_gpu: FakeGPU, device: Any) -> None:
    """A malformed device raises InvalidDeviceError, also a ValueError, naming it."""
    with pytest.raises(ValueError) as info, on_gpu(net(), device=device):
        pass
    assert isinstance(info.value, ondevice.InvalidDeviceError)
    assert repr(device) in str(info.value) or str(device) in str(info.value)


def test_device_index_past_count(fake_gpu: FakeGPU) -> None:
    """An index past the device count names the count and the valid range."""
    m = net()
    with pytest.raises(ondevice.InvalidDeviceError, match="past the 1 fakegpu"), on_gpu(m, device="fakegpu:3"):
        pass
    assert set(ondevice.placement(m)) == {CPU}


def test_absent_device_type(fake_gpu: FakeGPU) -> None:
    """A device type this machine lacks ('cuda' on a CPU-only build) is an InvalidDeviceError."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ondevice.InvalidDeviceError, match="no cuda device"), on_gpu(net(), device="cuda"):
        pass


def test_decorator_unknown_name_raises_at_decoration() -> None:
    """gpu_scoped('vea') on a function without that parameter raises when decorating."""
    with pytest.raises(ondevice.InvalidArgumentError, match="'vea' is not a parameter"):

        @gpu_scoped("vea")
        def decode(vae: Any) -> None: ...


def test_decorator_non_string_name() -> None:
    """gpu_scoped(1) is rejected with a clear message."""
    with pytest.raises(ValueError, match="must be strings"):
        gpu_scoped(1)


def test_decorator_named_parameter_none(fake_gpu: FakeGPU) -> None:
    """A named parameter passed None raises NoStrategyError at call time."""

    @gpu_scoped("vae")
    def decode(vae: Any) -> None: ...

    with pytest.raises(ondevice.NoStrategyError):
        decode(None)


def test_conflicting_devices(fake_gpu_two: Any) -> None:
    """A component held on fakegpu:0 cannot be asked for on fakegpu:1 at the same time."""
    m = net()
    with on_gpu(m, device="fakegpu:0"):
        with pytest.raises(ondevice.ResidencyConflictError, match="fakegpu:0"), on_gpu(m, device="fakegpu:1"):
            pass
        assert set(ondevice.placement(m)) == {torch.device("fakegpu:0")}
    assert set(ondevice.placement(m)) == {CPU}


def test_out_of_memory_leaves_everything_on_cpu() -> None:
    """A scope whose components do not fit raises the OOM and leaves nothing on the device."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    small, big = torch.nn.Linear(64, 64), torch.nn.Linear(1024, 1024)
    with fake_gpu(memory="1MiB") as gpu:
        with pytest.raises(torch.OutOfMemoryError), on_gpu(small, big):
            pass
        assert set(ondevice.placement(small)) == set(ondevice.placement(big)) == {CPU}
        assert gpu.memory_allocated() == 0


def test_device_of_without_weights() -> None:
    """device_of on a module with no weights raises MissingWeightsError."""
    with pytest.raises(ondevice.MissingWeightsError):
        ondevice.device_of(torch.nn.ReLU())


def test_errors_share_one_base() -> None:
    """Every public error derives from OnDeviceError."""
    for name in ondevice.__all__:
        obj = getattr(ondevice, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ondevice.OnDeviceError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an accelerator")
@pytest.mark.parametrize("device", ["cpu:3", 7])
def test_cpu_has_one_device(device: Any) -> None:
    """Without an accelerator, an index past the CPU's single device is an InvalidDeviceError."""
    with pytest.raises(ondevice.InvalidDeviceError, match="cpu|CPU"), on_gpu(net(), device=device):
        pass


def test_fake_device_gone_after_stop() -> None:
    """After the fake GPU stops, 'fakegpu:0' names no device any more."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu():
        pass
    with pytest.raises(ondevice.InvalidDeviceError, match="no fakegpu device"), on_gpu(net(), device="fakegpu:0"):
        pass
