"""Sharing small fake GPUs: waiting threads and asyncio tasks, keeps, eviction, two devices, rollback of a load that
runs out of memory, and bad arguments; real modules (and ComfyUI's VAE) on fake GPUs with exact memory accounting."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import ondevice
from ondevice import InvalidArgumentError, OutOfDeviceMemory, gpu_scoped, on_gpu
from ondevice.residency import table
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU, capture_moves, fake_gpu
from tests._threads import run_threads

CPU = torch.device("cpu")
WIDTH = 128


def linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(WIDTH, WIDTH)


SIZE = sum(t.numel() * t.element_size() for t in linear(0).parameters())  # bytes of one component
HEADROOM = SIZE // 2  # room for the forwards' activations; less than a component


def where(component: Any) -> set[torch.device]:
    return set(ondevice.placement(component))


@pytest.fixture
def small_gpu() -> Iterator[FakeGPU]:
    """A fake GPU that fits two components (and activations), not three."""
    with fake_gpu(2 * SIZE + HEADROOM) as gpu:
        yield gpu
        assert table._pending == {} and table._rooms == {}


class Peak:
    """Samples device memory on a thread while active: the highest allocation seen."""

    def __init__(self, gpu: FakeGPU, index: int = 0) -> None:
        self.gpu, self.index, self.peak = gpu, index, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.gpu.memory_allocated(self.index))
            time.sleep(0.0002)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# --------------------------------------------------------------------------- threads and tasks waiting for room


def test_eight_threads_wait_for_room_on_a_gpu_that_fits_two_of_four(small_gpu: FakeGPU) -> None:
    """8 threads x 12 scopes on random pairs of 4 modules with wait=True, on a GPU that fits 2: memory never above
    capacity (the fake GPU raises past it; the sampled peak too), every thread finishes, all ends on the CPU."""
    models = [linear(i) for i in range(4)]
    x = torch.randn(2, WIDTH)
    with torch.inference_mode():
        want = [m(x) for m in models]
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            picked = rng.sample(range(4), rng.randint(1, 2))
            try:
                with on_gpu(*(models[i] for i in picked), wait=True, timeout=60), torch.inference_mode():
                    for i in picked:
                        out = models[i](x.to(small_gpu.device)).cpu()
                        if not torch.allclose(out, want[i]):
                            failures.append(f"module {i} computed wrong")
            except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
                failures.append(repr(exc))

    with Peak(small_gpu) as peak:
        run_threads(work, ((seed,) for seed in range(8)))
    assert failures == []
    assert 0 < peak.peak <= small_gpu.memory
    assert all(where(m) == {CPU} for m in models)
    assert small_gpu.memory_allocated() == 0 and table.held() == []


def test_async_tasks_wait_for_room_without_blocking_the_loop(small_gpu: FakeGPU) -> None:
    """Two tasks on one loop: the second waits (async with, wait=True) for the first's room while a third keeps
    ticking; the waiter's claims are its task's, and all ends on the CPU."""
    a, b, c = linear(0), linear(1), linear(2)
    seen: dict[str, Any] = {}

    async def holder() -> None:
        async with on_gpu(a, b):
            seen["held"] = True
            await asyncio.sleep(0.3)
            seen["left_at"] = ticks

    async def waiter() -> None:
        while "held" not in seen:
            await asyncio.sleep(0.001)
        seen["wait_from"] = ticks
        async with on_gpu(c, wait=True, timeout=30):
            seen["entered_at"] = ticks
            seen["held_then"] = [h.key for h in table.held() if h.key is a or h.key is b]
            (holding,) = [h for h in table.held() if h.key is c]
            seen["owner_task"] = holding.owners[0].task
            seen["task"] = asyncio.current_task()
            seen["where"] = where(c)

    ticks = 0

    async def ticker(done: asyncio.Event) -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> None:
        done = asyncio.Event()
        tick = asyncio.create_task(ticker(done))
        await asyncio.gather(holder(), waiter())
        done.set()
        await tick

    asyncio.run(main())
    assert seen["left_at"] - seen["wait_from"] >= 2  # the loop kept running while the waiter waited for room
    # it entered once the holder's block had ended and its claims were gone (the holder's own `async with` may
    # return to the loop a tick after the waiter's, once the release has made room)
    assert seen["entered_at"] >= seen["left_at"] and seen["held_then"] == []
    assert seen["owner_task"] is seen["task"]
    assert seen["where"] == {small_gpu.device}
    assert where(a) == where(b) == where(c) == {CPU} and small_gpu.memory_allocated() == 0


def test_a_cancelled_async_wait_holds_nothing(small_gpu: FakeGPU) -> None:
    """A task cancelled while it waits for room in async with raises CancelledError and holds nothing afterwards."""
    a, b, c = linear(0), linear(1), linear(2)

    async def main() -> None:
        async with on_gpu(a, b):
            task = asyncio.create_task(_enter_and_stay(c))
            await _until_waiting(task)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not table.waiting()

    asyncio.run(main())
    assert where(c) == {CPU} and table.held() == [] and small_gpu.memory_allocated() == 0


async def _until_waiting(task: asyncio.Task[Any] | None = None) -> None:
    """Let the loop run until the table lists a wait (on its own thread), failing if ``task`` ends first."""
    deadline = time.monotonic() + 30
    while not table.waiting():
        assert task is None or not task.done(), task
        assert time.monotonic() < deadline, "the task never waited for room"
        await asyncio.sleep(0.005)


async def _enter_and_stay(component: Any) -> None:
    async with on_gpu(component, wait=True):
        await asyncio.sleep(60)


def test_a_decorated_coroutine_waits_for_room_on_a_thread(small_gpu: FakeGPU) -> None:
    """@on_gpu(..., wait=True) on an async def enters asynchronously: it waits while the loop runs the holder."""
    a, b, c = linear(0), linear(1), linear(2)
    order: list[str] = []

    @on_gpu(c, wait=True, timeout=30)
    async def use_c() -> set[torch.device]:
        order.append("c")
        return where(c)

    held = asyncio.Event()

    async def hold() -> None:
        async with on_gpu(a, b):
            held.set()
            await _until_waiting()  # the loop runs this while use_c waits for room on its thread
            order.append("ab")

    async def main() -> set[torch.device]:
        holder = asyncio.create_task(hold())
        await held.wait()
        result = await use_c()
        await holder
        return result

    assert asyncio.run(main()) == {small_gpu.device}
    assert order == ["ab", "c"] and small_gpu.memory_allocated() == 0


def test_without_wait_a_scope_that_does_not_fit_raises_with_the_numbers(small_gpu: FakeGPU) -> None:
    """A third module while another thread holds two: OutOfDeviceMemory (a MemoryError) with needed, free, held by
    whom; nothing moved for it."""
    a, b, c = linear(0), linear(1), linear(2)
    errors: list[BaseException] = []
    with on_gpu(a, b):
        t = threading.Thread(target=lambda: _catch(errors, lambda: on_gpu(c).__enter__()))
        t.start()
        t.join(30)
    (error,) = errors
    assert isinstance(error, OutOfDeviceMemory) and isinstance(error, MemoryError)
    assert (error.device, error.needed, error.free) == (small_gpu.device, SIZE, HEADROOM)
    assert [(name, nbytes) for name, nbytes, _ in error.held] == [("ModulePart(Linear)", SIZE)] * 2
    assert all("MainThread" in holder for _, _, holder in error.held)
    assert where(c) == {CPU} and small_gpu.memory_allocated() == 0


def _catch(errors: list[BaseException], step: Any) -> None:
    try:
        step()
    except BaseException as exc:  # noqa: BLE001  (returned to the test)
        errors.append(exc)


def test_a_nested_wait_on_this_threads_own_memory_raises_at_once(small_gpu: FakeGPU) -> None:
    """with on_gpu(a, b): with on_gpu(c, wait=True) on one thread cannot ever fit: it raises instead of hanging."""
    a, b, c = linear(0), linear(1), linear(2)
    started = time.monotonic()
    with on_gpu(a, b), pytest.raises(OutOfDeviceMemory, match="waiting could never end"), on_gpu(c, wait=True):
        pytest.fail("the block must not run")
    assert time.monotonic() - started < 10
    assert small_gpu.memory_allocated() == 0


# --------------------------------------------------------------------------- keeps and eviction


def test_keep_true_makes_the_next_scope_move_nothing(small_gpu: FakeGPU) -> None:
    """on_gpu(a, keep=True): a stays after exit; a second scope copies 0 bytes; ondevice.release(a) offloads it."""
    a = linear(0)
    with on_gpu(a, keep=True):
        pass
    assert where(a) == {small_gpu.device}
    copied = small_gpu.bytes_to_device
    with capture_moves() as moves, on_gpu(a):
        pass
    assert small_gpu.bytes_to_device == copied and moves == []
    assert where(a) == {small_gpu.device}
    ondevice.release(a)
    assert where(a) == {CPU} and small_gpu.memory_allocated() == 0


def test_kept_components_are_evicted_least_recently_used_first(small_gpu: FakeGPU) -> None:
    """Two kept modules fill the GPU; a third scope evicts the one used longest ago and keeps the other."""
    a, b, c = linear(0), linear(1), linear(2)
    ondevice.keep(a)
    ondevice.keep(b)
    with on_gpu(a):  # a used last
        pass
    with capture_moves() as moves, on_gpu(c):
        assert where(a) == {small_gpu.device} and where(b) == {CPU}
    assert [(m.component, m.target.type) for m in moves] == [
        ("ModulePart(Linear)", "cpu"),  # b evicted
        ("ModulePart(Linear)", "fakegpu"),  # c loaded
        ("ModulePart(Linear)", "cpu"),  # c offloaded at exit
    ]
    ondevice.release(a, b)
    assert where(a) == {CPU} and small_gpu.memory_allocated() == 0


def test_comfyui_vae_kept_moves_nothing_the_second_time(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """ondevice.keep(vae) on ComfyUI's VAE: a scope on it moves 0 bytes; release puts it back on the CPU."""
    vae = sd15.vae
    ondevice.keep(vae)
    try:
        copied = fake_gpu.bytes_to_device
        with capture_moves() as moves, on_gpu(vae):
            assert where(vae) == {fake_gpu.device}
        assert moves == [] and fake_gpu.bytes_to_device == copied
    finally:
        ondevice.release(vae)
    assert where(vae) == {CPU} and table.held() == []


# --------------------------------------------------------------------------- several devices


def test_kept_on_one_gpu_then_asked_for_on_another_moves_it() -> None:
    """keep(a) on fakegpu:0, then on_gpu(a, device="fakegpu:1"): offloaded from 0, loaded on 1; memory per device."""
    a = linear(0)
    with fake_gpu(2 * SIZE + HEADROOM, device_count=2) as gpu:
        ondevice.keep(a, device="fakegpu:0")
        assert (gpu.memory_allocated(0), gpu.memory_allocated(1)) == (SIZE, 0)
        with on_gpu(a, device="fakegpu:1"):
            assert where(a) == {torch.device("fakegpu", 1)}
            assert (gpu.memory_allocated(0), gpu.memory_allocated(1)) == (0, SIZE)
        assert where(a) == {torch.device("fakegpu", 1)}  # still kept, where it was used last
        ondevice.release(a)
        assert (gpu.memory_allocated(0), gpu.memory_allocated(1)) == (0, 0)
    assert where(a) == {CPU}


def test_each_gpu_has_its_own_room() -> None:
    """Two modules fill fakegpu:0; a third scope on fakegpu:1 fits there at once."""
    a, b, c = linear(0), linear(1), linear(2)
    with (
        fake_gpu(2 * SIZE + HEADROOM, device_count=2) as gpu,
        on_gpu(a, b, device="fakegpu:0"),
        on_gpu(c, device="fakegpu:1"),
    ):
        assert (gpu.memory_allocated(0), gpu.memory_allocated(1)) == (2 * SIZE, SIZE)
    assert where(a) == where(b) == where(c) == {CPU}


# --------------------------------------------------------------------------- faults


class Undercounted(torch.nn.Sequential):
    """A model whose part says it needs a quarter of what it does (ComfyUI's headroom, fragmentation)."""


class UndercountedPart(ModulePart):
    def nbytes(self) -> int:
        return super().nbytes() // 4


ondevice.register_strategy(Undercounted, SimpleNamespace(parts=lambda c: [UndercountedPart(c)]))


def test_a_load_that_runs_out_of_memory_rolls_back_to_the_exact_baseline() -> None:
    """on_gpu(a, b) where b's load runs out of memory halfway: a goes back to the CPU, device memory returns to the
    exact baseline (a tensor allocated before stays), OutOfDeviceMemory names b, its cause torch's error."""
    a = linear(0)
    b = Undercounted(*(linear(i) for i in range(1, 5)))
    with fake_gpu(SIZE + 2 * SIZE + 4096) as gpu:
        kept_by_user = torch.ones(256, device=gpu.device)
        baseline = gpu.memory_allocated()
        with pytest.raises(OutOfDeviceMemory, match=r"loading ModulePart\(Undercounted\)") as info, on_gpu(a, b):
            pytest.fail("the block must not run")
        assert gpu.memory_allocated() == baseline
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
        assert where(a) == where(b) == {CPU} and table.held() == []
        del kept_by_user


class Brittle(torch.nn.Linear):
    """A module whose part offloads, then raises (once)."""

    broken = True


class BrittlePart(ModulePart):
    def offload(self) -> None:
        super().offload()
        if Brittle.broken:
            Brittle.broken = False
            msg = "offload broke"
            raise RuntimeError(msg)


ondevice.register_strategy(Brittle, SimpleNamespace(parts=lambda c: [BrittlePart(c)]))


def test_an_offload_error_is_chained_to_the_user_error_and_the_rest_still_offloads(small_gpu: FakeGPU) -> None:
    """The user's error propagates with a note; the offload error's context is it; the other module is offloaded."""
    Brittle.broken = True
    a, brittle, user_error = linear(0), Brittle(WIDTH, WIDTH), ValueError("user")
    with pytest.raises(ValueError) as info, on_gpu(a, brittle):
        raise user_error
    assert info.value is user_error
    assert any("offload broke" in note for note in getattr(user_error, "__notes__", []))
    assert where(a) == where(brittle) == {CPU} and small_gpu.memory_allocated() == 0


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"timeout": -1, "wait": True}, "timeout=-1"),
        ({"timeout": 5}, "without wait=True"),
        ({"timeout": float("nan"), "wait": True}, "timeout=nan"),
        ({"budget": "6 parsecs"}, "budget='6 parsecs'"),
        ({"budget": 0}, "budget=0"),
        ({"budget": True}, "budget=True"),
        ({"budget": 1.5}, "budget=1.5"),
        ({"keep": "yes"}, "keep='yes'"),
        ({"wait": 1}, "wait=1"),
        ({"partial": None}, "partial=None"),
    ],
)
def test_bad_scope_arguments_raise_before_anything_moves(
    small_gpu: FakeGPU, kwargs: dict[str, Any], named: str
) -> None:
    """on_gpu and gpu_scoped check keep, wait, timeout, budget and partial when built: InvalidArgumentError naming the
    argument; nothing moves."""
    a = linear(0)
    with capture_moves() as moves:
        with pytest.raises(InvalidArgumentError, match=named.replace("(", r"\(").replace(".", r"\.")):
            on_gpu(a, **kwargs)
        with pytest.raises(InvalidArgumentError, match="gpu_scoped"):
            gpu_scoped("model", **kwargs)
    assert moves == [] and where(a) == {CPU}


def test_budgets_are_parsed_and_shown(small_gpu: FakeGPU) -> None:
    """budget='1.5KiB' is 1,536 bytes, as repr shows; a budget larger than the module loads it whole."""
    assert repr(on_gpu(linear(0), budget="1.5KiB", wait=True)) == (
        "on_gpu(Linear, device=None, wait=True, budget=1536)"
    )
    a = linear(0)
    with on_gpu(a, budget="1MiB"):
        assert where(a) == {small_gpu.device}
    assert where(a) == {CPU}
