"""Scopes: ``on_gpu`` and ``gpu_scoped`` decide *when* components are on the GPU.

Entering a scope acquires every component's parts from the residency table
(loading what is not yet held); leaving it releases them (offloading what no
other live scope holds), always: on return, exception, ``KeyboardInterrupt``
or generator close.  The user's exception propagates unchanged; a failure to
offload while one propagates is logged and attached to it as a note.

Thread semantics: an ``on_gpu`` object may be entered from several threads
and re-entered; each entry has its own holdings (kept per thread).  Decorated
functions get a fresh scope per call, so recursion and threads share nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import torch

from ondevice import devices
from ondevice.errors import InvalidArgumentError, NoStrategyError
from ondevice.residency import Claim, table
from ondevice.strategies import Part, has_strategy, parts_of, strategy_for

__all__ = ["ScopeHandle", "gpu_scoped", "on_gpu"]

log = logging.getLogger("ondevice")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ScopeHandle:
    """What ``with on_gpu(...) as scope`` gives: the target device and the components."""

    device: torch.device
    components: tuple[Any, ...]

    def ensure(self) -> None:
        """Load back anything that live scopes hold and that was evicted since (scopes' exits do this too)."""
        table.restore()


class _Entry:
    """One entry into a scope: acquires on ``__enter__``, releases what it acquired on ``__exit__``.

    Its claims live on the object, not on a thread, so a decorated generator
    may be finished or closed on another thread than the one that started it.
    """

    def __init__(self, components: tuple[Any, ...], device: devices.DeviceLike) -> None:
        self._components = components
        self._device = device
        self._claims: list[Claim] | None = None

    def __enter__(self) -> ScopeHandle:
        device = devices.resolve(self._device)
        parts = _collect_parts(self._components)  # every error is raised before anything moves
        self._claims = table.acquire(parts, device)
        return ScopeHandle(device=device, components=self._components)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        claims, self._claims = self._claims or [], None
        try:
            table.release(claims)
        except BaseException as release_error:
            if exc is None:
                raise
            _attach(exc, release_error)
        return False


class on_gpu:  # noqa: N801  (a context manager named like a function, as contextlib does)
    """Hold ``components`` on a GPU for a block; offload them to the CPU when it exits.

    ``device=None`` targets the GPU ComfyUI would use (a fake one from
    :mod:`ondevice.testing` while active; the CPU, with one warning, on a
    machine with none).  Building the object does no work.  Usable as a
    context manager and as a decorator::

        with on_gpu(model, vae, device="cuda:0") as scope:
            ...  # every weight of model and vae is on scope.device

    Nested scopes count per underlying weights: an inner scope on a component
    an outer one holds neither reloads nor offloads it.
    """

    def __init__(self, *components: Any, device: devices.DeviceLike = None) -> None:
        self._components = components
        self._device = device
        self._local = threading.local()

    def __enter__(self) -> ScopeHandle:
        entry = _Entry(self._components, self._device)
        handle = entry.__enter__()
        self._stack().append(entry)
        return handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return self._stack().pop().__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        return _wrap(func, lambda args, kwargs: _Entry(self._components, self._device))

    def _stack(self) -> list[_Entry]:
        stack: list[_Entry] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self._components)
        return f"on_gpu({names}, device={self._device!r})"


def _collect_parts(components: Iterable[Any]) -> list[Part]:
    parts: list[Part] = []
    for index, component in enumerate(components):
        try:
            parts.extend(parts_of(component))
        except Exception as exc:
            _note(exc, f"(on_gpu argument {index}: {type(component).__name__})")
            raise
    return parts


def _note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


def _attach(user_error: BaseException, release_error: BaseException) -> None:
    log.error("ondevice: offload failed while %r propagated", user_error, exc_info=release_error)
    _note(user_error, f"ondevice: offloading at scope exit also failed: {release_error!r}")


def _wrap(func: F, make_scope: Callable[[tuple[Any, ...], dict[str, Any]], _Entry]) -> F:
    """Wrap ``func`` so each call runs inside a fresh scope (sync, async, generator and async generator functions)."""
    if inspect.isasyncgenfunction(func):

        @functools.wraps(func)
        async def run_async_generator(*args: Any, **kwargs: Any) -> Any:
            with make_scope(args, kwargs):
                async for item in func(*args, **kwargs):
                    yield item

        return run_async_generator  # type: ignore[return-value]
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            with make_scope(args, kwargs):
                return await func(*args, **kwargs)

        return run_async  # type: ignore[return-value]
    if inspect.isgeneratorfunction(func):

        @functools.wraps(func)
        def run_generator(*args: Any, **kwargs: Any) -> Any:
            with make_scope(args, kwargs):
                return (yield from func(*args, **kwargs))

        return run_generator  # type: ignore[return-value]

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with make_scope(args, kwargs):
            return func(*args, **kwargs)

    return run  # type: ignore[return-value]


@overload
def gpu_scoped(func: F, /) -> F: ...
@overload
def gpu_scoped(*names: str, device: devices.DeviceLike = None) -> Callable[[F], F]: ...


def gpu_scoped(*args: Any, device: devices.DeviceLike = None) -> Any:
    """Decorator: each call of the function runs with some of its arguments on the GPU.

    ``@gpu_scoped`` scopes every argument that has a strategy;
    ``@gpu_scoped("vae")`` or ``@gpu_scoped("model", "clip", device="cuda:1")``
    scopes the named parameters (a ``*args`` / ``**kwargs`` parameter scopes
    each of its values).  Works on functions, methods, ``async def``,
    generator and async generator functions.  A name that is not a parameter raises at decoration.
    """
    if len(args) == 1 and callable(args[0]) and not isinstance(args[0], str):
        return _decorate(args[0], (), device)
    for name in args:
        if not isinstance(name, str):
            msg = f"gpu_scoped({name!r}): arguments name parameters and must be strings, e.g. gpu_scoped('vae')"
            raise InvalidArgumentError(msg)
    return lambda func: _decorate(func, args, device)


def _decorate(func: F, names: tuple[str, ...], device: devices.DeviceLike) -> F:
    signature = inspect.signature(func)
    unknown = [name for name in names if name not in signature.parameters]
    if unknown:
        msg = (
            f"gpu_scoped{names!r} on {func.__qualname__}{signature}: {', '.join(map(repr, unknown))} "
            f"is not a parameter; name one of {list(signature.parameters)}"
        )
        raise InvalidArgumentError(msg)

    def make_scope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if names:
            components = [_checked(func, name, c) for name in names for c in _values(signature, bound.arguments, name)]
        else:
            every = [c for name in bound.arguments for c in _values(signature, bound.arguments, name)]
            components = [c for c in every if has_strategy(c)]
        return _Entry(tuple(components), device)

    return _wrap(func, make_scope)


def _checked(func: Callable[..., Any], name: str, component: Any) -> Any:
    try:
        strategy_for(component)
    except NoStrategyError as exc:
        _note(exc, f"(gpu_scoped parameter {name!r} of {func.__qualname__})")
        raise
    return component


def _values(signature: inspect.Signature, arguments: dict[str, Any], name: str) -> list[Any]:
    value = arguments.get(name)
    kind = signature.parameters[name].kind
    if kind is inspect.Parameter.VAR_POSITIONAL:
        return list(value or ())
    if kind is inspect.Parameter.VAR_KEYWORD:
        return list((value or {}).values())
    return [value]
