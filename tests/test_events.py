"""Move events: every load and offload the residency table performs reaches listeners as one MoveEvent."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
import torch

import ondevice
import ondevice.testing
from ondevice import on_gpu
from ondevice.events import MoveEvent, add_listener
from ondevice.residency import table
from ondevice.strategies.module import ModulePart, module_tensors
from ondevice.testing import FakeGPU, capture_moves
from ondevice.testing.capture import capture_moves as capture_moves_itself

CPU = torch.device("cpu")


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module_tensors(module))


def test_module_scope_emits_one_load_and_one_offload(fake_gpu: FakeGPU) -> None:
    """A module's scope emits a load (CPU -> device) as it enters and an offload (device -> CPU) as it exits."""
    m = net()
    with capture_moves() as moves:
        with on_gpu(m):
            assert [move.target for move in moves] == [fake_gpu.device]  # delivered before the block runs
        assert len(moves) == 2
    load, offload = moves
    assert load == MoveEvent(  # pinned in place, copied on a side stream
        "ModulePart(Sequential)",
        CPU,
        fake_gpu.device,
        nbytes(m),
        load.seconds,
        True,
        load.stream,
        "module.to",
        nbytes(m),
    )
    assert load.stream is not None and load.stream.startswith(str(fake_gpu.device))
    assert offload == MoveEvent(  # the weights were not changed on the device: nothing is copied back
        "ModulePart(Sequential)", fake_gpu.device, CPU, nbytes(m), offload.seconds, False, None, "zero-copy", 0
    )
    assert load.seconds >= 0
    assert offload.seconds >= 0


def test_nested_scopes_emit_nothing(fake_gpu: FakeGPU) -> None:
    """Scopes nested in one that holds the module already move nothing, so they emit no event."""
    m = net()
    with on_gpu(m), capture_moves() as moves:
        with on_gpu(m), on_gpu(m):
            pass
        assert moves == []


def test_offload_emits_one_event(fake_gpu: FakeGPU) -> None:
    """ondevice.offload() of a module moved by hand emits one offload event with the bytes it brought back."""
    m = net().to(fake_gpu.device)
    with capture_moves() as moves:
        ondevice.offload(m)
    assert [(e.source, e.target, e.nbytes) for e in moves] == [(fake_gpu.device, CPU, nbytes(m))]


class Failing(torch.nn.Linear):
    """A module whose part cannot load."""


class FailingPart(ModulePart):
    def load(self, device: torch.device) -> None:
        raise RuntimeError("no room")


ondevice.register_strategy(Failing, SimpleNamespace(parts=lambda c: [FailingPart(c)]))


def test_failed_move_emits_nothing(fake_gpu: FakeGPU) -> None:
    """A load that raises is no move: the failed entry emits no event."""
    with capture_moves() as moves, pytest.raises(RuntimeError, match="no room"), on_gpu(Failing(4, 4)):
        pass
    assert moves == []


def test_comfyui_patcher_scope_emits_staged_and_zero_copy_events(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """The SD1.5 UNet's scope emits a pinned, staged load of every byte and a zero-copy offload copying none."""
    size = nbytes(sd15.model.model)
    with capture_moves() as moves, on_gpu(sd15.model):
        pass
    assert [(e.component, e.source, e.target, e.nbytes, e.path, e.copied, e.pinned) for e in moves] == [
        ("PatcherPart(BaseModel)", CPU, fake_gpu.device, size, "staged", size, True),
        ("PatcherPart(BaseModel)", fake_gpu.device, CPU, size, "zero-copy", 0, False),
    ]


def test_raising_listener_is_logged_and_breaks_nothing(fake_gpu: FakeGPU, caplog: pytest.LogCaptureFixture) -> None:
    """A listener that raises is logged; the scope enters and exits, and other listeners still get every event."""

    def broken(event: MoveEvent) -> None:
        raise ValueError("listener bug")

    m = net()
    remove = add_listener(broken)
    try:
        with capture_moves() as moves, caplog.at_level(logging.ERROR, logger="ondevice"), on_gpu(m):
            assert set(ondevice.placement(m)) == {fake_gpu.device}
    finally:
        remove()
    assert set(ondevice.placement(m)) == {CPU}
    assert len(moves) == 2
    assert caplog.text.count("a move listener raised") == 2
    assert "listener bug" in caplog.text


def test_listeners_run_outside_the_tables_lock(fake_gpu: FakeGPU) -> None:
    """A listener may wait for another thread that uses the table: it runs after the table's lock is released."""
    finished: list[bool] = []

    def listener(event: MoveEvent) -> None:
        other = threading.Thread(target=table.held)  # takes the table's lock
        other.start()
        other.join(10)
        finished.append(not other.is_alive())

    remove = add_listener(listener)
    try:
        with on_gpu(net()):
            pass
    finally:
        remove()
    assert finished == [True, True]


def test_capture_moves_records_only_inside_its_block(fake_gpu: FakeGPU) -> None:
    """capture_moves() records the moves of its block only, and is exported lazily from ondevice.testing."""
    m = net()
    with capture_moves() as moves, on_gpu(m):
        pass
    with on_gpu(m):
        pass
    assert len(moves) == 2
    assert ondevice.testing.capture_moves is capture_moves_itself
    assert "capture_moves" in ondevice.testing.__all__


def test_remove_is_idempotent_and_removes_only_its_own_addition(fake_gpu: FakeGPU) -> None:
    """One function added twice is called twice; each remove function takes back one addition, once."""
    seen: list[MoveEvent] = []
    first, second = add_listener(seen.append), add_listener(seen.append)
    try:
        first()
        first()
        with on_gpu(net()):
            pass
    finally:
        second()
    assert len(seen) == 2


def test_ctrl_c_in_a_listener_as_a_scope_enters_holds_nothing(fake_gpu: FakeGPU) -> None:
    """A KeyboardInterrupt raised by a listener on the load event propagates, and the scope holds nothing."""
    m = net()

    def interrupt(event: MoveEvent) -> None:
        if event.target == fake_gpu.device:
            raise KeyboardInterrupt

    remove = add_listener(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), on_gpu(m):
            pytest.fail("the block must not run")
    finally:
        remove()
    assert table.held() == []
    assert {t.device for t in module_tensors(m)} == {CPU}
    assert fake_gpu.memory_allocated() == 0
