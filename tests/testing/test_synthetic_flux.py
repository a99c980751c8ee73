"""The synthetic Flux checkpoint is Flux-dev to ComfyUI: detected, loaded, sampled, run in its low-VRAM path."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sample
import comfy.sd
import pytest
import safetensors
import torch

import ondevice.testing
from ondevice.errors import InvalidArgumentError
from ondevice.testing.synthetic import cached_checkpoint, checkpoint_layout

FLUX_DEV_PARAMS = 11_901_408_320
MINI_PARAMS = 545_548_096
# sha1 of [(key, shape, dtype), ...] in file order: the same on every ComfyUI of the matrix, so one cached
# file (named by family, size and FORMAT_VERSION only) serves them all.
LAYOUT_DIGESTS = {
    "mini": "16125b7104cbddc461bac3a8e7950c8df512f7c9",
    "full": "ac960fb8fb794ec21fe34a4966b62a70d1d4bec3",
}


def _loader() -> Callable[[str], Any]:
    """ComfyUI's "Load Diffusion Model" loader: load_diffusion_model, or load_unet where that is all there is."""
    loader: Callable[[str], Any] = getattr(comfy.sd, "load_diffusion_model", None) or comfy.sd.load_unet
    return loader


def _sample(patcher: Any, guidance: float = 3.5) -> torch.Tensor:
    """One euler step of ComfyUI's own sampler on a 16x16 Flux latent, with seeded T5 / CLIP-L stand-ins."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(1, 8, 4096, generator=generator)  # 8 T5-XXL tokens
    pooled = torch.randn(1, 768, generator=generator)  # CLIP-L pooled output
    positive = [[context, {"pooled_output": pooled, "guidance": guidance}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=generator)
    with torch.inference_mode():
        out: torch.Tensor = comfy.sample.sample(
            patcher, noise, 1, 1.0, "euler", "simple", positive, negative, latent, disable_pbar=True, seed=0
        )
    return out


@pytest.fixture(scope="module")
def flux_mini_path() -> Path:
    """The mini Flux file from the run's cache (written once per cache; read-only)."""
    return cached_checkpoint("flux", "mini")


@pytest.fixture
def flux_cpu(flux_mini_path: Path) -> Iterator[Any]:
    """The mini Flux model loaded by ComfyUI's own loader, ComfyUI booted for the CPU (2.2 GB in fp32)."""
    patcher = _loader()(str(flux_mini_path))
    yield patcher
    mm.unload_all_models()


@pytest.mark.parametrize(("size", "double", "single"), [("mini", 1, 1), ("full", 19, 38)])
def test_layout_is_detected_as_flux_dev(size: str, double: int, single: int) -> None:
    """ComfyUI's own detection names both layouts Flux (with guidance), at Flux-dev's width, with their blocks."""
    config = comfy.model_detection.model_config_from_unet(checkpoint_layout("flux", size), "")
    assert type(config).__name__ == "Flux"
    unet = config.unet_config
    assert (unet["image_model"], unet["guidance_embed"], unet["hidden_size"]) == ("flux", True, 3072)
    assert (unet["depth"], unet["depth_single_blocks"]) == (double, single)


def test_full_layout_has_flux_dev_shapes() -> None:
    """Built on meta, the full layout has Flux-dev's key names, shapes and 11.9 B parameters."""
    layout = checkpoint_layout("flux", "full")
    shapes = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "time_in.in_layer.weight": (3072, 256),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.out_layer.weight": (3072, 3072),
        "double_blocks.18.img_attn.qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
        "double_blocks.0.txt_mlp.0.weight": (12288, 3072),
        "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.37.linear2.weight": (3072, 15360),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "final_layer.linear.weight": (64, 3072),
    }
    assert {key: tuple(layout[key].shape) for key in shapes} == shapes
    assert "double_blocks.19.img_mod.lin.weight" not in layout
    assert "single_blocks.38.linear1.weight" not in layout
    assert sum(t.numel() for t in layout.values()) == FLUX_DEV_PARAMS
    assert all(t.device.type == "meta" for t in layout.values())


@pytest.mark.parametrize("size", ["mini", "full"])
def test_layout_is_the_same_on_every_comfyui(size: str) -> None:
    """Keys, shapes and order match one digest on every ComfyUI version (ComfyUI 0.33's norm.weight renamed back)."""
    layout = checkpoint_layout("flux", size)
    entries = repr([(key, tuple(t.shape), t.dtype) for key, t in layout.items()])
    assert hashlib.sha1(entries.encode()).hexdigest() == LAYOUT_DIGESTS[size]  # noqa: S324  (a fingerprint)


def test_file_holds_the_layout_without_prefix(flux_mini_path: Path) -> None:
    """The mini file holds the layout's keys and shapes in fp16, unprefixed like a released Flux file."""
    layout = checkpoint_layout("flux", "mini")
    with safetensors.safe_open(str(flux_mini_path), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118  (not a dict)
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
        key_norm = f.get_tensor("single_blocks.0.norm.key_norm.scale")
    assert shapes == {key: tuple(t.shape) for key, t in layout.items()}
    assert dtypes == {"F16"}
    assert metadata["ondevice.synthetic"] == "flux-mini"
    assert torch.equal(key_norm, torch.ones(128, dtype=torch.float16))


def test_comfyui_loads_it_as_a_flux_model_patcher(flux_cpu: Any) -> None:
    """ComfyUI's diffusion model loader returns a ModelPatcher around its own Flux model, of model type FLUX."""
    assert isinstance(flux_cpu, comfy.model_patcher.ModelPatcher)
    assert isinstance(flux_cpu.model, comfy.model_base.Flux)
    assert isinstance(flux_cpu.model.diffusion_model, comfy.ldm.flux.model.Flux)
    assert type(flux_cpu.model.model_config).__name__ == "Flux"
    assert flux_cpu.model.model_type == comfy.model_base.ModelType.FLUX
    assert sum(p.numel() for p in flux_cpu.model.diffusion_model.parameters()) == MINI_PARAMS


def test_sampling_step_on_cpu_is_finite_and_uses_guidance(flux_cpu: Any) -> None:
    """One step of ComfyUI's sampler on the CPU gives a finite Flux latent, which the guidance value changes."""
    out = _sample(flux_cpu)
    assert out.shape == (1, 16, 16, 16)
    assert torch.isfinite(out).all()
    assert out.std() > 0
    assert not torch.equal(_sample(flux_cpu, guidance=1.0), out)


def test_comfyui_low_vram_run_matches_the_full_load(flux_mini_path: Path) -> None:
    """On a fake GPU 90% the model's size ComfyUI loads part, casts the rest per layer: same latent as a full load."""
    with ondevice.testing.fake_gpu(memory="8GiB") as gpu:
        patcher = _loader()(str(flux_mini_path))
        assert patcher.load_device == gpu.device
        full = _sample(patcher)
        assert patcher.loaded_size() == patcher.model_size()
        mm.unload_all_models()
    size = patcher.model_size()
    # The fake device raises OutOfMemoryError past its capacity, so a finished run never held more.
    with ondevice.testing.fake_gpu(memory=size * 9 // 10) as gpu:
        low = _sample(patcher)
        assert 0 < patcher.loaded_size() < size
        mm.unload_all_models()
        assert gpu.memory_allocated() == 0
    assert torch.equal(low, full)


@pytest.mark.parametrize(
    ("family", "size", "message"),
    [("flux2", "mini", "(family=...): got 'flux2'; choose one of 'sd15', 'sdxl', 'flux'"),
     ("flux", "dev", "(size=...): got 'dev'; choose one of 'mini', 'full'")],
)  # fmt: skip
def test_unknown_flux_variant_raises_naming_the_choices(family: str, size: str, message: str) -> None:
    """A family or size that does not exist raises InvalidArgumentError listing the valid ones, flux included."""
    with pytest.raises(InvalidArgumentError) as info:
        checkpoint_layout(family, size)
    assert message in str(info.value)
