"""The moves the table runs outside its lock: one move timed into a :class:`~ondevice.events.MoveEvent`, taking a
holding off the device, swapping patches back, and loading back what was evicted behind ondevice's back.

Every ``load``, ``prefetch`` and ``offload`` the table performs emits one
:class:`~ondevice.events.MoveEvent` (while any listener is registered; see
:mod:`ondevice.events`), delivered on the moving thread once the move's state is recorded
(:class:`~ondevice.residency.lock.TableLock`).

Weights evicted behind ondevice's back (a custom node calling ComfyUI's ``model_unload``) are
found and loaded back (:func:`restore`) only by an acquire or a release that moves something, by
:meth:`ResidencyTable.restore` and by :meth:`ondevice.ScopeHandle.ensure`.  An acquire verifies
what it loaded in full (:func:`verify`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence

import torch

from ondevice import devices, events
from ondevice.devices import CPU
from ondevice.errors import OnDeviceError
from ondevice.events import MoveEvent
from ondevice.residency.holdings import Holding, Ledger, State
from ondevice.strategies import Part, placement

__all__ = ["end_holding", "first_error", "restore", "restore_quietly", "run", "swap_back", "take_off", "verify"]

log = logging.getLogger("ondevice")


def run(part: Part, target: torch.device, move: Callable[[], None], *, wait: bool = True) -> MoveEvent | None:
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


def first_error(first: BaseException | None, exc: BaseException, what: object) -> BaseException:
    """The error to raise once every cleanup ran: the first, unless a later interrupt outranks it."""
    if first is None:
        return exc
    if isinstance(first, Exception) and not isinstance(exc, Exception):
        exc.__context__ = first  # an interrupt outranks an ordinary error: raised, that error chained
        return exc
    log.error("ondevice: releasing %r also failed: %r", what, exc)
    return first


def end_holding(ledger: Ledger, holding: Holding, *, join: bool) -> None:
    """Offload a holding that is OFFLOADING with no claim (this thread moving it), undo every pointer, drop it."""
    event = None
    try:
        if join:
            holding.part.join()  # a prefetch's copies land before their memory goes back
        event = run(holding.part, CPU, holding.part.offload)
    finally:
        try:
            for pointed in reversed(holding.pointed):
                pointed.restore()
        finally:
            with ledger.state_lock:
                holding.pointed.clear()
                holding.prefetched, holding.kept, holding.mover = False, False, None
                ledger.drop_holding(holding)
    ledger.lock.deliver(event)


def take_off(ledger: Ledger, holdings: Sequence[Holding]) -> None:
    """Offload holdings marked OFFLOADING by this thread (evictions, moves to another device), outside the lock."""
    first: BaseException | None = None
    for holding in holdings:
        try:
            end_holding(ledger, holding, join=holding.prefetched)
        except BaseException as exc:  # noqa: BLE001  (every holding is taken off; an interrupt is raised after)
            first = first_error(first, exc, holding.part)
    if isinstance(first, Exception):
        log.error("ondevice: could not offload %r to make room", holdings, exc_info=first)
    elif first is not None:
        raise first


def swap_back(ledger: Ledger, holding: Holding, successor: Part) -> None:
    """Load ``successor``'s patches into ``holding``'s weights (marked LOADING by this thread), then settle them;
    weights loaded within a budget are loaded within it again, and counted by what that left on the device."""
    event, device = None, holding.device
    if holding.partial:
        move = functools.partial(successor.load_partial, device, holding.budget)
    else:
        move = functools.partial(successor.load, device)
    try:
        event = run(successor, device, move)
        if holding.partial:
            resident = successor.resident_nbytes(device)
            with ledger.state_lock:
                holding.nbytes = resident
    finally:
        ledger.settle(holding, moved=True)
    ledger.lock.deliver(event)


def restore(ledger: Ledger, device: torch.device | None = None) -> None:
    """Load back, one by one, every resident holding (on ``device``) whose weights are no longer wholly there."""
    with ledger.state_lock:
        seen = [
            (h, h.part, h.moves)
            for h in ledger.held.values()
            if h.state is State.RESIDENT and not (h.forced_off or h.partial) and device in (None, h.device)
        ]
    for holding, part, moves in sorted(seen, key=lambda s: s[0].order):
        if part.is_on(holding.device):  # outside the lock: a tensor walk; acted on only if nothing moved since
            continue
        with ledger.state_lock:
            current = ledger.held.get(id(holding.key)) is holding and holding.state is State.RESIDENT
            if not current or holding.part is not part or holding.moves != moves or holding.forced_off:
                continue
            ledger.begin(holding, State.LOADING)
        log.info("ondevice: %r was evicted from %s; loading it back", part, holding.device)
        event = None
        try:
            event = run(part, holding.device, functools.partial(part.load, holding.device))
        finally:
            ledger.settle(holding, moved=True)
        ledger.lock.deliver(event)


def restore_quietly(ledger: Ledger, device: torch.device | None = None) -> None:
    """:func:`restore`, logging instead of raising."""
    try:
        restore(ledger, device)
    except Exception:  # an outer scope's component could not be restored; its owner finds out
        log.exception("ondevice: could not restore an evicted component")


def verify(holdings: Sequence[Holding], device: torch.device) -> None:
    """Raise where a holding's weights (not forced off) are not wholly on its device."""
    missing = [h.part for h in holdings if not h.forced_off and not h.part.is_on(h.device)]
    if missing:
        msg = (
            f"{', '.join(map(repr, missing))} could not be kept wholly on {device} beside what live scopes "
            "hold there; free device memory or scope fewer components at once"
        )
        raise OnDeviceError(msg)
