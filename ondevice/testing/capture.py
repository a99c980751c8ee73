"""Record the moves ondevice makes: ``with capture_moves() as moves:``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ondevice.events import MoveEvent, add_listener

__all__ = ["capture_moves"]


@contextmanager
def capture_moves() -> Iterator[list[MoveEvent]]:
    """Collect every :class:`~ondevice.events.MoveEvent` emitted inside the block into the list it yields.

    Thread semantics: moves of every thread are recorded, in the order their
    events are delivered; the list is complete once the block's own scopes
    have been entered and exited.

    Example::

        with capture_moves() as moves, on_gpu(model):
            pass
        assert [(m.source.type, m.target.type) for m in moves] == [("cpu", "fakegpu"), ("fakegpu", "cpu")]
    """
    moves: list[MoveEvent] = []
    remove = add_listener(moves.append)
    try:
        yield moves
    finally:
        remove()
