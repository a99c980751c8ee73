"""``async with on_gpu(...)``'s blocking steps (an acquire that waits or loads, an exit that offloads), run on a
thread of their own while the event loop keeps running; a cancelled task gives back what its step got.

Thread semantics: each step runs on a new daemon thread, never the loop's default executor, so waiting
acquires cannot take every worker that a release needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from ondevice.residency import table

__all__ = ["off_loop"]

log = logging.getLogger("ondevice")

R = TypeVar("R")


async def off_loop(
    call: Callable[[], R], abort: threading.Event | None = None, undo: Callable[[R], None] | None = None
) -> R:
    """Run the blocking ``call`` on a thread of its own while the event loop keeps running; its result, or its error.

    A thread of its own, not the loop's default executor: waiting acquires must never take every worker
    that a release needs.  If the awaiting task is cancelled, ``abort`` is set (a waiting acquire gives
    up) and, where ``call`` got through all the same, ``undo`` gives back what it got (on a thread); the
    cancellation propagates once that is done, so a cancelled entry holds nothing.
    """
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[R] = loop.create_future()  # call's result; cancelled with the awaiting task
    finished: asyncio.Future[None] = loop.create_future()  # call is done, and any undo of it

    def settle(result: R | None, error: BaseException | None) -> None:  # on the loop's thread
        if not outcome.cancelled():
            if error is not None:
                outcome.set_exception(error)
            else:
                outcome.set_result(result)  # type: ignore[arg-type]
            finished.set_result(None)
        elif error is None and undo is not None:  # the task gave up before the result came: give it back
            _on_thread(loop, functools.partial(undo, result), finished)  # type: ignore[arg-type]
        else:
            finished.set_result(None)

    def run() -> None:
        result: R | None = None
        error: BaseException | None = None
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting task)
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody takes the result
            if error is None and undo is not None:
                undo(result)  # type: ignore[arg-type]

    threading.Thread(target=run, name="ondevice-wait", daemon=True).start()
    try:
        return await outcome
    except asyncio.CancelledError:
        if abort is not None:
            abort.set()
            table.wake()  # a waiting acquire sees abort now
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: what it got is still given back
            await asyncio.shield(finished)
        if outcome.done() and not outcome.cancelled() and outcome.exception() is None and undo is not None:
            undone: asyncio.Future[None] = loop.create_future()  # it got through just before the cancellation
            _on_thread(loop, functools.partial(undo, outcome.result()), undone)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(undone)
        raise


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _on_thread(loop: asyncio.AbstractEventLoop, step: Callable[[], object], done: asyncio.Future[None]) -> None:
    """Run ``step`` on a new thread; ``done`` gets its outcome (errors are logged: nobody awaits them)."""

    def run() -> None:
        try:
            step()
        except BaseException:  # noqa: BLE001  (a give-back nobody awaits: logged)
            log.exception("ondevice: giving back what a cancelled entry acquired failed")
        loop.call_soon_threadsafe(_resolve, done)

    threading.Thread(target=run, name="ondevice-undo", daemon=True).start()
