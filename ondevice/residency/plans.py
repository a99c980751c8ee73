"""One acquire while the table decides it: what it asks for (:class:`Ask`), what each part needs (:class:`Planned`),
and the two ways it can end holding nothing from outside the policy (:class:`WouldBlock`, :class:`AbortedError`)."""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.residency.holdings import Claim, Holding
from ondevice.residency.owners import Owner
from ondevice.strategies import Part

__all__ = ["AbortedError", "Ask", "Planned", "Step", "WouldBlock", "check_abort", "fit_within", "prefetch_conflict"]


class WouldBlock(Exception):  # noqa: N818  (a signal between ondevice's modules, never raised to users)
    """``acquire(block=False)`` would have to wait, or move weights: nothing was claimed (``async with`` then
    makes the acquire on a worker thread)."""


class AbortedError(OnDeviceError):
    """A waiting acquire was given up from outside (``async with`` cancelled): it holds nothing."""


@dataclass(eq=False)
class Ask:
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
    warn_s: float = 60.0  # a waiting acquire logs a warning each time it has waited this long (the table's setting)
    poll_s: float = 0.1  # an acquire waiting for memory checks again at least this often (the table's setting)
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
    ahead: list[Part] = field(default_factory=list)  # what the scope prefetches once it holds its parts

    @property
    def unbudgeted_partial(self) -> bool:
        return self.partial and self.budget is None


def prefetch_conflict(part: Part, held_on: torch.device, device: torch.device) -> ResidencyConflictError:
    """The error for a prefetch of ``part`` on ``device`` whose weights are held on ``held_on``."""
    msg = (
        f"prefetch of {part!r} on {device}: its weights are held on {held_on}; "
        f"prefetch with device={str(held_on)!r} or exit the scope that holds them first"
    )
    return ResidencyConflictError(msg)


def check_abort(ask: Ask) -> None:
    """Raise :class:`AbortedError` where ``ask``'s ``abort`` is set."""
    if ask.abort is not None and ask.abort.is_set():
        msg = f"the acquire of {', '.join(map(repr, ask.parts))} on {ask.device} was given up"
        raise AbortedError(msg)


class Step(enum.Enum):
    """What a claim does once it is recorded, outside the lock."""

    NOTHING = "nothing"  # the weights are resident with its patches: point the part at the device, done
    LOAD = "load"  # a new holding: point at the device and load
    SWAP = "swap"  # other patches (or forced off): point at the device and load this part's weights
    ADOPT = "adopt"  # a prefetched holding: point at the device, join its copies (and swap, if other patches)
    POINT = "point"  # the same weights as an earlier part of this acquire loads: point at the device once loaded


@dataclass(eq=False)
class Planned:
    """One part of an acquire: its step, and the bytes it loads (``size``) and counts (``counted``, within a budget)."""

    part: Part
    step: Step
    holding: Holding | None = None  # None until recorded, for a new holding (LOAD) or a later part on it (source)
    source: Planned | None = None  # an earlier part of the same acquire on the same weights
    size: int = 0
    counted: int = 0
    partial: bool = False  # loaded with part.load_partial(device, budget)
    budget: int | None = None
    last: bool = True  # the last part of this acquire that moves these weights: it settles their state

    @property
    def moves(self) -> bool:
        return self.step not in (Step.NOTHING, Step.POINT)

    @property
    def claim(self) -> Claim:
        assert self.holding is not None  # noqa: S101  (recorded before it is run)
        return Claim(self.holding, self.part)


def fit_within(plan: Sequence[Planned], room: int, *, budget: bool) -> None:
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
