"""Scopes: ``on_gpu`` and ``gpu_scoped`` decide *when* components are on the GPU; ``prefetch`` starts them early;
``keep`` / ``release`` leave them there between scopes.

Entering a scope acquires every component's parts from the residency table,
all or none (loading what is not yet held, within the device's memory: see
:mod:`ondevice.residency` for eviction, ``wait=``, ``timeout=``, ``budget=``
and ``partial=``); leaving it releases them (offloading what no other live
scope holds and nobody keeps), always: on return, exception,
``KeyboardInterrupt`` or generator close.  The user's exception propagates
unchanged; a failure to offload while one propagates is logged and attached
to it as a note (the offload error's ``__context__`` is the user's error), and
the other components are still offloaded; a ``KeyboardInterrupt`` or
``SystemExit`` while releasing is raised with the user's exception as its
``__context__``.  A load that runs out of device memory puts back everything
the entry moved and raises :class:`~ondevice.errors.OutOfDeviceMemory`.

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
:mod:`ondevice.residency`).  ``async with on_gpu(...)`` (and a decorated
``async def`` or async generator) holds the components for the calling
asyncio task: an entry on held weights runs on the event loop; one that must
wait or load, and an exit that offloads, runs on a thread of its own, so the
loop keeps running; a task cancelled while it waits holds nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, overload

import torch

from ondevice import devices
from ondevice.devices import CPU
from ondevice.errors import InvalidArgumentError, InvalidDeviceError, NoStrategyError
from ondevice.off_loop import off_loop
from ondevice.residency import Claim, Holding, Owner, WouldBlock, table
from ondevice.strategies import Part, has_strategy, parts_of, strategy_for
from ondevice.wrapping import bind, check_decoratable, qualname, signature_of, wrap

__all__ = [
    "RETAINED_WARNING_BYTES",
    "DeviceMemoryRetainedWarning",
    "Prefetch",
    "ScopeHandle",
    "gpu_scoped",
    "keep",
    "on_gpu",
    "prefetch",
    "release",
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


class _Options(NamedTuple):
    """How a scope acquires its components (``on_gpu``'s keywords besides ``device`` and ``prefetch``), checked."""

    wait: bool = False
    timeout: float | None = None
    budget: int | None = None
    partial: bool = False
    keep: bool = False


_NO_OPTIONS = _Options()


def _options(  # noqa: PLR0913  (one keyword each, as the public functions take them)
    what: str, *, keep: Any = False, wait: Any = False, timeout: Any = None, budget: Any = None, partial: Any = False
) -> _Options:
    """The scope keywords, checked before anything moves (InvalidArgumentError naming the bad one and the fix)."""
    for name, value in (("keep", keep), ("wait", wait), ("partial", partial)):
        if not isinstance(value, bool):
            msg = f"{what}({name}={value!r}): {name} is True or False"
            raise InvalidArgumentError(msg)
    if timeout is not None:
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if not number or math.isnan(timeout) or timeout < 0:
            msg = f"{what}(timeout={timeout!r}): pass a number of seconds >= 0 (with wait=True), or None for no limit"
            raise InvalidArgumentError(msg)
        if not wait:
            msg = (
                f"{what}(timeout={timeout!r}) without wait=True: the timeout bounds a wait for device memory; "
                "pass wait=True with it, or leave timeout out to fail at once when it does not fit"
            )
            raise InvalidArgumentError(msg)
    nbytes = None if budget is None else _budget_bytes(what, budget)
    return _Options(wait, None if timeout is None else float(timeout), nbytes, partial, keep)


def _budget_bytes(what: str, budget: Any) -> int:
    """Bytes from ``budget``: a positive int, or a size like ``"6GiB"``, ``"512MiB"``, ``"1.5GiB"``, ``"8GB"``."""
    nbytes = devices.parse_size(budget)
    if nbytes is None or nbytes <= 0:
        msg = (
            f"{what}(budget={budget!r}): pass the most device memory the scope may take, as a positive int of bytes "
            f"or {devices.SIZE_HINT}"
        )
        raise InvalidArgumentError(msg)
    return nbytes


def _describe(options: _Options) -> str:
    """The keywords that differ from the defaults, for a repr: ``", wait=True, budget=6442450944"``."""
    return "".join(
        f", {name}={value!r}" for name, value in options._asdict().items() if value != getattr(_NO_OPTIONS, name)
    )


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


def keep(*components: Any, device: devices.DeviceLike = None, wait: bool = False, timeout: float | None = None) -> None:
    """Load ``components`` (where they are not on the device yet) and keep them there after every scope exits.

    Kept components stay on the device, held by no scope, until their memory is
    needed: a scope that does not fit evicts kept (and prefetched) components,
    least recently used first.  A later ``with on_gpu(component)`` on the same
    device finds them loaded and moves nothing; on another device it moves them
    there.  :func:`release` ends the keep.  ``wait`` and ``timeout`` work as for
    :class:`on_gpu` when they do not fit::

        ondevice.keep(text_encoder)          # loaded once, for many prompts
        for prompt in prompts:
            with on_gpu(text_encoder):       # nothing moves
                ...
        ondevice.release(text_encoder)       # offloaded now

    Thread semantics: like a scope's entry; a keep is not owned by a thread, any thread may release it.
    """
    options = _options("keep", keep=True, wait=wait, timeout=timeout)
    target = devices.resolve(device)
    parts = _collect_parts(components, "keep argument")
    claims = table.acquire(parts, target, **options._asdict())
    table.release(claims)  # kept: the weights stay


def release(*components: Any) -> None:
    """End the keep of ``components`` (:func:`keep`, ``on_gpu(..., keep=True)``): offload them now.

    A component a live scope holds stays until that scope (the last one on it)
    exits, then goes.  Components that are not kept are left as they are.

    Thread semantics: any thread; waits for a move of the same weights in flight.
    """
    table.end_keep(_collect_parts(components, "release argument"))


class _Entry:
    """One entry into a scope: acquires on ``__enter__``, releases what it acquired on ``__exit__``.

    Its claims live on the object, not on a thread, so a decorated generator
    may be finished or closed on another thread than the one that started it.
    ``__aenter__`` / ``__aexit__`` make the claims the calling asyncio task's, and
    run an acquire or a release that must wait or move weights on a thread of its
    own, so the event loop keeps running.
    """

    def __init__(
        self,
        components: tuple[Any, ...],
        device: devices.DeviceLike,
        site: _Site,
        ahead: tuple[Any, ...] = (),
        options: _Options = _NO_OPTIONS,
    ) -> None:
        self._components = components
        self._device = device
        self._site = site
        self._ahead = ahead  # what prefetch= names: started once this entry's loads are done
        self._options = options
        self._claims: list[Claim] | None = None
        self._baseline: tuple[torch.device, int] | None = None
        self._target = CPU

    def __enter__(self) -> ScopeHandle:
        if self._ahead or self._options is not _NO_OPTIONS:
            parts, ahead = self._prepare()
            return self._acquire(parts, ahead, Owner.current(), recording=_grad_recording())
        device = self._target = devices.resolve(self._device)  # the common case, written out: the hot path
        parts = _collect_parts(self._components)  # every error is raised before anything moves
        # the baseline is read under the table's lock right before the first claim: no move starts in between
        self._claims = table.acquire(parts, device, before=self._take_baseline if _grad_recording() else None)
        return ScopeHandle(device, self._components)

    def _prepare(self) -> tuple[list[Part], list[Part] | None]:
        """Resolve the device and the parts: every error is raised here, before anything moves."""
        self._target = devices.resolve(self._device)
        parts = _collect_parts(self._components)
        ahead = _collect_parts(self._ahead, "prefetch argument") if self._ahead else None
        return parts, ahead

    def _acquire(
        self,
        parts: list[Part],
        ahead: list[Part] | None,
        owner: Owner,
        *,
        recording: bool,
        block: bool = True,
        abort: threading.Event | None = None,
    ) -> ScopeHandle:
        device = self._target
        if ahead is not None and not block:
            raise WouldBlock  # a prefetch moves weights
        # the baseline is read under the table's lock right before the first claim: no move starts in between
        before = self._take_baseline if recording else None
        keep_later = ahead is not None and self._options.keep  # kept only once the whole entry succeeded
        if self._options is _NO_OPTIONS and block and ahead is None:
            self._claims = table.acquire(parts, device, before=before, owner=owner)
        else:
            options = self._options._asdict()
            options["keep"] = options["keep"] and not keep_later
            self._claims = table.acquire(
                parts, device, before=before, owner=owner, block=block, abort=abort, ahead=ahead or (), **options
            )
        if ahead is None:
            return ScopeHandle(device, self._components)
        try:
            started = table.prefetch(ahead, device)  # its copies overlap this entry's block
        except BaseException as exc:
            claims, self._claims = self._claims, None
            _release_beside(claims, exc)  # the with statement will not call __exit__: hold nothing
            raise
        if keep_later:
            table.mark_kept(self._claims)
        return ScopeHandle(device, self._components, Prefetch(device, self._ahead, started))

    def _undo(self, handle: ScopeHandle) -> None:
        """Give back what an entry that nobody will exit acquired (an ``async with`` cancelled meanwhile)."""
        claims, self._claims = self._claims or [], None
        try:
            if handle.prefetched is not None:
                handle.prefetched.cancel()
        finally:
            table.release(claims)

    async def __aenter__(self) -> ScopeHandle:
        parts, ahead = self._prepare()
        owner, recording = Owner.current(), _grad_recording()
        try:  # the hot path (everything held already) stays on the event loop
            return self._acquire(parts, ahead, owner, recording=recording, block=False)
        except WouldBlock:
            pass
        abort = threading.Event()
        enter = functools.partial(self._acquire, parts, ahead, owner, recording=recording, abort=abort)
        return await off_loop(enter, abort, self._undo)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        recording = _grad_recording()
        if not table.moves_on_release(self._claims or []):
            return self.__exit__(exc_type, exc, tb, recording)
        return await off_loop(functools.partial(self.__exit__, exc_type, exc, tb, recording))

    def _take_baseline(self) -> None:
        self._baseline = _baseline(self._target)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        recording: bool | None = None,  # whether autograd records where the scope exits (None: here, read if needed)
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
                self._check_retained(recording=recording)
        return False

    def _check_retained(self, *, recording: bool | None) -> None:
        """``recording``: whether autograd records where the scope exits (None: here, read now)."""
        if self._baseline is None or not (_grad_recording() if recording is None else recording):
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

    Memory (see :mod:`ondevice.residency`): the entry loads all its components
    or none.  What does not fit evicts components no live scope holds (kept,
    prefetched), least recently used first; then, by default, raises
    :class:`~ondevice.errors.OutOfDeviceMemory` (needed, free, and what is held
    there by whom).  ``wait=True`` waits until it fits instead, first come
    first served per device, at most ``timeout`` seconds (then the same error);
    a wait that could never end (the memory is held by this thread's own
    scopes) raises at once.  ``budget="6GiB"`` (or an int of bytes) puts at
    most that much of the components on the device, the rest through each
    part's ``load_partial`` (ComfyUI's low-VRAM path); ``partial=True`` puts as
    much as fits.  ``keep=True`` leaves the components on the device after the
    last scope on them exits, until their memory is needed or
    :func:`ondevice.release`.  Bad values raise
    :class:`~ondevice.errors.InvalidArgumentError` here, before anything moves.

    ``async with on_gpu(...)`` holds them for the calling asyncio task; an entry
    that must wait or load runs on a thread of its own, so the event loop keeps
    running (a cancelled task gives up its wait and holds nothing), and a
    decorated ``async def`` or async generator enters that way.

    Thread semantics: one object may be entered by several threads at once and
    re-entered.  An exit closes the latest live entry made from the same frame
    (a generator's frame is the same whichever thread resumes, closes or
    collects it), else the latest of the exiting thread, else the latest of
    all (``contextlib.ExitStack`` enters and exits from other frames).  As a
    decorator each call gets its own entry.  A decorated generator or async
    generator function becomes a plain function that binds its arguments and
    returns the generator; the scope is entered at its first step.
    """

    def __init__(  # noqa: PLR0913  (on_gpu's keywords)
        self,
        *components: Any,
        device: devices.DeviceLike = None,
        prefetch: Any = None,
        keep: bool = False,
        wait: bool = False,
        timeout: float | None = None,
        budget: int | str | None = None,
        partial: bool = False,
    ) -> None:
        self._components = components
        self._device = device
        self._ahead: tuple[Any, ...] = _ahead(prefetch)
        if keep is not False or wait is not False or partial is not False or timeout is not None or budget is not None:
            self._options = _options("on_gpu", keep=keep, wait=wait, timeout=timeout, budget=budget, partial=partial)
        else:
            self._options = _NO_OPTIONS  # the hot path: nothing to check
        self._live: list[_Live] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ScopeHandle:
        caller = sys._getframe(1)  # the frame holding the with-block; only its id is kept
        entry = _Entry(self._components, self._device, _frame_site(caller), self._ahead, self._options)
        handle = entry.__enter__()
        with self._lock:
            self._live.append(_Live(entry, id(caller), threading.get_ident()))
        return handle

    async def __aenter__(self) -> ScopeHandle:
        caller = sys._getframe(1)  # the coroutine holding the async with-block
        entry = _Entry(self._components, self._device, _frame_site(caller), self._ahead, self._options)
        handle = await entry.__aenter__()
        with self._lock:
            self._live.append(_Live(entry, id(caller), threading.get_ident()))
        return handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        with self._lock:
            live = self._take(id(sys._getframe(1)))
        return await live.entry.__aexit__(exc_type, exc, tb)

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
        check_decoratable(func, repr(self))
        site = _definition_site(func)
        signature = signature_of(func)

        def make_scope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
            if signature is not None:
                bind(func, signature, args, kwargs)  # a bad call raises before anything moves
            return _Entry(self._components, self._device, site, self._ahead, self._options)

        return wrap(func, make_scope)

    def __repr__(self) -> str:
        names = ", ".join(type(c).__name__ for c in self._components)
        ahead = ", ".join(type(c).__name__ for c in self._ahead)
        ahead = f", prefetch=({ahead})" if self._ahead else ""
        return f"on_gpu({names}, device={self._device!r}{ahead}{_describe(self._options)})"


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
    _chain(release_error, user_error)  # its traceback reads "during handling of" the user's error
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
        return _Site(qualname(func), 0, module)
    return _Site(code.co_filename, code.co_firstlineno, module)


@overload
def gpu_scoped(func: F, /) -> F: ...
@overload
def gpu_scoped(  # noqa: PLR0913  (on_gpu's keywords)
    *names: str,
    device: devices.DeviceLike = None,
    keep: bool = False,
    wait: bool = False,
    timeout: float | None = None,
    budget: int | str | None = None,
    partial: bool = False,
) -> Callable[[F], F]: ...


def gpu_scoped(  # noqa: PLR0913  (on_gpu's keywords)
    *args: Any,
    device: devices.DeviceLike = None,
    keep: bool = False,
    wait: bool = False,
    timeout: float | None = None,
    budget: int | str | None = None,
    partial: bool = False,
) -> Any:
    """Decorator: each call of the function runs with some of its arguments on the GPU.

    ``@gpu_scoped`` scopes every argument that has a strategy;
    ``@gpu_scoped("vae")`` or ``@gpu_scoped("model", "clip", device="cuda:1")``
    scopes the named parameters (a ``*args`` / ``**kwargs`` parameter scopes
    each of its values).  ``keep``, ``wait``, ``timeout``, ``budget`` and
    ``partial`` work as for :class:`on_gpu` (checked at decoration).  Works on functions, methods, ``async def``,
    generator and async generator functions; a decorated generator or async
    generator function is a plain function that binds its arguments at the
    call (a bad call raises ``TypeError`` there, naming the function) and
    returns a generator whose scope is entered at its first step.  A name that
    is not a parameter, a class, or a component (meant ``on_gpu``) raises
    :class:`~ondevice.errors.InvalidArgumentError` at decoration.

    Thread semantics: every call gets its own scope, so threads and recursion share nothing.
    """
    options = _options("gpu_scoped", keep=keep, wait=wait, timeout=timeout, budget=budget, partial=partial)
    if len(args) == 1 and callable(args[0]):
        return _decorate(args[0], (), device, options)
    for name in args:
        if not isinstance(name, str):
            hint = " (to hold a component on the GPU use on_gpu(component))" if has_strategy(name) else ""
            msg = f"gpu_scoped({name!r}): arguments name parameters and must be strings, e.g. gpu_scoped('vae'){hint}"
            raise InvalidArgumentError(msg)
    return lambda func: _decorate(func, args, device, options)


def _decorate(func: F, names: tuple[str, ...], device: devices.DeviceLike, options: _Options) -> F:
    check_decoratable(func, f"gpu_scoped{names!r}" if names else "gpu_scoped", component_hint=True)
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
        bound = bind(func, signature, args, kwargs)
        bound.apply_defaults()
        if names:
            components = [_checked(func, name, c) for name in names for c in _values(signature, bound.arguments, name)]
        else:
            every = [c for name in bound.arguments for c in _values(signature, bound.arguments, name)]
            components = [c for c in every if has_strategy(c)]
        return _Entry(tuple(components), device, site, options=options)

    return wrap(func, make_scope)


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
