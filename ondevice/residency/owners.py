"""Who entered a claim (:class:`Owner`): a thread and, inside a running event loop, the asyncio task.

Within one owner scopes nest; owners that run beside each other (other live threads, other tasks
of one event loop) never swap weights under each other (:mod:`ondevice.residency.patches`).  A
thread (or task) that has ended runs beside nobody: a generator it left suspended inside a scope
continues that scope, as a nested one, wherever it is resumed.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

__all__ = ["Owner"]


@dataclass(frozen=True)
class Owner:
    """Who entered a claim: a thread and, inside a running event loop, the asyncio task."""

    thread: int
    task: object = None
    name: str = field(default="", compare=False)
    handle: threading.Thread | None = field(default=None, compare=False, repr=False)

    @classmethod
    def current(cls) -> Owner:
        """The calling thread and its running asyncio task, if any."""
        loop = asyncio._get_running_loop()  # None outside a running loop (asyncio.current_task would raise)
        task = None if loop is None else asyncio.current_task(loop)
        if task is None:
            owner: Owner | None = getattr(_thread_owner, "owner", None)
            if owner is None:
                thread = threading.current_thread()
                owner = _thread_owner.owner = cls(threading.get_ident(), None, f"thread {thread.name!r}", thread)
            return owner
        thread = threading.current_thread()
        name = f"thread {thread.name!r} (asyncio task {task.get_name()!r})"
        return cls(threading.get_ident(), task, name, thread)

    def finished(self) -> bool:
        """Whether this thread (or task) has ended: a scope it left open (a suspended generator) runs no more here."""
        if self.handle is not None and not self.handle.is_alive():
            return True
        done = getattr(self.task, "done", None)
        return bool(done()) if callable(done) else False

    def runs_beside(self, other: Owner) -> bool:
        """Whether code of the two may interleave: other live threads, or other tasks of one event loop.

        An owner that has ended runs beside nobody: whoever resumes a generator it left suspended
        inside a scope continues that scope, as a nested one.
        """
        if self.thread == other.thread and (self.task is None or other.task is None or self.task is other.task):
            return False  # one thread, and the same task or code enclosing every task of its loop
        return not (other.finished() or self.finished())


_thread_owner = threading.local()  # .owner: the calling thread's Owner outside any asyncio task (built once)
