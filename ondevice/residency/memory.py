"""The memory policy (:class:`MemoryPolicy`): what fits on a device, how room is made, and who waits for it.

On devices whose free and total memory :func:`ondevice.devices.memory_info`
reports (the CPU has no policy), an acquire adds up ``part.nbytes()`` of the
parts not on the device yet (with ``budget=``, at most what is left of the
budget; a part over it is loaded with ``part.load_partial(device, left)``, and
once loaded counts what it left there, ``part.resident_nbytes(device)``), and
compares it with the free memory less what loads in flight will still take:

- it fits: the claims are recorded at once (and that memory counted as taken
  until each load ends);
- else (for the head of the queue, below) the reclaimers (:meth:`~ResidencyTable.add_reclaimer`:
  ComfyUI's cache of models no scope holds) are asked for room, once;
- else holdings no live scope claims (*kept* by ``keep=True`` / ``ondevice.keep``,
  or *prefetched*) on that device are evicted, least recently used first (by
  the time their last claim went, or they were kept or prefetched), where that
  makes it fit; weights a live scope claims are never evicted by another scope;
- else ``wait=False`` raises :class:`~ondevice.errors.OutOfDeviceMemory` (needed,
  free, and what is held there by whom), after letting moves that were in flight
  on that device end; ``wait=True`` queues: first come first served per device
  (only the head of the queue evicts, and one that evicted heads it from then on;
  a later acquire goes first only where it fits beside what every acquire ahead
  of it needs), re-checking after every
  release, move and eviction (and every :attr:`ResidencyTable.room_poll_s`, for
  memory freed outside ondevice), raising the same error when ``timeout`` passes;
- ``partial=True`` (no budget) loads whole what fits after evicting, and the
  first part that does not with ``part.load_partial(device, None)``; never waits.

A part larger than the whole device, without ``budget=`` or ``partial=True``,
raises at once.  **A wait that could never end raises at once**: the memory it
lacks would have to come from holdings claimed by scopes that cannot exit
before it enters: its own thread's (or its asyncio loop's, where it waits on
that loop's thread), or those of threads and tasks that wait, directly or
through others, for it.  Who can go on is worked out from every waiting
acquire (for memory, or for other patches) and every claim; memory ondevice
does not account (other processes, tensors outside scopes) is waited for.  A
load that runs out of device memory all the same (ComfyUI's headroom,
fragmentation) rolls back and raises ``OutOfDeviceMemory`` with the
``torch.OutOfMemoryError`` as its ``__cause__``.  Memory is accounted per device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from ondevice import devices
from ondevice.errors import InvalidDeviceError, OutOfDeviceMemory
from ondevice.residency.holdings import Holding, Ledger, State, holder
from ondevice.residency.owners import Owner
from ondevice.residency.patches import PatchWaits, Wait
from ondevice.residency.plans import Ask, Planned, check_abort, fit_within
from ondevice.strategies import Part

__all__ = ["MemoryPolicy", "size_text"]

log = logging.getLogger("ondevice")

_FIXES = (
    "Fixes: pass wait=True (and timeout=) to wait until it fits, budget= (like '6GiB') or partial=True to put only "
    "part of a model on the device, free device memory (exit other scopes, drop device tensors), or end keeps with "
    "ondevice.release()"
)


def size_text(nbytes: int | None) -> str:
    """``nbytes`` for a message: ``"1.50 GiB (1610612736 bytes)"``."""
    if nbytes is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"


class MemoryPolicy:
    """Per device: the acquires waiting for memory (``rooms``, first come first served), the bytes claimed or
    evicted for and not loaded yet (``pending``), and the reclaimers asked for room before kept weights are evicted.

    ``memory_info(device) -> (free, total)`` bytes is how it reads a device's memory (default:
    :func:`ondevice.devices.memory_info`, with torch's CUDA cache counted as free).  Every method but
    :meth:`reclaim` and :meth:`load_ran_out` expects the caller to hold the ledger's lock.
    """

    def __init__(
        self,
        ledger: Ledger,
        patches: PatchWaits,
        memory_info: Callable[[torch.device], tuple[int, int]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.patches = patches
        self.rooms: dict[torch.device, list[Ask]] = {}  # per device: acquires waiting for memory, first come first
        self.pending: dict[torch.device, int] = {}  # per device: bytes claimed or evicted for, not yet loaded
        self.reclaimers: list[Callable[[torch.device, int], object]] = []
        self._memory_info = memory_info

    def room(self, ask: Ask, plan: list[Planned]) -> bool | list[Holding] | int:
        """True where ``plan`` fits on the device; else the bytes to have free there that the reclaimers are asked
        for (once), or holdings to evict (marked OFFLOADING), or False once it waited.

        Raises :class:`OutOfDeviceMemory` where it does not fit and may not (or could never) wait.
        """
        needed = sum(entry.counted for entry in plan)
        memory = self.memory(ask.device) if needed else None
        if memory is None:
            return True
        free, total = memory
        if needed + sum(h.nbytes for h in self._own_holdings(ask)) > total and not ask.unbudgeted_partial:
            why = "more than the device's whole memory, beside what this scope holds there already"
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        available = free - self.pending.get(ask.device, 0) + ask.reserved
        ahead = self._ahead(ask)
        beside = available - sum(other.needed for other in ahead)
        if needed <= beside:
            return True
        if not ahead:  # the head of the queue (or no queue): it may reclaim, then evict
            made = self._make_room(ask, plan, needed - available, free)
            if made is not None:
                return made
        if ask.unbudgeted_partial:  # as much as fits now, the rest left to each part's partial load
            fit_within(plan, max(beside, 0), budget=False)
            return True
        ask.needed = needed
        if not ask.wait:
            if self._settling(ask):  # moves in flight there end first: decide on what they leave
                check_abort(ask)
                self.ledger.wait(ask.poll_s)
                return False
            why = "it does not fit beside what is held there now, and wait=False"
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        self._wait_for_room(ask, plan, needed, free, total)
        return False

    def _own_holdings(self, ask: Ask) -> list[Holding]:
        """The holdings of this acquire's parts on its device (each once): they stay beside what it loads."""
        held = self.ledger.held
        found = {id(h): h for part in ask.parts if (h := held.get(id(part.key))) is not None and h.device == ask.device}
        return list(found.values())

    def _make_room(self, ask: Ask, plan: list[Planned], shortfall: int, free: int) -> int | list[Holding] | None:
        """For the head of the queue: the bytes to have free that the reclaimers are asked for (once), or the
        holdings to evict, or None where neither can make ``shortfall`` bytes of room."""
        if self.reclaimers and not ask.reclaimed:
            ask.reclaimed = True
            return free + shortfall
        return self._victims(ask, shortfall, plan) or None

    def _ahead(self, ask: Ask) -> list[Ask]:
        queue = self.rooms.get(ask.device, [])
        return queue[: queue.index(ask)] if ask.queued else list(queue)

    def _victims(self, ask: Ask, shortfall: int, plan: list[Planned]) -> list[Holding]:
        """Unclaimed holdings to evict, least recently used first, that make up ``shortfall`` (none where they cannot,
        unless ``ask`` is a partial one: then all of them); marked OFFLOADING, their bytes reserved for ``ask``."""
        asked = {id(entry.part.key) for entry in plan}
        candidates = sorted(
            (
                h
                for h in self.ledger.held.values()
                if h.device == ask.device and evictable(h) and id(h.key) not in asked
            ),
            key=lambda h: h.used,
        )
        picked, freed = [], 0
        for holding in candidates:
            if freed >= shortfall:
                break
            picked.append(holding)
            freed += holding.nbytes
        if freed < shortfall and not ask.unbudgeted_partial:
            return []
        for holding in picked:
            self.ledger.begin(holding, State.OFFLOADING)
            log.info("ondevice: evicting %r from %s (%s) to make room", holding.part, holding.device, holder(holding))
        ask.reserved += freed
        self.pend(ask.device, freed)
        if not ask.queued:  # the queue is empty: it heads it, so an acquire that comes meanwhile waits behind it
            self._enqueue(ask)  # (not ahead of it, for room its reservation holds)
            ask.needed = sum(entry.counted for entry in plan)
        return picked

    def _enqueue(self, ask: Ask) -> None:
        """Put ``ask`` last in its device's queue (first come first served), from now."""
        self.rooms.setdefault(ask.device, []).append(ask)
        ask.queued, ask.since = True, time.monotonic()

    def _settling(self, ask: Ask) -> bool:
        """Whether moves that were in flight on the device when ``ask`` first did not fit are still in flight."""
        me = threading.get_ident()
        held = self.ledger.held
        if ask.settling is None:
            ask.settling = [
                (h, h.moves)
                for h in held.values()
                if h.device == ask.device and h.state is not State.RESIDENT and h.mover != me
            ]
        ask.settling = [
            (h, moves)
            for h, moves in ask.settling
            if held.get(id(h.key)) is h and h.moves == moves and h.state is not State.RESIDENT
        ]
        return bool(ask.settling)

    def _wait_for_room(self, ask: Ask, plan: list[Planned], needed: int, free: int, total: int) -> None:
        """Queue ``ask`` (first come first served), then wait once; raise if the wait could never end or timed out."""
        if not ask.queued:
            self._enqueue(ask)
            log.info("ondevice: %s waits for %s on %s", ask.owner.name, size_text(needed), ask.device)
            self.ledger.notify()  # waiters check again: the last to close a wait cycle sees it
        if self._room_endless(ask):
            why = (
                "waiting could never end: the memory it lacks is held by scopes that cannot exit before it enters "
                "(this thread's own, or of threads and tasks that wait, directly or not, for it)"
            )
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        now = time.monotonic()
        if ask.deadline is not None and now >= ask.deadline:
            why = f"it did not fit within timeout={ask.timeout} s"
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        check_abort(ask)
        warn_at = ask.since + (ask.warnings + 1) * ask.warn_s
        step = min(ask.poll_s, max(0.0, warn_at - now))
        if ask.deadline is not None:
            step = min(step, ask.deadline - now)
        self.ledger.wait(step)
        check_abort(ask)
        if time.monotonic() >= warn_at:
            ask.warnings += 1
            log.warning(
                "ondevice: %s has waited %.1f s for %s on %s; held there: %s",
                ask.owner.name,
                time.monotonic() - ask.since,
                size_text(needed),
                ask.device,
                self._held_text(ask.device),
            )

    def _room_endless(self, ask: Ask) -> bool:
        """Whether the memory ``ask`` lacks could only come from claims of owners that cannot go on before it does.

        Owners that go on: those not waiting whose thread no other waiter blocks, then (repeatedly) waiters
        whose wait can end given those: all their other-patches holders go on, or the memory they need could
        come from free memory, evictions and claims of owners that go on.
        """
        waits: dict[Owner, Wait | Ask] = dict(self.patches.waiting)
        for queue in self.rooms.values():
            for other in queue:
                waits[other.owner] = other
        owners = set(waits)
        for holding in self.ledger.held.values():
            owners.update(holding.owners)
        going: set[Owner] = set()
        room: dict[torch.device, int] = {}
        grown = True
        while grown:
            grown = False
            for owner in owners - going:
                if self._goes_on(owner, waits, going, room):
                    going.add(owner)
                    grown = True
        if ask.owner in going:
            return False
        return any(
            h.device == ask.device and any(owner not in going for owner in h.owners)
            for h in self.ledger.held.values()
            if h.claims
        )

    def _goes_on(
        self, owner: Owner, waits: dict[Owner, Wait | Ask], going: set[Owner], room: dict[torch.device, int]
    ) -> bool:
        for other in waits.values():  # a waiter that blocks its thread stops every other owner there
            if (
                other.blocking
                and other.owner != owner
                and other.owner.thread == owner.thread
                and other.owner not in going
            ):
                return False
        wait = waits.get(owner)
        if wait is None:
            return not owner.finished()
        if isinstance(wait, Wait):
            return all(conflict.owner in going for conflict in self.patches.conflicts(wait))
        held = self.ledger.held
        if wait.device not in room:  # free, less what loads in flight take, plus what eviction could free
            memory = self.memory(wait.device)
            free = memory[0] if memory is not None else 0
            evicted = sum(h.nbytes for h in held.values() if h.device == wait.device and evictable(h))
            room[wait.device] = free - self.pending.get(wait.device, 0) + evicted
        own = sum(h.nbytes for h in self._own_holdings(wait) if evictable(h))  # its own kept parts stay
        releasable = sum(
            h.nbytes
            for h in held.values()
            if h.device == wait.device and h.claims and all(o in going and o != owner for o in h.owners)
        )
        return wait.needed <= room[wait.device] - own + wait.reserved + releasable

    def _out_of_memory(  # noqa: PLR0913  (the numbers the error states)
        self, ask: Ask, plan: list[Planned], needed: int, free: int, total: int | None, *, why: str
    ) -> OutOfDeviceMemory:
        loading = [entry.part for entry in plan if entry.counted] or ask.parts
        names = ", ".join(map(repr, loading))
        msg = (
            f"not enough memory on {ask.device} for {names}: needed {size_text(needed)}, free {size_text(free)} of "
            f"{size_text(total)}; {why}. Held there: {self._held_text(ask.device)}. {_FIXES}"
        )
        return OutOfDeviceMemory(
            msg, device=ask.device, needed=needed, free=free, held=self._held_list(ask.device), total=total
        )

    def load_ran_out(self, entry: Planned, ask: Ask, error: BaseException) -> OutOfDeviceMemory:
        """The error for a load that ran out of device memory (raised once everything the acquire moved is back)."""
        needed = entry.counted or entry.size or entry.part.nbytes()
        with self.ledger.state_lock:
            memory = self.memory(ask.device)
            free, total = memory if memory is not None else (0, None)
            held, text = self._held_list(ask.device), self._held_text(ask.device)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        msg = (
            f"loading {entry.part!r} on {ask.device} ran out of device memory ({first}); everything this scope had "
            f"moved is back where it was. It needed {size_text(needed)}; {size_text(free)} is free now of "
            f"{size_text(total)}. Held there: {text}. {_FIXES}"
        )
        return OutOfDeviceMemory(msg, device=ask.device, needed=needed, free=free, held=held, total=total)

    def _held_list(self, device: torch.device) -> list[tuple[str, int, str]]:
        live = sorted(
            (h for h in self.ledger.held.values() if h.device == device and (h.claims or h.kept or h.prefetched)),
            key=lambda h: h.order,
        )
        return [(repr(h.part), h.nbytes, holder(h)) for h in live]

    def _held_text(self, device: torch.device) -> str:
        held = self._held_list(device)
        if not held:
            return "nothing by ondevice (the memory in use there is outside its scopes)"
        return "; ".join(
            f"{name}, {size_text(nbytes)}, {who if who in ('kept', 'prefetched') else 'by ' + who}"
            for name, nbytes, who in held
        )

    def memory(self, device: torch.device) -> tuple[int, int] | None:
        """``(free, total)`` bytes on ``device`` for the policy; None where it has none (the CPU, unknown devices)."""
        if device.type == "cpu":
            return None
        if self._memory_info is not None:
            try:
                return self._memory_info(device)
            except InvalidDeviceError:
                return None
        try:
            free, total = devices.memory_info(device)
        except InvalidDeviceError:
            return None
        if device.type == "cuda":  # what torch's caching allocator keeps is free for tensors, not for cudaMalloc
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free, total

    def pend(self, device: torch.device, nbytes: int) -> None:
        """Count ``nbytes`` more (or fewer) as taken on ``device`` by loads not ended yet."""
        if not nbytes:
            return
        left = self.pending.get(device, 0) + nbytes
        if left:
            self.pending[device] = left
        else:
            del self.pending[device]
        self.ledger.notify()

    def leave_queue(self, ask: Ask) -> None:
        """``ask`` is decided (or gave up): out of its device's queue, its eviction reservation dropped."""
        if ask.queued:
            queue = self.rooms[ask.device]
            queue.remove(ask)
            if not queue:
                del self.rooms[ask.device]
            ask.queued = False
            self.ledger.notify()
        self.pend(ask.device, -ask.reserved)
        ask.reserved = 0

    def reclaim(self, device: torch.device, nbytes: int) -> None:
        """Ask every reclaimer for ``nbytes`` free on ``device`` (outside the lock)."""
        for reclaim in list(self.reclaimers):
            try:
                reclaim(device, nbytes)
            except Exception:  # a reclaimer that fails frees nothing: the policy goes on without it
                log.exception("ondevice: reclaiming memory on %s failed", device)

    def prefetch_fits(self, part: Part, device: torch.device, size: int, *, measured: bool) -> bool:
        """Whether ``size`` bytes fit beside what is held, loading, and needed by waiting acquires."""
        memory = self.memory(device) if size or not measured else None
        if memory is None:
            return True
        if not measured:  # it was held when measured: rare
            size = part.nbytes()
        waiting = sum(ask.needed for ask in self.rooms.get(device, []))
        if size <= memory[0] - self.pending.get(device, 0) - waiting:
            return True
        log.info("ondevice: not prefetching %r: %s does not fit on %s now", part, size_text(size), device)
        return False


def evictable(holding: Holding) -> bool:
    """Whether ``holding`` may be evicted: resident, claimed by no scope, and kept or prefetched."""
    return holding.state is State.RESIDENT and not holding.claims and (holding.kept or holding.prefetched)
