"""What every stand-in module uses: names that resolve to stand-in classes whose use raises."""

from __future__ import annotations

from typing import Any

VERSION = "0.0.0+ondevice-standin"


class _StandInMeta(type):
    def __getattr__(cls, name: str) -> Any:  # enum members and class attributes: InterpolationMode.BICUBIC
        if name.startswith("__"):
            raise AttributeError(name)
        return stand_in(f"{cls.__qualname__}.{name}", cls.__module__)


def stand_in(name: str, module: str) -> type:
    """A class named ``name`` that can be imported, subclassed and referenced, but not used."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        msg = f"{module}.{name} is a test stand-in (tests/standins/); install the real package to use it"
        raise NotImplementedError(msg)

    return _StandInMeta(name, (), {"__module__": module, "__qualname__": name, "__init__": refuse, "__new__": refuse})


def module_getattr(module: str) -> Any:
    """A module-level ``__getattr__`` that answers any public name with a stand-in."""

    def getattr_(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return stand_in(name, module)

    return getattr_
