"""Checking a checkpoint file before anything reads it: the path, and a safetensors file's header.

Every fault is an :class:`~ondevice.errors.OnDeviceError` naming the file: missing, a directory, a
broken or looping symlink, empty, truncated, not a checkpoint, or a safetensors header that
safetensors itself would refuse (the rules are safetensors 0.8's, listed below).  A torch pickle
(``.ckpt``) is only recognized here; ``torch.load`` checks it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ondevice.errors import CheckpointError, CheckpointIsADirectoryError, CheckpointNotFoundError

__all__ = ["FileInfo", "check_file"]


class FileInfo(NamedTuple):
    """What :func:`check_file` found: a safetensors file (with its tensor names) or a torch pickle (no names)."""

    safetensors: bool
    keys: list[str]


def check_file(path: str | os.PathLike[str], what: str) -> tuple[Path, FileInfo]:
    """Validate ``path`` as a checkpoint file; raise a clear error naming it if it is not one."""
    file = Path(path)
    try:
        status = file.stat()
    except OSError as exc:
        raise _unreachable(file, what, exc) from None
    if stat.S_ISDIR(status.st_mode):
        msg = f"{what} {str(file)!r} is a directory; pass the path of a .safetensors (or .ckpt) file inside it"
        raise CheckpointIsADirectoryError(msg)
    size = status.st_size
    if size == 0:
        msg = f"{what} {str(file)!r} is empty (0 bytes); the download or copy did not finish"
        raise CheckpointError(msg)
    with file.open("rb") as handle:
        head = handle.read(9)
        if _is_torch_pickle(head, size):
            return file, FileInfo(safetensors=False, keys=[])
        handle.seek(8)
        keys = _safetensors_keys(file, handle, head[:8], size, what)
    return file, FileInfo(safetensors=True, keys=keys)


def _unreachable(file: Path, what: str, exc: OSError) -> CheckpointError | CheckpointNotFoundError:
    """The error for a path that cannot be followed to a file: missing, a broken or looping link, ..."""
    name = f"{what} {str(file)!r}"
    if exc.errno == errno.ELOOP:
        msg = f"{name} goes through a symlink loop (a link that leads back to itself); point it at the real file"
        return CheckpointError(msg)
    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
        return CheckpointError(f"{name} cannot be read: {exc.strerror}")
    if file.is_symlink():
        target, final = os.readlink(file), os.path.realpath(file)
        leads = "" if os.path.abspath(file.parent / target) == final else f", which leads to {final!r},"
        msg = f"{name} is a broken symlink: it points to {target!r}{leads} and that does not exist; fix the link"
        return CheckpointNotFoundError(msg)
    return CheckpointNotFoundError(f"{name} does not exist; check the path")


def _is_torch_pickle(head: bytes, size: int) -> bool:
    """A torch checkpoint (``torch.save``'s zip, or a legacy pickle) rather than a safetensors file.

    A safetensors file starts with its header's length, a little-endian u64 whose low byte can be
    0x80, a pickle's first byte: the JSON object after it tells the two apart.
    """
    if len(head) == 9 and head[8:] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


# What safetensors (0.8, Rust crate `safetensors`, `SafeTensors::read_metadata`) accepts, checked here first
# so that every fault names the file: a little-endian u64 header length of at most 100,000,000 bytes; a UTF-8
# JSON object whose "__metadata__" (optional, may be null) maps strings to strings and whose other entries are
# tensors {"dtype", "shape", "data_offsets": [begin, end]} (extra fields are ignored; serde also reads the
# entry as a 3-element array and the dtype as {"F32": null}), with sizes and offsets integers in [0, 2**64);
# sorted by (begin, end), the tensors tile the data area from byte 0 without gaps or overlaps, each spans
# exactly the bytes its dtype and shape need, and the data area ends exactly where the file ends.  The JSON is
# read as serde_json reads it: strict UTF-8, no NaN, no lone surrogates, containers nested at most 127 deep.
_MAX_HEADER_BYTES = 100_000_000
_MAX_JSON_DEPTH = 127  # serde_json's recursion limit
_USIZE_END = 2**64
_DTYPE_BITS = {  # every dtype safetensors 0.8 reads, with its bits per element (`Dtype::bitsize`)
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class _Tensor(NamedTuple):
    """One tensor entry of a safetensors header."""

    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


class _JSONObject(dict[str, Any]):
    """A JSON object that remembers the keys it gave more than once (safetensors refuses some repeats)."""

    repeated: frozenset[str] = frozenset()

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _JSONObject:
        obj = cls(pairs)
        if len(obj) < len(pairs):
            obj.repeated = frozenset(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        return obj


def _safetensors_keys(file: Path, handle: Any, head: bytes, size: int, what: str) -> list[str]:
    name = f"{what} {str(file)!r}"
    not_ckpt = f"{name} is not a checkpoint: it is neither a safetensors file nor a torch checkpoint"
    if len(head) < 8:
        raise CheckpointError(not_ckpt)
    (header_len,) = struct.unpack("<Q", head)
    if header_len == 0 or header_len > _MAX_HEADER_BYTES:
        raise CheckpointError(not_ckpt)
    if header_len > size - 8:
        msg = f"{name} is truncated inside its safetensors header; download or copy it again"
        raise CheckpointError(msg)
    header = _read_header(handle.read(header_len))
    if header is None:
        raise CheckpointError(not_ckpt)
    tensors = _tensors(header, name)
    data_end, last = _check_layout(tensors, name)
    expected = 8 + header_len + data_end
    if expected > size:
        msg = (
            f"{name} is truncated: its header describes {expected} bytes "
            f"(tensor {last!r} ends at byte {data_end} of the data) but the file has {size}; download or copy it again"
        )
        raise CheckpointError(msg)
    if expected < size:
        msg = (
            f"{name} has {size - expected} bytes after the {data_end} bytes of tensor data its safetensors header "
            "describes; safetensors refuses such a file (damaged, or written by a broken tool); get a good copy"
        )
        raise CheckpointError(msg)
    return [tensor.name for tensor in tensors]


def _read_header(raw: bytes) -> _JSONObject | None:
    """The header's JSON object, read as safetensors reads it, or None if it is no JSON object."""
    try:
        header = json.loads(
            raw.decode("utf-8"),  # strictly UTF-8: no BOM, no UTF-16 detection
            object_pairs_hook=_JSONObject.of,
            parse_constant=_not_json,  # NaN, Infinity
            parse_int=_unsigned,
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return header if isinstance(header, _JSONObject) and _serde_reads(header) else None


def _not_json(text: str) -> Any:
    msg = f"{text} is not JSON"
    raise ValueError(msg)


class _Signed(int):
    """A JSON integer written with a minus sign (even ``-0``): safetensors reads no size or offset from it."""


def _unsigned(text: str) -> int:
    return _Signed(text) if text.startswith("-") else int(text)


def _serde_reads(value: Any, depth: int = 1) -> bool:
    """Whether serde_json (safetensors' parser) reads ``value``: no lone surrogate, nesting at most 127 deep."""
    if isinstance(value, str):
        return value.isascii() or not any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        value = [*value, *value.values()]  # keys are strings: their depth does not matter
    if isinstance(value, list):
        return depth <= _MAX_JSON_DEPTH and all(_serde_reads(v, depth + 1) for v in value)
    return True


def _tensors(header: _JSONObject, name: str) -> list[_Tensor]:
    malformed = f"{name} has a malformed safetensors header:"
    if "__metadata__" in header.repeated:
        msg = f"{malformed} it gives __metadata__ twice"
        raise CheckpointError(msg)
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        msg = f"{malformed} __metadata__ must map names to strings, not be {_excerpt(metadata)}"
        raise CheckpointError(msg)
    return [_tensor(key, entry, name) for key, entry in header.items() if key != "__metadata__"]


def _tensor(key: str, entry: Any, name: str) -> _Tensor:
    """One header entry as a tensor; raise naming the fault if it is not a valid one."""
    if isinstance(entry, list) and len(entry) == len(_TENSOR_FIELDS):
        entry = dict(zip(_TENSOR_FIELDS, entry, strict=True))
    dtype = _dtype_name(entry.get("dtype")) if isinstance(entry, dict) else None
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
    if dtype is None or not isinstance(shape, list) or not (isinstance(offsets, list) and len(offsets) == 2):
        msg = (
            f"{name} is not a checkpoint: its safetensors header entry {key!r} is {_excerpt(entry)}, not a tensor "
            '({"dtype": ..., "shape": [...], "data_offsets": [begin, end]})'
        )
        raise CheckpointError(msg)
    malformed = f"{name} has a malformed safetensors header: tensor {key!r}"
    repeated = sorted(set(getattr(entry, "repeated", ())) & set(_TENSOR_FIELDS))
    if repeated:
        msg = f"{malformed} gives {' and '.join(repeated)} twice"
        raise CheckpointError(msg)
    if dtype not in _DTYPE_BITS:
        msg = f"{malformed} has dtype {dtype!r}, which safetensors does not know; it knows {', '.join(_DTYPE_BITS)}"
        raise CheckpointError(msg)
    for field, values in (("shape", shape), ("data_offsets", offsets)):
        if not all(type(n) is int and 0 <= n < _USIZE_END for n in values):
            msg = f"{malformed} has {field} {_excerpt(values)}; each must be a whole number from 0 to 2**64 - 1"
            raise CheckpointError(msg)
    return _Tensor(key, dtype, shape, offsets[0], offsets[1])


def _dtype_name(value: Any) -> str | None:
    """The dtype's name, spelled ``"F32"`` or (serde's other spelling of a unit variant) ``{"F32": null}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and list(value.values()) == [None] and not getattr(value, "repeated", None):
        return str(next(iter(value)))  # JSON keys are strings
    return None


def _check_layout(tensors: Sequence[_Tensor], name: str) -> tuple[int, str | None]:
    """Check that the tensors tile the data area, each the size its dtype and shape need; return its end."""
    malformed = f"{name} has a malformed safetensors header:"
    start, previous = 0, None
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        span = f"tensor {tensor.name!r} (data_offsets [{tensor.begin}, {tensor.end}])"
        if tensor.end < tensor.begin:
            msg = f"{malformed} {span} ends before it begins"
            raise CheckpointError(msg)
        if tensor.begin < start and previous is not None:
            msg = f"{malformed} {span} overlaps tensor {previous.name!r} (data_offsets [{previous.begin}, {start}])"
            raise CheckpointError(msg)
        if tensor.begin > start:
            before = "the tensors before it end" if previous is not None else "the data starts"
            msg = f"{malformed} {span} starts at byte {tensor.begin}, but {before} at byte {start}: a gap"
            raise CheckpointError(msg)
        _check_size(tensor, f"{malformed} {span}")
        start, previous = tensor.end, tensor
    return start, None if previous is None else previous.name


def _check_size(tensor: _Tensor, fault: str) -> None:
    """Check that ``tensor``'s offsets span exactly the bytes its dtype and shape need."""
    bits = _DTYPE_BITS[tensor.dtype]
    elements = 1
    for n in tensor.shape:
        elements *= n
        if elements >= _USIZE_END:
            msg = f"{fault} has shape {tensor.shape}: more elements than safetensors can count"
            raise CheckpointError(msg)
    if elements * bits >= _USIZE_END:
        msg = f"{fault} has shape {tensor.shape}: more bits than safetensors can count"
        raise CheckpointError(msg)
    if elements * bits % 8:
        msg = f"{fault} holds {elements} {tensor.dtype} elements of {bits} bits: not a whole number of bytes"
        raise CheckpointError(msg)
    size = elements * bits // 8
    if tensor.end - tensor.begin != size:
        msg = (
            f"{fault} is {tensor.dtype} with shape {tensor.shape}, {size} bytes, "
            f"but its offsets span {tensor.end - tensor.begin} bytes"
        )
        raise CheckpointError(msg)


def _excerpt(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
