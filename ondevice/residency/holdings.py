"""What the table records: a :class:`Holding` per weights on a device, its :class:`State`, the scopes' :class:`Claim`
on it, and the :class:`Ledger` that keeps them behind the table's lock.

States: each :class:`Holding` is ``LOADING``, ``RESIDENT`` or ``OFFLOADING``
(:class:`State`); weights with no holding are offloaded.  A claim on weights
that are ``LOADING`` waits for that load and never loads them twice (if the
load fails, the waiter decides again: it loads them itself, or raises); a
claim on weights that are ``OFFLOADING`` waits until they are on the CPU, then
loads them again.  A swap of patches, a load back after an eviction and a
forced offload mark the holding the same way while they run.

Weights are counted by identity of the part's ``key``; a holding's ``claims`` list every part
claimed, in order, with the :class:`~ondevice.residency.owners.Owner` that entered each.
"""

from __future__ import annotations

import enum
import itertools
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ondevice.errors import ResidencyConflictError
from ondevice.residency.lock import TableLock
from ondevice.residency.owners import Owner
from ondevice.strategies import Part

__all__ = ["Claim", "Holding", "Ledger", "State", "holder", "only"]


class State(enum.Enum):
    """Where a holding's weights are: on the device, or on their way there or back (no holding: on the CPU)."""

    LOADING = "loading"
    """A load (a first claim, a swap of patches, a load back after an eviction, a prefetch or its adoption) runs."""
    RESIDENT = "resident"
    """On the device, nothing moving them."""
    OFFLOADING = "offloading"
    """On their way to the CPU (the last claim was released, a prefetch was cancelled, an eviction, or a forced
    offload)."""


@dataclass
class Holding:
    """Weights that live scopes hold (or a prefetch put, or a keep left) on ``device``; ``claims`` lists every part
    claimed, in order.

    ``state`` says whether a move of these weights runs (:class:`State`); ``prefetched`` marks a
    holding that :meth:`ResidencyTable.prefetch` made and no scope has claimed yet; ``kept`` one that
    stays on the device after its last claim goes.  ``nbytes`` is the device memory the table counts
    for it (where the device reports its memory; else 0: once loaded in part, what that left there),
    ``partial`` whether it was loaded with ``load_partial`` (within ``budget``: swaps of its patches
    load within it too), ``used`` when it was last used (a tick: its last claim went, or it was kept
    or prefetched), for least-recently-used eviction.
    """

    device: torch.device
    key: object
    order: int
    part: Part  # the part whose weights (patches included) are on the device now
    claims: list[Part] = field(default_factory=list)
    owners: list[Owner] = field(default_factory=list)  # owners[i] entered claims[i]
    pointed: list[Part] = field(default_factory=list)  # parts pointed at the device and not restored yet; [0] first
    forced_off: bool = False
    state: State = State.RESIDENT
    prefetched: bool = False
    kept: bool = False
    nbytes: int = 0
    partial: bool = False
    budget: int | None = None  # partial: the budget it was loaded within (None: as much as the part chose)
    used: int = 0
    mover: int | None = field(default=None, repr=False)  # the thread whose move runs (state is not RESIDENT)
    moves: int = field(default=0, repr=False)  # counts moves: a restore acts only on what it saw
    threads: dict[int, int] = field(default_factory=dict, repr=False)  # live claims per owner's thread


class Claim(NamedTuple):
    """One scope's hold on one part; released exactly once."""

    holding: Holding
    part: Part


def holder(holding: Holding) -> str:
    """Who holds ``holding``: its claims' owners (each once), else ``"kept"`` or ``"prefetched"``."""
    names = list(dict.fromkeys(owner.name or repr(owner) for owner in holding.owners))
    if names:
        return ", ".join(names) + (" (kept)" if holding.kept else "")
    return "kept" if holding.kept else "prefetched"


def only(holding: Holding, owner: Owner) -> bool:
    """Whether every claim on ``holding`` is of ``owner``'s thread, whose code outside tasks encloses them all."""
    threads = holding.threads
    return len(threads) == 1 and owner.task is None and owner.thread in threads


class Ledger:
    """The table's state behind its lock: the holdings by ``id(key)``, how many per device, and the condition that
    wakes waiters whenever a claim goes or a move ends.

    ``state_lock`` is the lock's ``rlock``: the table's own holds, not counted, so its event delivery is not
    deferred.  Every method but :meth:`settle` expects the caller to hold it.
    """

    def __init__(self) -> None:
        self.lock = TableLock()
        self.state_lock = self.lock.rlock
        self.changed = threading.Condition(self.state_lock)  # notified whenever a claim goes or a move ends
        self.held: dict[int, Holding] = {}  # id(key) -> its holding, in every state
        self.devices: dict[torch.device, int] = {}  # holdings per device
        self.sleepers = 0  # threads waiting on changed: a release with none to wake notifies nobody
        self.order = itertools.count()
        self.ticks = itertools.count(1)

    def add_holding(self, holding: Holding) -> Holding:
        self.held[id(holding.key)] = holding
        self.devices[holding.device] = self.devices.get(holding.device, 0) + 1
        return holding

    def drop_holding(self, holding: Holding) -> None:
        if self.held.get(id(holding.key)) is not holding:
            return
        del self.held[id(holding.key)]
        left = self.devices[holding.device] - 1
        if left:
            self.devices[holding.device] = left
        else:
            del self.devices[holding.device]
        self.notify()

    def notify(self) -> None:
        if self.sleepers:
            self.changed.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Wait (the lock released meanwhile) until a claim goes or a move ends, or ``timeout`` passes."""
        self.sleepers += 1
        try:
            self.changed.wait(timeout)
        finally:
            self.sleepers -= 1

    @staticmethod
    def begin(holding: Holding, state: State) -> None:
        holding.state, holding.mover = state, threading.get_ident()

    def settle_locked(self, holding: Holding, *, moved: bool) -> None:
        holding.state, holding.mover = State.RESIDENT, None
        holding.moves += moved
        self.notify()

    def settle(self, holding: Holding, *, moved: bool) -> None:
        with self.state_lock:
            self.settle_locked(holding, moved=moved)

    def wait_for_move(self, holding: Holding, part: Part) -> None:
        """Wait until the move of ``holding`` ends (the caller decides again); raise if this thread runs it."""
        if holding.mover == threading.get_ident():
            msg = (
                f"{part!r} was asked for while this thread is moving the same weights ({holding.state.value}); "
                "a part's load or offload must not enter a scope on its own weights"
            )
            raise ResidencyConflictError(msg)
        self.wait()

    def wait_while_moved_elsewhere(self, holding: Holding) -> None:
        """Wait while another thread moves ``holding``'s weights (a load back, a forced offload, a swap)."""
        while holding.state is not State.RESIDENT and self.held.get(id(holding.key)) is holding:
            if holding.mover == threading.get_ident():
                return
            self.wait()

    def wait_until_settled(self, holding: Holding) -> None:
        while self.held.get(id(holding.key)) is holding and holding.state is not State.RESIDENT:
            self.wait_for_move(holding, holding.part)

    def settled_holding(self, part: Part) -> Holding | None:
        """The holding of ``part``'s weights once no move of them runs (waiting meanwhile); None where there is none."""
        while True:
            holding = self.held.get(id(part.key))
            if holding is None or holding.state is State.RESIDENT:
                return holding
            self.wait_for_move(holding, part)

    @staticmethod
    def add_claim(holding: Holding, part: Part, owner: Owner) -> None:
        holding.claims.append(part)
        holding.owners.append(owner)
        holding.threads[owner.thread] = holding.threads.get(owner.thread, 0) + 1

    def remove_claim(self, holding: Holding, part: Part) -> None:
        claims = holding.claims
        for index in range(len(claims) - 1, -1, -1):  # the latest first: nested scopes release in reverse
            if claims[index] is part:
                break
        else:
            msg = f"{part!r} is not claimed (released already?)"
            raise ValueError(msg)
        thread = holding.owners[index].thread
        del claims[index], holding.owners[index]
        left = holding.threads[thread] - 1
        if left:
            holding.threads[thread] = left
        else:
            del holding.threads[thread]
        self.notify()

    @staticmethod
    def unpoint(holding: Holding, part: Part) -> bool:
        """Forget ``part`` among the pointed parts unless it is the first; whether its pointers are to be undone."""
        pointed = holding.pointed
        if not pointed or pointed[0] is part:
            return False  # the first part pointed saved the true originals: undone when the weights leave
        for index in range(len(pointed) - 1, 0, -1):
            if pointed[index] is part:
                del pointed[index]
                return True
        return False
