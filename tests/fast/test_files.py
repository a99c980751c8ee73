"""Checking checkpoint files before anything reads them (ondevice.files): no ComfyUI, no fake GPU."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ondevice.errors import CheckpointError
from ondevice.files import check_file


def header_of_length(length: int) -> bytes:
    """A safetensors header of exactly ``length`` bytes describing one 2-element F32 tensor."""
    base = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"pad": ""}}
    base["__metadata__"]["pad"] = "x" * (length - len(json.dumps(base, separators=(",", ":")).encode()))
    raw = json.dumps(base, separators=(",", ":")).encode()
    assert len(raw) == length
    return raw


@pytest.mark.parametrize("length", [128, 384, 640])
def test_header_length_whose_low_byte_is_a_pickle_opcode(tmp_path: Path, length: int) -> None:
    """A safetensors file whose header length ends in byte 0x80 (a pickle's first byte) is read as safetensors."""
    raw = header_of_length(length)
    path = tmp_path / "m.sft"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    assert safetensors.torch.load_file(str(path))["w"].tolist() == [0.0, 0.0]  # safetensors reads it
    _, info = check_file(path, "checkpoint")
    assert info.safetensors and info.keys == ["w"]


def test_bad_header_whose_length_ends_in_0x80_is_still_checked(tmp_path: Path) -> None:
    """Such a file with a malformed header gets the header check's error, not torch.load's."""
    raw = header_of_length(128).replace(b'"data_offsets":[0,8]', b'"data_offsets":[0,9]')
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="malformed safetensors header"):
        check_file(path, "checkpoint")


def test_torch_checkpoint_is_recognized(tmp_path: Path) -> None:
    """torch.save's zip format is a torch checkpoint, with no safetensors keys."""
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    _, info = check_file(path, "checkpoint")
    assert not info.safetensors


def test_a_big_header_is_checked_in_reasonable_time(tmp_path: Path) -> None:
    """20,000 tensors (8x an SDXL checkpoint) are checked; prints the time (speed is the benchmark's job)."""
    path = tmp_path / "big.safetensors"
    safetensors.torch.save_file({f"t{i}": torch.zeros(1) for i in range(20_000)}, str(path))
    start = time.perf_counter()
    _, info = check_file(path, "checkpoint")
    print(f"20,000-tensor header checked in {time.perf_counter() - start:.3f} s")
    assert len(info.keys) == 20_000
