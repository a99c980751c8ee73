"""The residency table on stub parts: no ComfyUI, no fake GPU, milliseconds per test (the fast tier)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pytest
import torch

from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.residency import ResidencyTable
from ondevice.strategies import Part

GPU = torch.device("meta")  # any device but the CPU: the stubs only record where they are


class Weights:
    """What stub parts share when they are "clones": one set of weights, with the patches now applied."""

    def __init__(self) -> None:
        self.where = torch.device("cpu")
        self.patches = "none"
        self.moves: list[str] = []
        self.looks = 0  # calls of is_on / tensors: what the hot path must never make


class Stub(Part):
    """A part over ``weights`` with its own ``patches``; records every move.

    ``gate``: a load (or offload, with ``gate_offload``) waits for it, so a test can hold a move in flight.
    """

    def __init__(
        self,
        weights: Weights,
        patches: str = "none",
        *,
        fail_load: bool = False,
        gate: threading.Event | None = None,
        gate_offload: threading.Event | None = None,
    ) -> None:
        self.weights, self.patches, self.fail_load = weights, patches, fail_load
        self.gate, self.gate_offload = gate, gate_offload
        self.started = threading.Event()  # set when a gated move has begun

    @property
    def key(self) -> object:
        return self.weights

    def tensors(self) -> Iterable[torch.Tensor]:
        self.weights.looks += 1
        return []

    def load(self, device: torch.device) -> None:
        self._wait(self.gate)
        if self.fail_load:
            self.weights.moves.append(f"failed load {self.patches}")
            raise RuntimeError("load failed")
        self.weights.where, self.weights.patches = device, self.patches
        self.weights.moves.append(f"load {self.patches}")

    def offload(self) -> None:
        self._wait(self.gate_offload)
        self.weights.where = torch.device("cpu")
        self.weights.moves.append("offload")

    def is_on(self, device: torch.device) -> bool:
        self.weights.looks += 1
        return self.weights.where == device and self.weights.patches == self.patches

    def same_weights(self, other: object) -> bool:
        return isinstance(other, Stub) and other.patches == self.patches

    def point_at(self, device: torch.device) -> None:
        self.weights.moves.append(f"point {self.patches}")

    def restore(self) -> None:
        self.weights.moves.append(f"restore {self.patches}")

    def _wait(self, gate: threading.Event | None) -> None:
        if gate is not None:
            self.started.set()
            assert gate.wait(10), "the test never opened the gate"

    def __repr__(self) -> str:
        return f"Stub({self.patches})"


def moves(w: Weights) -> list[str]:
    """The loads and offloads of ``w`` (pointers left out)."""
    return [m for m in w.moves if not m.startswith(("point", "restore"))]


def test_first_claim_loads_last_release_offloads() -> None:
    """Nested claims on one set of weights load once and offload once, at the last release."""
    table, w = ResidencyTable(), Weights()
    outer = table.acquire([Stub(w)], GPU)
    inner = table.acquire([Stub(w)], GPU)
    table.release(inner)
    assert w.where == GPU
    table.release(outer)
    assert w.where == torch.device("cpu")
    assert moves(w) == ["load none", "offload"]
    assert table.held() == []


def test_failed_acquire_holds_nothing() -> None:
    """An acquire whose second part fails to load releases the first again and raises."""
    table, a, b = ResidencyTable(), Weights(), Weights()
    with pytest.raises(RuntimeError, match="load failed"):
        table.acquire([Stub(a), Stub(b, fail_load=True)], GPU)
    assert table.held() == []
    assert a.where == torch.device("cpu")


def test_acquire_verifies_what_it_loaded() -> None:
    """A part that says it loaded but is not on the device fails the acquire with OnDeviceError."""

    class Liar(Stub):
        def load(self, device: torch.device) -> None:
            self.weights.moves.append("pretend")

    table = ResidencyTable()
    with pytest.raises(OnDeviceError, match="could not be kept wholly"):
        table.acquire([Liar(Weights())], GPU)
    assert table.held() == []


def test_nested_clone_with_other_patches_swaps_in_and_back() -> None:
    """In one thread, a clone with other patches is loaded for the inner scope; the outer's come back after."""
    table, w = ResidencyTable(), Weights()
    outer = table.acquire([Stub(w, "base")], GPU)
    inner = table.acquire([Stub(w, "lora")], GPU)
    assert w.patches == "lora"
    table.release(inner)
    assert (w.where, w.patches) == (GPU, "base")
    table.release(outer)
    assert moves(w) == ["load base", "load lora", "load base", "offload"]


def test_a_scope_on_base_and_clone_exits_without_swapping_the_base_back() -> None:
    """Releasing a base and its clone together (one scope's exit) offloads the clone's patches at once: the base's
    are not loaded back just to be offloaded; a live claim of another scope still gets them back."""
    table, w = ResidencyTable(), Weights()
    both = table.acquire([Stub(w, "base"), Stub(w, "lora")], GPU)
    table.release(both)
    assert moves(w) == ["load base", "load lora", "offload"] and table.held() == []
    outer = table.acquire([Stub(w, "base")], GPU)
    both = table.acquire([Stub(w, "base"), Stub(w, "lora")], GPU)
    table.release(both)
    assert (w.where, w.patches) == (GPU, "base")
    table.release(outer)
    assert moves(w)[3:] == ["load base", "load lora", "load base", "offload"]


def test_other_device_while_held_is_a_conflict() -> None:
    """Weights held on one device and asked for on another: ResidencyConflictError, nothing more held."""
    table, w = ResidencyTable(), Weights()
    claims = table.acquire([Stub(w)], GPU)
    with pytest.raises(ResidencyConflictError, match="held on meta"):
        table.acquire([Stub(w)], torch.device("cpu"))
    table.release(claims)
    assert table.held() == []


def test_other_thread_with_other_patches_waits_for_the_holder() -> None:
    """A thread asking for other patches of held weights waits until the holder releases, then loads its own."""
    table, w = ResidencyTable(), Weights()
    base = table.acquire([Stub(w, "base")], GPU)
    seen: list[str] = []

    def lora() -> None:
        claims = table.acquire([Stub(w, "lora")], GPU)
        seen.append(w.patches)
        table.release(claims)

    thread = threading.Thread(target=lora)
    thread.start()
    for _ in range(3000):  # until the thread is waiting (bounded: 30 s)
        if table.waiting():
            break
        threading.Event().wait(0.01)
    assert table.waiting() and w.patches == "base"
    table.release(base)
    thread.join(10)
    assert not thread.is_alive()
    assert seen == ["lora"]
    assert w.where == torch.device("cpu")


def test_release_twice_is_an_error() -> None:
    """Releasing the same claims twice raises instead of dropping another scope's claim."""
    table, w = ResidencyTable(), Weights()
    claims = table.acquire([Stub(w)], GPU)
    table.release(claims)
    with pytest.raises(ValueError):
        table.release(claims)


def test_scope_left_open_by_an_ended_thread_counts_as_nesting() -> None:
    """A generator stepped into base's scope on a thread that then ended, resumed on another that needs other
    patches: the other thread swaps them in (as a nested scope would) instead of waiting for the dead thread."""
    table, w = ResidencyTable(), Weights()
    claims: dict[str, list] = {}
    first = threading.Thread(target=lambda: claims.setdefault("base", table.acquire([Stub(w, "base")], GPU)))
    first.start()
    first.join(10)
    blocker_done = threading.Event()
    blocker = threading.Thread(target=blocker_done.wait)  # takes the ended thread's ident, if it is reused
    blocker.start()

    def resume() -> None:
        claims["lora"] = table.acquire([Stub(w, "lora")], GPU)
        claims["seen"] = [w.patches]  # type: ignore[list-item]
        table.release(claims["lora"])

    second = threading.Thread(target=resume)
    second.start()
    second.join(30)
    blocker_done.set()
    blocker.join(5)
    assert not second.is_alive(), "waited for a thread that had ended"
    assert claims["seen"] == ["lora"]
    assert (w.where, w.patches) == (GPU, "base")  # the base's patches are back for the still-open scope
    table.release(claims["base"])
    assert w.where == torch.device("cpu")


def test_claims_on_resident_weights_look_at_no_tensor() -> None:
    """The hot path: nested claims and releases on held weights call no is_on / tensors, of theirs or of others."""
    table, small, big = ResidencyTable(), Weights(), Weights()
    outer = table.acquire([Stub(small), Stub(big)], GPU)
    small.looks = big.looks = 0
    for _ in range(100):
        table.release(table.acquire([Stub(small)], GPU))
    assert (small.looks, big.looks) == (0, 0)
    table.release(outer)
    assert moves(small) == moves(big) == ["load none", "offload"]


def test_pointed_parts_stay_bounded_over_nested_claims() -> None:
    """1,000 nested claims: each one's pointers are undone at its release; the first part's only at the end."""
    table, w = ResidencyTable(), Weights()
    outer = table.acquire([Stub(w, "first")], GPU)
    (holding,) = table.held()
    for _ in range(1_000):
        inner = table.acquire([Stub(w, "first")], GPU)
        assert len(holding.pointed) == 2
        table.release(inner)
        assert len(holding.pointed) == 1
    assert w.moves.count("point first") == 1_001
    assert w.moves.count("restore first") == 1_000
    table.release(outer)
    assert w.moves[-2:] == ["offload", "restore first"]  # the true originals come back once the weights are off


def test_weights_evicted_behind_the_table_come_back_on_slow_paths_only() -> None:
    """A claim on held weights trusts the table; restore() (and an acquire that loads) loads evicted weights back."""
    table, w, other = ResidencyTable(), Weights(), Weights()
    outer = table.acquire([Stub(w)], GPU)
    w.where = torch.device("cpu")  # evicted behind the table's back
    table.release(table.acquire([Stub(w)], GPU))
    assert w.where == torch.device("cpu")
    table.restore()
    assert w.where == GPU
    w.where = torch.device("cpu")
    table.release(table.acquire([Stub(other)], GPU))  # loads and offloads: both mend what they find
    assert w.where == GPU
    table.release(outer)
    assert moves(w) == ["load none", "load none", "load none", "offload"]


def test_before_runs_once_under_the_lock_before_the_first_claim() -> None:
    """acquire(before=) runs once, before anything is claimed, with the table's lock held."""
    table, w = ResidencyTable(), Weights()
    seen: list[tuple[bool, bool]] = []

    def before() -> None:
        seen.append((table.holds_on(GPU), table.lock.rlock._is_owned()))  # type: ignore[attr-defined]

    claims = table.acquire([Stub(w), Stub(Weights())], GPU, before=before)
    assert seen == [(False, True)]
    table.release(claims)


def test_a_failed_swap_puts_the_outer_patches_back() -> None:
    """A nested clone whose load fails raises and holds nothing more; the outer claim's weights are loaded back."""
    table, w = ResidencyTable(), Weights()
    outer = table.acquire([Stub(w, "base")], GPU)
    w.where = torch.device("cpu")  # what a failed load leaves
    with pytest.raises(RuntimeError, match="load failed"):
        table.acquire([Stub(w, "lora", fail_load=True)], GPU)
    assert (w.where, w.patches) == (GPU, "base")
    assert [len(h.claims) for h in table.held()] == [1]
    table.release(outer)
    assert table.held() == []
