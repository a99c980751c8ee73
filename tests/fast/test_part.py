"""The Part base class and the adapter for duck-typed parts: no ComfyUI, no fake GPU (the fast tier)."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable
from typing import Any

import pytest
import torch

from ondevice.errors import NoStrategyError
from ondevice.residency import ResidencyTable
from ondevice.strategies import Part, as_part, parts_of, register_strategy

GPU = torch.device("meta")  # any device but the CPU: the parts only record where they are
CPU = torch.device("cpu")


class Box:
    """Weights that only record where they are and what was done to them."""

    def __init__(self) -> None:
        self.where = CPU
        self.log: list[str] = []


class Minimal(Part):
    """A Part subclass with only the required methods."""

    def __init__(self, box: Box) -> None:
        self.box = box

    @property
    def key(self) -> object:
        return self.box

    def tensors(self) -> Iterable[torch.Tensor]:
        return []

    def load(self, device: torch.device) -> None:
        self.box.where = device
        self.box.log.append("load")

    def offload(self) -> None:
        self.box.where = CPU
        self.box.log.append("offload")

    def is_on(self, device: torch.device) -> bool:
        return self.box.where == device


class Duck:
    """A part that does not subclass Part: the required methods and, by choice, some optional ones."""

    def __init__(self, box: Box, patches: str = "none") -> None:
        self.box, self.patches = box, patches

    @property
    def key(self) -> object:
        return self.box

    def tensors(self) -> Iterable[torch.Tensor]:
        return []

    def load(self, device: torch.device) -> None:
        self.box.where = device
        self.box.log.append(f"load {self.patches}")

    def offload(self) -> None:
        self.box.where = CPU
        self.box.log.append("offload")

    def is_on(self, device: torch.device) -> bool:
        return self.box.where == device

    def __repr__(self) -> str:
        return f"Duck({self.patches})"


class PatchedDuck(Duck):
    """A duck-typed part with every optional method."""

    path = "duck.move"

    def same_weights(self, other: object) -> bool:
        return isinstance(other, Duck) and other.patches == self.patches  # the unwrapped part, not the adapter

    def point_at(self, device: torch.device) -> None:
        self.box.log.append(f"point {device.type}")

    def restore(self) -> None:
        self.box.log.append("restore")


def test_defaults_of_the_base_class() -> None:
    """A subclass with only the required methods gets same_weights -> True, no-op point_at / restore, path 'custom'."""
    a, b = Minimal(Box()), Minimal(Box())
    assert a.same_weights(b) is True
    assert a.point_at(GPU) is None
    assert a.restore() is None
    assert a.path == "custom"
    assert a.box.log == []


@pytest.mark.parametrize(
    ("call", "what"),
    [
        (lambda p: p.key, "the key property"),
        (lambda p: p.tensors(), "tensors()"),
        (lambda p: p.load(GPU), "load(device)"),
        (lambda p: p.offload(), "offload()"),
        (lambda p: p.is_on(GPU), "is_on(device)"),
    ],
)
def test_required_methods_raise_naming_the_subclass(call: Any, what: str) -> None:
    """Each required method a subclass forgot raises NotImplementedError naming the subclass and the method."""

    class Forgetful(Part):
        pass

    with pytest.raises(NotImplementedError, match=re.escape(f"Forgetful must implement {what}")):
        call(Forgetful())


def test_table_with_a_subclass_that_lacks_is_on_holds_nothing() -> None:
    """An acquire through a Part subclass without is_on raises NotImplementedError and leaves nothing held."""

    class NoIsOn(Part):
        def __init__(self, box: Box) -> None:
            self.box = box

        @property
        def key(self) -> object:
            return self.box

        def tensors(self) -> Iterable[torch.Tensor]:
            return []

        def load(self, device: torch.device) -> None:
            self.box.where = device

        def offload(self) -> None:
            self.box.where = CPU

    table, box = ResidencyTable(), Box()
    with pytest.raises(NotImplementedError, match="NoIsOn must implement is_on"):
        table.acquire([NoIsOn(box)], GPU)
    assert table.held() == []
    assert box.where == CPU


def test_as_part_returns_a_part_unchanged() -> None:
    """as_part of a Part subclass is the object itself (no adapter)."""
    part = Minimal(Box())
    assert as_part(part) is part


def test_adapter_forwards_the_required_methods() -> None:
    """A duck-typed part is adapted into a Part that forwards key, tensors, load, offload, is_on and repr."""
    box = Box()
    part = as_part(Duck(box))
    assert isinstance(part, Part)
    assert part.key is box
    assert list(part.tensors()) == []
    part.load(GPU)
    assert part.is_on(GPU)
    part.offload()
    assert not part.is_on(GPU)
    assert box.log == ["load none", "offload"]
    assert repr(part) == "Duck(none)"
    assert part.path == "custom"


def test_adapter_supplies_the_defaults_a_duck_lacks() -> None:
    """A duck-typed part without same_weights / point_at / restore gets Part's defaults through the adapter."""
    box = Box()
    part, other = as_part(Duck(box, "a")), as_part(Duck(box, "b"))
    assert part.same_weights(other) is True
    part.point_at(GPU)
    part.restore()
    assert box.log == []


def test_adapter_forwards_the_optional_methods_a_duck_has() -> None:
    """same_weights sees the other duck itself (unwrapped); point_at, restore and path are the duck's own."""
    box = Box()
    base, lora, twin = as_part(PatchedDuck(box, "base")), as_part(PatchedDuck(box, "lora")), PatchedDuck(box, "base")
    assert base.same_weights(lora) is False
    assert base.same_weights(as_part(twin)) is True
    base.point_at(GPU)
    base.restore()
    assert box.log == ["point meta", "restore"]
    assert base.path == "duck.move"


def test_table_takes_duck_typed_parts_with_their_optional_methods() -> None:
    """The table adapts duck-typed parts itself: a clone with other patches swaps in and back; the inner claim's
    pointers are undone at its own release, the outer's when the weights leave."""
    table, box = ResidencyTable(), Box()
    outer = table.acquire([PatchedDuck(box, "base")], GPU)
    inner = table.acquire([PatchedDuck(box, "lora")], GPU)
    table.release(inner)
    table.release(outer)
    assert box.log == [
        "point meta",
        "load base",
        "point meta",
        "load lora",
        "restore",
        "load base",
        "offload",
        "restore",
    ]
    assert table.held() == []


@pytest.mark.parametrize(
    ("part", "missing"),
    [
        (object(), "key, tensors, load, offload, is_on"),
        (type("NoLoad", (), {"key": 1, "tensors": list, "offload": list, "is_on": bool})(), "load"),
        (type("StrLoad", (), {"key": 1, "tensors": list, "load": "x", "offload": list, "is_on": bool})(), "load"),
    ],
)
def test_as_part_refuses_an_object_without_the_required_methods(part: object, missing: str) -> None:
    """An object lacking a required method (or with a non-callable one) is refused with NoStrategyError naming it."""
    with pytest.raises(NoStrategyError, match=f"it has no {missing};") as info:
        as_part(part)
    assert isinstance(info.value, TypeError)
    assert "ondevice.strategies.Part" in str(info.value)


class DuckPipeline:
    """A user type whose strategy returns duck-typed parts."""

    def __init__(self) -> None:
        self.box = Box()


class BrokenPipeline:
    """A user type whose strategy returns something that is not a part."""


register_strategy(DuckPipeline, type("DuckStrategy", (), {"parts": lambda self, c: [Duck(c.box)]})())
register_strategy(BrokenPipeline, type("BrokenStrategy", (), {"parts": lambda self, c: [object()]})())


def test_parts_of_adapts_duck_typed_parts() -> None:
    """parts_of hands out Part instances only, adapting what a user's strategy returns."""
    pipeline = DuckPipeline()
    (part,) = parts_of(pipeline)
    assert isinstance(part, Part)
    assert part.key is pipeline.box


def test_parts_of_refuses_a_strategy_that_returns_no_part() -> None:
    """A strategy whose parts() returns an object that cannot move fails parts_of with NoStrategyError."""
    with pytest.raises(NoStrategyError, match="is not a part"):
        parts_of(BrokenPipeline())


def test_the_docstring_example_runs() -> None:
    """The example in Part's docstring defines a working part: a table holds it and releases it."""
    example = textwrap.dedent(Part.__doc__.split("Example::", 1)[1])  # type: ignore[union-attr]
    namespace: dict[str, Any] = {"Part": Part, "torch": torch, "Iterable": Iterable}
    exec(example, namespace)  # noqa: S102  (our own docstring)
    modules = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    part, table = namespace["ListPart"](modules), ResidencyTable()
    claims = table.acquire([part], CPU)
    assert part.is_on(CPU)
    assert part.path == "list.to"
    table.release(claims)
    assert table.held() == []
