"""Scopes: ``on_gpu`` and ``gpu_scoped`` decide *when* components are on the GPU.

Entering a scope acquires every component's parts from the residency table
(loading what is not yet held); leaving it releases them (offloading what no
other live scope holds), always: on return, exception, ``KeyboardInterrupt``
or generator close.  The user's exception propagates unchanged; a failure to
offload while one propagates is logged and attached to it as a note, except a
``KeyboardInterrupt`` or ``SystemExit``, which is raised with the user's
exception as its ``__context__``.

When device memory allocated inside a scope is still held after its outermost
exit (nothing else held on that device before or after), a
:class:`DeviceMemoryRetainedWarning` says how much, once per ``with``
statement or decorated function.

Thread semantics: an ``on_gpu`` object may be entered from several threads
and re-entered; each exit releases the entry it closes, whatever thread runs
it (a generator may be resumed, closed or collected on another thread).
Decorated functions get a fresh scope per call, so recursion and threads share nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch

from ondevice import devices
from ondevice.errors import InvalidArgumentError, InvalidDeviceError, NoStrategyError
from ondevice.residency import Claim, table
from ondevice.strategies import Part, has_strategy, parts_of, strategy_for

__all__ = ["RETAINED_WARNING_BYTES", "DeviceMemoryRetainedWarning", "ScopeHandle", "gpu_scoped", "on_gpu"]

log = logging.getLogger("ondevice")

F = TypeVar("F", bound=Callable[..., Any])

RETAINED_WARNING_BYTES = 2**20
"""Memory still held on a device after a scope's outermost exit warns above this many bytes.

Small enough to catch an autograd graph; above ComfyUI's own small caches."""


class DeviceMemoryRetainedWarning(RuntimeWarning):
    """Device memory allocated inside a scope is still held after its outermost exit.

    A ``RuntimeWarning``, not a ``ResourceWarning``: Python hides those by default.
    """


class _Site(NamedTuple):
    """Where a scope is entered (a ``with`` statement) or defined (a decorated function), for its warning."""

    filename: str
    line: int
    module: str


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

    def __init__(self, components: tuple[Any, ...], device: devices.DeviceLike, site: _Site) -> None:
        self._components = components
        self._device = device
        self._site = site
        self._claims: list[Claim] | None = None
        self._baseline: tuple[torch.device, int] | None = None

    def __enter__(self) -> ScopeHandle:
        device = devices.resolve(self._device)
        parts = _collect_parts(self._components)  # every error is raised before anything moves
        try:
            with table.lock:  # no other scope enters between the baseline and the acquire
                self._baseline = _baseline(device)
                self._claims = table.acquire(parts, device)
        except BaseException:  # a move listener interrupted (events reach them as the lock is released)
            claims, self._claims = self._claims or [], None
            table.release(claims)  # the with statement will not call __exit__: hold nothing
            raise
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
        except Exception as release_error:
            if exc is None:
                raise
            _attach(exc, release_error)
        except BaseException as interrupt:  # KeyboardInterrupt, SystemExit: never reduced to a note
            if exc is not None:
                _chain(interrupt, exc)
            raise
        else:
            if exc is None:  # a propagating exception's traceback still holds the block's tensors
                self._check_retained()
        return False

    def _check_retained(self) -> None:
        if self._baseline is None or not _grad_recording():
            return
        device, before = self._baseline
        with table.lock:
            now = None if _holds(device) else _allocated(device)
        if now is not None and now - before > RETAINED_WARNING_BYTES:
            _warn_retained(now - before, device, self._site)


class _Live(NamedTuple):
    """A live entry of an ``on_gpu`` object, with the frame (by id) and the thread that entered it."""

    entry: _Entry
    frame: int
    thread: int


class on_gpu:  # noqa: N801  (a context manager named like a function, as contextlib does)
    """Hold ``components`` on a GPU for a block; offload them to the CPU when it exits.

    ``device=None`` targets the GPU ComfyUI would use (a fake one from
    :mod:`ondevice.testing` while active; the CPU, with one warning, on a
    machine with none).  Building the object does no work.  Usable as a
    context manager and as a decorator::

        with on_gpu(model, vae, device="cuda:0") as scope, torch.inference_mode():
            ...  # every weight of model and vae is on scope.device

    Nested scopes count per underlying weights: an inner scope on a component
    an outer one holds neither reloads nor offloads it.

    Thread semantics: one object may be entered by several threads at once and
    re-entered.  An exit closes the latest live entry made from the same frame
    (a generator's frame is the same whichever thread resumes, closes or
    collects it), else the latest of the exiting thread, else the latest of
    all (``contextlib.ExitStack`` enters and exits from other frames).  As a
    decorator each call gets its own entry.  A decorated generator or async
    generator function becomes a plain function that binds its arguments and
    returns the generator; the scope is entered at its first step.
    """

    def __init__(self, *components: Any, device: devices.DeviceLike = None) -> None:
        self._components = components
        self._device = device
        self._live: list[_Live] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ScopeHandle:
        caller = sys._getframe(1)  # the frame holding the with-block; only its id is kept
        entry = _Entry(self._components, self._device, _frame_site(caller))
        handle = entry.__enter__()
        with self._lock:
            self._live.append(_Live(entry, id(caller), threading.get_ident()))
        return handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        with self._lock:
            live = self._take(id(sys._getframe(1)))
        return live.entry.__exit__(exc_type, exc, tb)

    def _take(self, frame: int) -> _Live:
        # Entries of one object hold the same components, so a wrong pick (a frame id reused after
        # an ExitStack's enter) still releases the same weights; only which entry warns may differ.
        thread = threading.get_ident()
        for matches in (lambda e: e.frame == frame, lambda e: e.thread == thread, lambda e: True):
            for index in reversed(range(len(self._live))):
                if matches(self._live[index]):
                    return self._live.pop(index)
        msg = f"{self!r}.__exit__ without a matching __enter__: no entry of this scope is live"
        raise InvalidArgumentError(msg)

    def __call__(self, func: F) -> F:
        _check_decoratable(func, repr(self))
        site = _definition_site(func)
        signature = _signature(func)

        def make_scope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
            if signature is not None:
                _bind(func, signature, args, kwargs)  # a bad call raises before anything moves
            return _Entry(self._components, self._device, site)

        return _wrap(func, make_scope)

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


def _chain(error: BaseException, user_error: BaseException) -> None:
    """Put ``user_error`` at the end of ``error``'s context chain, as a nested ``with`` would (cf. ExitStack)."""
    last = error
    while last.__context__ is not None:
        if last.__context__ is user_error:
            return
        last = last.__context__
    if last is not user_error:
        last.__context__ = user_error


# ---------------------------------------------------------------------- device memory left behind


def _holds(device: torch.device) -> bool:
    return any(holding.device == device for holding in table.held())


_kept_elsewhere: list[Callable[[torch.device], int]] = []


def count_kept_elsewhere(counter: Callable[[torch.device], int]) -> None:
    """Have the retained-memory check leave out the bytes ``counter(device)`` says another owner keeps there.

    ComfyUI's strategies register the weights of the models ComfyUI itself keeps loaded: a
    ``vae.decode`` inside ``on_gpu(model)`` loads the VAE, and ComfyUI keeps it after the scope.
    """
    if counter not in _kept_elsewhere:
        _kept_elsewhere.append(counter)


def _allocated(device: torch.device) -> int | None:
    """Bytes allocated on ``device`` that no known owner keeps (None where torch cannot tell)."""
    try:
        allocated = devices.memory_allocated(device)
    except InvalidDeviceError:  # torch cannot report this device's memory (or its backend is gone)
        return None
    return allocated - sum(counter(device) for counter in _kept_elsewhere)


def _grad_recording() -> bool:
    """Whether autograd records here: the only cause the retained-memory warning names."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _baseline(device: torch.device) -> tuple[torch.device, int] | None:
    """Device memory allocated now, if an entry made now is outermost on ``device`` (else None: no check).

    Only where autograd records at the entry (and, checked later, at the exit): under
    ``torch.inference_mode()`` or ``no_grad`` memory kept after the scope is ComfyUI's by design
    (``--gpu-only`` keeps outputs on the GPU) or torch's own (cuBLAS workspaces), never a graph.
    """
    if device.type == "cpu" or _holds(device) or not _grad_recording():
        return None
    now = _allocated(device)
    return None if now is None else (device, now)


_warned_sites: set[_Site] = set()
_warned_lock = threading.Lock()


def _warn_retained(nbytes: int, device: torch.device, site: _Site) -> None:
    with _warned_lock:
        if site in _warned_sites:
            return
        _warned_sites.add(site)
    msg = (
        f"ondevice: {nbytes} bytes ({nbytes / 2**20:.1f} MiB) allocated on {device} inside this scope are still "
        "held after it exited, while no scope holds anything there. Likely cause: a result computed with "
        "gradients enabled keeps its autograd graph (activations and weights as they were on the device) alive; "
        "run ComfyUI calls under torch.inference_mode(), as ComfyUI's executor does, or drop device tensors "
        "before the scope exits. (Warned once per scope.)"
    )
    warnings.warn_explicit(msg, DeviceMemoryRetainedWarning, site.filename, site.line, module=site.module)


def _frame_site(frame: FrameType) -> _Site:
    return _Site(frame.f_code.co_filename, frame.f_lineno, str(frame.f_globals.get("__name__", "")))


def _definition_site(func: Callable[..., Any]) -> _Site:
    code = getattr(inspect.unwrap(func), "__code__", None)
    module = str(getattr(func, "__module__", None) or "")
    if code is None:
        return _Site(_qualname(func), 0, module)
    return _Site(code.co_filename, code.co_firstlineno, module)


# ---------------------------------------------------------------------- decorating


def _qualname(func: object) -> str:
    return str(getattr(func, "__qualname__", None) or type(func).__qualname__)


def _check_decoratable(func: object, decorator: str, *, component_hint: bool = False) -> None:
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


def _signature(func: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have none; the call itself checks its arguments
        return None


def _bind(
    func: Callable[..., Any], signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> inspect.BoundArguments:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as exc:
        msg = f"{_qualname(func)}(): {exc}"
        raise TypeError(msg) from None


def _wrap(func: F, make_scope: Callable[[tuple[Any, ...], dict[str, Any]], _Entry]) -> F:
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
            with make_scope(args, kwargs):
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


def _scoped_generator(entry: _Entry, generator: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    with entry:
        return (yield from generator)


async def _scoped_async_generator(entry: _Entry, agen: AsyncGenerator[Any, Any]) -> AsyncGenerator[Any, Any]:
    """Run ``agen`` inside ``entry``, forwarding asend / athrow / aclose as ``yield from`` does (PEP 380)."""
    with entry:
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
    generator and async generator functions; a decorated generator or async
    generator function is a plain function that binds its arguments at the
    call (a bad call raises ``TypeError`` there, naming the function) and
    returns a generator whose scope is entered at its first step.  A name that
    is not a parameter, a class, or a component (meant ``on_gpu``) raises
    :class:`~ondevice.errors.InvalidArgumentError` at decoration.

    Thread semantics: every call gets its own scope, so threads and recursion share nothing.
    """
    if len(args) == 1 and callable(args[0]):
        return _decorate(args[0], (), device)
    for name in args:
        if not isinstance(name, str):
            hint = " (to hold a component on the GPU use on_gpu(component))" if has_strategy(name) else ""
            msg = f"gpu_scoped({name!r}): arguments name parameters and must be strings, e.g. gpu_scoped('vae'){hint}"
            raise InvalidArgumentError(msg)
    return lambda func: _decorate(func, args, device)


def _decorate(func: F, names: tuple[str, ...], device: devices.DeviceLike) -> F:
    _check_decoratable(func, f"gpu_scoped{names!r}" if names else "gpu_scoped", component_hint=True)
    signature = inspect.signature(func)
    unknown = [name for name in names if name not in signature.parameters]
    if unknown:
        msg = (
            f"gpu_scoped{names!r} on {func.__qualname__}{signature}: {', '.join(map(repr, unknown))} "
            f"is not a parameter; name one of {list(signature.parameters)}"
        )
        raise InvalidArgumentError(msg)
    site = _definition_site(func)

    def make_scope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
        bound = _bind(func, signature, args, kwargs)
        bound.apply_defaults()
        if names:
            components = [_checked(func, name, c) for name in names for c in _values(signature, bound.arguments, name)]
        else:
            every = [c for name in bound.arguments for c in _values(signature, bound.arguments, name)]
            components = [c for c in every if has_strategy(c)]
        return _Entry(tuple(components), device, site)

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
