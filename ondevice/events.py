"""Move events: one :class:`MoveEvent` per move of a component's weights, to every listener.

The residency table emits one event for each ``load`` and ``offload`` it
performs (a nested scope that moves nothing emits none).  Benchmarks and
reports listen; tests record them with :func:`ondevice.testing.capture_moves`.

Thread semantics: listeners may be added and removed from any thread; a
listener is called on the thread that made the move, after the table's lock
is released, so it may enter scopes itself, but it must be quick and
thread-safe.  A listener that raises is logged and never breaks a move or
another listener.

Example::

    from ondevice.events import add_listener

    remove = add_listener(lambda event: print(event.component, event.nbytes, event.seconds))
    try:
        ...  # scopes
    finally:
        remove()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Listener", "MoveEvent", "add_listener", "emit", "listening"]

log = logging.getLogger("ondevice")


@dataclass(frozen=True)
class MoveEvent:
    """One move of one component's weights from ``source`` to ``target``.

    Args:
        component: ``repr`` of the part that moved (``ModulePart(Linear)``, ``PatcherPart(BaseModel)``).
        source: where most of the weights were before the move (``target`` itself when they were
            there already, as for a swap of patches on the device).
        target: where the move put them (the CPU for an offload).
        nbytes: bytes of the weights on ``target`` after the move, each storage once (a dynamic-VRAM
            patcher's weights stay CPU tensors: its loads count 0).
        seconds: wall time of the move, the target device synchronized.
        pinned: whether the host side was pinned memory (``False`` for pageable copies).
        stream: the side stream that copied, or ``None`` for the default stream.
        path: how the part moved its weights (``"module.to"``, ``"zero-copy"``, ``"comfyui"``, ...).
        copied: bytes the move copied between devices, where the part counts them (a zero-copy
            offload copies only what changed on the device); ``None`` where it does not.
        reason: why the move took a slower path than the part's fast one (pageable copies past the
            pinned-memory cap, ComfyUI's own path for a dynamic-VRAM patcher, ...), or ``None``.
    """

    component: str
    source: torch.device
    target: torch.device
    nbytes: int
    seconds: float
    pinned: bool
    stream: str | None
    path: str
    copied: int | None = None
    reason: str | None = None


Listener = Callable[[MoveEvent], object]

_lock = threading.Lock()
_listeners: tuple[tuple[object, Listener], ...] = ()  # (token, listener); replaced, never mutated: emit reads it


def add_listener(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event)`` for every move from now on; returns a function that removes it (idempotent).

    Adding one function twice calls it twice; each remove function removes its own addition.
    """
    global _listeners  # noqa: PLW0603  (the registry is this module's state)
    token = object()
    with _lock:
        _listeners = (*_listeners, (token, listener))

    def remove() -> None:
        global _listeners  # noqa: PLW0603
        with _lock:
            _listeners = tuple(entry for entry in _listeners if entry[0] is not token)

    return remove


def listening() -> bool:
    """Whether any listener is registered (movers skip measuring when none is)."""
    return bool(_listeners)


def emit(event: MoveEvent) -> None:
    """Give ``event`` to every listener; one that raises is logged and the others still run."""
    for _, listener in _listeners:
        try:
            listener(event)
        except Exception:
            log.exception("ondevice: a move listener raised on %s; the move itself succeeded", event)
