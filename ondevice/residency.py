"""The process-wide residency table: which weights live scopes hold on which device, and what fits there.

Scopes decide *when*; this table decides *what may stay where*; strategies'
parts decide *how* one kind of component moves.

Weights are counted by identity of the part's ``key`` (ComfyUI clones share
one ``nn.Module``, so they share one count).  The first claim loads, later
ones only count; the last release offloads, unless the weights are *kept*.
A later claim through a part whose weights differ (a ComfyUI clone with
other patches, say a LoRA) makes that part the holding's current ``part``
until it is released, and the latest claim still live is loaded back then.
Every claim points its part at the device (``point_at``); a claim's pointers
are undone at its release, but those of the first part pointed, which saved
the true originals, are undone only when the weights leave the device.  The
table only handles :class:`~ondevice.strategies.Part` objects (others are
adapted by :func:`~ondevice.strategies.as_part` on the way in) and calls
their methods directly.

An acquire is atomic: under one hold of the lock it records a claim on every
part of the scope (after any wait), then runs the loads outside the lock, in
order.  It never holds some parts while it waits for others, so two scopes
asking for ``(a, b)`` and ``(b, a)`` cannot deadlock.  If a load fails,
everything the acquire moved goes back and it raises, holding nothing.

States: each :class:`Holding` is ``LOADING``, ``RESIDENT`` or ``OFFLOADING``
(:class:`State`); weights with no holding are offloaded.  A claim on weights
that are ``LOADING`` waits for that load and never loads them twice (if the
load fails, the waiter decides again: it loads them itself, or raises); a
claim on weights that are ``OFFLOADING`` waits until they are on the CPU, then
loads them again.  A swap of patches, a load back after an eviction and a
forced offload mark the holding the same way while they run.

The hot path: a claim on ``RESIDENT`` weights with the same patches, and its
release, cost a few dictionary operations, whatever else is held: **a claim on
resident weights trusts the table**, looks at no tensor and asks nothing of the
device.  Weights evicted behind ondevice's back (a custom node calling
ComfyUI's ``model_unload``) are found and loaded back only by an acquire or a
release that moves something, by :meth:`ResidencyTable.restore` and by
:meth:`ondevice.ScopeHandle.ensure`.  An acquire verifies what it loaded in
full: one that cannot get such a part wholly onto the device raises and holds
nothing.

Memory (on devices whose free and total memory :func:`ondevice.devices.memory_info`
reports; the CPU has no policy): an acquire adds up ``part.nbytes()`` of the
parts not on the device yet (with ``budget=``, at most what is left of the
budget; a part over it is loaded with ``part.load_partial(device, left)``), and
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
  (only the head of the queue evicts, and a later acquire goes first only where
  it fits beside what every acquire ahead of it needs), re-checking after every
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
``torch.OutOfMemoryError`` as its ``__cause__``.

Keeping: an acquire with ``keep=True`` marks its weights kept: at their last
release they stay on the device, unclaimed, until an acquire needs their memory
(eviction), :meth:`~ResidencyTable.end_keep` or a forced offload.  A later claim
on them is the hot path.  Several devices: weights kept or prefetched (unclaimed)
on one device and asked for on another are moved there (offloaded first); weights
a live scope claims on another device raise
:class:`~ondevice.errors.ResidencyConflictError`.  Memory is accounted per device.

Prefetch: :meth:`ResidencyTable.prefetch` points a part at the device and
calls its ``prefetch`` (copies started on a side stream, the current stream
not waiting), then records a holding with no claim, ``prefetched``, if it fits
beside what is held and what waiting acquires need (else it starts nothing:
a prefetch never evicts or waits).  The next claim *adopts* it: no load; the
part's ``join`` (the current stream waits for the copies) runs once, before
the claim returns, and from then on it is an ordinary holding, offloaded when
its last claim is released.  A prefetched (or kept) holding counts in
:meth:`~ResidencyTable.held` (ComfyUI's memory management keeps it).

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
thread's event loop and the acquire waits on that loop's thread (waiting
would block the loop that has to finish it; ``async with`` waits on a worker
thread instead).  Clones with the same patches share the weights and never
wait.  A thread (or task) that has ended runs beside nobody: a generator it
left suspended inside a scope continues that scope, as a nested one, wherever
it is resumed.  Generators interleaved on one thread (``zip(gen(base),
gen(lora))``) count as nested scopes of that thread: their patches swap as
each steps, so do not interleave generators that run forwards on other
patches of the same weights.  Waiting for other patches is not fair (scopes
with the current patches that keep overlapping can keep a waiter waiting),
and a wait on something ondevice cannot see (the holder joins the waiting
thread) never ends: a waiter logs a warning every
:attr:`ResidencyTable.wait_warning_s` seconds naming what it waits for.

Thread semantics: a short re-entrant lock (:attr:`ResidencyTable.lock`)
guards the table's state only; no part method that moves weights (``load``,
``load_partial``, ``prefetch``, ``join``, ``offload``, ``point_at``,
``restore``) runs under it, and ``nbytes`` runs outside it too where it can.
Moves of different weights (other keys, other devices) run at the same time
on their threads; moves of the same weights never do (the states above).  A
thread that holds :attr:`ResidencyTable.lock` itself (``with table.lock:``)
moves with it held, so other threads wait meanwhile.  Waiting (for a move,
for other patches to be released, for memory) releases the lock.  An acquire
may be made on a worker thread for an owner it names (``owner=``: the asyncio
task of ``async with``); its claims are that owner's.  Move events reach
listeners on the moving thread once the move's state is recorded, never
while that thread holds the lock (held by the caller, they are delivered as
its outermost hold ends), so listeners may enter scopes.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ondevice import devices, events
from ondevice.devices import CPU
from ondevice.errors import InvalidDeviceError, OnDeviceError, OutOfDeviceMemory, ResidencyConflictError
from ondevice.events import MoveEvent
from ondevice.strategies import Part, as_part
from ondevice.strategies.module import placement

__all__ = ["AbortedError", "Claim", "Holding", "Owner", "ResidencyTable", "State", "WouldBlock", "table"]

log = logging.getLogger("ondevice")

_TORCH_OOM = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError where torch has it (the same class)


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
    """On their way to the CPU (the last claim was released, a prefetch was cancelled, an eviction, or a forced
    offload)."""


@dataclass
class Holding:
    """Weights that live scopes hold (or a prefetch put, or a keep left) on ``device``; ``claims`` lists every part
    claimed, in order.

    ``state`` says whether a move of these weights runs (:class:`State`); ``prefetched`` marks a
    holding that :meth:`ResidencyTable.prefetch` made and no scope has claimed yet; ``kept`` one that
    stays on the device after its last claim goes.  ``nbytes`` is the device memory the table counts
    for it (where the device reports its memory; else 0), ``partial`` whether it was loaded with
    ``load_partial``, ``used`` when it was last used (a tick: its last claim went, or it was kept
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
    used: int = 0
    mover: int | None = field(default=None, repr=False)  # the thread whose move runs (state is not RESIDENT)
    moves: int = field(default=0, repr=False)  # counts moves: a restore acts only on what it saw
    threads: dict[int, int] = field(default_factory=dict, repr=False)  # live claims per owner's thread


class Claim(NamedTuple):
    """One scope's hold on one part; released exactly once."""

    holding: Holding
    part: Part


class WouldBlock(Exception):  # noqa: N818  (a signal between ondevice's modules, never raised to users)
    """``acquire(block=False)`` would have to wait, or move weights: nothing was claimed (``async with`` then
    makes the acquire on a worker thread)."""


class AbortedError(OnDeviceError):
    """A waiting acquire was given up from outside (``async with`` cancelled): it holds nothing."""


@dataclass(frozen=True)
class _Conflict:
    """``part`` needs other patches than ``held``, which ``owner`` claimed and which runs beside the asker."""

    part: Part
    held: Part
    owner: Owner


@dataclass(frozen=True)
class _Wait:
    """An acquire waiting for other patches to be released; ``blocking``: it waits on its owner's thread."""

    owner: Owner
    parts: Sequence[Part]
    device: torch.device
    blocking: bool = True


@dataclass(eq=False)
class _Ask:
    """One acquire while it is being decided: what it asks for, how, and where it stands in its device's queue."""

    owner: Owner
    parts: list[Part]
    device: torch.device
    wait: bool = False
    timeout: float | None = None
    budget: int | None = None
    partial: bool = False
    block: bool = True  # False: raise WouldBlock instead of waiting or moving anything
    blocking: bool = True  # whether waiting blocks the owner's thread (not for an async owner on a worker thread)
    abort: threading.Event | None = None
    sizes: dict[int, int] = field(default_factory=dict)  # id(part) -> part.nbytes(), worked out outside the lock
    needed: int = 0  # bytes it needs on the device (while queued: what later acquires leave it)
    reserved: int = 0  # bytes it evicted and has not turned into claims yet
    queued: bool = False
    since: float = 0.0
    deadline: float | None = None
    warnings: int = 0
    settling: list[tuple[Holding, int]] | None = None  # wait=False: moves in flight it lets end before deciding
    kept: set[int] = field(default_factory=set)  # id(key) of kept weights it took off another device: kept here
    reclaimed: bool = False  # the reclaimers were asked for room (once per acquire)

    @property
    def unbudgeted_partial(self) -> bool:
        return self.partial and self.budget is None


class _Step(enum.Enum):
    """What a claim does once it is recorded, outside the lock."""

    NOTHING = "nothing"  # the weights are resident with its patches: point the part at the device, done
    LOAD = "load"  # a new holding: point at the device and load
    SWAP = "swap"  # other patches (or forced off): point at the device and load this part's weights
    ADOPT = "adopt"  # a prefetched holding: point at the device, join its copies (and swap, if other patches)
    POINT = "point"  # the same weights as an earlier part of this acquire loads: point at the device once loaded


@dataclass(eq=False)
class _Planned:
    """One part of an acquire: its step, and the bytes it loads (``size``) and counts (``counted``, within a budget)."""

    part: Part
    step: _Step
    holding: Holding | None = None  # None until recorded, for a new holding (LOAD) or a later part on it (source)
    source: _Planned | None = None  # an earlier part of the same acquire on the same weights
    size: int = 0
    counted: int = 0
    partial: bool = False  # loaded with part.load_partial(device, budget)
    budget: int | None = None
    last: bool = True  # the last part of this acquire that moves these weights: it settles their state

    @property
    def moves(self) -> bool:
        return self.step not in (_Step.NOTHING, _Step.POINT)

    @property
    def claim(self) -> Claim:
        assert self.holding is not None  # noqa: S101  (recorded before it is run)
        return Claim(self.holding, self.part)


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


def _size(nbytes: int | None) -> str:
    """``nbytes`` for a message: ``"1.50 GiB (1610612736 bytes)"``."""
    if nbytes is None:
        return "an unknown amount"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"


def _holder(holding: Holding) -> str:
    """Who holds ``holding``: its claims' owners (each once), else ``"kept"`` or ``"prefetched"``."""
    names = list(dict.fromkeys(owner.name or repr(owner) for owner in holding.owners))
    if names:
        return ", ".join(names) + (" (kept)" if holding.kept else "")
    return "kept" if holding.kept else "prefetched"


def _only(holding: Holding, owner: Owner) -> bool:
    """Whether every claim on ``holding`` is of ``owner``'s thread, whose code outside tasks encloses them all."""
    threads = holding.threads
    return len(threads) == 1 and owner.task is None and owner.thread in threads


def _fit_within(plan: Sequence[_Planned], room: int, *, budget: bool) -> None:
    """Count the parts to load, in order: whole while they fit in ``room``; the first that does not, and every later
    one, partially with what is left (``load_partial(device, left)`` for a budget, ``load_partial(device, None)``
    for ``partial=True``)."""
    left = room
    for entry in plan:
        if not entry.size:
            continue
        if entry.size <= left:
            entry.counted, entry.partial, entry.budget = entry.size, False, None
            left -= entry.size
        else:
            entry.counted, entry.partial, entry.budget = left, True, left if budget else None
            left = 0


_FIXES = (
    "Fixes: pass wait=True (and timeout=) to wait until it fits, budget= (like '6GiB') or partial=True to put only "
    "part of a model on the device, free device memory (exit other scopes, drop device tensors), or end keeps with "
    "ondevice.release()"
)


class ResidencyTable:
    """What is held where; see the module docstring.

    ``memory_info(device) -> (free, total)`` bytes is how the table reads a device's memory (default:
    :func:`ondevice.devices.memory_info`, with torch's CUDA cache counted as free); a device it raises
    :class:`~ondevice.errors.InvalidDeviceError` for, and the CPU, get no memory policy.
    """

    wait_warning_s: float = 60.0
    """A waiting acquire logs a warning each time it has waited this long."""

    room_poll_s: float = 0.1
    """An acquire waiting for memory checks again at least this often (memory freed outside ondevice wakes nobody)."""

    def __init__(self, memory_info: Callable[[torch.device], tuple[int, int]] | None = None) -> None:
        self.lock = _TableLock()
        self._state = self.lock.rlock  # the table's own holds: not counted, so its event delivery is not deferred
        self._changed = threading.Condition(self._state)  # notified whenever a claim goes or a move ends
        self._held: dict[int, Holding] = {}  # id(key) -> its holding, in every state
        self._devices: dict[torch.device, int] = {}  # holdings per device
        self._sleepers = 0  # threads waiting on _changed: a release with none to wake notifies nobody
        self._waiting: dict[Owner, _Wait] = {}  # owner -> what it waits to acquire (other patches released)
        self._rooms: dict[torch.device, list[_Ask]] = {}  # per device: acquires waiting for memory, first come first
        self._pending: dict[torch.device, int] = {}  # per device: bytes claimed or evicted for, not yet loaded
        self._memory_info = memory_info
        self._reclaimers: list[Callable[[torch.device, int], object]] = []
        self._order = itertools.count()
        self._ticks = itertools.count(1)

    def add_reclaimer(self, reclaim: Callable[[torch.device, int], object]) -> None:
        """Have ``reclaim(device, nbytes)`` free memory that others cache on ``device`` (ComfyUI's loaded models no
        scope holds) until ``nbytes`` are free there, before an acquire that does not fit evicts kept weights.

        Called outside the lock, at most once per acquire; it must never free what :meth:`held` lists.
        """
        if reclaim not in self._reclaimers:
            self._reclaimers.append(reclaim)

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
    ) -> list[Claim]:
        """Hold every part on ``device``, loading those not yet there; all or nothing, atomically.

        Waits while another thread moves the same weights, or holds them with other
        patches, and (``wait=True``) for memory; raises :class:`ResidencyConflictError`
        where a wait for patches could never end or the weights are claimed on another
        device, and :class:`~ondevice.errors.OutOfDeviceMemory` where they do not fit
        (see the module docstring).  ``before`` runs under the lock, once, right before
        the claims are recorded (after any wait), so what it reads is consistent with
        them.  ``owner`` (default: the caller's thread and asyncio task) owns the claims;
        ``keep`` marks the weights kept once they are loaded; ``block=False`` raises
        :class:`WouldBlock`, holding nothing, instead of waiting or moving anything;
        setting ``abort`` (then :meth:`wake`) makes a waiting acquire raise :class:`AbortedError`.
        """
        owner = owner or Owner.current()
        parts = [as_part(part) for part in parts]
        claims = self._claim_resident(parts, device, owner, before)
        if claims is not None:
            if keep:
                self._mark_kept(claims)
            return claims
        ask = _Ask(owner, parts, device, wait, timeout, budget, partial, block)
        ask.blocking, ask.abort = threading.get_ident() == owner.thread, abort
        if timeout is not None and math.isfinite(timeout):
            ask.deadline = time.monotonic() + timeout
        plan = self._reserve(ask, before)
        claims = self._carry_out(plan, ask)
        if keep:
            self._mark_kept(claims)
        return claims

    def _mark_kept(self, claims: Sequence[Claim]) -> None:
        with self._state:
            for claim in claims:
                claim.holding.kept, claim.holding.used = True, next(self._ticks)

    def release(self, claims: Sequence[Claim]) -> None:
        """Drop each claim; offload weights no claim holds any more and nobody keeps (every one, even if one fails)."""
        moved = True
        try:
            moved = self._release_all(reversed(claims))
        finally:
            if moved:  # a slow path: mend what was evicted on the devices these claims were on
                for device in {claim.holding.device for claim in claims}:
                    self._restore_quietly(device)

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
                first = _first_error(first, exc, part)
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
        """The live holdings (claimed, kept or prefetched), outermost first; not those on their way off the device."""
        with self._state:
            live = [h for h in self._held.values() if h.claims or h.prefetched or h.kept]
        return sorted(live, key=lambda h: h.order)

    def holds_on(self, device: torch.device) -> bool:
        """Whether any weights are held, or on their way, on ``device`` (cheap: a dictionary lookup)."""
        with self._state:
            return device in self._devices

    def waiting(self) -> list[Owner]:
        """The owners whose acquire now waits for another thread's claims to be released, or for memory."""
        with self._state:
            rooms = [ask.owner for queue in self._rooms.values() for ask in queue]
            return [*(wait.owner for wait in self._waiting.values()), *rooms]

    def wake(self) -> None:
        """Wake every waiting acquire to check again (after setting its ``abort``)."""
        with self._state:
            self._changed.notify_all()

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting, and a new claim loads it again.

        A prefetched or kept holding no scope claims is taken off (the prefetch cancelled, the keep ended).
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
            elif holding.claims:
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

    # ------------------------------------------------------------------ claims: the hot path

    def _claim_resident(
        self, parts: list[Part], device: torch.device, owner: Owner, before: Callable[[], None] | None
    ) -> list[Claim] | None:
        """Claim parts whose weights are all resident on ``device`` with their patches, in one hold of the lock and
        without looking at a tensor or the device; None (nothing claimed) where any part needs more."""
        with self._state:
            holdings = []
            for part in parts:
                holding = self._held.get(id(part.key))
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
            shared = any(h.threads and not _only(h, owner) for h in holdings)
            if shared and self._conflicts(_Wait(owner, parts, device)):
                return None  # other patches that another owner holds: the slow path waits
            if before is not None:
                before()
            for holding, part in zip(holdings, parts, strict=True):
                holding.pointed.append(part)
                self._add_claim(holding, part, owner)
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
                        self._cancel([_Planned(p, _Step.NOTHING, h) for h, p in claims[index + 1 :]], device)
                    finally:
                        self._release_all(reversed(claims[:index]))
                raise
        return claims

    # ------------------------------------------------------------------ claims: decided under the lock, all at once

    def _reserve(self, ask: _Ask, before: Callable[[], None] | None) -> list[_Planned]:
        """Record a claim on every part of ``ask`` in one hold of the lock, after waiting, evicting and moving
        weights off other devices as needed; the plan to carry out (outside the lock)."""
        try:
            while True:
                self._measure(ask)  # outside the lock: nbytes() walks the tensors of what is to be loaded
                with self._state:
                    plan, off = self._decide(ask)
                    if plan is not None:
                        if before is not None:
                            before()
                        self._record(ask, plan)
                        return plan
                if isinstance(off, int):
                    self._reclaim(ask.device, off)
                else:
                    self._take_off(off)
        finally:
            if ask.queued or ask.reserved:
                with self._state:
                    self._leave_queue(ask)

    def _measure(self, ask: _Ask) -> None:
        """``nbytes()`` of the parts that look not yet loaded on the device (read without the lock: a hint)."""
        todo = [part for part in ask.parts if id(part) not in ask.sizes and self._may_load(part, ask.device)]
        if todo and (ask.budget is not None or self._memory(ask.device) is not None):
            for part in todo:
                ask.sizes[id(part)] = part.nbytes()

    def _may_load(self, part: Part, device: torch.device) -> bool:
        """Whether ``part`` looks on the CPU, to be loaded (weights held on another device are measured once off it)."""
        holding = self._held.get(id(part.key))
        return holding is None or (holding.forced_off and holding.device == device)

    def _decide(self, ask: _Ask) -> tuple[list[_Planned] | None, list[Holding] | int]:
        """The plan of ``ask`` once nothing stands in its way (waiting meanwhile); or holdings to take off first, or
        the bytes to have free on the device that the reclaimers are asked for first."""
        while True:
            self._wait_for_other_patches(ask)
            moving = self._in_motion(ask)
            if moving is not None:
                if not ask.block:
                    raise WouldBlock
                self._check_abort(ask)
                self._wait_for_move(*moving)
                continue
            away = self._held_elsewhere(ask)
            if away:
                if not ask.block:
                    raise WouldBlock
                for holding in away:
                    self._begin(holding, State.OFFLOADING)
                    if holding.kept:
                        ask.kept.add(id(holding.key))  # the keep moves with the weights
                return None, away
            plan = self._draft(ask)
            if not ask.block and any(entry.moves for entry in plan):
                raise WouldBlock
            room = self._room(ask, plan)
            if room is True:
                return plan, []
            if room is not False:
                return None, room
            # it waited: everything is decided again

    def _in_motion(self, ask: _Ask) -> tuple[Holding, Part] | None:
        for part in ask.parts:
            holding = self._held.get(id(part.key))
            if holding is not None and holding.state is not State.RESIDENT:
                return holding, part
        return None

    def _held_elsewhere(self, ask: _Ask) -> list[Holding]:
        """Unclaimed holdings of ``ask``'s weights on other devices (to move); raise for claimed ones."""
        away: dict[int, Holding] = {}
        for part in ask.parts:
            holding = self._held.get(id(part.key))
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

    def _draft(self, ask: _Ask) -> list[_Planned]:
        """What each part needs (nothing is changed yet), with the bytes to load and to count within the budget."""
        plan: list[_Planned] = []
        latest: dict[int, _Planned] = {}  # id(key) -> the latest part of this acquire that moves those weights
        for part in ask.parts:
            earlier = latest.get(id(part.key))
            if earlier is not None:  # the same weights twice in one scope: as if claimed one after the other
                entry = _Planned(part, _Step.POINT if earlier.part.same_weights(part) else _Step.SWAP, source=earlier)
                if entry.step is _Step.SWAP:
                    earlier.last, latest[id(part.key)] = False, entry
                plan.append(entry)
                continue
            entry = self._step(part, self._held.get(id(part.key)))
            if entry.moves:
                latest[id(part.key)] = entry
            plan.append(entry)
        loads = [
            e for e in plan if e.step is _Step.LOAD or (e.step is _Step.SWAP and e.holding and e.holding.forced_off)
        ]
        if not loads:
            return plan  # the hot path: nothing to load, nothing to count
        measured = ask.budget is not None or self._memory(ask.device) is not None
        for entry in loads:
            size = ask.sizes.get(id(entry.part))
            if size is None and measured:  # it looked loaded when measured: rare, so measured here
                size = ask.sizes[id(entry.part)] = entry.part.nbytes()
            entry.size = entry.counted = size or 0
        if ask.budget is not None:
            _fit_within(plan, ask.budget, budget=True)
        return plan

    @staticmethod
    def _step(part: Part, holding: Holding | None) -> _Planned:
        """What a claim on ``part`` needs, given the holding of its weights on the device (none: a new one, to load)."""
        if holding is None:
            return _Planned(part, _Step.LOAD)
        if holding.prefetched:
            return _Planned(part, _Step.ADOPT, holding)
        if holding.forced_off or not holding.part.same_weights(part):
            return _Planned(part, _Step.SWAP, holding)
        return _Planned(part, _Step.NOTHING, holding)

    def _record(self, ask: _Ask, plan: list[_Planned]) -> None:
        """Record every claim of the plan (and mark what it moves), and count its loads as taken on the device."""
        device = ask.device
        for entry in plan:
            if entry.step is _Step.LOAD:
                made = Holding(device=device, key=entry.part.key, order=next(self._order), part=entry.part)
                made.nbytes, made.partial, made.used = entry.counted, entry.partial, next(self._ticks)
                made.kept = id(made.key) in ask.kept
                entry.holding = self._add_holding(made)
                self._begin(made, State.LOADING)
            elif entry.source is not None:
                entry.holding = entry.source.holding
            holding = entry.holding
            assert holding is not None  # noqa: S101  (every step but LOAD has its holding)
            if entry.step is _Step.ADOPT:
                holding.prefetched = False
                self._begin(holding, State.LOADING)
            elif entry.step is _Step.SWAP and holding.state is State.RESIDENT:
                self._begin(holding, State.LOADING)
                if entry.size:  # forced off: loaded again
                    holding.nbytes, holding.partial = entry.counted, entry.partial
            elif entry.step is _Step.NOTHING:
                holding.pointed.append(entry.part)  # the hot path: one hold of the lock
            self._add_claim(holding, entry.part, ask.owner)
        counted = sum(entry.counted for entry in plan)
        self._pend(device, counted - ask.reserved)  # what it evicted for becomes what it loads
        ask.reserved = 0
        self._leave_queue(ask)

    # ------------------------------------------------------------------ claims: carried out outside the lock

    def _carry_out(self, plan: list[_Planned], ask: _Ask) -> list[Claim]:
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
                self.lock.deliver(event)  # a listener may interrupt: the claim is in done, released below
            index = len(plan)
            if loaded:  # a slow path: mend what was evicted meanwhile, then check what this acquire loaded
                self._restore(ask.device)
                self._verify(loaded, ask.device)
        except BaseException as exc:
            try:
                self._cancel(plan[index + 1 :], ask.device)
                self._release_all(reversed(done))
            finally:
                self._restore_quietly(ask.device)  # a failed load may have evicted what outer scopes hold
            if failed is not None and isinstance(exc, _TORCH_OOM) and not isinstance(exc, OutOfDeviceMemory):
                raise self._load_ran_out(failed, ask, exc) from exc
            raise
        return done

    def _run(self, entry: _Planned) -> MoveEvent | None:
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
        if entry.step is _Step.POINT:
            with self._state:
                holding.pointed.append(part)
        return None

    def _finish_claim(self, entry: _Planned) -> MoveEvent | None:
        """Run the move a recorded claim needs (outside the lock), its event to deliver; on failure drop the claim."""
        (holding, part), step, device = entry.claim, entry.step, entry.claim.holding.device
        event, load, done = None, step is not _Step.ADOPT or not holding.part.same_weights(part), False
        if entry.partial:
            move = functools.partial(part.load_partial, device, entry.budget)
        else:
            move = functools.partial(part.load, device)
        try:  # the state is settled in `finally`: an interrupt anywhere never leaves the weights LOADING
            part.point_at(device)
            try:
                if step is _Step.ADOPT:
                    holding.part.join()  # the current stream waits for the prefetch's copies
                if load:
                    event = self._move(part, device, move)
                done = True
            finally:
                if not done:
                    part.restore()
        finally:
            if done:
                with self._state:
                    self._pend(device, -entry.counted)
                    if load:
                        holding.part, holding.forced_off = part, False
                    holding.pointed.append(part)
                    if entry.last:
                        self._settle_locked(holding, moved=True)
            else:
                with self._state:
                    self._pend(device, -entry.counted)
                self._drop_failed_claim(holding, part, new=step is _Step.LOAD)
        return event

    def _cancel(self, entries: Sequence[_Planned], device: torch.device) -> None:
        """Take back recorded claims that were never carried out (a part before them failed)."""
        if not entries:
            return
        with self._state:
            touched: dict[int, tuple[Holding, bool]] = {}
            for entry in reversed(entries):
                holding, part = entry.claim
                self._remove_claim(holding, part)
                self._unpoint(holding, part)  # a hot-path claim's pointer was recorded, never set
                if entry.moves:
                    self._pend(device, -entry.counted)
                if entry.step is _Step.ADOPT:
                    holding.prefetched = True
                never_loaded = entry.step is _Step.LOAD or touched.get(id(holding), (holding, False))[1]
                touched[id(holding)] = (holding, never_loaded)
            for holding, never_loaded in touched.values():
                mine = holding.mover == threading.get_ident() and holding.state is not State.RESIDENT
                if self._held.get(id(holding.key)) is not holding or not mine:
                    continue
                if never_loaded:
                    self._drop_holding(holding)
                else:
                    self._settle_locked(holding, moved=True)

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
            holding.state = State.OFFLOADING  # an adopted prefetch (or a kept holding) whose move failed: unheld
        self._end_holding(holding, join=False)

    # ------------------------------------------------------------------ memory (call with the lock held)

    def _room(self, ask: _Ask, plan: list[_Planned]) -> bool | list[Holding] | int:
        """True where ``plan`` fits on the device; else the bytes to have free there that the reclaimers are asked
        for (once), or holdings to evict (marked OFFLOADING), or False once it waited.

        Raises :class:`OutOfDeviceMemory` where it does not fit and may not (or could never) wait.
        """
        needed = sum(entry.counted for entry in plan)
        memory = self._memory(ask.device) if needed else None
        if memory is None:
            return True
        free, total = memory
        if needed > total and not ask.unbudgeted_partial:
            why = "more than the device's whole memory"
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        available = free - self._pending.get(ask.device, 0) + ask.reserved
        ahead = self._ahead(ask)
        beside = available - sum(other.needed for other in ahead)
        if needed <= beside:
            return True
        if not ahead:  # the head of the queue (or no queue): it may reclaim, then evict
            made = self._make_room(ask, plan, needed - available, free)
            if made is not None:
                return made
        if ask.unbudgeted_partial:  # as much as fits now, the rest left to each part's partial load
            _fit_within(plan, max(beside, 0), budget=False)
            return True
        ask.needed = needed
        if not ask.wait:
            if self._settling(ask):  # moves in flight there end first: decide on what they leave
                self._check_abort(ask)
                self._wait(self.room_poll_s)
                return False
            why = "it does not fit beside what is held there now, and wait=False"
            raise self._out_of_memory(ask, plan, needed, free, total, why=why)
        self._wait_for_room(ask, plan, needed, free, total)
        return False

    def _make_room(self, ask: _Ask, plan: list[_Planned], shortfall: int, free: int) -> int | list[Holding] | None:
        """For the head of the queue: the bytes to have free that the reclaimers are asked for (once), or the
        holdings to evict, or None where neither can make ``shortfall`` bytes of room."""
        if self._reclaimers and not ask.reclaimed:
            ask.reclaimed = True
            return free + shortfall
        return self._victims(ask, shortfall, plan) or None

    def _ahead(self, ask: _Ask) -> list[_Ask]:
        queue = self._rooms.get(ask.device, [])
        return queue[: queue.index(ask)] if ask.queued else list(queue)

    def _victims(self, ask: _Ask, shortfall: int, plan: list[_Planned]) -> list[Holding]:
        """Unclaimed holdings to evict, least recently used first, that make up ``shortfall`` (none where they cannot,
        unless ``ask`` is a partial one: then all of them); marked OFFLOADING, their bytes reserved for ``ask``."""
        asked = {id(entry.part.key) for entry in plan}
        candidates = sorted(
            (
                h
                for h in self._held.values()
                if h.device == ask.device and self._evictable(h) and id(h.key) not in asked
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
            self._begin(holding, State.OFFLOADING)
            log.info("ondevice: evicting %r from %s (%s) to make room", holding.part, holding.device, _holder(holding))
        ask.reserved += freed
        self._pend(ask.device, freed)
        return picked

    @staticmethod
    def _evictable(holding: Holding) -> bool:
        return holding.state is State.RESIDENT and not holding.claims and (holding.kept or holding.prefetched)

    def _settling(self, ask: _Ask) -> bool:
        """Whether moves that were in flight on the device when ``ask`` first did not fit are still in flight."""
        me = threading.get_ident()
        if ask.settling is None:
            ask.settling = [
                (h, h.moves)
                for h in self._held.values()
                if h.device == ask.device and h.state is not State.RESIDENT and h.mover != me
            ]
        ask.settling = [
            (h, moves)
            for h, moves in ask.settling
            if self._held.get(id(h.key)) is h and h.moves == moves and h.state is not State.RESIDENT
        ]
        return bool(ask.settling)

    def _wait_for_room(self, ask: _Ask, plan: list[_Planned], needed: int, free: int, total: int) -> None:
        """Queue ``ask`` (first come first served), then wait once; raise if the wait could never end or timed out."""
        if not ask.queued:
            self._rooms.setdefault(ask.device, []).append(ask)
            ask.queued, ask.since = True, time.monotonic()
            log.info("ondevice: %s waits for %s on %s", ask.owner.name, _size(needed), ask.device)
            self._notify()  # waiters check again: the last to close a wait cycle sees it
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
        self._check_abort(ask)
        warn_at = ask.since + (ask.warnings + 1) * self.wait_warning_s
        step = min(self.room_poll_s, max(0.0, warn_at - now))
        if ask.deadline is not None:
            step = min(step, ask.deadline - now)
        self._wait(step)
        self._check_abort(ask)
        if time.monotonic() >= warn_at:
            ask.warnings += 1
            log.warning(
                "ondevice: %s has waited %.1f s for %s on %s; held there: %s",
                ask.owner.name,
                time.monotonic() - ask.since,
                _size(needed),
                ask.device,
                self._held_text(ask.device),
            )

    def _room_endless(self, ask: _Ask) -> bool:
        """Whether the memory ``ask`` lacks could only come from claims of owners that cannot go on before it does.

        Owners that go on: those not waiting whose thread no other waiter blocks, then (repeatedly) waiters
        whose wait can end given those: all their other-patches holders go on, or the memory they need could
        come from free memory, evictions and claims of owners that go on.
        """
        waits: dict[Owner, _Wait | _Ask] = dict(self._waiting)
        for queue in self._rooms.values():
            for other in queue:
                waits[other.owner] = other
        owners = set(waits)
        for holding in self._held.values():
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
            for h in self._held.values()
            if h.claims
        )

    def _goes_on(
        self, owner: Owner, waits: dict[Owner, _Wait | _Ask], going: set[Owner], room: dict[torch.device, int]
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
        if isinstance(wait, _Wait):
            return all(conflict.owner in going for conflict in self._conflicts(wait))
        if wait.device not in room:
            memory = self._memory(wait.device)
            free = memory[0] if memory is not None else 0
            evictable = sum(h.nbytes for h in self._held.values() if h.device == wait.device and self._evictable(h))
            room[wait.device] = free - self._pending.get(wait.device, 0) + evictable
        releasable = sum(
            h.nbytes
            for h in self._held.values()
            if h.device == wait.device and h.claims and all(o in going and o != owner for o in h.owners)
        )
        return wait.needed <= room[wait.device] + wait.reserved + releasable

    def _out_of_memory(  # noqa: PLR0913  (the numbers the error states)
        self, ask: _Ask, plan: list[_Planned], needed: int, free: int, total: int | None, *, why: str
    ) -> OutOfDeviceMemory:
        loading = [entry.part for entry in plan if entry.counted] or ask.parts
        names = ", ".join(map(repr, loading))
        msg = (
            f"not enough memory on {ask.device} for {names}: needed {_size(needed)}, free {_size(free)} of "
            f"{_size(total)}; {why}. Held there: {self._held_text(ask.device)}. {_FIXES}"
        )
        return OutOfDeviceMemory(
            msg, device=ask.device, needed=needed, free=free, held=self._held_list(ask.device), total=total
        )

    def _load_ran_out(self, entry: _Planned, ask: _Ask, error: BaseException) -> OutOfDeviceMemory:
        """The error for a load that ran out of device memory (raised once everything the acquire moved is back)."""
        needed = entry.counted or entry.size or entry.part.nbytes()
        with self._state:
            memory = self._memory(ask.device)
            free, total = memory if memory is not None else (0, None)
            held, text = self._held_list(ask.device), self._held_text(ask.device)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        msg = (
            f"loading {entry.part!r} on {ask.device} ran out of device memory ({first}); everything this scope had "
            f"moved is back where it was. It needed {_size(needed)}; {_size(free)} is free now of {_size(total)}. "
            f"Held there: {text}. {_FIXES}"
        )
        return OutOfDeviceMemory(msg, device=ask.device, needed=needed, free=free, held=held, total=total)

    def _held_list(self, device: torch.device) -> list[tuple[str, int, str]]:
        live = sorted(
            (h for h in self._held.values() if h.device == device and (h.claims or h.kept or h.prefetched)),
            key=lambda h: h.order,
        )
        return [(repr(h.part), h.nbytes, _holder(h)) for h in live]

    def _held_text(self, device: torch.device) -> str:
        held = self._held_list(device)
        if not held:
            return "nothing by ondevice (the memory in use there is outside its scopes)"
        return "; ".join(
            f"{name}, {_size(nbytes)}, {holder if holder in ('kept', 'prefetched') else 'by ' + holder}"
            for name, nbytes, holder in held
        )

    def _memory(self, device: torch.device) -> tuple[int, int] | None:
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

    def _pend(self, device: torch.device, nbytes: int) -> None:
        if not nbytes:
            return
        left = self._pending.get(device, 0) + nbytes
        if left:
            self._pending[device] = left
        else:
            del self._pending[device]
        self._notify()

    def _leave_queue(self, ask: _Ask) -> None:
        """``ask`` is decided (or gave up): out of its device's queue, its eviction reservation dropped."""
        if ask.queued:
            queue = self._rooms[ask.device]
            queue.remove(ask)
            if not queue:
                del self._rooms[ask.device]
            ask.queued = False
            self._notify()
        self._pend(ask.device, -ask.reserved)
        ask.reserved = 0

    def _reclaim(self, device: torch.device, nbytes: int) -> None:
        for reclaim in list(self._reclaimers):
            try:
                reclaim(device, nbytes)
            except Exception:  # a reclaimer that fails frees nothing: the policy goes on without it
                log.exception("ondevice: reclaiming memory on %s failed", device)

    def _take_off(self, holdings: Sequence[Holding]) -> None:
        """Offload holdings marked OFFLOADING by this thread (evictions, moves to another device), outside the lock."""
        first: BaseException | None = None
        for holding in holdings:
            try:
                self._end_holding(holding, join=holding.prefetched)
            except BaseException as exc:  # noqa: BLE001  (every holding is taken off; an interrupt is raised after)
                first = _first_error(first, exc, holding.part)
        if isinstance(first, Exception):
            log.error("ondevice: could not offload %r to make room", holdings, exc_info=first)
        elif first is not None:
            raise first

    @staticmethod
    def _check_abort(ask: _Ask) -> None:
        if ask.abort is not None and ask.abort.is_set():
            msg = f"the acquire of {', '.join(map(repr, ask.parts))} on {ask.device} was given up"
            raise AbortedError(msg)

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
                if not holding.claims and holding.kept and not holding.forced_off:
                    holding.used = next(self._ticks)  # stays, unclaimed; evicted least recently used first
                    unpoint = self._unpoint(holding, part)
                elif not holding.claims:
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
                    holding.prefetched, holding.kept, holding.mover = False, False, None
                    self._drop_holding(holding)
        self.lock.deliver(event)

    def _end_keep(self, part: Part) -> None:
        with self._state:
            while True:
                holding = self._held.get(id(part.key))
                if holding is None or holding.state is State.RESIDENT:
                    break
                self._wait_for_move(holding, part)
            if holding is None or not holding.kept:
                return
            holding.kept = False
            if holding.claims or holding.prefetched:
                return  # offloaded at its last release
            self._begin(holding, State.OFFLOADING)
        self._end_holding(holding, join=False)

    # ------------------------------------------------------------------ prefetch

    def _prefetch_one(self, part: Part, device: torch.device) -> Holding | None:
        measured = self._held.get(id(part.key)) is None and self._memory(device) is not None
        size = part.nbytes() if measured else 0  # outside the lock: a walk over its tensors
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
            if not self._prefetch_fits(part, device, size, measured=measured):
                return None
            holding = Holding(device=device, key=part.key, order=next(self._order), part=part, prefetched=True)
            holding.nbytes, holding.used = size, next(self._ticks)
            self._add_holding(holding)
            self._begin(holding, State.LOADING)
            self._pend(device, size)
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
                self._pend(device, -size)
                if done:
                    holding.pointed.append(part)
                    self._settle_locked(holding, moved=True)
                else:  # a failed prefetch leaves the weights on the CPU: the holding goes
                    holding.prefetched, holding.mover = False, None
                    self._drop_holding(holding)
        self.lock.deliver(event)
        return holding

    def _prefetch_fits(self, part: Part, device: torch.device, size: int, *, measured: bool) -> bool:
        """Whether ``size`` bytes fit beside what is held, loading, and needed by waiting acquires (lock held)."""
        memory = self._memory(device) if size or not measured else None
        if memory is None:
            return True
        if not measured:  # it was held when measured: rare
            size = part.nbytes()
        waiting = sum(ask.needed for ask in self._rooms.get(device, []))
        if size <= memory[0] - self._pending.get(device, 0) - waiting:
            return True
        log.info("ondevice: not prefetching %r: %s does not fit on %s now", part, _size(size), device)
        return False

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

    def _wait_for_other_patches(self, ask: _Ask) -> None:
        """Return once no owner beside ``ask.owner`` holds other patches of its parts' weights; raise if never."""
        wait = _Wait(ask.owner, ask.parts, ask.device, ask.blocking)
        conflicts = self._conflicts(wait)
        if not conflicts:
            return
        if not ask.block:
            raise WouldBlock
        first = conflicts[0]
        log.info("ondevice: %s waits for %s to release %r", wait.owner.name, first.owner.name, first.held)
        self._waiting[wait.owner] = wait
        self._notify()  # waiters for memory check again: this wait may close a cycle
        try:
            started = time.monotonic()
            warnings = 0
            while conflicts:
                self._raise_if_endless(wait, conflicts)  # again after every release: the last to close a cycle sees it
                self._check_abort(ask)
                warn_at = started + (warnings + 1) * self.wait_warning_s
                self._wait(max(0.0, warn_at - time.monotonic()))
                if time.monotonic() >= warn_at:
                    warnings += 1
                    self._warn_long_wait(wait, conflicts[0], time.monotonic() - started)
                conflicts = self._conflicts(wait)
        finally:
            if self._waiting.get(wait.owner) is wait:
                del self._waiting[wait.owner]

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
            if not holding.threads or _only(holding, wait.owner):
                continue  # no claim, or only claims of the asker's thread, whose code outside tasks encloses them all
            for held, owner in zip(holding.claims, holding.owners, strict=True):
                if owner.runs_beside(wait.owner) and not held.same_weights(part):
                    found.append(_Conflict(part, held, owner))
        return found

    def _raise_if_endless(self, wait: _Wait, conflicts: Sequence[_Conflict]) -> None:
        """Raise where the wait could never end: a holder is this owner, runs on the thread this wait blocks, or
        waits (through others) for one of those."""
        pending, seen = [conflict.owner for conflict in conflicts], set()
        while pending:
            owner = pending.pop()
            if owner == wait.owner or (wait.blocking and owner.thread == wait.owner.thread):
                conflict = next((c for c in conflicts if c.owner == owner), conflicts[0])
                raise ResidencyConflictError(self._endless_message(wait, conflict))
            if owner in seen:
                continue
            seen.add(owner)
            for other in self._waiting.values():  # its own wait, or one that blocks its thread
                if other.owner == owner or (other.blocking and other.owner.thread == owner.thread):
                    pending.extend(c.owner for c in self._conflicts(other))

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
                if h.state is State.RESIDENT and not (h.forced_off or h.partial) and device in (None, h.device)
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
