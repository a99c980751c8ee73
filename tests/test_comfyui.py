"""Finding and booting ComfyUI, and what import ondevice does not do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ondevice
from ondevice import comfyui


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_import_is_light_and_boot_never_parses_argv() -> None:
    """import ondevice imports no comfy module and does not initialize CUDA; booting ComfyUI then ignores sys.argv.

    One fresh interpreter checks both (each boot of torch and ComfyUI costs seconds): the argv holds flags
    that would change ComfyUI's mode or fail to parse.
    """
    out = run_python(
        "import sys, ondevice, ondevice.testing, torch; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'comfy'), torch.cuda.is_initialized()); "
        "sys.argv[1:] = ['--highvram', '--no-such-flag']; "
        "import ondevice.comfyui as c; mm = c.import_comfy(); print(mm.vram_state.name)"
    )
    light, vram_state = out.splitlines()
    assert light == "[] False"
    assert vram_state in {"DISABLED", "NORMAL_VRAM"}  # CPU mode here; never HIGH_VRAM from argv


def test_comfyui_info_reports_version_and_features() -> None:
    """comfyui_info() names the version, the location and the probed features."""
    info = ondevice.comfyui_info()
    assert info.version != "unknown"
    assert Path(info.path, "model_management.py").is_file()
    assert {"weakref_loaded_model", "patcher_detach", "dynamic_vram", "cpu_mode"} <= set(info.features)


def test_not_found_says_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an importable comfy, COMFYUI_PATH or use_comfyui, the error names both ways."""
    monkeypatch.setattr(comfyui, "_comfy_importable", lambda: False)
    monkeypatch.setattr(comfyui, "_user_path", None)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ImportError, match="COMFYUI_PATH") as info:
        comfyui._locate()  # noqa: SLF001
    assert "use_comfyui" in str(info.value)
    assert isinstance(info.value, ondevice.ComfyUINotFoundError)


def test_comfyui_path_not_a_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """COMFYUI_PATH naming a folder without comfy/ is reported with the variable's name."""
    monkeypatch.setattr(comfyui, "_comfy_importable", lambda: False)
    monkeypatch.setattr(comfyui, "_user_path", None)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    with pytest.raises(ondevice.ComfyUINotFoundError, match="COMFYUI_PATH.*not a ComfyUI checkout"):
        comfyui._locate()  # noqa: SLF001


def test_use_comfyui_puts_checkout_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """use_comfyui(checkout) is used when comfy is not importable: its root goes on sys.path."""
    (tmp_path / "comfy").mkdir()
    (tmp_path / "comfy" / "model_management.py").write_text("")
    monkeypatch.setattr(comfyui, "_comfy_importable", lambda: False)
    monkeypatch.setattr(comfyui, "_user_path", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    ondevice.use_comfyui(tmp_path)
    comfyui._locate()  # noqa: SLF001
    assert str(tmp_path.resolve()) in sys.path


def test_use_comfyui_rejects_non_checkout(tmp_path: Path) -> None:
    """use_comfyui on a folder without comfy/model_management.py fails at once, naming the path."""
    with pytest.raises(ondevice.ComfyUINotFoundError, match="not a ComfyUI checkout"):
        ondevice.use_comfyui(tmp_path)
