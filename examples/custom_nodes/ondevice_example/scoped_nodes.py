"""ComfyUI's text encode, sampler and VAE decode nodes, each holding its model on the GPU for exactly its run.

ComfyUI's own nodes leave a model loaded on the GPU after they return (it stays in ComfyUI's
``current_loaded_models`` until memory runs short). These nodes say where their model lives:
on the GPU while the node runs, back on the CPU when it returns, whatever happens. Inputs,
outputs and widgets are those of ComfyUI's nodes (the classes inherit them), so the nodes
drop into any workflow in place of the originals.
"""

from __future__ import annotations

from typing import Any

import nodes  # ComfyUI's built-in nodes: its folder is on sys.path when it loads custom nodes

import ondevice

CATEGORY = "ondevice"


class OnDeviceCLIPTextEncode(nodes.CLIPTextEncode):
    """CLIPTextEncode; the text encoder is on the GPU during each call (the decorator form)."""

    CATEGORY = CATEGORY

    @ondevice.gpu_scoped("clip")
    def encode(self, clip: Any, text: str) -> tuple[Any, ...]:
        return super().encode(clip, text)


class OnDeviceKSampler(nodes.KSampler):
    """KSampler; the diffusion model is on the GPU for the sampling loop (the context-manager form)."""

    CATEGORY = CATEGORY

    def sample(  # noqa: PLR0917  (KSampler's inputs, in its order)
        self,
        model: Any,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        positive: Any,
        negative: Any,
        latent_image: dict[str, Any],
        denoise: float = 1.0,
    ) -> tuple[dict[str, Any]]:
        with ondevice.on_gpu(model):
            return nodes.common_ksampler(
                model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise
            )


class OnDeviceVAEDecode(nodes.VAEDecode):
    """VAEDecode; the VAE is on the GPU during each call."""

    CATEGORY = CATEGORY

    @ondevice.gpu_scoped("vae")
    def decode(self, vae: Any, samples: dict[str, Any]) -> tuple[Any, ...]:
        return super().decode(vae, samples)


NODE_CLASS_MAPPINGS = {
    "OnDeviceCLIPTextEncode": OnDeviceCLIPTextEncode,
    "OnDeviceKSampler": OnDeviceKSampler,
    "OnDeviceVAEDecode": OnDeviceVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "OnDeviceCLIPTextEncode": "CLIP Text Encode (ondevice: GPU for this node)",
    "OnDeviceKSampler": "KSampler (ondevice: GPU for this node)",
    "OnDeviceVAEDecode": "VAE Decode (ondevice: GPU for this node)",
}
