"""examples/scaling/per_gpu_workers.py (docs/scaling.md) runs: one worker process per (fake) GPU, ondevice in each.

The example runs as a subprocess with this interpreter, so its workers are fresh processes of their own,
independent of the ComfyUI this session booted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scaling" / "per_gpu_workers.py"
SERVED = re.compile(r"^request (\d+): worker (\d+) \(pid (\d+), GPU \d+\) on (\S+): .*, after ([\d,]+) B$", re.M)


def run_example(*args: str, timeout: float) -> str:
    """The example's stdout; fails the test with its stderr when it exits non-zero."""
    command = [sys.executable, str(EXAMPLE), "--fake-gpu", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit status {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def check_served(out: str, requests: int, workers: int) -> None:
    """Every request served once, by every worker, each on its own process, with no device memory left after it."""
    served = SERVED.findall(out)
    assert sorted(int(request) for request, *_ in served) == list(range(requests)), out
    assert {int(worker) for _, worker, *_ in served} == set(range(workers)), out
    pids = {worker: pid for _, worker, pid, *_ in served}
    assert len(set(pids.values())) == workers, out  # one process per worker
    assert {device for *_, device, _ in served} == {"fakegpu:0"}, out  # each worker's own fake GPU
    assert [after for *_, after in served] == ["0"] * requests, out
    assert f"{requests} requests served by {workers} of {workers} workers" in out


def test_plain_module_on_two_workers() -> None:
    """Two workers serve 8 requests with a torch module; every request served, both used, 0 B after each."""
    check_served(run_example("--workers", "2", "--requests", "8", timeout=120), requests=8, workers=2)


@pytest.mark.skipif(
    bool(os.environ.get("COMFYUI_PATH")), reason="runs once per matrix, on the venv's own ComfyUI (30 s of CPU)"
)
def test_comfyui_checkpoint_on_two_workers() -> None:
    """With --comfyui each worker loads the SD1.5 mini checkpoint CPU-first and serves CLIP + VAE per request."""
    out = run_example("--workers", "2", "--requests", "2", "--comfyui", timeout=300)
    check_served(out, requests=2, workers=2)
    assert "image (1, 64, 64, 3)" in out
