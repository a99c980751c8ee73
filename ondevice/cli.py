"""``python -m ondevice`` / ``ondevice``: a thin shell over the library.

``ondevice demo`` walks the seed scenario (on the real GPU if there is one,
else on the fake GPU) on a cached synthetic checkpoint or ``--checkpoint FILE``;
``ondevice info`` reports the ComfyUI found and its features.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ondevice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walk the seed scenario and print a table after each step")
    demo.add_argument("--checkpoint", type=Path, help="a real checkpoint (default: a cached synthetic one)")
    demo.add_argument("--family", default="sdxl", choices=["sdxl", "sd15"], help="synthetic checkpoint family")
    demo.add_argument("--size", default="mini", choices=["mini", "full"], help="synthetic checkpoint size")
    demo.add_argument("--device", help="target device (default: the GPU ComfyUI would use, else a fake GPU)")
    demo.add_argument("--fake-memory", default="8GiB", help="memory of the fake GPU when one is used")
    sub.add_parser("info", help="report the ComfyUI found, its version and features")
    return parser


def _has_gpu() -> bool:
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _demo(args: argparse.Namespace) -> int:
    from ondevice.comfyui import comfyui_info  # noqa: PLC0415
    from ondevice.demo import run_scenario  # noqa: PLC0415

    info = comfyui_info()
    print(f"ComfyUI: {info.version} at {info.path}")
    with ExitStack() as stack:
        if args.device is None and not _has_gpu():
            from ondevice.testing import fake_gpu  # noqa: PLC0415

            gpu = stack.enter_context(fake_gpu(memory=args.fake_memory))
            print(f"No GPU here: using the fake GPU {gpu.device} ({args.fake_memory})")
        path = args.checkpoint
        if path is None:
            from ondevice.testing.synthetic import cached_checkpoint  # noqa: PLC0415

            path = cached_checkpoint(args.family, args.size)
        print(f"Checkpoint: {path}\n")
        run_scenario(path, args.device, out=sys.stdout)
    return 0


def _info() -> int:
    from ondevice.comfyui import comfyui_info  # noqa: PLC0415

    info = comfyui_info()
    print(f"version: {info.version}\npath: {info.path}")
    for name, present in sorted(info.features.items()):
        print(f"  {name}: {present}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ondevice`` command."""
    from ondevice.errors import OnDeviceError  # noqa: PLC0415

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _demo(args) if args.command == "demo" else _info()
    except OnDeviceError as exc:
        print(f"ondevice: error: {exc}", file=sys.stderr)
        return 2
