"""Prefetch on the fake GPU: ``ondevice.prefetch`` and ``on_gpu(a, prefetch=b)`` with real modules and late copies.

The fake GPU's side streams land copies late (only once waited for), so a scope that ran on prefetched
weights without joining their copies would compute NaN instead of passing by luck.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.errors import NoStrategyError, ResidencyConflictError
from ondevice.residency import table
from ondevice.strategies.module import ModulePart, module_tensors
from ondevice.testing import FakeGPU, capture_moves

CPU = torch.device("cpu")


def linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 16)


def forward(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The module's output for ``x`` computed on ``device`` (on the current stream), on the CPU."""
    with torch.inference_mode():
        return module(x.to(device)).cpu()


def where(module: torch.nn.Module) -> set[torch.device]:
    return {t.device for t in module_tensors(module)}


class Late(torch.nn.Linear):
    """A Linear moved by LatePart."""


class LatePart(ModulePart):
    """Prefetch: ``non_blocking`` copies on a side stream the current stream does not wait for.

    ``join`` makes the current stream wait for them, unless the class says ``joins = False`` (the bug a
    table that forgot to join would have).
    """

    joins = True

    def prefetch(self, device: torch.device) -> None:
        backend = torch.get_device_module(device)
        side = backend.Stream(device)
        side.wait_stream(backend.current_stream(device))
        with backend.stream(side):
            self.module.to(device, non_blocking=True)
            landed = backend.Event()
            landed.record(side)
        self._join: Callable[[], None] = lambda: backend.current_stream(device).wait_event(landed)

    def join(self) -> None:
        if self.joins:
            self._join()


class NoJoinPart(LatePart):
    joins = False


class LateStrategy:
    def __init__(self, part: type[LatePart]) -> None:
        self.part = part

    def parts(self, component: Any) -> Sequence[LatePart]:
        return [self.part(component)]


class NoJoin(Late):
    """A Linear moved by NoJoinPart."""


class Failing(torch.nn.Linear):
    """A Linear whose prefetch fails."""


class FailingPart(ModulePart):
    def prefetch(self, device: torch.device) -> None:
        msg = "prefetch failed"
        raise RuntimeError(msg)


class FailingStrategy:
    def parts(self, component: Any) -> Sequence[FailingPart]:
        return [FailingPart(component)]


@pytest.fixture
def gpu(fake_gpu: FakeGPU) -> Iterator[FakeGPU]:
    """The fake GPU; a test that leaves a prefetch unclaimed fails, and it is cancelled while the GPU is still on."""
    yield fake_gpu
    leaked = [holding for holding in table.held() if holding.prefetched]
    for holding in leaked:
        table.cancel(holding)  # the shared leak check (conftest) releases claims only
    assert not leaked, f"prefetches left on the device: {[h.part for h in leaked]}"


ondevice.register_strategy(Late, LateStrategy(LatePart))
ondevice.register_strategy(NoJoin, LateStrategy(NoJoinPart))
ondevice.register_strategy(Failing, FailingStrategy())


def test_on_gpu_prefetch_then_a_scope_on_it_computes_right(gpu: FakeGPU) -> None:
    """on_gpu(a, prefetch=b) starts b's copies at a's entry; with on_gpu(b) adopts them and computes as the CPU does."""
    a, b, x = linear(0), linear(1), torch.randn(4, 16)
    want_a, want_b = a(x).detach(), b(x).detach()
    with capture_moves() as moves:
        with on_gpu(a, prefetch=b) as scope:
            assert torch.allclose(forward(a, x, scope.device), want_a)
            assert scope.prefetched is not None and scope.prefetched.pending
        assert where(a) == {CPU} and where(b) == {gpu.device}  # b stays until a scope on it exits
        loads = len(moves)
        with on_gpu(b):
            assert len(moves) == loads  # adopted: nothing loaded
            assert torch.allclose(forward(b, x, gpu.device), want_b)
    assert [(m.component, m.target) for m in moves] == [
        ("ModulePart(Linear)", gpu.device),
        ("ModulePart(Linear)", gpu.device),
        ("ModulePart(Linear)", CPU),
        ("ModulePart(Linear)", CPU),
    ]
    assert where(b) == {CPU} and not scope.prefetched.pending
    assert table.held() == [] and gpu.memory_allocated() == 0


def test_the_table_joins_late_copies_before_the_block_runs(gpu: FakeGPU) -> None:
    """A part whose prefetch leaves copies in flight computes right in the scope that adopts it (the table joins)."""
    m, x = Late(16, 16), torch.randn(4, 16)
    want = m(x).detach()
    ondevice.prefetch(m)
    with on_gpu(m):
        assert torch.allclose(forward(m, x, gpu.device), want)
    assert where(m) == {CPU} and torch.allclose(m(x), want)
    assert gpu.memory_allocated() == 0


def test_without_a_join_the_copies_in_flight_read_as_nan(gpu: FakeGPU) -> None:
    """The same part with a join that does nothing computes NaN: the late copies catch a missing join."""
    m, x = NoJoin(16, 16), torch.randn(4, 16)
    ondevice.prefetch(m)
    with on_gpu(m):
        assert torch.isnan(forward(m, x, gpu.device)).all()
        ondevice.devices.synchronize(gpu.device)  # land the copies: the offload reads real weights
    assert gpu.memory_allocated() == 0


def test_module_prefetch_does_not_hold_up_the_current_stream(gpu: FakeGPU) -> None:
    """ModulePart's prefetch leaves the current stream free (reading the weights early sees copies in flight, NaN);
    the scope that adopts them joins, and computes right."""
    m, x = linear(2), torch.randn(4, 16)
    want = m(x).detach()
    with capture_moves() as moves:
        ahead = ondevice.prefetch(m)
    assert [(e.target, e.pinned, e.stream is not None) for e in moves] == [(gpu.device, True, True)]
    assert torch.isnan(m.weight.cpu()).all()  # read on the current stream, which does not wait for the copy
    with on_gpu(m):
        assert torch.allclose(forward(m, x, gpu.device), want)
    assert not ahead.pending and where(m) == {CPU}
    assert torch.allclose(m(x), want)
    assert gpu.memory_allocated() == 0


def test_prefetch_handle_cancels_what_no_scope_claimed(gpu: FakeGPU) -> None:
    """ondevice.prefetch as a context manager cancels at exit; cancel() twice is harmless; offload() cancels too."""
    a, b = linear(0), linear(1)
    with ondevice.prefetch(a, device=gpu.device) as ahead:
        assert where(a) == {gpu.device} and ahead.pending
        assert [h.key for h in table.held()] == [a]
    assert where(a) == {CPU} and not ahead.pending
    ahead.cancel()
    ondevice.prefetch(b)
    ondevice.offload(b)
    assert where(b) == {CPU} and table.held() == []
    assert gpu.memory_allocated() == 0


def test_a_prefetch_of_held_weights_changes_nothing(gpu: FakeGPU) -> None:
    """Prefetching what a scope holds is a no-op: the scope's exit offloads it as usual."""
    a = linear(0)
    with on_gpu(a), capture_moves() as moves:
        ahead = ondevice.prefetch(a)
        assert moves == [] and not ahead.pending
    assert where(a) == {CPU} and table.held() == []


def test_a_failed_prefetch_releases_the_scope_it_was_entering(gpu: FakeGPU) -> None:
    """on_gpu(a, prefetch=b) whose prefetch of b fails: a is released again, the error raised, nothing held."""
    a, b = linear(0), Failing(16, 16)
    with pytest.raises(RuntimeError, match="prefetch failed"), on_gpu(a, prefetch=b):
        pytest.fail("the block must not run")
    assert where(a) == where(b) == {CPU}
    assert table.held() == [] and gpu.memory_allocated() == 0


def test_a_prefetch_argument_without_a_strategy_fails_before_anything_moves(gpu: FakeGPU) -> None:
    """on_gpu(a, prefetch=object()) raises NoStrategyError naming the prefetch argument; a never loads."""
    a = linear(0)
    with capture_moves() as moves, pytest.raises(NoStrategyError) as info, on_gpu(a, prefetch=[object()]):
        pytest.fail("the block must not run")
    assert moves == []
    assert "(prefetch argument 0: object)" in getattr(info.value, "__notes__", [])


def test_a_prefetch_on_another_device_than_the_holding_raises(fake_gpu_two: Any) -> None:
    """Weights held on fakegpu:0 and prefetched for fakegpu:1: ResidencyConflictError; they stay where they are."""
    a = linear(0)
    with on_gpu(a, device="fakegpu:0"):
        with pytest.raises(ResidencyConflictError, match="held on fakegpu:0"):
            ondevice.prefetch(a, device="fakegpu:1")
        assert where(a) == {torch.device("fakegpu", 0)}
    assert where(a) == {CPU}


def test_prefetch_takes_a_list_of_components(gpu: FakeGPU) -> None:
    """on_gpu(a, prefetch=[b, c]) prefetches both; its repr names them."""
    a, b, c = linear(0), linear(1), linear(2)
    scope = on_gpu(a, prefetch=[b, c])
    assert repr(scope) == "on_gpu(Linear, device=None, prefetch=(Linear, Linear))"
    with scope as handle:
        assert where(b) == where(c) == {gpu.device}
    assert handle.prefetched is not None
    handle.prefetched.cancel()
    assert where(b) == where(c) == {CPU} and table.held() == []
