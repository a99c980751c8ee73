"""The residency table's per-weights states across threads, on stub parts whose moves block on an Event (fast tier).

Moves run outside the table's lock: a second claim on weights being loaded or offloaded waits for that
move, and moves of other weights never wait for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ondevice import events
from ondevice.events import MoveEvent
from ondevice.residency import Claim, ResidencyTable, State
from tests.fast.test_table import GPU, Stub, Weights, moves

CPU = torch.device("cpu")
OTHER_GPU = torch.device("cuda", 1)  # a second device (the stubs only record where they are)


def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (bounded) for a state another thread reaches."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def _sleeping(table: ResidencyTable, count: int = 1) -> Callable[[], bool]:
    """Whether ``count`` threads wait on the table's condition (white box: the table counts its sleepers)."""
    return lambda: table._sleepers >= count


class Worker(threading.Thread):
    """Runs ``target`` and keeps what it returned or raised."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.target, self.result, self.error = target, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.target()
        except BaseException as exc:  # noqa: BLE001  (asserted on by the test)
            self.error = exc

    def done(self) -> Any:
        self.join(10)
        assert not self.is_alive(), "the worker is stuck"
        return self.result


def test_a_second_claim_waits_for_the_load_and_never_loads_twice() -> None:
    """Two threads claim the same weights while the first load is in flight: one load, both hold the weights."""
    table, w, gate = ResidencyTable(), Weights(), threading.Event()
    first = Worker(lambda: table.acquire([Stub(w, gate=gate)], GPU))
    _until(lambda: bool(table.held()), "the first claim is loading")
    assert table.held()[0].state is State.LOADING
    second = Worker(lambda: table.acquire([Stub(w)], GPU))
    _until(_sleeping(table), "the second claim waits")
    assert second.is_alive()
    gate.set()
    claims: list[Claim] = [*first.done(), *second.done()]
    assert moves(w) == ["load none"]
    assert claims[0].holding is claims[1].holding and claims[0].holding.state is State.RESIDENT
    table.release(claims)
    assert moves(w) == ["load none", "offload"]
    assert table.held() == []


def test_a_waiter_sees_the_load_fail_and_loads_itself() -> None:
    """The first load fails while a second claim waits for it: the first raises, the second loads and holds."""
    table, w, gate = ResidencyTable(), Weights(), threading.Event()
    first = Worker(lambda: table.acquire([Stub(w, "a", fail_load=True, gate=gate)], GPU))
    _until(lambda: bool(table.held()), "the first claim is loading")
    second = Worker(lambda: table.acquire([Stub(w, "b")], GPU))
    _until(_sleeping(table), "the second claim waits")
    gate.set()
    first.done()
    assert isinstance(first.error, RuntimeError)
    claims = second.done()
    assert moves(w) == ["failed load a", "load b"]
    assert (w.where, w.patches) == (GPU, "b")
    table.release(claims)
    assert table.held() == []


def test_a_waiter_whose_own_load_fails_raises_and_holds_nothing() -> None:
    """The first load fails, and so does the waiter's own: both raise, nothing is held, the weights stay on the CPU."""
    table, w, gate = ResidencyTable(), Weights(), threading.Event()
    first = Worker(lambda: table.acquire([Stub(w, fail_load=True, gate=gate)], GPU))
    _until(lambda: bool(table.held()), "the first claim is loading")
    second = Worker(lambda: table.acquire([Stub(w, fail_load=True)], GPU))
    _until(_sleeping(table), "the second claim waits")
    gate.set()
    first.done()
    second.done()
    assert isinstance(first.error, RuntimeError) and isinstance(second.error, RuntimeError)
    assert table.held() == [] and w.where == CPU


def test_a_claim_during_the_offload_waits_then_loads_again() -> None:
    """A claim on weights whose last release is offloading them waits until they are on the CPU, then loads."""
    table, w, gate = ResidencyTable(), Weights(), threading.Event()
    claims = table.acquire([Stub(w, gate_offload=gate)], GPU)
    releaser = Worker(lambda: table.release(claims))
    _until(lambda: table._held and next(iter(table._held.values())).state is State.OFFLOADING, "offloading")
    claimer = Worker(lambda: table.acquire([Stub(w)], GPU))
    _until(_sleeping(table), "the claim waits for the offload")
    assert table.held() == []  # on its way off: not listed as held
    gate.set()
    releaser.done()
    again = claimer.done()
    assert moves(w) == ["load none", "offload", "load none"]
    assert w.where == GPU
    table.release(again)
    assert table.held() == []


@pytest.mark.parametrize("device", [GPU, OTHER_GPU], ids=["same device", "other device"])
def test_moves_of_other_weights_never_wait_for_a_move_in_flight(device: torch.device) -> None:
    """While one load is blocked, another thread acquires and releases other weights (same or other device)."""
    table, slow, fast, gate = ResidencyTable(), Weights(), Weights(), threading.Event()
    slow_part = Stub(slow, gate=gate)
    blocked = Worker(lambda: table.acquire([slow_part], GPU))
    assert slow_part.started.wait(10)

    def other() -> None:
        table.release(table.acquire([Stub(fast)], device))

    try:
        Worker(other).done()  # finishes while the first load is still in flight
        assert moves(fast) == ["load none", "offload"]
        assert blocked.is_alive() and moves(slow) == []
    finally:
        gate.set()
    table.release(blocked.done())
    assert table.held() == []


def test_a_claim_waits_for_a_forced_offload_then_loads() -> None:
    """force_offload of held weights runs outside the lock; a new claim meanwhile waits, then loads them again."""
    table, w, gate = ResidencyTable(), Weights(), threading.Event()
    outer = table.acquire([Stub(w, gate_offload=gate)], GPU)  # a forced offload moves the held part
    forcer = Worker(lambda: table.force_offload(Stub(w)))
    _until(lambda: table.held()[0].state is State.OFFLOADING, "offloading")
    claimer = Worker(lambda: table.acquire([Stub(w)], GPU))
    _until(_sleeping(table), "the claim waits for the forced offload")
    gate.set()
    forcer.done()
    inner = claimer.done()
    assert moves(w) == ["load none", "offload", "load none"]
    table.release(inner)
    table.release(outer)
    assert table.held() == []


def test_move_events_reach_listeners_on_the_moving_thread_outside_the_lock() -> None:
    """Each move's event is delivered on the thread that moved, while no thread holds the table's lock."""
    table, w = ResidencyTable(), Weights()
    seen: list[tuple[str, int, bool]] = []

    def listener(event: MoveEvent) -> None:
        free = table.lock.rlock.acquire(blocking=False)  # any thread holding it (this one too) makes this fail...
        if free:
            table.lock.rlock.release()
        other = threading.Thread(target=table.held)  # ...and another thread could not read the table
        other.start()
        other.join(10)
        seen.append((event.target.type, threading.get_ident(), free and not other.is_alive()))

    remove = events.add_listener(listener)
    try:
        mover = Worker(lambda: table.release(table.acquire([Stub(w)], GPU)))
        mover.done()
    finally:
        remove()
    assert seen == [("meta", mover.ident, True), ("cpu", mover.ident, True)]


def test_events_wait_while_the_caller_holds_the_lock() -> None:
    """Moves made while the calling thread holds table.lock deliver their events once its outermost hold ends."""
    table, w = ResidencyTable(), Weights()
    seen: list[str] = []
    remove = events.add_listener(lambda event: seen.append(event.target.type))
    try:
        with table.lock:
            with table.lock:
                claims = table.acquire([Stub(w)], GPU)
            assert seen == []
        assert seen == ["meta"]
        table.release(claims)
    finally:
        remove()
    assert seen == ["meta", "cpu"]


def test_a_listener_may_enter_a_scope_on_the_weights_that_moved() -> None:
    """A listener that claims the weights whose load it hears about finds them resident: no wait, no second load."""
    table, w = ResidencyTable(), Weights()
    inner: list[list[Claim]] = []

    def listener(event: MoveEvent) -> None:
        if event.target == GPU and not inner:
            inner.append(table.acquire([Stub(w)], GPU))

    remove = events.add_listener(listener)
    try:
        outer = table.acquire([Stub(w)], GPU)
    finally:
        remove()
    table.release(inner[0])
    table.release(outer)
    assert moves(w) == ["load none", "offload"]
