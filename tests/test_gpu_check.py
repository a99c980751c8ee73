"""scripts/gpu_check.py: its fake-GPU run passes (CI), and its real-GPU run where there is a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from ondevice.testing import FakeGPU

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> types.ModuleType:
    """scripts/gpu_check.py imported as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses resolve their module by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gpu_check"]
    return module


def test_fake_gpu_run_passes(
    gpu_check: types.ModuleType, sd15_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--fake-gpu runs every static check on the fake GPU and passes; dynamic rows are skipped as needing CUDA."""
    out = tmp_path / "result.json"
    assert gpu_check.main(["--fake-gpu", "--checkpoint", str(sd15_checkpoint), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    static = [row for row in rows if row["mode"] == "static"]
    dynamic = [row for row in rows if row["mode"] == "dynamic"]
    assert [row["check"] for row in static] == list(gpu_check.CHECKS)
    assert all(row["status"] == "pass" for row in static), [r for r in static if r["status"] != "pass"]
    assert all(row["status"] == "skip" and "needs CUDA" in row["detail"] for row in dynamic)
    assert all(row["free_before"] == row["free_after"] == 2 << 30 for row in static)
    assert f"{len(static)} passed, 0 failed, {len(dynamic)} skipped" in table
    for check in gpu_check.CHECKS:
        assert f"static   {check}" in table


def test_a_failed_check_fails_the_run(gpu_check: types.ModuleType, fake_gpu: FakeGPU, sd15_checkpoint: Path) -> None:
    """A check that fails or raises gives a fail row with the reason, the next check still runs, the run fails."""
    checks = gpu_check.Checks("static", fake_gpu.device, sd15_checkpoint)

    def broken(row: object) -> str:
        raise RuntimeError("boom")

    checks.run("raises", broken)
    checks.run("unmet", lambda row: gpu_check._require(False, "not held"))
    checks.run("fine", lambda row: "ok")
    report = gpu_check.Report(str(fake_gpu.device), rows=checks.rows)
    assert [(r.status, r.detail) for r in report.rows] == [
        ("fail", "RuntimeError: boom"),
        ("fail", "not held"),
        ("pass", "ok"),
    ]
    assert not report.passed
    assert "1 passed, 2 failed, 0 skipped" in gpu_check.format_table(report)


def test_bad_comfyui_path_is_refused(
    gpu_check: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--comfyui naming a folder without comfy/model_management.py exits 2 with a message."""
    assert gpu_check.main(["--comfyui", str(tmp_path)]) == 2
    assert "not a ComfyUI checkout" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_run_passes(gpu_check: types.ModuleType, tmp_path: Path) -> None:
    """On a CUDA GPU both modes (dynamic VRAM off and on) pass every check they can run."""
    import comfy

    checkout = os.environ.get("COMFYUI_PATH") or str(Path(comfy.__file__).resolve().parents[1])
    out = tmp_path / "result.json"
    assert gpu_check.main(["--comfyui", checkout, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["passed"]
