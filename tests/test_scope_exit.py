"""Scope exits: on another thread, in async generators, interrupted, and what device memory they leave behind."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ondevice
from ondevice import devices, gpu_scoped, on_gpu, scope
from ondevice.scope import RETAINED_WARNING_BYTES, DeviceMemoryRetainedWarning
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def where(component: Any) -> set[torch.device]:
    return set(ondevice.placement(component))


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def thread(step: Callable[[], Any], errors: list[BaseException]) -> threading.Thread:
    """A started thread running ``step``; what it raises goes to ``errors``."""

    def run() -> None:
        try:
            step()
        except BaseException as exc:  # noqa: BLE001  (returned to the test, which asserts on it)
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t


def on_thread(step: Callable[[], Any]) -> list[BaseException]:
    """Run ``step`` on a new thread; return what it raised, and what was reported as unraisable meanwhile."""
    errors: list[BaseException] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda info: errors.append(info.exc_value or RuntimeError(info.err_msg))
    try:
        t = thread(step, errors)
        t.join(60)
        assert not t.is_alive()
    finally:
        sys.unraisablehook = previous
    return errors


# --------------------------------------------------------------------------- exits on another thread


def scoped_stream(m: torch.nn.Module) -> tuple[on_gpu, Generator[set[torch.device], None, None]]:
    held = on_gpu(m)

    def stream() -> Generator[set[torch.device], None, None]:
        with held:
            yield where(m)
            yield where(m)

    return held, stream()


def test_generator_resumed_and_finished_on_another_thread(fake_gpu: FakeGPU) -> None:
    """`with on_gpu(m):` in a generator started here and run to its end on another thread releases m."""
    m = net()
    _, g = scoped_stream(m)
    assert next(g) == {fake_gpu.device}
    seen: list[set[torch.device]] = []
    assert on_thread(lambda: seen.extend(g)) == []
    assert seen == [{fake_gpu.device}]
    assert where(m) == {CPU}


def test_generator_closed_on_another_thread(fake_gpu: FakeGPU) -> None:
    """The same generator closed on another thread releases m."""
    m = net()
    _, g = scoped_stream(m)
    next(g)
    assert on_thread(g.close) == []
    assert where(m) == {CPU}


def test_generator_collected_on_another_thread(fake_gpu: FakeGPU) -> None:
    """The same generator collected (its last reference dropped) on another thread releases m."""
    m = net()
    _, g = scoped_stream(m)
    next(g)
    box = [g]
    del g
    assert on_thread(box.clear) == []
    assert where(m) == {CPU}


def test_generator_finished_on_a_thread_inside_the_same_scope(fake_gpu: FakeGPU) -> None:
    """A thread inside the same on_gpu object finishes the generator: each exit releases its own entry."""
    m = net()
    held, g = scoped_stream(m)
    next(g)

    def finish_inside() -> None:
        with held:
            list(g)
            assert where(m) == {fake_gpu.device}

    assert on_thread(finish_inside) == []
    assert where(m) == {CPU}


def test_two_threads_inside_one_scope_object_exit_out_of_order(fake_gpu: FakeGPU) -> None:
    """Two threads inside the same on_gpu object; the first to enter exits first; m leaves at the last exit."""
    m = net()
    held = on_gpu(m)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[set[torch.device]] = []

    def first() -> None:
        with held:
            first_in.set()
            assert second_in.wait(30)
        first_out.set()

    def second() -> None:
        assert first_in.wait(30)
        with held:
            second_in.set()
            assert first_out.wait(30)
            seen.append(where(m))

    errors: list[BaseException] = []
    for t in [thread(first, errors), thread(second, errors)]:
        t.join(60)
        assert not t.is_alive()
    assert errors == []
    assert seen == [{fake_gpu.device}]
    assert where(m) == {CPU}


def test_exit_stack_closed_on_another_thread(fake_gpu: FakeGPU) -> None:
    """An ExitStack (enter and exit from other frames) closed on another thread releases m."""
    m = net()
    stack = contextlib.ExitStack()
    stack.enter_context(on_gpu(m))
    assert where(m) == {fake_gpu.device}
    assert on_thread(stack.close) == []
    assert where(m) == {CPU}


# --------------------------------------------------------------------------- decorated async generators


def decorated(form: str, m: torch.nn.Module) -> Callable[[Any], Any]:
    return gpu_scoped("model") if form == "gpu_scoped" else on_gpu(m)


@pytest.mark.parametrize("form", ["gpu_scoped", "on_gpu"])
def test_async_generator_asend_reaches_the_body(fake_gpu: FakeGPU, form: str) -> None:
    """Values sent with asend arrive in the decorated async generator's body."""
    m = net()

    @decorated(form, m)
    async def echo(model: torch.nn.Module) -> AsyncIterator[Any]:
        received = yield "ready"
        while True:
            received = yield (received, where(model))

    async def talk() -> list[Any]:
        agen = echo(m)
        replies = [await agen.asend(None), await agen.asend("a"), await agen.asend("b")]
        await agen.aclose()
        return replies

    assert asyncio.run(talk()) == ["ready", ("a", {fake_gpu.device}), ("b", {fake_gpu.device})]
    assert where(m) == {CPU}


@pytest.mark.parametrize("form", ["gpu_scoped", "on_gpu"])
def test_async_generator_athrow_reaches_the_body(fake_gpu: FakeGPU, form: str) -> None:
    """athrow raises inside the body, which may handle it and go on yielding on the device."""
    m = net()

    @decorated(form, m)
    async def tolerant(model: torch.nn.Module) -> AsyncIterator[Any]:
        try:
            yield "first"
        except ValueError as exc:
            yield f"handled {exc}", where(model)

    async def talk() -> Any:
        agen = tolerant(m)
        assert await agen.__anext__() == "first"
        reply = await agen.athrow(ValueError("late"))
        with pytest.raises(StopAsyncIteration):
            await agen.__anext__()
        return reply

    assert asyncio.run(talk()) == ("handled late", {fake_gpu.device})
    assert where(m) == {CPU}


@pytest.mark.parametrize("form", ["gpu_scoped", "on_gpu"])
def test_async_generator_aclose_runs_finally_before_release(fake_gpu: FakeGPU, form: str) -> None:
    """aclose runs the body's finally while the weights are still on the device, then releases them."""
    m = net()
    in_finally: list[set[torch.device]] = []

    @decorated(form, m)
    async def stream(model: torch.nn.Module) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            in_finally.append(where(model))

    async def stop_early() -> None:
        agen = stream(m)
        assert await agen.__anext__() == 1
        await agen.aclose()

    asyncio.run(stop_early())
    assert in_finally == [{fake_gpu.device}]
    assert where(m) == {CPU}


# --------------------------------------------------------------------------- failures while releasing


class Brittle(torch.nn.Linear):
    """A module whose part offloads, then raises ``Brittle.error`` (once)."""

    error: BaseException | None = None


class BrittlePart(ModulePart):
    def offload(self) -> None:
        super().offload()
        error, Brittle.error = Brittle.error, None
        if error is not None:
            raise error


ondevice.register_strategy(Brittle, SimpleNamespace(parts=lambda c: [BrittlePart(c)]))


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupt_while_releasing_is_raised_chained_to_the_user_error(
    fake_gpu: FakeGPU, interrupt: type[BaseException]
) -> None:
    """KeyboardInterrupt / SystemExit raised while offloading, as the user's error propagates: raised, chained to it."""
    m, user_error = Brittle(4, 4), ValueError("user")
    Brittle.error = interrupt()
    with pytest.raises(interrupt) as info, on_gpu(m):
        raise user_error
    assert info.value.__context__ is user_error
    assert where(m) == {CPU}


def test_interrupt_while_releasing_chained_from_a_decorated_generator(fake_gpu: FakeGPU) -> None:
    """The same through a decorated generator closed by a user error thrown into it."""
    m, user_error = Brittle(4, 4), ValueError("user")

    @gpu_scoped
    def stream(model: torch.nn.Module) -> Generator[int, None, None]:
        yield 1

    g = stream(m)
    next(g)
    Brittle.error = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        g.throw(user_error)
    assert info.value.__context__ is user_error


class Fragile(torch.nn.Linear):
    """A module whose part offloads, then raises the module's own ``error`` (once)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(4, 4)
        self.error: BaseException | None = error


class FragilePart(ModulePart):
    def offload(self) -> None:
        super().offload()
        error, self.module.error = self.module.error, None  # type: ignore[assignment]
        if error is not None:
            raise error


ondevice.register_strategy(Fragile, SimpleNamespace(parts=lambda c: [FragilePart(c)]))


def test_interrupt_after_an_error_while_releasing_is_raised(fake_gpu: FakeGPU) -> None:
    """An ordinary error releasing one component, then Ctrl-C releasing the next: the interrupt is raised, chained."""
    error = RuntimeError("offload broke")
    first, second = Fragile(KeyboardInterrupt()), Fragile(error)  # released in reverse: second, then first
    with pytest.raises(KeyboardInterrupt) as info, on_gpu(first, second):
        pass
    assert info.value.__context__ is error
    assert where(first) == where(second) == {CPU}


def test_error_while_releasing_is_a_note_on_the_user_error(fake_gpu: FakeGPU) -> None:
    """An ordinary Exception from offloading while the user's error propagates: the user's error, with a note."""
    m, user_error = Brittle(4, 4), ValueError("user")
    Brittle.error = RuntimeError("offload broke")
    with pytest.raises(ValueError) as info, on_gpu(m):
        raise user_error
    assert info.value is user_error
    assert any("offload broke" in note for note in getattr(user_error, "__notes__", []))


def test_error_while_releasing_without_user_error_is_raised(fake_gpu: FakeGPU) -> None:
    """An Exception from offloading after a clean block is raised itself."""
    m = Brittle(4, 4)
    Brittle.error = RuntimeError("offload broke")
    with pytest.raises(RuntimeError, match="offload broke"), on_gpu(m):
        pass


# --------------------------------------------------------------------------- device memory left behind


@pytest.fixture(autouse=True)
def _fresh_warning_sites() -> Iterator[None]:
    """Each test sees every call site as not yet warned about."""
    scope._warned_sites.clear()
    yield
    scope._warned_sites.clear()


def wide() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 4))


def retained(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeviceMemoryRetainedWarning)]


def test_memory_allocated_on_the_fake_gpu_and_cpu(fake_gpu: FakeGPU) -> None:
    """devices.memory_allocated follows the fake GPU's ledger (from its Backend's mem_get_info); the CPU raises."""
    base = devices.memory_allocated(None)
    assert base == fake_gpu.memory_allocated()
    t = torch.empty(2**20, dtype=torch.uint8, device=fake_gpu.device)
    assert devices.memory_allocated("fakegpu:0") == base + 2**20
    del t
    with pytest.raises(ondevice.InvalidDeviceError, match="cannot query allocated memory on cpu"):
        devices.memory_allocated("cpu")


def test_result_with_autograd_graph_warns_once_with_the_amount(fake_gpu: FakeGPU) -> None:
    """A forward with grad enabled whose output is kept: one warning naming the bytes held, the device and the cause."""
    m = wide()
    base = fake_gpu.memory_allocated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with on_gpu(m) as s:
            out = m(torch.randn(256, 1024).to(s.device))
        held = fake_gpu.memory_allocated() - base
    assert out.requires_grad
    assert held > RETAINED_WARNING_BYTES
    [message] = retained(caught)
    assert f"{held} bytes" in message
    assert "fakegpu:0" in message
    assert "torch.inference_mode()" in message
    assert [w.filename for w in caught if w.category is DeviceMemoryRetainedWarning] == [__file__]
    del out
    assert fake_gpu.memory_allocated() == base


def test_same_result_under_inference_mode_does_not_warn(fake_gpu: FakeGPU) -> None:
    """The same forward under torch.inference_mode() keeps only its small output: no warning."""
    m = wide()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with on_gpu(m) as s, torch.inference_mode():
            out = m(torch.randn(256, 1024).to(s.device))
    assert out.device == fake_gpu.device
    assert retained(caught) == []


def test_device_outputs_kept_on_purpose_under_inference_mode_do_not_warn(fake_gpu: FakeGPU) -> None:
    """A scope run wholly under inference_mode whose big output stays on the device (as --gpu-only keeps
    ComfyUI's outputs there): no autograd graph can be the cause, so no warning."""
    m = wide()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode(), on_gpu(m) as s:
            out = torch.zeros(1024, 1024, device=s.device) + m(torch.randn(256, 1024).to(s.device)).sum()
    assert out.device == fake_gpu.device and out.nbytes > RETAINED_WARNING_BYTES
    assert retained(caught) == []


def test_one_warning_per_call_site(fake_gpu: FakeGPU) -> None:
    """Two exits of the same with statement that both leave memory behind warn once."""
    m = wide()
    kept = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with on_gpu(m) as s:
                kept.append(m(torch.randn(256, 1024).to(s.device)))
    assert len(retained(caught)) == 1


def test_only_the_outermost_exit_checks(fake_gpu: FakeGPU) -> None:
    """An inner exit while an outer scope holds the device does not warn; the outer exit does."""
    m, other = wide(), net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with on_gpu(other) as s:
            with on_gpu(m):
                out = m(torch.randn(256, 1024).to(s.device))
            assert retained(caught) == []
    assert len(retained(caught)) == 1
    del out


def test_decorated_function_warns_at_its_definition(fake_gpu: FakeGPU) -> None:
    """A gpu_scoped function returning a result with an autograd graph warns once, pointing at the function."""
    m = wide()

    @gpu_scoped
    def forward(model: torch.nn.Module) -> torch.Tensor:
        out: torch.Tensor = model(torch.randn(256, 1024).to(fake_gpu.device))
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [forward(m), forward(m)]
    [warning] = [w for w in caught if issubclass(w.category, DeviceMemoryRetainedWarning)]
    assert warning.filename == __file__
    del kept


def test_comfyui_vae_decode_outside_inference_mode_warns(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """Real ComfyUI: VAE.decode with grad enabled warns after the scope; under inference_mode it does not."""
    latent = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with on_gpu(sd15.vae), torch.inference_mode():
            sd15.vae.decode(latent)
        assert retained(caught) == []
        with on_gpu(sd15.vae):
            image = sd15.vae.decode(latent)
    assert image.requires_grad
    [message] = retained(caught)
    assert "fakegpu:0" in message
    del image


def test_models_comfyui_keeps_loaded_are_not_reported(fake_gpu: FakeGPU, sd15_checkpoint: Any) -> None:
    """A vae.decode inside on_gpu(model) makes ComfyUI load the VAE and keep it: no retained-memory warning."""
    mm = sys.modules["comfy.model_management"]
    ckpt = ondevice.load_checkpoint(sd15_checkpoint)  # loaded while the fake GPU is active: it is their GPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with on_gpu(ckpt.model), torch.inference_mode():
            ckpt.vae.decode(torch.randn(1, 4, 8, 8))
        kept = [entry.model for entry in mm.current_loaded_models if entry.device == fake_gpu.device]
        assert [p for p in kept if p is ckpt.vae.patcher]  # ComfyUI kept the VAE it loaded itself
        assert retained(caught) == []
    mm.unload_all_models()
