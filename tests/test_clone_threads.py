"""Threads and asyncio tasks scoping the same weights with other patches (a base model and its LoRA clone)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.sample
import pytest
import torch

import ondevice
import ondevice.testing
from ondevice import ResidencyConflictError, on_gpu
from ondevice.residency import table
from ondevice.testing import FakeGPU

JOIN_S = 60


def _lora(patcher: Any) -> Any:
    """A clone with 'diff' patches on a few real weights (what ComfyUI's LoRA loader makes)."""
    clone = patcher.clone()
    weights = patcher.model_state_dict()
    keys = [k for k in weights if k.endswith(("out.2.weight", "proj_in.weight", "0.in_layers.2.weight"))]
    assert keys
    clone.add_patches({k: (0.05 * torch.ones_like(weights[k]),) for k in keys}, 1.0)
    return clone


def _forward(patcher: Any, device: torch.device) -> torch.Tensor:
    """One UNet forward with fixed inputs, on the CPU afterwards."""
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen)
    with torch.inference_mode():
        out = patcher.model.apply_model(
            x.to(device), torch.tensor([10.0], device=device), c_crossattn=context.to(device)
        )
        return out.cpu()


def _sample(patcher: Any) -> torch.Tensor:
    """One euler step through ComfyUI's own sampler (prepare_sampling, load_models_gpu and all)."""
    gen = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 77, 768, generator=gen), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        return comfy.sample.sample(patcher, noise, 1, 1.0, "euler", "normal", cond, cond, latent, disable_pbar=True)


@dataclass(frozen=True)
class Expected:
    """A LoRA clone of the mini SD1.5 UNet, and single-threaded results for it and the base."""

    lora: Any
    forward: dict[str, torch.Tensor]
    sample: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def expected(sd15: ondevice.Checkpoint) -> Expected:
    """Results computed one scope at a time, in this thread: what every thread must get."""
    lora = _lora(sd15.model)
    forward, sample = {}, {}
    with ondevice.testing.fake_gpu() as gpu:
        for name, patcher in (("base", sd15.model), ("lora", lora)):
            with on_gpu(patcher):
                forward[name], sample[name] = _forward(patcher, gpu.device), _sample(patcher)
    assert not torch.equal(forward["base"], forward["lora"])
    assert not torch.equal(sample["base"], sample["lora"])
    return Expected(lora, forward, sample)


def _run(*targets: Callable[[], None]) -> list[BaseException]:
    """Run each target in its own thread; return what they raised."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001  (collected and asserted on by the caller)
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), name=t.__name__) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
        assert not t.is_alive(), f"{t.name} is stuck (deadlock?)"
    return errors


def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (bounded), for states another thread reaches."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def _waiting(name: str) -> bool:
    return any(name in owner.name for owner in table.waiting())


def test_base_and_lora_threads_each_sample_on_their_own_weights(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, expected: Expected
) -> None:
    """Base model and LoRA clone sampled in two threads' scopes: no device error, each result bit-identical."""
    start = threading.Barrier(2, timeout=JOIN_S)
    results: dict[str, list[torch.Tensor]] = {"base": [], "lora": []}

    def work(name: str, patcher: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                for _ in range(2):
                    start.wait()  # both threads enter their scopes together, every round
                    with on_gpu(patcher):
                        results[name] += [_sample(patcher), _sample(patcher)]
            except BaseException:
                start.abort()  # the other thread stops at its next round instead of waiting for this one
                raise

        run.__name__ = name
        return run

    assert _run(work("base", sd15.model), work("lora", expected.lora)) == []
    for name, outputs in results.items():
        assert len(outputs) == 4
        assert all(torch.equal(out, expected.sample[name]) for out in outputs), f"{name}: ran on other weights"
    assert set(ondevice.placement(sd15.model)) == {torch.device("cpu")}
    assert fake_gpu.memory_allocated() == 0


def test_nested_swap_in_one_thread_does_not_wait(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, expected: Expected
) -> None:
    """A thread that scopes the LoRA inside its own base scope swaps it in and back, without waiting."""
    base, lora, d = sd15.model, expected.lora, fake_gpu.device
    outputs: list[torch.Tensor] = []

    def nested() -> None:
        with on_gpu(base):
            outputs.append(_forward(base, d))
            with on_gpu(lora):
                outputs.append(_forward(lora, d))
            outputs.append(_forward(base, d))

    assert _run(nested) == []
    want = [expected.forward["base"], expected.forward["lora"], expected.forward["base"]]
    assert [torch.equal(out, ref) for out, ref in zip(outputs, want, strict=True)] == [True, True, True]


def test_a_waiting_thread_proceeds_after_the_holder_exits(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, expected: Expected
) -> None:
    """A LoRA scope in another thread waits while the base scope is live, then runs on the LoRA weights."""
    base, lora, d = sd15.model, expected.lora, fake_gpu.device
    entered = threading.Event()
    outputs: list[torch.Tensor] = []

    def lora_thread() -> None:
        with on_gpu(lora):
            entered.set()
            outputs.append(_forward(lora, d))

    errors: list[BaseException] = []
    with on_gpu(base):
        worker = threading.Thread(target=lambda: errors.extend(_run(lora_thread)))
        worker.start()
        _until(lambda: _waiting("lora_thread"), "the LoRA thread waits")
        assert not entered.is_set()
        assert torch.equal(_forward(base, d), expected.forward["base"])  # the base weights stay while it waits
    worker.join(JOIN_S)
    assert not worker.is_alive()
    assert errors == []
    assert entered.is_set()
    assert torch.equal(outputs[0], expected.forward["lora"])
    assert fake_gpu.memory_allocated() == 0


def test_clones_with_the_same_patches_share_without_waiting(fake_gpu: FakeGPU, expected: Expected) -> None:
    """Two threads scoping clones with the same patches (a LoRA and its clone) are inside their scopes at once."""
    both_inside = threading.Barrier(2, timeout=20)  # broken (raises) if one thread waited for the other
    outputs: list[torch.Tensor] = []

    def work(patcher: Any) -> Callable[[], None]:
        def run() -> None:
            with on_gpu(patcher):
                both_inside.wait()
                outputs.append(_forward(patcher, fake_gpu.device))

        return run

    assert _run(work(expected.lora), work(expected.lora.clone())) == []
    assert [torch.equal(out, expected.forward["lora"]) for out in outputs] == [True, True]


def _vae_variant(vae: Any) -> Any:
    """A clone of the VAE's patcher with a patch of its own (other weights than the VAE's)."""
    clone = vae.patcher.clone()
    weights = clone.model_state_dict()
    key = next(k for k in weights if k.endswith("weight"))
    clone.add_patches({key: (torch.ones_like(weights[key]),)}, 1.0)
    return clone


def test_a_wait_that_could_never_end_raises_naming_both(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, expected: Expected
) -> None:
    """Each thread holds what the other asks for with other patches: the later one raises, naming both; no hang."""
    holds_base, asker_done = threading.Event(), threading.Event()
    raised: list[ResidencyConflictError] = []

    def holder() -> None:  # holds the base UNet, then asks for the VAE, which the asker holds with other patches
        with on_gpu(sd15.model):
            holds_base.set()
            _until(lambda: len(table.held()) == 2, "the asker holds the VAE variant")
            with on_gpu(sd15.vae):
                assert asker_done.is_set()  # it got the VAE only once the asker had given up its variant

    def asker() -> None:  # holds the VAE variant, then asks for the LoRA clone of the UNet the holder holds
        assert holds_base.wait(JOIN_S)
        with on_gpu(_vae_variant(sd15.vae)):
            _until(lambda: _waiting("holder"), "the holder waits for the VAE")
            try:
                with on_gpu(expected.lora):
                    pass
            except ResidencyConflictError as exc:
                raised.append(exc)
            asker_done.set()

    assert _run(holder, asker) == []
    assert len(raised) == 1
    message = str(raised[0])
    assert "thread 'asker'" in message and "thread 'holder'" in message and "PatcherPart(BaseModel)" in message
    assert "thread 'holder' is waiting, directly or through other threads, for what this thread holds" in message
    assert "exit one of the two scopes" in message
    assert fake_gpu.memory_allocated() == 0


def test_tasks_on_one_event_loop_raise_instead_of_blocking_it(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, expected: Expected
) -> None:
    """A task asking for the LoRA while another task on its loop holds the base raises at once, naming both."""
    holding = asyncio.Event()

    async def base_task() -> None:
        with on_gpu(sd15.model):
            holding.set()
            await asyncio.sleep(0.05)

    async def lora_task() -> None:
        await holding.wait()
        with on_gpu(expected.lora):
            pass

    async def main() -> list[BaseException | None]:
        first = asyncio.create_task(base_task(), name="base")
        second = asyncio.create_task(lora_task(), name="lora")
        return await asyncio.gather(first, second, return_exceptions=True)

    first, second = asyncio.run(main())
    assert first is None
    assert isinstance(second, ResidencyConflictError)
    assert "asyncio task 'lora'" in str(second) and "asyncio task 'base'" in str(second)
    assert "event loop" in str(second)
    assert table.held() == []


def test_a_long_wait_is_logged_naming_both(
    fake_gpu: FakeGPU,
    sd15: ondevice.Checkpoint,
    expected: Expected,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A waiter logs a warning naming both threads each wait_warning_s seconds (a hang can be diagnosed)."""
    monkeypatch.setattr(table, "wait_warning_s", 0.05)
    caplog.set_level(logging.WARNING, logger="ondevice")

    def lora_thread() -> None:
        with on_gpu(expected.lora):
            pass

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]

    errors: list[BaseException] = []
    with on_gpu(sd15.model):
        worker = threading.Thread(target=lambda: errors.extend(_run(lora_thread)))
        worker.start()
        _until(lambda: bool(warnings()), "a warning is logged")
    worker.join(JOIN_S)
    assert not worker.is_alive()
    assert errors == []
    assert "thread 'lora_thread'" in warnings()[0]
    assert f"thread {threading.current_thread().name!r}" in warnings()[0]


def test_owner_interleaving() -> None:
    """Owners interleave across threads and across tasks of one loop; never with themselves or enclosing code."""
    from ondevice.residency import Owner  # noqa: PLC0415  (new: this module still imports on older ondevice)

    here = Owner.current()
    assert here.task is None and not here.runs_beside(here)
    assert here.runs_beside(Owner(here.thread + 1))

    async def two_tasks() -> tuple[Owner, Owner, list[bool]]:
        owners: list[Owner] = []
        seen: list[bool] = []
        both, compared = asyncio.Event(), asyncio.Event()

        async def compare() -> None:
            owners.append(Owner.current())
            if len(owners) == 2:
                both.set()
            await both.wait()
            a, b = owners
            seen.append(a.runs_beside(b) and not a.runs_beside(a))
            if len(seen) == 2:
                compared.set()
            await compared.wait()  # neither task ends before both compared

        await asyncio.gather(compare(), compare())
        return owners[0], owners[1], seen

    a, b, seen = asyncio.run(two_tasks())
    assert seen == [True, True]
    assert a.finished() and not a.runs_beside(b)  # done tasks run beside nobody
    assert not a.runs_beside(Owner(a.thread))  # code outside the loop on its thread encloses every task
