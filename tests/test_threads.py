"""Thread stress: scopes from many threads on the same and on different components."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import torch

import ondevice
from ondevice import on_gpu
from ondevice.residency import table
from ondevice.strategies.module import ModulePart
from ondevice.testing import FakeGPU
from tests._threads import run_threads

CPU = torch.device("cpu")


class Watched(torch.nn.Linear):
    """A module whose part records every load and offload, to catch double loads."""


class WatchedPart(ModulePart):
    loaded: dict[int, bool] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def load(self, device: torch.device) -> None:
        with self.lock:
            if self.loaded.get(id(self.module)):
                self.errors.append(f"double load of {id(self.module)}")
            self.loaded[id(self.module)] = True
        super().load(device)

    def offload(self) -> None:
        with self.lock:
            if not self.loaded.get(id(self.module)):
                self.errors.append(f"offload of {id(self.module)} that was not loaded")
            self.loaded[id(self.module)] = False
        super().offload()


class WatchedStrategy:
    def parts(self, component: Any) -> Sequence[WatchedPart]:
        return [WatchedPart(component)]


def _hammer(models: list[torch.nn.Module], device: torch.device, seed: int, failures: list[str]) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        pick = rng.sample(models, rng.randint(1, 2))
        try:
            with on_gpu(*pick):
                for m in pick:
                    if set(ondevice.placement(m)) != {device}:
                        failures.append(f"{m} not on {device} inside its scope")
                    m(torch.randn(1, m.in_features, device=device))
        except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
            failures.append(repr(exc))


def test_threads_never_double_load_and_end_on_cpu(fake_gpu: FakeGPU) -> None:
    """8 threads x 40 random scopes over 3 shared modules: no double load, no early offload, all on CPU at the end."""
    ondevice.register_strategy(Watched, WatchedStrategy())
    WatchedPart.errors.clear()
    models: list[torch.nn.Module] = [Watched(32, 32) for _ in range(3)]
    failures: list[str] = []
    run_threads(_hammer, ((models, fake_gpu.device, seed, failures) for seed in range(8)))
    assert failures == []
    assert WatchedPart.errors == []
    assert all(set(ondevice.placement(m)) == {CPU} for m in models)
    assert fake_gpu.memory_allocated() == 0


def test_threads_on_comfyui_components(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """4 threads scoping the real UNet and VAE concurrently leave both on the CPU and memory at baseline."""
    base = fake_gpu.memory_allocated()
    failures: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(5):
            pick = rng.choice([(sd15.model,), (sd15.vae,), (sd15.model, sd15.vae)])
            try:
                with on_gpu(*pick) as scope:
                    for c in pick:
                        if set(ondevice.placement(c)) != {scope.device}:
                            failures.append(f"{type(c).__name__} not on the device inside its scope")
            except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
                failures.append(repr(exc))

    run_threads(work, ((seed,) for seed in range(4)))
    assert failures == []
    assert set(ondevice.placement(sd15.model)) == set(ondevice.placement(sd15.vae)) == {CPU}
    assert fake_gpu.memory_allocated() == base


class Patched:
    """A view of a shared module with its own patch ``tag`` (what a ComfyUI clone with other patches is)."""

    def __init__(self, module: torch.nn.Linear, tag: int) -> None:
        self.module, self.tag = module, tag


class PatchedPart(ModulePart):
    """Loading puts this view's tag on the shared module; clones with one tag have the same weights."""

    def __init__(self, view: Patched) -> None:
        super().__init__(view.module)
        self.tag = view.tag

    def load(self, device: torch.device) -> None:
        super().load(device)
        self.module.tag = self.tag  # type: ignore[assignment]

    def same_weights(self, other: object) -> bool:
        return getattr(other, "tag", None) == self.tag


class PatchedStrategy:
    def parts(self, component: Any) -> Sequence[PatchedPart]:
        return [PatchedPart(component)]


def test_threads_with_other_patches_never_run_on_swapped_weights(fake_gpu: FakeGPU) -> None:
    """4 threads x 30 random (nested) scopes over two patch sets of one module: each scope sees only its own patches."""
    ondevice.register_strategy(Patched, PatchedStrategy())
    module = torch.nn.Linear(16, 16)
    views = [Patched(module, tag) for tag in (0, 1)]
    failures: list[str] = []
    conflicts: list[ondevice.ResidencyConflictError] = []

    def check(view: Patched) -> None:
        for _ in range(3):
            if module.tag != view.tag:  # type: ignore[comparison-overlap]
                failures.append(f"a scope on patches {view.tag} ran on patches {module.tag}")
            module(torch.randn(2, 16, device=fake_gpu.device))

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            outer, inner = rng.choice(views), rng.choice(views)
            try:
                with on_gpu(outer):
                    check(outer)
                    if rng.random() < 0.5:
                        with on_gpu(inner):  # nested in this thread: swapped in, and back after
                            check(inner)
                    check(outer)
            except ondevice.ResidencyConflictError as exc:  # both threads nest the other patches: a wait cycle
                conflicts.append(exc)
            except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
                failures.append(repr(exc))

    run_threads(work, ((seed,) for seed in range(4)))
    assert failures == []
    assert all("is waiting, directly or through other threads" in str(exc) for exc in conflicts)
    assert set(ondevice.placement(module)) == {CPU}
    assert fake_gpu.memory_allocated() == 0


def test_threads_prefetching_for_each_other_compute_on_landed_weights(fake_gpu: FakeGPU) -> None:
    """4 threads x 15 rounds of on_gpu(a, prefetch=b) then on_gpu(b) over 4 shared modules: every output is right
    (a scope on weights another thread prefetched joins their late copies), and all ends on the CPU."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(16, 16) for _ in range(4)]
    x = torch.randn(2, 16)
    with torch.inference_mode():
        want = [m(x) for m in models]
    failures: list[str] = []

    def check(index: int) -> None:
        with torch.inference_mode():
            out = models[index](x.to(fake_gpu.device)).cpu()
        if not torch.allclose(out, want[index]):
            failures.append(f"module {index} computed {out.flatten()[:2].tolist()} on its scope's weights")

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            a, b = rng.sample(range(len(models)), 2)
            try:
                with on_gpu(models[a], prefetch=models[b]):
                    check(a)
                with on_gpu(models[b]):
                    check(b)
            except Exception as exc:  # noqa: BLE001  (collected and asserted on below)
                failures.append(repr(exc))

    run_threads(work, ((seed,) for seed in range(4)))
    assert failures == []
    assert [h.part for h in table.held()] == []  # every prefetch was adopted by a scope, which offloaded it
    assert all(set(ondevice.placement(m)) == {CPU} for m in models)
    assert fake_gpu.memory_allocated() == 0
