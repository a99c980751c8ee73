"""Running test workers on threads: start them all, join each with a timeout, fail on one still alive (a deadlock)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


def run_threads(target: Callable[..., object], args: Iterable[tuple[object, ...]], timeout: float = 120) -> None:
    """Run ``target(*a)`` for each ``a`` of ``args`` on its own thread, all at once; fail if one is stuck."""
    threads = [threading.Thread(target=target, args=a) for a in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread is stuck (deadlock?)"
