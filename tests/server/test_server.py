"""ComfyUI's own server (its ``main.py``) runs a text-to-image workflow built on the example node pack.

The server runs in a subprocess on 127.0.0.1 with ``--cpu`` and its own temporary folders; the
test-only custom node ``fakegpu_node`` switches the fake GPU on as ComfyUI loads it and reports the
device's memory over HTTP. Skipped where the ComfyUI in use has no ``main.py`` (notcomfy ships
``comfy/`` only) or ComfyUI's server packages (requirements/server.txt) are not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import ondevice

ROOT = Path(__file__).resolve().parents[2]
PACK = ROOT / "examples" / "custom_nodes" / "ondevice_example"
FAKEGPU_NODE = Path(__file__).resolve().parent / "fakegpu_node"
SERVER_MODULES = ("aiohttp", "sqlalchemy", "av", "requests")  # what main.py imports beyond comfy/'s needs
CHECKPOINT = "sd15-mini.safetensors"
IMAGE_SIZE = 64
START_TIMEOUT_S = 180.0
PROMPT_TIMEOUT_S = 180.0


def _comfyui_root() -> Path:
    """The folder of the ComfyUI in use (the one holding ``comfy/``)."""
    import comfy.model_management

    return Path(comfy.model_management.__file__).resolve().parents[1]


def _skip_without_server() -> Path:
    root = _comfyui_root()
    if not (root / "main.py").is_file():
        pytest.skip(f"the ComfyUI in use ({root}) has no main.py; set COMFYUI_PATH to a ComfyUI checkout")
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        why = f"ComfyUI's server needs {', '.join(missing)}: pip install -r requirements/server.txt"
        if os.environ.get("CI"):  # CI's venv is built with them: a skip there would hide a broken build
            pytest.fail(why)
        pytest.skip(why)
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ComfyUI server and the folders it writes to."""

    process: subprocess.Popen[bytes]
    url: str
    output: Path
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        """The server log's last ``lines`` lines, without ComfyUI's repeated pydantic-settings notice."""
        text = [line for line in self.log.read_text(errors="replace").splitlines() if "pydantic-settings" not in line]
        return "\n".join(text[-lines:])

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:  # noqa: S310  (loopback URL built here)
            return json.load(response)

    def post(self, path: str, body: object) -> Any:
        request = urllib.request.Request(  # noqa: S310  (loopback URL built here)
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return json.load(response)
        except urllib.error.HTTPError as error:
            pytest.fail(f"POST {path}: HTTP {error.code}: {error.read().decode(errors='replace')}")

    def memory(self) -> dict[str, Any]:
        """The fake device's report from the test-only node's route."""
        report: dict[str, Any] = self.get("/ondevice-test/memory")
        return report

    def run(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """Queue ``prompt``; wait (bounded) for its history entry and return it."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry: dict[str, Any] = history[prompt_id]
                return entry
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.log_tail()}"
            time.sleep(0.2)
        pytest.fail(f"prompt {prompt_id} not done after {PROMPT_TIMEOUT_S:.0f} s:\n{self.log_tail()}")


def _wait_ready(server: Server) -> None:
    """Wait (bounded) until the server answers on the test node's route: custom nodes loaded, routes added."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"ComfyUI's main.py exited with {server.process.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            server.memory()
            return
        time.sleep(0.25)
    pytest.fail(f"ComfyUI's main.py did not answer within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _base_directory(base: Path) -> None:
    """A ComfyUI base folder: the mini SD1.5 checkpoint, the example pack and the fake-GPU node."""
    from ondevice.testing.synthetic import cached_checkpoint

    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CHECKPOINT).symlink_to(cached_checkpoint("sd15", "mini"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ondevice_example").symlink_to(PACK, target_is_directory=True)
    (base / "custom_nodes" / "ondevice_test_fakegpu").symlink_to(FAKEGPU_NODE, target_is_directory=True)
    for name in ("web", "output", "input", "temp", "user"):
        (base / name).mkdir()


@pytest.fixture(scope="module")
def comfyui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """ComfyUI's main.py on 127.0.0.1 (a free port, --cpu), every folder it writes in a temporary base."""
    comfyui = _skip_without_server()
    base = tmp_path_factory.mktemp("comfyui-base")
    _base_directory(base)
    port = _free_port()
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base), "--output-directory", str(base / "output"),
        "--input-directory", str(base / "input"), "--temp-directory", str(base / "temp"),
        "--user-directory", str(base / "user"), "--database-url", "sqlite:///:memory:",
        "--front-end-root", str(base / "web"),  # the API only: no comfyui-frontend-package needed
        "--disable-api-nodes", "--disable-auto-launch",
    ]  # fmt: skip
    env = dict(os.environ)
    source = str(Path(ondevice.__file__).resolve().parents[1])  # the server imports the ondevice under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    log = base / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=comfyui, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(process, f"http://127.0.0.1:{port}", base / "output", log)
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(process)


def text_to_image(seed: int) -> dict[str, Any]:
    """A text-to-image workflow in ComfyUI's API format: ComfyUI's own nodes, and the pack's where a model runs."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "text": {"class_type": "OnDeviceCLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["ckpt", 1]}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},  # one text encode
        "latent": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "batch_size": 1},
        },
        "sample": {
            "class_type": "OnDeviceKSampler",
            "inputs": {
                "model": ["ckpt", 0],
                "seed": seed,
                "steps": 1,
                "cfg": 1.5,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["text", 0],
                "negative": ["negative", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "OnDeviceVAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"seed{seed}"}},
    }


def test_example_pack_loaded(comfyui_server: Server) -> None:
    """ComfyUI's main.py loads the example pack's three nodes, and the fake GPU is on before any prompt."""
    info = comfyui_server.get("/object_info")
    assert {"OnDeviceCLIPTextEncode", "OnDeviceKSampler", "OnDeviceVAEDecode"} <= info.keys()
    assert info["OnDeviceKSampler"]["category"] == "ondevice"
    memory = comfyui_server.memory()
    assert memory["active"], memory


def test_two_prompts_images_and_memory_at_baseline(comfyui_server: Server) -> None:
    """Two prompts (two seeds) through main.py write PNG images, and device memory is at its baseline after each."""
    baseline = comfyui_server.memory()
    assert baseline["held"] == 0, baseline
    pixels = []
    for seed in (1, 2):
        moved_before = comfyui_server.memory()["bytes_to_device"]
        entry = comfyui_server.run(text_to_image(seed))
        assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{comfyui_server.log_tail()}"

        after = comfyui_server.memory()
        assert after["allocated"] == baseline["allocated"], (seed, after, baseline)
        assert after["held"] == 0, after
        assert "fakegpu:0" not in after["loaded"], after  # ComfyUI keeps nothing on the device either
        assert after["bytes_to_device"] > moved_before, after  # the weights did go to the device

        (saved,) = entry["outputs"]["save"]["images"]
        path = comfyui_server.output / saved["subfolder"] / saved["filename"]
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
            array = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert array.max() > array.min(), f"{path} is one flat colour"
        pixels.append(array)
    assert not np.array_equal(pixels[0], pixels[1]), "two seeds gave the same image: the second prompt did not sample"
    assert "DeviceMemoryRetainedWarning" not in comfyui_server.log.read_text(errors="replace")
