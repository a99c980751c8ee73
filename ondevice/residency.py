"""The process-wide residency table: which weights live scopes hold on which device.

Scopes decide *when*; this table decides *what may stay where*; strategies'
parts decide *how* one kind of component moves.

Weights are counted by identity of the part's ``key`` (ComfyUI clones share
one ``nn.Module``, so they share one count).  The first acquire loads, later
ones only count; the last release offloads.  After every acquire and release
the table checks that each weight still held is on its device and reloads any
that something (ComfyUI's own ``load_models_gpu``, an inner scope) evicted.

Thread semantics: one re-entrant lock guards the table and every move, so
moves are serialized process-wide: two threads never load the same weights
twice, and weights that a live scope holds are never offloaded by another.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ondevice.errors import ResidencyConflictError
from ondevice.strategies import Part

__all__ = ["Holding", "ResidencyTable", "table"]

log = logging.getLogger("ondevice")


@dataclass
class Holding:
    """Weights that live scopes hold on ``device``; ``count`` scopes hold them."""

    part: Part
    device: torch.device
    count: int = 0
    order: int = 0
    forced_off: bool = False
    key: object = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.part.key  # a strong reference keeps id(key) valid while held


class ResidencyTable:
    """What is held where; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: dict[int, Holding] = {}
        self._order = itertools.count()

    def acquire(self, parts: Sequence[Part], device: torch.device) -> list[Holding]:
        """Hold every part on ``device``, loading those not yet held; all or nothing."""
        taken: list[Holding] = []
        with self._lock:
            try:
                for part in parts:
                    taken.append(self._acquire_one(part, device))
                self._restore()
            except BaseException:
                self._release_all(reversed(taken))
                raise
        return taken

    def release(self, holdings: Sequence[Holding]) -> None:
        """Drop one count of each holding; offload those that reach zero (every one, even if one fails)."""
        with self._lock:
            try:
                self._release_all(reversed(holdings))
            finally:
                self._restore_quietly()

    def restore(self) -> None:
        """Load back every held weight that something evicted."""
        with self._lock:
            self._restore()

    def held(self) -> list[Holding]:
        """The live holdings, outermost first."""
        with self._lock:
            return sorted(self._held.values(), key=lambda h: h.order)

    def holding_of(self, key: object) -> Holding | None:
        """The holding for weights ``key``, if a live scope holds them."""
        with self._lock:
            return self._held.get(id(key))

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting but no longer restores it."""
        with self._lock:
            holding = self._held.get(id(part.key))
            if holding is not None:
                holding.forced_off = True
                log.warning("ondevice: offload() of %r while a scope holds it; it stays on the CPU", part)
                holding.part.offload()
            else:
                part.offload()

    def _acquire_one(self, part: Part, device: torch.device) -> Holding:
        holding = self._held.get(id(part.key))
        if holding is not None:
            if holding.device != device:
                msg = (
                    f"{part!r} is held on {holding.device} by a live scope and was asked for on {device}; "
                    f"use device={str(holding.device)!r} or exit the other scope first"
                )
                raise ResidencyConflictError(msg)
            holding.count += 1
            return holding
        part.load(device)
        holding = Holding(part=part, device=device, count=1, order=next(self._order))
        self._held[id(part.key)] = holding
        return holding

    def _release_all(self, holdings: Iterable[Holding]) -> None:
        first: BaseException | None = None
        for holding in holdings:
            try:
                self._release_one(holding)
            except BaseException as exc:  # noqa: BLE001  (every offload runs; the first error is raised)
                if first is None:
                    first = exc
                else:
                    log.error("ondevice: offloading %r also failed: %r", holding.part, exc)
        if first is not None:
            raise first

    def _release_one(self, holding: Holding) -> None:
        holding.count -= 1
        if holding.count > 0:
            return
        del self._held[id(holding.key)]
        holding.part.offload()

    def _restore(self) -> None:
        for holding in sorted(self._held.values(), key=lambda h: h.order):
            if not holding.forced_off and not holding.part.is_on(holding.device):
                log.info("ondevice: %r was evicted from %s; loading it back", holding.part, holding.device)
                holding.part.load(holding.device)

    def _restore_quietly(self) -> None:
        try:
            self._restore()
        except Exception:  # an outer scope's component could not be restored; its owner finds out
            log.exception("ondevice: could not restore an evicted component")


table = ResidencyTable()
