"""``python -m ondevice`` / ``ondevice``: a thin shell over the library.

``ondevice demo`` walks the seed scenario (on the real GPU if there is one,
else on the fake GPU) on a cached synthetic checkpoint or ``--checkpoint FILE``;
``ondevice info`` reports the ComfyUI found and its features; ``ondevice bench``
measures how fast weights move by each path (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from ondevice.bench import MODELS

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
    bench = sub.add_parser("bench", help="measure moves to the GPU and back by every path, against the goals")
    bench.add_argument("--model", choices=list(MODELS), help="UNet to build (default: sdxl)")
    bench.add_argument("--quick", action="store_true", help="a small UNet (sd15-mini) and 3 repetitions")
    bench.add_argument("--repeat", type=int, help="timed repetitions of each measurement (default: 5, quick: 3)")
    bench.add_argument("--device", help="target device (default: CUDA if available, else a fake GPU)")
    bench.add_argument("--json", type=Path, help="also write every number to this file")
    bench.add_argument("--check-bytes", action="store_true",
                       help="exit with status 1 unless ondevice's exit copies 0 bytes device -> host")  # fmt: skip
    bench.add_argument("--fake-memory", default="16GiB", help="memory of the fake GPU when one is used")
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


def _bench(args: argparse.Namespace) -> int:
    from ondevice.bench import measure  # noqa: PLC0415
    from ondevice.comfyui import import_comfy  # noqa: PLC0415

    import_comfy()
    model = args.model or ("sd15-mini" if args.quick else "sdxl")
    repeat = args.repeat if args.repeat is not None else 3 if args.quick else 5
    with ExitStack() as stack:
        fake = args.device is not None and args.device.startswith("fakegpu")
        if fake or (args.device is None and not torch.cuda.is_available()):
            from ondevice.testing import fake_gpu  # noqa: PLC0415

            gpu = stack.enter_context(fake_gpu(memory=args.fake_memory))
            print(f"Using the fake GPU {gpu.device} ({args.fake_memory}): only byte counts mean anything\n")
        report = measure(model, device=args.device, repeat=repeat)
    print(report.table())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    if args.check_bytes and not report.exit_copies_nothing:
        print("ondevice bench: ondevice's exit copied weights device -> host (--check-bytes)", file=sys.stderr)
        return 1
    return 0


def _info(args: argparse.Namespace) -> int:
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
        commands: dict[str, Callable[[argparse.Namespace], int]] = {"demo": _demo, "bench": _bench, "info": _info}
        return commands[args.command](args)
    except OnDeviceError as exc:
        print(f"ondevice: error: {exc}", file=sys.stderr)
        return 2
