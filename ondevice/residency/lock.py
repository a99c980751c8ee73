"""The table's lock (:class:`TableLock`): re-entrant; move events of a caller that holds it wait for its release.

Move events reach listeners on the moving thread once the move's state is recorded, never while
that thread holds the lock (held by the caller, they are delivered as its outermost hold ends),
so listeners may enter scopes.
"""

from __future__ import annotations

import threading

from ondevice import events
from ondevice.events import MoveEvent

__all__ = ["TableLock"]


class TableLock:
    """The table's re-entrant lock; events of moves made while a caller holds it wait until its outermost hold ends.

    Used like ``threading.RLock`` (``with table.lock:``); ``rlock`` is the lock itself (for a ``Condition``).
    The table takes ``rlock`` directly, so the depth counted here is what callers outside the table hold.
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

    def deliver(self, event: MoveEvent | None) -> None:
        """Give ``event`` to listeners now, or once this thread's outermost hold ends if it holds the lock."""
        if event is None:
            return
        if getattr(self._local, "depth", 0) == 0:
            events.emit(event)
            return
        pending = getattr(self._local, "pending", None)
        if pending is None:
            pending = self._local.pending = []
        pending.append(event)
