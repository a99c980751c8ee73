"""Scopes: ``on_gpu`` and ``gpu_scoped`` decide *when* components are on the GPU; ``prefetch`` starts them early.

Entering a scope acquires every component's parts from the residency table
(loading what is not yet held); leaving it releases them (offloading what no
other live scope holds), always: on return, exception, ``KeyboardInterrupt``
or generator close.  The user's exception propagates unchanged; a failure to
offload while one propagates is logged and attached to it as a note, except a
``KeyboardInterrupt`` or ``SystemExit``, which is raised with the user's
exception as its ``__context__``.

A scope on components that are held already costs a few microseconds: it
trusts the residency table and looks at no tensor (``scope.ensure()`` loads
back what something evicted behind ondevice's back; entries and exits that
move weights do it too).  :func:`prefetch` and ``on_gpu(a, prefetch=b)`` start
copying weights without waiting for the copies; the next scope on them adopts
them (see :class:`Prefetch`).

When device memory allocated inside a scope is still held after its outermost
exit (nothing else held on that device before or after), a
:class:`DeviceMemoryRetainedWarning` says how much, once per ``with``
statement or decorated function.  The memory before the entry is read under
the table's lock right before the entry's first claim, and the memory after
the exit under it too, so no move of another thread runs in between.

Thread semantics: an ``on_gpu`` object may be entered from several threads
and re-entered; each exit releases the entry it closes, whatever thread runs
it (a generator may be resumed, closed or collected on another thread).
Decorated functions get a fresh scope per call, so recursion and threads
share nothing.  Entries of different threads run at the same time: loads and
offloads happen outside the table's lock, so a thread entering a scope on
other weights never waits for another thread's move, and one entering a
scope on weights another thread is moving waits for that move (see
:mod:`ondevice.residency`).
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
from ondevice.devices import CPU
from ondevice.errors import InvalidArgumentError, InvalidDeviceError, NoStrategyError
from ondevice.residency import Claim, Holding, table
from ondevice.strategies import Part, has_strategy, parts_of, strategy_for

__all__ = [
    "RETAINED_WARNING_BYTES",
    "DeviceMemoryRetainedWarning",
    "Prefetch",
    "ScopeHandle",
    "gpu_scoped",
    "on_gpu",
    "prefetch",
]

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
    """What ``with on_gpu(...) as scope`` gives: the target device, the components, and what ``prefetch=`` started."""

    device: torch.device
    components: tuple[Any, ...]
    prefetched: Prefetch | None = None

    def ensure(self) -> None:
        """Load back anything that live scopes hold and that was evicted since.

        A scope entered on weights that are held already trusts the table and checks no tensor;
        an entry or exit that moves something, and this call, find evicted weights and load them back.
        """
        table.restore()


class Prefetch:
    """What :func:`prefetch` gives: the weights whose copies to ``device`` it started, until a scope claims them.

    The weights stay on the device until a scope on them exits (the first scope that claims them
    adopts them: no load) or until :meth:`cancel`; a ``Prefetch`` used as a context manager cancels at
    exit.  ``ondevice.offload(component)`` cancels a prefetch of that component too.

    Thread semantics: :meth:`cancel` may be called from any thread, any number of times.
    """

    def __init__(self, device: torch.device, components: tuple[Any, ...], holdings: list[Holding]) -> None:
        self.device = device
        self.components = components
        self._holdings = holdings

    @property
    def pending(self) -> bool:
        """Whether some of the weights it started copying are still on the device with no scope claiming them."""
        return any(holding.prefetched for holding in self._holdings)

    def cancel(self) -> None:
        """Offload what no scope has claimed yet; what a scope claimed stays until that scope exits."""
        first: BaseException | None = None
        for holding in reversed(self._holdings):
            try:
                table.cancel(holding)
            except BaseException as exc:  # noqa: BLE001  (every holding is cancelled; the first error is raised)
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.cancel()
        return False

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self.components)
        return f"Prefetch({names}, device={str(self.device)!r}, pending={self.pending})"


def prefetch(*components: Any, device: devices.DeviceLike = None) -> Prefetch:
    """Start copying ``components``' weights to the GPU without waiting for the copies; the next scope adopts them.

    The copies run on a side stream (where the component's part supports it; else it loads at once),
    so work queued meanwhile overlaps them.  A later ``with on_gpu(component)`` finds the weights on the
    device: it makes its stream wait for the copies (``Part.join``) and loads nothing.  Weights a scope
    holds already are left as they are; weights held on another device raise
    :class:`~ondevice.errors.ResidencyConflictError`; a failed prefetch leaves everything on the CPU and
    raises.  Prefetched weights stay on the device (ComfyUI's memory management keeps them) until a
    scope on them exits, or :meth:`Prefetch.cancel` (or ``ondevice.offload``)::

        ahead = ondevice.prefetch(vae)
        ...  # sampling runs while the VAE's weights copy
        with on_gpu(vae):  # no load: waits for the copies only
            image = vae.decode(latent)

    Thread semantics: like a scope's entry; the handle may be cancelled from any thread.
    """
    target = devices.resolve(device)
    parts = _collect_parts(components, "prefetch argument")
    return Prefetch(target, components, table.prefetch(parts, target))


class _Entry:
    """One entry into a scope: acquires on ``__enter__``, releases what it acquired on ``__exit__``.

    Its claims live on the object, not on a thread, so a decorated generator
    may be finished or closed on another thread than the one that started it.
    """

    def __init__(
        self, components: tuple[Any, ...], device: devices.DeviceLike, site: _Site, ahead: tuple[Any, ...] = ()
    ) -> None:
        self._components = components
        self._device = device
        self._site = site
        self._ahead = ahead  # what prefetch= names: started once this entry's loads are done
        self._claims: list[Claim] | None = None
        self._baseline: tuple[torch.device, int] | None = None
        self._target = CPU

    def __enter__(self) -> ScopeHandle:
        device = self._target = devices.resolve(self._device)
        parts = _collect_parts(self._components)  # every error is raised before anything moves
        ahead = _collect_parts(self._ahead, "prefetch argument") if self._ahead else None
        # the baseline is read under the table's lock right before the first claim: no move starts in between
        self._claims = table.acquire(parts, device, before=self._take_baseline if _grad_recording() else None)
        if ahead is None:
            return ScopeHandle(device, self._components)
        try:
            started = table.prefetch(ahead, device)  # its copies overlap this entry's block
        except BaseException as exc:
            claims, self._claims = self._claims, None
            _release_beside(claims, exc)  # the with statement will not call __exit__: hold nothing
            raise
        return ScopeHandle(device, self._components, Prefetch(device, self._ahead, started))

    def _take_baseline(self) -> None:
        self._baseline = _baseline(self._target)

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
        with table.lock:  # no move starts meanwhile: a move's holding is recorded under this lock before it runs
            now = None if table.holds_on(device) else _allocated(device)
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
    an outer one holds neither reloads nor offloads it, and looks at none of
    its tensors (it trusts the residency table: ``scope.ensure()`` loads back
    what something evicted behind ondevice's back).

    ``prefetch=b`` (a component, or a tuple or list of them) starts copying
    ``b``'s weights to the same device right after this scope's own loads,
    without waiting for the copies (see :func:`prefetch`), so they overlap the
    block; a later ``with on_gpu(b)`` adopts them.  ``scope.prefetched`` is the
    :class:`Prefetch`.  If the prefetch fails, the entry releases what it
    acquired and raises.

    Thread semantics: one object may be entered by several threads at once and
    re-entered.  An exit closes the latest live entry made from the same frame
    (a generator's frame is the same whichever thread resumes, closes or
    collects it), else the latest of the exiting thread, else the latest of
    all (``contextlib.ExitStack`` enters and exits from other frames).  As a
    decorator each call gets its own entry.  A decorated generator or async
    generator function becomes a plain function that binds its arguments and
    returns the generator; the scope is entered at its first step.
    """

    def __init__(self, *components: Any, device: devices.DeviceLike = None, prefetch: Any = None) -> None:
        self._components = components
        self._device = device
        self._ahead: tuple[Any, ...] = _ahead(prefetch)
        self._live: list[_Live] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ScopeHandle:
        caller = sys._getframe(1)  # the frame holding the with-block; only its id is kept
        entry = _Entry(self._components, self._device, _frame_site(caller), self._ahead)
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
        live = self._live
        for index in range(len(live) - 1, -1, -1):
            if live[index].frame == frame:
                return live.pop(index)
        thread = threading.get_ident()
        for index in range(len(live) - 1, -1, -1):
            if live[index].thread == thread:
                return live.pop(index)
        if live:
            return live.pop()
        msg = f"{self!r}.__exit__ without a matching __enter__: no entry of this scope is live"
        raise InvalidArgumentError(msg)

    def __call__(self, func: F) -> F:
        _check_decoratable(func, repr(self))
        site = _definition_site(func)
        signature = _signature(func)

        def make_scope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
            if signature is not None:
                _bind(func, signature, args, kwargs)  # a bad call raises before anything moves
            return _Entry(self._components, self._device, site, self._ahead)

        return _wrap(func, make_scope)

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self._components)
        ahead = ", ".join(type(c).__name__ for c in self._ahead)
        ahead = f", prefetch=({ahead})" if self._ahead else ""
        return f"on_gpu({names}, device={self._device!r}{ahead})"


def _ahead(prefetch: Any) -> tuple[Any, ...]:
    """``on_gpu(..., prefetch=)`` as a tuple of components: none, one, or a tuple or list of them."""
    if prefetch is None:
        return ()
    if isinstance(prefetch, (tuple, list)):
        return tuple(prefetch)
    return (prefetch,)


def _collect_parts(components: Iterable[Any], what: str = "on_gpu argument") -> list[Part]:
    parts: list[Part] = []
    for index, component in enumerate(components):
        try:
            parts.extend(parts_of(component))
        except Exception as exc:
            _note(exc, f"({what} {index}: {type(component).__name__})")
            raise
    return parts


def _release_beside(claims: list[Claim], exc: BaseException) -> None:
    """Release ``claims`` while ``exc`` propagates: an ordinary failure becomes a note on it, an interrupt wins."""
    try:
        table.release(claims)
    except Exception as release_error:  # noqa: BLE001  (noted on the error that propagates, as at a scope's exit)
        _attach(exc, release_error)
    except BaseException as interrupt:
        _chain(interrupt, exc)
        raise


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

    Only where autograd records at the entry (the caller checks; and later at the exit): under
    ``torch.inference_mode()`` or ``no_grad`` memory kept after the scope is ComfyUI's by design
    (``--gpu-only`` keeps outputs on the GPU) or torch's own (cuBLAS workspaces), never a graph.
    """
    if device.type == "cpu" or table.holds_on(device):
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
