"""The process-wide residency table: which weights live scopes hold on which device.

Scopes decide *when*; this table decides *what may stay where*; strategies'
parts decide *how* one kind of component moves.

Weights are counted by identity of the part's ``key`` (ComfyUI clones share
one ``nn.Module``, so they share one count).  The first claim loads, later
ones only count; the last release offloads.  A later claim through a part
whose weights differ (a ComfyUI clone with other patches, say a LoRA) makes
that part the holding's current ``part`` until it is released, and the
latest claim still live is loaded back then.  Every claim points its part at the device (``point_at``);
the originals are restored when the weights leave the device.

After every acquire and release the table checks that each weight still held
is on its device and reloads any that something evicted.  An acquire that
cannot get every part onto the device raises and holds nothing.

Thread semantics: one re-entrant lock (:attr:`ResidencyTable.lock`) guards the
table and every move, so moves are serialized process-wide: two threads never
load the same weights twice, and weights that a live scope holds are never
offloaded by another.  ComfyUI's ``load_models_gpu`` and ``free_memory`` take
the same lock once ComfyUI's strategies are in use (see
:mod:`ondevice.strategies.comfy`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ondevice.errors import OnDeviceError, ResidencyConflictError
from ondevice.strategies import Part

__all__ = ["Claim", "Holding", "ResidencyTable", "table"]

log = logging.getLogger("ondevice")


@dataclass
class Holding:
    """Weights that live scopes hold on ``device``; ``claims`` lists every part claimed for them, in order."""

    device: torch.device
    key: object
    order: int
    part: Part  # the part whose weights (patches included) are on the device now
    claims: list[Part] = field(default_factory=list)
    pointed: list[Part] = field(default_factory=list)  # every part pointed at the device, restored at the end
    forced_off: bool = False


@dataclass(frozen=True)
class Claim:
    """One scope's hold on one part; released exactly once."""

    holding: Holding
    part: Part


def _same_weights(a: Part, b: Part) -> bool:
    """Whether loading ``b`` would put exactly ``a``'s weights on the device (same patches)."""
    if a is b:
        return True
    same = getattr(a, "same_weights", None)
    return bool(same(b)) if callable(same) else True


def _point_at(part: Part, device: torch.device) -> None:
    point_at = getattr(part, "point_at", None)
    if callable(point_at):
        point_at(device)


def _restore_pointers(parts: Iterable[Part]) -> None:
    for part in parts:
        restore = getattr(part, "restore", None)
        if callable(restore):
            restore()


class ResidencyTable:
    """What is held where; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._held: dict[int, Holding] = {}
        self._order = itertools.count()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock (for code that must not run beside a move)."""
        with self.lock:
            yield

    def acquire(self, parts: Sequence[Part], device: torch.device) -> list[Claim]:
        """Hold every part on ``device``, loading those not yet there; all or nothing."""
        claims: list[Claim] = []
        with self.lock:
            try:
                for part in parts:
                    claims.append(self._claim(part, device))
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

    def force_offload(self, part: Part) -> None:
        """Move ``part`` to the CPU now; a scope holding it keeps counting, and a new claim loads it again."""
        with self.lock:
            holding = self._held.get(id(part.key))
            if holding is None:
                part.offload()
                return
            log.warning("ondevice: offload() of %r while a scope holds it; it stays on the CPU", part)
            holding.forced_off = True
            holding.part.offload()

    def _claim(self, part: Part, device: torch.device) -> Claim:
        holding = self._held.get(id(part.key))
        if holding is None:
            _point_at(part, device)
            try:
                part.load(device)
            except BaseException:
                _restore_pointers([part])
                raise
            holding = Holding(device=device, key=part.key, order=next(self._order), part=part)
            holding.claims.append(part)
            holding.pointed.append(part)
            self._held[id(part.key)] = holding
            return Claim(holding, part)
        if holding.device != device:
            msg = (
                f"{part!r} is held on {holding.device} by a live scope and was asked for on {device}; "
                f"use device={str(holding.device)!r} or exit the other scope first"
            )
            raise ResidencyConflictError(msg)
        _point_at(part, device)
        holding.pointed.append(part)
        if holding.forced_off or not _same_weights(holding.part, part):
            part.load(device)  # a clone with other patches: its weights are the ones on the device now
            holding.part, holding.forced_off = part, False
        holding.claims.append(part)
        return Claim(holding, part)

    def _release_all(self, claims: Iterable[Claim]) -> None:
        first: BaseException | None = None
        for claim in claims:
            try:
                self._release_one(claim)
            except BaseException as exc:  # noqa: BLE001  (every release runs; the first error is raised)
                if first is None:
                    first = exc
                else:
                    log.error("ondevice: releasing %r also failed: %r", claim.part, exc)
        if first is not None:
            raise first

    def _release_one(self, claim: Claim) -> None:
        holding = claim.holding
        holding.claims.remove(claim.part)
        if holding.claims:
            if holding.part is claim.part:
                successor = holding.claims[-1]  # the latest claim still live decides the patches
                if not holding.forced_off and not _same_weights(claim.part, successor):
                    successor.load(holding.device)
                holding.part = successor
            return
        del self._held[id(holding.key)]
        try:
            claim.part.offload()
        finally:
            _restore_pointers(reversed(holding.pointed))

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
