"""The streamed path for plain modules larger than their budget (``on_gpu(module, budget=...)``) on the fake GPU."""

from __future__ import annotations

import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.strategies.module import module_tensors
from ondevice.strategies.streaming import streaming
from ondevice.testing import FakeGPU, capture_moves

CPU = torch.device("cpu")
LAYER = 256 * 256 * 4 + 256 * 4  # bytes of one Linear(256, 256)


def stack(layers: int = 4) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks = (torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU()) for _ in range(layers))
    return torch.nn.Sequential(*blocks)


def hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def test_budget_keeps_part_resident_and_streams_the_rest(fake_gpu: FakeGPU) -> None:
    """Two of four layers resident, two streamed per forward: outputs equal the CPU's, memory within the budget plus
    one layer (and the activations), nothing on the device after the scope, no hook left."""
    model = stack()
    x = torch.randn(8, 256)
    with torch.inference_mode():
        want = model(x)
    masters = [t.data_ptr() for t in module_tensors(model)]
    budget = 2 * LAYER + LAYER // 2
    fake_gpu.reset_peak_memory_stats()
    with capture_moves() as moves, on_gpu(model, budget=budget) as scope, torch.inference_mode():
        split = streaming(model)
        assert split is not None and split.streamed == ("2.0", "3.0") and split.working_set == LAYER
        assert fake_gpu.memory_allocated() == 2 * LAYER
        got = model(x.to(scope.device)).cpu()
        assert fake_gpu.memory_allocated() == 2 * LAYER  # streamed layers left again
    assert torch.equal(got, want)
    activations = 4 * 8 * 256 * 4  # a few live activations of the batch
    assert fake_gpu.max_memory_allocated() <= budget + split.working_set + activations
    assert {t.device for t in module_tensors(model)} == {CPU}
    assert [t.data_ptr() for t in module_tensors(model)] == masters  # back on their masters, nothing copied
    assert fake_gpu.memory_allocated() == 0
    assert hooks(model) == 0 and streaming(model) is None
    assert [m.path for m in moves] == ["streamed", "zero-copy"]
    assert moves[0].reason is not None and "2 submodules streamed" in moves[0].reason


def test_budget_larger_than_the_module_loads_it_whole(fake_gpu: FakeGPU) -> None:
    """A budget the module fits is an ordinary load: no hooks, every weight on the device."""
    model = stack(2)
    with on_gpu(model, budget=10 * LAYER) as scope:
        assert streaming(model) is None
        assert {t.device for t in module_tensors(model)} == {scope.device}
    assert hooks(model) == 0


def test_partial_streams_what_does_not_fit_the_free_memory() -> None:
    """partial=True on a fake GPU smaller than the module: the rest streams, outputs equal, all back on the CPU."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    model = stack()
    x = torch.randn(4, 256)
    with torch.inference_mode():
        want = model(x)
    with fake_gpu(memory=3 * LAYER) as gpu:
        with on_gpu(model, partial=True) as scope, torch.inference_mode():
            split = streaming(model)
            assert split is not None and split.streamed
            got = model(x.to(scope.device)).cpu()
        assert gpu.max_memory_allocated() <= 3 * LAYER
        assert gpu.memory_allocated() == 0
    assert torch.equal(got, want)
    assert hooks(model) == 0


def test_an_error_in_a_streamed_forward_still_offloads_everything(fake_gpu: FakeGPU) -> None:
    """A forward that raises inside the scope: the scope still offloads the resident part and removes the hooks."""
    model = stack()
    with pytest.raises(RuntimeError), on_gpu(model, budget=LAYER), torch.inference_mode():
        model(torch.randn(3, 7, device=fake_gpu.device))  # wrong width: the first layer raises
    assert {t.device for t in module_tensors(model)} == {CPU}
    assert fake_gpu.memory_allocated() == 0
    assert hooks(model) == 0


def test_a_single_layer_module_larger_than_its_budget_streams_itself(fake_gpu: FakeGPU) -> None:
    """One Linear over its budget: nothing resident, its own forward streams it in and out; the budget holds."""
    model = torch.nn.Linear(256, 256)
    x = torch.randn(2, 256)
    with torch.inference_mode():
        want = model(x)
    fake_gpu.reset_peak_memory_stats()
    with on_gpu(model, budget=LAYER // 2) as scope, torch.inference_mode():
        assert fake_gpu.memory_allocated() == 0
        got = model(x.to(scope.device)).cpu()
        assert fake_gpu.memory_allocated() == 0
    assert torch.equal(got, want)
    assert fake_gpu.max_memory_allocated() <= LAYER + 2 * 2 * 256 * 4
    assert fake_gpu.memory_allocated() == 0 and hooks(model) == 0


def test_budget_on_a_module_whose_class_overrides_to_is_refused(fake_gpu: FakeGPU) -> None:
    """A module class with its own ``to`` moves only whole: a budget it does not fit raises, naming the part."""

    class Custom(torch.nn.Linear):
        def to(self, *args: object, **kwargs: object) -> Custom:  # type: ignore[override]
            return super().to(*args, **kwargs)  # type: ignore[arg-type, return-value]

    with pytest.raises(ondevice.InvalidArgumentError, match="loaded whole"), on_gpu(Custom(256, 256), budget=1024):
        pass
    assert fake_gpu.memory_allocated() == 0
