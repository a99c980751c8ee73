"""Acquiring (:class:`Acquirer`): every part of a scope claimed in one hold of the lock, the moves run outside it.

An acquire is atomic: under one hold of the lock it records a claim on every
part of the scope (after any wait), then runs the loads outside the lock, in
order.  It never holds some parts while it waits for others, so two scopes
asking for ``(a, b)`` and ``(b, a)`` cannot deadlock.  If a load fails,
everything the acquire moved goes back and it raises, holding nothing.

The hot path (:meth:`Acquirer.claim_resident`): a claim on ``RESIDENT`` weights with the same
patches costs a few dictionary operations, whatever else is held: it trusts the table, looks at no
tensor and asks nothing of the device.  An acquire verifies what it loaded in full: one that cannot
get such a part wholly onto the device raises and holds nothing.

Several devices: weights kept or prefetched (unclaimed) on one device and asked for on another are
moved there (offloaded first); weights a live scope claims on another device raise
:class:`~ondevice.errors.ResidencyConflictError`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import torch

from ondevice.errors import OutOfDeviceMemory, ResidencyConflictError
from ondevice.events import MoveEvent
from ondevice.residency import moves
from ondevice.residency.holdings import Claim, Holding, Ledger, State, only
from ondevice.residency.memory import MemoryPolicy
from ondevice.residency.owners import Owner
from ondevice.residency.patches import PatchWaits, Wait
from ondevice.residency.plans import Ask, Planned, Step, WouldBlock, check_abort, fit_within, prefetch_conflict
from ondevice.residency.release import release_all
from ondevice.strategies import Part

__all__ = ["Acquirer"]

_TORCH_OOM = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError where torch has it (the same class)


class Acquirer:
    """Decides an acquire under the ledger's lock (waiting for moves, other patches and memory), records its claims,
    then carries them out; on any failure takes back everything and raises."""

    def __init__(self, ledger: Ledger, memory: MemoryPolicy, patches: PatchWaits) -> None:
        self.ledger = ledger
        self.memory = memory
        self.patches = patches

    # ------------------------------------------------------------------ the hot path

    def claim_resident(
        self, parts: list[Part], device: torch.device, owner: Owner, before: Callable[[], None] | None
    ) -> list[Claim] | None:
        """Claim parts whose weights are all resident on ``device`` with their patches, in one hold of the lock and
        without looking at a tensor or the device; None (nothing claimed) where any part needs more."""
        ledger = self.ledger
        with ledger.state_lock:
            holdings = []
            for part in parts:
                holding = ledger.held.get(id(part.key))
                if (
                    holding is None
                    or holding.state is not State.RESIDENT
                    or holding.device != device
                    or holding.prefetched
                    or holding.forced_off
                    or not holding.part.same_weights(part)
                ):
                    return None
                holdings.append(holding)
            if not parts:
                return None  # nothing to claim: before() runs on the slow path
            shared = any(h.threads and not only(h, owner) for h in holdings)
            if shared and self.patches.conflicts(Wait(owner, parts, device)):
                return None  # other patches that another owner holds: the slow path waits
            if before is not None:
                before()
            for holding, part in zip(holdings, parts, strict=True):
                holding.pointed.append(part)
                ledger.add_claim(holding, part, owner)
        claims = [Claim(holding, part) for holding, part in zip(holdings, parts, strict=True)]
        for index, (holding, part) in enumerate(claims):
            try:
                part.point_at(device)
            except BaseException:
                try:
                    part.restore()
                finally:
                    self._drop_failed_claim(holding, part)
                    try:
                        self.cancel([Planned(p, Step.NOTHING, h) for h, p in claims[index + 1 :]], device)
                    finally:
                        release_all(ledger, reversed(claims[:index]))
                raise
        return claims

    # ------------------------------------------------------------------ decided under the lock, all at once

    def reserve(self, ask: Ask, before: Callable[[], None] | None) -> list[Planned]:
        """Record a claim on every part of ``ask`` in one hold of the lock, after waiting, evicting and moving
        weights off other devices as needed; the plan to carry out (outside the lock)."""
        try:
            while True:
                self._measure(ask)  # outside the lock: nbytes() walks the tensors of what is to be loaded
                with self.ledger.state_lock:
                    plan, off = self._decide(ask)
                    if plan is not None:
                        if before is not None:
                            before()
                        self._record(ask, plan)
                        return plan
                if isinstance(off, int):
                    self.memory.reclaim(ask.device, off)
                else:
                    moves.take_off(self.ledger, off)
        finally:
            if ask.queued or ask.reserved:
                with self.ledger.state_lock:
                    self.memory.leave_queue(ask)

    def _measure(self, ask: Ask) -> None:
        """``nbytes()`` of the parts that look not yet loaded on the device (read without the lock: a hint)."""
        todo = [part for part in ask.parts if id(part) not in ask.sizes and self._may_load(part, ask.device)]
        if todo and (ask.budget is not None or self.memory.memory(ask.device) is not None):
            for part in todo:
                ask.sizes[id(part)] = part.nbytes()

    def _may_load(self, part: Part, device: torch.device) -> bool:
        """Whether ``part`` looks on the CPU, to be loaded (weights held on another device are measured once off it)."""
        holding = self.ledger.held.get(id(part.key))
        return holding is None or (holding.forced_off and holding.device == device)

    def _decide(self, ask: Ask) -> tuple[list[Planned] | None, list[Holding] | int]:
        """The plan of ``ask`` once nothing stands in its way (waiting meanwhile); or holdings to take off first, or
        the bytes to have free on the device that the reclaimers are asked for first."""
        while True:
            self.patches.wait_for(ask)
            moving = self._in_motion(ask)
            if moving is not None:
                if not ask.block:
                    raise WouldBlock
                check_abort(ask)
                self.ledger.wait_for_move(*moving)
                continue
            self._check_ahead(ask)
            away = self._held_elsewhere(ask)
            if away:
                if not ask.block:
                    raise WouldBlock
                for holding in away:
                    self.ledger.begin(holding, State.OFFLOADING)
                    if holding.kept:
                        ask.kept.add(id(holding.key))  # the keep moves with the weights
                return None, away
            plan = self._draft(ask)
            if not ask.block and any(entry.moves for entry in plan):
                raise WouldBlock
            room = self.memory.room(ask, plan)
            if room is True:
                return plan, []
            if room is not False:
                return None, room
            # it waited: everything is decided again

    def _in_motion(self, ask: Ask) -> tuple[Holding, Part] | None:
        for part in ask.parts:
            holding = self.ledger.held.get(id(part.key))
            if holding is not None and holding.state is not State.RESIDENT:
                return holding, part
        return None

    def _check_ahead(self, ask: Ask) -> None:
        """Raise where the prefetch that follows ``ask`` would (its weights held on another device), before anything
        moves: a scope refused there must not have moved its own parts (kept ones off their device, say)."""
        asked = {id(part.key) for part in ask.parts}
        for part in ask.ahead:
            holding = self.ledger.held.get(id(part.key))
            if (
                holding is not None
                and holding.device != ask.device
                and holding.state is not State.OFFLOADING
                and id(part.key) not in asked
            ):
                raise prefetch_conflict(part, holding.device, ask.device)

    def _held_elsewhere(self, ask: Ask) -> list[Holding]:
        """Unclaimed holdings of ``ask``'s weights on other devices (to move); raise for claimed ones."""
        away: dict[int, Holding] = {}
        for part in ask.parts:
            holding = self.ledger.held.get(id(part.key))
            if holding is None or holding.device == ask.device:
                continue
            if holding.claims:
                msg = (
                    f"{part!r} is held on {holding.device} by a live scope and was asked for on {ask.device}; "
                    f"use device={str(holding.device)!r} or exit the other scope first"
                )
                raise ResidencyConflictError(msg)
            away[id(holding)] = holding  # kept or prefetched: moved to the device asked for
        return list(away.values())

    def _draft(self, ask: Ask) -> list[Planned]:
        """What each part needs (nothing is changed yet), with the bytes to load and to count within the budget."""
        plan: list[Planned] = []
        latest: dict[int, Planned] = {}  # id(key) -> the latest part of this acquire that moves those weights
        for part in ask.parts:
            earlier = latest.get(id(part.key))
            if earlier is not None:  # the same weights twice in one scope: as if claimed one after the other
                entry = Planned(part, Step.POINT if earlier.part.same_weights(part) else Step.SWAP, source=earlier)
                if entry.step is Step.SWAP:
                    earlier.last, latest[id(part.key)] = False, entry
                plan.append(entry)
                continue
            entry = _step(part, self.ledger.held.get(id(part.key)))
            if entry.moves:
                latest[id(part.key)] = entry
            plan.append(entry)
        loads = [e for e in plan if e.step is Step.LOAD or (e.step is Step.SWAP and e.holding and e.holding.forced_off)]
        if not loads:
            return plan  # the hot path: nothing to load, nothing to count
        measured = ask.budget is not None or self.memory.memory(ask.device) is not None
        for entry in loads:
            size = ask.sizes.get(id(entry.part))
            if size is None and measured:  # it looked loaded when measured: rare, so measured here
                size = ask.sizes[id(entry.part)] = entry.part.nbytes()
            entry.size = entry.counted = size or 0
        if ask.budget is not None:
            fit_within(plan, ask.budget, budget=True)
        return plan

    def _record(self, ask: Ask, plan: list[Planned]) -> None:
        """Record every claim of the plan (and mark what it moves), and count its loads as taken on the device."""
        ledger, device = self.ledger, ask.device
        _swaps_within_budgets(plan)  # after room(): partial=True decides there which loads are partial
        for entry in plan:
            if entry.step is Step.LOAD:
                made = Holding(device=device, key=entry.part.key, order=next(ledger.order), part=entry.part)
                made.nbytes, made.partial, made.used = entry.counted, entry.partial, next(ledger.ticks)
                made.budget = entry.budget
                made.kept = id(made.key) in ask.kept
                entry.holding = ledger.add_holding(made)
                ledger.begin(made, State.LOADING)
            elif entry.source is not None:
                entry.holding = entry.source.holding
            holding = entry.holding
            assert holding is not None  # noqa: S101  (every step but LOAD has its holding)
            if entry.step is Step.ADOPT:
                holding.prefetched = False
                ledger.begin(holding, State.LOADING)
            elif entry.step is Step.SWAP and holding.state is State.RESIDENT:
                ledger.begin(holding, State.LOADING)
                if entry.size:  # forced off: loaded again
                    holding.nbytes, holding.partial, holding.budget = entry.counted, entry.partial, entry.budget
            elif entry.step is Step.NOTHING:
                holding.pointed.append(entry.part)  # the hot path: one hold of the lock
            ledger.add_claim(holding, entry.part, ask.owner)
        counted = sum(entry.counted for entry in plan)
        self.memory.pend(device, counted - ask.reserved)  # what it evicted for becomes what it loads
        ask.reserved = 0
        self.memory.leave_queue(ask)

    # ------------------------------------------------------------------ carried out outside the lock

    def carry_out(self, plan: list[Planned], ask: Ask) -> list[Claim]:
        """Point and load each planned part in order; on any failure take back everything and raise."""
        done: list[Claim] = []
        loaded: list[Holding] = []
        index, failed = len(plan), None
        try:
            for index, entry in enumerate(plan):  # noqa: B007  (index names what is left to cancel on failure)
                failed = entry
                event = self._run(entry)  # on failure its claim is taken back already
                failed = None
                done.append(entry.claim)
                if entry.moves and not entry.partial and entry.last:
                    loaded.append(entry.claim.holding)
                self.ledger.lock.deliver(event)  # a listener may interrupt: the claim is in done, released below
            index = len(plan)
            if loaded:  # a slow path: mend what was evicted meanwhile, then check what this acquire loaded
                moves.restore(self.ledger, ask.device)
                moves.verify(loaded, ask.device)
        except BaseException as exc:
            try:
                self.cancel(plan[index + 1 :], ask.device)
                release_all(self.ledger, reversed(done))
            finally:
                moves.restore_quietly(self.ledger, ask.device)  # a failed load may have evicted what outer scopes hold
            if failed is not None and isinstance(exc, _TORCH_OOM) and not isinstance(exc, OutOfDeviceMemory):
                raise self.memory.load_ran_out(failed, ask, exc) from exc
            raise
        return done

    def _run(self, entry: Planned) -> MoveEvent | None:
        """Carry out one recorded claim: point its part at the device, and load it where its step says."""
        if entry.moves:
            return self._finish_claim(entry)
        holding, part = entry.claim
        try:
            part.point_at(holding.device)
        except BaseException:
            try:
                part.restore()
            finally:
                self._drop_failed_claim(holding, part)
            raise
        if entry.step is Step.POINT:
            with self.ledger.state_lock:
                holding.pointed.append(part)
        return None

    def _finish_claim(self, entry: Planned) -> MoveEvent | None:
        """Run the move a recorded claim needs (outside the lock), its event to deliver; on failure drop the claim."""
        (holding, part), step, device = entry.claim, entry.step, entry.claim.holding.device
        event, load, done = None, step is not Step.ADOPT or not holding.part.same_weights(part), False
        resident: int | None = None
        if entry.partial:
            move = functools.partial(part.load_partial, device, entry.budget)
        else:
            move = functools.partial(part.load, device)
        try:  # the state is settled in `finally`: an interrupt anywhere never leaves the weights LOADING
            part.point_at(device)
            try:
                if step is Step.ADOPT:
                    holding.part.join()  # the current stream waits for the prefetch's copies
                if load:
                    event = moves.run(part, device, move)
                resident = part.resident_nbytes(device) if entry.partial and load else None  # what it left there
                done = True
            finally:
                if not done:
                    part.restore()
        finally:
            if done:
                with self.ledger.state_lock:
                    self.memory.pend(device, -entry.counted)
                    if resident is not None:  # counted as what it may take; it holds what it left there
                        holding.nbytes = resident
                    if load:
                        holding.part, holding.forced_off = part, False
                    holding.pointed.append(part)
                    if entry.last:
                        self.ledger.settle_locked(holding, moved=True)
            else:
                with self.ledger.state_lock:
                    self.memory.pend(device, -entry.counted)
                self._drop_failed_claim(holding, part, new=step is Step.LOAD)
        return event

    def cancel(self, entries: Sequence[Planned], device: torch.device) -> None:
        """Take back recorded claims that were never carried out (a part before them failed)."""
        if not entries:
            return
        ledger = self.ledger
        with ledger.state_lock:
            touched: dict[int, tuple[Holding, bool]] = {}
            for entry in reversed(entries):
                holding, part = entry.claim
                ledger.remove_claim(holding, part)
                ledger.unpoint(holding, part)  # a hot-path claim's pointer was recorded, never set
                if entry.moves:
                    self.memory.pend(device, -entry.counted)
                if entry.step is Step.ADOPT:
                    holding.prefetched = True
                never_loaded = entry.step is Step.LOAD or touched.get(id(holding), (holding, False))[1]
                touched[id(holding)] = (holding, never_loaded)
            for holding, never_loaded in touched.values():
                mine = holding.mover == threading.get_ident() and holding.state is not State.RESIDENT
                if ledger.held.get(id(holding.key)) is not holding or not mine:
                    continue
                if never_loaded:
                    ledger.drop_holding(holding)
                else:
                    ledger.settle_locked(holding, moved=True)

    def _drop_failed_claim(self, holding: Holding, part: Part, *, new: bool = False) -> None:
        """Take back the claim on ``part`` that could not be completed (its pointers are undone already)."""
        ledger = self.ledger
        with ledger.state_lock:
            ledger.remove_claim(holding, part)
            ledger.unpoint(holding, part)
            if new:  # nothing was loaded (a failed load leaves the weights on the CPU): the holding goes
                ledger.drop_holding(holding)
                return
            if holding.claims or holding.state is State.RESIDENT:
                ledger.settle_locked(holding, moved=holding.state is not State.RESIDENT)
                return
            holding.state = State.OFFLOADING  # an adopted prefetch (or a kept holding) whose move failed: unheld
        moves.end_holding(ledger, holding, join=False)


def _swaps_within_budgets(plan: list[Planned]) -> None:
    """Swaps of patches onto weights loaded within a budget load within it too (not whole: the budget is what the
    scope that loaded them asked for, and a LoRA clone inside it must not take the whole device)."""
    for entry in plan:
        if entry.step is not Step.SWAP or entry.size:
            continue
        if entry.source is not None:  # the same weights earlier in this acquire
            entry.partial, entry.budget = entry.source.partial, entry.source.budget
        elif entry.holding is not None and entry.holding.partial:
            entry.partial, entry.budget = True, entry.holding.budget


def _step(part: Part, holding: Holding | None) -> Planned:
    """What a claim on ``part`` needs, given the holding of its weights on the device (none: a new one, to load)."""
    if holding is None:
        return Planned(part, Step.LOAD)
    if holding.prefetched:
        return Planned(part, Step.ADOPT, holding)
    if holding.forced_off or not holding.part.same_weights(part):
        return Planned(part, Step.SWAP, holding)
    return Planned(part, Step.NOTHING, holding)
