"""ondevice installs as users install it: a wheel that pip puts into an environment that already has torch.

One fresh venv per module stands in for a ComfyUI environment: it gets the CPU torch first (as ComfyUI's
environment has its own), then the wheel built from this tree. Everything after the build runs in that venv,
from a folder outside the repository, so the installed copy is what is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    bool(os.environ.get("COMFYUI_PATH")),
    reason="the install test uses no ComfyUI: it runs once per matrix, in the leg without COMFYUI_PATH",
)

TORCH = "torch==2.13.0"  # the CPU build, as in requirements/ci.txt; an unpinned torch pulls a multi-GB CUDA build
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "ondevice")  # what the wheel is built from


def dist_name() -> str:
    """The distribution name in pyproject.toml's [project] table."""
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert project, "pyproject.toml has no [project] table"
    name = re.search(r'^name = "([^"]+)"', project.group(1), re.M)
    assert name, "[project] has no name"
    return name.group(1)


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "COMFYUI_PATH")}
    argv = [str(a) for a in args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of this tree (a build in place would leave build/ and *.egg-info behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    # Without build isolation where this venv has setuptools (the dev venv does): no download to build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    ok(run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", out, src, cwd=out))
    (built,) = out.glob("*.whl")
    return built


def torch_site() -> Path:
    """A folder holding only the CPU torch and its requirements, installed once and kept in the ignored .cache/.

    Writing torch's 900 MB takes 25 to 55 s on a 2-core machine; with the folder kept, the matrix's later runs
    and reruns skip it. Racing runs each install into their own folder and keep the first one renamed into place.
    """
    site = ROOT / ".cache" / "install-test" / TORCH.replace("==", "-")
    if not (site / "torch" / "__init__.py").is_file():
        site.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
        try:
            ok(run(sys.executable, "-m", "pip", "install", "-q", "--target", tmp, TORCH, cwd=tmp))
            tmp.rename(site)
        except OSError:
            if not (site / "torch" / "__init__.py").is_file():  # not a lost race
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return site


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv that already has the CPU torch, as the Python environment that runs ComfyUI has its own.

    The torch is the folder from torch_site(), put on the venv's path by a .pth file: pip sees it as installed
    there, as it sees the torch of a ComfyUI venv or of the portable build's python_embeded.
    """
    root = tmp_path_factory.mktemp("venv")
    ok(run(sys.executable, "-m", "venv", root, cwd=root))
    # Python 3.11's venv brings an old setuptools that would shadow the one torch requires (3.12's brings none).
    ok(run(root / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools", cwd=root))
    purelib = ok(run(root / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root))
    (Path(purelib.stdout.strip()) / "comfyui-torch.pth").write_text(f"{torch_site()}\n")
    return root


@pytest.fixture(scope="module")
def installed(wheel: Path, venv: Path) -> dict[str, str]:
    """pip installs the wheel into the venv; returns {name: version} of what pip installed."""
    report = venv / "install-report.json"
    ok(run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--report", report, wheel, cwd=venv))
    items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in items}


def test_distribution_name_is_not_pypis_ondevice(wheel: Path) -> None:
    """The distribution is not named `ondevice` (on PyPI an unrelated 2016 package); the wheel carries that name."""
    assert dist_name() != "ondevice"
    assert wheel.name.startswith(dist_name().replace("-", "_") + "-"), wheel.name


def test_wheel_carries_the_package_and_its_metadata(wheel: Path) -> None:
    """The wheel holds ondevice/ (testing/ and py.typed included) under the PyPI name, with only two requirements."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "ondevice/__init__.py" in names and "ondevice/py.typed" in names
    assert "ondevice/testing/fake.py" in names and "ondevice/strategies/comfy.py" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "scripts/"))]
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert f"Name: {dist_name()}\n" in text
    assert re.findall(r"^Requires-Dist: ([^;\n]+)$", text, re.M) == ["torch>=2.4", "safetensors>=0.4.2"]
    entry_points = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "ondevice = ondevice.cli:main" in entry_points


def test_pip_install_keeps_the_environments_torch(installed: dict[str, str]) -> None:
    """pip adds ondevice (and safetensors) beside the torch already there: no torch is installed or replaced."""
    assert dist_name() in installed
    assert "torch" not in installed, f"pip installed a torch: {installed}"
    assert set(installed) <= {dist_name(), "safetensors"}, installed


SCOPE = """
import sys, torch, ondevice
from ondevice.testing import fake_gpu

m = torch.nn.Linear(8, 8)
with ondevice.on_gpu(m) as scope:            # no GPU here: the CPU, with one warning
    assert scope.device == torch.device("cpu"), scope.device
with fake_gpu(memory="1GiB") as gpu, torch.inference_mode():
    with ondevice.on_gpu(m):
        assert ondevice.device_of(m) == gpu.device
        y = m(torch.ones(1, 8, device=gpu.device))
    assert ondevice.device_of(m) == torch.device("cpu")
    del y
    assert gpu.memory_allocated() == 0, gpu.memory_allocated()
assert "comfy" not in sys.modules
print(ondevice.__file__)
print(torch.__file__)
"""


def test_installed_package_runs_a_module_scope(installed: dict[str, str], venv: Path) -> None:
    """In the venv, the installed ondevice moves a plain nn.Module (CPU fallback, then the fake GPU), no ComfyUI."""
    done = ok(run(venv / "bin" / "python", "-c", SCOPE, cwd=venv))
    ondevice_file, torch_file = done.stdout.split()
    assert Path(ondevice_file).is_relative_to(venv / "lib"), ondevice_file  # not this checkout's ondevice/
    assert Path(torch_file).is_relative_to(torch_site()), torch_file  # the torch that was there before
    assert "no accelerator found; GPU scopes run on the CPU" in done.stderr


def test_installed_info_without_comfyui_says_how_to_point_at_it(installed: dict[str, str], venv: Path) -> None:
    """The installed `ondevice info` command, with no ComfyUI there, ends with a one-line error naming the fix."""
    done = run(venv / "bin" / "ondevice", "info", cwd=venv)
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]  # before it, torch's own warning that numpy (not a torch requirement) is absent
    assert last.startswith("ondevice: error: ComfyUI was not found"), done.stderr
    assert "COMFYUI_PATH" in last and "ondevice.use_comfyui(" in last
    assert "Traceback" not in done.stderr
