"""Prefetch in the residency table, on stub parts (fast tier): adopt, cancel, failure, no-op, other device."""

from __future__ import annotations

import pytest
import torch

from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.residency import ResidencyTable, State
from tests.fast.test_table import GPU, Stub, Weights

CPU = torch.device("cpu")


class Ahead(Stub):
    """A stub whose prefetch starts a copy (recorded) and whose join waits for it (recorded)."""

    def __init__(self, weights: Weights, patches: str = "none", *, fail_prefetch: bool = False) -> None:
        super().__init__(weights, patches)
        self.fail_prefetch = fail_prefetch

    def prefetch(self, device: torch.device) -> None:
        if self.fail_prefetch:
            raise RuntimeError("prefetch failed")
        self.weights.where, self.weights.patches = device, self.patches
        self.weights.moves.append(f"prefetch {self.patches}")

    def join(self) -> None:
        self.weights.moves.append(f"join {self.patches}")


def test_a_claim_adopts_a_prefetch_joins_once_and_loads_nothing() -> None:
    """prefetch records an unclaimed holding; the next claim joins its copies once and the last release offloads."""
    table, w = ResidencyTable(), Weights()
    (holding,) = table.prefetch([Ahead(w)], GPU)
    assert table.held() == [holding]
    assert (holding.prefetched, holding.claims, holding.state) == (True, [], State.RESIDENT)
    outer = table.acquire([Ahead(w)], GPU)
    inner = table.acquire([Ahead(w)], GPU)
    assert not holding.prefetched
    table.release(inner)
    table.release(outer)
    assert w.moves == [
        "point none",
        "prefetch none",
        "point none",
        "join none",  # the adopting claim: no load, its stream waits for the copies
        "point none",
        "restore none",
        "offload",
        "restore none",
        "restore none",
    ]
    assert table.held() == [] and w.where == CPU


def test_an_adopting_clone_with_other_patches_joins_then_loads_its_own() -> None:
    """A claim with other patches than the prefetched ones joins the copies, then loads its patches."""
    table, w = ResidencyTable(), Weights()
    table.prefetch([Ahead(w, "base")], GPU)
    claims = table.acquire([Ahead(w, "lora")], GPU)
    assert w.patches == "lora"
    table.release(claims)
    assert [m for m in w.moves if not m.startswith(("point", "restore"))] == [
        "prefetch base",
        "join base",
        "load lora",
        "offload",
    ]


def test_cancel_offloads_an_unclaimed_prefetch_only() -> None:
    """cancel() joins and offloads a prefetch no scope claimed; on a claimed (or gone) one it does nothing."""
    table, w, v = ResidencyTable(), Weights(), Weights()
    (unclaimed,) = table.prefetch([Ahead(w)], GPU)
    assert table.cancel(unclaimed) is True
    assert w.moves[-3:] == ["join none", "offload", "restore none"]
    assert table.held() == [] and not unclaimed.prefetched
    assert table.cancel(unclaimed) is False
    (claimed,) = table.prefetch([Ahead(v)], GPU)
    claims = table.acquire([Ahead(v)], GPU)
    assert table.cancel(claimed) is False
    assert v.where == GPU
    table.release(claims)
    assert v.where == CPU


def test_a_forced_offload_cancels_a_prefetch() -> None:
    """force_offload of prefetched weights takes them off the device and out of the table."""
    table, w = ResidencyTable(), Weights()
    table.prefetch([Ahead(w)], GPU)
    table.force_offload(Ahead(w))
    assert table.held() == [] and w.where == CPU


def test_a_failed_prefetch_leaves_everything_on_the_cpu() -> None:
    """A part whose prefetch fails: the error is raised, the parts prefetched before it are cancelled, nothing held."""
    table, a, b = ResidencyTable(), Weights(), Weights()
    with pytest.raises(RuntimeError, match="prefetch failed"):
        table.prefetch([Ahead(a), Ahead(b, fail_prefetch=True)], GPU)
    assert table.held() == []
    assert a.where == b.where == CPU
    assert b.moves == ["point none", "restore none"]
    assert a.moves[-2:] == ["offload", "restore none"]


def test_a_prefetch_that_does_not_land_fails_and_holds_nothing() -> None:
    """A part that says it prefetched but is not on the device: OnDeviceError, nothing held."""

    class Liar(Ahead):
        def prefetch(self, device: torch.device) -> None:
            self.weights.moves.append("pretend")

    table = ResidencyTable()
    with pytest.raises(OnDeviceError, match="could not be kept wholly"):
        table.prefetch([Liar(Weights())], GPU)
    assert table.held() == []


def test_a_prefetch_of_held_weights_is_a_no_op() -> None:
    """Weights a scope holds (or a prefetch put there) are left as they are: no holding made, nothing moved."""
    table, w = ResidencyTable(), Weights()
    claims = table.acquire([Ahead(w)], GPU)
    before = list(w.moves)
    assert table.prefetch([Ahead(w)], GPU) == []
    assert table.prefetch([Ahead(w, "lora")], GPU) == []
    assert w.moves == before
    table.release(claims)
    (holding,) = table.prefetch([Ahead(w)], GPU)
    assert table.prefetch([Ahead(w)], GPU) == []
    assert table.held() == [holding]
    table.cancel(holding)


def test_a_prefetch_on_another_device_than_the_holding_is_a_conflict() -> None:
    """Weights claimed on one device and prefetched for another: ResidencyConflictError, the holding unchanged."""
    table, w = ResidencyTable(), Weights()
    claims = table.acquire([Ahead(w)], GPU)
    with pytest.raises(ResidencyConflictError, match="held on meta"):
        table.prefetch([Ahead(w)], torch.device("cuda", 1))
    assert [h.device for h in table.held()] == [GPU]
    table.release(claims)


def test_a_claim_on_another_device_than_a_prefetch_moves_it() -> None:
    """Weights prefetched (no claim) on one device and claimed on another: taken off the first, loaded on the other."""
    table, w, other = ResidencyTable(), Weights(), torch.device("cuda", 1)
    (holding,) = table.prefetch([Ahead(w)], GPU)
    claims = table.acquire([Ahead(w)], other)
    assert [h.device for h in table.held()] == [other] and not table.cancel(holding)
    assert w.where == other
    table.release(claims)
    assert [m for m in w.moves if not m.startswith(("point", "restore"))] == [
        "prefetch none",
        "join none",
        "offload",
        "load none",
        "offload",
    ]
    assert table.held() == []
