"""pytest plugin (registered through the ``pytest11`` entry point): ondevice's fixtures.

Importing this module imports neither torch nor ComfyUI; the fixtures do, when used.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ondevice.testing.fake import FakeGPU


@pytest.fixture
def fake_gpu() -> Iterator[FakeGPU]:
    """A fake accelerator (``fakegpu:0``, 8 GiB) active for the test; ComfyUI sees it as the GPU."""
    from ondevice.testing.fake import fake_gpu as _fake_gpu  # noqa: PLC0415

    with _fake_gpu() as handle:
        yield handle


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a mini SD1.5 safetensors checkpoint that ComfyUI detects as SD15 (written once per session)."""
    from ondevice.testing.synthetic import synthetic_checkpoint  # noqa: PLC0415

    path = tmp_path_factory.mktemp("ondevice-ckpt") / "sd15-mini.safetensors"
    return synthetic_checkpoint(path, family="sd15", size="mini")
