"""``python -m ondevice bench``: how fast weights move, by each path, against the goals of docs/performance.md.

One run builds a UNet in memory (the real-architecture SDXL UNet by default,
through ComfyUI's own model detection and model config, random fp16 weights,
wrapped in ComfyUI's ``ModelPatcher``) and measures, with the device
synchronized around every timed step:

- the link: one buffer of the model's bytes copied to the device and back
  (pinned where the device can pin host memory, and pageable);
- ComfyUI's native path: ``load_models_gpu([p], force_full_load=True)`` / ``unload_all_models()``;
- the hand-written path: ``LoadedModel(p).model_load()`` / ``.model_unload()``;
- ondevice: entering and leaving ``on_gpu(p)``, its first (cold) entry, the
  host memory it adds (RSS), the device memory left after exit, the overhead
  of a scope on a component that is held already, and prefetch overlap
  (where ``ondevice.prefetch`` exists).

Each path runs one warm-up round trip, one round trip that counts the bytes
copied each way (a torch dispatch mode that sees every copy made on the
calling thread; on the fake GPU also its own counters), then ``repeat`` timed
round trips; the table reports median and minimum.  On the fake GPU only the
byte counts and device memory mean anything: times there are Python's.

Example::

    from ondevice.bench import measure

    report = measure("sd15-mini", repeat=3)  # with a GPU, or inside ``with fake_gpu():``
    print(report.table())
"""

from __future__ import annotations

import functools
import inspect
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ondevice
from ondevice import devices
from ondevice.comfyui import comfyui_info, import_comfy
from ondevice.devices import CPU
from ondevice.errors import InvalidArgumentError, OnDeviceError
from ondevice.events import MoveEvent, add_listener
from ondevice.placement import placement
from ondevice.scope import on_gpu

__all__ = ["MODELS", "Copies", "Goal", "PathResult", "Report", "Runs", "build_unet", "measure"]

MODELS: dict[str, tuple[str, str, str]] = {
    "sdxl": ("sdxl", "full", "SDXL UNet (real architecture)"),
    "sdxl-mini": ("sdxl", "mini", "mini SDXL UNet (139.5 M params, keeps what SDXL detection reads)"),
    "sd15-mini": ("sd15", "mini", "mini SD1.5 UNet (25.8 M params, one level)"),
}
"""``--model`` name -> (synthetic family, size, description)."""

_UNET_PREFIX = "model.diffusion_model."
_GB5 = 5e9
_aten = torch.ops.aten


# ---------------------------------------------------------------------- the model


def build_unet(model: str, load_device: torch.device) -> Any:
    """ComfyUI's ``ModelPatcher`` over the named UNet (see :data:`MODELS`), built in memory on the CPU.

    The layout is ComfyUI's: ``comfy.model_detection.model_config_from_unet`` detects the
    model config from the synthetic checkpoint's key names and shapes (meta tensors, no
    file), ``model_config.get_model`` builds the ``BaseModel`` in fp16, and every parameter
    is filled with random values.  ``offload_device`` is the CPU.
    """
    if model not in MODELS:
        msg = f"model={model!r} is not a bench model; choose one of {', '.join(MODELS)}"
        raise InvalidArgumentError(msg)
    family, size, _ = MODELS[model]
    import_comfy()
    import comfy.model_detection  # noqa: PLC0415  (ComfyUI is imported lazily, after booting it)
    import comfy.model_patcher  # noqa: PLC0415

    config = comfy.model_detection.model_config_from_unet(_unet_layout(family, size), _UNET_PREFIX)
    config.set_inference_dtype(torch.float16, None)
    base = config.get_model({}, "", device=CPU)
    _fill_random(base.diffusion_model.parameters())
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=CPU)


@functools.cache
def _unet_layout(family: str, size: str) -> dict[str, torch.Tensor]:
    """The synthetic checkpoint's UNet keys -> meta tensors (building the whole layout takes a second or two)."""
    from ondevice.testing.synthetic import checkpoint_layout  # noqa: PLC0415

    return {key: t for key, t in checkpoint_layout(family, size).items() if key.startswith(_UNET_PREFIX)}


def _fill_random(tensors: Iterable[torch.Tensor], seed: int = 0) -> None:
    """Random values (``randn * 0.02``) in every tensor, tiled from one pool: fast for billions of values."""
    generator = torch.Generator().manual_seed(seed)
    pool_size = 1_048_573  # a prime: rows of any real width differ
    pool = torch.randn(pool_size, generator=generator).mul_(0.02)
    pool = torch.cat([pool, pool])
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.view(-1)
            start = int(torch.randint(pool_size, (1,), generator=generator))
            for begin in range(0, flat.numel(), pool_size):
                chunk = flat[begin : begin + pool_size]
                chunk.copy_(pool[start : start + chunk.numel()])


# ---------------------------------------------------------------------- counting copies


class Copies(NamedTuple):
    """Bytes copied host -> device (``h2d``) and device -> host (``d2h``)."""

    h2d: int = 0
    d2h: int = 0


class _CopyCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's class is untyped
    """Counts the bytes of every copy between the CPU and another device made on this thread."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.h2d = self.d2h = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is _aten._to_copy.default:
            self._count(args[0].device, out.device, out.nbytes)
        elif func in (_aten.copy_.default, _aten._copy_from.default):
            dst, src = (args[0], args[1]) if func is _aten.copy_.default else (args[1], args[0])
            self._count(src.device, dst.device, dst.nbytes)
        elif func is _aten._foreach_copy_.default:
            for dst, src in zip(args[0], args[1], strict=True):
                self._count(src.device, dst.device, dst.nbytes)
        return out

    def _count(self, source: torch.device, target: torch.device, nbytes: int) -> None:
        if source.type == "cpu" and target.type != "cpu":
            self.h2d += nbytes
        elif source.type != "cpu" and target.type == "cpu":
            self.d2h += nbytes

    @property
    def copies(self) -> Copies:
        return Copies(self.h2d, self.d2h)


def _fake_counters(device: torch.device) -> Copies | None:
    """The fake GPU's own process-wide byte counters (``None`` on a real device)."""
    if device.type != "fakegpu":
        return None
    from ondevice.testing import fakegpu  # noqa: PLC0415

    return Copies(fakegpu.stats.to_fake_bytes, fakegpu.stats.to_cpu_bytes)


def _delta(before: Copies | None, after: Copies | None) -> Copies | None:
    return None if before is None or after is None else Copies(after.h2d - before.h2d, after.d2h - before.d2h)


def _rss() -> int | None:
    try:
        import psutil  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class Runs:
    """Seconds of each timed repetition."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "runs_s": list(self.seconds)}


@dataclass
class PathResult:
    """One way of moving the weights to the device (enter) and back (exit), measured."""

    name: str
    label: str
    enter: Runs
    exit: Runs
    first_enter_s: float
    first_exit_s: float
    enter_copies: Copies
    exit_copies: Copies
    fake_enter_copies: Copies | None = None  # the fake GPU's own counters over the counted round trip
    fake_exit_copies: Copies | None = None
    device_left_bytes: int | None = None  # device memory allocated after exit, beyond the baseline before enter
    events: list[dict[str, Any]] = field(default_factory=list)  # ondevice's MoveEvents of the counted round trip

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["enter"], out["exit"] = self.enter.to_json(), self.exit.to_json()
        for key in ("enter_copies", "exit_copies", "fake_enter_copies", "fake_exit_copies"):
            value = getattr(self, key)
            out[key] = None if value is None else value._asdict()
        return out


@dataclass(frozen=True)
class Goal:
    """One goal line and what this run measured for it."""

    goal: str
    measured: float | None
    limit: float
    unit: str  # "s", "B", "%", "x"
    verdict: str  # "met", "missed by ...", "n/a (...)", "not implemented"
    met: bool | None  # None where the goal could not be judged here


@dataclass
class Report:
    """Everything one bench run measured; :meth:`table` prints it, :meth:`to_json` serializes it."""

    model: dict[str, Any]
    device: str
    device_name: str
    fake: bool
    versions: dict[str, str]
    repeat: int
    paths: list[PathResult]
    scope_overhead: dict[str, Runs]
    ondevice: dict[str, Any]
    prefetch: dict[str, Any]
    goals: list[Goal] = field(default_factory=list)

    def path(self, name: str) -> PathResult:
        return next(p for p in self.paths if p.name == name)

    @property
    def exit_copies_nothing(self) -> bool:
        """Whether ondevice's exit copied zero bytes device -> host (the ``--check-bytes`` goal)."""
        return next(g for g in self.goals if g.goal == _EXIT_BYTES_GOAL).met is True

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "device_name": self.device_name,
            "fake_gpu": self.fake,
            "versions": self.versions,
            "repeat": self.repeat,
            "paths": {p.name: p.to_json() for p in self.paths},
            "scope_overhead": {name: runs.to_json() for name, runs in self.scope_overhead.items()},
            "ondevice": self.ondevice,
            "prefetch": self.prefetch,
            "goals": [asdict(g) for g in self.goals],
        }

    def table(self) -> str:
        return _format(self)


# ---------------------------------------------------------------------- timing


class _Bench:
    """The device, the move events seen, and the helpers every measurement shares."""

    def __init__(self, device: torch.device, repeat: int) -> None:
        self.device, self.repeat = device, repeat
        self.events: list[MoveEvent] = []

    def sync(self) -> None:
        devices.synchronize(self.device)

    def timed(self, step: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - start

    def allocated(self) -> int | None:
        try:
            return devices.memory_allocated(self.device)
        except OnDeviceError:
            return None

    def round_trips(
        self, name: str, label: str, enter: Callable[[], object], exit_: Callable[[], object]
    ) -> PathResult:
        """Warm-up (or cold, for ondevice) round trip, one counted round trip, then ``repeat`` timed ones."""
        first_enter = self.timed(enter)
        first_exit = self.timed(exit_)
        before_allocated = self.allocated()
        seen = len(self.events)
        fake_0 = _fake_counters(self.device)
        with _CopyCounter() as entering:
            enter()
            self.sync()
        fake_1 = _fake_counters(self.device)
        with _CopyCounter() as leaving:
            exit_()
            self.sync()
        fake_2 = _fake_counters(self.device)
        after_allocated = self.allocated()
        events = [_event_json(e) for e in self.events[seen:]]
        enters, exits = [], []
        for _ in range(self.repeat):
            enters.append(self.timed(enter))
            exits.append(self.timed(exit_))
        left = None if before_allocated is None or after_allocated is None else after_allocated - before_allocated
        return PathResult(
            name, label, Runs(tuple(enters)), Runs(tuple(exits)), first_enter, first_exit,
            entering.copies, leaving.copies, _delta(fake_0, fake_1), _delta(fake_1, fake_2), left, events,
        )  # fmt: skip


def _event_json(event: MoveEvent) -> dict[str, Any]:
    out = asdict(event)
    out["source"], out["target"] = str(event.source), str(event.target)
    return out


def _check_on_cpu(patcher: Any, after: str) -> None:
    """Raise unless every weight is back on the CPU (each path must leave the model where it found it)."""
    off = {device: n for device, n in placement(patcher).items() if device.type != "cpu"}
    if off:
        msg = f"bench: after {after}, weights are still off the CPU ({off}); the measurements would be wrong"
        raise OnDeviceError(msg)


# ---------------------------------------------------------------------- the paths


def _pinned_empty(nbytes: int) -> torch.Tensor | None:
    """A pinned host buffer, or ``None`` where this machine cannot pin (the fake GPU without pinned memory)."""
    makers: list[Callable[[], torch.Tensor]] = [
        lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True),
        lambda: torch.empty(nbytes, dtype=torch.uint8).pin_memory(),
    ]
    for make in makers:
        try:
            buffer = make()
            if buffer.is_pinned():
                return buffer
        except (RuntimeError, NotImplementedError):
            continue
    return None


def _link(bench: _Bench, nbytes: int, *, pinned: bool) -> PathResult | None:
    host = _pinned_empty(nbytes) if pinned else torch.empty(nbytes, dtype=torch.uint8)
    if host is None:
        return None
    host.fill_(1)  # touch every page before timing
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=bench.device)
    kind = "pinned" if pinned else "pageable"
    return bench.round_trips(
        f"link-{kind}",
        f"link, one {kind} buffer",
        lambda: on_device.copy_(host, non_blocking=pinned),
        lambda: host.copy_(on_device, non_blocking=pinned),
    )


def _comfyui_native(bench: _Bench, patcher: Any) -> PathResult:
    mm = import_comfy()

    def unload() -> None:
        if torch.device(mm.get_torch_device()) == bench.device:
            mm.unload_all_models()
        else:  # what unload_all_models does, for a device that is not ComfyUI's default
            mm.free_memory(1e30, bench.device)

    result = bench.round_trips(
        "comfyui",
        "ComfyUI load_models_gpu / unload_all_models",
        lambda: mm.load_models_gpu([patcher], force_full_load=True),
        unload,
    )
    _check_on_cpu(patcher, "unload_all_models()")
    return result


def _loaded_model(bench: _Bench, patcher: Any) -> PathResult:
    mm = import_comfy()
    loaded: list[Any] = []

    def enter() -> None:
        loaded.append(mm.LoadedModel(patcher))
        loaded[-1].model_load()  # every version's defaults load fully (lowvram_model_memory=0)

    result = bench.round_trips(
        "loaded-model", "LoadedModel(p).model_load / .model_unload", enter, lambda: loaded.pop().model_unload()
    )
    _check_on_cpu(patcher, "LoadedModel.model_unload()")
    return result


def _ondevice(bench: _Bench, patcher: Any, nbytes: int) -> tuple[PathResult, dict[str, Any]]:
    scopes: list[on_gpu] = []

    def enter() -> None:
        scope = on_gpu(patcher, device=bench.device)
        scope.__enter__()
        scopes.append(scope)

    def exit_() -> None:
        scopes.pop().__exit__(None, None, None)

    seen = len(bench.events)
    rss_before = _rss()
    try:
        result = bench.round_trips("ondevice", "ondevice on_gpu(p) enter / exit", enter, exit_)
    finally:
        while scopes:
            exit_()
    rss_after = _rss()
    _check_on_cpu(patcher, "on_gpu(p) exit")
    moves = bench.events[seen:]
    rss = None if rss_before is None or rss_after is None else rss_after - rss_before
    extra = {
        "host_rss_delta_bytes": rss,
        "host_overhead_fraction": None if rss is None else rss / nbytes,
        "one_time_s": result.first_enter_s - result.enter.median,
        "moves": len(moves),
        "pinned_moves": sum(m.pinned for m in moves),
        "paths": sorted({m.path for m in moves}),
    }
    return result, extra


def _scope_overhead(bench: _Bench, patcher: Any, budget_s: float) -> dict[str, Runs]:
    """Microseconds per enter+exit of a nested scope on a held component, with the UNet held."""
    linear = torch.nn.Linear(64, 64)
    out: dict[str, Runs] = {}
    with on_gpu(patcher, linear, device=bench.device):
        for name, component in (("held UNet", patcher), ("held Linear beside the UNet", linear)):
            out[name] = Runs(tuple(_per_scope(component, bench.device, budget_s) for _ in range(bench.repeat)))
    return out


def _per_scope(component: Any, device: torch.device, budget_s: float) -> float:
    """Seconds per nested ``with on_gpu(component)``, over as many as fit in ``budget_s`` (at least 10)."""
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(10):
            with on_gpu(component, device=device):
                pass
        done += 10
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or done >= 100_000:
            return elapsed / done


def _busy(device: torch.device, seconds: float) -> Callable[[], None]:
    """Work queued on ``device``'s default stream that keeps it busy about ``seconds`` (a sleep where it cannot)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if device.type != "cuda" or sleep is None:
        return lambda: time.sleep(seconds)
    cycles = 10_000_000
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        sleep(cycles)
        torch.cuda.synchronize(device)
        rate = cycles / (time.perf_counter() - start)
    return lambda: sleep(int(rate * seconds))


def _wait_default_stream(device: torch.device) -> None:
    """Wait for the default stream only: a copy on a side stream may still run (``synchronize`` would wait for it)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    else:
        devices.synchronize(device)


def _prefetch(bench: _Bench, model: str, patcher: Any, copy_s: float) -> dict[str, Any]:
    """How much of b's copy ``on_gpu(a, prefetch=b)`` hides under a's block, and what entering b costs after.

    a is held by an outer scope, so the timed inner scope moves nothing of a.  The
    block runs compute on the default stream for about 1.5 x the copy; what the
    copy adds to the block (its wall time past the compute alone) plus the time to
    enter b afterwards is the exposed part of the copy.
    """
    if not hasattr(ondevice, "prefetch") or "prefetch" not in inspect.signature(on_gpu).parameters:
        return {"status": "not implemented"}
    other = build_unet(model, bench.device)
    compute = _busy(bench.device, max(1.5 * copy_s, 0.01))

    def compute_alone() -> None:
        compute()
        _wait_default_stream(bench.device)

    alone = statistics.median(bench.timed(compute_alone) for _ in range(3))
    scoped: Any = on_gpu  # its prefetch= keyword is probed above
    hidden, enter_b = [], []
    with on_gpu(patcher, device=bench.device):
        for _ in range(bench.repeat):
            bench.sync()
            start = time.perf_counter()
            with scoped(patcher, prefetch=other, device=bench.device):
                compute()
                _wait_default_stream(bench.device)
            block = time.perf_counter() - start
            start = time.perf_counter()  # no synchronize first: what is left of the copy counts here
            with on_gpu(other, device=bench.device):
                bench.sync()
                enter_b.append(time.perf_counter() - start)
            exposed = max(block - alone, 0.0) + enter_b[-1]
            hidden.append(max(1.0 - exposed / copy_s, 0.0))
    _check_on_cpu(other, "the prefetch measurement")
    return {
        "status": "measured",
        "copy_s": copy_s,
        "compute_s": alone,
        "hidden_fraction": {"median": statistics.median(hidden), "min": min(hidden), "runs": hidden},
        "enter_after_prefetch": Runs(tuple(enter_b)).to_json(),
    }


# ---------------------------------------------------------------------- goals

_EXIT_BYTES_GOAL = "exit: 0 bytes device -> host (unmodified weights)"


def _judge(goal: str, measured: float | None, limit: float, unit: str, *, atleast: bool = False, na: str = "") -> Goal:
    if na:
        return Goal(goal, measured, limit, unit, na, None)
    if measured is None:
        return Goal(goal, None, limit, unit, "n/a (not measured)", None)
    met = measured >= limit if atleast else measured <= limit
    if met:
        return Goal(goal, measured, limit, unit, "met", True)
    return Goal(goal, measured, limit, unit, f"missed by {_amount(abs(measured - limit), unit)}", False)


def _goals(report: Report) -> list[Goal]:
    fake = "n/a (fake GPU)" if report.fake else ""
    nbytes = int(report.model["bytes"])
    ours = report.path("ondevice")
    pinned = next((p for p in report.paths if p.name == "link-pinned"), None)
    link_na = fake or ("" if pinned else "n/a (no pinned memory here)")
    ratio = None if pinned is None else ours.enter.median / pinned.enter.median
    exit_d2h = ours.exit_copies.d2h
    if ours.fake_exit_copies is not None:
        exit_d2h = max(exit_d2h, ours.fake_exit_copies.d2h)
    prefetch = report.prefetch
    pf_na = fake if prefetch.get("status") == "measured" else str(prefetch.get("status"))
    overhead = max((runs.median for runs in report.scope_overhead.values()), default=None)
    one_time, host_overhead = report.ondevice["one_time_s"], _percent(report.ondevice["host_overhead_fraction"])
    hidden = _percent(prefetch["hidden_fraction"]["median"]) if "hidden_fraction" in prefetch else None
    return [
        _judge("enter <= 1.15 x pinned link time", ratio, 1.15, "x", na=link_na),
        _judge("exit <= 5 ms", ours.exit.median, 0.005, "s", na=fake),
        _judge(_EXIT_BYTES_GOAL, exit_d2h, 0, "B"),
        _judge("exit: device memory back to baseline", ours.device_left_bytes, 0, "B"),
        _judge("pinning <= 0.25 s per 5 GB (first enter - median enter)", one_time, 0.25 * nbytes / _GB5, "s", na=fake),
        _judge("host memory overhead <= 5 % of the model", host_overhead, 5.0, "%", na=fake),
        _judge("prefetch hides >= 90 % of the copy", hidden, 90.0, "%", atleast=True, na=pf_na),
        _judge("enter after prefetch <= 5 ms", _median(prefetch.get("enter_after_prefetch")), 0.005, "s", na=pf_na),
        _judge("scope overhead on a held component <= 20 us", overhead, 20e-6, "s", na=fake),
    ]


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _median(runs: dict[str, Any] | None) -> float | None:
    return None if runs is None else float(runs["median_s"])


# ---------------------------------------------------------------------- the run


@contextmanager
def _listening(events: list[MoveEvent]) -> Iterator[None]:
    remove = add_listener(events.append)
    try:
        yield
    finally:
        remove()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "fakegpu":
        return "fake GPU (ondevice.testing.fake_gpu): times are Python's, byte counts are exact"
    return str(device)


def _model_info(model: str, patcher: Any) -> dict[str, Any]:
    tensors = list(patcher.model.parameters()) + list(patcher.model.buffers())
    return {
        "name": model,
        "description": MODELS[model][2],
        "bytes": sum(placement(patcher).values()),
        "tensors": len(tensors),
        "dtype": "fp16 (ComfyUI's float32 buffers as they are)",
    }


def measure(model: str = "sdxl", *, device: devices.DeviceLike = None, repeat: int = 5) -> Report:
    """Build ``model`` (a name in :data:`MODELS`) and measure every path on ``device``; returns the report.

    ``device=None`` is ondevice's default GPU (the fake GPU while one is active).
    Each path leaves the weights on the CPU; a path that does not raises
    :class:`~ondevice.errors.OnDeviceError`.  Not thread-safe: run one at a time,
    with no other scopes open.
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        msg = f"repeat={repeat!r}: pass an int >= 1"
        raise InvalidArgumentError(msg)
    info = comfyui_info()
    target = devices.resolve(device)
    patcher = build_unet(model, target)
    bench = _Bench(target, repeat)
    fake = target.type == "fakegpu"
    nbytes = sum(placement(patcher).values())
    with _listening(bench.events):
        paths = [_comfyui_native(bench, patcher), _loaded_model(bench, patcher)]
        ours, extra = _ondevice(bench, patcher, nbytes)
        paths.append(ours)
        overhead = _scope_overhead(bench, patcher, 0.05 if fake else 0.2)
        prefetch = _prefetch(bench, model, patcher, ours.enter.median)
        links = [_link(bench, nbytes, pinned=True), _link(bench, nbytes, pinned=False)]
    paths[:0] = [link for link in links if link is not None]
    versions = {"ondevice": ondevice.__version__, "torch": torch.__version__, "comfyui": info.version,
                "python": platform.python_version()}  # fmt: skip
    report = Report(
        _model_info(model, patcher), str(target), _device_name(target), fake, versions, repeat,
        paths, overhead, extra, prefetch,
    )  # fmt: skip
    report.goals = _goals(report)
    return report


# ---------------------------------------------------------------------- the table


def _amount(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e6:.1f} us" if abs(value) < 1e-3 else f"{value * 1e3:.1f} ms"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{value:.2f} x"


def _runs(runs: Runs) -> str:
    return f"{_amount(runs.median, 's')} / {_amount(runs.min, 's')}"


def _format(report: Report) -> str:
    model = report.model
    lines = [
        f"ondevice bench: {model['description']}, {model['bytes']:,} bytes, {model['tensors']:,} tensors",
        f"device: {report.device} ({report.device_name})",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"{report.repeat} timed repetitions each after a warm-up: median / min",
        "",
    ]
    head = f"{'path':<46} {'to device':>21} {'back to CPU':>21} {'H2D bytes':>15} {'D2H bytes':>15}"
    lines += [head, "-" * len(head)]
    for p in report.paths:
        lines.append(
            f"{p.label:<46} {_runs(p.enter):>21} {_runs(p.exit):>21} {p.enter_copies.h2d:>15,} {p.exit_copies.d2h:>15,}"
        )
    extra = report.ondevice
    ours = report.path("ondevice")
    rss, left = extra["host_rss_delta_bytes"], ours.device_left_bytes
    lines += [
        "",
        f"ondevice first enter (cold): {_amount(ours.first_enter_s, 's')}; one-time cost "
        f"{_amount(extra['one_time_s'], 's')}; moves {extra['moves']} ({extra['pinned_moves']} pinned), "
        f"paths {', '.join(extra['paths']) or '-'}",
        f"host RSS after ondevice's round trips vs before: {'n/a (no psutil)' if rss is None else f'{rss:+,} bytes'}; "
        f"device memory after exit vs before enter: {'n/a' if left is None else f'{left:+,} bytes'}",
    ]
    for name, runs in report.scope_overhead.items():
        lines.append(f"scope overhead, nested on_gpu on a {name}: {_runs(runs)} per enter+exit")
    if report.prefetch.get("status") != "measured":
        lines.append(f"prefetch: {report.prefetch.get('status')}")
    head = f"{'goal':<58} {'measured':>14} {'limit':>12}  verdict"
    lines += ["", head, "-" * len(head)]
    for goal in report.goals:
        measured = "-" if goal.measured is None else _amount(goal.measured, goal.unit)
        lines.append(f"{goal.goal:<58} {measured:>14} {_amount(goal.limit, goal.unit):>12}  {goal.verdict}")
    return "\n".join(lines)
