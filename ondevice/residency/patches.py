"""Waiting for other patches (:class:`PatchWaits`): one ``nn.Module`` carries one set of patches at a time.

Within one thread (and one asyncio task) scopes nest, so a clone with other
patches is swapped in at its claim and back at its release.  Each claim
records its :class:`~ondevice.residency.owners.Owner` (thread, and asyncio task
inside an event loop), and a claim never swaps weights under an owner that runs
beside it: an acquire that needs other patches than a live claim of another
thread holds *waits* until those claims are released, then swaps its own in.
Waiting is what a service that samples with a base model in one request and
its LoRA clone in another needs: the two run one after the other, each on its
own weights, instead of one failing.  Where waiting could never end, acquire
raises :class:`~ondevice.errors.ResidencyConflictError` naming both parts and
both owners, and holds nothing: when the holder waits, directly or through
other waiting threads, for this thread, or is another asyncio task on this
thread's event loop and the acquire waits on that loop's thread (waiting would
block the loop that has to finish it; ``async with`` waits on a worker thread
instead).  Clones with the same patches share the weights and never wait.  A
thread (or task) that has ended runs beside nobody: a generator it left
suspended inside a scope continues that scope, as a nested one, wherever it is
resumed.  Generators interleaved on one thread (``zip(gen(base),
gen(lora))``) count as nested scopes of that thread: their patches swap as
each steps, so do not interleave generators that run forwards on other patches
of the same weights.  Waiting for other patches is not fair (scopes with the
current patches that keep overlapping can keep a waiter waiting), and a wait on
something ondevice cannot see (the holder joins the waiting thread) never ends:
a waiter logs a warning every :attr:`ResidencyTable.wait_warning_s` seconds
naming what it waits for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ondevice.errors import ResidencyConflictError
from ondevice.residency.holdings import Ledger, only
from ondevice.residency.owners import Owner
from ondevice.residency.plans import Ask, WouldBlock, check_abort
from ondevice.strategies import Part

__all__ = ["Conflict", "PatchWaits", "Wait"]

log = logging.getLogger("ondevice")


@dataclass(frozen=True)
class Conflict:
    """``part`` needs other patches than ``held``, which ``owner`` claimed and which runs beside the asker."""

    part: Part
    held: Part
    owner: Owner


@dataclass(frozen=True)
class Wait:
    """An acquire waiting for other patches to be released; ``blocking``: it waits on its owner's thread."""

    owner: Owner
    parts: Sequence[Part]
    device: torch.device
    blocking: bool = True


class PatchWaits:
    """The acquires that wait for other patches to be released (``waiting``, by owner), and those waits.

    Every method expects the caller to hold the ledger's lock; waiting releases it.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.waiting: dict[Owner, Wait] = {}  # owner -> what it waits to acquire (other patches released)

    def wait_for(self, ask: Ask) -> None:
        """Return once no owner beside ``ask.owner`` holds other patches of its parts' weights; raise if never."""
        wait = Wait(ask.owner, ask.parts, ask.device, ask.blocking)
        conflicts = self.conflicts(wait)
        if not conflicts:
            return
        if not ask.block:
            raise WouldBlock
        first = conflicts[0]
        log.info("ondevice: %s waits for %s to release %r", wait.owner.name, first.owner.name, first.held)
        self.waiting[wait.owner] = wait
        self.ledger.notify()  # waiters for memory check again: this wait may close a cycle
        try:
            started = time.monotonic()
            warnings = 0
            while conflicts:
                self._raise_if_endless(wait, conflicts)  # again after every release: the last to close a cycle sees it
                check_abort(ask)
                warn_at = started + (warnings + 1) * ask.warn_s
                self.ledger.wait(max(0.0, warn_at - time.monotonic()))
                if time.monotonic() >= warn_at:
                    warnings += 1
                    _warn_long_wait(wait, conflicts[0], time.monotonic() - started)
                conflicts = self.conflicts(wait)
        finally:
            if self.waiting.get(wait.owner) is wait:
                del self.waiting[wait.owner]

    def conflicts(self, wait: Wait) -> list[Conflict]:
        """Live claims, by owners that run beside ``wait.owner``, of other patches of the weights it asks for."""
        found = []
        for part in wait.parts:
            holding = self.ledger.held.get(id(part.key))
            if holding is None or holding.device != wait.device:
                continue  # a claim on another device is refused by the acquire
            if not holding.threads or only(holding, wait.owner):
                continue  # no claim, or only claims of the asker's thread, whose code outside tasks encloses them all
            for held, owner in zip(holding.claims, holding.owners, strict=True):
                if owner.runs_beside(wait.owner) and not held.same_weights(part):
                    found.append(Conflict(part, held, owner))
        return found

    def _raise_if_endless(self, wait: Wait, conflicts: Sequence[Conflict]) -> None:
        """Raise where the wait could never end: a holder is this owner, runs on the thread this wait blocks, or
        waits (through others) for one of those."""
        pending, seen = [conflict.owner for conflict in conflicts], set()
        while pending:
            owner = pending.pop()
            if owner == wait.owner or (wait.blocking and owner.thread == wait.owner.thread):
                conflict = next((c for c in conflicts if c.owner == owner), conflicts[0])
                raise ResidencyConflictError(_endless_message(wait, conflict))
            if owner in seen:
                continue
            seen.add(owner)
            for other in self.waiting.values():  # its own wait, or one that blocks its thread
                if other.owner == owner or (other.blocking and other.owner.thread == owner.thread):
                    pending.extend(c.owner for c in self.conflicts(other))


def _warn_long_wait(wait: Wait, conflict: Conflict, seconds: float) -> None:
    log.warning(
        "ondevice: %s has waited %.1f s for %s to exit its scope on %r (the same weights with other patches "
        "than %r); if that thread waits for this one, exit one scope before entering the other",
        wait.owner.name,
        seconds,
        conflict.owner.name,
        conflict.held,
        conflict.part,
    )


def _endless_message(wait: Wait, conflict: Conflict) -> str:
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
