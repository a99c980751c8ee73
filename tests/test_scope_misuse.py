"""Misusing on_gpu / gpu_scoped gets a clear error, raised where the mistake is made."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import torch

import ondevice
from ondevice import gpu_scoped, on_gpu
from ondevice.testing import FakeGPU


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


DECORATORS: dict[str, Callable[[torch.nn.Module], Callable[[Any], Any]]] = {
    "gpu_scoped": lambda m: gpu_scoped,
    "gpu_scoped('model')": lambda m: gpu_scoped("model"),
    "on_gpu(m)": on_gpu,
}


@pytest.mark.parametrize("form", DECORATORS)
def test_decorating_a_class_raises(form: str) -> None:
    """A decorator put on a class raises at decoration and says to decorate a function or method."""
    with pytest.raises(ondevice.InvalidArgumentError, match="on class .*Node: decorate a function or a method"):

        @DECORATORS[form](net())
        class Node:
            def __init__(self, model: torch.nn.Module) -> None:
                self.model = model


def test_gpu_scoped_given_a_module_suggests_on_gpu() -> None:
    """gpu_scoped(unet) with an nn.Module (callable, but a component) raises and suggests on_gpu."""
    with pytest.raises(ondevice.InvalidArgumentError, match=r"Sequential, which is a component.*on_gpu\(component\)"):
        gpu_scoped(net())
    with pytest.raises(ondevice.InvalidArgumentError, match="on_gpu"):
        gpu_scoped("model")(net())


def test_gpu_scoped_given_components_suggests_on_gpu() -> None:
    """gpu_scoped(a, b) or gpu_scoped(pipeline) (not callable, but movable) raises and suggests on_gpu."""

    class Pipeline:
        def __init__(self) -> None:
            self.unet = net()

    ondevice.register_strategy(Pipeline, ondevice.Expand(lambda p: [p.unet]))
    with pytest.raises(ondevice.InvalidArgumentError, match=r"must be strings.*on_gpu\(component\)"):
        gpu_scoped(net(), net())
    with pytest.raises(ondevice.InvalidArgumentError, match=r"must be strings.*on_gpu\(component\)"):
        gpu_scoped(Pipeline())


def test_on_gpu_decorating_a_non_callable_raises() -> None:
    """on_gpu(m)(5) raises at decoration instead of returning a wrapper that fails later."""
    with pytest.raises(ondevice.InvalidArgumentError, match="decorates functions and methods; got 5"):
        on_gpu(net())(5)


def test_exit_without_enter_raises_clearly(fake_gpu: FakeGPU) -> None:
    """__exit__ with no live entry (never entered, or already exited) raises InvalidArgumentError, not IndexError."""
    held = on_gpu(net())
    with pytest.raises(ondevice.InvalidArgumentError, match=r"__exit__ without a matching __enter__"):
        held.__exit__(None, None, None)
    with held:
        pass
    with pytest.raises(ondevice.InvalidArgumentError, match=r"on_gpu\(Sequential, device=None\)\.__exit__"):
        held.__exit__(None, None, None)


@pytest.mark.parametrize("form", DECORATORS)
def test_generator_binds_its_arguments_at_the_call(fake_gpu: FakeGPU, form: str) -> None:
    """A decorated generator function called with bad arguments raises TypeError at the call, naming the function."""
    m = net()

    @DECORATORS[form](m)
    def stream(model: torch.nn.Module) -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"test_generator_binds_its_arguments_at_the_call\.<locals>\.stream\(\)"):
        stream(m, 2)
    g = stream(m)  # a good call moves nothing until the first step
    assert fake_gpu.bytes_to_device == 0
    assert list(g) == [1]


@pytest.mark.parametrize("form", DECORATORS)
def test_async_generator_binds_its_arguments_at_the_call(fake_gpu: FakeGPU, form: str) -> None:
    """A decorated async generator function called with bad arguments raises TypeError at the call, naming it."""
    m = net()

    @DECORATORS[form](m)
    async def stream(model: torch.nn.Module) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match=r"\.stream\(\)"):
        stream()

    async def consume() -> list[int]:
        return [i async for i in stream(m)]

    assert asyncio.run(consume()) == [1]


@pytest.mark.parametrize("form", DECORATORS)
def test_function_binding_error_names_it_and_moves_nothing(fake_gpu: FakeGPU, form: str) -> None:
    """A decorated plain function called with bad arguments raises TypeError naming it, before anything moves."""
    m = net()

    @DECORATORS[form](m)
    def run(model: torch.nn.Module) -> None: ...

    with pytest.raises(TypeError, match=r"\.run\(\)"):
        run(m, extra=1)
    assert fake_gpu.bytes_to_device == 0


@pytest.mark.parametrize("form", DECORATORS)
def test_coroutine_binding_error_names_it(fake_gpu: FakeGPU, form: str) -> None:
    """A decorated async def called with bad arguments raises TypeError naming it (when awaited), moving nothing."""
    m = net()

    @DECORATORS[form](m)
    async def run(model: torch.nn.Module) -> None: ...

    assert inspect.iscoroutinefunction(run)  # ComfyUI tells async nodes apart this way
    with pytest.raises(TypeError, match=r"\.run\(\)"):
        asyncio.run(run())
    assert fake_gpu.bytes_to_device == 0


@pytest.mark.parametrize("form", DECORATORS)
@pytest.mark.parametrize("kind", ["function", "generator", "async generator", "coroutine"])
def test_decorated_functions_keep_their_identity(form: str, kind: str) -> None:
    """functools.wraps: name, qualname, docstring, __wrapped__ and signature are the function's own."""

    def function(model: torch.nn.Module, steps: int = 2) -> None:
        """Doc."""

    def generator(model: torch.nn.Module, steps: int = 2) -> Iterator[None]:
        """Doc."""
        yield

    async def async_generator(model: torch.nn.Module, steps: int = 2) -> AsyncIterator[None]:
        """Doc."""
        yield

    async def coroutine(model: torch.nn.Module, steps: int = 2) -> None:
        """Doc."""

    func = {"function": function, "generator": generator, "async generator": async_generator, "coroutine": coroutine}
    original = func[kind]
    wrapped = DECORATORS[form](net())(original)
    assert wrapped is not original
    assert (wrapped.__name__, wrapped.__qualname__, wrapped.__doc__) == (
        original.__name__,
        original.__qualname__,
        "Doc.",
    )
    assert wrapped.__wrapped__ is original
    assert inspect.signature(wrapped) == inspect.signature(original)
