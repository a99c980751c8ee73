"""CPU-first loading with real ComfyUI, and every kind of bad checkpoint file."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import comfy.model_management as mm
import pytest
import safetensors.torch
import torch

import ondevice
from ondevice.strategies.comfy import registered_entries
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def assert_cpu_and_unregistered(*components: Any) -> None:
    for component in components:
        assert set(ondevice.placement(component)) == {CPU}
        for part in ondevice.strategies.parts_of(component):
            assert not registered_entries(part.key)


def test_load_checkpoint_cpu_first(fake_gpu: FakeGPU, sd15_checkpoint: Path) -> None:
    """Inside a fake GPU, every component comes back on the CPU and unregistered; nothing on the device."""
    ckpt = ondevice.load_checkpoint(sd15_checkpoint)
    assert ckpt.clipvision is None
    assert_cpu_and_unregistered(ckpt.model, ckpt.clip, ckpt.vae)
    assert fake_gpu.memory_allocated() == 0


def test_load_checkpoint_beats_straight_to_gpu(sd15_checkpoint: Path) -> None:
    """With more fake VRAM than free RAM (when ComfyUI loads straight to GPU) the load is still CPU-first."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(memory="4096GiB") as gpu:
        assert mm.unet_inital_load_device(10**9, torch.float16) == gpu.device  # ComfyUI would load to the GPU
        moved = gpu.bytes_to_device
        ckpt = ondevice.load_checkpoint(sd15_checkpoint)
        assert gpu.bytes_to_device == moved  # and nothing went there on the way
        assert_cpu_and_unregistered(ckpt.model, ckpt.clip, ckpt.vae)


def test_load_checkpoint_under_highvram(fake_gpu: FakeGPU, sd15_checkpoint: Path) -> None:
    """Under HIGH_VRAM (--highvram) nothing goes to the device while loading, and ComfyUI's state is restored."""
    saved = mm.vram_state
    mm.vram_state = mm.VRAMState.HIGH_VRAM
    try:
        assert mm.unet_inital_load_device(10**6, torch.float16) == fake_gpu.device  # ComfyUI would load to the GPU
        ckpt = ondevice.load_checkpoint(sd15_checkpoint)
        assert fake_gpu.bytes_to_device == 0
        assert mm.vram_state == mm.VRAMState.HIGH_VRAM
    finally:
        mm.vram_state = saved
    assert_cpu_and_unregistered(ckpt.model, ckpt.clip, ckpt.vae)
    with ondevice.on_gpu(ckpt.model):
        pass
    assert_cpu_and_unregistered(ckpt.model)


def test_large_text_encoders_start_on_the_cpu(sdxl_mini: Path) -> None:
    """SDXL's 1.6 GB text encoders, which ComfyUI would build on a roomy GPU, are built on the CPU."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(memory="4096GiB") as gpu:
        ckpt = ondevice.load_checkpoint(sdxl_mini, vae=False)
        assert gpu.bytes_to_device == 0
        assert_cpu_and_unregistered(ckpt.model, ckpt.clip)


def test_without_vae_and_clip(sd15_checkpoint: Path) -> None:
    """vae=False, clip=False return None for them."""
    ckpt = ondevice.load_checkpoint(sd15_checkpoint, vae=False, clip=False)
    assert ckpt.vae is None and ckpt.clip is None
    assert_cpu_and_unregistered(ckpt.model)


def test_single_component_loaders(roomy_gpu: FakeGPU, sd15_checkpoint: Path, tmp_path: Path) -> None:
    """load_diffusion_model / load_vae / load_text_encoders: CPU-first on a roomy GPU, unregistered, usable."""
    fake_gpu = roomy_gpu
    sd = safetensors.torch.load_file(str(sd15_checkpoint))
    parts = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model."}
    files = {}
    for name, prefix in parts.items():
        files[name] = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, files[name])
    unet = ondevice.load_diffusion_model(files["unet"])
    vae = ondevice.load_vae(files["vae"])
    clip = ondevice.load_text_encoders(files["clip"])
    assert fake_gpu.bytes_to_device == 0
    assert_cpu_and_unregistered(unet, vae, clip)
    with ondevice.on_gpu(unet, vae, clip) as scope, torch.inference_mode():
        for c in (unet, vae, clip):
            assert set(ondevice.placement(c)) == {scope.device}
        assert torch.isfinite(vae.decode(torch.randn(1, 4, 8, 8))).all()
    assert_cpu_and_unregistered(unet, vae, clip)


@pytest.fixture
def roomy_gpu() -> Any:
    """A fake GPU with more memory than the machine's RAM, where ComfyUI loads 'straight to GPU'."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(memory="4096GiB") as gpu:
        yield gpu


def test_text_encoder_kind_unknown(sd15_checkpoint: Path) -> None:
    """An unknown kind names the valid ones."""
    with pytest.raises(ondevice.InvalidArgumentError, match="stable_diffusion"):
        ondevice.load_text_encoders(sd15_checkpoint, kind="nope")


# --- a whole Checkpoint in one scope -----------------------------------------------------------------


def components(ckpt: ondevice.Checkpoint) -> list[Any]:
    return [c for c in ckpt if c is not None]


def test_on_gpu_moves_every_component_of_a_checkpoint(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """on_gpu(ckpt) puts the model, CLIP and VAE on the device for the block and back on the CPU after it."""
    base = fake_gpu.memory_allocated()
    with ondevice.on_gpu(sd15) as scope:
        for component in (sd15.model, sd15.clip, sd15.vae):
            assert set(ondevice.placement(component)) == {scope.device}
        assert set(ondevice.placement(sd15)) == {scope.device}
        assert ondevice.device_of(sd15) == scope.device
        assert fake_gpu.memory_allocated() - base == sum(ondevice.placement(sd15).values())
    assert_cpu_and_unregistered(*components(sd15))
    assert ondevice.device_of(sd15) == CPU
    assert fake_gpu.memory_allocated() == base


def test_on_gpu_skips_what_a_checkpoint_lacks(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A Checkpoint without CLIP and VAE (None) moves just its model; one with nothing is MissingWeightsError."""
    model_only = sd15._replace(clip=None, vae=None)
    base = fake_gpu.memory_allocated()
    with ondevice.on_gpu(model_only) as scope:
        assert set(ondevice.placement(sd15.model)) == {scope.device}
        assert set(ondevice.placement(sd15.vae)) == {CPU}
    assert_cpu_and_unregistered(sd15.model)
    assert fake_gpu.memory_allocated() == base
    with (
        pytest.raises(ondevice.MissingWeightsError, match="no components"),
        ondevice.on_gpu(ondevice.Checkpoint(None, None, None, None)),
    ):
        pass


def test_gpu_scoped_with_a_checkpoint_argument(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A function decorated with gpu_scoped('ckpt') (or bare @gpu_scoped) gets every component on the device."""

    @ondevice.gpu_scoped("ckpt")
    def named(ckpt: ondevice.Checkpoint) -> set[torch.device]:
        return {ondevice.device_of(c) for c in components(ckpt)}

    @ondevice.gpu_scoped
    def every(ckpt: ondevice.Checkpoint, steps: int) -> set[torch.device]:
        return {ondevice.device_of(c) for c in components(ckpt)}

    base = fake_gpu.memory_allocated()
    assert named(sd15) == {fake_gpu.device}
    assert every(sd15, 20) == {fake_gpu.device}
    assert_cpu_and_unregistered(*components(sd15))
    assert fake_gpu.memory_allocated() == base


def test_offload_a_checkpoint(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """offload(ckpt) brings every component back to the CPU now, even inside a scope that holds them."""
    base = fake_gpu.memory_allocated()
    with ondevice.on_gpu(sd15):
        assert ondevice.device_of(sd15) == fake_gpu.device
        ondevice.offload(sd15)
        assert_cpu_and_unregistered(*components(sd15))
        assert fake_gpu.memory_allocated() == base
    assert_cpu_and_unregistered(*components(sd15))
    assert fake_gpu.memory_allocated() == base


# --- bad files -------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    """A missing path is CheckpointNotFoundError, also FileNotFoundError, naming the path."""
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors") as info:
        ondevice.load_checkpoint(path)
    assert isinstance(info.value, ondevice.OnDeviceError)


def test_directory(tmp_path: Path) -> None:
    """A directory is a CheckpointIsADirectoryError (also IsADirectoryError) saying to pass a file inside it."""
    with pytest.raises(IsADirectoryError, match="is a directory") as info:
        ondevice.load_checkpoint(tmp_path)
    assert isinstance(info.value, ondevice.CheckpointError)


def test_empty_file(tmp_path: Path) -> None:
    """An empty file is a CheckpointError saying it is empty."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ondevice.CheckpointError, match="empty"):
        ondevice.load_checkpoint(path)


def test_truncated_file(tmp_path: Path, sd15_checkpoint: Path) -> None:
    """A safetensors file cut short is a CheckpointError saying it is truncated, with both sizes."""
    path = tmp_path / "cut.safetensors"
    data = sd15_checkpoint.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ondevice.CheckpointError, match="truncated"):
        ondevice.load_checkpoint(path)


def test_truncated_inside_header(tmp_path: Path, sd15_checkpoint: Path) -> None:
    """A file cut inside its header is reported as truncated too."""
    path = tmp_path / "cut.safetensors"
    path.write_bytes(sd15_checkpoint.read_bytes()[:100])
    with pytest.raises(ondevice.CheckpointError, match="truncated"):
        ondevice.load_checkpoint(path)


@pytest.mark.parametrize("content", [b"hello, this is a text file\n" * 20, b"\x00" * 64, json.dumps({"a": 1}).encode()])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    """A file that is not a checkpoint at all says so."""
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(ondevice.CheckpointError, match="not a checkpoint"):
        ondevice.load_checkpoint(path)


def test_unknown_family_names_prefixes(fake_gpu: FakeGPU, tmp_path: Path) -> None:
    """A valid safetensors file of an unknown family raises UnknownModelError listing the key prefixes found."""
    path = tmp_path / "mystery.safetensors"
    tensors = {f"mystery_net.block{i}.weight": torch.zeros(4, 4) for i in range(3)}
    tensors["other.bias"] = torch.zeros(4)
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ondevice.UnknownModelError, match=r"mystery_net\.block0") as info:
        ondevice.load_checkpoint(path)
    assert "other.bias" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert fake_gpu.memory_allocated() == 0


def test_checkpoint_without_vae_or_clip(fake_gpu: FakeGPU, sd15_checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint lacking VAE and CLIP weights, asked for them, says which are missing and what to do."""
    sd = safetensors.torch.load_file(str(sd15_checkpoint))
    path = tmp_path / "unet-only.safetensors"
    safetensors.torch.save_file({k: v for k, v in sd.items() if k.startswith("model.")}, str(path))
    with pytest.raises(ondevice.CheckpointError, match="no VAE and CLIP weights") as info:
        ondevice.load_checkpoint(path)
    assert "vae=False" in str(info.value) and "load_vae" in str(info.value)
    assert fake_gpu.memory_allocated() == 0
    ckpt = ondevice.load_checkpoint(path, vae=False, clip=False)
    assert_cpu_and_unregistered(ckpt.model)


def test_torch_pickle_checkpoint(tmp_path: Path, sd15_checkpoint: Path) -> None:
    """A .ckpt (torch.save) checkpoint loads through a weights-only torch.load."""
    sd = safetensors.torch.load_file(str(sd15_checkpoint))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, path)
    ckpt = ondevice.load_checkpoint(path)
    assert_cpu_and_unregistered(ckpt.model, ckpt.clip, ckpt.vae)


def test_header_too_large_is_not_a_checkpoint(tmp_path: Path) -> None:
    """Eight bytes announcing an absurd header length are 'not a checkpoint'."""
    path = tmp_path / "weird.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ondevice.CheckpointError, match="not a checkpoint"):
        ondevice.load_checkpoint(path)


@pytest.mark.parametrize(
    "header",
    [
        {"w": {"dtype": "F32", "shape": [1]}},
        {"w": 5},
        {"__metadata__": {}, "w": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}},
    ],
)
def test_json_header_that_is_not_safetensors(tmp_path: Path, header: dict[str, Any]) -> None:
    """A well-formed length and JSON header that is not a safetensors header is 'not a checkpoint'."""
    path = tmp_path / "odd.safetensors"
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 16)
    with pytest.raises(ondevice.CheckpointError, match="not a checkpoint"):
        ondevice.load_checkpoint(path)
