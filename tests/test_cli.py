"""The command line: `python -m ondevice demo` and `info`, as a user runs them.

The demo and `info` run in-process through ``ondevice.cli.main`` (the suite has booted ComfyUI
already); one test runs the real ``python -m ondevice`` entry point in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ondevice.cli import main


def test_demo_prints_a_table_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    """`ondevice demo --family sd15` walks the scenario on the fake GPU and prints all seven tables."""
    assert main(["demo", "--family", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "using the fake GPU fakegpu:0" in out
    assert out.count("== ") == 7
    assert "model      fakegpu:0" in out and "vae        fakegpu:0" in out and "clip       fakegpu:0" in out
    last = out.split("== CLIP back on the CPU")[1]
    assert "fakegpu:0 " not in last.split("\n", 3)[3]  # every component back on the CPU at the end
    checkpoint = Path(out.split("Checkpoint: ", 1)[1].split("\n", 1)[0])
    assert checkpoint.name.startswith("synthetic-sd15-mini-") and checkpoint.is_file()


def test_demo_with_a_checkpoint_that_is_not_there(tmp_path: Path) -> None:
    """`python -m ondevice demo --checkpoint` naming a missing file ends with a one-line error, not a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "ondevice", "demo", "--checkpoint", str(tmp_path / "none.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2
    assert "ondevice: error: checkpoint" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_reports_comfyui(capsys: pytest.CaptureFixture[str]) -> None:
    """`ondevice info` names the ComfyUI version and its features."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "version:" in out and "weakref_loaded_model:" in out
