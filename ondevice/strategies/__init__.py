"""Strategies: how one kind of component moves between the CPU and a GPU.

A *strategy* turns a user-facing component (a ComfyUI ``VAE``, a
``ModelPatcher``, a plain ``nn.Module``, ...) into one or more *parts*.  A
part (a subclass of :class:`Part`) is the unit the residency table counts and
moves: it names the weights it owns (``key``; ComfyUI clones share one
``nn.Module``, so they share a key) and knows how to ``load`` them onto a
device and ``offload`` them to the CPU.  What a part need not do has a no-op
default on :class:`Part`, so the table calls every method directly.  A part
of a user's strategy that does not subclass :class:`Part` (any object with
``key``, ``tensors``, ``load``, ``offload`` and ``is_on``) is adapted once, by
:func:`as_part`, when it enters ondevice.

Strategies are chosen by the component's type, walking its MRO, like
:func:`functools.singledispatch`.  ComfyUI's strategies register themselves
lazily the first time a ComfyUI object is seen, so ``import ondevice`` never
imports ComfyUI.

Thread semantics: the registry is guarded by a lock; parts are only moved by
the residency table, which runs one move of the same weights at a time but
moves of other weights concurrently, outside its lock: a part whose moves touch
shared global state takes its own lock (ComfyUI's parts take
:data:`ondevice.comfyui.comfyui_lock`).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from ondevice.errors import InvalidArgumentError, NoStrategyError

__all__ = [
    "Expand",
    "Part",
    "Strategy",
    "as_part",
    "has_strategy",
    "parts_of",
    "placement",
    "register_strategy",
    "registry",
    "strategy_for",
]


def placement(tensors: Iterable[torch.Tensor]) -> dict[torch.device, int]:
    """Bytes per device, counting each storage once (tied tensors once)."""
    seen: set[tuple[torch.device, int]] = set()
    out: dict[torch.device, int] = {}
    for tensor in tensors:
        ident = (tensor.device, tensor.data_ptr() or id(tensor))
        if ident in seen:
            continue
        seen.add(ident)
        out[tensor.device] = out.get(tensor.device, 0) + tensor.numel() * tensor.element_size()
    return out


class Part:
    """One set of weights that moves as a whole; subclass it for a new kind of component.

    Subclasses implement :attr:`key`, :meth:`tensors`, :meth:`load`,
    :meth:`offload` and :meth:`is_on` (the base class raises
    ``NotImplementedError`` naming the subclass); :meth:`same_weights`,
    :meth:`point_at`, :meth:`restore` and :meth:`join` default to doing
    nothing (:meth:`prefetch` to :meth:`load`), like accelerate's ``ModelHook``.
    :attr:`path` names how the part moves its weights in every
    :class:`~ondevice.events.MoveEvent`.

    Thread semantics: only the residency table moves a part: one move of the same
    weights at a time; moves of other weights may run at the same time on other threads.

    Example::

        class ListPart(Part):
            path = "list.to"

            def __init__(self, modules: list[torch.nn.Module]) -> None:
                self.modules = modules

            @property
            def key(self) -> object:
                return self.modules

            def tensors(self) -> Iterable[torch.Tensor]:
                return [t for m in self.modules for t in (*m.parameters(), *m.buffers())]

            def load(self, device: torch.device) -> None:
                for m in self.modules:
                    m.to(device)

            def offload(self) -> None:
                self.load(torch.device("cpu"))

            def is_on(self, device: torch.device) -> bool:
                return all(t.device == device for t in self.tensors())
    """

    path: str = "custom"
    """How this part moves its weights (``MoveEvent.path``): ``"module.to"``, ``"comfyui"``, ..."""

    last_move: str | None = None
    """How the latest move went, where it differs by move (``"zero-copy"``); ``None``: as :attr:`path` says."""

    copied_bytes: int | None = None
    """Bytes the latest move copied between devices; ``None``: the part does not count them."""

    last_pinned: bool = False
    """Whether the latest move copied from pinned host memory."""

    last_stream: str | None = None
    """The side stream the latest move copied on (``None``: the default stream)."""

    last_fallback: str | None = None
    """Why the latest move took a slower path than this part's fast one (``MoveEvent.reason``), or ``None``."""

    @property
    def key(self) -> object:
        """The object whose identity names these weights (shared by clones)."""
        raise NotImplementedError(_required(self, "the key property"))

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every parameter and buffer of the weights, wherever they are now."""
        raise NotImplementedError(_required(self, "tensors()"))

    def load(self, device: torch.device) -> None:
        """Put every weight on ``device``; on failure leave everything on the CPU and raise."""
        raise NotImplementedError(_required(self, "load(device)"))

    def offload(self) -> None:
        """Put every weight on the CPU."""
        raise NotImplementedError(_required(self, "offload()"))

    def is_on(self, device: torch.device) -> bool:
        """True when every weight is on ``device`` (and the owner knows it)."""
        raise NotImplementedError(_required(self, "is_on(device)"))

    def same_weights(self, other: Part) -> bool:
        """Whether loading ``other`` (a part with the same key) would put exactly these weights on the device.

        ``False`` for a ComfyUI clone with other patches; the default says ``True``.
        """
        return True

    def point_at(self, device: torch.device) -> None:
        """Point attributes that name the device (``vae.device``, ...) at ``device`` for a claim; default: none."""

    def restore(self) -> None:
        """Undo :meth:`point_at` once the weights leave the device; default: nothing to undo."""

    def nbytes(self) -> int:
        """Bytes the weights take on a device once loaded in full (tied tensors once); default: from :meth:`tensors`.

        The residency table compares it with the device's free memory before a load.
        """
        return sum(placement(self.tensors()).values())

    def resident_nbytes(self, device: torch.device) -> int:
        """Bytes of the weights on ``device`` now (tied tensors once); after :meth:`load_partial`, what it left there.

        The residency table counts a partly loaded holding by it; default: from :meth:`tensors`.
        """
        return placement(self.tensors()).get(device, 0)

    def load_partial(self, device: torch.device, budget: int | None) -> None:
        """Put at most ``budget`` bytes of the weights on ``device`` (None: as much as fits), the rest streamed
        per use; default: refuses (``InvalidArgumentError``), for parts that can only be loaded whole."""
        msg = (
            f"{self!r} can only be loaded whole: budget= and partial=True apply to ComfyUI models (their "
            "low-VRAM path); scope fewer components, or free device memory"
        )
        raise InvalidArgumentError(msg)

    def prefetch(self, device: torch.device) -> None:
        """Start putting every weight on ``device`` without making the current stream wait for the copies.

        The copies may still be in flight when this returns; :meth:`join` makes the current
        stream wait for them.  On failure leave everything on the CPU and raise.  Default: :meth:`load`
        (a part without side-stream copies loads now, in full).
        """
        self.load(device)

    def join(self) -> None:
        """Make the current stream wait for the copies of the latest :meth:`prefetch`; default: nothing to wait for.

        Called by the residency table when a scope claims weights that were prefetched, before the
        scope's block runs; cheap when the copies have landed.
        """


def _required(part: Part, what: str) -> str:
    return (
        f"{type(part).__qualname__} must implement {what}: a subclass of ondevice.strategies.Part implements "
        "key, tensors(), load(device), offload() and is_on(device)"
    )


_REQUIRED = ("key", "tensors", "load", "offload", "is_on")


class _Adapted(Part):
    """A part of a user's strategy that does not subclass :class:`Part`: forwards to it, with Part's defaults."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped
        self.path = str(getattr(wrapped, "path", Part.path))

    @property
    def key(self) -> object:
        return self.wrapped.key

    def tensors(self) -> Iterable[torch.Tensor]:
        return self.wrapped.tensors()  # type: ignore[no-any-return]

    def load(self, device: torch.device) -> None:
        self.wrapped.load(device)

    def offload(self) -> None:
        self.wrapped.offload()

    def is_on(self, device: torch.device) -> bool:
        return bool(self.wrapped.is_on(device))

    def same_weights(self, other: Part) -> bool:
        same = getattr(self.wrapped, "same_weights", None)
        if not callable(same):
            return True
        return bool(same(other.wrapped if isinstance(other, _Adapted) else other))

    def point_at(self, device: torch.device) -> None:
        point_at = getattr(self.wrapped, "point_at", None)
        if callable(point_at):
            point_at(device)

    def restore(self) -> None:
        restore = getattr(self.wrapped, "restore", None)
        if callable(restore):
            restore()

    def nbytes(self) -> int:
        nbytes = getattr(self.wrapped, "nbytes", None)
        return int(nbytes()) if callable(nbytes) else super().nbytes()

    def resident_nbytes(self, device: torch.device) -> int:
        resident = getattr(self.wrapped, "resident_nbytes", None)
        return int(resident(device)) if callable(resident) else super().resident_nbytes(device)

    def load_partial(self, device: torch.device, budget: int | None) -> None:
        load_partial = getattr(self.wrapped, "load_partial", None)
        if not callable(load_partial):
            super().load_partial(device, budget)
        else:
            load_partial(device, budget)

    def prefetch(self, device: torch.device) -> None:
        prefetch = getattr(self.wrapped, "prefetch", None)
        if callable(prefetch):
            prefetch(device)
        else:
            self.wrapped.load(device)

    def join(self) -> None:
        join = getattr(self.wrapped, "join", None)
        if callable(join):
            join()

    def __repr__(self) -> str:
        return repr(self.wrapped)


def _has(part: object, name: str) -> bool:
    """Whether ``part`` has the attribute ``name`` (callable, for a method)."""
    return hasattr(part, name) and (name == "key" or callable(getattr(part, name)))


def as_part(part: Any) -> Part:
    """``part`` itself if it is a :class:`Part`, else an adapter that gives it Part's defaults.

    Raises :class:`NoStrategyError` (a ``TypeError``) for an object without
    ``key``, ``tensors``, ``load``, ``offload`` and ``is_on``.
    """
    if isinstance(part, Part):
        return part
    missing = [name for name in _REQUIRED if not _has(part, name)]
    if missing:
        msg = (
            f"{part!r} is not a part: it has no {', '.join(missing)}; a strategy's parts() returns parts, "
            "subclasses of ondevice.strategies.Part (key, tensors(), load(device), offload(), is_on(device))"
        )
        raise NoStrategyError(msg)
    return _Adapted(part)


class Strategy(Protocol):
    """Turns a component into the parts that move it."""

    def parts(self, component: Any) -> Sequence[Part]:
        """The parts of ``component``; raise an ``OnDeviceError`` if it cannot be moved."""


class Expand:
    """A strategy for containers: ``Expand(lambda pipe: [pipe.unet, pipe.vae])``.

    Each sub-component is dispatched through the registry in turn.
    """

    def __init__(self, children: Callable[[Any], Iterable[Any]]) -> None:
        self._children = children

    def parts(self, component: Any) -> Sequence[Part]:
        return [part for child in self._children(component) for part in parts_of(child)]


_registry: dict[type, Strategy] = {}
_lock = threading.Lock()
_lazy_modules = {"comfy": "ondevice.strategies.comfy"}
_loaded_lazy: set[str] = set()


def register_strategy(cls: type, strategy: Strategy) -> None:
    """Use ``strategy`` for instances of ``cls`` and its subclasses (the most derived match wins)."""
    if not isinstance(cls, type):
        msg = f"register_strategy(cls={cls!r}): cls must be a type, e.g. register_strategy(MyPipeline, strategy)"
        raise NoStrategyError(msg)
    if not callable(getattr(strategy, "parts", None)):
        msg = (
            f"register_strategy({cls.__name__}, strategy={strategy!r}): the strategy has no parts() method; "
            "give it parts(component) -> list of parts, or use ondevice.strategies.Expand"
        )
        raise NoStrategyError(msg)
    with _lock:
        _registry[cls] = strategy


def registry() -> dict[type, Strategy]:
    """A copy of the type -> strategy table."""
    with _lock:
        return dict(_registry)


def _load_lazy(cls: type) -> None:
    for klass in cls.__mro__:
        top = klass.__module__.partition(".")[0]
        module = _lazy_modules.get(top)
        if module is not None and module not in _loaded_lazy:
            importlib.import_module(module)  # registers its strategies
            _loaded_lazy.add(module)


def _lookup(cls: type) -> Strategy | None:
    with _lock:
        for klass in cls.__mro__:
            if klass in _registry:
                return _registry[klass]
    return None


def strategy_for(component: Any) -> Strategy:
    """The strategy for ``component``; raises :class:`NoStrategyError` (a ``TypeError``) if none."""
    cls = type(component)
    strategy = _lookup(cls)
    if strategy is None:
        _load_lazy(cls)
        strategy = _lookup(cls)
    if strategy is None:
        what = "None" if component is None else f"a {cls.__module__}.{cls.__qualname__}"
        msg = (
            f"ondevice cannot move {what}: no strategy is registered for its type. Pass a ComfyUI "
            "ModelPatcher, VAE, CLIP, ClipVisionModel or ControlNet, or a torch.nn.Module, or register "
            "one with ondevice.register_strategy(type, strategy)"
        )
        raise NoStrategyError(msg)
    return strategy


def has_strategy(component: Any) -> bool:
    """True when :func:`strategy_for` would find a strategy for ``component``."""
    try:
        strategy_for(component)
    except NoStrategyError:
        return False
    return True


def parts_of(component: Any) -> list[Part]:
    """The parts of ``component`` through its strategy, each a :class:`Part` (see :func:`as_part`)."""
    return [as_part(part) for part in strategy_for(component).parts(component)]


def _register_builtin() -> None:
    from ondevice.strategies.module import ModuleStrategy  # noqa: PLC0415

    register_strategy(torch.nn.Module, ModuleStrategy())


_register_builtin()
