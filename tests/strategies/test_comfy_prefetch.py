"""Prefetch of ComfyUI patchers on the fake GPU: copies in flight on a side stream, ComfyUI's load at the claim.

The fake GPU lands a side stream's copies late (its destinations read NaN until the copy is waited
for), so a scope that computed on prefetched weights without joining them would get NaN, not luck.
"""

from __future__ import annotations

import comfy.model_management as mm
import torch

import ondevice
from ondevice import on_gpu
from ondevice.testing import FakeGPU
from tests.strategies._lora import lora_clone
from tests.strategies.test_comfy_fast_path import (
    Originals,
    assert_comfyui_books,
    entries_of,
    expected_forward,
    tensors,
    unet_forward,
)

CPU = torch.device("cpu")


def test_prefetch_beside_a_scope_then_claim_is_bit_identical_and_exits_zero_copy(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint
) -> None:
    """on_gpu(vae, prefetch=model), then on_gpu(model): ComfyUI's books and outputs as its own load; 0 bytes back."""
    model = sd15.model
    expected = expected_forward("base", model, fake_gpu)
    originals = Originals(model)
    base, to_device = fake_gpu.memory_allocated(), fake_gpu.bytes_to_device
    with on_gpu(sd15.vae, prefetch=model):
        assert not entries_of(model)  # ComfyUI's load (and its patches) waits for the claim
    with on_gpu(model) as scope:
        assert fake_gpu.bytes_to_device - to_device == model.model_size() + sd15.vae.patcher.model_size()
        assert_comfyui_books(model, scope.device)
        got = unet_forward(model, scope.device)
        to_cpu = fake_gpu.bytes_to_cpu
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert torch.equal(got, expected)
    assert fake_gpu.memory_allocated() == base
    originals.assert_back(model)
    assert not mm.current_loaded_models


def test_prefetched_weights_read_nan_until_a_scope_claims_them(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """Right after ondevice.prefetch the staged weights are still in flight (NaN); the claim joins them first."""
    model = sd15.model
    name, weight = next((n, t) for n, t in tensors(model).items() if t.is_floating_point() and t.numel() > 1)
    expected = weight.detach().clone()
    with ondevice.prefetch(model) as handle:
        staged = tensors(model)[name]
        assert staged.device == fake_gpu.device
        assert torch.isnan(staged.cpu()).all()  # read on the current stream, which has not waited
        del staged
        with on_gpu(model):
            assert torch.equal(tensors(model)[name].cpu(), expected)
        assert not handle.pending
    assert {t.device for t in tensors(model).values()} == {CPU}
    assert fake_gpu.memory_allocated() == 0


def test_cancelled_prefetch_leaves_everything_on_the_cpu(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A prefetch no scope claimed, cancelled: every tensor back on its CPU master, 0 bytes back, nothing in ComfyUI."""
    model = sd15.model
    originals = Originals(model)
    to_cpu = fake_gpu.bytes_to_cpu
    handle = ondevice.prefetch(model)
    assert handle.pending
    handle.cancel()
    assert fake_gpu.bytes_to_cpu == to_cpu
    assert fake_gpu.memory_allocated() == 0
    originals.assert_back(model)
    assert all(tensors(model)[n].data_ptr() == t.data_ptr() for n, t in originals.refs.items())
    assert not entries_of(model)


def test_prefetched_lora_clone_gets_its_patches_at_the_claim(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A LoRA clone prefetched, then claimed: ComfyUI patches it at the claim; outputs equal ComfyUI's own."""
    clone = lora_clone(sd15.model)
    expected = expected_forward("lora", clone, fake_gpu)
    originals = Originals(clone)
    with ondevice.prefetch(clone), on_gpu(clone) as scope:
        assert_comfyui_books(clone, scope.device)
        got = unet_forward(clone, scope.device)
    assert torch.equal(got, expected)
    assert fake_gpu.memory_allocated() == 0
    originals.assert_back(clone)
