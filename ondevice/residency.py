"""The process-wide residency table: which weights live scopes hold on which device.

Scopes decide *when*; this table decides *what may stay where*; strategies'
parts decide *how* one kind of component moves.

Weights are counted by identity of the part's ``key`` (ComfyUI clones share
one ``nn.Module``, so they share one count).  The first claim loads, later
ones only count; the last release offloads.  A later claim through a part
whose weights differ (a ComfyUI clone with other patches, say a LoRA) makes
that part the holding's current ``part`` until it is released, and the
latest claim still live is loaded back then.  Every claim points its part at the device (``point_at``);
the originals are restored when the weights leave the device.  The table only handles
:class:`~ondevice.strategies.Part` objects (others are adapted by :func:`~ondevice.strategies.as_part`
on the way in) and calls their methods directly.

Every ``load`` and ``offload`` the table performs emits one :class:`~ondevice.events.MoveEvent`
(while any listener is registered; see :mod:`ondevice.events`).

After every acquire and release the table checks that each weight still held
is on its device and reloads any that something evicted.  An acquire that
cannot get every part onto the device raises and holds nothing.

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

Thread semantics: one re-entrant lock (:attr:`ResidencyTable.lock`) guards the
table and every move, so moves are serialized process-wide: two threads never
load the same weights twice, and weights that a live scope holds are never
offloaded by another.  A waiting acquire releases the lock while it waits.
ComfyUI's ``load_models_gpu`` and ``free_memory`` take
the same lock once ComfyUI's strategies are in use (see
:mod:`ondevice.strategies.comfy`).  Move events are held back while the moving
thread holds the lock and reach listeners, on that thread, as soon as its
outermost hold ends (a scope's entry returns only after that), so listeners
never run under the lock.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ondevice import devices, events
from ondevice.devices import CPU
from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.events import MoveEvent
from ondevice.strategies import Part, as_part
from ondevice.strategies.module import placement

__all__ = ["Claim", "Holding", "Owner", "ResidencyTable", "table"]

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
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop runs in this thread
            task = None
        thread = threading.current_thread()
        name = f"thread {thread.name!r}"
        if task is not None:
            name += f" (asyncio task {task.get_name()!r})"
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
        if other.finished() or self.finished():
            return False
        if self.thread != other.thread:
            return True
        return self.task is not None and other.task is not None and self.task is not other.task


@dataclass
class Holding:
    """Weights that live scopes hold on ``device``; ``claims`` lists every part claimed for them, in order."""

    device: torch.device
    key: object
    order: int
    part: Part  # the part whose weights (patches included) are on the device now
    claims: list[Part] = field(default_factory=list)
    owners: list[Owner] = field(default_factory=list)  # owners[i] entered claims[i]
    pointed: list[Part] = field(default_factory=list)  # every part pointed at the device, restored at the end
    forced_off: bool = False


@dataclass(frozen=True)
class Claim:
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


class _TableLock:
    """The table's re-entrant lock; move events made under it reach listeners when this thread's outermost hold ends.

    Used like ``threading.RLock`` (``with table.lock:``); ``rlock`` is the lock itself (for a ``Condition``).
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

    def defer(self, event: MoveEvent) -> None:
        """Deliver ``event`` once this thread's outermost hold ends (call it with the lock held)."""
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
    )


class ResidencyTable:
    """What is held where; see the module docstring."""

    wait_warning_s: float = 60.0
    """A waiting acquire logs a warning each time it has waited this long."""

    def __init__(self) -> None:
        self.lock = _TableLock()
        self._released = threading.Condition(self.lock.rlock)  # notified whenever a claim is released
        self._held: dict[int, Holding] = {}
        self._waiting: dict[int, _Wait] = {}  # thread ident -> what that thread waits to acquire
        self._order = itertools.count()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock (for code that must not run beside a move)."""
        with self.lock:
            yield

    def acquire(self, parts: Sequence[Part], device: torch.device) -> list[Claim]:
        """Hold every part on ``device``, loading those not yet there; all or nothing.

        Waits while another thread holds the same weights with other patches
        (see the module docstring); raises :class:`ResidencyConflictError`
        where that wait could never end.
        """
        owner = Owner.current()
        parts = [as_part(part) for part in parts]
        claims: list[Claim] = []
        with self.lock:
            self._wait_for_other_patches(_Wait(owner, parts, device))
            try:
                for part in parts:
                    claims.append(self._claim(part, device, owner))
                self._restore()
                self._verify(claims)
            except BaseException:
                try:
                    self._release_all(reversed(claims))
                finally:
                    self._restore_quietly()  # a failed load may have evicted what outer scopes hold
                raise
        return claims

    def release(self, claims: Sequence[Claim]) -> None:
        """Drop each claim; offload weights no claim holds any more (every one, even if one fails)."""
        with self.lock:
            try:
                self._release_all(reversed(claims))
            finally:
                self._restore_quietly()

    def restore(self) -> None:
        """Load back every held weight that something evicted."""
        with self.lock:
            self._restore()

    def held(self) -> list[Holding]:
        """The live holdings, outermost first."""
        with self.lock:
            return sorted(self._held.values(), key=lambda h: h.order)

    def waiting(self) -> list[Owner]:
        """The owners whose acquire now waits for another thread's claims to be released."""
        with self.lock:
            return [wait.owner for wait in self._waiting.values()]

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting, and a new claim loads it again."""
        part = as_part(part)
        with self.lock:
            holding = self._held.get(id(part.key))
            if holding is None:
                self._offload(part)
                return
            log.warning("ondevice: offload() of %r while a scope holds it; it stays on the CPU", part)
            holding.forced_off = True
            self._offload(holding.part)

    def _wait_for_other_patches(self, wait: _Wait) -> None:
        """Return once no owner beside ``wait.owner`` holds other patches of these weights; raise if never."""
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
                self._released.wait(max(0.0, warn_at - time.monotonic()))  # releases the lock while it waits
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

    def _claim(self, part: Part, device: torch.device, owner: Owner) -> Claim:
        holding = self._held.get(id(part.key))
        if holding is None:
            part.point_at(device)
            try:
                self._load(part, device)
            except BaseException:
                part.restore()
                raise
            holding = Holding(device=device, key=part.key, order=next(self._order), part=part)
            holding.claims.append(part)
            holding.owners.append(owner)
            holding.pointed.append(part)
            self._held[id(part.key)] = holding
            return Claim(holding, part)
        if holding.device != device:
            msg = (
                f"{part!r} is held on {holding.device} by a live scope and was asked for on {device}; "
                f"use device={str(holding.device)!r} or exit the other scope first"
            )
            raise ResidencyConflictError(msg)
        part.point_at(device)
        holding.pointed.append(part)
        if holding.forced_off or not holding.part.same_weights(part):
            self._load(part, device)  # a clone with other patches: its weights are the ones on the device now
            holding.part, holding.forced_off = part, False
        holding.claims.append(part)
        holding.owners.append(owner)
        return Claim(holding, part)

    def _load(self, part: Part, device: torch.device) -> None:
        self._move(part, device, lambda: part.load(device))

    def _offload(self, part: Part) -> None:
        self._move(part, CPU, part.offload)

    def _move(self, part: Part, target: torch.device, move: Callable[[], None]) -> None:
        """Run one move; while anyone listens, time it and queue its :class:`MoveEvent` (a failed move has none)."""
        if not events.listening():
            move()
            return
        before = placement(part.tensors())
        started = time.perf_counter()
        move()
        for device in {target, *before}:
            devices.synchronize(device)  # the copies are done, not only queued, when the clock stops
        self.lock.defer(_event(part, target, before, time.perf_counter() - started))

    def _release_all(self, claims: Iterable[Claim]) -> None:
        first: BaseException | None = None
        for claim in claims:
            try:
                self._release_one(claim)
            except BaseException as exc:  # noqa: BLE001  (every release runs; the first error is raised)
                if first is None:
                    first = exc
                elif isinstance(first, Exception) and not isinstance(exc, Exception):
                    exc.__context__ = first  # an interrupt outranks an ordinary error: raised, that error chained
                    first = exc
                else:
                    log.error("ondevice: releasing %r also failed: %r", claim.part, exc)
        if first is not None:
            raise first

    def _release_one(self, claim: Claim) -> None:
        holding = claim.holding
        index = [part is claim.part for part in holding.claims].index(True)  # ValueError if released already
        del holding.claims[index], holding.owners[index]
        self._released.notify_all()
        if holding.claims:
            if holding.part is claim.part:
                successor = holding.claims[-1]  # the latest claim still live decides the patches
                if not holding.forced_off and not claim.part.same_weights(successor):
                    self._load(successor, holding.device)
                holding.part = successor
            return
        del self._held[id(holding.key)]
        try:
            self._offload(claim.part)
        finally:
            for part in reversed(holding.pointed):
                part.restore()

    def _restore(self) -> None:
        for holding in sorted(self._held.values(), key=lambda h: h.order):
            if not holding.forced_off and not holding.part.is_on(holding.device):
                log.info("ondevice: %r was evicted from %s; loading it back", holding.part, holding.device)
                self._load(holding.part, holding.device)

    def _restore_quietly(self) -> None:
        try:
            self._restore()
        except Exception:  # an outer scope's component could not be restored; its owner finds out
            log.exception("ondevice: could not restore an evicted component")

    def _verify(self, claims: Sequence[Claim]) -> None:
        missing = [c.part for c in claims if not c.holding.forced_off and not c.holding.part.is_on(c.holding.device)]
        if missing:
            device = claims[0].holding.device
            msg = (
                f"{', '.join(map(repr, missing))} could not be kept wholly on {device} beside what live scopes "
                "hold there; free device memory or scope fewer components at once"
            )
            raise OnDeviceError(msg)


table = ResidencyTable()
