"""Repair an installed ``notcomfy`` (ComfyUI's ``comfy/`` package from PyPI) for SD1.5 and SDXL.

Run with the interpreter whose environment holds notcomfy, after
``pip install --no-deps notcomfy==0.1.0``::

    .venv/bin/python scripts/prepare_notcomfy.py

It does two things, and is safe to run any number of times:

1. Removes the generic top-level packages the wheel drops into site-packages
   (``tests``, ``utils``, ``app``, ``models``, ...). They shadow a project's own
   modules (``import tests.helpers`` fails). The list comes from the wheel's
   RECORD; ``comfy``, ``comfy_extras``, ``comfy_execution`` and every top-level
   name they import are kept. RECORD is rewritten to match.
2. Writes the data files the wheel lacks: ``comfy/sd1_clip_config.json``
   (CLIP-L), ``comfy/clip_config_bigg.json`` (SDXL's OpenCLIP-G) and a synthetic
   byte-level CLIP tokenizer in ``comfy/sd1_tokenizer/`` (used by SD1.5's CLIP-L
   and by both SDXL tokenizers). The tokenizer has the 512 byte tokens of CLIP's
   vocabulary plus ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 and
   no merges: it encodes any text, one token per byte, with ids below 49408.
   Files already present with other content (a real tokenizer, say) are kept
   unless ``--force`` is given. The new files are added to RECORD, so
   ``pip uninstall notcomfy`` removes them.

Exit status: 0 on success, 1 (with a message on stderr) when notcomfy is missing or broken.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

DIST = "notcomfy"
KEEP = frozenset({"comfy", "comfy_extras", "comfy_execution"})

# ComfyUI's comfy/sd1_clip_config.json (CLIP ViT-L/14 text model).
SD1_CLIP_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.24.0",
    "vocab_size": 49408,
}

# ComfyUI's comfy/clip_config_bigg.json (OpenCLIP ViT-bigG/14 text model, SDXL's second encoder).
CLIP_CONFIG_BIGG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 49407,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float32",
    "vocab_size": 49408,
}

START, END = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": START,
    "do_lower_case": True,
    "eos_token": END,
    "errors": "replace",
    "model_max_length": 8192,
    "pad_token": END,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": END,
}
SPECIAL_TOKENS_MAP = {"bos_token": START, "eos_token": END, "pad_token": END, "unk_token": END}


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes, in the order of CLIP's (and GPT-2's) vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def synthetic_vocab() -> dict[str, int]:
    """CLIP's first 512 tokens (bytes, then bytes ending a word) and its two special tokens."""
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab |= {s + "</w>": len(symbols) + i for i, s in enumerate(symbols)}
    vocab |= {START: 49406, END: 49407}
    return vocab


def dump(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def data_files() -> dict[str, str]:
    """Path below site-packages -> text, for every data file this script provides."""
    return {
        "comfy/sd1_clip_config.json": dump(SD1_CLIP_CONFIG),
        "comfy/clip_config_bigg.json": dump(CLIP_CONFIG_BIGG),
        "comfy/sd1_tokenizer/vocab.json": json.dumps(synthetic_vocab(), ensure_ascii=False),
        "comfy/sd1_tokenizer/merges.txt": "#version: 0.2\n",
        "comfy/sd1_tokenizer/tokenizer_config.json": dump(TOKENIZER_CONFIG),
        "comfy/sd1_tokenizer/special_tokens_map.json": dump(SPECIAL_TOKENS_MAP),
    }


def find_dist() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        msg = (
            f"prepare_notcomfy: {DIST} is not installed in this environment ({sys.prefix}); "
            f"run `{sys.executable} -m pip install --no-deps {DIST}==0.1.0` first"
        )
        raise SystemExit(msg) from None


def record_path(dist: importlib.metadata.Distribution) -> Path:
    for file in dist.files or []:
        if file.name == "RECORD" and file.parent.name.endswith(".dist-info"):
            return Path(str(dist.locate_file(file)))
    msg = f"prepare_notcomfy: {DIST} has no RECORD file; reinstall it with pip"
    raise SystemExit(msg)


def top_level_names(rows: list[list[str]]) -> set[str]:
    """Top-level names of the installed files (not the dist-info, not scripts outside site-packages)."""
    firsts = {row[0].split("/")[0] for row in rows if row and row[0]}
    return {name for name in firsts if not name.endswith(".dist-info") and name != ".."}


def imported_top_levels(root: Path, packages: set[str]) -> set[str]:
    """Top-level module names that the kept packages import (absolute imports only)."""
    names: set[str] = set()
    for package in packages:
        for source in (root / package).rglob("*.py"):
            try:
                tree = ast.parse(source.read_bytes())
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def remove_shadowing(root: Path, rows: list[list[str]]) -> tuple[list[list[str]], list[str]]:
    """Delete the generic top-level packages; return the RECORD rows left and the names removed."""
    names = top_level_names(rows)
    keep = KEEP | imported_top_levels(root, set(KEEP & names))
    doomed = {name for name in names if name not in keep and name.removesuffix(".py") not in keep}
    for name in sorted(doomed):
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    kept_rows = [row for row in rows if not row or row[0].split("/")[0] not in doomed]
    return kept_rows, sorted(doomed)


def record_row(relative: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [relative, f"sha256={digest}", str(len(data))]


def write_data_files(root: Path, rows: list[list[str]], *, force: bool) -> tuple[list[list[str]], list[str]]:
    """Write the missing data files; return the RECORD rows and one report line per file."""
    report = []
    by_path = {row[0]: row for row in rows if row}
    for relative, text in data_files().items():
        target, data = root / relative, text.encode()
        if target.is_file() and target.read_bytes() == data:
            status = "present"
        elif target.exists() and not force:
            report.append(f"  kept    {relative} (differs from the synthetic file; --force replaces it)")
            by_path.setdefault(relative, record_row(relative, target.read_bytes()))
            continue
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            status = "wrote"
        report.append(f"  {status:<7} {relative}")
        by_path[relative] = record_row(relative, data)
    return list(by_path.values()), report


def read_record(path: Path) -> list[list[str]]:
    return [line.rsplit(",", 2) for line in path.read_text().splitlines() if line.strip()]


def write_record(path: Path, rows: list[list[str]]) -> None:
    text = "".join(",".join(row) + "\n" for row in rows)
    if path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="replace data files whose content differs")
    args = parser.parse_args(argv)

    dist = find_dist()
    root = Path(str(dist.locate_file("")))
    record = record_path(dist)
    if not (root / "comfy").is_dir():
        msg = f"prepare_notcomfy: {DIST} is registered but {root / 'comfy'} is missing; reinstall it"
        raise SystemExit(msg)

    print(f"prepare_notcomfy: {DIST} {dist.version} in {root}")
    rows, removed = remove_shadowing(root, read_record(record))
    print(f"  removed top-level packages: {', '.join(removed)}" if removed else "  no shadowing packages left")
    rows, report = write_data_files(root, rows, force=args.force)
    print("\n".join(report))
    write_record(record, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
