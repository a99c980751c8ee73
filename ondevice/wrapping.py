"""Decorating functions with a scope: each call of a sync, async, generator or async generator function runs
inside a fresh scope (``@on_gpu(...)`` and ``@gpu_scoped``), and the checks made at decoration and at the call.

``make_scope(args, kwargs)`` builds the scope of one call (a context manager that is also an async one); it
may raise, before anything moves, for a bad call.  Thread semantics: every call gets its own scope.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any, TypeVar

from ondevice.errors import InvalidArgumentError
from ondevice.strategies import has_strategy

__all__ = ["bind", "check_decoratable", "qualname", "signature_of", "wrap"]

F = TypeVar("F", bound=Callable[..., Any])


def qualname(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or type(func).__qualname__)


def check_decoratable(func: object, decorator: str, *, component_hint: bool = False) -> None:
    if inspect.isclass(func):
        msg = (
            f"{decorator} on class {func.__qualname__}: decorate a function or a method "
            "(for a ComfyUI node, the method its FUNCTION names), not a class"
        )
        raise InvalidArgumentError(msg)
    if component_hint and has_strategy(func):
        msg = (
            f"{decorator} got a {type(func).__name__}, which is a component, not a function: to hold it on "
            "the GPU use `with on_gpu(component):` or `@on_gpu(component)`"
        )
        raise InvalidArgumentError(msg)
    if not callable(func):
        msg = f"{decorator} decorates functions and methods; got {func!r}"
        raise InvalidArgumentError(msg)


def signature_of(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have none; the call itself checks its arguments
        return None


def bind(
    func: Callable[..., Any], signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> inspect.BoundArguments:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        msg = f"{qualname(func)}(): {exc}"
        raise TypeError(msg) from None


def wrap(func: F, make_scope: Callable[[tuple[Any, ...], dict[str, Any]], Any]) -> F:
    """Wrap ``func`` so each call runs inside a fresh scope (sync, async, generator and async generator functions).

    A generator or async generator function becomes a plain function: the call
    binds the arguments (a bad call raises there) and returns the generator.
    """
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        def start_async_generator(*args: Any, **kwargs: Any) -> Any:
            entry = make_scope(args, kwargs)
            return _scoped_async_generator(entry, func(*args, **kwargs))

        return start_async_generator  # type: ignore[return-value]
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:  # stays `async def` for iscoroutinefunction
            async with make_scope(args, kwargs):
                return await func(*args, **kwargs)

        return run_async  # type: ignore[return-value]
    if inspect.isgeneratorfunction(func):

        @functools.wraps(func)
        def start_generator(*args: Any, **kwargs: Any) -> Any:
            entry = make_scope(args, kwargs)
            return _scoped_generator(entry, func(*args, **kwargs))

        return start_generator  # type: ignore[return-value]

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with make_scope(args, kwargs):
            return func(*args, **kwargs)

    return run  # type: ignore[return-value]


def _scoped_generator(entry: Any, generator: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    with entry:
        return (yield from generator)


async def _scoped_async_generator(entry: Any, agen: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, Any]:
    """Run ``agen`` inside ``entry``, forwarding asend / athrow / aclose as ``yield from`` does (PEP 380)."""
    async with entry:
        try:
            item = await agen.__anext__()
        except StopAsyncIteration:
            return
        while True:
            step: Awaitable[Any]
            try:
                sent = yield item
            except GeneratorExit:
                await agen.aclose()  # the body's finally runs before the weights leave the device
                raise
            except BaseException as exc:  # noqa: BLE001  (forwarded into the body, which may handle it)
                step = agen.athrow(exc)
            else:
                step = agen.asend(sent)
            try:
                item = await step
            except StopAsyncIteration:
                return
