"""Releasing claims: the last release of weights offloads them (unless kept), the release of the claim whose patches
are loaded swaps the latest claim still live back in (unless all those are released in the same call), and every
release runs even if one fails.

A claim's pointers are undone at its release, but those of the first part pointed, which saved the
true originals, are undone only when the weights leave the device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from ondevice.residency.holdings import Claim, Ledger, State
from ondevice.residency.moves import end_holding, first_error, swap_back
from ondevice.strategies import Part

__all__ = ["release_all"]


def release_all(ledger: Ledger, claims: Iterable[Claim]) -> bool:
    """Release every claim, in order; raise the first error once all ran; whether anything moved.

    A claim whose patches are loaded hands the weights to the latest claim still live (a swap back),
    unless every claim left on them is released later in this same call: then nothing is swapped in
    just to be offloaded (``on_gpu(unet, lora_clone)`` exiting).
    """
    claims = list(claims)
    first: BaseException | None = None
    moved = False
    for index, claim in enumerate(claims):
        leaving = [later.part for later in claims[index + 1 :] if later.holding is claim.holding]
        try:
            moved = _release_one(ledger, claim, leaving) or moved
        except BaseException as exc:  # noqa: BLE001  (every release runs; the first error is raised)
            first, moved = first_error(first, exc, claim.part), True
    if first is not None:
        raise first
    return moved


def _release_one(ledger: Ledger, claim: Claim, leaving: list[Part]) -> bool:
    """Drop one claim (its pointers undone unless it was the first pointed); whether that moved weights.

    ``leaving``: the parts of the claims on the same weights that this release goes on to release.
    """
    holding, part = claim.holding, claim.part
    successor: Part | None = None
    last = unpoint = False
    try:
        with ledger.state_lock:
            ledger.wait_while_moved_elsewhere(holding)
            ledger.remove_claim(holding, part)  # ValueError if released already
            if not holding.claims and holding.kept and not holding.forced_off:
                holding.used = next(ledger.ticks)  # stays, unclaimed; evicted least recently used first
                unpoint = ledger.unpoint(holding, part)
            elif not holding.claims:
                last = True  # first: an interrupt before the state changes still ends the holding below
                ledger.begin(holding, State.OFFLOADING)
            else:
                unpoint = ledger.unpoint(holding, part)
                if holding.part is part and not _all_leaving(holding.claims, leaving):
                    successor = holding.claims[-1]  # the latest claim still live decides the patches
                    holding.part = successor
                    if holding.forced_off or part.same_weights(successor):
                        successor = None
                    else:
                        ledger.begin(holding, State.LOADING)
    finally:
        if last:
            end_holding(ledger, holding, join=False)
    if last:
        return True
    try:
        if unpoint:
            part.restore()
    finally:
        if successor is not None:
            swap_back(ledger, holding, successor)
    return successor is not None


def _all_leaving(left: list[Part], leaving: list[Part]) -> bool:
    """Whether every claim ``left`` on the weights is among those released next (each part counted once per claim)."""
    return Counter(map(id, left)) <= Counter(map(id, leaving))
