"""Zero-copy offload of plain modules: unchanged weights go back to their CPU masters, changed ones are copied."""

from __future__ import annotations

import copy

import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.residency import table
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU, fake_gpu
from ondevice.testing.fakegpu import FakeGPUStats, stats

CPU = torch.device("cpu")


def net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def storages(module: torch.nn.Module) -> dict[str, int]:
    """Each parameter's and buffer's CPU data pointer, by name."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    assert all(t.device == CPU for t in named.values())
    return {name: t.data_ptr() for name, t in named.items()}


def values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}


def same_values(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@pytest.fixture
def copies() -> FakeGPUStats:
    """The fake GPU's byte counters, zeroed as the test starts (``copies.to_cpu_bytes``: device -> host)."""
    stats.reset()
    return stats


def the_part(module: torch.nn.Module) -> ModulePart:
    """The part the residency table holds for ``module`` (call inside a scope)."""
    [part] = [h.part for h in table.held() if h.key is module]
    assert isinstance(part, ModulePart)
    return part


def test_exit_copies_nothing_back_for_unchanged_weights(fake_gpu: FakeGPU) -> None:
    """Leaving the scope copies zero bytes device -> host, says so on the part, and frees the device memory."""
    m = net()
    with on_gpu(m):
        part = the_part(m)
        assert part.last_move == "module.to"
        assert part.copied_bytes == sum(nbytes(t) for t in m.parameters())
        assert fake_gpu.memory_allocated() == part.copied_bytes
        stats.reset()
    assert stats.to_cpu_bytes == 0
    assert (part.last_move, part.copied_bytes) == ("zero-copy", 0)
    assert fake_gpu.memory_allocated() == 0


def test_weights_come_back_as_the_very_same_cpu_storages(fake_gpu: FakeGPU) -> None:
    """After the scope every parameter is the CPU storage it was before, still a Parameter with its requires_grad."""
    m = net()
    m[2].bias.requires_grad_(False)
    before, grads = storages(m), {n: p.requires_grad for n, p in m.named_parameters()}
    with on_gpu(m):
        assert all(p.device == fake_gpu.device for p in m.parameters())
    assert storages(m) == before
    assert all(type(p) is torch.nn.Parameter for p in m.parameters())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == grads


def test_outputs_inside_the_scope_are_bit_identical(fake_gpu: FakeGPU) -> None:
    """A forward inside the scope equals the same forward without ondevice, bit for bit, and so do the weights."""
    m, x = net(), torch.randn(8, 16)
    with torch.no_grad():
        expected = m(x)
        with on_gpu(m):
            got = m(x.to(fake_gpu.device)).cpu()
        again = m(x)
    assert torch.equal(got, expected)
    assert torch.equal(again, expected)


def test_weight_modified_in_place_on_the_device_is_written_back(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """An in-place change on the device reaches the CPU; only that weight's bytes are copied, the rest re-pointed."""
    m = net()
    before, expected = storages(m), m[0].weight.detach() + 1
    with on_gpu(m):
        with torch.no_grad():
            m[0].weight.add_(1)
        part = the_part(m)
    assert torch.equal(m[0].weight, expected)
    assert copies.to_cpu_bytes == part.copied_bytes == nbytes(m[0].weight)
    assert part.last_move == "zero-copy"
    assert {n: p for n, p in storages(m).items() if n != "0.weight"} == {
        n: p for n, p in before.items() if n != "0.weight"
    }
    assert storages(m)["0.weight"] != before["0.weight"]  # new host memory: the master is left as it was
    assert isinstance(m[0].weight, torch.nn.Parameter)
    assert m[0].weight.requires_grad


def test_in_place_change_through_a_view_or_under_inference_mode_is_written_back(fake_gpu: FakeGPU) -> None:
    """Changes through a view, a detach() alias and under inference_mode move the version counter: written back."""
    m = net()
    expected = values(m)
    expected["0.weight"][0] *= 2
    expected["2.bias"] += 3
    expected["0.bias"].zero_()
    with on_gpu(m):
        with torch.no_grad():
            m[0].weight[0].mul_(2)
        m[2].bias.detach().add_(3)
        with torch.inference_mode():
            m[0].bias.zero_()
    assert same_values(values(m), expected)


def test_writes_through_data_are_not_seen(fake_gpu: FakeGPU) -> None:
    """The documented choice: `.data` has its own version counter, so a write through it is lost at exit."""
    m = net()
    expected = values(m)
    with on_gpu(m):
        m[0].weight.data.add_(1)
        assert not torch.equal(m[0].weight.cpu(), expected["0.weight"])
    assert same_values(values(m), expected)


def test_batchnorm_running_stats_updated_in_train_mode_are_written_back(
    fake_gpu: FakeGPU, copies: FakeGPUStats
) -> None:
    """A train-mode forward updates BatchNorm's buffers without moving their version: they are copied back."""
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8)).train()
    reference, x = copy.deepcopy(m), torch.randn(4, 16)
    with torch.no_grad():
        reference(x)
        with on_gpu(m):
            m(x.to(fake_gpu.device))
    assert same_values(values(m), values(reference))
    assert int(m[1].num_batches_tracked) == 1
    assert copies.to_cpu_bytes == sum(nbytes(b) for b in m.buffers())  # the weights went back without a copy


def test_other_buffers_come_back_without_a_copy(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """A buffer outside a batch norm is unchanged: re-pointed, the very same tensor object as before."""
    m = net()
    m.register_buffer("scale", torch.arange(4.0))
    scale = m.scale
    with on_gpu(m):
        assert m.scale.device == fake_gpu.device
    assert m.scale is scale
    assert copies.to_cpu_bytes == 0


def test_replaced_parameter_is_copied_back(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """A parameter replaced inside the scope (a new object) comes back by copy; the others are re-pointed."""
    m = net()
    before = storages(m)
    with on_gpu(m):
        m[2].weight = torch.nn.Parameter(torch.ones(4, 32, device=fake_gpu.device))
    assert torch.equal(m[2].weight, torch.ones(4, 32))
    assert isinstance(m[2].weight, torch.nn.Parameter)
    assert copies.to_cpu_bytes == nbytes(m[2].weight)
    assert {n: p for n, p in storages(m).items() if n != "2.weight"} == {
        n: p for n, p in before.items() if n != "2.weight"
    }


def test_dtype_changed_inside_the_scope_is_copied_back(fake_gpu: FakeGPU) -> None:
    """m.half() inside the scope makes new tensors: the module comes back in half precision, by copy."""
    m = net()
    expected = {name: t.half() for name, t in values(m).items()}
    with on_gpu(m):
        m.half()
    assert same_values(values(m), expected)
    assert fake_gpu.memory_allocated() == 0


def test_nested_scopes_load_once_and_offload_once(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """Nested scopes on one module copy it to the device once and back not at all."""
    m = net()
    before = storages(m)
    with on_gpu(m):
        with on_gpu(m), on_gpu(m):
            pass
        assert all(p.device == fake_gpu.device for p in m.parameters())
    assert stats.to_fake_bytes == sum(nbytes(p) for p in m.parameters())
    assert copies.to_cpu_bytes == 0
    assert storages(m) == before


def test_scope_on_a_submodule_inside_one_on_the_whole(fake_gpu: FakeGPU) -> None:
    """The inner scope's exit copies its submodule back; the reload keeps the rest's masters; all ends right."""
    m = net()
    expected, before = values(m), storages(m)
    with on_gpu(m):
        with on_gpu(m[0]):
            pass
        assert all(p.device == fake_gpu.device for p in m.parameters())
        stats.reset()
    assert stats.to_cpu_bytes == 0
    assert same_values(values(m), expected)
    assert {n: p for n, p in storages(m).items() if n.startswith("2.")} == {
        n: p for n, p in before.items() if n.startswith("2.")
    }
    assert fake_gpu.memory_allocated() == 0


def test_module_partly_on_the_device_already(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """What was on the CPU at the load comes back zero-copy; what was on the device already is copied to the CPU."""
    m = net()
    before = storages(m[2])
    m[0].to(fake_gpu.device)
    with on_gpu(m):
        pass
    assert storages(m[2]) == before
    assert copies.to_cpu_bytes == sum(nbytes(p) for p in m[0].parameters())
    assert fake_gpu.memory_allocated() == 0


def test_tied_weights_come_back_to_their_one_storage(fake_gpu: FakeGPU) -> None:
    """A parameter shared by two submodules comes back to its storage under both names."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    m[1].weight = m[0].weight
    ptr = m[0].weight.data_ptr()
    with on_gpu(m):
        pass
    assert m[0].weight.data_ptr() == m[1].weight.data_ptr() == ptr
    assert fake_gpu.memory_allocated() == 0


def test_scope_under_inference_mode_leaves_no_inference_tensors(fake_gpu: FakeGPU) -> None:
    """A scope entered and left under inference_mode gives the module back as it was, not as inference tensors."""
    m, x = net(), torch.randn(2, 16)
    before = storages(m)
    with torch.inference_mode(), on_gpu(m):
        m(x.to(fake_gpu.device))
    assert storages(m) == before
    assert not any(p.is_inference() for p in m.parameters())
    m(x).sum().backward()  # it still trains


def test_module_built_under_inference_mode_round_trips(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """A module whose weights are inference tensors (built inside inference_mode) comes back zero-copy, unchanged."""
    with torch.inference_mode():
        m = net()
    before, expected = storages(m), values(m)
    with on_gpu(m), torch.inference_mode():
        m(torch.randn(2, 16, device=fake_gpu.device))
    assert storages(m) == before
    assert same_values(values(m), expected)
    assert copies.to_cpu_bytes == 0


def test_failed_load_points_back_without_a_copy() -> None:
    """A load that runs out of device memory halfway leaves every weight on its own CPU storage, nothing copied."""
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 32))
    before = storages(m)
    with fake_gpu(memory=3000) as gpu:
        stats.reset()
        with pytest.raises(torch.OutOfMemoryError), on_gpu(m):
            pass
        assert stats.to_cpu_bytes == 0
        assert gpu.memory_allocated() == 0
    assert storages(m) == before


class OwnTo(torch.nn.Linear):
    """A module whose class overrides to(): it may move more than its tensors, so it moves by module.to."""

    def to(self, *args: object, **kwargs: object) -> OwnTo:  # type: ignore[override]
        return super().to(*args, **kwargs)  # type: ignore[arg-type]


def test_module_that_overrides_to_moves_by_module_to(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """A class with its own to() is offloaded by module.to: every byte copied, the part says so."""
    m = OwnTo(16, 8)
    expected = values(m)
    with on_gpu(m):
        part = the_part(m)
    assert (part.last_move, part.copied_bytes) == ("module.to", copies.to_cpu_bytes)
    assert copies.to_cpu_bytes == sum(nbytes(p) for p in m.parameters())
    assert same_values(values(m), expected)


def test_offload_by_hand_inside_a_scope_is_zero_copy_too(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """ondevice.offload() of a held module re-points it; the next scope loads it again with fresh masters."""
    m = net()
    before = storages(m)
    with on_gpu(m):
        ondevice.offload(m)
        assert storages(m) == before
        with on_gpu(m):
            assert all(p.device == fake_gpu.device for p in m.parameters())
    assert storages(m) == before
    assert copies.to_cpu_bytes == 0


def test_training_step_inside_the_scope_is_written_back(fake_gpu: FakeGPU) -> None:
    """An optimizer step on the device moves every parameter's version: all are copied back, gradients too."""
    m, x = net(), torch.randn(8, 16)
    reference = copy.deepcopy(m)
    torch.optim.SGD(reference.parameters(), lr=0.1).zero_grad()
    reference(x).square().sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    with on_gpu(m):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x.to(fake_gpu.device)).square().sum().backward()
        optimizer.step()
        del optimizer
    assert same_values(values(m), values(reference))
    assert all(p.grad is not None and p.grad.device == CPU for p in m.parameters())


def test_module_moved_to_the_cpu_by_hand_inside_the_scope(fake_gpu: FakeGPU, copies: FakeGPUStats) -> None:
    """m.to('cpu') inside a scope: scope.ensure() loads it back, and the exit returns to those CPU tensors."""
    m = net()
    expected = values(m)
    with on_gpu(m) as scope:
        m.to(CPU)
        moved = storages(m)
        scope.ensure()
        with on_gpu(m):
            assert all(p.device == fake_gpu.device for p in m.parameters())
        stats.reset()
    assert storages(m) == moved
    assert same_values(values(m), expected)
    assert copies.to_cpu_bytes == 0


def test_fused_optimizer_step_inside_the_scope_is_kept(fake_gpu: FakeGPU) -> None:
    """A fused Adam step writes parameters without moving their version counter: they have gradients, so they
    are copied back, and the trained values survive the exit."""
    m = torch.nn.Linear(4, 4)
    with torch.no_grad():
        m.weight.fill_(1.0)
    with on_gpu(m) as scope:
        optimizer = torch.optim.Adam(m.parameters(), lr=0.5, fused=True)
        m(torch.ones(2, 4, device=scope.device)).sum().backward()
        optimizer.step()
        trained = m.weight.detach().cpu()
    assert not torch.equal(trained, torch.ones(4, 4))
    assert torch.equal(m.weight.detach(), trained)


def test_swap_mode_round_trip() -> None:
    """With torch's swap-on-conversion mode (Module._apply swaps parameter objects, as for tensor-subclass weights),
    a load and a zero-copy offload work: ondevice holds no weakref on the tensors, which would block the swap."""
    m = torch.nn.Linear(8, 8)
    before = values(m)
    part = ModulePart(m)
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        part.load(torch.device("meta"))  # the fake GPU's own tensors carry weakrefs; meta ones do not
        assert {t.device.type for t in m.parameters()} == {"meta"}
        part.offload()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert part.last_move == "zero-copy"
    assert same_values(values(m), before)


def test_copies_back_are_normal_tensors_when_a_master_is_an_inference_tensor(fake_gpu: FakeGPU) -> None:
    """A buffer made under inference_mode does not turn the weights copied back into inference tensors."""
    m = torch.nn.Linear(4, 4)
    with torch.inference_mode():
        m.register_buffer("scale", torch.ones(4))
    with on_gpu(m) as scope:
        torch.optim.SGD(m.parameters(), lr=0.1).zero_grad()
        m(torch.ones(1, 4, device=scope.device)).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert not m.weight.is_inference()
    m(torch.ones(1, 4)).sum().backward()
    torch.optim.SGD(m.parameters(), lr=0.1).step()  # an in-place update outside inference mode works
