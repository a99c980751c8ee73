"""The residency table's memory policy on stub parts and stub device memories (fast tier): eviction, keeps,
waiting first come first served, timeouts, atomic acquires, budgets, moves between devices, aborts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ondevice.errors import OutOfDeviceMemory, ResidencyConflictError
from ondevice.residency import AbortedError, Claim, ResidencyTable, WouldBlock
from tests.fast.test_table import GPU, Stub, Weights, moves
from tests.fast.test_table_threads import Worker, _until

CPU = torch.device("cpu")
GPU1 = torch.device("cuda", 1)  # a second device (the stubs only record where they are)
UNIT = 100


class Card:
    """One device's memory for stub parts: bytes charged against a capacity, and the peak."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used, self.peak = capacity, 0, 0
        self.lock = threading.Lock()

    def charge(self, nbytes: int) -> None:
        with self.lock:
            if self.used + nbytes > self.capacity:
                msg = f"stub out of memory: {nbytes} more on {self.used} of {self.capacity}"
                raise torch.OutOfMemoryError(msg)
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def discharge(self, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes


class Mem(Weights):
    """Weights of ``size`` bytes; ``charged`` is what they hold on which card now."""

    def __init__(self, name: str, size: int = UNIT) -> None:
        super().__init__()
        self.name, self.size = name, size
        self.charged: tuple[Card, int] | None = None


class Sized(Stub):
    """A stub part whose load charges its card (``torch.OutOfMemoryError`` past capacity) and offload gives it back.

    ``claims_bytes``: what it says ``nbytes()`` is (a part may under-count, as ComfyUI's headroom does).
    """

    def __init__(self, weights: Mem, cards: dict[torch.device, Card], **kwargs: Any) -> None:
        super().__init__(weights, **kwargs)
        self.mem, self.cards = weights, cards
        self.claims_bytes = weights.size

    def nbytes(self) -> int:
        return self.claims_bytes

    def load(self, device: torch.device) -> None:
        self._charge(device, self.mem.size)
        try:
            super().load(device)
        except BaseException:
            self.offload()
            raise

    def load_partial(self, device: torch.device, budget: int | None) -> None:
        card = self.cards[device]
        nbytes = min(self.mem.size, card.capacity - card.used if budget is None else budget)
        self._charge(device, nbytes)
        self.weights.where, self.weights.patches = device, self.patches
        self.weights.moves.append(f"load_partial {budget}")

    def resident_nbytes(self, device: torch.device) -> int:
        charged = self.mem.charged
        return charged[1] if charged is not None and charged[0] is self.cards[device] else 0

    def offload(self) -> None:
        super().offload()
        if self.mem.charged is not None:
            card, nbytes = self.mem.charged
            self.mem.charged = None
            card.discharge(nbytes)

    def _charge(self, device: torch.device, nbytes: int) -> None:
        if self.mem.charged is not None:  # a swap of patches: what the weights took before is given back first
            earlier, taken = self.mem.charged
            self.mem.charged = None
            earlier.discharge(taken)
        card = self.cards[device]
        card.charge(nbytes)
        self.mem.charged = (card, nbytes)

    def __repr__(self) -> str:
        return f"Sized({self.mem.name})"


class Rig:
    """A table whose devices are stub cards (``GPU``, ``GPU1``), and parts that charge them."""

    def __init__(self, capacity: int = 2 * UNIT, capacity1: int = 2 * UNIT) -> None:
        self.cards = {GPU: Card(capacity), GPU1: Card(capacity1)}
        self.table = ResidencyTable(memory_info=self.info)

    def info(self, device: torch.device) -> tuple[int, int]:
        card = self.cards[device]
        return card.capacity - card.used, card.capacity

    def part(self, weights: Mem, **kwargs: Any) -> Sized:
        return Sized(weights, self.cards, **kwargs)

    def acquire(self, *weights: Mem, device: torch.device = GPU, **kwargs: Any) -> list[Claim]:
        return self.table.acquire([self.part(w) for w in weights], device, **kwargs)

    def keep(self, *weights: Mem, device: torch.device = GPU) -> None:
        self.table.release(self.acquire(*weights, device=device, keep=True))

    def done(self) -> None:
        """Everything off every card, nothing held, nothing counted as pending."""
        assert self.table.held() == []
        assert [card.used for card in self.cards.values()] == [0, 0]
        assert self.table._pending == {} and self.table._rooms == {}


def loads(*weights: Mem) -> list[str]:
    """The moves of each of ``weights``, by name, in one list per weights."""
    return [f"{w.name}: {', '.join(moves(w))}" for w in weights]


def _queued(table: ResidencyTable, count: int) -> Callable[[], bool]:
    return lambda: sum(len(queue) for queue in table._rooms.values()) >= count


# --------------------------------------------------------------------------- eviction and keeps


def test_kept_weights_stay_after_release_and_a_second_scope_loads_nothing() -> None:
    """keep=True leaves the weights resident and unclaimed; the next claim moves nothing; end_keep offloads them."""
    rig, a = Rig(), Mem("a")
    rig.keep(a)
    assert a.where == GPU and [h.kept for h in rig.table.held()] == [True]
    rig.table.release(rig.acquire(a))
    assert moves(a) == ["load none"]
    rig.table.end_keep([rig.part(a)])
    assert moves(a) == ["load none", "offload"]
    rig.done()


def test_end_keep_while_claimed_offloads_at_the_last_release() -> None:
    """Ending a keep while a scope claims the weights leaves them until its release; ending it twice is harmless."""
    rig, a = Rig(), Mem("a")
    rig.keep(a)
    claims = rig.acquire(a)
    rig.table.end_keep([rig.part(a)])
    rig.table.end_keep([rig.part(a)])
    assert a.where == GPU
    rig.table.release(claims)
    assert moves(a) == ["load none", "offload"]
    rig.done()


def test_eviction_takes_the_least_recently_used_kept_weights_first() -> None:
    """Three kept weights on a card of three; b used last; a scope needing two units evicts a, then c, never b."""
    rig, a, b, c, d = Rig(3 * UNIT), Mem("a"), Mem("b"), Mem("c"), Mem("d", 2 * UNIT)
    rig.keep(a)
    rig.keep(b)
    rig.keep(c)
    rig.table.release(rig.acquire(b))  # b's last use is now the latest
    order: list[str] = []
    for w in (a, b, c):
        w.moves = _Recorder(order, w.name)
    claims = rig.acquire(d)
    assert order == ["a", "c"]
    assert (a.where, b.where, c.where, d.where) == (CPU, GPU, CPU, GPU)
    rig.table.release(claims)
    rig.table.end_keep([rig.part(b)])
    rig.done()


class _Recorder(list[str]):
    """A moves list that also notes, in a shared list, when its weights are offloaded."""

    def __init__(self, order: list[str], name: str) -> None:
        super().__init__()
        self.order, self.name = order, name

    def append(self, move: str) -> None:
        super().append(move)
        if move == "offload":
            self.order.append(self.name)


def test_weights_a_live_scope_claims_are_never_evicted() -> None:
    """Another scope needing room never evicts claimed weights: it raises where the kept ones are not enough, else
    evicts only the kept ones."""
    rig, a, b, c = Rig(2 * UNIT), Mem("a"), Mem("b"), Mem("c", 2 * UNIT)
    held = rig.acquire(a)
    rig.keep(b)
    worker = Worker(lambda: rig.acquire(c))  # another thread: its wait=False fails, a stays
    worker.done()
    assert isinstance(worker.error, OutOfDeviceMemory)
    assert a.where == GPU and b.where == GPU  # nothing evicted for a scope that still cannot fit
    small = Mem("small")
    claims = rig.acquire(small)  # fits once b (kept, unclaimed) is evicted; a stays
    assert (a.where, b.where, small.where) == (GPU, CPU, GPU)
    rig.table.release(claims)
    rig.table.release(held)
    rig.done()


def test_a_scope_that_fits_evicts_nothing() -> None:
    """Kept weights are evicted only when memory is short: a scope that fits beside them leaves them alone."""
    rig, a, b = Rig(2 * UNIT), Mem("a"), Mem("b")
    rig.keep(a)
    rig.table.release(rig.acquire(b))
    assert moves(a) == ["load none"]
    rig.table.end_keep([rig.part(a)])
    rig.done()


# --------------------------------------------------------------------------- errors with numbers


def test_out_of_memory_states_needed_free_and_held_by_whom() -> None:
    """wait=False on a full card: OutOfDeviceMemory (a MemoryError) with needed, free and held (owner, kept)."""
    rig, a, b, c = Rig(3 * UNIT), Mem("a"), Mem("b"), Mem("c", 2 * UNIT)
    held = rig.acquire(a)
    rig.table.release(rig.acquire(b, keep=True))
    worker = Worker(lambda: rig.acquire(c, Mem("x")))
    worker.done()
    error = worker.error
    assert isinstance(error, OutOfDeviceMemory) and isinstance(error, MemoryError)
    assert (error.device, error.needed, error.free, error.total) == (GPU, 3 * UNIT, 1 * UNIT, 3 * UNIT)
    assert error.held == [("Sized(a)", UNIT, "thread 'MainThread'"), ("Sized(b)", UNIT, "kept")]
    text = str(error)
    assert "needed 300 bytes, free 100 bytes of 300 bytes" in text and "wait=True" in text and "budget=" in text
    assert c.where == CPU and (a.where, b.where) == (GPU, GPU)  # b is not evicted: it would not be enough
    rig.table.release(held)
    rig.table.end_keep([rig.part(b)])
    rig.done()


def test_larger_than_the_device_raises_at_once_even_when_waiting() -> None:
    """A part larger than the whole card raises at once with wait=True, naming budget= and partial=True."""
    rig, big = Rig(2 * UNIT), Mem("big", 3 * UNIT)
    started = time.monotonic()
    with pytest.raises(OutOfDeviceMemory, match="more than the device's whole memory") as info:
        rig.acquire(big, wait=True)
    assert time.monotonic() - started < 5
    assert "partial=True" in str(info.value) and info.value.needed == 3 * UNIT
    rig.done()


def test_a_timed_out_wait_raises_with_the_numbers() -> None:
    """A wait for memory that another thread holds past the timeout raises OutOfDeviceMemory with the same numbers."""
    rig, a, b, c = Rig(2 * UNIT), Mem("a"), Mem("b"), Mem("c")
    held = rig.acquire(a, b)
    started = time.monotonic()
    worker = Worker(lambda: rig.acquire(c, wait=True, timeout=0.2))
    worker.done()
    error = worker.error
    assert isinstance(error, OutOfDeviceMemory) and "timeout=0.2" in str(error)
    assert time.monotonic() - started >= 0.2
    assert (error.needed, error.free) == (UNIT, 0)
    assert [h[0] for h in error.held] == ["Sized(a)", "Sized(b)"]
    rig.table.release(held)
    rig.done()


def test_a_wait_on_this_threads_own_memory_raises_at_once() -> None:
    """A nested scope waiting for memory only its own thread's outer scope holds raises at once instead of hanging."""
    rig, a, b = Rig(2 * UNIT), Mem("a", 2 * UNIT), Mem("b")
    outer = rig.acquire(a)
    started = time.monotonic()
    with pytest.raises(OutOfDeviceMemory, match="waiting could never end"):
        rig.acquire(b, wait=True)
    assert time.monotonic() - started < 5
    rig.table.release(outer)
    rig.done()


def test_two_threads_waiting_for_each_others_memory_do_not_hang() -> None:
    """Each thread holds one unit and waits for a second that only the other's release frees: one raises, both end."""
    rig, a, b, c, d = Rig(2 * UNIT), Mem("a"), Mem("b"), Mem("c"), Mem("d")
    entered = threading.Barrier(2)

    def step(mine: Mem, more: Mem) -> None:
        claims = rig.acquire(mine)
        entered.wait(10)
        try:
            rig.table.release(rig.acquire(more, wait=True, timeout=20))
        finally:
            rig.table.release(claims)

    first, second = Worker(lambda: step(a, c)), Worker(lambda: step(b, d))
    first.done()
    second.done()
    errors = [w.error for w in (first, second) if w.error is not None]
    assert errors and all(isinstance(e, OutOfDeviceMemory) and "never end" in str(e) for e in errors)
    rig.done()


# --------------------------------------------------------------------------- waiting, first come first served


def test_waiters_are_served_first_come_first_served() -> None:
    """Two waiters queue for one unit each; the first release serves the first waiter only, the second the next."""
    rig, a, b, c, d = Rig(2 * UNIT), Mem("a"), Mem("b"), Mem("c"), Mem("d")
    first_claims, second_claims = rig.acquire(a), rig.acquire(b)
    order: list[str] = []
    lock = threading.Lock()

    def waiter(w: Mem) -> list[Claim]:
        claims = rig.acquire(w, wait=True, timeout=20)
        with lock:
            order.append(w.name)
        return claims

    first = Worker(lambda: waiter(c))
    _until(_queued(rig.table, 1), "c waits")
    second = Worker(lambda: waiter(d))
    _until(_queued(rig.table, 2), "d waits")
    rig.table.release(first_claims)
    c_claims = first.done()
    assert order == ["c"] and second.is_alive()
    rig.table.release(second_claims)
    d_claims = second.done()
    assert order == ["c", "d"]
    rig.table.release(c_claims)
    rig.table.release(d_claims)
    rig.done()


def test_an_acquire_that_evicted_goes_before_one_that_came_meanwhile() -> None:
    """x evicts a kept holding; while that offload runs, y asks for room too and queues behind x, so x loads once
    the offload ends and y once x lets go (y queued ahead of x, whose reservation it waited for: both timed out)."""
    rig, gate, loaded, let_go = Rig(3 * UNIT), threading.Event(), threading.Event(), threading.Event()
    kept, x, y = Mem("kept", 2 * UNIT), Mem("x", 2 * UNIT), Mem("y", 2 * UNIT)
    part = rig.part(kept, gate_offload=gate)
    rig.table.release(rig.table.acquire([part], GPU, keep=True))

    def scope_x() -> None:  # x's thread holds its claims until told to let go, as a scope does
        claims = rig.acquire(x, wait=True, timeout=3)
        loaded.set()
        let_go.wait(20)
        rig.table.release(claims)

    first = Worker(scope_x)
    assert part.started.wait(10)  # the eviction's offload runs, held at the gate
    second = Worker(lambda: rig.acquire(y, wait=True, timeout=20))
    _until(_queued(rig.table, 2), "y queues behind x")
    gate.set()
    assert loaded.wait(10) and first.error is None
    assert second.is_alive() and y.where == CPU  # y waits for x's room
    let_go.set()
    first.done()
    rig.table.release(second.done())
    assert first.error is None and moves(y) == ["load none", "offload"]
    rig.done()


def test_a_later_acquire_does_not_take_the_room_the_head_waits_for() -> None:
    """The head waits for two units with one free: a newcomer asking one unit with wait=False raises, not overtakes."""
    rig, a, b, big, small = Rig(3 * UNIT), Mem("a"), Mem("b"), Mem("big", 2 * UNIT), Mem("small")
    held_a, held_b = rig.acquire(a), rig.acquire(b)
    head = Worker(lambda: rig.acquire(big, wait=True, timeout=20))
    _until(_queued(rig.table, 1), "big waits")
    newcomer = Worker(lambda: rig.acquire(small))
    newcomer.done()
    assert isinstance(newcomer.error, OutOfDeviceMemory) and small.where == CPU
    rig.table.release(held_a)
    rig.table.release(head.done())
    rig.table.release(held_b)
    rig.done()


def test_wait_false_lets_an_offload_in_flight_end_before_deciding() -> None:
    """A scope whose memory is being offloaded by another thread's release gets it (no error) with wait=False."""
    rig, a, b, gate = Rig(UNIT), Mem("a"), Mem("b"), threading.Event()
    claims = rig.table.acquire([rig.part(a, gate_offload=gate)], GPU)
    releaser = Worker(lambda: rig.table.release(claims))
    _until(lambda: bool(rig.table._held) and not rig.table.held(), "a is offloading")
    asker = Worker(lambda: rig.acquire(b))
    _until(lambda: rig.table._sleepers >= 1, "the asker waits for the offload")
    gate.set()
    releaser.done()
    rig.table.release(asker.done())
    rig.done()


def test_atomic_acquires_in_opposite_orders_never_deadlock() -> None:
    """Two threads x 50 scopes on (a, b) and (b, a), a card that fits only one pair, wait=True: both finish."""
    rig, a, b = Rig(2 * UNIT), Mem("a"), Mem("b")
    c = Mem("c")

    def loop(first: Mem, second: Mem) -> None:
        for _ in range(50):
            rig.table.release(rig.acquire(first, second, wait=True, timeout=20))
            rig.table.release(rig.acquire(c, first, wait=True, timeout=20))

    workers = [Worker(lambda: loop(a, b)), Worker(lambda: loop(b, a))]
    for worker in workers:
        worker.done()
        assert worker.error is None
    assert max(card.peak for card in rig.cards.values()) <= 2 * UNIT
    rig.done()


def test_a_scope_never_holds_some_parts_while_it_waits_for_others() -> None:
    """(a, b) loading a (held up) and (b, a) asked meanwhile: the second waits holding nothing, then shares both."""
    rig, a, b, gate = Rig(2 * UNIT), Mem("a"), Mem("b"), threading.Event()
    slow = rig.part(a, gate=gate)
    first = Worker(lambda: rig.table.acquire([slow, rig.part(b)], GPU))
    assert slow.started.wait(10)
    second = Worker(lambda: rig.table.acquire([rig.part(b), rig.part(a)], GPU, wait=True, timeout=20))
    _until(lambda: rig.table._sleepers >= 1, "the second waits")
    assert [len(h.claims) for h in rig.table._held.values()] == [1, 1]  # the first's claims only
    gate.set()
    first_claims, second_claims = first.done(), second.done()  # the second claims the loaded pair, no room needed
    rig.table.release(first_claims)
    rig.table.release(second_claims)
    assert moves(a) == moves(b) == ["load none", "offload"]
    rig.done()


def test_an_aborted_wait_raises_and_holds_nothing() -> None:
    """Setting abort (and waking the table) makes a waiting acquire raise AbortedError; it held and queued nothing."""
    rig, a, b, abort = Rig(UNIT), Mem("a"), Mem("b"), threading.Event()
    held = rig.acquire(a)
    waiter = Worker(lambda: rig.acquire(b, wait=True, abort=abort))
    _until(_queued(rig.table, 1), "b waits")
    abort.set()
    rig.table.wake()
    waiter.done()
    assert isinstance(waiter.error, AbortedError) and rig.table._rooms == {}
    rig.table.release(held)
    rig.done()


def test_block_false_claims_resident_weights_and_refuses_anything_else() -> None:
    """acquire(block=False) claims weights that are resident; one that would load raises WouldBlock, holding nothing."""
    rig, a, b = Rig(), Mem("a"), Mem("b")
    outer = rig.acquire(a)
    rig.table.release(rig.acquire(a, block=False))
    with pytest.raises(WouldBlock):
        rig.acquire(a, b, block=False)
    assert [h.key for h in rig.table.held()] == [a]
    rig.table.release(outer)
    rig.done()


# --------------------------------------------------------------------------- budgets, partial loads


def test_a_budget_loads_what_fits_whole_and_the_rest_partially() -> None:
    """budget=150 over two 100-byte parts: the first whole, the second with load_partial(device, 50); counted so."""
    rig, a, b = Rig(4 * UNIT), Mem("a"), Mem("b")
    claims = rig.acquire(a, b, budget=150)
    assert moves(a) == ["load none"] and moves(b) == ["load_partial 50"]
    assert rig.cards[GPU].used == 150
    assert sorted((h.nbytes, h.partial) for h in rig.table.held()) == [(50, True), (100, False)]
    rig.table.release(claims)
    rig.done()


def test_partial_without_budget_takes_what_is_free() -> None:
    """partial=True on a card with one unit free: a 3-unit part is loaded with load_partial(device, None)."""
    rig, a, big = Rig(2 * UNIT), Mem("a"), Mem("big", 3 * UNIT)
    held = rig.acquire(a)
    claims = rig.acquire(big, partial=True)
    assert moves(big) == ["load_partial None"] and rig.cards[GPU].used == 2 * UNIT
    rig.table.release(claims)
    rig.table.release(held)
    rig.done()


def test_a_swap_onto_weights_loaded_within_a_budget_loads_within_it() -> None:
    """A clone with other patches claimed inside a budget scope: its patches go on with load_partial(device, 50), and
    the first part's go back on the same way at its release, never whole; the table counts what each left."""
    rig, a = Rig(4 * UNIT), Mem("a", 2 * UNIT)
    outer = rig.table.acquire([rig.part(a)], GPU, budget=50)
    inner = rig.table.acquire([rig.part(a, patches="lora")], GPU)
    assert a.patches == "lora" and rig.cards[GPU].used == 50
    rig.table.release(inner)
    assert a.patches == "none" and moves(a) == ["load_partial 50"] * 3
    assert [(h.nbytes, h.partial, h.budget) for h in rig.table.held()] == [(50, True, 50)]
    rig.table.release(outer)
    rig.done()


def test_a_swap_in_the_same_partial_scope_loads_in_part_too() -> None:
    """acquire(a, a with other patches, partial=True) where a does not fit: both loads are load_partial(device, None)
    (the swap copied its partial flag before room() had decided it, and loaded whole)."""
    rig, a = Rig(UNIT), Mem("a", 2 * UNIT)
    claims = rig.table.acquire([rig.part(a), rig.part(a, patches="lora")], GPU, partial=True)
    assert moves(a) == ["load_partial None"] * 2 and a.patches == "lora"
    assert [(h.partial, h.budget) for h in rig.table.held()] == [(True, None)]
    rig.table.release(claims)
    rig.done()


# --------------------------------------------------------------------------- several devices


def test_kept_weights_asked_for_on_another_device_move_there() -> None:
    """Kept on one card and asked for on the other: offloaded from the first, loaded on the second; each card counts."""
    rig, a = Rig(), Mem("a")
    rig.keep(a, device=GPU)
    claims = rig.acquire(a, device=GPU1)
    assert a.where == GPU1 and rig.cards[GPU].used == 0 and rig.cards[GPU1].used == UNIT
    assert moves(a) == ["load none", "offload", "load none"]
    rig.table.release(claims)
    rig.table.end_keep([rig.part(a)])  # the keep moved with it
    rig.done()


def test_weights_claimed_on_another_device_are_a_conflict() -> None:
    """Claimed on one card and asked for on the other: ResidencyConflictError, nothing moves."""
    rig, a = Rig(), Mem("a")
    claims = rig.acquire(a, device=GPU)
    with pytest.raises(ResidencyConflictError, match="exit the other scope first"):
        rig.acquire(a, device=GPU1)
    rig.table.release(claims)
    rig.done()


def test_memory_is_accounted_per_device() -> None:
    """A full first card does not stop a scope on the second."""
    rig, a, b, c = Rig(), Mem("a"), Mem("b"), Mem("c")
    held = rig.acquire(a, b, device=GPU)
    rig.table.release(rig.acquire(c, device=GPU1))
    rig.table.release(held)
    rig.done()


def test_a_prefetch_that_does_not_fit_starts_nothing() -> None:
    """A prefetch past the free memory is skipped (never evicts, never waits, never raises)."""
    rig, a, b = Rig(UNIT), Mem("a"), Mem("b")
    held = rig.acquire(a)
    assert rig.table.prefetch([rig.part(b)], GPU) == []
    assert b.where == CPU
    rig.table.release(held)
    rig.done()


# --------------------------------------------------------------------------- faults


def test_a_load_out_of_memory_rolls_back_and_names_the_part() -> None:
    """b under-counts its bytes and runs out of memory loading: a goes back, the card is empty, OutOfDeviceMemory
    names b, its cause the torch.OutOfMemoryError."""
    rig, a, b = Rig(2 * UNIT), Mem("a"), Mem("b", 2 * UNIT)
    liar = rig.part(b)
    liar.claims_bytes = UNIT
    with pytest.raises(OutOfDeviceMemory, match=r"loading Sized\(b\) on meta ran out of device memory") as info:
        rig.table.acquire([rig.part(a), liar], GPU)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert isinstance(info.value, torch.OutOfMemoryError)  # code catching torch's error still catches it
    assert a.where == CPU and moves(a) == ["load none", "offload"]
    rig.done()


def test_an_error_loading_a_later_part_takes_back_the_claims_not_yet_run() -> None:
    """(a, b, c) where b's load fails: a is offloaded again, c (recorded, never run) is taken back, nothing held."""
    rig, a, b, c = Rig(4 * UNIT), Mem("a"), Mem("b"), Mem("c")
    held_c = rig.acquire(c)
    with pytest.raises(RuntimeError, match="load failed"):
        rig.table.acquire([rig.part(a), rig.part(b, fail_load=True), rig.part(c)], GPU)
    assert [len(h.claims) for h in rig.table.held()] == [1]  # c: the outer claim only
    rig.table.release(held_c)
    rig.done()


def test_reclaimers_are_asked_before_kept_weights_are_evicted() -> None:
    """Memory another cache holds (ComfyUI's loaded models) is reclaimed first, once; kept weights stay."""
    rig, a, b = Rig(2 * UNIT), Mem("a"), Mem("b")
    rig.keep(a)
    card = rig.cards[GPU]
    card.charge(UNIT)  # a foreign cache fills the rest
    asked: list[tuple[torch.device, int]] = []

    def reclaim(device: torch.device, nbytes: int) -> None:
        asked.append((device, nbytes))
        card.discharge(UNIT)

    rig.table.add_reclaimer(reclaim)
    rig.table.release(rig.acquire(b))
    assert asked == [(GPU, UNIT)] and a.where == GPU
    rig.table.end_keep([rig.part(a)])
    rig.done()
