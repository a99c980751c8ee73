"""The fake GPU's pinned host memory, streams and events: late copies make a missing wait compute wrong numbers."""

from __future__ import annotations

import functools
import gc
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
import torch

from ondevice.testing import fake_gpu, fakegpu
from tests.testing.test_fakegpu import _InterruptAt

F0 = "fakegpu:0"
F1 = "fakegpu:1"


@pytest.fixture(autouse=True)
def backend() -> Iterator[None]:
    """Two fake devices, no pinned cap; every late copy landed and the default streams current afterwards."""
    fakegpu.install()
    fakegpu.set_device_count(2)
    yield
    for index in range(fakegpu.device_count()):
        fakegpu.synchronize(index)
        fakegpu.set_stream(fakegpu.default_stream(index))
    fakegpu.set_device_count(1)
    fakegpu.set_pinned_limit(None)


def pinned_now() -> int:
    gc.collect()
    return fakegpu.pinned_bytes()


def is_nan(tensor: torch.Tensor) -> bool:
    return bool(torch.isnan(tensor.cpu()).all())


# ---------------------------------------------------------------- pinned host memory


def test_pin_memory_returns_a_pinned_copy() -> None:
    """pin_memory() gives a pinned copy with the same data; its views are pinned, the original is not."""
    x = torch.arange(6.0).reshape(2, 3)
    p = x.pin_memory()
    assert p.is_pinned()
    assert p[1].is_pinned()
    assert not x.is_pinned()
    assert p.data_ptr() != x.data_ptr()
    assert torch.equal(p, x)
    assert p.pin_memory() is p  # pinning a pinned tensor returns it, as on CUDA


def test_pinned_bytes_count_power_of_two_blocks_until_the_storage_dies() -> None:
    """pinned_bytes() counts a pin_memory() block rounded up to a power of two, until its last view dies."""
    before = pinned_now()
    p = torch.empty(300, dtype=torch.uint8).pin_memory()
    view = p[10:20]
    assert pinned_now() - before == 512
    del p
    assert pinned_now() - before == 512  # the view keeps the storage
    del view
    assert pinned_now() == before


def test_host_register_pins_in_place_and_unregisters() -> None:
    """host_register pins a tensor's storage without a copy or rounding; host_unregister undoes it."""
    before = pinned_now()
    flat = torch.zeros(300, dtype=torch.uint8)
    weight = flat[100:200].view(torch.float16)  # a parameter re-pointed into the flat buffer
    fakegpu.host_register(flat)
    assert weight.is_pinned()
    assert weight.pin_memory() is weight
    assert pinned_now() - before == 300
    with pytest.raises(RuntimeError, match="already pinned"):
        fakegpu.host_register(weight)
    fakegpu.host_unregister(flat)
    assert not weight.is_pinned()
    assert pinned_now() == before
    with pytest.raises(RuntimeError, match="not pinned by host_register"):
        fakegpu.host_unregister(flat)


def test_host_register_refuses_device_tensors() -> None:
    """host_register of a fake tensor raises TypeError naming its device."""
    with pytest.raises(TypeError, match="must be a CPU tensor; got fakegpu:0"):
        fakegpu.host_register(torch.zeros(2, device=F0))


def test_pinned_limit_raises_and_pins_nothing() -> None:
    """Past set_pinned_limit, pin_memory and host_register raise RuntimeError and pin nothing."""
    before = pinned_now()
    fakegpu.set_pinned_limit(before + 1024)
    kept = torch.empty(1000, dtype=torch.uint8).pin_memory()  # 1024 bytes: fits exactly
    assert fakegpu.pinned_limit() == before + 1024
    with pytest.raises(RuntimeError, match="out of memory: cannot pin"):
        torch.empty(1, dtype=torch.uint8).pin_memory()
    with pytest.raises(RuntimeError, match="out of memory: cannot pin"):
        fakegpu.host_register(torch.empty(1, dtype=torch.uint8))
    assert pinned_now() - before == 1024
    del kept
    assert torch.empty(1, dtype=torch.uint8).pin_memory().is_pinned()  # room again once freed


def test_set_pinned_limit_refuses_a_bad_limit() -> None:
    """set_pinned_limit accepts bytes >= 0 or None, and raises ValueError naming anything else."""
    with pytest.raises(ValueError, match="limit=-1 is not a pinned-memory cap"):
        fakegpu.set_pinned_limit(-1)


def test_device_tensors_are_never_pinned() -> None:
    """A fake tensor is not pinned, and pinning it raises like CUDA."""
    f = torch.ones(2, device=F0)
    assert not f.is_pinned()
    with pytest.raises(RuntimeError, match="only dense CPU tensors can be pinned"):
        f.pin_memory()


def test_non_blocking_copy_to_the_cpu_returns_pinned_memory() -> None:
    """t.to('cpu', non_blocking=True) returns pinned memory, as on CUDA; a blocking one pageable memory."""
    f = torch.arange(4.0, device=F0)
    assert f.to("cpu", non_blocking=True).is_pinned()
    assert not f.to("cpu").is_pinned()


def test_counters_split_pinned_from_pageable() -> None:
    """Bytes to the device from pinned memory and back into pinned memory are counted apart."""
    fakegpu.stats.reset()
    pageable = torch.ones(8)
    pinned = pageable.pin_memory()
    pageable.to(F0)
    f = pinned.to(F0, non_blocking=True)
    f.to("cpu", non_blocking=True)
    pageable.copy_(f)
    stats = fakegpu.stats
    assert (stats.to_fake_bytes, stats.to_fake_pinned_bytes) == (64, 32)
    assert (stats.to_cpu_bytes, stats.to_cpu_pinned_bytes) == (64, 32)
    stats.reset()
    assert stats.to_fake_pinned_bytes == stats.to_cpu_pinned_bytes == 0


# ---------------------------------------------------------------- late copies


def test_default_stream_copies_are_synchronous() -> None:
    """A non_blocking copy on the default stream has its data at once."""
    pinned = torch.arange(4.0).pin_memory()
    f = pinned.to(F0, non_blocking=True)
    assert fakegpu.current_stream(F0) == fakegpu.default_stream(F0)
    assert (f * 2).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_side_stream_copy_is_garbage_until_the_stream_is_synchronized() -> None:
    """A non_blocking copy on a side stream reads as NaN until the stream is synchronized."""
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        f = torch.arange(4.0).pin_memory().to(F0, non_blocking=True)
    assert is_nan(f * 2)  # no wait: the kernel reads the destination before the copy landed
    side.synchronize()
    assert (f * 2).tolist() == [0.0, 2.0, 4.0, 6.0]


def test_event_wait_orders_the_copy_before_later_work() -> None:
    """An event recorded after the copy and waited for by the default stream makes the next op see the data."""
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        f = torch.arange(3.0).pin_memory().to(F0, non_blocking=True)
        ready = torch.fakegpu.Event()
        ready.record()
    ready.wait()  # the current (default) stream waits; the host does not
    assert (f + 1).tolist() == [1.0, 2.0, 3.0]


def test_event_synchronize_and_query() -> None:
    """Event.query is True only once the copy landed (a False answer lets it land); synchronize lands it."""
    side = torch.fakegpu.Stream()
    first, second = torch.fakegpu.Event(), torch.fakegpu.Event()
    assert first.query()  # never recorded
    with torch.fakegpu.stream(side):
        a = torch.ones(2).pin_memory().to(F0, non_blocking=True)
        first.record()
        b = torch.ones(2).pin_memory().to(F0, non_blocking=True)
        second.record(side)
    assert not first.query()
    assert first.query()
    assert a.tolist() == [1.0, 1.0]
    assert is_nan(b)  # the later copy is not covered by the first event
    second.synchronize()
    assert b.tolist() == [1.0, 1.0]
    assert side.query()


def test_wait_stream_covers_only_work_issued_before_it() -> None:
    """wait_stream orders the work issued on the other stream so far, not what is issued there later."""
    side = torch.fakegpu.Stream()
    default = torch.fakegpu.current_stream()
    with torch.fakegpu.stream(side):
        before = torch.full((2,), 5.0).pin_memory().to(F0, non_blocking=True)
    default.wait_stream(side)
    with torch.fakegpu.stream(side):
        after = torch.full((2,), 7.0).pin_memory().to(F0, non_blocking=True)
    assert (before + 0).tolist() == [5.0, 5.0]
    assert is_nan(after + 0)


def test_side_stream_work_sees_its_own_earlier_copies() -> None:
    """An op run on the side stream itself comes after that stream's copies (stream order)."""
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        f = torch.arange(3.0).pin_memory().to(F0, non_blocking=True)
        doubled = f * 2
    assert doubled.tolist() == [0.0, 2.0, 4.0]


def test_a_blocking_copy_waits_for_its_stream() -> None:
    """A blocking copy on a side stream waits for the stream's earlier copies, as the host waits on CUDA."""
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        early = torch.ones(2).pin_memory().to(F0, non_blocking=True)
        torch.zeros(2).to(F0)
    assert (early + 0).tolist() == [1.0, 1.0]


def test_device_synchronize_lands_every_stream() -> None:
    """torch.fakegpu.synchronize(device) lands the copies of every stream of that device only."""
    s0, s1 = torch.fakegpu.Stream(F0), torch.fakegpu.Stream(F1)
    with torch.fakegpu.stream(s0), torch.fakegpu.stream(s1):
        a = torch.ones(2).pin_memory().to(F0, non_blocking=True)
        b = torch.ones(2).pin_memory().to(F1, non_blocking=True)
    torch.fakegpu.synchronize(F0)
    assert a.tolist() == [1.0, 1.0]
    assert is_nan(b)
    torch.fakegpu.synchronize(1)
    assert b.tolist() == [1.0, 1.0]


def test_pinned_source_is_read_when_the_copy_lands() -> None:
    """Overwriting a pinned source before the wait changes what lands; a pageable source is read when issued."""
    side = torch.fakegpu.Stream()
    pinned, pageable = torch.zeros(2).pin_memory(), torch.zeros(2)
    with torch.fakegpu.stream(side):
        from_pinned = pinned.to(F0, non_blocking=True)
        from_pageable = pageable.to(F0, non_blocking=True)
    pinned.fill_(9.0)  # the staging buffer reused too early: a real race on CUDA
    pageable.fill_(9.0)
    side.synchronize()
    assert from_pinned.tolist() == [9.0, 9.0]
    assert from_pageable.tolist() == [0.0, 0.0]


def test_device_to_host_copy_into_pinned_memory_lands_late() -> None:
    """A non_blocking copy to pinned host memory on a side stream leaves NaN there until synchronized."""
    f = torch.arange(3.0, device=F0)
    pinned, pageable = torch.zeros(3).pin_memory(), torch.zeros(3)
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        pinned.copy_(f, non_blocking=True)
        returned = f.to("cpu", non_blocking=True)
    assert torch.isnan(pinned).all()
    assert torch.isnan(returned).all()
    side.synchronize()
    assert pinned.tolist() == returned.tolist() == [0.0, 1.0, 2.0]
    with torch.fakegpu.stream(side):
        pinned.copy_(f + 1, non_blocking=True)
        pageable.copy_(f, non_blocking=True)  # into pageable memory: the host waits for the stream, then copies
    assert pinned.tolist() == [1.0, 2.0, 3.0]
    assert pageable.tolist() == [0.0, 1.0, 2.0]


def test_integer_destinations_get_all_bits_set() -> None:
    """A late integer or bool destination reads as all bits set until it lands."""
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        ints = torch.zeros(2, dtype=torch.int64).pin_memory().to(F0, non_blocking=True)
        bytes_ = torch.zeros(2, dtype=torch.uint8).pin_memory().to(F0, non_blocking=True)
    assert ints.elem.tolist() == [-1, -1]
    assert bytes_.elem.tolist() == [255, 255]


def test_module_prefetch_without_a_wait_computes_nan() -> None:
    """A module moved on a side stream computes NaN if used without a wait, the CPU's result with one."""
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    want = linear(x).detach()
    for param in linear.parameters():
        param.data = param.data.pin_memory()
    side = torch.fakegpu.Stream()
    with torch.no_grad():
        with torch.fakegpu.stream(side):
            fast = linear.to(F0, non_blocking=True)
        assert is_nan(fast(x.to(F0)))
        torch.fakegpu.synchronize()
        with torch.fakegpu.stream(side):
            fast = fast.to("cpu").to(F0, non_blocking=True)
        torch.fakegpu.current_stream().wait_stream(side)
        torch.testing.assert_close(fast(x.to(F0)).cpu(), want)


def test_memory_accounting_is_exact_with_late_copies() -> None:
    """Late copies are charged when issued; a destination dropped before it lands is released; nothing drifts."""
    gc.collect()
    base = fakegpu.memory_allocated(F0)
    side = torch.fakegpu.Stream()
    with torch.fakegpu.stream(side):
        kept = torch.ones(256).pin_memory().to(F0, non_blocking=True)
        dropped = torch.ones(512).pin_memory().to(F0, non_blocking=True)
        torch.zeros(8, device=F0).copy_(torch.ones(8).pin_memory(), non_blocking=True)  # a temporary
    gc.collect()
    assert fakegpu.memory_allocated(F0) - base == 256 * 4 + 512 * 4
    del dropped
    gc.collect()
    assert fakegpu.memory_allocated(F0) - base == 256 * 4
    side.synchronize()  # landing into a dead destination changes no books
    assert kept.tolist() == [1.0] * 256
    assert fakegpu.memory_allocated(F0) - base == 256 * 4
    del kept
    gc.collect()
    assert fakegpu.memory_allocated(F0) == base


def test_current_stream_is_per_thread() -> None:
    """A stream made current in one thread is not current in another, whose copies stay synchronous."""
    side = torch.fakegpu.Stream()
    seen: list[object] = []

    def other() -> None:
        seen.append(torch.fakegpu.current_stream())
        seen.append(torch.ones(2).pin_memory().to(F0, non_blocking=True).tolist())

    with torch.fakegpu.stream(side):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert torch.fakegpu.current_stream() == side
    assert seen == [torch.fakegpu.default_stream(), [1.0, 1.0]]


def test_threads_issue_and_wait_concurrently() -> None:
    """Threads each prefetching on their own stream and waiting get their own data, and memory stays exact."""
    gc.collect()
    base = fakegpu.memory_allocated(F0)
    results: dict[int, list[float]] = {}

    def work(n: int) -> None:
        side = torch.fakegpu.Stream()
        for _ in range(20):
            with torch.fakegpu.stream(side):
                f = torch.full((64,), float(n)).pin_memory().to(F0, non_blocking=True)
            torch.fakegpu.current_stream().wait_stream(side)
            results[n] = sorted(set((f + 0).tolist()))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {n: [float(n)] for n in range(4)}
    gc.collect()
    assert fakegpu.memory_allocated(F0) == base


def test_streams_and_events_are_torch_streams_and_events() -> None:
    """The device module (torch.get_device_module) offers Stream/Event, which are torch.Stream/torch.Event."""
    module = torch.get_device_module("fakegpu")
    side = module.Stream(F1)
    event = side.record_event()
    assert isinstance(side, torch.Stream)
    assert isinstance(event, torch.Event)
    assert side.device == torch.device(F1)
    assert module.default_stream(F0) == torch.Stream(F0)  # torch's own fakegpu stream is the default stream
    with side:
        assert module.current_stream(F1) == side
        assert module.current_stream(F0) == module.default_stream(F0)
    assert module.current_stream(F1) == module.default_stream(F1)


def test_foreign_streams_and_events_are_refused() -> None:
    """A stream or event that is not the fake device's raises TypeError saying how to make one."""
    side = torch.fakegpu.Stream()
    with pytest.raises(TypeError, match=r"create one with torch.fakegpu.Stream\(\)"):
        torch.fakegpu.set_stream(torch.Stream(stream_id=99, device_index=0, device_type=side.device_type))
    with pytest.raises(TypeError, match=r"create one with torch.fakegpu.Event\(\)"):
        side.wait_event(torch.Event("fakegpu"))


def test_event_elapsed_time_needs_timing_and_records() -> None:
    """elapsed_time needs enable_timing=True and two records, as on CUDA, and then is >= 0 ms."""
    start, end = torch.fakegpu.Event(enable_timing=True), torch.fakegpu.Event(enable_timing=True)
    with pytest.raises(RuntimeError, match="must be recorded"):
        start.elapsed_time(end)
    start.record()
    end.record()
    assert start.elapsed_time(end) >= 0.0
    with pytest.raises(RuntimeError, match="enable_timing=True"):
        torch.fakegpu.Event().elapsed_time(end)


def test_record_stream_and_waiting_for_an_unrecorded_event_do_nothing() -> None:
    """record_stream is accepted (no caching allocator), and waiting for a never-recorded event queues nothing."""
    side = torch.fakegpu.Stream()
    f = torch.ones(2, device=F0)
    f.record_stream(side)
    side.wait_event(torch.fakegpu.Event())
    assert side.query()


def test_module_docstring_example_runs() -> None:
    """The example in fakegpu's module docstring runs as written (its prefetch computes the right numbers)."""
    assert fakegpu.__doc__ is not None
    example = textwrap.dedent(fakegpu.__doc__.split("Example::", 1)[1])
    exec(compile(example, "fakegpu-docstring", "exec"), {"torch": torch, "install": fakegpu.install})  # noqa: S102


def test_fake_gpu_handle_sets_the_pinned_cap_and_lands_copies_at_stop() -> None:
    """fake_gpu(pinned_limit=...) caps pinning while active; stop() lands late copies and lifts the cap."""
    fakegpu.set_device_count(1)
    used = fakegpu.pinned_bytes()  # models of earlier tests may still be alive, and pinned
    gpu = fake_gpu(pinned_limit=used + 1024)
    with gpu:
        assert fakegpu.pinned_limit() == used + 1024
        side = torch.fakegpu.Stream()
        with torch.fakegpu.stream(side):
            f = torch.ones(4).pin_memory().to(gpu.device, non_blocking=True)
        assert gpu.bytes_to_device_pinned == 16
        assert gpu.pinned_bytes() >= 16
        with pytest.raises(RuntimeError, match="cannot pin"):
            torch.empty(2048, dtype=torch.uint8).pin_memory()
    assert fakegpu.pinned_limit() is None
    assert f.elem.tolist() == [1.0] * 4


def test_fake_gpu_pinned_limit_zero_allows_no_pinning() -> None:
    """fake_gpu(pinned_limit=0) makes every pin fail; a bad pinned_limit raises naming the argument."""
    fakegpu.set_device_count(1)
    with fake_gpu(pinned_limit=0), pytest.raises(RuntimeError, match="cannot pin"):
        torch.ones(1).pin_memory()
    with pytest.raises(ValueError, match="pinned_limit='lots' is not a memory size"):
        fake_gpu(pinned_limit="lots")


# ---------------------------------------------------------------- Ctrl-C


def _until_every_bytecode_was_hit(workout: functools.partial[None], check: functools.partial[None]) -> int:
    """Run ``workout`` with an interrupt before its 1st, 2nd, ... bytecode, and ``check`` after each run."""
    previous_tracer = sys.gettrace()
    n = 0
    while True:
        n += 1
        tracer = _InterruptAt(n, files=frozenset({fakegpu.__file__}))
        state = workout()
        sys.settrace(tracer)
        try:
            state.run()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(previous_tracer)
        check(state)
        if tracer.seen < n:  # the workout ran to its end: every bytecode was a landing place once
            return n


class _PinnedWorkout:
    """Pin, share, register, unregister, free and count: each step of the pinned books once."""

    def __init__(self) -> None:
        self.books = fakegpu._Pinned()

    def run(self) -> None:
        books = self.books
        a = torch.empty(100)
        books.add(a.untyped_storage(), 512, registered=False)
        b = a[:10]
        assert books.contains(b)
        c = torch.empty(5)
        books.add(c.untyped_storage(), 20, registered=True)
        assert books.used() == 532
        books.remove_registered(c.untyped_storage())
        del a
        assert books.used() == 512
        del b
        assert books.used() == 0


def _pinned_books_are_empty(state: _PinnedWorkout) -> None:
    if state.books.used():
        gc.collect()  # only if a reference cycle (the traceback's frames) holds a tensor still
    assert state.books.used() == 0


def test_keyboard_interrupt_anywhere_keeps_the_pinned_books_exact() -> None:
    """A KeyboardInterrupt before any bytecode of the pinned books' work leaves pinned_bytes exact."""
    runs = _until_every_bytecode_was_hit(functools.partial(_PinnedWorkout), functools.partial(_pinned_books_are_empty))
    assert runs > 50


class _QueueWorkout:
    """Queue three late copies on a stream, then land them."""

    def __init__(self) -> None:
        self.streams = fakegpu._Streams()
        self.queue = fakegpu._Queue(0)
        self.dst, self.src = torch.zeros(3), torch.arange(1.0, 4.0)
        self.issued: list[int] = []

    def run(self) -> None:
        for i in range(3):
            self.streams.enqueue(self.queue, functools.partial(fakegpu._land_copy, self.dst[i], self.src[i]))
            self.issued.append(i)
        self.streams.land(self.queue)


def _every_issued_copy_lands(state: _QueueWorkout) -> None:
    state.streams.land(state.queue)
    assert not state.queue.entries
    assert not state.streams.busy
    assert [state.dst[i].item() for i in state.issued] == [state.src[i].item() for i in state.issued]


def test_keyboard_interrupt_anywhere_loses_no_issued_copy() -> None:
    """A KeyboardInterrupt before any bytecode of queueing or landing leaves every issued copy to land."""
    runs = _until_every_bytecode_was_hit(functools.partial(_QueueWorkout), functools.partial(_every_issued_copy_lands))
    assert runs > 20
