"""The pytest plugin as a user sees it: a fresh test session, no conftest, ComfyUI not yet imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_TEST = """
import sys
import torch
import ondevice
import ondevice.testing


def test_comfyui_imported_after_the_fake_gpu_started(fake_gpu, tmp_path):
    assert "comfy.model_management" not in sys.modules   # nothing imported ComfyUI before the fixture started
    path = ondevice.testing.synthetic_checkpoint(tmp_path / "m.safetensors")   # imports ComfyUI now
    ckpt = ondevice.load_checkpoint(path)
    with ondevice.on_gpu(ckpt.model) as scope:
        assert scope.device == fake_gpu.device
        assert ondevice.device_of(ckpt.model) == fake_gpu.device
    assert ondevice.device_of(ckpt.model) == torch.device("cpu")


def test_user_pipeline(fake_gpu, sd15_checkpoint):
    ckpt = ondevice.load_checkpoint(sd15_checkpoint)
    with ondevice.on_gpu(ckpt.model, ckpt.vae) as scope:
        assert scope.device == fake_gpu.device
        assert ondevice.device_of(ckpt.model) == fake_gpu.device
        with torch.inference_mode():
            ckpt.vae.decode(torch.randn(1, 4, 8, 8))
    assert ondevice.device_of(ckpt.model) == torch.device("cpu")
    assert fake_gpu.memory_allocated() == 0
"""


def test_fixtures_work_in_a_fresh_session(tmp_path: Path) -> None:
    """A user's suite with the fixtures; ComfyUI first imported inside a test still sees the fake GPU."""
    (tmp_path / "test_user.py").write_text(USER_TEST)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 passed" in done.stdout
