"""The seed scenario: an SDXL checkpoint on the CPU, each component on the GPU only while it works.

    python examples/seed_scenario.py [CHECKPOINT]

Without a checkpoint it uses a cached synthetic SDXL one; without a GPU it runs on the fake GPU.
Free device memory is printed at each step: it drops by the diffusion model's size while the
model is on the GPU and returns to the baseline exactly when it leaves.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import torch

import ondevice
from ondevice.devices import memory_info, resolve


def free(device: torch.device) -> int:
    return memory_info(device)[0]


def main(path: str | None) -> None:
    ondevice.comfyui_info()  # find and boot ComfyUI first
    with ExitStack() as stack:
        if not torch.cuda.is_available():
            from ondevice.testing import fake_gpu

            stack.enter_context(fake_gpu(memory="16GiB"))
        if path is None:
            from ondevice.testing.synthetic import cached_checkpoint

            path = str(cached_checkpoint("sdxl", "mini"))
        device = resolve(None)
        baseline = free(device)
        ckpt = ondevice.load_checkpoint(path)
        print(f"loaded {path}: model on {ondevice.device_of(ckpt.model)}, free {baseline:,} B")
        assert free(device) == baseline

        with ondevice.on_gpu(ckpt.model):
            drop = baseline - free(device)
            print(
                f"model on {ondevice.device_of(ckpt.model)}: free dropped by {drop:,} B "
                f"(model size {ckpt.model.model_size():,} B)"
            )
        print(f"model back on {ondevice.device_of(ckpt.model)}: free {free(device):,} B (baseline {baseline:,})")

        with ondevice.on_gpu(ckpt.vae), torch.inference_mode():  # ComfyUI runs nodes in inference mode
            image = ckpt.vae.decode(torch.randn(1, 4, 16, 16))
            print(f"VAE decode on {ondevice.device_of(ckpt.vae)}: image {tuple(image.shape)}")

        with ondevice.on_gpu(ckpt.clip), torch.inference_mode():
            cond = ckpt.clip.encode_from_tokens(ckpt.clip.tokenize("a lighthouse at dawn"))
            print(f"CLIP encode on {ondevice.device_of(ckpt.clip)}: conditioning {tuple(cond.shape)}")

        where = {name: str(ondevice.device_of(c)) for name, c in zip(("model", "clip", "vae"), ckpt[:3], strict=True)}
        print(f"all back: {where}, free {free(device):,} B")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
