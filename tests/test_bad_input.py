"""Bad input: clear errors that are also the matching builtin, and nothing left on the GPU."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

import ondevice
from ondevice import gpu_scoped, on_gpu
from ondevice.files import check_file
from ondevice.testing import FakeGPU

CPU = torch.device("cpu")


def net() -> torch.nn.Module:
    return torch.nn.Linear(8, 8)


@pytest.mark.parametrize("thing", [object(), "unet", 42, [torch.nn.Linear(2, 2)]])
def test_non_model_object_is_a_type_error(fake_gpu: FakeGPU, thing: Any) -> None:
    """An object with no strategy raises NoStrategyError, also a TypeError, naming its type and the fix."""
    with pytest.raises(TypeError) as info, on_gpu(thing):
        pass
    assert isinstance(info.value, ondevice.NoStrategyError)
    assert type(thing).__name__ in str(info.value)
    assert "register_strategy" in str(info.value)


def test_none_is_a_type_error(fake_gpu: FakeGPU) -> None:
    """None raises NoStrategyError naming None."""
    with pytest.raises(ondevice.NoStrategyError, match="None"), on_gpu(None):
        pass


def test_bad_component_moves_nothing(fake_gpu: FakeGPU) -> None:
    """A bad component among good ones fails before any of them moves."""
    m = net()
    base = fake_gpu.memory_allocated()
    with pytest.raises(TypeError), on_gpu(m, object()):
        pass
    assert set(ondevice.placement(m)) == {CPU}
    assert fake_gpu.memory_allocated() == base


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "not a device", -1, 1.5])
def test_malformed_device_is_a_value_error(fake_gpu: FakeGPU, device: Any) -> None:
    """A malformed device raises InvalidDeviceError, also a ValueError, naming it."""
    with pytest.raises(ValueError) as info, on_gpu(net(), device=device):
        pass
    assert isinstance(info.value, ondevice.InvalidDeviceError)
    assert repr(device) in str(info.value) or str(device) in str(info.value)


def test_device_index_past_count(fake_gpu: FakeGPU) -> None:
    """An index past the device count names the count and the valid range."""
    m = net()
    with pytest.raises(ondevice.InvalidDeviceError, match="past the 1 fakegpu"), on_gpu(m, device="fakegpu:3"):
        pass
    assert set(ondevice.placement(m)) == {CPU}


def test_absent_device_type(fake_gpu: FakeGPU) -> None:
    """A device type this machine lacks ('cuda' on a CPU-only build) is an InvalidDeviceError."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ondevice.InvalidDeviceError, match="no cuda device"), on_gpu(net(), device="cuda"):
        pass


def test_decorator_unknown_name_raises_at_decoration() -> None:
    """gpu_scoped('vea') on a function without that parameter raises when decorating."""
    with pytest.raises(ondevice.InvalidArgumentError, match="'vea' is not a parameter"):

        @gpu_scoped("vea")
        def decode(vae: Any) -> None: ...


def test_decorator_non_string_name() -> None:
    """gpu_scoped(1) is rejected with a clear message."""
    with pytest.raises(ValueError, match="must be strings"):
        gpu_scoped(1)


def test_decorator_named_parameter_none(fake_gpu: FakeGPU) -> None:
    """A named parameter passed None raises NoStrategyError at call time."""

    @gpu_scoped("vae")
    def decode(vae: Any) -> None: ...

    with pytest.raises(ondevice.NoStrategyError):
        decode(None)


def test_conflicting_devices(fake_gpu_two: Any) -> None:
    """A component held on fakegpu:0 cannot be asked for on fakegpu:1 at the same time."""
    m = net()
    with on_gpu(m, device="fakegpu:0"):
        with pytest.raises(ondevice.ResidencyConflictError, match="fakegpu:0"), on_gpu(m, device="fakegpu:1"):
            pass
        assert set(ondevice.placement(m)) == {torch.device("fakegpu:0")}
    assert set(ondevice.placement(m)) == {CPU}


def test_out_of_memory_leaves_everything_on_cpu() -> None:
    """A scope whose components do not fit raises the OOM and leaves nothing on the device."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    small, big = torch.nn.Linear(64, 64), torch.nn.Linear(1024, 1024)
    with fake_gpu(memory="1MiB") as gpu:
        with pytest.raises(torch.OutOfMemoryError), on_gpu(small, big):
            pass
        assert set(ondevice.placement(small)) == set(ondevice.placement(big)) == {CPU}
        assert gpu.memory_allocated() == 0


def test_device_of_without_weights() -> None:
    """device_of on a module with no weights raises MissingWeightsError."""
    with pytest.raises(ondevice.MissingWeightsError):
        ondevice.device_of(torch.nn.ReLU())


def test_errors_share_one_base() -> None:
    """Every public error (warnings aside) derives from OnDeviceError."""
    for name in ondevice.__all__:
        obj = getattr(ondevice, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, ondevice.OnDeviceError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has an accelerator")
@pytest.mark.parametrize("device", ["cpu:3", 7])
def test_cpu_has_one_device(device: Any) -> None:
    """Without an accelerator, an index past the CPU's single device is an InvalidDeviceError."""
    with pytest.raises(ondevice.InvalidDeviceError, match="cpu|CPU"), on_gpu(net(), device=device):
        pass


def test_fake_device_gone_after_stop() -> None:
    """After the fake GPU stops, 'fakegpu:0' names no device any more."""
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu():
        pass
    with pytest.raises(ondevice.InvalidDeviceError, match="no fakegpu device"), on_gpu(net(), device="fakegpu:0"):
        pass


# --- malformed safetensors files: an error naming the file and the fault, before ComfyUI reads them ----


def tensor(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def safetensors_file(path: Path, header: dict[str, Any] | bytes, data: int | bytes = 0) -> Path:
    """Write ``header`` (a dict, or raw JSON bytes) and ``data`` (bytes, or a count of zero bytes) as a file."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (b"\0" * data if isinstance(data, int) else data))
    return path


MALFORMED: dict[str, tuple[dict[str, Any] | bytes, int, str]] = {  # case: header, data bytes, what the error says
    "shape and dtype disagree with the offsets": (
        {"w": tensor("F32", [2], 0, 4)},
        4,
        r"tensor 'w' \(data_offsets \[0, 4\]\) is F32 with shape \[2\], 8 bytes, but its offsets span 4 bytes",
    ),
    "unknown dtype": (
        {"w": tensor("F33", [1], 0, 4)},
        4,
        r"tensor 'w' has dtype 'F33', which safetensors does not know; it knows BOOL, F4, .*F8_E4M3, .*BF16, .*U64",
    ),
    "overlapping offsets": (
        {"a": tensor("F32", [2], 0, 8), "b": tensor("F32", [1], 4, 8)},
        8,
        r"tensor 'b' \(data_offsets \[4, 8\]\) overlaps tensor 'a' \(data_offsets \[0, 8\]\)",
    ),
    "two tensors on the same bytes": (
        {"a": tensor("F32", [1], 0, 4), "b": tensor("F32", [1], 0, 4)},
        4,
        r"tensor 'b' \(data_offsets \[0, 4\]\) overlaps tensor 'a'",
    ),
    "a gap between tensors": (
        {"a": tensor("F32", [1], 0, 4), "b": tensor("F32", [1], 8, 12)},
        12,
        r"tensor 'b' .* starts at byte 8, but the tensors before it end at byte 4: a gap",
    ),
    "data not starting at 0": ({"a": tensor("F32", [1], 4, 8)}, 8, r"starts at byte 4, but the data starts at byte 0"),
    "end before begin": (
        {"w": tensor("F32", [1], 8, 4)},
        8,
        r"tensor 'w' \(data_offsets \[8, 4\]\) ends before it begins",
    ),
    "bytes past the described data": (
        {"w": tensor("F32", [1], 0, 4)},
        5,
        r"has 1 bytes after the 4 bytes of tensor data",
    ),
    "offsets past 2**64": ({"w": tensor("F32", [1], 0, 2**64)}, 4, r"data_offsets \[0, 18446744073709551616\]"),
    "negative size": ({"w": tensor("F32", [-1], 0, 4)}, 4, r"tensor 'w' has shape \[-1\]; each must be a whole number"),
    "boolean size": ({"w": tensor("F32", [True], 0, 4)}, 4, r"tensor 'w' has shape \[true\]"),
    "part of a byte": (
        {"w": tensor("F4", [3], 0, 2)},
        2,
        r"holds 3 F4 elements of 4 bits: not a whole number of bytes",
    ),
    "more elements than 2**64": ({"w": tensor("U8", [2**40, 2**40, 0], 0, 0)}, 0, r"more elements than safetensors"),
    "metadata that is not text": (
        {"__metadata__": {"step": 1}, "w": tensor("F32", [1], 0, 4)},
        4,
        r"__metadata__ must map names to strings",
    ),
    "a field given twice": (
        b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
        4,
        r"gives dtype twice",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """A malformed safetensors header is a CheckpointError naming the file and the fault, before ComfyUI reads it."""
    import comfy.sd

    def comfyui_reads(*args: Any, **kwargs: Any) -> None:
        pytest.fail("ComfyUI read the file before the header check")

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", comfyui_reads)
    header, data, says = MALFORMED[case]
    path = safetensors_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ondevice.CheckpointError, match=says) as info:
        ondevice.load_checkpoint(path)
    assert f"checkpoint {str(path)!r}" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("loader", [ondevice.load_vae, ondevice.load_diffusion_model, ondevice.load_text_encoders])
def test_every_loader_checks_the_header(tmp_path: Path, loader: Any) -> None:
    """The single-component loaders run the same header check, naming what kind of file it is."""
    path = safetensors_file(tmp_path / "part.safetensors", {"w": tensor("F32", [2], 0, 4)}, 4)
    with pytest.raises(
        ondevice.CheckpointError, match=r"file '.*part\.safetensors' has a malformed safetensors header"
    ):
        loader(path)


def test_a_dtype_torch_cannot_hold_names_the_file(tmp_path: Path) -> None:
    """A valid header with a dtype this torch cannot hold (F6_E2M3): safetensors' refusal names the file."""
    path = safetensors_file(tmp_path / "fp6.safetensors", {"w": tensor("F6_E2M3", [4], 0, 3)}, 3)
    with pytest.raises(ondevice.CheckpointError, match=r"checkpoint '.*fp6\.safetensors'"):
        ondevice.load_checkpoint(path)


# Every dtype safetensors 0.8 reads (its Rust `Dtype` enum) and its bits per element.
SAFETENSORS_DTYPES = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
VALID_HEADERS: dict[str, tuple[dict[str, Any] | bytes, int]] = {
    **{
        f"dtype {dtype}": ({"w": tensor(dtype, [16], 0, 16 * bits // 8)}, 16 * bits // 8)
        for dtype, bits in SAFETENSORS_DTYPES.items()
    },
    "F6 in whole bytes": ({"w": tensor("F6_E3M2", [4], 0, 3)}, 3),
    "entries out of offset order": ({"z": tensor("F32", [1], 0, 4), "a": tensor("F16", [2], 4, 8)}, 8),
    "empty tensors anywhere": (
        {"a": tensor("F32", [0], 4, 4), "b": tensor("F32", [1], 0, 4), "c": tensor("I8", [0, 5], 0, 0)},
        4,
    ),
    "a scalar": ({"w": tensor("F64", [], 0, 8)}, 8),
    "no tensors": ({"__metadata__": {"format": "pt"}}, 0),
    "null metadata": ({"__metadata__": None, "w": tensor("F32", [1], 0, 4)}, 4),
    "extra fields": ({"w": {**tensor("F32", [1], 0, 4), "note": [-1, None, {"x": 1.5}]}}, 4),
    "an entry as an array": ({"w": ["F32", [1], [0, 4]]}, 4),
    "a dtype as a map": ({"w": {"dtype": {"F32": None}, "shape": [1], "data_offsets": [0, 4]}}, 4),
    "a name given twice": (
        b'{"w": '
        + json.dumps(tensor("F32", [2], 0, 8)).encode()
        + b', "w": '
        + json.dumps(tensor("F32", [1], 0, 4)).encode()
        + b"}",
        4,
    ),
    "padded with spaces": (json.dumps({"w": tensor("F32", [1], 0, 4)}).encode() + b"       ", 4),
    "zero elements of a huge shape": ({"w": tensor("U8", [0, 2**40, 2**40], 0, 0)}, 0),
}
FAULTY_HEADERS: dict[str, tuple[dict[str, Any] | bytes, int]] = {
    **{case: (header, data) for case, (header, data, _) in MALFORMED.items()},
    "lowercase dtype": ({"w": tensor("f32", [1], 0, 4)}, 4),
    "torch's dtype name": ({"w": tensor("F8_E4M3FN", [1], 0, 1)}, 1),
    "a float size": ({"w": tensor("F32", [1.0], 0, 4)}, 4),
    "minus zero": (b'{"w": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', 0),
    "an array entry of 4": ({"w": ["F32", [1], [0, 4], 0]}, 4),
    "metadata twice": (b'{"__metadata__": {}, "__metadata__": {}}', 0),
    "no tensors, one byte of data": ({}, 1),
    "NaN in an extra field": (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', 4),
    "nested 128 deep": (
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + b"[" * 126 + b"]" * 126 + b"}}",
        4,
    ),
    "a lone surrogate": (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": "\\udc00"}}', 4),
    "a byte-order mark": (b"\xef\xbb\xbf" + json.dumps({"w": tensor("F32", [1], 0, 4)}).encode(), 4),
}


def _safetensors_reads(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="numpy") as handle:
            list(handle.keys())
    except safetensors.SafetensorError:
        return False
    return True


@pytest.mark.parametrize(
    ("case", "valid"), [*((c, True) for c in VALID_HEADERS), *((c, False) for c in FAULTY_HEADERS)]
)
def test_header_check_agrees_with_safetensors(tmp_path: Path, case: str, valid: bool) -> None:  # noqa: FBT001
    """The header check accepts every header safetensors reads (each dtype it knows) and refuses every other."""
    header, data = (VALID_HEADERS if valid else FAULTY_HEADERS)[case]
    path = safetensors_file(tmp_path / "case.safetensors", header, data)
    assert _safetensors_reads(path) is valid  # the case says what safetensors does
    if valid:
        check_file(path, "checkpoint")
    else:
        with pytest.raises(ondevice.CheckpointError, match=r"checkpoint '.*case\.safetensors'"):
            check_file(path, "checkpoint")


# --- links that lead nowhere ---------------------------------------------------------------------------


def test_symlink_loop(tmp_path: Path) -> None:
    """A path through a symlink loop is a CheckpointError saying so, not 'does not exist'."""
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.symlink_to(second)
    second.symlink_to(first)
    with pytest.raises(ondevice.CheckpointError, match=r"'.*a\.safetensors' goes through a symlink loop"):
        ondevice.load_checkpoint(first)


def test_symlink_to_itself(tmp_path: Path) -> None:
    """A link to itself is a symlink loop too."""
    link = tmp_path / "self.safetensors"
    link.symlink_to(link)
    with pytest.raises(ondevice.CheckpointError, match="symlink loop"):
        ondevice.load_checkpoint(link)


def test_broken_symlink_names_its_target(tmp_path: Path) -> None:
    """A dangling link is a CheckpointNotFoundError (also FileNotFoundError) saying it is broken, naming the target."""
    link = tmp_path / "model.safetensors"
    link.symlink_to("downloads/model.safetensors")
    with pytest.raises(
        FileNotFoundError, match=r"is a broken symlink: it points to 'downloads/model\.safetensors'"
    ) as info:
        ondevice.load_checkpoint(link)
    assert isinstance(info.value, ondevice.CheckpointNotFoundError)


def test_broken_chain_of_links_names_the_end(tmp_path: Path) -> None:
    """A link to a link that is broken names the first target and where the chain ends."""
    (tmp_path / "hop.safetensors").symlink_to(tmp_path / "gone.safetensors")
    link = tmp_path / "model.safetensors"
    link.symlink_to("hop.safetensors")
    with pytest.raises(
        ondevice.CheckpointNotFoundError, match=r"points to 'hop\.safetensors', which leads to '.*gone\.safetensors'"
    ):
        ondevice.load_checkpoint(link)
