"""on_gpu / gpu_scoped semantics on plain torch modules and the fake GPU."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ondevice
from ondevice import gpu_scoped, on_gpu
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def where(component: Any) -> set[torch.device]:
    return set(ondevice.placement(component))


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_building_a_scope_moves_nothing(fake_gpu: FakeGPU) -> None:
    """Creating on_gpu(...) does no work; only entering does."""
    m = net()
    scope = on_gpu(m)
    assert where(m) == {CPU}
    with scope as handle:
        assert where(m) == {fake_gpu.device}
        assert handle.device == fake_gpu.device
        assert handle.components == (m,)
    assert where(m) == {CPU}


def test_forward_inside_scope_and_memory_back_to_baseline(fake_gpu: FakeGPU) -> None:
    """A real forward runs on the fake GPU; after exit memory is at its baseline exactly."""
    m = net()
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    base = fake_gpu.memory_allocated()
    x = torch.randn(2, 16)
    expected = m(x)
    with on_gpu(m) as scope, torch.no_grad():
        assert fake_gpu.memory_allocated() == base + size
        got = m(x.to(scope.device)).cpu()
    torch.testing.assert_close(got, expected)
    assert where(m) == {CPU}
    assert fake_gpu.memory_allocated() == base


def test_user_exception_propagates_unchanged(fake_gpu: FakeGPU) -> None:
    """The very exception object raised in the block propagates, and weights are back on the CPU."""
    m = net()
    error = ValueError("boom")
    with pytest.raises(ValueError) as info, on_gpu(m):
        raise error
    assert info.value is error
    assert where(m) == {CPU}


def test_keyboard_interrupt_offloads(fake_gpu: FakeGPU) -> None:
    """KeyboardInterrupt inside the block still offloads and propagates."""
    m = net()
    with pytest.raises(KeyboardInterrupt), on_gpu(m):
        raise KeyboardInterrupt
    assert where(m) == {CPU}


def test_generator_close_offloads(fake_gpu: FakeGPU) -> None:
    """A scope inside a generator is exited when the generator is closed."""
    m = net()

    def gen() -> Iterator[int]:
        with on_gpu(m):
            yield 1
            yield 2

    g = gen()
    assert next(g) == 1
    assert where(m) == {fake_gpu.device}
    g.close()
    assert where(m) == {CPU}


def test_nesting_same_component_counts(fake_gpu: FakeGPU) -> None:
    """An inner scope on a held component neither reloads nor offloads it."""
    m = net()
    with on_gpu(m):
        moved = fake_gpu.bytes_to_device
        with on_gpu(m):
            assert where(m) == {fake_gpu.device}
        assert fake_gpu.bytes_to_device == moved
        assert where(m) == {fake_gpu.device}
    assert where(m) == {CPU}


def test_one_scope_object_reentered(fake_gpu: FakeGPU) -> None:
    """The same on_gpu object can be entered twice, nested; the outer exit offloads."""
    m = net()
    scope = on_gpu(m)
    with scope:
        with scope:
            pass
        assert where(m) == {fake_gpu.device}
    assert where(m) == {CPU}


def test_decorator_form_of_on_gpu(fake_gpu: FakeGPU) -> None:
    """on_gpu(...) used as a decorator scopes each call."""
    m = net()

    @on_gpu(m)
    def run() -> set[torch.device]:
        return where(m)

    assert run() == {fake_gpu.device}
    assert run() == {fake_gpu.device}
    assert where(m) == {CPU}


def test_gpu_scoped_bare_scopes_every_movable_argument(fake_gpu: FakeGPU) -> None:
    """@gpu_scoped scopes each argument that has a strategy and ignores the rest."""
    a, b = net(), net()

    @gpu_scoped
    def run(x: torch.nn.Module, n: int, *, y: torch.nn.Module) -> tuple[set[torch.device], set[torch.device]]:
        return where(x), where(y)

    assert run(a, 3, y=b) == ({fake_gpu.device}, {fake_gpu.device})
    assert where(a) == where(b) == {CPU}


def test_gpu_scoped_named_leaves_others(fake_gpu: FakeGPU) -> None:
    """@gpu_scoped("vae") scopes only that parameter."""
    a, b = net(), net()

    @gpu_scoped("vae")
    def run(unet: torch.nn.Module, vae: torch.nn.Module) -> tuple[set[torch.device], set[torch.device]]:
        return where(unet), where(vae)

    assert run(a, vae=b) == ({CPU}, {fake_gpu.device})


def test_gpu_scoped_device_option(fake_gpu: FakeGPU) -> None:
    """device= picks the target; 'cpu' keeps the block on the CPU."""
    a = net()

    @gpu_scoped("m", device="cpu")
    def run(m: torch.nn.Module) -> set[torch.device]:
        return where(m)

    assert run(a) == {CPU}


def test_gpu_scoped_varargs(fake_gpu: FakeGPU) -> None:
    """A *args parameter named in gpu_scoped scopes each of its values."""
    a, b = net(), net()

    @gpu_scoped("models")
    def run(*models: torch.nn.Module) -> list[set[torch.device]]:
        return [where(m) for m in models]

    assert run(a, b) == [{fake_gpu.device}, {fake_gpu.device}]


def test_gpu_scoped_method(fake_gpu: FakeGPU) -> None:
    """Methods work; the named parameter is scoped per call."""
    m = net()

    class Pipeline:
        @gpu_scoped("model")
        def run(self, model: torch.nn.Module) -> set[torch.device]:
            return where(model)

    assert Pipeline().run(m) == {fake_gpu.device}
    assert where(m) == {CPU}


def test_gpu_scoped_async(fake_gpu: FakeGPU) -> None:
    """async def functions are scoped for the whole await."""
    m = net()

    @gpu_scoped("model")
    async def run(model: torch.nn.Module) -> set[torch.device]:
        await asyncio.sleep(0)
        return where(model)

    assert asyncio.run(run(m)) == {fake_gpu.device}
    assert where(m) == {CPU}


def test_gpu_scoped_generator_function(fake_gpu: FakeGPU) -> None:
    """A decorated generator function holds the scope until it finishes or is closed."""
    m = net()

    @gpu_scoped("model")
    def stream(model: torch.nn.Module) -> Iterator[set[torch.device]]:
        yield where(model)
        yield where(model)

    g = stream(m)
    assert next(g) == {fake_gpu.device}
    g.close()
    assert where(m) == {CPU}


def test_gpu_scoped_recursion_gets_fresh_scopes(fake_gpu: FakeGPU) -> None:
    """Recursive calls nest; the outermost call's exit offloads."""
    m = net()
    seen: list[set[torch.device]] = []

    @gpu_scoped("model")
    def walk(model: torch.nn.Module, depth: int) -> None:
        if depth:
            walk(model, depth - 1)
        seen.append(where(model))

    walk(m, 3)
    assert seen == [{fake_gpu.device}] * 4
    assert where(m) == {CPU}


def test_gpu_scoped_exception_offloads(fake_gpu: FakeGPU) -> None:
    """An exception in a decorated function propagates unchanged and offloads."""
    m = net()
    error = RuntimeError("inner")

    @gpu_scoped
    def run(model: torch.nn.Module) -> None:
        raise error

    with pytest.raises(RuntimeError) as info:
        run(m)
    assert info.value is error
    assert where(m) == {CPU}


def test_offload_forces_cpu_inside_a_scope(fake_gpu: FakeGPU) -> None:
    """offload() moves a held component to the CPU at once, and the scope does not bring it back."""
    m, other = net(), net()
    with on_gpu(m):
        ondevice.offload(m)
        assert where(m) == {CPU}
        with on_gpu(other):
            pass
        assert where(m) == {CPU}
    assert where(m) == {CPU}


def test_device_of(fake_gpu: FakeGPU) -> None:
    """device_of reports where the weights are now."""
    m = net()
    assert ondevice.device_of(m) == CPU
    with on_gpu(m):
        assert ondevice.device_of(m) == fake_gpu.device
    assert ondevice.device_of(m) == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an accelerator")
def test_no_accelerator_runs_on_cpu_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Without any accelerator (nor a fake one), device=None runs on the CPU and warns once."""
    from ondevice import devices  # noqa: PLC0415

    devices._warned_cpu = False  # noqa: SLF001  (reset the once-per-process flag for this test)
    m = net()
    with caplog.at_level("WARNING", logger="ondevice"):
        with on_gpu(m) as scope:
            assert scope.device == CPU
        with on_gpu(m):
            pass
    assert sum("no accelerator" in r.message for r in caplog.records) == 1


def test_register_strategy_expand(fake_gpu: FakeGPU) -> None:
    """A user type registered with Expand moves its children through their strategies."""

    class Pipeline:
        def __init__(self) -> None:
            self.unet, self.vae = net(), net()

    ondevice.register_strategy(Pipeline, ondevice.Expand(lambda p: [p.unet, p.vae]))
    pipe = Pipeline()
    with on_gpu(pipe):
        assert where(pipe.unet) == where(pipe.vae) == {fake_gpu.device}
    assert where(pipe) == {CPU}


def test_second_fake_device(fake_gpu_two: Any) -> None:
    """device='fakegpu:1' targets the second fake device."""
    m = net()
    with on_gpu(m, device="fakegpu:1") as scope:
        assert where(m) == {torch.device("fakegpu:1")}
        assert scope.device == torch.device("fakegpu:1")
    assert where(m) == {CPU}


def test_claim_after_forced_offload_loads_again(fake_gpu: FakeGPU) -> None:
    """After offload() inside a scope, a new inner scope on the component puts it on the device again."""
    m = net()
    with on_gpu(m):
        ondevice.offload(m)
        with on_gpu(m):
            assert where(m) == {fake_gpu.device}
        assert where(m) == {fake_gpu.device}
    assert where(m) == {CPU}


@pytest.mark.parametrize("form", ["gpu_scoped", "on_gpu"])
def test_generator_finished_on_another_thread(fake_gpu: FakeGPU, form: str) -> None:
    """A decorated generator started on one thread and closed on another still releases its scope."""
    import threading  # noqa: PLC0415

    m = net()
    decorate = gpu_scoped("model") if form == "gpu_scoped" else on_gpu(m)

    @decorate
    def stream(model: torch.nn.Module) -> Iterator[set[torch.device]]:
        yield where(model)
        yield where(model)

    g = stream(m)
    assert next(g) == {fake_gpu.device}
    errors: list[BaseException] = []

    def close() -> None:
        try:
            g.close()
        except BaseException as exc:  # noqa: BLE001  (asserted below)
            errors.append(exc)

    t = threading.Thread(target=close)
    t.start()
    t.join()
    assert errors == []
    assert where(m) == {CPU}


def test_gpu_scoped_async_generator(fake_gpu: FakeGPU) -> None:
    """An async generator function holds its scope while it yields, and releases it when done."""
    m = net()

    @gpu_scoped("model")
    async def stream(model: torch.nn.Module) -> Any:
        for _ in range(2):
            await asyncio.sleep(0)
            yield where(model)

    async def consume() -> list[set[torch.device]]:
        return [item async for item in stream(m)]

    assert asyncio.run(consume()) == [{fake_gpu.device}] * 2
    assert where(m) == {CPU}


class Sticky(torch.nn.Module):
    """A module whose (broken) strategy leaves one tensor behind on the CPU when it loads."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


class StickyPart(ModulePart):
    def load(self, device: torch.device) -> None:
        self.module.a.to(device)  # forgets self.module.b


def test_acquire_verifies_every_part_is_on_the_device(fake_gpu: FakeGPU) -> None:
    """A part that does not end wholly on the device fails the entry, and nothing stays held or moved."""
    ondevice.register_strategy(Sticky, SimpleNamespace(parts=lambda c: [StickyPart(c)]))
    m, other = Sticky(), net()
    with pytest.raises(ondevice.OnDeviceError, match="could not be kept wholly"), on_gpu(other, m):
        pass
    assert where(m) == where(other) == {CPU}
    assert fake_gpu.memory_allocated() == 0


def test_on_gpu_decorator_gets_a_fresh_scope_per_call(fake_gpu: FakeGPU) -> None:
    """@on_gpu(m) on a recursive function called from two threads: every call's scope is its own."""
    import threading  # noqa: PLC0415

    m = net()
    seen: list[set[torch.device]] = []

    @on_gpu(m)
    def walk(depth: int) -> None:
        if depth:
            walk(depth - 1)
        seen.append(where(m))

    threads = [threading.Thread(target=walk, args=(3,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert seen == [{fake_gpu.device}] * 8
    assert where(m) == {CPU}


def test_a_nested_scope_trusts_the_table_and_ensure_mends(fake_gpu: FakeGPU) -> None:
    """Weights evicted behind ondevice's back: a nested scope on them moves nothing; scope.ensure() loads them back."""
    m = net()
    with on_gpu(m) as scope:
        m.to(CPU)  # what a custom node might do
        with on_gpu(m):
            assert where(m) == {CPU}  # the hot path looks at no tensor
        scope.ensure()
        assert where(m) == {fake_gpu.device}
    assert where(m) == {CPU}
    assert fake_gpu.memory_allocated() == 0
