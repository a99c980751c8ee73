"""Synthetic LoRA and diff patches on a real ComfyUI ModelPatcher, loaded through ComfyUI's own LoRA loader.

``lora_clone`` builds a small LoRA state dict (``lora_up`` / ``lora_down`` / ``alpha``, the kohya key format every
ComfyUI version reads) for a few of the UNet's attention and projection weights and applies it the way the
LoraLoader node does (``comfy.sd.load_lora_for_models``), then adds a plain ``diff`` patch on one bias with
``add_patches``, so that both patch formats ComfyUI's ``calculate_weight`` accepts are on the clone.
"""

from __future__ import annotations

from typing import Any

import comfy.lora
import comfy.sd
import torch


def lora_clone(patcher: Any, *, seed: int = 0, rank: int = 4, count: int = 3) -> Any:
    """A clone of ``patcher`` with a synthetic LoRA on ``count`` UNet weights and a diff on one bias."""
    generator = torch.Generator().manual_seed(seed)
    weights = patcher.model.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    targets = [
        (name, key)
        for name, key in key_map.items()
        if isinstance(key, str) and name.startswith("lora_unet_") and ("attn1_to_q" in name or "proj_in" in name)
    ]
    seen: set[str] = set()
    lora: dict[str, torch.Tensor] = {}
    for name, key in targets:
        if key in seen or len(seen) == count:
            continue
        seen.add(key)
        shape = weights[key].shape
        tail = (1,) * (len(shape) - 2)
        lora[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *tail, generator=generator) * 0.1
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], *tail, generator=generator) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    clone, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    bias = next(key for key in weights if key.startswith("diffusion_model.out.") and key.endswith(".bias"))
    clone.add_patches({bias: (torch.randn(weights[bias].shape, generator=generator),)}, 1.0)
    assert set(clone.patches) == {*seen, bias}, f"ComfyUI did not take every patch: {sorted(clone.patches)}"
    return clone
