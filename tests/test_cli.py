"""The command line: `python -m ondevice demo` and `info`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def ondevice(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ONDEVICE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "ondevice", *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def test_demo_prints_a_table_per_step(tmp_path: Path) -> None:
    """`ondevice demo --family sd15` walks the scenario on the fake GPU and prints all seven tables."""
    done = ondevice("demo", "--family", "sd15", cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "using the fake GPU fakegpu:0" in out
    assert out.count("== ") == 7
    assert "model      fakegpu:0" in out and "vae        fakegpu:0" in out and "clip       fakegpu:0" in out
    last = out.split("== CLIP back on the CPU")[1]
    assert "fakegpu:0 " not in last.split("\n", 3)[3]  # every component back on the CPU at the end
    assert list(tmp_path.glob("synthetic-sd15-mini-*.safetensors"))


def test_demo_with_a_checkpoint_that_is_not_there(tmp_path: Path) -> None:
    """--checkpoint naming a missing file ends with a one-line error, not a traceback."""
    done = ondevice("demo", "--checkpoint", str(tmp_path / "none.safetensors"), cache=tmp_path)
    assert done.returncode == 2
    assert "ondevice: error: checkpoint" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_reports_comfyui(tmp_path: Path) -> None:
    """`ondevice info` names the ComfyUI version and its features."""
    done = ondevice("info", cache=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "version:" in done.stdout and "weakref_loaded_model:" in done.stdout
