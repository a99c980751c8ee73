"""Fixed-input steps of the SD1.5 mini components, each result on the CPU, and ComfyUI's own load to run them
under: what tests compare across load paths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.model_management as mm
import torch


def unet_forward(patcher: Any, device: torch.device) -> torch.Tensor:
    """A UNet step through ComfyUI's apply_model, fixed inputs, result on the CPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 1, 768, generator=generator)  # one token: a quick forward on the fake GPU
    with torch.inference_mode():
        out = patcher.model.apply_model(x.to(device), torch.tensor([10.0]).to(device), c_crossattn=context.to(device))
        return out.cpu()


def vae_decode(vae: Any) -> torch.Tensor:
    """A VAE decode of a fixed latent, result on the CPU."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return vae.decode(latent).cpu()


def comfyui_alone(patcher: Any, device: torch.device, work: Callable[[], torch.Tensor], **load: Any) -> torch.Tensor:
    """``work()`` with ``patcher`` loaded by ComfyUI's own ``load_models_gpu(**load)`` on ``device``, no ondevice."""
    saved = patcher.load_device
    patcher.load_device = device
    try:
        mm.load_models_gpu([patcher], **load)
        return work()
    finally:
        mm.unload_all_models()
        patcher.load_device = saved
