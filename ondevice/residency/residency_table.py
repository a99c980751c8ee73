"""The table (:class:`ResidencyTable`): the public operations over the ledger, the memory policy and the waits.

Keeping: an acquire with ``keep=True`` marks its weights kept: at their last
release they stay on the device, unclaimed, until an acquire needs their memory
(eviction), :meth:`~ResidencyTable.end_keep` or a forced offload.  A later claim
on them is the hot path.

Prefetch: :meth:`ResidencyTable.prefetch` points a part at the device and
calls its ``prefetch`` (copies started on a side stream, the current stream
not waiting), then records a holding with no claim, ``prefetched``, if it fits
beside what is held and what waiting acquires need (else it starts nothing:
a prefetch never evicts or waits).  The next claim *adopts* it: no load; the
part's ``join`` (the current stream waits for the copies) runs once, before
the claim returns, and from then on it is an ordinary holding, offloaded when
its last claim is released.  A prefetched (or kept) holding counts in
:meth:`~ResidencyTable.held` (ComfyUI's memory management keeps it).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from ondevice.devices import CPU
from ondevice.residency import moves
from ondevice.residency.acquire import Acquirer
from ondevice.residency.holdings import Claim, Holding, Ledger, State
from ondevice.residency.memory import MemoryPolicy
from ondevice.residency.owners import Owner
from ondevice.residency.patches import PatchWaits
from ondevice.residency.plans import Ask, prefetch_conflict
from ondevice.residency.release import release_all
from ondevice.strategies import Part, as_part

__all__ = ["ResidencyTable"]

log = logging.getLogger("ondevice")


class ResidencyTable:
    """What is held where; see :mod:`ondevice.residency`.

    ``memory_info(device) -> (free, total)`` bytes is how the table reads a device's memory (default:
    :func:`ondevice.devices.memory_info`, with torch's CUDA cache counted as free); a device it raises
    :class:`~ondevice.errors.InvalidDeviceError` for, and the CPU, get no memory policy.
    """

    wait_warning_s: float = 60.0
    """A waiting acquire logs a warning each time it has waited this long."""

    room_poll_s: float = 0.1
    """An acquire waiting for memory checks again at least this often (memory freed outside ondevice wakes nobody)."""

    def __init__(self, memory_info: Callable[[torch.device], tuple[int, int]] | None = None) -> None:
        self._ledger = Ledger()
        self.lock = self._ledger.lock
        self._state = (
            self._ledger.state_lock
        )  # the table's own holds: not counted, so its event delivery is not deferred
        self._patches = PatchWaits(self._ledger)
        self._memory = MemoryPolicy(self._ledger, self._patches, memory_info)
        self._acquirer = Acquirer(self._ledger, self._memory, self._patches)

    # the state tests look at: what is held (by id(key)), who sleeps, who queues for memory, what is pending
    @property
    def _held(self) -> dict[int, Holding]:
        return self._ledger.held

    @property
    def _sleepers(self) -> int:
        return self._ledger.sleepers

    @property
    def _rooms(self) -> dict[torch.device, list[Ask]]:
        return self._memory.rooms

    @property
    def _pending(self) -> dict[torch.device, int]:
        return self._memory.pending

    def add_reclaimer(self, reclaim: Callable[[torch.device, int], object]) -> None:
        """Have ``reclaim(device, nbytes)`` free memory that others cache on ``device`` (ComfyUI's loaded models no
        scope holds) until ``nbytes`` are free there, before an acquire that does not fit evicts kept weights.

        Called outside the lock, at most once per acquire; it must never free what :meth:`held` lists.
        """
        if reclaim not in self._memory.reclaimers:
            self._memory.reclaimers.append(reclaim)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock (for code that must not run beside a change of the table's state)."""
        with self.lock:
            yield

    # ------------------------------------------------------------------ public

    def acquire(  # noqa: PLR0913  (every keyword is one of on_gpu's)
        self,
        parts: Sequence[Part],
        device: torch.device,
        *,
        before: Callable[[], None] | None = None,
        owner: Owner | None = None,
        wait: bool = False,
        timeout: float | None = None,
        budget: int | None = None,
        partial: bool = False,
        keep: bool = False,
        block: bool = True,
        abort: threading.Event | None = None,
        ahead: Sequence[Part] = (),
    ) -> list[Claim]:
        """Hold every part on ``device``, loading those not yet there; all or nothing, atomically.

        Waits while another thread moves the same weights, or holds them with other
        patches, and (``wait=True``) for memory; raises :class:`ResidencyConflictError`
        where a wait for patches could never end or the weights are claimed on another
        device, and :class:`~ondevice.errors.OutOfDeviceMemory` where they do not fit
        (see :mod:`ondevice.residency.memory`).  ``before`` runs under the lock, once, right before
        the claims are recorded (after any wait), so what it reads is consistent with
        them.  ``owner`` (default: the caller's thread and asyncio task) owns the claims;
        ``keep`` marks the weights kept once they are loaded; ``block=False`` raises
        :class:`WouldBlock`, holding nothing, instead of waiting or moving anything;
        setting ``abort`` (then :meth:`wake`) makes a waiting acquire raise :class:`AbortedError`.
        ``ahead``: what the caller will :meth:`prefetch` on ``device`` once it holds ``parts``; where any of it is
        held on another device the acquire raises :class:`ResidencyConflictError` before anything moves.
        """
        owner = owner or Owner.current()
        parts = [as_part(part) for part in parts]
        claims = self._acquirer.claim_resident(parts, device, owner, before)
        if claims is not None:
            if keep:
                self.mark_kept(claims)
            return claims
        ask = Ask(owner, parts, device, wait, timeout, budget, partial, block, ahead=[as_part(p) for p in ahead])
        ask.blocking, ask.abort = threading.get_ident() == owner.thread, abort
        ask.warn_s, ask.poll_s = self.wait_warning_s, self.room_poll_s
        if timeout is not None and math.isfinite(timeout):
            ask.deadline = time.monotonic() + timeout
        plan = self._acquirer.reserve(ask, before)
        claims = self._acquirer.carry_out(plan, ask)
        if keep:
            self.mark_kept(claims)
        return claims

    def mark_kept(self, claims: Sequence[Claim]) -> None:
        """Keep the weights of ``claims`` after their last release (as an acquire with ``keep=True`` does)."""
        with self._state:
            for claim in claims:
                claim.holding.kept, claim.holding.used = True, next(self._ledger.ticks)

    def release(self, claims: Sequence[Claim]) -> None:
        """Drop each claim; offload weights no claim holds any more and nobody keeps (every one, even if one fails)."""
        moved = True
        try:
            moved = release_all(self._ledger, reversed(claims))
        finally:
            if moved:  # a slow path: mend what was evicted on the devices these claims were on
                for device in {claim.holding.device for claim in claims}:
                    moves.restore_quietly(self._ledger, device)

    def moves_on_release(self, claims: Sequence[Claim]) -> bool:
        """Whether releasing ``claims`` now might move weights (an offload or a swap back); cheap, under the lock."""
        with self._state:
            count: dict[int, int] = {}
            for claim in claims:
                count[id(claim.holding)] = count.get(id(claim.holding), 0) + 1
            for claim in claims:
                holding = claim.holding
                if holding.state is not State.RESIDENT or len(holding.claims) <= count[id(holding)]:
                    return True
                if not all(claim.part.same_weights(other) for other in holding.claims):
                    return True
        return False

    def end_keep(self, parts: Sequence[Part]) -> None:
        """End the keep of each part's weights: offloaded now if no scope claims them, else at their last release."""
        first: BaseException | None = None
        for part in parts:
            try:
                self._end_keep(as_part(part))
            except BaseException as exc:  # noqa: BLE001  (every keep is ended; the first error is raised)
                first = moves.first_error(first, exc, part)
        if first is not None:
            raise first

    def prefetch(self, parts: Sequence[Part], device: torch.device) -> list[Holding]:
        """Start loading every part that is not held yet and fits; all or nothing; the holdings it made (prefetched).

        Parts whose weights are held already (claimed, kept or prefetched) are left as they are;
        weights held on another device raise :class:`ResidencyConflictError`.  A part that does
        not fit beside what is held and what waiting acquires need is not started (a prefetch
        never evicts or waits).  On any failure what this call prefetched is cancelled (on the
        CPU again) and the error raised.
        """
        parts = [as_part(part) for part in parts]
        made: list[Holding] = []
        try:
            for part in parts:
                holding = self._prefetch_one(part, device)
                if holding is not None:
                    made.append(holding)
            with self._state:  # a scope may have taken a prefetched module meanwhile (to another device, say)
                made = [h for h in made if self._ledger.held.get(id(h.key)) is h and h.prefetched]
            missing = [h for h in made if not h.forced_off and not h.part.is_on(h.device)]
            with self._state:  # only what is still this prefetch's, and not in motion, counts as not loaded
                missing = [
                    h
                    for h in missing
                    if self._ledger.held.get(id(h.key)) is h and h.prefetched and h.state is State.RESIDENT
                ]
            moves.verify(missing, device)
        except BaseException:
            for holding in reversed(made):
                try:
                    self.cancel(holding)
                except Exception:  # the first error is the one to raise
                    log.exception("ondevice: could not cancel the prefetch of %r", holding.part)
            raise
        return made

    def cancel(self, holding: Holding) -> bool:
        """Offload a prefetched holding that no scope has claimed; False (nothing done) where one has, or it is gone."""
        with self._state:
            self._ledger.wait_until_settled(holding)
            if self._ledger.held.get(id(holding.key)) is not holding or not holding.prefetched:
                return False
            self._ledger.begin(holding, State.OFFLOADING)
        moves.end_holding(self._ledger, holding, join=True)
        return True

    def restore(self) -> None:
        """Load back every held weight that something evicted."""
        moves.restore(self._ledger)

    def held(self) -> list[Holding]:
        """The live holdings (claimed, kept or prefetched), outermost first; not those on their way off the device."""
        with self._state:
            live = [h for h in self._ledger.held.values() if h.claims or h.prefetched or h.kept]
        return sorted(live, key=lambda h: h.order)

    def holds_on(self, device: torch.device) -> bool:
        """Whether any weights are held, or on their way, on ``device`` (cheap: a dictionary lookup)."""
        with self._state:
            return device in self._ledger.devices

    def waiting(self) -> list[Owner]:
        """The owners whose acquire now waits for another thread's claims to be released, or for memory."""
        with self._state:
            rooms = [ask.owner for queue in self._memory.rooms.values() for ask in queue]
            return [*(wait.owner for wait in self._patches.waiting.values()), *rooms]

    def wake(self) -> None:
        """Wake every waiting acquire to check again (after setting its ``abort``)."""
        with self._state:
            self._ledger.changed.notify_all()

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting, and a new claim loads it again.

        A prefetched or kept holding no scope claims is taken off (the prefetch cancelled, the keep ended).
        """
        part = as_part(part)
        ledger = self._ledger
        with self._state:
            holding = ledger.settled_holding(part)
            if holding is None:  # not held: a transient holding, so no claim loads it while it goes
                holding = ledger.add_holding(Holding(CPU, part.key, next(ledger.order), part, forced_off=True))
            elif holding.claims:
                log.warning("ondevice: offload() of %r while a scope holds it; it stays on the CPU", part)
                holding.forced_off = True
            ledger.begin(holding, State.OFFLOADING)
        if holding.prefetched or not holding.claims:
            moves.end_holding(ledger, holding, join=holding.prefetched)
            return
        event = None
        try:
            event = moves.run(holding.part, CPU, holding.part.offload)
        finally:
            ledger.settle(holding, moved=True)
        self.lock.deliver(event)

    # ------------------------------------------------------------------ keeps and prefetches, one part each

    def _end_keep(self, part: Part) -> None:
        with self._state:
            holding = self._ledger.settled_holding(part)
            if holding is None or not holding.kept:
                return
            holding.kept = False
            if holding.claims or holding.prefetched:
                return  # offloaded at its last release
            self._ledger.begin(holding, State.OFFLOADING)
        moves.end_holding(self._ledger, holding, join=False)

    def _prefetch_one(self, part: Part, device: torch.device) -> Holding | None:
        ledger, memory = self._ledger, self._memory
        measured = memory.memory(device) is not None  # also where held now: a holding leaving may be gone below
        size = part.nbytes() if measured else 0  # outside the lock: a walk over its tensors
        with self._state:
            holding = ledger.settled_holding(part)
            if holding is not None:
                if holding.device != device:
                    raise prefetch_conflict(part, holding.device, device)
                return None  # held already: nothing to start
            if not memory.prefetch_fits(part, device, size, measured=measured):
                return None
            holding = Holding(device=device, key=part.key, order=next(ledger.order), part=part, prefetched=True)
            holding.nbytes, holding.used = size, next(ledger.ticks)
            ledger.add_holding(holding)
            ledger.begin(holding, State.LOADING)
            memory.pend(device, size)
        event, done = None, False
        try:
            part.point_at(device)
            try:
                event = moves.run(part, device, functools.partial(part.prefetch, device), wait=False)
                done = True
            finally:
                if not done:
                    part.restore()
        finally:
            with self._state:
                memory.pend(device, -size)
                if done:
                    holding.pointed.append(part)
                    ledger.settle_locked(holding, moved=True)
                else:  # a failed prefetch leaves the weights on the CPU: the holding goes
                    holding.prefetched, holding.mover = False, None
                    ledger.drop_holding(holding)
        self.lock.deliver(event)
        return holding
