"""Every ComfyUI strategy against real ComfyUI code on the fake GPU."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import comfy.cldm.cldm
import comfy.clip_vision
import comfy.controlnet
import comfy.model_management as mm
import comfy.ops
import comfy.sd
import pytest
import torch

import ondevice
from ondevice import on_gpu
from ondevice.strategies import clones
from ondevice.strategies import comfy as comfy_strategies
from ondevice.strategies.comfy import registered_entries
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def where(component: Any) -> set[torch.device]:
    return set(ondevice.placement(component))


def assert_list_healthy() -> None:
    """ComfyUI's loaded list holds no unloaded entry (model_finalizer None, where that exists)."""
    for entry in mm.current_loaded_models:
        if hasattr(entry, "model_finalizer"):
            assert entry.model_finalizer is not None


def assert_released(component: Any, gpu: FakeGPU, baseline: int) -> None:
    assert where(component) == {CPU}
    for part in ondevice.strategies.parts_of(component):
        assert not registered_entries(part.key)
    assert_list_healthy()
    assert gpu.memory_allocated() == baseline


def unet_forward(model: Any, device: torch.device) -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, device=device)
    t = torch.tensor([10.0], device=device)
    context = torch.randn(1, 77, 768, device=device)
    with torch.inference_mode():
        return model.model.apply_model(x, t, c_crossattn=context)


def test_model_patcher(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """The diffusion model: on the device inside, a real UNet forward, back on the CPU after."""
    base = fake_gpu.memory_allocated()
    with on_gpu(sd15.model) as scope:
        assert where(sd15.model) == {scope.device}
        assert registered_entries(sd15.model.model)
        assert fake_gpu.memory_allocated() - base == sd15.model.model_size()
        out = unet_forward(sd15.model, scope.device)
        assert out.device == scope.device and torch.isfinite(out.cpu()).all()
        del out  # the only device tensor the test itself keeps
    assert_released(sd15.model, fake_gpu, base)


def test_vae(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """The VAE: moved through vae.patcher; a real decode inside; released after."""
    base = fake_gpu.memory_allocated()
    device_before = sd15.vae.device
    with on_gpu(sd15.vae) as scope, torch.inference_mode():  # as ComfyUI runs nodes
        assert where(sd15.vae) == {scope.device}
        image = sd15.vae.decode(torch.randn(1, 4, 8, 8))
        assert image.shape[-1] == 3 and torch.isfinite(image).all()
    assert_released(sd15.vae, fake_gpu, base)
    assert sd15.vae.device == device_before


def test_clip(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """CLIP: moved through clip.patcher; a real encode inside; released after."""
    base = fake_gpu.memory_allocated()
    with on_gpu(sd15.clip) as scope, torch.inference_mode():
        assert where(sd15.clip) == {scope.device}
        cond, pooled = sd15.clip.encode_from_tokens(sd15.clip.tokenize("a photo of a cat"), return_pooled=True)
        assert cond.shape[-1] == 768 and torch.isfinite(cond).all()
        assert where(sd15.clip) == {scope.device}
    assert_released(sd15.clip, fake_gpu, base)


def test_all_three_at_once(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """One scope over model, CLIP and VAE holds all three; exit offloads all three."""
    base = fake_gpu.memory_allocated()
    with on_gpu(sd15.model, sd15.clip, sd15.vae) as scope:
        for c in sd15[:3]:
            assert where(c) == {scope.device}
    for c in sd15[:3]:
        assert_released(c, fake_gpu, base)


def test_clone_nesting_shares_one_count(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """A clone shares its parent's weights: the inner scope neither reloads nor offloads them."""
    clone = sd15.model.clone()
    base = fake_gpu.memory_allocated()
    with on_gpu(sd15.model):
        moved = fake_gpu.bytes_to_device
        with on_gpu(clone):
            assert fake_gpu.bytes_to_device == moved
            unet_forward(clone, fake_gpu.device)
        assert where(sd15.model) == {fake_gpu.device}
    assert_released(sd15.model, fake_gpu, base)


def test_clone_registered_by_comfyui_is_unloaded_too(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """Entries that ComfyUI made for a clone inside the scope are unloaded and removed at exit."""
    clone = sd15.model.clone()
    base = fake_gpu.memory_allocated()
    with on_gpu(sd15.model):
        mm.load_models_gpu([clone])
        assert registered_entries(sd15.model.model)
    assert_released(clone, fake_gpu, base)


def evict_behind_ondevice(patcher: Any) -> None:
    """Unload a model the way a custom node might: straight through ComfyUI's LoadedModel, no free_memory."""
    for entry in registered_entries(patcher.model):
        mm.current_loaded_models.remove(entry)
        entry.model_unload()


def test_comfyui_cannot_evict_a_held_model(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """unload_all_models() / free_memory() inside a scope leave the held model on the device."""
    with on_gpu(sd15.model):
        mm.unload_all_models()
        mm.free_memory(1e30, fake_gpu.device)
        assert where(sd15.model) == {fake_gpu.device}
        assert registered_entries(sd15.model.model)
    assert where(sd15.model) == {CPU}


def test_eviction_behind_ondevice_is_repaired(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """If a held model is unloaded behind ondevice's back, the next inner scope's exit loads it back."""
    with on_gpu(sd15.model) as scope:
        evict_behind_ondevice(sd15.model)
        assert where(sd15.model) == {CPU}
        with on_gpu(sd15.vae):
            pass
        assert where(sd15.model) == {fake_gpu.device}
        unet_forward(sd15.model, fake_gpu.device)
        evict_behind_ondevice(sd15.model)
        scope.ensure()
        assert where(sd15.model) == {fake_gpu.device}
    assert where(sd15.model) == {CPU}


def _tight_gpu(sd15: ondevice.Checkpoint, spare: int) -> Any:
    """A fake GPU with room for the UNet plus ``spare`` bytes."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    return fake_gpu(memory=int(sd15.model.model_size() + spare))


def test_comfyui_load_under_pressure_keeps_the_held_model(sd15: ondevice.Checkpoint) -> None:
    """vae.decode inside on_gpu(model), where ComfyUI wants more headroom than there is: the model stays whole."""
    vae = sd15.vae.patcher.model_size()
    with _tight_gpu(sd15, mm.minimum_inference_memory() + vae // 2) as gpu, on_gpu(sd15.model):
        with torch.inference_mode():
            sd15.vae.decode(torch.randn(1, 4, 8, 8))  # ComfyUI loads the VAE itself, asking for headroom
        assert where(sd15.model) == {gpu.device}
        with on_gpu(sd15.vae):
            assert where(sd15.model) == where(sd15.vae) == {gpu.device}
        assert where(sd15.model) == {gpu.device}
    assert where(sd15.model) == where(sd15.vae) == {CPU}


def test_inner_scope_that_does_not_fit_raises_and_keeps_the_outer(sd15: ondevice.Checkpoint) -> None:
    """An inner scope with no room beside the held model raises OOM; the VAE stays on the CPU, the model whole."""
    with _tight_gpu(sd15, sd15.vae.patcher.model_size() // 2) as gpu, on_gpu(sd15.model):
        with pytest.raises(torch.OutOfMemoryError), on_gpu(sd15.vae):
            pass
        assert where(sd15.vae) == {CPU}
        assert where(sd15.model) == {gpu.device}
        assert_list_healthy()
    assert where(sd15.model) == {CPU}
    assert gpu.memory_allocated() == 0


def test_two_components_in_one_tight_scope(sd15: ondevice.Checkpoint) -> None:
    """on_gpu(model, clip) on a GPU with room for both but not for ComfyUI's headroom: both wholly on it."""
    clip = sd15.clip.patcher.model_size()
    with _tight_gpu(sd15, clip + 2**20) as gpu, on_gpu(sd15.model, sd15.clip):
        assert where(sd15.model) == where(sd15.clip) == {gpu.device}
    assert where(sd15.model) == where(sd15.clip) == {CPU}


def test_offload_goes_to_cpu_under_highvram(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With offload_device on the GPU (--highvram / --gpu-only), ComfyUI's own unload lands on the CPU."""

    def no_fallback(patcher: Any) -> None:
        raise AssertionError("ComfyUI's own unload should have moved the weights to the CPU")

    monkeypatch.setattr(comfy_strategies, "_detach_to_cpu", no_fallback)
    patcher = sd15.model
    saved = patcher.offload_device
    patcher.offload_device = fake_gpu.device
    try:
        with on_gpu(patcher):
            pass
        assert where(patcher) == {CPU}
        assert patcher.offload_device == fake_gpu.device
    finally:
        patcher.offload_device = saved


def test_weights_moved_by_hand_are_recovered(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """offload() brings back weights that someone moved with .to() behind ComfyUI's back."""
    sd15.vae.first_stage_model.to(fake_gpu.device)
    ondevice.offload(sd15.vae)
    assert where(sd15.vae) == {CPU}


def test_vae_without_weights(fake_gpu: FakeGPU) -> None:
    """A VAE built without weights raises MissingWeightsError (also a ValueError)."""
    vae = comfy.sd.VAE(sd={"nothing.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no weights") as info, on_gpu(vae):
        pass
    assert isinstance(info.value, ondevice.MissingWeightsError)


def _clip_vision(tmp_path: Path) -> Any:
    config = {
        "hidden_act": "quick_gelu",
        "hidden_size": 64,
        "image_size": 32,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 16,
        "projection_dim": 32,
        "layer_norm_eps": 1e-5,
        "model_type": "clip_vision_model",
    }
    path = tmp_path / "clip_vision.json"
    path.write_text(json.dumps(config))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    with torch.no_grad():
        for p in cv.model.parameters():
            p.normal_(0, 0.02)
    return cv


def test_clip_vision(fake_gpu: FakeGPU, tmp_path: Path) -> None:
    """ClipVisionModel: moved through .patcher; a real encode_image inside; released after."""
    cv = _clip_vision(tmp_path)
    base = fake_gpu.memory_allocated()
    with on_gpu(cv) as scope, torch.inference_mode():
        assert where(cv) == {scope.device}
        out = cv.encode_image(torch.rand(1, 32, 32, 3))
        assert torch.isfinite(out["image_embeds"]).all()
    assert_released(cv, fake_gpu, base)


def _controlnet() -> Any:
    model = comfy.cldm.cldm.ControlNet(
        image_size=32,
        in_channels=4,
        model_channels=32,
        hint_channels=3,
        num_res_blocks=1,
        channel_mult=(1,),
        attention_resolutions=[],
        num_heads=1,
        use_spatial_transformer=True,
        transformer_depth=[1],
        transformer_depth_middle=1,
        context_dim=32,
        legacy=False,
        operations=comfy.ops.disable_weight_init,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return comfy.controlnet.ControlNet(model, load_device=CPU)


def test_controlnet_chain(fake_gpu: FakeGPU) -> None:
    """A ControlNet with a previous one in its chain moves both (get_models())."""
    first, second = _controlnet(), _controlnet()
    second.set_previous_controlnet(first)

    def devices_of(cn: Any) -> set[torch.device]:
        return {t.device for t in cn.control_model.state_dict().values()}

    with on_gpu(second) as scope:
        assert devices_of(first) == devices_of(second) == {scope.device}
    assert devices_of(first) == devices_of(second) == {CPU}
    assert fake_gpu.memory_allocated() == 0


def test_controlnet(fake_gpu: FakeGPU) -> None:
    """ControlNet: moved through get_models(); a real control-model forward inside; released after."""
    cn = _controlnet()
    base = fake_gpu.memory_allocated()
    with on_gpu(cn) as scope, torch.inference_mode():
        assert where(cn) == {scope.device}
        d = scope.device
        outs = cn.control_model(
            x=torch.randn(1, 4, 8, 8, device=d),
            hint=torch.randn(1, 3, 64, 64, device=d),
            timesteps=torch.tensor([5.0], device=d),
            context=torch.randn(1, 4, 32, device=d),
        )
        tensors = [t for value in (outs.values() if isinstance(outs, dict) else [outs]) for t in value]
        assert tensors and all(torch.isfinite(t.cpu()).all() for t in tensors)
        del tensors
        del outs
    assert_released(cn, fake_gpu, base)


def _lora(model: Any) -> Any:
    """A clone with a 'diff' weight patch on the UNet's last conv (what a LoRA node makes)."""
    clone = model.clone()
    key = next(k for k in model.model_state_dict() if k.endswith("out.2.weight"))
    clone.add_patches({key: (torch.ones_like(model.model_state_dict()[key]),)}, 1.0)
    return clone


def _unet_out(patcher: Any, device: torch.device) -> torch.Tensor:
    torch.manual_seed(0)
    return unet_forward(patcher, device).cpu()


def test_clone_with_other_patches_swaps_in_and_back(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """on_gpu(lora_clone) inside on_gpu(base) runs with the LoRA; after it, the base weights are back."""
    lora = _lora(sd15.model)
    d = fake_gpu.device
    with on_gpu(lora):
        with_lora = _unet_out(lora, d)
    with on_gpu(sd15.model):
        plain = _unet_out(sd15.model, d)
        with on_gpu(lora):
            assert torch.allclose(_unet_out(lora, d), with_lora)
        assert torch.allclose(_unet_out(sd15.model, d), plain)
    assert not torch.allclose(plain, with_lora)
    assert_released(sd15.model, fake_gpu, 0)


def test_second_device_retargets_every_claim(fake_gpu_two: Any, sd15: ondevice.Checkpoint) -> None:
    """on_gpu(vae.patcher, vae, device='fakegpu:1'): the decode runs there; vae.device is restored after."""
    before = (sd15.vae.device, sd15.vae.patcher.load_device)
    dev1 = torch.device("fakegpu:1")
    with on_gpu(sd15.vae.patcher, sd15.vae, device=dev1), torch.inference_mode():
        assert where(sd15.vae) == {dev1}
        with on_gpu(sd15.vae, device=dev1):
            image = sd15.vae.decode(torch.randn(1, 4, 8, 8))
        assert torch.isfinite(image).all()
        assert sd15.vae.device == dev1
    assert (sd15.vae.device, sd15.vae.patcher.load_device) == before
    assert where(sd15.vae) == {CPU}


def test_clones_made_inside_a_scope_get_the_load_device_back(fake_gpu_two: Any, sd15: ondevice.Checkpoint) -> None:
    """Clones made inside on_gpu(unet, device='fakegpu:1') (and clones of those) name fakegpu:1 there, so ComfyUI's
    own load finds the weights in place; after the scope they name the original load_device again.  A clone made
    before the scope, and one whose load_device was set meanwhile, are left as they are."""
    unet, dev0, dev1 = sd15.model, torch.device("fakegpu:0"), torch.device("fakegpu:1")
    original = unet.load_device
    made_before = unet.clone()
    with on_gpu(unet, device=dev1):
        clone = unet.clone()
        grandchild = clone.clone()
        elsewhere = unet.clone()
        elsewhere.load_device = dev0
        assert clone.load_device == grandchild.load_device == dev1 and made_before.load_device == original
        mm.load_models_gpu([grandchild])  # as a sampler would: the weights are there already
        assert where(unet) == {dev1} and fake_gpu_two.memory_allocated(0) == 0
    assert unet.load_device == clone.load_device == grandchild.load_device == made_before.load_device == original
    assert elsewhere.load_device == dev0
    assert where(unet) == {CPU} and fake_gpu_two.memory_allocated(1) == 0


def test_clone_load_devices_hold_whatever_order_scopes_exit_in(fake_gpu_two: Any, sd15: ondevice.Checkpoint) -> None:
    """Scopes on a patcher, on a clone made before, and on a clone made inside that one, exited out of order (as
    threads and tasks may): a patcher names the scope's device while a scope points it (the earlier exit reset it
    under the later scope), and every one names its own load_device again once none does; nothing stays tracked."""
    unet, dev1 = sd15.model, torch.device("fakegpu:1")
    original = unet.load_device
    earlier = unet.clone()
    with contextlib.ExitStack() as stack:
        stack.enter_context(on_gpu(unet, device=dev1))
        first = on_gpu(earlier, device=dev1)
        first.__enter__()
        inner = earlier.clone()
        second = on_gpu(inner, device=dev1)
        second.__enter__()
        made_in_second = inner.clone()
        first.__exit__(None, None, None)
        assert inner.load_device == made_in_second.load_device == dev1
        second.__exit__(None, None, None)
        assert unet.load_device == dev1
    assert unet.load_device == earlier.load_device == inner.load_device == made_in_second.load_device == original
    assert not clones._tracks


def test_a_clone_made_while_the_last_scope_lets_go_follows_the_original(
    fake_gpu_two: Any, sd15: ondevice.Checkpoint
) -> None:
    """A clone made on another thread while the scope exits (ComfyUI copied load_device before the scope let go, and
    the wrapper sees the clone after): it names the original device, as the patcher does, not the scope's."""
    unet, dev1 = sd15.model, torch.device("fakegpu:1")
    if not hasattr(unet, "add_callback_with_key"):
        pytest.skip("this ComfyUI has no ON_CLONE callbacks to hold a clone in the middle")
    import comfy.patcher_extension  # noqa: PLC0415  (ComfyUI 0.3.x+)

    original, cloning, exited = unet.load_device, threading.Event(), threading.Event()

    def hold(parent: Any, made: Any) -> None:  # runs inside ComfyUI's clone, after load_device was copied
        cloning.set()
        exited.wait(60)

    on_clone = comfy.patcher_extension.CallbacksMP.ON_CLONE
    had = on_clone in unet.callbacks  # clone_has_same_weights compares the callback kinds: leave them as they were
    unet.add_callback_with_key(on_clone, "ondevice-test", hold)
    try:
        made: list[Any] = []
        scope = on_gpu(unet, device=dev1)
        scope.__enter__()
        worker = threading.Thread(target=lambda: made.append(unet.clone()))
        worker.start()
        assert cloning.wait(60)
        scope.__exit__(None, None, None)
        exited.set()
        worker.join(60)
        assert not worker.is_alive(), "the clone did not end"
    finally:
        unet.remove_callbacks_with_key(on_clone, "ondevice-test")
        if not had:
            unet.callbacks.pop(on_clone, None)
    assert unet.load_device == made[0].load_device == original and not clones._tracks


def test_failed_unload_still_ends_on_cpu(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If ComfyUI's unload raises at scope exit, the error surfaces and the weights still end on the CPU."""
    original = mm.LoadedModel.model_unload

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(mm.LoadedModel, "model_unload", original)
        msg = "unload failed"
        raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="unload failed"), on_gpu(sd15.vae):
        monkeypatch.setattr(mm.LoadedModel, "model_unload", broken)
    assert_released(sd15.vae, fake_gpu, 0)


def test_comfyui_memory_calls_wait_for_ondevice_moves(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """ComfyUI's free_memory in another thread waits while ondevice holds the table's lock (no list races)."""
    import threading  # noqa: PLC0415

    from ondevice.residency import table  # noqa: PLC0415

    done = threading.Event()
    worker = threading.Thread(target=lambda: (mm.free_memory(1e30, fake_gpu.device), done.set()))
    with table.locked():
        worker.start()
        assert not done.wait(0.3)  # blocked behind the lock
    worker.join(10)
    assert done.is_set()


def test_novram_is_named_in_the_error(sd15: ondevice.Checkpoint) -> None:
    """Under ComfyUI's --novram a full load is impossible; the error says so and nothing stays on the device."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(vram_state="NO_VRAM") as gpu:
        with pytest.raises(ondevice.OnDeviceError, match="--novram"), on_gpu(sd15.model):
            pass
        assert where(sd15.model) == {CPU}
        assert gpu.memory_allocated() == 0


@pytest.mark.parametrize("name", ["model", "clip", "vae"])
@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_exceptions_on_comfyui_components(
    fake_gpu: FakeGPU, sd15: ondevice.Checkpoint, name: str, error: BaseException
) -> None:
    """An exception or KeyboardInterrupt inside a scope on a real component propagates unchanged and offloads it."""
    component = getattr(sd15, name)
    with pytest.raises(type(error)) as info, on_gpu(component):
        assert where(component) == {fake_gpu.device}
        raise error
    assert info.value is error
    assert_released(component, fake_gpu, 0)


def test_decorator_forms_on_comfyui_components(fake_gpu: FakeGPU, sd15: ondevice.Checkpoint) -> None:
    """@gpu_scoped bare and named, and @on_gpu, move real ComfyUI components for each call."""
    from ondevice import gpu_scoped  # noqa: PLC0415

    @gpu_scoped
    def every(model: Any, vae: Any, steps: int) -> list[set[torch.device]]:
        return [where(model), where(vae)]

    @gpu_scoped("vae")
    def named(model: Any, vae: Any) -> list[set[torch.device]]:
        return [where(model), where(vae)]

    @on_gpu(sd15.clip)
    def fixed() -> set[torch.device]:
        return where(sd15.clip)

    assert every(sd15.model, sd15.vae, 3) == [{fake_gpu.device}, {fake_gpu.device}]
    assert named(sd15.model, sd15.vae) == [{CPU}, {fake_gpu.device}]
    assert fixed() == {fake_gpu.device}
    for c in sd15[:3]:
        assert_released(c, fake_gpu, 0)
