"""Test support for ondevice and for its users' tests.

- :func:`fake_gpu`: a fake accelerator (``fakegpu:0``) with real data and math,
  device-mismatch errors and an out-of-memory limit; ComfyUI treats it as the GPU.
- :func:`synthetic_checkpoint`: a safetensors checkpoint with the real key names
  and shapes of a model family, detected by ComfyUI as that family.
- :func:`capture_moves`: records every move ondevice makes (``with capture_moves() as moves:``).
- a pytest plugin (entry point ``pytest11``) with the fixtures ``fake_gpu`` and
  ``sd15_checkpoint``.

Importing this package is cheap: the pieces load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FakeGPU", "cached_checkpoint", "capture_moves", "fake_gpu", "synthetic_checkpoint"]

_WHERE = {
    "FakeGPU": "ondevice.testing.fake",
    "fake_gpu": "ondevice.testing.fake",
    "cached_checkpoint": "ondevice.testing.synthetic",
    "capture_moves": "ondevice.testing.capture",
    "synthetic_checkpoint": "ondevice.testing.synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(_WHERE[name]), name)
    msg = f"module 'ondevice.testing' has no attribute {name!r}"
    raise AttributeError(msg)
