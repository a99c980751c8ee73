"""Strategies: how one kind of component moves between the CPU and a GPU.

A *strategy* turns a user-facing component (a ComfyUI ``VAE``, a
``ModelPatcher``, a plain ``nn.Module``, ...) into one or more *parts*.  A
part is the unit the residency table counts and moves: it names the weights
it owns (``key``; ComfyUI clones share one ``nn.Module``, so they share a key)
and knows how to ``load`` them onto a device and ``offload`` them to the CPU.

Strategies are chosen by the component's type, walking its MRO, like
:func:`functools.singledispatch`.  ComfyUI's strategies register themselves
lazily the first time a ComfyUI object is seen, so ``import ondevice`` never
imports ComfyUI.

Thread semantics: the registry is guarded by a lock; parts are only moved by
the residency table, which serializes moves.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ondevice.errors import NoStrategyError

__all__ = [
    "Expand",
    "Part",
    "Strategy",
    "has_strategy",
    "parts_of",
    "register_strategy",
    "registry",
    "strategy_for",
]


@runtime_checkable
class Part(Protocol):
    """One set of weights that moves as a whole."""

    @property
    def key(self) -> object:
        """The object whose identity names these weights (shared by clones)."""

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every parameter and buffer of the weights, wherever they are now."""

    def load(self, device: torch.device) -> None:
        """Put every weight on ``device``; on failure leave everything on the CPU and raise."""

    def offload(self) -> None:
        """Put every weight on the CPU."""

    def is_on(self, device: torch.device) -> bool:
        """True when every weight is on ``device`` (and the owner knows it)."""


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
    """The parts of ``component`` through its strategy."""
    return list(strategy_for(component).parts(component))


def _register_builtin() -> None:
    from ondevice.strategies.module import ModuleStrategy  # noqa: PLC0415

    register_strategy(torch.nn.Module, ModuleStrategy())


_register_builtin()
