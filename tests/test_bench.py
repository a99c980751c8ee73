"""`ondevice bench --quick` on the fake GPU: complete table and JSON, byte counts that match the fake GPU's own.

The bench runs once per module, in-process through ``ondevice.cli.main`` (the suite has booted
ComfyUI already); the tests read its output. Times on the fake GPU mean nothing, so nothing here
looks at them; the goal "exit copies 0 bytes device -> host" is checked for being reported
correctly (and for `--check-bytes` following it), not for being met.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import ondevice
import ondevice.bench
from ondevice.bench import _Bench, _check_on_cpu, _prefetch, build_unet
from ondevice.cli import main
from ondevice.errors import InvalidArgumentError, OnDeviceError
from ondevice.placement import placement
from ondevice.scope import on_gpu
from ondevice.testing import fake_gpu
from ondevice.testing.synthetic import checkpoint_layout

PATHS = {"comfyui", "loaded-model", "ondevice", "link-pageable"}


class Run(NamedTuple):
    status: int
    out: str
    err: str
    report: dict[str, Any]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """`ondevice bench --quick --repeat 1 --check-bytes --json FILE`, run once on the fake GPU."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["bench", "--quick", "--repeat", "1", "--check-bytes", "--json", str(path)])
    return Run(status, out.getvalue(), err.getvalue(), json.loads(path.read_text()))


def test_quick_bench_reports_every_path_and_goal(quick: Run) -> None:
    """The table and the JSON name every path and all nine goal lines, each with a verdict, on the fake GPU."""
    report = quick.report
    assert report["fake_gpu"] is True and report["device"] == "fakegpu:0"
    assert set(report["paths"]) >= PATHS and report["repeat"] == 1
    assert {"torch", "comfyui", "ondevice", "python"} <= set(report["versions"])
    for result in report["paths"].values():
        assert len(result["enter"]["runs_s"]) == len(result["exit"]["runs_s"]) == 1
        assert result["label"] in quick.out
    assert len(report["goals"]) == 9
    for goal in report["goals"]:
        assert goal["goal"] in quick.out and goal["verdict"]
        if goal["met"] is not None:
            assert goal["verdict"] == "met" if goal["met"] else goal["verdict"].startswith("missed by ")
    assert report["prefetch"]["status"] in ("not implemented", "measured")
    assert set(report["scope_overhead"]) == {"held UNet", "held Linear beside the UNet"}
    timed = [g for g in report["goals"] if g["unit"] in ("s", "x", "%")]
    assert all(g["met"] is None for g in timed)  # no time is judged on the fake GPU


def test_model_is_the_mini_sd15_unet_in_fp16(quick: Run) -> None:
    """The quick model's bytes are the mini SD1.5 UNet's fp16 weights plus ComfyUI's small float32 schedule buffers."""
    prefix = "model.diffusion_model."
    unet = [t for key, t in checkpoint_layout("sd15", "mini").items() if key.startswith(prefix)]
    fp16_bytes = sum(t.numel() * 2 for t in unet)
    model = quick.report["model"]
    assert model["name"] == "sd15-mini"
    assert 0 <= model["bytes"] - fp16_bytes <= 64 * 1024
    assert len(unet) <= model["tensors"] <= len(unet) + 10


def test_bytes_each_way_match_the_fake_gpus_counters(quick: Run) -> None:
    """Every path copies the whole model in on enter, and the bench's copy counts equal the fake GPU's counters."""
    nbytes = quick.report["model"]["bytes"]
    for name, result in quick.report["paths"].items():
        assert result["enter_copies"] == {"h2d": nbytes, "d2h": 0}, name
        assert result["exit_copies"]["h2d"] == 0, name
        assert result["fake_enter_copies"] == result["enter_copies"], name
        assert result["fake_exit_copies"] == result["exit_copies"], name
    ours = quick.report["paths"]["ondevice"]
    assert ours["exit_copies"]["d2h"] == 0  # the fast path points unmodified weights back at their CPU masters
    assert ours["device_left_bytes"] == 0  # free device memory back to its baseline
    assert [(e["source"], e["target"]) for e in ours["events"]] == [("cpu", "fakegpu:0"), ("fakegpu:0", "cpu")]


def test_check_bytes_passes_on_the_fast_path(quick: Run) -> None:
    """`ondevice bench --quick --check-bytes` exits 0: ondevice's exit copied no weight device -> host."""
    assert quick.status == 0, quick.err
    assert quick.report["paths"]["ondevice"]["exit_copies"] == {"h2d": 0, "d2h": 0}
    assert {e["path"] for e in quick.report["paths"]["ondevice"]["events"]} == {"staged", "zero-copy"}


def test_check_bytes_exit_status_follows_the_exit_bytes(quick: Run) -> None:
    """`--check-bytes` exits 1 exactly when ondevice's exit copied bytes device -> host, and the goal line says so."""
    d2h = quick.report["paths"]["ondevice"]["exit_copies"]["d2h"]
    goal = next(g for g in quick.report["goals"] if g["goal"].startswith("exit: 0 bytes"))
    assert goal["measured"] == d2h
    assert goal["met"] is (d2h == 0)
    assert goal["verdict"] == ("met" if d2h == 0 else f"missed by {d2h:,} B")
    assert quick.status == (0 if d2h == 0 else 1)
    assert ("--check-bytes" in quick.err) is (d2h > 0)


def test_bench_rejects_a_bad_repeat_count(capsys: pytest.CaptureFixture[str]) -> None:
    """`ondevice bench --repeat 0` ends with a one-line error and status 2, before building anything."""
    assert main(["bench", "--quick", "--repeat", "0"]) == 2
    assert "ondevice: error: repeat=0: pass an int >= 1" in capsys.readouterr().err


def test_build_unet_rejects_an_unknown_model() -> None:
    """build_unet names the models it knows when given another."""
    with pytest.raises(InvalidArgumentError, match="choose one of sdxl, sdxl-mini, sd15-mini"):
        build_unet("sd3", torch.device("cpu"))


def test_a_path_that_leaves_weights_on_the_device_fails_the_bench() -> None:
    """The check after each path raises when weights stayed off the CPU (the numbers would be wrong)."""
    with fake_gpu() as gpu:
        linear = torch.nn.Linear(4, 4).to(gpu.device)
        with pytest.raises(OnDeviceError, match="after the test path, weights are still off the CPU"):
            _check_on_cpu(linear, "the test path")
        _check_on_cpu(linear.cpu(), "the test path")


def test_the_json_file_is_written_where_asked(quick: Run) -> None:
    """The table ends by naming the JSON file it wrote."""
    assert quick.out.rstrip().splitlines()[-1].startswith("JSON: ")
    assert Path(quick.out.rstrip().splitlines()[-1].removeprefix("JSON: ")).is_file()


class _PrefetchIgnored(on_gpu):
    """``on_gpu`` with a ``prefetch=`` keyword that does nothing: the shape of the API the bench probes for."""

    def __init__(self, *components: Any, device: Any = None, prefetch: Any = None) -> None:
        super().__init__(*components, device=device)


def test_prefetch_measurement_runs_where_the_api_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``ondevice.prefetch`` and ``on_gpu(prefetch=)`` exist, overlap is measured; both UNets end on the CPU."""
    monkeypatch.setattr(ondevice, "prefetch", lambda *components: None, raising=False)
    monkeypatch.setattr(ondevice.bench, "on_gpu", _PrefetchIgnored)
    with fake_gpu() as gpu:
        patcher = build_unet("sd15-mini", gpu.device)
        result = _prefetch(_Bench(gpu.device, repeat=1), "sd15-mini", patcher, copy_s=0.001)
        assert result["status"] == "measured"
        assert len(result["hidden_fraction"]["runs"]) == len(result["enter_after_prefetch"]["runs_s"]) == 1
        assert all(0.0 <= f <= 1.0 for f in result["hidden_fraction"]["runs"])
        assert set(placement(patcher)) == {torch.device("cpu")}
