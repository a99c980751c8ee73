"""The ``fakegpu`` torch backend: real moves, real math, CUDA-like errors, exact memory accounting."""

from __future__ import annotations

import _thread
import copy
import gc
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import threading
import time
import types
import weakref
from collections.abc import Iterator

import pytest
import torch

from ondevice.testing import fakegpu

F0 = "fakegpu:0"
F1 = "fakegpu:1"


@pytest.fixture(autouse=True)
def backend() -> Iterator[None]:
    """Two fake devices with the default limit; reset afterwards."""
    fakegpu.install()
    fakegpu.set_device_count(2)
    fakegpu.set_memory_limit(fakegpu.DEFAULT_MEMORY)
    yield
    fakegpu.set_device_count(1)
    fakegpu.set_memory_limit(fakegpu.DEFAULT_MEMORY)


def allocated(index: int = 0) -> int:
    gc.collect()
    return fakegpu.memory_allocated(index)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------- moves


def test_cpu_tensor_round_trip_keeps_data() -> None:
    """A CPU tensor moved to fakegpu:0 is on that device and comes back unchanged."""
    x = torch.randn(3, 4)
    f = x.to(F0)
    assert f.device == torch.device(F0)
    assert f.is_fakegpu
    back = f.to("cpu")
    assert back.device.type == "cpu"
    assert type(back) is torch.Tensor
    assert torch.equal(back, x)


def test_factories_create_on_the_fake_device() -> None:
    """zeros / arange / tensor with device=fakegpu give tensors there with the right values."""
    z = torch.zeros(2, 3, device=F0)
    a = torch.arange(5, device=F0)  # out= path: the wrapper is resized in place
    t = torch.tensor([1.5, 2.5], device=F1)
    assert (z.device, a.device, t.device) == (torch.device(F0), torch.device(F0), torch.device(F1))
    assert z.cpu().tolist() == [[0.0] * 3] * 2
    assert a.shape == (5,)
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert t.tolist() == [1.5, 2.5]


def test_move_between_fake_indices() -> None:
    """fakegpu:0 -> fakegpu:1 copies the data and charges device 1."""
    before = allocated(1)
    f0 = torch.arange(6.0).to(F0)
    f1 = f0.to(F1)
    assert f1.device == torch.device(F1)
    assert torch.equal(f1.cpu(), torch.arange(6.0))
    assert allocated(1) - before == 24


def test_invalid_device_ordinal_raises() -> None:
    """An index past device_count fails like CUDA's invalid device ordinal."""
    with pytest.raises(RuntimeError, match="invalid device ordinal 2"):
        torch.zeros(1, device="fakegpu:2")


def test_item_tolist_clone_deepcopy() -> None:
    """item, tolist, clone and deepcopy work and stay on the device."""
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).to(F0)
    assert f[1, 0].item() == 3.0
    assert f.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    c = f.clone()
    d = copy.deepcopy(f)
    c.add_(1)
    assert (c.device, d.device) == (f.device, f.device)
    assert d.tolist() == f.tolist()
    assert c.tolist() == [[2.0, 3.0], [4.0, 5.0]]


def test_non_blocking_round_trip() -> None:
    """non_blocking=True copies both ways give the same data."""
    x = torch.randn(4, 4)
    assert torch.equal(x.to(F0, non_blocking=True).to("cpu", non_blocking=True), x)


def test_pickle_round_trip() -> None:
    """A pickled fake tensor unpickles onto the same fake device with the same data."""
    f = torch.randn(3).to(F1)
    g = pickle.loads(pickle.dumps(f))  # noqa: S301
    assert g.device == torch.device(F1)
    assert torch.equal(g.cpu(), f.cpu())


def test_backward_runs_on_the_device() -> None:
    """Autograd works through fake tensors and the gradient lands on the device."""
    a = torch.randn(3, device=F0, requires_grad=True)
    (a * a).sum().backward()
    assert a.grad is not None
    assert a.grad.device == torch.device(F0)
    assert torch.allclose(a.grad.cpu(), 2 * a.detach().cpu())


# ---------------------------------------------------------------- math parity


def test_math_matches_cpu() -> None:
    """matmul, conv2d, SDPA and softmax give the CPU's results."""
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    image, conv = torch.randn(1, 3, 8, 8), torch.nn.Conv2d(3, 4, 3)
    q = torch.randn(1, 2, 6, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = [a @ b, conv(image), sdpa(q, q, q), torch.softmax(a, -1)]
    fconv = copy.deepcopy(conv).to(F0)
    fq = q.to(F0)
    got = [a.to(F0) @ b.to(F0), fconv(image.to(F0)), sdpa(fq, fq, fq), torch.softmax(a.to(F0), -1)]
    for want, have in zip(expected, got, strict=True):
        assert have.device == torch.device(F0)
        torch.testing.assert_close(have.cpu(), want.detach())


def test_inference_mode_view_of_normal_tensor() -> None:
    """Under inference_mode, a view of a normal fake tensor works (ComfyUI's apply_model needs it)."""
    weight = torch.randn(4, 4).to(F0)
    linear = torch.nn.Linear(4, 2).to(F0)
    with torch.inference_mode():
        view = weight.t()
        sliced = weight[1:]
        out = linear(torch.randn(3, 4, device=F0))
    assert not view.is_inference()
    assert torch.equal(view.cpu(), weight.cpu().t())
    assert sliced.shape == (3, 4)
    assert out.device == torch.device(F0)
    assert out.is_inference()


def test_load_state_dict_across_devices() -> None:
    """load_state_dict copies fake tensors into a CPU module and CPU tensors into a fake module."""
    source = torch.nn.Linear(4, 2).to(F0)
    cpu_module, fake_module = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2).to(F0)
    cpu_module.load_state_dict(source.state_dict())
    fake_module.load_state_dict(cpu_module.state_dict())
    assert cpu_module.weight.device.type == "cpu"
    assert fake_module.weight.device == torch.device(F0)
    assert torch.equal(cpu_module.weight, source.weight.cpu())
    assert torch.equal(fake_module.bias.cpu(), source.bias.cpu())


# ---------------------------------------------------------------- device mismatch


def test_mixing_fake_and_cpu_raises_like_cuda() -> None:
    """An op on a fake tensor and a non-scalar CPU tensor raises CUDA's same-device error."""
    msg = "Expected all tensors to be on the same device, but found at least two devices, fakegpu:0 and cpu!"
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        torch.ones(3, device=F0) + torch.ones(3)
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        torch.nn.Linear(3, 2)(torch.ones(1, 3, device=F0))


def test_cpu_scalar_and_cpu_index_are_allowed() -> None:
    """0-dim CPU tensors and CPU index tensors mix with fake tensors, as on CUDA."""
    f = torch.arange(4.0).to(F0)
    assert (f * torch.tensor(2.0)).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert f[torch.tensor([3, 0])].tolist() == [3.0, 0.0]


def test_two_fake_indices_raise() -> None:
    """An op on fakegpu:0 and fakegpu:1 tensors raises the same-device error naming both."""
    with pytest.raises(RuntimeError, match="found at least two devices, fakegpu:0 and fakegpu:1!"):
        torch.ones(2, device=F0) + torch.ones(2, device=F1)


# ---------------------------------------------------------------- memory accounting


def test_memory_counts_a_storage_once_across_views() -> None:
    """Views share their base's storage: memory_allocated rises by the storage bytes only once."""
    before = allocated()
    base = torch.zeros(256, device=F0)  # 1 KiB
    views = [base[10:], base.view(16, 16), base.view(16, 16).t()]
    assert allocated() - before == 1024
    del base
    assert allocated() - before == 1024  # the views keep the storage alive
    del views
    assert allocated() == before


def test_peak_memory_is_the_most_live_at_once_since_the_reset() -> None:
    """max_memory_allocated records the high-water mark; reset_peak_memory_stats starts it from what is live now."""
    fakegpu.reset_peak_memory_stats(F0)
    before = allocated()
    assert fakegpu.max_memory_allocated(F0) == before
    a = torch.zeros(256, device=F0)  # 1 KiB
    b = torch.zeros(512, device=F0)  # 2 KiB
    del a, b
    c = torch.zeros(128, device=F0)  # 512 B
    assert fakegpu.max_memory_allocated(F0) == before + 3072
    fakegpu.reset_peak_memory_stats(F0)
    assert fakegpu.max_memory_allocated(F0) == before + 512
    del c
    assert fakegpu.max_memory_allocated(F0) == before + 512


def test_results_of_ops_are_charged_and_released() -> None:
    """A new tensor made by an op is charged while alive and released when it dies."""
    f = torch.ones(100, device=F0)
    before = allocated()
    g = f * 2  # new storage of 400 bytes
    assert allocated() - before == 400
    del g
    assert allocated() == before


def test_module_round_trip_memory_is_exact() -> None:
    """Module.to(fakegpu) raises memory by exactly its parameter+buffer bytes; .to(cpu) gives them back."""
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    nbytes = module_bytes(module)
    before = allocated()
    module.to(F0)
    assert all(t.device == torch.device(F0) for t in [*module.parameters(), *module.buffers()])
    assert allocated() - before == nbytes
    module.to("cpu")
    assert all(t.device.type == "cpu" for t in module.parameters())
    assert allocated() == before


def test_module_parameters_stay_parameters() -> None:
    """Parameters moved to the fake device are still nn.Parameter and keep requires_grad."""
    module = torch.nn.Linear(3, 3).to(F0)
    assert isinstance(module.weight, torch.nn.Parameter)
    assert module.weight.requires_grad
    assert "weight" in dict(module.named_parameters())


def test_oom_raises_and_allocates_nothing() -> None:
    """An allocation past the limit raises torch.OutOfMemoryError with a CUDA-like message."""
    before = allocated()
    fakegpu.set_memory_limit(before + 1024**2)  # 1 MiB free
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(2 * 1024**2, dtype=torch.uint8, device=F0)
    assert isinstance(info.value, RuntimeError)
    assert re.fullmatch(
        r"fakegpu out of memory\. Tried to allocate 2\.00 MiB\. fakegpu:0 has a total capacity of "
        r"[\d.]+ GiB of which 1\.00 MiB is free\.",
        str(info.value),
    )
    assert allocated() == before


def test_oom_on_to_and_module_to() -> None:
    """Moving a too-large CPU tensor or module fails with OutOfMemoryError and charges nothing."""
    before = allocated()
    fakegpu.set_memory_limit(before + 4096)
    with pytest.raises(torch.OutOfMemoryError):
        torch.zeros(2048).to(F0)
    module = torch.nn.Linear(64, 64)
    with pytest.raises(torch.OutOfMemoryError):
        module.to(F0)
    assert allocated() == before


def test_limit_is_per_device() -> None:
    """Filling fakegpu:0 to its limit leaves fakegpu:1 free."""
    fakegpu.set_memory_limit(1024 + allocated(0), 0)
    full = torch.zeros(256, device=F0)
    with pytest.raises(torch.OutOfMemoryError):
        torch.zeros(1, device=F0)
    other = torch.zeros(256, device=F1)
    assert (full.device, other.device) == (torch.device(F0), torch.device(F1))


def test_mem_get_info_reports_free_and_total() -> None:
    """mem_get_info is (limit - allocated, limit) and follows allocations."""
    limit = allocated() + 10_000
    fakegpu.set_memory_limit(limit)
    free_before, total = fakegpu.mem_get_info(F0)
    keep = torch.zeros(100, device=F0)
    free, _ = fakegpu.mem_get_info(F0)
    assert total == limit
    assert free_before == 10_000
    assert free == 10_000 - keep.nbytes


def test_in_place_resize_is_accounted() -> None:
    """resize_ on a fake tensor updates its shape and charges the larger storage."""
    before = allocated()
    t = torch.empty(0, device=F0)
    t.resize_(10, 10)
    assert t.shape == (10, 10)
    assert allocated() - before == 400
    del t
    assert allocated() == before


# ---------------------------------------------------------------- counters and module API


def test_counters_count_bytes_each_way_and_reset() -> None:
    """stats counts bytes copied to and from the device and ops; reset() zeroes them."""
    fakegpu.stats.reset()
    f = torch.zeros(10).to(F0)  # 40 bytes in
    f = f + 1
    f.to("cpu")  # 40 bytes out
    torch.zeros(5).copy_(f[:5])  # 20 bytes out
    assert (fakegpu.stats.to_fake_bytes, fakegpu.stats.to_cpu_bytes) == (40, 60)
    assert fakegpu.stats.ops >= 3
    fakegpu.stats.reset()
    assert (fakegpu.stats.to_fake_bytes, fakegpu.stats.to_cpu_bytes, fakegpu.stats.ops) == (0, 0, 0)


def test_torch_device_module_api() -> None:
    """torch.fakegpu offers the device-module functions torch and ComfyUI call."""
    module = torch.fakegpu  # type: ignore[attr-defined]
    assert module.device_count() == 2
    assert module.is_available()
    assert module.current_device() == 0
    assert module.get_amp_supported_dtype() == [torch.float16, torch.bfloat16]
    module.synchronize()
    module.empty_cache()
    assert module.mem_get_info(1)[1] == fakegpu.DEFAULT_MEMORY


def test_autocast_passes_through() -> None:
    """torch.autocast('fakegpu') runs ops unchanged (no casting policy)."""
    f = torch.randn(2, 2, device=F0)
    with torch.autocast("fakegpu", dtype=torch.float16):
        out = f @ f.T
    assert out.device == torch.device(F0)
    assert out.dtype == torch.float32


def test_install_is_idempotent() -> None:
    """install() may be called again and changes nothing."""
    fakegpu.install()
    assert fakegpu.is_installed()
    assert torch._C._get_privateuse1_backend_name() == "fakegpu"


# ---------------------------------------------------------------- Ctrl-C


class _Interrupter:
    """A SIGINT handler that raises KeyboardInterrupt only while armed (and disarms itself when it does)."""

    def __init__(self) -> None:
        self.armed = False
        self.raised = 0

    def __call__(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False
            self.raised += 1
            raise KeyboardInterrupt


def _churn(live: list[torch.Tensor], rng: random.Random, device: str) -> None:
    """Allocate, view, grow in place, drop and query fake tensors: every path of the ledger."""
    for _ in range(50):
        choice = rng.random()
        if choice < 0.4 or not live:
            live.append(torch.empty(rng.randrange(1, 2048), device=device))
        elif choice < 0.5:
            live.append(live[rng.randrange(len(live))][:1])  # a view: shares its base's storage
        elif choice < 0.6:
            live[rng.randrange(len(live))].resize_(rng.randrange(1, 4096))  # may grow the storage: retrack
        elif choice < 0.95:
            del live[rng.randrange(len(live))]  # the finalizer runs here, or at a later gc
        else:
            fakegpu.memory_allocated(device)
        if len(live) > 64:
            del live[:32]


def test_keyboard_interrupts_anywhere_keep_memory_exact() -> None:
    """KeyboardInterrupts landing anywhere, in the ledger's bookkeeping and finalizers too, lose no byte.

    It runs in a fresh interpreter of its own: interrupts every 0.2 ms also land in whatever earlier tests
    left behind in this process (pytest's gc callbacks, collectors of their objects), not only in the ledger.
    """
    if os.environ.get("ONDEVICE_ISOLATED_TEST") != "1":
        test = f"{__file__}::test_keyboard_interrupts_anywhere_keep_memory_exact"
        env = {**os.environ, "ONDEVICE_ISOLATED_TEST": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)  # noqa: S603
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        return
    interrupter = _Interrupter()
    previous_handler = signal.signal(signal.SIGINT, interrupter)
    previous_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # let the interrupting thread run often
    stop = threading.Event()

    def interrupt_periodically() -> None:
        while not stop.wait(0.0002):
            _thread.interrupt_main()

    thread = threading.Thread(target=interrupt_periodically, daemon=True)
    live: list[torch.Tensor] = []
    rng = random.Random(0)
    base = allocated(1)  # what earlier tests left alive on fakegpu:1 (held by their own references)
    _churn(live, rng, F1)  # torch's lazy set-up of these ops runs before any interrupt
    thread.start()
    try:
        started = time.monotonic()  # 3 s of interrupts, longer (up to 60 s) on a slow machine until over 100 landed
        while time.monotonic() < started + 3 or (interrupter.raised <= 100 and time.monotonic() < started + 60):
            try:
                interrupter.armed = True
                _churn(live, rng, F1)
                interrupter.armed = False
            except KeyboardInterrupt:
                pass
    finally:
        interrupter.armed = False
        stop.set()
        thread.join(timeout=10)
        sys.setswitchinterval(previous_interval)
        _run_pending_handlers()
        signal.signal(signal.SIGINT, previous_handler)
    assert interrupter.raised > 100  # the interrupts did land
    live.clear()
    assert allocated(1) == base


def _run_pending_handlers() -> None:
    """Python runs a pending signal handler when a function starts; this call is that point."""


class _InterruptAt:
    """A tracer that raises KeyboardInterrupt before the ``n``-th bytecode run in ``files`` (by default the fake GPU
    and weakref, where finalizers run)."""

    def __init__(self, n: int, files: frozenset[str] = frozenset({fakegpu.__file__, weakref.__file__})) -> None:
        self.n = n
        self.files = files
        self.seen = 0

    def __call__(self, frame: types.FrameType, event: str, arg: object) -> _InterruptAt | None:
        if frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.seen += 1
            if self.seen == self.n:
                raise KeyboardInterrupt
        return self


def _ledger_workout(ledger: fakegpu._Ledger) -> None:
    """Charge, share, grow, release and query: each step of a ledger's bookkeeping once."""
    a = fakegpu.FakeGPUTensor(torch.empty(100), 1)
    ledger.track(a)
    b = fakegpu.FakeGPUTensor(a.elem[:10], 1)  # shares a's storage: counted once
    ledger.track(b)
    a.elem.resize_(1000)  # grows the shared storage in place
    ledger.track(a)
    c = fakegpu.FakeGPUTensor(torch.empty(5), 1)
    ledger.track(c)
    assert ledger.allocated(1) == 4020
    del a
    ledger.check(1, 8)
    del b
    assert ledger.allocated(1) == 20
    del c
    assert ledger.allocated(1) == 0


def test_keyboard_interrupt_before_any_bytecode_keeps_the_books_exact() -> None:
    """A KeyboardInterrupt before any single bytecode of the ledger's work leaves its books exact."""
    _ledger_workout(fakegpu._Ledger())
    previous_tracer = sys.gettrace()
    n = 0
    while True:
        n += 1
        ledger, tracer = fakegpu._Ledger(), _InterruptAt(n)
        sys.settrace(tracer)
        try:
            _ledger_workout(ledger)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(previous_tracer)
        if ledger.allocated(1):
            gc.collect()  # only if a reference cycle holds a tensor still
        assert ledger.allocated(1) == 0, f"{ledger.allocated(1)} bytes drifted after an interrupt at bytecode {n}"
        if tracer.seen < n:  # the workout ran to its end: every bytecode was a landing place once
            break
    assert n > 100
