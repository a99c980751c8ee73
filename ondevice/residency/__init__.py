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

The hot path: a claim on ``RESIDENT`` weights with the same patches, and its
release, cost a few dictionary operations, whatever else is held: **a claim on
resident weights trusts the table**, looks at no tensor and asks nothing of the
device.  Weights evicted behind ondevice's back (a custom node calling
ComfyUI's ``model_unload``) are found and loaded back only by an acquire or a
release that moves something, by :meth:`ResidencyTable.restore` and by
:meth:`ondevice.ScopeHandle.ensure`.  An acquire verifies what it loaded in
full: one that cannot get such a part wholly onto the device raises and holds
nothing.

Where each part of the policy lives:

- :mod:`~ondevice.residency.residency_table`: :class:`ResidencyTable`, the public operations; keeps and prefetches;
- :mod:`~ondevice.residency.acquire`: deciding an acquire under the lock and carrying it out, the hot path,
  rollback; several devices;
- :mod:`~ondevice.residency.release`: releases, the swap back to the latest live claim;
- :mod:`~ondevice.residency.holdings`: :class:`Holding`, :class:`State` (``LOADING``, ``RESIDENT``,
  ``OFFLOADING``), :class:`Claim`, and the ledger that keeps them under the lock;
- :mod:`~ondevice.residency.memory`: the memory policy (needed against free, reclaimers, eviction, the
  per-device queue, waits that could never end, :class:`~ondevice.errors.OutOfDeviceMemory`);
- :mod:`~ondevice.residency.patches`: waiting for other patches that an owner beside this one holds;
- :mod:`~ondevice.residency.owners`: :class:`Owner`, who runs beside whom;
- :mod:`~ondevice.residency.moves`: one move and its :class:`~ondevice.events.MoveEvent`, offloads, restores;
- :mod:`~ondevice.residency.lock`: the table's lock, and move events deferred past a caller's hold;
- :mod:`~ondevice.residency.plans`: one acquire being decided, :class:`WouldBlock`, :class:`AbortedError`.

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

from ondevice.residency.holdings import Claim, Holding, State
from ondevice.residency.owners import Owner
from ondevice.residency.plans import AbortedError, WouldBlock
from ondevice.residency.residency_table import ResidencyTable

__all__ = ["AbortedError", "Claim", "Holding", "Owner", "ResidencyTable", "State", "WouldBlock", "table"]

table = ResidencyTable()
