"""The process-wide residency table: which weights live scopes hold on which device.

Scopes decide *when*; this table decides *what may stay where*; strategies'
parts decide *how* one kind of component moves.

Weights are counted by identity of the part's ``key`` (ComfyUI clones share
one ``nn.Module``, so they share one count).  The first claim loads, later
ones only count; the last release offloads.  A later claim through a part
whose weights differ (a ComfyUI clone with other patches, say a LoRA) makes
that part the holding's current ``part`` until it is released, and the
latest claim still live is loaded back then.  Every claim points its part at
the device (``point_at``); a claim's pointers are undone at its release, but
those of the first part pointed, which saved the true originals, are undone
only when the weights leave the device.  The table only handles
:class:`~ondevice.strategies.Part` objects (others are adapted by
:func:`~ondevice.strategies.as_part` on the way in) and calls their methods
directly.

States: each :class:`Holding` is ``LOADING``, ``RESIDENT`` or ``OFFLOADING``
(:class:`State`); weights with no holding are offloaded.  A claim on weights
that are ``LOADING`` waits for that load and never loads them twice (if the
load fails, the waiter decides again: it loads them itself, or raises); a
claim on weights that are ``OFFLOADING`` waits until they are on the CPU, then
loads them again.  A swap of patches, a load back after an eviction and a
forced offload mark the holding the same way while they run.

The hot path: a claim on ``RESIDENT`` weights with the same patches, and its
release, cost a few dictionary operations, whatever else is held: **a claim on
resident weights trusts the table** and looks at no tensor.  Weights evicted
behind ondevice's back (a custom node calling ComfyUI's ``model_unload``) are
found and loaded back only by an acquire or a release that moves something,
by :meth:`ResidencyTable.restore` and by :meth:`ondevice.ScopeHandle.ensure`.
An acquire verifies what it loaded: one that cannot get a part it loaded
wholly onto the device raises and holds nothing.

Prefetch: :meth:`ResidencyTable.prefetch` points a part at the device and
calls its ``prefetch`` (copies started on a side stream, the current stream
not waiting), then records a holding with no claim, ``prefetched``.  The next
claim *adopts* it: no load; the part's ``join`` (the current stream waits for
the copies) runs once, before the claim returns, and from then on it is an
ordinary holding, offloaded when its last claim is released.  A prefetched
holding counts in :meth:`~ResidencyTable.held` (ComfyUI's memory management
keeps it), and stays on the device until a scope claims it and exits, or
:meth:`~ResidencyTable.cancel` (or a forced offload) takes it off again.

Every ``load``, ``prefetch`` and ``offload`` the table performs emits one
:class:`~ondevice.events.MoveEvent` (while any listener is registered; see
:mod:`ondevice.events`).

Other patches, concurrently: one ``nn.Module`` carries one set of patches at
a time.  Within one thread (and one asyncio task) scopes nest, so a clone
with other patches is swapped in and back as above.  Each claim records its
:class:`Owner` (thread, and asyncio task inside an event loop), and a claim
never swaps weights under an owner that runs beside it: an acquire that
needs other patches than a live claim of another thread holds *waits* until
those claims are released, then swaps its own in.  Waiting is what a
service that samples with a base model in one request and its LoRA clone in
another needs: the two run one after the other, each on its own weights,
instead of one failing.  Where waiting could never end, acquire raises
:class:`~ondevice.errors.ResidencyConflictError` naming both parts and both
owners, and holds nothing: when the holder waits, directly or through other
waiting threads, for this thread, or is another asyncio task on this
thread's event loop (waiting would block the loop that has to finish it).
Clones with the same patches share the weights and never wait.  A thread (or
task) that has ended runs beside nobody: a generator it left suspended inside
a scope continues that scope, as a nested one, wherever it is resumed.
Generators interleaved on one thread (``zip(gen(base), gen(lora))``) count as
nested scopes of that thread: their patches swap as each steps, so do not
interleave generators that run forwards on other patches of the same weights.  Waiting is
not fair (scopes with the current patches that keep overlapping can keep a
waiter waiting), and a wait on something ondevice cannot see (the holder
joins the waiting thread) never ends: a waiter logs a warning every
:attr:`ResidencyTable.wait_warning_s` seconds naming both.

Thread semantics: a short re-entrant lock (:attr:`ResidencyTable.lock`)
guards the table's state only; no part method that moves weights (``load``,
``prefetch``, ``join``, ``offload``, ``point_at``, ``restore``) runs under
it.  Moves of different weights (other keys, other devices) run at the same
time on their threads; moves of the same weights never do (the states
above).  A thread that holds :attr:`ResidencyTable.lock` itself (``with
table.lock:``) moves with it held, so other threads wait meanwhile.  Waiting
(for a move, or for other patches to be released) releases the lock.  Move
events reach listeners on the moving thread once the move's state is
recorded, never while that thread holds the lock (held by the caller, they
are delivered as its outermost hold ends), so listeners may enter scopes.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ondevice import devices, events
from ondevice.devices import CPU
from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.events import MoveEvent
from ondevice.strategies import Part, as_part
from ondevice.strategies.module import placement

__all__ = ["Claim", "Holding", "Owner", "ResidencyTable", "State", "table"]

log = logging.getLogger("ondevice")


@dataclass(frozen=True)
class Owner:
    """Who entered a claim: a thread and, inside a running event loop, the asyncio task."""

    thread: int
    task: object = None
    name: str = field(default="", compare=False)
    handle: threading.Thread | None = field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> Owner:
        """The calling thread and its running asyncio task, if any."""
        loop = asyncio._get_running_loop()  # None outside a running loop (asyncio.current_task would raise)
        task = None if loop is None else asyncio.current_task(loop)
        if task is None:
            owner: Owner | None = getattr(_thread_owner, "owner", None)
            if owner is None:
                thread = threading.current_thread()
                owner = _thread_owner.owner = cls(threading.get_ident(), None, f"thread {thread.name!r}", thread)
            return owner
        thread = threading.current_thread()
        name = f"thread {thread.name!r} (asyncio task {task.get_name()!r})"
        return cls(threading.get_ident(), task, name, thread)

    def finished(self) -> bool:
        """Whether this thread (or task) has ended: a scope it left open (a suspended generator) runs no more here."""
        if self.handle is not None and not self.handle.is_alive():
            return True
        done = getattr(self.task, "done", None)
        return bool(done()) if callable(done) else False

    def runs_beside(self, other: Owner) -> bool:
        """Whether code of the two may interleave: other live threads, or other tasks of one event loop.

        An owner that has ended runs beside nobody: whoever resumes a generator it left suspended
        inside a scope continues that scope, as a nested one.
        """
        if self.thread == other.thread and (self.task is None or other.task is None or self.task is other.task):
            return False  # one thread, and the same task or code enclosing every task of its loop
        return not (other.finished() or self.finished())


_thread_owner = threading.local()  # .owner: the calling thread's Owner outside any asyncio task (built once)


class State(enum.Enum):
    """Where a holding's weights are: on the device, or on their way there or back (no holding: on the CPU)."""

    LOADING = "loading"
    """A load (a first claim, a swap of patches, a load back after an eviction, a prefetch or its adoption) runs."""
    RESIDENT = "resident"
    """On the device, nothing moving them."""
    OFFLOADING = "offloading"
    """On their way to the CPU (the last claim was released, a prefetch was cancelled, or a forced offload)."""


@dataclass
class Holding:
    """Weights that live scopes hold (or a prefetch put) on ``device``; ``claims`` lists every part claimed, in order.

    ``state`` says whether a move of these weights runs (:class:`State`); ``prefetched`` marks a
    holding that :meth:`ResidencyTable.prefetch` made and no scope has claimed yet.
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
    mover: int | None = field(default=None, repr=False)  # the thread whose move runs (state is not RESIDENT)
    moves: int = field(default=0, repr=False)  # counts moves: a restore acts only on what it saw
    threads: dict[int, int] = field(default_factory=dict, repr=False)  # live claims per owner's thread


class Claim(NamedTuple):
    """One scope's hold on one part; released exactly once."""

    holding: Holding
    part: Part


@dataclass(frozen=True)
class _Conflict:
    """``part`` needs other patches than ``held``, which ``owner`` claimed and which runs beside the asker."""

    part: Part
    held: Part
    owner: Owner


@dataclass(frozen=True)
class _Wait:
    owner: Owner
    parts: Sequence[Part]
    device: torch.device


class _Step(enum.Enum):
    """What a claim does once it is recorded, outside the lock."""

    NOTHING = "nothing"  # the weights are resident with its patches: point the part at the device, done
    LOAD = "load"  # a new holding: point at the device and load
    SWAP = "swap"  # other patches (or forced off): point at the device and load this part's weights
    ADOPT = "adopt"  # a prefetched holding: point at the device, join its copies (and swap, if other patches)


class _TableLock:
    """The table's re-entrant lock; events of moves made while a caller holds it wait until its outermost hold ends.

    Used like ``threading.RLock`` (``with table.lock:``); ``rlock`` is the lock itself (for a ``Condition``).
    The table takes ``rlock`` directly, so the depth counted here is what callers outside the table hold.
    """

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self._local = threading.local()  # depth: this thread's holds; pending: its events not yet delivered

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:  # noqa: FBT001, FBT002  (RLock's signature)
        """Take the lock (again, on the thread that holds it)."""
        got = self.rlock.acquire(blocking, timeout)
        if got:
            self._local.depth = getattr(self._local, "depth", 0) + 1
        return got

    def release(self) -> None:
        """Give one hold back; the outermost delivers this thread's pending move events, the lock released."""
        self.rlock.release()  # RuntimeError where this thread does not hold it
        self._local.depth -= 1
        if self._local.depth == 0:
            pending = getattr(self._local, "pending", None)
            if pending:
                self._local.pending = []
                for event in pending:
                    events.emit(event)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def deliver(self, event: MoveEvent | None) -> None:
        """Give ``event`` to listeners now, or once this thread's outermost hold ends if it holds the lock."""
        if event is None:
            return
        if getattr(self._local, "depth", 0) == 0:
            events.emit(event)
            return
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        pending.append(event)


def _on(device: torch.device, target: torch.device) -> bool:
    """Whether ``device`` is ``target`` (an index-less target matches any index)."""
    return device.type == target.type and (target.index is None or device.index == target.index)


def _event(part: Part, target: torch.device, before: dict[torch.device, int], seconds: float) -> MoveEvent:
    """The event of ``part``'s move to ``target``: from where most of its bytes were ``before``."""
    elsewhere = {device: size for device, size in before.items() if not _on(device, target)}
    source = max(elsewhere, key=elsewhere.__getitem__) if elsewhere else target
    nbytes = sum(size for device, size in placement(part.tensors()).items() if _on(device, target))
    return MoveEvent(
        component=repr(part),
        source=source,
        target=target,
        nbytes=nbytes,
        seconds=seconds,
        pinned=part.last_pinned,
        stream=part.last_stream,
        path=part.last_move or part.path,
        copied=part.copied_bytes,
        reason=part.last_fallback,
    )


def _first_error(first: BaseException | None, exc: BaseException, what: object) -> BaseException:
    """The error to raise once every cleanup ran: the first, unless a later interrupt outranks it."""
    if first is None:
        return exc
    if isinstance(first, Exception) and not isinstance(exc, Exception):
        exc.__context__ = first  # an interrupt outranks an ordinary error: raised, that error chained
        return exc
    log.error("ondevice: releasing %r also failed: %r", what, exc)
    return first


class ResidencyTable:
    """What is held where; see the module docstring."""

    wait_warning_s: float = 60.0
    """A waiting acquire logs a warning each time it has waited this long."""

    def __init__(self) -> None:
        self.lock = _TableLock()
        self._state = self.lock.rlock  # the table's own holds: not counted, so its event delivery is not deferred
        self._changed = threading.Condition(self._state)  # notified whenever a claim goes or a move ends
        self._held: dict[int, Holding] = {}  # id(key) -> its holding, in every state
        self._devices: dict[torch.device, int] = {}  # holdings per device
        self._sleepers = 0  # threads waiting on _changed: a release with none to wake notifies nobody
        self._waiting: dict[int, _Wait] = {}  # thread ident -> what that thread waits to acquire
        self._order = itertools.count()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock (for code that must not run beside a change of the table's state)."""
        with self.lock:
            yield

    # ------------------------------------------------------------------ public

    def acquire(
        self, parts: Sequence[Part], device: torch.device, *, before: Callable[[], None] | None = None
    ) -> list[Claim]:
        """Hold every part on ``device``, loading those not yet there; all or nothing.

        Waits while another thread moves the same weights, or holds them with other
        patches (see the module docstring); raises :class:`ResidencyConflictError`
        where that wait could never end, or where the weights are held on another
        device.  ``before`` runs under the lock, once, right before the first claim
        is recorded (after any wait), so what it reads is consistent with the claims.
        """
        owner = Owner.current()
        parts = [as_part(part) for part in parts]
        claims: list[Claim] = []
        loaded: list[Holding] = []
        try:
            for index, part in enumerate(parts):
                claim, step = self._claim(part, device, owner, parts if index == 0 else (part,), before)
                before, event = None, None
                if step is not _Step.NOTHING:
                    event = self._finish_claim(claim, step)  # on failure the claim is taken back already
                    if claim.holding.part is part:
                        loaded.append(claim.holding)
                claims.append(claim)
                self.lock.deliver(event)  # a listener may interrupt: the claim is in claims, released below
            if before is not None:  # no part: nothing was claimed, and nothing moved
                with self._state:
                    before()
            if loaded:  # a slow path: mend what was evicted meanwhile, then check what this acquire loaded
                self._restore(device)
                self._verify(loaded, device)
        except BaseException:
            try:
                self._release_all(reversed(claims))
            finally:
                self._restore_quietly(device)  # a failed load may have evicted what outer scopes hold
            raise
        return claims

    def release(self, claims: Sequence[Claim]) -> None:
        """Drop each claim; offload weights no claim holds any more (every one, even if one fails)."""
        moved = True
        try:
            moved = self._release_all(reversed(claims))
        finally:
            if moved:  # a slow path: mend what was evicted on the devices these claims were on
                for device in {claim.holding.device for claim in claims}:
                    self._restore_quietly(device)

    def prefetch(self, parts: Sequence[Part], device: torch.device) -> list[Holding]:
        """Start loading every part that is not held yet; all or nothing; the holdings it made (prefetched).

        Parts whose weights are held already (claimed, or prefetched) are left as they are;
        weights held on another device raise :class:`ResidencyConflictError`.  On any
        failure what this call prefetched is cancelled (on the CPU again) and the error raised.
        """
        parts = [as_part(part) for part in parts]
        made: list[Holding] = []
        try:
            for part in parts:
                holding = self._prefetch_one(part, device)
                if holding is not None:
                    made.append(holding)
            self._verify(made, device)
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
            self._wait_until_settled(holding)
            if self._held.get(id(holding.key)) is not holding or not holding.prefetched:
                return False
            self._begin(holding, State.OFFLOADING)
        self._end_holding(holding, join=True)
        return True

    def restore(self) -> None:
        """Load back every held weight that something evicted."""
        self._restore()

    def held(self) -> list[Holding]:
        """The live holdings (claimed, or prefetched), outermost first; not those on their way off the device."""
        with self._state:
            live = [h for h in self._held.values() if h.claims or h.prefetched]
        return sorted(live, key=lambda h: h.order)

    def holds_on(self, device: torch.device) -> bool:
        """Whether any weights are held, or on their way, on ``device`` (cheap: a dictionary lookup)."""
        with self._state:
            return device in self._devices

    def waiting(self) -> list[Owner]:
        """The owners whose acquire now waits for another thread's claims to be released."""
        with self._state:
            return [wait.owner for wait in self._waiting.values()]

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting, and a new claim loads it again.

        A prefetched holding no scope has claimed is cancelled.
        """
        part = as_part(part)
        with self._state:
            while True:
                holding = self._held.get(id(part.key))
                if holding is None or holding.state is State.RESIDENT:
                    break
                self._wait_for_move(holding, part)
            if holding is None:  # not held: a transient holding, so no claim loads it while it goes
                holding = self._add_holding(Holding(CPU, part.key, next(self._order), part, forced_off=True))
            elif not holding.prefetched:
                log.warning("ondevice: offload() of %r while a scope holds it; it stays on the CPU", part)
                holding.forced_off = True
            self._begin(holding, State.OFFLOADING)
        if holding.prefetched or not holding.claims:
            self._end_holding(holding, join=holding.prefetched)
            return
        event = None
        try:
            event = self._move(holding.part, CPU, holding.part.offload)
        finally:
            self._settle(holding, moved=True)
        self.lock.deliver(event)

    # ------------------------------------------------------------------ claims

    def _claim(
        self, part: Part, device: torch.device, owner: Owner, asked: Sequence[Part], before: Callable[[], None] | None
    ) -> tuple[Claim, _Step]:
        """Record a claim on ``part`` (waiting as needed) and say what must happen outside the lock."""
        key = part.key
        with self._state:
            while True:
                self._wait_for_other_patches(owner, asked, device)
                holding = self._held.get(id(key))
                if holding is None or holding.state is State.RESIDENT:
                    break
                self._wait_for_move(holding, part)
            if holding is not None and holding.device != device:
                if holding.prefetched:
                    why, fix = "prefetched to it", "cancel the prefetch first"
                else:
                    why, fix = "by a live scope", "exit the other scope first"
                msg = (
                    f"{part!r} is held on {holding.device} {why} and was asked for on {device}; "
                    f"use device={str(holding.device)!r} or {fix}"
                )
                raise ResidencyConflictError(msg)
            if before is not None:
                before()
            holding, step = self._step(holding, part, device)
            self._add_claim(holding, part, owner)
            if step is _Step.NOTHING:
                holding.pointed.append(part)  # the hot path: one hold of the lock
            else:
                self._begin(holding, State.LOADING)
        if step is _Step.NOTHING:
            try:
                part.point_at(device)
            except BaseException:
                try:
                    part.restore()
                finally:
                    self._drop_failed_claim(holding, part)
                raise
        return Claim(holding, part), step

    def _step(self, holding: Holding | None, part: Part, device: torch.device) -> tuple[Holding, _Step]:
        """What a claim on ``part`` needs, given the holding of its weights (none: made here, to load)."""
        if holding is None:
            made = Holding(device=device, key=part.key, order=next(self._order), part=part)
            return self._add_holding(made), _Step.LOAD
        if holding.prefetched:
            holding.prefetched = False
            return holding, _Step.ADOPT
        if holding.forced_off or not holding.part.same_weights(part):
            return holding, _Step.SWAP
        return holding, _Step.NOTHING

    def _finish_claim(self, claim: Claim, step: _Step) -> MoveEvent | None:
        """Run the move a recorded claim needs (outside the lock), its event to deliver; on failure drop the claim."""
        holding, part, device = claim.holding, claim.part, claim.holding.device
        event, load, done = None, step is not _Step.ADOPT or not holding.part.same_weights(part), False
        try:  # the state is settled in `finally`: an interrupt anywhere never leaves the weights LOADING
            part.point_at(device)
            try:
                if step is _Step.ADOPT:
                    holding.part.join()  # the current stream waits for the prefetch's copies
                if load:
                    event = self._move(part, device, functools.partial(part.load, device))
                done = True
            finally:
                if not done:
                    part.restore()
        finally:
            if done:
                with self._state:
                    if load:
                        holding.part, holding.forced_off = part, False
                    holding.pointed.append(part)
                    self._settle_locked(holding, moved=load)
            else:
                self._drop_failed_claim(holding, part, new=step is _Step.LOAD)
        return event

    def _drop_failed_claim(self, holding: Holding, part: Part, *, new: bool = False) -> None:
        """Take back the claim on ``part`` that could not be completed (its pointers are undone already)."""
        with self._state:
            self._remove_claim(holding, part)
            self._unpoint(holding, part)
            if new:  # nothing was loaded (a failed load leaves the weights on the CPU): the holding goes
                self._drop_holding(holding)
                return
            if holding.claims or holding.state is State.RESIDENT:
                self._settle_locked(holding, moved=holding.state is not State.RESIDENT)
                return
            holding.state = State.OFFLOADING  # an adopted prefetch whose adoption failed: nobody holds it
        self._end_holding(holding, join=False)

    # ------------------------------------------------------------------ release

    def _release_all(self, claims: Iterable[Claim]) -> bool:
        """Release every claim; raise the first error once all ran; whether anything moved."""
        first: BaseException | None = None
        moved = False
        for claim in claims:
            try:
                moved = self._release_one(claim) or moved
            except BaseException as exc:  # noqa: BLE001  (every release runs; the first error is raised)
                first, moved = _first_error(first, exc, claim.part), True
        if first is not None:
            raise first
        return moved

    def _release_one(self, claim: Claim) -> bool:
        """Drop one claim (its pointers undone unless it was the first pointed); whether that moved weights."""
        holding, part = claim.holding, claim.part
        successor: Part | None = None
        last = unpoint = False
        try:
            with self._state:
                self._wait_while_moved_elsewhere(holding)
                self._remove_claim(holding, part)  # ValueError if released already
                if not holding.claims:
                    last = True  # first: an interrupt before the state changes still ends the holding below
                    self._begin(holding, State.OFFLOADING)
                else:
                    unpoint = self._unpoint(holding, part)
                    if holding.part is part:
                        successor = holding.claims[-1]  # the latest claim still live decides the patches
                        holding.part = successor
                        if holding.forced_off or part.same_weights(successor):
                            successor = None
                        else:
                            self._begin(holding, State.LOADING)
        finally:
            if last:
                self._end_holding(holding, join=False)
        if last:
            return True
        try:
            if unpoint:
                part.restore()
        finally:
            if successor is not None:
                self._swap_back(holding, successor)
        return successor is not None

    def _swap_back(self, holding: Holding, successor: Part) -> None:
        event = None
        try:
            event = self._move(successor, holding.device, functools.partial(successor.load, holding.device))
        finally:
            self._settle(holding, moved=True)
        self.lock.deliver(event)

    def _end_holding(self, holding: Holding, *, join: bool) -> None:
        """Offload a holding that is OFFLOADING with no claim (this thread moving it), undo every pointer, drop it."""
        event = None
        try:
            if join:
                holding.part.join()  # a prefetch's copies land before their memory goes back
            event = self._move(holding.part, CPU, holding.part.offload)
        finally:
            try:
                for pointed in reversed(holding.pointed):
                    pointed.restore()
            finally:
                with self._state:
                    holding.pointed.clear()
                    holding.prefetched, holding.mover = False, None
                    self._drop_holding(holding)
        self.lock.deliver(event)

    # ------------------------------------------------------------------ prefetch

    def _prefetch_one(self, part: Part, device: torch.device) -> Holding | None:
        with self._state:
            while True:
                holding = self._held.get(id(part.key))
                if holding is None or holding.state is State.RESIDENT:
                    break
                self._wait_for_move(holding, part)
            if holding is not None:
                if holding.device != device:
                    msg = (
                        f"prefetch of {part!r} on {device}: its weights are held on {holding.device}; "
                        f"prefetch with device={str(holding.device)!r} or exit the scope that holds them first"
                    )
                    raise ResidencyConflictError(msg)
                return None  # held already: nothing to start
            holding = Holding(device=device, key=part.key, order=next(self._order), part=part, prefetched=True)
            self._add_holding(holding)
            self._begin(holding, State.LOADING)
        event, done = None, False
        try:
            part.point_at(device)
            try:
                event = self._move(part, device, functools.partial(part.prefetch, device), wait=False)
                done = True
            finally:
                if not done:
                    part.restore()
        finally:
            with self._state:
                if done:
                    holding.pointed.append(part)
                    self._settle_locked(holding, moved=True)
                else:  # a failed prefetch leaves the weights on the CPU: the holding goes
                    holding.prefetched, holding.mover = False, None
                    self._drop_holding(holding)
        self.lock.deliver(event)
        return holding

    # ------------------------------------------------------------------ states (call with the lock held)

    def _add_holding(self, holding: Holding) -> Holding:
        self._held[id(holding.key)] = holding
        self._devices[holding.device] = self._devices.get(holding.device, 0) + 1
        return holding

    def _drop_holding(self, holding: Holding) -> None:
        if self._held.get(id(holding.key)) is not holding:
            return
        del self._held[id(holding.key)]
        left = self._devices[holding.device] - 1
        if left:
            self._devices[holding.device] = left
        else:
            del self._devices[holding.device]
        self._notify()

    def _notify(self) -> None:
        if self._sleepers:
            self._changed.notify_all()

    def _wait(self, timeout: float | None = None) -> None:
        """Wait (the lock released meanwhile) until a claim goes or a move ends, or ``timeout`` passes."""
        self._sleepers += 1
        try:
            self._changed.wait(timeout)
        finally:
            self._sleepers -= 1

    def _begin(self, holding: Holding, state: State) -> None:
        holding.state, holding.mover = state, threading.get_ident()

    def _settle_locked(self, holding: Holding, *, moved: bool) -> None:
        holding.state, holding.mover = State.RESIDENT, None
        holding.moves += moved
        self._notify()

    def _settle(self, holding: Holding, *, moved: bool) -> None:
        with self._state:
            self._settle_locked(holding, moved=moved)

    def _wait_for_move(self, holding: Holding, part: Part) -> None:
        """Wait until the move of ``holding`` ends (the caller decides again); raise if this thread runs it."""
        if holding.mover == threading.get_ident():
            msg = (
                f"{part!r} was asked for while this thread is moving the same weights ({holding.state.value}); "
                "a part's load or offload must not enter a scope on its own weights"
            )
            raise ResidencyConflictError(msg)
        self._wait()

    def _wait_while_moved_elsewhere(self, holding: Holding) -> None:
        """Wait while another thread moves ``holding``'s weights (a load back, a forced offload, a swap)."""
        while holding.state is not State.RESIDENT and self._held.get(id(holding.key)) is holding:
            if holding.mover == threading.get_ident():
                return
            self._wait()

    def _wait_until_settled(self, holding: Holding) -> None:
        while self._held.get(id(holding.key)) is holding and holding.state is not State.RESIDENT:
            self._wait_for_move(holding, holding.part)

    @staticmethod
    def _add_claim(holding: Holding, part: Part, owner: Owner) -> None:
        holding.claims.append(part)
        holding.owners.append(owner)
        holding.threads[owner.thread] = holding.threads.get(owner.thread, 0) + 1

    def _remove_claim(self, holding: Holding, part: Part) -> None:
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
        self._notify()

    @staticmethod
    def _unpoint(holding: Holding, part: Part) -> bool:
        """Forget ``part`` among the pointed parts unless it is the first; whether its pointers are to be undone."""
        pointed = holding.pointed
        if not pointed or pointed[0] is part:
            return False  # the first part pointed saved the true originals: undone when the weights leave
        for index in range(len(pointed) - 1, 0, -1):
            if pointed[index] is part:
                del pointed[index]
                return True
        return False

    # ------------------------------------------------------------------ waiting for other patches

    def _wait_for_other_patches(self, owner: Owner, parts: Sequence[Part], device: torch.device) -> None:
        """Return once no owner beside ``owner`` holds other patches of ``parts``' weights; raise if never."""
        wait = _Wait(owner, parts, device)
        conflicts = self._conflicts(wait)
        if not conflicts:
            return
        first = conflicts[0]
        log.info("ondevice: %s waits for %s to release %r", wait.owner.name, first.owner.name, first.held)
        self._waiting[wait.owner.thread] = wait
        try:
            started = time.monotonic()
            warnings = 0
            while conflicts:
                self._raise_if_endless(wait, conflicts)  # again after every release: the last to close a cycle sees it
                warn_at = started + (warnings + 1) * self.wait_warning_s
                self._wait(max(0.0, warn_at - time.monotonic()))
                if time.monotonic() >= warn_at:
                    warnings += 1
                    self._warn_long_wait(wait, conflicts[0], time.monotonic() - started)
                conflicts = self._conflicts(wait)
        finally:
            del self._waiting[wait.owner.thread]

    @staticmethod
    def _warn_long_wait(wait: _Wait, conflict: _Conflict, seconds: float) -> None:
        log.warning(
            "ondevice: %s has waited %.1f s for %s to exit its scope on %r (the same weights with other patches "
            "than %r); if that thread waits for this one, exit one scope before entering the other",
            wait.owner.name,
            seconds,
            conflict.owner.name,
            conflict.held,
            conflict.part,
        )

    def _conflicts(self, wait: _Wait) -> list[_Conflict]:
        """Live claims, by owners that run beside ``wait.owner``, of other patches of the weights it asks for."""
        found = []
        for part in wait.parts:
            holding = self._held.get(id(part.key))
            if holding is None or holding.device != wait.device:
                continue  # a claim on another device is refused in _claim
            threads = holding.threads
            if not threads or (len(threads) == 1 and wait.owner.task is None and wait.owner.thread in threads):
                continue  # no claim, or only claims of the asker's thread, whose code outside tasks encloses them all
            for held, owner in zip(holding.claims, holding.owners, strict=True):
                if owner.runs_beside(wait.owner) and not held.same_weights(part):
                    found.append(_Conflict(part, held, owner))
        return found

    def _raise_if_endless(self, wait: _Wait, conflicts: Sequence[_Conflict]) -> None:
        """Raise where the wait could never end: a holder runs on this thread, or waits (through others) for it."""
        for conflict in conflicts:
            pending, seen = [conflict.owner.thread], set()
            while pending:
                thread = pending.pop()
                if thread == wait.owner.thread:
                    raise ResidencyConflictError(self._endless_message(wait, conflict))
                if thread not in seen:
                    seen.add(thread)
                    other = self._waiting.get(thread)
                    if other is not None:
                        pending.extend(c.owner.thread for c in self._conflicts(other))

    @staticmethod
    def _endless_message(wait: _Wait, conflict: _Conflict) -> str:
        if conflict.owner.thread == wait.owner.thread:
            why = "it runs on this thread's event loop, which waiting would block"
        else:
            why = f"{conflict.owner.name} is waiting, directly or through other threads, for what this thread holds"
        return (
            f"{wait.owner.name} asked for {conflict.part!r} on {wait.device} while {conflict.owner.name} holds "
            f"{conflict.held!r}, the same weights with other patches, in a live scope; waiting for it would never "
            f"end ({why}); exit one of the two scopes before entering the other, use clones with the same "
            "patches, or load the model a second time for the other patches"
        )

    # ------------------------------------------------------------------ moves, restore, verify

    def _move(
        self, part: Part, target: torch.device, move: Callable[[], None], *, wait: bool = True
    ) -> MoveEvent | None:
        """Run one move; while anyone listens, time it and return its :class:`MoveEvent` (a failed move has none).

        ``wait=False`` (a prefetch) times only the issuing: the copies it started are not waited for.
        """
        if not events.listening():
            move()
            return None
        before = placement(part.tensors())
        started = time.perf_counter()
        move()
        if wait:
            for device in {target, *before}:
                devices.synchronize(device)  # the copies are done, not only queued, when the clock stops
        return _event(part, target, before, time.perf_counter() - started)

    def _restore(self, device: torch.device | None = None) -> None:
        """Load back, one by one, every resident holding (on ``device``) whose weights are no longer wholly there."""
        with self._state:
            seen = [
                (h, h.part, h.moves)
                for h in self._held.values()
                if h.state is State.RESIDENT and not h.forced_off and (device is None or h.device == device)
            ]
        for holding, part, moves in sorted(seen, key=lambda s: s[0].order):
            if part.is_on(holding.device):  # outside the lock: a tensor walk; acted on only if nothing moved since
                continue
            with self._state:
                current = self._held.get(id(holding.key)) is holding and holding.state is State.RESIDENT
                if not current or holding.part is not part or holding.moves != moves or holding.forced_off:
                    continue
                self._begin(holding, State.LOADING)
            log.info("ondevice: %r was evicted from %s; loading it back", part, holding.device)
            event = None
            try:
                event = self._move(part, holding.device, functools.partial(part.load, holding.device))
            finally:
                self._settle(holding, moved=True)
            self.lock.deliver(event)

    def _restore_quietly(self, device: torch.device | None = None) -> None:
        try:
            self._restore(device)
        except Exception:  # an outer scope's component could not be restored; its owner finds out
            log.exception("ondevice: could not restore an evicted component")

    @staticmethod
    def _verify(holdings: Sequence[Holding], device: torch.device) -> None:
        missing = [h.part for h in holdings if not h.forced_off and not h.part.is_on(h.device)]
        if missing:
            msg = (
                f"{', '.join(map(repr, missing))} could not be kept wholly on {device} beside what live scopes "
                "hold there; free device memory or scope fewer components at once"
            )
            raise OnDeviceError(msg)


table = ResidencyTable()
