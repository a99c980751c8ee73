"""Check ondevice's scope guarantees on a real GPU, with ComfyUI's dynamic VRAM off and on.

Usage::

    python scripts/gpu_check.py --comfyui /path/to/ComfyUI [--checkpoint FILE] [--size mini|full]
                                [--device cuda:0] [--out results.json]
    python scripts/gpu_check.py --fake-gpu [--comfyui PATH]    # no GPU: the fake one; dynamic rows skipped

Each mode runs in its own process, started the way ComfyUI's ``main.py`` starts:
``static`` as with ``--disable-dynamic-vram`` (plain ``ModelPatcher``), ``dynamic`` with
comfy-aimdo initialized before torch and ``CoreModelPatcher = ModelPatcherDynamic``.
Both load a checkpoint CPU-first (a synthetic SD1.5 one unless ``--checkpoint`` is
given), run the seed scenario, then the scope guarantees: every component on the
GPU inside ``on_gpu`` (for dynamic VRAM: every staged weight's VRAM resident, as
aimdo's page map reports it), the same forward results in two scopes, nothing
evicted by ComfyUI's ``free_memory`` / ``unload_all_models``, by allocation
pressure or by ComfyUI loading another model, clones sharing the weights, all
device memory back after the exit, and a scope on a second GPU where there is one.

The table goes to stdout (free device memory before / inside / after each check, in
MiB); ``--out`` writes it as JSON too.  Exit status 0 when nothing failed.  It needs
only what the ComfyUI checkout needs (torch, safetensors, comfy-aimdo for dynamic
VRAM); ondevice is imported from this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("static", "dynamic")
CHECKS = (
    "load the checkpoint CPU-first",
    "seed scenario",
    "on_gpu: every component on the GPU",
    "on_gpu: same forward in two scopes",
    "on_gpu: free_memory / unload_all_models",
    "on_gpu: allocation pressure",
    "on_gpu: ComfyUI loads another model",
    "on_gpu: clone shares the weights",
    "exit: device memory back, weights on CPU",
    "on_gpu on a second GPU",
)
AIMDO_PAGE = 32 << 20  # comfy-aimdo's VBAR page (VBAR_PAGE_SIZE in src/model-vbar.c)
MIB = 1 << 20


@dataclass
class Row:
    """One check in one mode."""

    mode: str
    check: str
    status: str  # pass / fail / skip
    detail: str = ""
    free_before: int | None = None
    free_inside: int | None = None
    free_after: int | None = None
    seconds: float = 0.0


@dataclass
class Report:
    """Everything one run found."""

    device: str
    environment: dict[str, str] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(row.status == "fail" for row in self.rows)


class CheckFailedError(AssertionError):
    """A guarantee did not hold; the message says which."""


def _require(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailedError(message)


# ---------------------------------------------------------------------- the checks (run inside one mode's process)


class Checks:
    """The scope guarantees on one device, in one ComfyUI mode; each check gives one :class:`Row`."""

    def __init__(self, mode: str, device: Any, checkpoint: Path) -> None:
        import torch  # noqa: PLC0415

        import ondevice  # noqa: PLC0415
        import ondevice.comfyui  # noqa: PLC0415

        self.torch, self.ondevice = torch, ondevice
        self.mm = ondevice.comfyui.import_comfy()
        self.mode, self.device, self.checkpoint = mode, device, checkpoint
        self.cpu = torch.device("cpu")
        self.ckpt: Any = None
        self.rows: list[Row] = []

    # -- measuring
    def free(self) -> int:
        self.mm.soft_empty_cache()
        self.ondevice.devices.synchronize(self.device)
        return self.ondevice.devices.memory_info(self.device)[0]

    def allocated(self) -> int:
        return self.ondevice.devices.memory_allocated(self.device)

    def run(self, name: str, check: Callable[[Row], str | None]) -> None:
        row = Row(self.mode, name, "pass")
        start = time.perf_counter()
        try:
            row.free_before = self.free()
            row.detail = check(row) or ""
        except CheckFailedError as exc:
            row.status, row.detail = "fail", str(exc)
        except Exception as exc:  # noqa: BLE001  (any error is this check's failure; the next checks still run)
            row.status, row.detail = "fail", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            if self.ckpt is not None:
                self.ondevice.offload(*self.components())  # the next check starts from the CPU, whatever happened
            row.free_after = self.free()
            row.seconds = time.perf_counter() - start
        self.rows.append(row)

    # -- what "on the GPU" is, seen from ComfyUI and aimdo rather than from ondevice
    def components(self) -> list[Any]:
        return [c for c in (self.ckpt.model, self.ckpt.clip, self.ckpt.vae) if c is not None]

    def held_on(self, component: Any, device: Any) -> bool:
        for part in self.ondevice.strategies.parts_of(component):
            patcher = part.patcher
            entries = [
                e for e in self.mm.current_loaded_models if e.model is not None and e.model.model is patcher.model
            ]
            if not any(e.device == device for e in entries):
                return False
            if getattr(patcher, "is_dynamic", lambda: False)():
                if not _pages_resident(patcher, device):
                    return False
            elif {t.device for t in _tensors(patcher.model)} != {device}:
                return False
        return True

    def on_cpu(self, component: Any) -> bool:
        placement = self.ondevice.placement(component)
        model = component.patcher.model if hasattr(component, "patcher") else component.model
        return set(placement) == {self.cpu} and getattr(model, "device", self.cpu) == self.cpu

    def vbar_bytes(self) -> int:
        total = 0
        for component in self.components():
            for part in self.ondevice.strategies.parts_of(component):
                for vbar in getattr(part.patcher.model, "dynamic_vbars", {}).values():
                    total += vbar.loaded_size()
        return total

    def unet_forward(self) -> Any:
        torch, d = self.torch, self.device
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=generator).to(d)
        context = torch.randn(1, 77, 768, generator=generator).to(d)
        with torch.inference_mode():
            out = self.ckpt.model.model.apply_model(x, torch.tensor([10.0], device=d), c_crossattn=context)
            return out.float().cpu()

    # -- the checks
    def load(self, row: Row) -> str:
        self.ckpt = self.ondevice.load_checkpoint(self.checkpoint)
        for component in self.components():
            _require(self.on_cpu(component), f"{type(component).__name__} is not wholly on the CPU after loading")
        kinds = sorted({type(getattr(c, "patcher", c)).__name__ for c in self.components()})
        if self.mode == "dynamic":
            _require(
                self.ckpt.model.is_dynamic(), f"ComfyUI built {kinds}, not ModelPatcherDynamic: dynamic VRAM is off"
            )
        return f"patchers: {', '.join(kinds)}"

    def seed(self, row: Row) -> str:
        from ondevice.demo import run_scenario  # noqa: PLC0415

        held: list[str] = []

        def inside(name: str, ckpt: Any) -> None:
            component = getattr(ckpt, name)
            _require(self.held_on(component, self.device), f"seed scenario: the {name} is not on {self.device}")
            held.append(name)

        steps = run_scenario(self.checkpoint, self.device, inside=inside)
        row.free_inside = min(step.free_device_memory for step in steps)
        for step in steps:
            if "back on the CPU" in step.name:
                away = [r.component for r in step.rows if r.device != "cpu"]
                _require(not away, f"seed scenario, {step.name!r}: {away} not on the CPU")
        return f"{len(steps)} steps; held {', '.join(held)}"

    def every_component(self, row: Row) -> str:
        with self.ondevice.on_gpu(*self.components(), device=self.device):
            row.free_inside = self.free()
            away = [type(c).__name__ for c in self.components() if not self.held_on(c, self.device)]
            _require(not away, f"not wholly on {self.device} inside the scope: {away}")
            used = (row.free_before or 0) - row.free_inside
        away = [type(c).__name__ for c in self.components() if not self.on_cpu(c)]
        _require(not away, f"not on the CPU after the scope: {away}")
        return f"{used / MIB:,.0f} MiB of device memory in use inside"

    def forward_twice(self, row: Row) -> str:
        torch = self.torch
        with self.ondevice.on_gpu(self.ckpt.model, self.ckpt.vae, device=self.device):
            first = self.unet_forward()  # dynamic VRAM: copies each weight into its faulted-in pages
            again = self.unet_forward()  # ... and this one reuses them
            with torch.inference_mode():
                image = self.ckpt.vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
            row.free_inside = self.free()
        _require(torch.isfinite(first).all() and torch.isfinite(image).all(), "non-finite output")
        _require(_close(first, again), f"two forwards in one scope differ by {_diff(first, again):.3g}")
        with self.ondevice.on_gpu(self.ckpt.model, device=self.device):
            later = self.unet_forward()  # the pages were freed at the exit: copied in again
        _require(_close(first, later), f"the forward differs between two scopes by {_diff(first, later):.3g}")
        return f"UNet forward x2 and VAE decode in one scope, x1 in another; max difference {_diff(first, later):.3g}"

    def comfy_frees(self, row: Row) -> str:
        with self.ondevice.on_gpu(self.ckpt.model, device=self.device):
            self.mm.free_memory(1e30, self.device)
            self.mm.unload_all_models()
            row.free_inside = self.free()
            _require(self.held_on(self.ckpt.model, self.device), "ComfyUI evicted the held model")
        return "held model untouched"

    def pressure(self, row: Row) -> str:
        torch = self.torch
        _free, total = self.ondevice.devices.memory_info(self.device)
        chunk = max(total // 64, 64 * MIB)
        taken: list[Any] = []
        with self.ondevice.on_gpu(self.ckpt.model, device=self.device):
            try:
                while len(taken) * chunk < 2 * total:
                    taken.append(torch.empty(chunk, dtype=torch.uint8, device=self.device))
            except torch.OutOfMemoryError:
                pass
            row.free_inside = self.ondevice.devices.memory_info(self.device)[0]
            ok = self.held_on(self.ckpt.model, self.device)
            got = len(taken) * chunk
            taken.clear()
            _require(ok, f"allocating {got / MIB:,.0f} MiB evicted the held model")
        return f"allocated {got / MIB:,.0f} MiB beside the held model, then out of memory"

    def comfy_loads_another(self, row: Row) -> str:
        torch = self.torch
        with self.ondevice.on_gpu(self.ckpt.model, device=self.device):
            with torch.inference_mode():
                self.ckpt.vae.decode(torch.randn(1, 4, 8, 8))  # ComfyUI loads the VAE itself
                self.ckpt.clip.encode_from_tokens(self.ckpt.clip.tokenize("a lighthouse"))
            row.free_inside = self.free()
            _require(self.held_on(self.ckpt.model, self.device), "loading the VAE / CLIP evicted the held model")
            self.ondevice.offload(self.ckpt.vae, self.ckpt.clip)  # ComfyUI would keep them cached after the scope
        return "VAE decode and CLIP encode inside on_gpu(model)"

    def clone(self, row: Row) -> str:
        clone = self.ckpt.model.clone()
        with self.ondevice.on_gpu(self.ckpt.model, device=self.device):
            before = self.free()
            with self.ondevice.on_gpu(clone, device=self.device):
                row.free_inside = self.free()
                _require(self.held_on(clone, self.device), "the clone is not on the device")
            _require(self.held_on(self.ckpt.model, self.device), "the inner exit offloaded the outer scope's weights")
            _require(abs(before - (row.free_inside or 0)) <= 2 * AIMDO_PAGE, "the clone loaded the weights again")
        return "one copy on the device"

    def exit_returns(self, row: Row) -> str:
        cycles = []
        for _ in range(2):  # the first cycle may leave torch's workspaces behind; the second must return all
            with self.ondevice.on_gpu(*self.components(), device=self.device):
                self.unet_forward()
                row.free_inside = self.free()
            cycles.append((self.allocated(), self.free()))
        baseline, after = cycles
        away = [type(c).__name__ for c in self.components() if not self.on_cpu(c)]
        _require(not away, f"not on the CPU (or model.device not the CPU) after the scope: {away}")
        _require(self.vbar_bytes() == 0, f"{self.vbar_bytes() / MIB:,.0f} MiB of aimdo VBAR pages still resident")
        _require(after[0] == baseline[0], f"torch holds {after[0] - baseline[0]:+,} bytes more after the 2nd scope")
        return f"allocated {after[0]:,} bytes after each cycle; VBAR pages 0"

    def second_gpu(self, row: Row) -> str | None:
        torch = self.torch
        count = getattr(getattr(torch, self.device.type, None), "device_count", lambda: 1)()
        if count < 2:
            row.status = "skip"
            return "one GPU"
        other = torch.device(self.device.type, 1 if self.device.index != 1 else 0)
        patcher = self.ckpt.model
        load_device = patcher.load_device
        with self.ondevice.on_gpu(patcher, device=other):
            row.free_inside = self.ondevice.devices.memory_info(other)[0]
            _require(self.held_on(patcher, other), f"not on {other} inside the scope")
            self.unet_forward_on(other)
        _require(patcher.load_device == load_device, "load_device was not restored")
        _require(self.on_cpu(patcher), "not on the CPU after the scope")
        return f"held on {other}, back on the CPU"

    def unet_forward_on(self, device: Any) -> None:
        saved, self.device = self.device, device
        try:
            self.unet_forward()
        finally:
            self.device = saved

    def all(self) -> list[Row]:
        steps: list[tuple[str, Callable[[Row], str | None]]] = [
            (CHECKS[0], self.load),
            (CHECKS[1], self.seed),
            (CHECKS[2], self.every_component),
            (CHECKS[3], self.forward_twice),
            (CHECKS[4], self.comfy_frees),
            (CHECKS[5], self.pressure),
            (CHECKS[6], self.comfy_loads_another),
            (CHECKS[7], self.clone),
            (CHECKS[8], self.exit_returns),
            (CHECKS[9], self.second_gpu),
        ]
        for index, (name, check) in enumerate(steps):
            if index > 0 and self.ckpt is None:
                self.rows.append(Row(self.mode, name, "fail", "the checkpoint did not load"))
                continue
            self.run(name, check)
        return self.rows


def _diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def _close(a: Any, b: Any) -> bool:
    """Equal up to kernel nondeterminism; stale or unwritten device weights differ by far more."""
    return bool(a.shape == b.shape and _diff(a, b) <= 1e-3 * max(1.0, float(a.abs().max())))


def _tensors(module: Any) -> Iterator[Any]:
    yield from module.parameters()
    yield from module.buffers()


def _pages_resident(patcher: Any, device: Any) -> bool:
    """Every page of every aimdo allocation of the weights (``module._v``) is resident, per aimdo's page map."""
    vbar = getattr(patcher.model, "dynamic_vbars", {}).get(device)
    if vbar is None:
        return False
    residency = vbar.get_residency()
    for module in patcher.model.modules():
        allocation = getattr(module, "_v", None)
        if allocation is None:
            continue
        _, address, size = allocation
        offset = address - vbar.base_addr
        pages = range(offset // AIMDO_PAGE, -(-(offset + size) // AIMDO_PAGE))
        if not all(residency[page] & 1 for page in pages):
            return False
    return True


# ---------------------------------------------------------------------- booting ComfyUI per mode


def _boot(mode: str, comfyui: Path | None) -> str | None:
    """Start ComfyUI for ``mode`` as main.py would; returns why the mode cannot run, or None."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    aimdo = None
    if mode == "dynamic":
        try:
            import comfy_aimdo.control as aimdo  # noqa: PLC0415  (before torch, as main.py does)
        except ImportError:
            return "comfy-aimdo is not installed (pip install the ComfyUI checkout's requirements)"
        if not aimdo.init():
            return "comfy-aimdo's native library did not load"
    if comfyui is not None and str(comfyui) not in sys.path:
        sys.path.insert(0, str(comfyui))
    import ondevice  # noqa: PLC0415
    import ondevice.comfyui  # noqa: PLC0415

    if comfyui is not None:
        ondevice.use_comfyui(comfyui)
    mm = ondevice.comfyui.import_comfy()
    return None if aimdo is None else _start_dynamic_vram(mm, aimdo)


def _start_dynamic_vram(mm: Any, aimdo: Any) -> str | None:
    """main.py's second half: comfy-aimdo on every CUDA device, then ComfyUI's loaders build dynamic patchers."""
    import comfy.memory_management  # noqa: PLC0415
    import comfy.model_patcher  # noqa: PLC0415

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return "this ComfyUI has no dynamic VRAM (no ModelPatcherDynamic)"
    devices = [d.index for d in mm.get_all_torch_devices() if d.type == "cuda"]
    if not devices:
        return "dynamic VRAM needs a CUDA GPU; ComfyUI found none"
    if not aimdo.init_devices(devices):
        return f"comfy-aimdo could not start on devices {devices} (needs NVIDIA CUDA >= 12.8, torch >= 2.8)"
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    return None


def _environment(device: Any) -> dict[str, str]:
    import torch  # noqa: PLC0415

    import ondevice  # noqa: PLC0415

    info = ondevice.comfyui_info()
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ondevice": ondevice.__version__,
        "comfyui": f"{info.version} ({info.path})",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint is not None:
        return Path(args.checkpoint)
    from ondevice.testing.synthetic import synthetic_checkpoint  # noqa: PLC0415

    path = Path(args.workdir or tempfile.gettempdir()) / f"ondevice-gpu-check-sd15-{args.size}.safetensors"
    if not path.is_file():
        synthetic_checkpoint(path, family="sd15", size=args.size)
    return path


def _skipped(mode: str, why: str) -> list[Row]:
    return [Row(mode, name, "skip", why) for name in CHECKS]


def _failed(mode: str, why: str) -> list[Row]:
    return [Row(mode, name, "fail", why) for name in CHECKS]


def run_mode(mode: str, args: argparse.Namespace) -> Report:
    """Run every check for ``mode`` in this process (ComfyUI must not have been imported yet for dynamic)."""
    try:
        why = _boot(mode, args.comfyui)
    except Exception as exc:  # noqa: BLE001  (reported in every row of this mode)
        traceback.print_exc()
        return Report(args.device or "?", rows=_failed(mode, f"ComfyUI did not start: {type(exc).__name__}: {exc}"))
    import ondevice  # noqa: PLC0415

    device = ondevice.devices.resolve(args.device)
    report = Report(str(device), _environment(device))
    if why is None and device.type == "cpu":
        why = "no GPU found (use --fake-gpu on a machine without one)"
    if why is not None:
        report.rows = _failed(mode, why)
        return report
    report.rows = Checks(mode, device, _checkpoint(args)).all()
    return report


def run_fake(args: argparse.Namespace) -> Report:
    """The static checks on the fake GPU, in this process; the dynamic ones are skipped (they need CUDA)."""
    sys.path.insert(0, str(ROOT))
    from ondevice.testing import fake_gpu  # noqa: PLC0415

    with fake_gpu(memory="2GiB", device_count=2):
        report = run_mode("static", args)
    report.rows += _skipped("dynamic", "needs CUDA: comfy-aimdo's VBARs need an NVIDIA GPU")
    return report


def run_children(args: argparse.Namespace) -> Report:
    """Each mode in a fresh process (aimdo must start before torch; modes cannot share one)."""
    report = Report(args.device or "default GPU")
    with tempfile.TemporaryDirectory(prefix="ondevice-gpu-check-") as tmp:
        for mode in MODES:
            out = Path(tmp) / f"{mode}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--out", str(out)]
            command += ["--size", args.size, "--workdir", args.workdir or tmp]
            for flag, value in (
                ("--comfyui", args.comfyui),
                ("--checkpoint", args.checkpoint),
                ("--device", args.device),
            ):
                if value is not None:
                    command += [flag, str(value)]
            print(f"== {mode}: {' '.join(command)}", file=sys.stderr, flush=True)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)  # noqa: S603
                log = done.stdout + done.stderr
            except subprocess.TimeoutExpired as exc:
                log = f"timed out after {args.timeout} s\n{_text(exc.stdout)}{_text(exc.stderr)}"
            sys.stderr.write(log[-20000:])
            if out.is_file():
                child = json.loads(out.read_text())
                report.device = child["device"]
                report.environment = child["environment"] | report.environment
                report.rows += [Row(**row) for row in child["rows"]]
            else:
                tail = " | ".join(str(log).strip().splitlines()[-3:])
                report.rows += _failed(mode, f"the {mode} process died: {tail}")
    return report


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


# ---------------------------------------------------------------------- output


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def format_table(report: Report) -> str:
    """The pass/fail table, one line per mode and check."""
    head = (
        f"{'mode':<8} {'check':<42} {'result':<6} {'free MiB before':>15} {'inside':>10} {'after':>10} {'s':>6}  detail"
    )
    lines = [f"ondevice gpu_check on {report.device}"]
    lines += [f"  {key}: {value}" for key, value in report.environment.items()]
    lines += [head, "-" * len(head)]
    for row in report.rows:
        lines.append(
            f"{row.mode:<8} {row.check:<42} {row.status:<6} {_mib(row.free_before):>15} {_mib(row.free_inside):>10} "
            f"{_mib(row.free_after):>10} {row.seconds:>6.1f}  {row.detail}"
        )
    counts = {status: sum(row.status == status for row in report.rows) for status in ("pass", "fail", "skip")}
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return "\n".join(lines)


def _write(report: Report, out: str | None) -> None:
    if out is None:
        return
    data = {"device": report.device, "environment": report.environment, "passed": report.passed}
    data["rows"] = [asdict(row) for row in report.rows]
    Path(out).write_text(json.dumps(data, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, help="ComfyUI checkout (the folder with comfy/ and main.py)")
    parser.add_argument("--checkpoint", help="a SD1.5 checkpoint; default: a synthetic one")
    parser.add_argument("--size", choices=("mini", "full"), default="mini", help="synthetic checkpoint size")
    parser.add_argument("--device", help="device to check (default: ComfyUI's GPU)")
    parser.add_argument("--out", help="also write the results to this JSON file")
    parser.add_argument("--timeout", type=float, default=240, help="seconds each mode may take (default 240)")
    parser.add_argument("--fake-gpu", action="store_true", help="run on ondevice's fake GPU (CI); dynamic rows skip")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)  # where a synthetic checkpoint is shared
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the checks; print the table; 0 when nothing failed."""
    args = _parser().parse_args(argv)
    args.comfyui = None if args.comfyui is None else args.comfyui.resolve()
    if args.comfyui is not None and not (args.comfyui / "comfy" / "model_management.py").is_file():
        print(f"--comfyui {args.comfyui}: not a ComfyUI checkout (no comfy/model_management.py)", file=sys.stderr)
        return 2
    if args.mode is not None:  # a child: one mode, results as JSON for the parent
        report = run_mode(args.mode, args)
        _write(report, args.out)
        return 0
    if args.fake_gpu:
        report = run_fake(args)
    elif args.comfyui is None and not os.environ.get("COMFYUI_PATH"):
        print("give --comfyui PATH (a ComfyUI checkout), or --fake-gpu", file=sys.stderr)
        return 2
    else:
        report = run_children(args)
    print(format_table(report), flush=True)
    _write(report, args.out)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
