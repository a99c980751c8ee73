"""Pinned loads of plain modules: masters pinned in place once, copied on a side stream, waited for, capped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ondevice import on_gpu
from ondevice import pinning as ondevice_pinning
from ondevice.residency import table
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU, fake_gpu
from ondevice.testing.fakegpu import stats

CPU = torch.device("cpu")


def net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers()))


def pointers(module: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in module.named_parameters()}


def the_part(module: torch.nn.Module) -> ModulePart:
    """The part the residency table holds for ``module`` (call inside a scope)."""
    [part] = [h.part for h in table.held() if h.key is module]
    assert isinstance(part, ModulePart)
    return part


@pytest.fixture
def no_cap() -> Iterator[None]:
    """ondevice's pinned-memory cap lifted for the test, and restored after it."""
    limit = ondevice_pinning.pinned_limit()
    ondevice_pinning.set_pinned_limit(None)
    try:
        yield
    finally:
        ondevice_pinning.set_pinned_limit(limit)


@pytest.fixture
def fake(no_cap: None) -> Iterator[FakeGPU]:
    """A fake GPU with no pinned-memory cap, ondevice's lifted too."""
    with fake_gpu() as handle:
        yield handle


def test_masters_are_pinned_in_place_without_a_copy(fake: FakeGPU) -> None:
    """The load pins the module's own CPU storages (same pointers, is_pinned), adding exactly the module's bytes."""
    m = net()
    before, host = pointers(m), torch.fakegpu.pinned_bytes()  # type: ignore[attr-defined]
    with on_gpu(m):
        part = the_part(m)
        assert (part.last_pinned, part.last_stream, part.last_fallback) == (True, "fakegpu:0:side", None)
        assert torch.fakegpu.pinned_bytes() - host == module_bytes(m)  # type: ignore[attr-defined]
    assert pointers(m) == before
    assert all(p.is_pinned() for p in m.parameters())
    assert ondevice_pinning.unpin(m) == module_bytes(m)
    assert not any(p.is_pinned() for p in m.parameters())
    assert torch.fakegpu.pinned_bytes() == host  # type: ignore[attr-defined]


def test_outputs_inside_the_scope_are_bit_identical(fake: FakeGPU) -> None:
    """A forward right after a pinned side-stream load equals the forward without ondevice (a missing wait: NaN)."""
    m, x = net(), torch.randn(8, 16)
    with torch.no_grad():
        expected = m(x)
        with on_gpu(m):
            assert the_part(m).last_pinned
            got = m(x.to(fake.device)).cpu()
    assert torch.equal(got, expected)


def test_exit_is_zero_copy_and_frees_the_device(fake: FakeGPU) -> None:
    """Leaving a pinned scope, even with no op run in it, copies nothing back and frees all device memory."""
    m = net()
    stats.reset()
    with on_gpu(m):
        part = the_part(m)
    assert stats.to_cpu_bytes == 0
    assert (part.last_move, part.copied_bytes, part.last_pinned) == ("zero-copy", 0, False)
    assert fake.memory_allocated() == 0


def test_a_pinned_load_that_runs_out_of_memory_leaves_everything_on_the_cpu(no_cap: None) -> None:
    """An OOM halfway through the side-stream copy raises, frees the device and leaves the weights as they were."""
    m = net()
    expected = {name: t.clone() for name, t in m.state_dict().items()}
    with fake_gpu(memory=module_bytes(m) // 2) as handle:
        with pytest.raises(torch.OutOfMemoryError), on_gpu(m):
            pass
        assert handle.memory_allocated() == 0
    assert all(t.device == CPU for t in m.state_dict().values())
    assert all(torch.equal(t, expected[name]) for name, t in m.state_dict().items())


def test_repeated_scopes_do_not_pin_again(fake: FakeGPU) -> None:
    """Pinning is a one-time cost: later scopes find the masters pinned and register nothing more."""
    m = net()
    with on_gpu(m):
        pass
    host, ours = torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()  # type: ignore[attr-defined]
    for _ in range(3):
        with on_gpu(m):
            assert the_part(m).last_pinned
    assert (torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()) == (host, ours)  # type: ignore[attr-defined]


def test_past_the_cap_loads_fall_back_to_pageable_copies(fake: FakeGPU) -> None:
    """A module that would pass ondevice's pinned-memory cap is loaded pageable, correctly, with no error."""
    m, x = net(), torch.randn(2, 16)
    ondevice_pinning.set_pinned_limit(module_bytes(m) - 1)
    with torch.no_grad():
        expected = m(x)
        with on_gpu(m):
            part = the_part(m)
            got = m(x.to(fake.device)).cpu()
    assert (part.last_pinned, part.last_stream) == (False, None)
    assert not any(p.is_pinned() for p in m.parameters())
    assert torch.equal(got, expected)
    assert fake.memory_allocated() == 0


def test_a_failed_registration_falls_back_and_pins_nothing(no_cap: None) -> None:
    """The backend's own cap (a failing cudaHostRegister) makes the load pageable, with nothing left pinned."""
    m = net()
    with fake_gpu() as handle:
        host, ours = torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()  # type: ignore[attr-defined]
        torch.fakegpu.set_pinned_limit(host + module_bytes(m) // 2)  # type: ignore[attr-defined]
        try:
            with on_gpu(m):
                part = the_part(m)
                assert (part.last_pinned, part.last_stream) == (False, None)
                assert part.last_fallback is not None
                assert "failed" in part.last_fallback
                assert handle.memory_allocated() == module_bytes(m)
        finally:
            torch.fakegpu.set_pinned_limit(None)  # type: ignore[attr-defined]
        assert (torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()) == (host, ours)  # type: ignore[attr-defined]


def test_tensors_pinned_by_others_are_not_pinned_again(fake: FakeGPU) -> None:
    """Storages ComfyUI or the user pinned (in place or by pin_memory()) stay theirs: not pinned twice nor undone."""
    m = net()
    torch.fakegpu.host_register(m[0].weight)  # type: ignore[attr-defined]
    with torch.no_grad():
        m[2].weight.data = m[2].weight.pin_memory()
    others = m[0].weight.nbytes + m[2].weight.nbytes
    host = torch.fakegpu.pinned_bytes()  # type: ignore[attr-defined]
    with on_gpu(m):
        assert the_part(m).last_pinned
    assert torch.fakegpu.pinned_bytes() - host == module_bytes(m) - others  # type: ignore[attr-defined]
    assert ondevice_pinning.unpin(m) == module_bytes(m) - others
    assert m[0].weight.is_pinned()
    assert m[2].weight.is_pinned()
    assert not m[0].bias.is_pinned()
    torch.fakegpu.host_unregister(m[0].weight)  # type: ignore[attr-defined]  # raises if ondevice had undone it


def test_pins_are_undone_when_the_module_dies(fake: FakeGPU) -> None:
    """Pins are held weakly by module: garbage collecting it unregisters what ondevice pinned for it."""
    m = net()
    with on_gpu(m):
        pass
    host, ours = torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()  # type: ignore[attr-defined]
    size = module_bytes(m)
    del m
    assert (torch.fakegpu.pinned_bytes(), ondevice_pinning.pinned_bytes()) == (host - size, ours - size)  # type: ignore[attr-defined]


def test_set_pinned_limit_rejects_a_bad_cap() -> None:
    """A cap that is not a non-negative int of bytes (or None) is refused with a ValueError naming it."""
    with pytest.raises(ValueError, match="nbytes=-1"):
        ondevice_pinning.set_pinned_limit(-1)
    with pytest.raises(ValueError, match="nbytes='1GB'"):
        ondevice_pinning.set_pinned_limit("1GB")  # type: ignore[arg-type]
