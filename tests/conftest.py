"""Boot real ComfyUI (notcomfy in CI, or the checkout named by COMFYUI_PATH) before any test runs.

Only a run that collected nothing but the fast tier (tests/fast/: no ComfyUI, no fake GPU) skips the
boot. Shared fixtures: a mini SD1.5 checkpoint loaded CPU-first once per module, and a check after
every test that no scope still holds anything.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import ondevice
import ondevice.comfyui
from ondevice.residency import Claim, table

# Synthetic checkpoints are written once per cache, not once per suite: the matrix runs four suites,
# and subprocesses (the demo, a user's pytest session) find the same files through the variable.
os.environ.setdefault("ONDEVICE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "checkpoints"))

FAST = Path(__file__).resolve().parent / "fast"

# The tests' tensors are small: torch's intra-op threads only contend (on a 2-core CI machine, a
# fake-GPU copy ran 5x slower with them). OMP_NUM_THREADS, where set, still decides.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Boot ComfyUI before the first test module outside the fast tier is imported (many import comfy)."""
    if isinstance(collector, pytest.Module) and FAST not in collector.path.parents:
        ondevice.comfyui.import_comfy()


@pytest.fixture(scope="module")
def sd15(sd15_checkpoint: Path) -> ondevice.Checkpoint:
    """The mini SD1.5 checkpoint's components, loaded to the CPU (shared by a module's tests)."""
    return ondevice.load_checkpoint(sd15_checkpoint)


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    """The mini SD1.5 checkpoint from the run's cache (overrides the plugin's per-session copy; read-only)."""
    from ondevice.testing.synthetic import cached_checkpoint  # noqa: PLC0415

    return cached_checkpoint("sd15", "mini")


@pytest.fixture(scope="session")
def sdxl_mini() -> Path:
    """A light checkpoint that ComfyUI detects as SDXL (its text encoders are full size: 1.6 GB; read-only)."""
    from ondevice.testing.synthetic import cached_checkpoint  # noqa: PLC0415

    return cached_checkpoint("sdxl", "mini")


@pytest.fixture
def fake_gpu_two() -> Iterator[object]:
    """Two fake devices, fakegpu:0 and fakegpu:1."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(device_count=2) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _no_scope_leaks() -> Iterator[None]:
    """Fail a test that leaves a scope holding something, and clean up after it."""
    yield
    leaked = table.held()
    table.release([Claim(holding, part) for holding in leaked for part in list(holding.claims)])
    for holding in leaked:
        if holding.prefetched:
            table.cancel(holding)  # a prefetch no scope claimed
    table.end_keep([holding.part for holding in leaked if holding.kept])
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.unload_all_models()
    assert not leaked, f"scopes still hold {[h.part for h in leaked]}"
    assert not table.held()
