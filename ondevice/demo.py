"""The seed scenario, step by step, with a table after each step.

Load a checkpoint to the CPU -> diffusion model onto the GPU -> back -> VAE
decode on the GPU -> back -> CLIP encode on the GPU -> back: everything on
the CPU.  The tables show, per component: device, bytes, free device
memory, and the seconds the step took.  Used by ``python -m ondevice demo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from ondevice import devices
from ondevice.errors import OnDeviceError
from ondevice.loader import Checkpoint, load_checkpoint
from ondevice.placement import placement
from ondevice.scope import on_gpu

__all__ = ["Row", "Step", "run_scenario"]


@dataclass(frozen=True)
class Row:
    """One component's placement after a step."""

    component: str
    device: str
    bytes: int


@dataclass
class Step:
    """What a step did, where everything was after it, and what it cost."""

    name: str
    seconds: float
    free_device_memory: int
    rows: list[Row] = field(default_factory=list)


def _rows(ckpt: Checkpoint) -> list[Row]:
    rows = []
    for name in ("model", "clip", "vae"):
        component = getattr(ckpt, name)
        if component is None:
            continue
        where = placement(component)
        label = "+".join(sorted(str(d) for d in where)) or "-"
        rows.append(Row(name, label, sum(where.values())))
    return rows


def _format(step: Step, device: torch.device) -> str:
    head = f"{'component':<10} {'device':<12} {'bytes':>14} {'free ' + str(device):>22} {'seconds':>9}"
    lines = [f"== {step.name}", head, "-" * len(head)]
    for row in step.rows:
        lines.append(
            f"{row.component:<10} {row.device:<12} {row.bytes:>14,} {step.free_device_memory:>22,} {step.seconds:>9.3f}"
        )
    return "\n".join(lines)


class _Recorder:
    def __init__(self, device: torch.device, out: TextIO | None) -> None:
        self.device, self.out = device, out
        self.steps: list[Step] = []
        self.ckpt = Checkpoint(None, None, None, None)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        devices.synchronize(self.device)
        start = time.perf_counter()
        yield
        devices.synchronize(self.device)
        seconds = time.perf_counter() - start
        step = Step(name, seconds, devices.memory_info(self.device)[0], _rows(self.ckpt))
        self.steps.append(step)
        if self.out is not None:
            print(_format(step, self.device), file=self.out, flush=True)


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        msg = f"{what} gave non-finite values; the checkpoint's weights are broken"
        raise OnDeviceError(msg)


def _encode(clip: object) -> torch.Tensor:
    tokens = clip.tokenize("a lighthouse at dawn")  # type: ignore[attr-defined]
    cond: torch.Tensor = clip.encode_from_tokens(tokens)  # type: ignore[attr-defined]
    return cond


def run_scenario(
    checkpoint: str | Path,
    device: devices.DeviceLike = None,
    *,
    out: TextIO | None = None,
    inside: Callable[[str, Checkpoint], None] | None = None,
) -> list[Step]:
    """Walk the seed scenario on ``device``; return (and print to ``out``) one :class:`Step` per step.

    ``inside(step_name, checkpoint)`` runs inside each GPU scope (tests use it to assert).
    """
    target = devices.resolve(device)
    rec = _Recorder(target, out)
    with rec.step("load checkpoint to the CPU"):
        rec.ckpt = ckpt = load_checkpoint(checkpoint)
    hook = inside or (lambda name, c: None)
    work: dict[str, tuple[str, str, Callable[[], None]]] = {
        "model": ("diffusion model", "diffusion model", lambda: None),
        "vae": ("VAE decode", "VAE", lambda: _check_finite(ckpt.vae.decode(torch.randn(1, 4, 16, 16)), "VAE decode")),
        "clip": ("CLIP encode", "CLIP", lambda: _check_finite(_encode(ckpt.clip), "CLIP encode")),
    }
    for name, (label, component, run) in work.items():
        with ExitStack() as held:
            with rec.step(f"{label} on the GPU"):
                held.enter_context(on_gpu(getattr(ckpt, name), device=target))
                with torch.inference_mode():  # as ComfyUI runs its nodes
                    run()
                hook(name, ckpt)
            with rec.step(f"{component} back on the CPU"):
                held.close()
    return rec.steps
