"""The seed scenario end to end: SDXL loaded to the CPU, each component on the GPU only while it works."""

from __future__ import annotations

import io
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import pytest
import torch

import ondevice
from ondevice.demo import run_scenario
from ondevice.devices import memory_info
from ondevice.testing import fake_gpu

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def on_only(component: Any, device: torch.device) -> bool:
    return all(t.device == device for part in ondevice.strategies.parts_of(component) for t in part.tensors())


def check_scenario(path: Path, device: torch.device, *, exact: bool) -> None:
    seen: dict[str, Any] = {}

    def inside(step: str, ckpt: ondevice.Checkpoint) -> None:
        component = getattr(ckpt, step)
        assert on_only(component, device), f"{step} not wholly on {device} inside its scope"
        seen[step] = memory_info(device)[0]
        seen["model_size"] = ckpt.model.model_size()  # ComfyUI's count: persistent tensors only
        seen["model_bytes"] = sum(ondevice.placement(ckpt.model).values())  # every parameter and buffer

    baseline = memory_info(device)[0]
    out = io.StringIO()
    steps = run_scenario(path, device, out=out, inside=inside)
    loaded = steps[0]
    model_size, model_bytes = seen["model_size"], seen["model_bytes"]
    assert model_bytes >= model_size
    # after loading: all on the CPU, nothing registered, free memory at the baseline
    assert [r.device for r in loaded.rows] == ["cpu"] * 3
    assert not mm.current_loaded_models
    assert loaded.free_device_memory == baseline
    # inside on_gpu(model): lower by at least the model's size (every parameter and buffer) and by at most
    # 10 % more (exactly its size on the fake GPU)
    drop = baseline - seen["model"]
    if exact:
        assert drop == model_bytes
    else:
        assert model_bytes <= drop <= 1.1 * model_bytes
    # after exit: back at the baseline
    assert steps[2].free_device_memory == baseline
    assert {"vae", "clip"} <= set(seen)
    names = [s.name for s in steps]
    assert names[3:] == [
        "VAE decode on the GPU",
        "VAE back on the CPU",
        "CLIP encode on the GPU",
        "CLIP back on the CPU",
    ]
    assert dict((r.component, r.device) for r in steps[3].rows)["vae"] == str(device)
    assert dict((r.component, r.device) for r in steps[5].rows)["clip"] == str(device)
    assert [r.device for r in steps[-1].rows] == ["cpu"] * 3
    if exact:
        assert steps[-1].free_device_memory == baseline
    else:  # a real GPU keeps library workspaces (cuBLAS, cuDNN) after the first decode / encode
        assert baseline - steps[-1].free_device_memory <= 512 * 2**20
    assert "diffusion model on the GPU" in out.getvalue()


def test_seed_scenario_on_fake_gpu(sdxl_mini: Path) -> None:
    """On the fake GPU: free memory drops by exactly the model's size and returns exactly."""
    with fake_gpu(memory="16GiB") as gpu:
        check_scenario(sdxl_mini, gpu.device, exact=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a real CUDA GPU")
def test_seed_scenario_on_real_gpu(sdxl_mini: Path) -> None:
    """On a real GPU: the drop is within [size, 1.1 x size] and free memory returns to the baseline."""
    path = Path(os.environ.get("ONDEVICE_SDXL", sdxl_mini))
    check_scenario(path, torch.device("cuda", torch.cuda.current_device()), exact=False)


def test_example_script_runs(sd15_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/seed_scenario.py runs on the fake GPU and reports every step (on the small SD1.5 file)."""
    argv = sys.argv
    sys.argv = ["seed_scenario.py", str(sd15_checkpoint)]
    try:
        runpy.run_path(str(ROOT / "examples" / "seed_scenario.py"), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "free dropped by" in out and "all back" in out
    assert "fakegpu" not in out.split("all back")[1]
