"""Synthetic checkpoints load in real ComfyUI as the family they claim to be, with finite outputs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy.model_detection
import comfy.model_management
import comfy.sd
import pytest
import safetensors
import torch

from ondevice.errors import InvalidArgumentError, OnDeviceError
from ondevice.testing import synthetic
from ondevice.testing.synthetic import cached_checkpoint, checkpoint_layout, synthetic_checkpoint

UNET = "model.diffusion_model."
slow = pytest.mark.skipif(
    os.environ.get("ONDEVICE_SLOW") != "1", reason="builds a full-size checkpoint; set ONDEVICE_SLOW=1"
)


def _params(layout: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(t.numel() for key, t in layout.items() if key.startswith(prefix))


def _load(path: Path) -> tuple[Any, Any, Any, Any]:
    loaded: tuple[Any, Any, Any, Any] = comfy.sd.load_checkpoint_guess_config(str(path))
    return loaded


def _encode(clip: Any) -> tuple[torch.Tensor, torch.Tensor]:
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo"), return_pooled=True)
    return cond, pooled


def _unload() -> None:
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


@pytest.fixture(scope="session")
def sd15_mini_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = synthetic_checkpoint(tmp_path_factory.mktemp("synthetic") / "new" / "dir" / "sd15-mini.safetensors")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def sdxl_mini_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = synthetic_checkpoint(tmp_path_factory.mktemp("synthetic") / "sdxl-mini.safetensors", "sdxl", "mini")
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied of checkpoints afterwards (pytest keeps the last three runs' folders)."""
    yield tmp_path
    for path in tmp_path.rglob("*.safetensors"):
        path.unlink()


@pytest.fixture(scope="module")
def sd15_mini(sd15_mini_path: Path) -> Iterator[tuple[Any, Any, Any, Any]]:
    yield _load(sd15_mini_path)
    _unload()


@pytest.fixture(scope="module")
def sdxl_mini(sdxl_mini_path: Path) -> Iterator[tuple[Any, Any, Any, Any]]:
    yield _load(sdxl_mini_path)
    _unload()


def test_sd15_mini_is_detected_as_sd15(sd15_mini: tuple[Any, Any, Any, Any]) -> None:
    """ComfyUI detects the mini SD1.5 file as SD15 and returns (ModelPatcher, CLIP, VAE, None)."""
    model, clip, vae, clip_vision = sd15_mini
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(model).__name__ == "ModelPatcher"
    assert isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert clip_vision is None


def test_sdxl_mini_is_detected_as_sdxl(sdxl_mini: tuple[Any, Any, Any, Any]) -> None:
    """ComfyUI detects the mini SDXL file as SDXL, with both text encoders and a VAE."""
    model, clip, vae, clip_vision = sdxl_mini
    assert type(model.model.model_config).__name__ == "SDXL"
    assert type(model.model).__name__ == "SDXL"
    assert type(clip.cond_stage_model).__name__ == "SDXLClipModel"
    assert isinstance(vae, comfy.sd.VAE)
    assert clip_vision is None


def test_sd15_mini_encodes_and_decodes_finite(sd15_mini: tuple[Any, Any, Any, Any]) -> None:
    """A real CLIP-L encode and a real TAESD decode of the mini SD1.5 give finite tensors of SD1.5's shapes."""
    _, clip, vae, _ = sd15_mini
    cond, pooled = _encode(clip)
    image = vae.decode(torch.zeros(1, 4, 8, 8))
    assert (cond.shape, pooled.shape, image.shape) == ((1, 77, 768), (1, 768), (1, 64, 64, 3))
    assert all(torch.isfinite(t).all() for t in (cond, pooled, image))


def test_sdxl_mini_encodes_and_decodes_finite(sdxl_mini: tuple[Any, Any, Any, Any]) -> None:
    """A real CLIP-L + CLIP-G encode and a TAESD decode of the mini SDXL give finite tensors of SDXL's shapes."""
    _, clip, vae, _ = sdxl_mini
    cond, pooled = _encode(clip)
    image = vae.decode(torch.zeros(1, 4, 8, 8))
    assert (cond.shape, pooled.shape, image.shape) == ((1, 77, 2048), (1, 1280), (1, 64, 64, 3))
    assert all(torch.isfinite(t).all() for t in (cond, pooled, image))


def test_sd15_mini_unet_forward_is_finite(sd15_mini: tuple[Any, Any, Any, Any]) -> None:
    """The mini SD1.5 UNet runs a real forward pass with finite output."""
    model, clip, _, _ = sd15_mini
    cond, _ = _encode(clip)
    out = model.model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), c_crossattn=cond)
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()


def test_sd15_keys_are_comfyui_checkpoint_keys(sd15_mini_path: Path) -> None:
    """The SD1.5 file holds ComfyUI's checkpoint key names, in fp16, with ondevice's metadata."""
    with safetensors.safe_open(str(sd15_mini_path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert f"{UNET}input_blocks.0.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys
    assert "first_stage_model.taesd_decoder.1.weight" in keys
    assert keys == set(checkpoint_layout("sd15", "mini"))
    assert dtypes == {"F16"}
    assert metadata["ondevice.synthetic"] == "sd15-mini"


def test_sdxl_keys_are_comfyui_checkpoint_keys(sdxl_mini_path: Path) -> None:
    """The SDXL file holds SDXL's key names: CLIP-L under embedders.0, OpenCLIP-G under embedders.1, int64 ids."""
    with safetensors.safe_open(str(sdxl_mini_path), "pt") as f:
        keys = set(f.keys())
        ids = f.get_tensor("conditioner.embedders.0.transformer.text_model.embeddings.position_ids")
        label_emb = f.get_slice(f"{UNET}label_emb.0.0.weight").get_shape()
    assert f"{UNET}input_blocks.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert label_emb == [1280, 2816]
    assert ids.dtype == torch.int64
    assert torch.equal(ids, torch.arange(77).unsqueeze(0))


@pytest.mark.parametrize(
    ("family", "unet", "text", "vae"),
    [
        ("sd15", 859_520_964, {"cond_stage_model.": 123_060_480}, 83_653_863),
        ("sdxl", 2_567_463_684, {"conditioner.embedders.0.": 123_060_557, "conditioner.embedders.1.": 694_659_841},
         83_653_863),
    ],
)  # fmt: skip
def test_full_layouts_have_the_real_parameter_counts(family: str, unet: int, text: dict[str, int], vae: int) -> None:
    """Built on meta, the full SD1.5 / SDXL layouts have the real models' parameter counts."""
    layout = checkpoint_layout(family, "full")
    assert _params(layout, UNET) == unet
    assert {prefix: _params(layout, prefix) for prefix in text} == text
    assert _params(layout, "first_stage_model.") == vae
    assert all(t.device.type == "meta" for t in layout.values())


@pytest.mark.parametrize(
    ("family", "size", "expected"), [(f, s, f.upper()) for f in ("sd15", "sdxl") for s in ("mini", "full")]
)
def test_every_layout_is_detected_as_its_family(family: str, size: str, expected: str) -> None:
    """ComfyUI's own model detection, run on the meta layout, names the requested family for both sizes."""
    config = comfy.model_detection.model_config_from_unet(checkpoint_layout(family, size), UNET)
    assert type(config).__name__ == expected


def test_same_seed_gives_same_bytes(sd15_mini_path: Path, scratch: Path) -> None:
    """Writing again with the same arguments gives a byte-identical file (seeded, deterministic)."""
    again = synthetic_checkpoint(scratch / "again.safetensors")
    assert again.read_bytes() == sd15_mini_path.read_bytes()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails midway keeps the previous file intact and removes its temporary file."""
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"old")

    def explode(file: Any, *_: Any) -> None:
        file.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_stream_safetensors", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic_checkpoint(path)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_cached_checkpoint_writes_once(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cached_checkpoint writes under $ONDEVICE_CACHE once; later calls (also with cache_dir) reuse the file."""
    monkeypatch.setenv("ONDEVICE_CACHE", str(scratch / "cache"))
    first = cached_checkpoint()
    stamp = first.stat().st_mtime_ns
    second = cached_checkpoint("sd15", "mini", cache_dir=scratch / "cache")
    assert first == second
    assert first.parent == scratch / "cache"
    assert first.name == f"synthetic-sd15-mini-v{synthetic.FORMAT_VERSION}.safetensors"
    assert second.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_cached_checkpoint_defaults_to_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without cache_dir or $ONDEVICE_CACHE the cache is ~/.cache/ondevice (file already there: not rewritten)."""
    monkeypatch.delenv("ONDEVICE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = tmp_path / ".cache" / "ondevice"
    folder.mkdir(parents=True)
    name = f"synthetic-sdxl-full-v{synthetic.FORMAT_VERSION}.safetensors"
    (folder / name).write_bytes(b"stand-in")
    assert cached_checkpoint("sdxl", "full") == folder / name
    assert (folder / name).read_bytes() == b"stand-in"


@pytest.mark.parametrize(
    ("call", "argument", "received"),
    [
        (lambda p: synthetic_checkpoint(p, family="sd3"), "family", "'sd3'"),
        (lambda p: synthetic_checkpoint(p, size="tiny"), "size", "'tiny'"),
        (lambda p: synthetic_checkpoint(p, dtype=torch.int8), "dtype", "torch.int8"),
        (lambda p: synthetic_checkpoint(p, seed="1"), "seed", "'1'"),  # type: ignore[arg-type]
        (lambda p: cached_checkpoint("SDXL", cache_dir=p.parent), "family", "'SDXL'"),
        (lambda p: cached_checkpoint(size=None, cache_dir=p.parent), "size", "None"),  # type: ignore[arg-type]
        (lambda _: checkpoint_layout("sd3"), "family", "'sd3'"),
    ],
)
def test_bad_arguments_raise_clear_errors(call: Any, argument: str, received: str, tmp_path: Path) -> None:
    """A bad family, size, dtype or seed raises InvalidArgumentError naming it, the value and the fix; no file."""
    with pytest.raises(InvalidArgumentError) as info:
        call(tmp_path / "x.safetensors")
    message = str(info.value)
    assert f"({argument}=...): got {received}; " in message
    assert ("choose one of " in message) != (argument == "seed")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, OnDeviceError)
    assert list(tmp_path.iterdir()) == []


@slow
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_checkpoint_loads_and_runs(family: str, tmp_path: Path) -> None:
    """A full-size file (SD1.5: 2 GB, SDXL: 6.9 GB) loads as its family and encodes/decodes finitely."""
    path = synthetic_checkpoint(tmp_path / f"{family}-full.safetensors", family, "full")
    try:
        model, clip, vae, _ = _load(path)
        assert type(model.model.model_config).__name__ == family.upper()
        assert type(vae.first_stage_model).__name__ == "AutoencoderKL"
        cond, pooled = _encode(clip)
        assert torch.isfinite(cond).all()
        assert torch.isfinite(pooled).all()
        assert torch.isfinite(vae.decode(torch.zeros(1, 4, 8, 8))).all()
    finally:
        _unload()
        path.unlink(missing_ok=True)
