"""The examples in README.md and docs/ marked as tested run as written; the README leads with the user's install.

A block is marked by an HTML comment right above it: ``<!-- tested ... -->``. Each runs in an empty
folder of its own. A marker that says "fake GPU" runs its block on the ``fake_gpu`` fixture, in a
folder holding synthetic checkpoints under the file names the docs use (``CHECKPOINTS``); after it,
the device memory must be back where it was, with no ``DeviceMemoryRetainedWarning``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- tested([^>]*)-->\s*```python\n(.*?)```", re.DOTALL)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
CHECKPOINTS = {"v1-5-pruned-emaonly-fp16.safetensors": "sd15_checkpoint"}  # name in the docs -> fixture


def blocks() -> list[tuple[str, str, str]]:
    """(id, marker text, code) of every marked block."""
    found = []
    for page in PAGES:
        for n, (marker, code) in enumerate(BLOCK.findall(page.read_text())):
            found.append((f"{page.name}#{n}", marker, code))
    return found


def dist_name() -> str:
    project = re.search(r"^\[project\]\n(.*?)(?=^\[)", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    name = re.search(r'^name = "([^"]+)"', project.group(1) if project else "", re.M)
    assert name, "pyproject.toml's [project] table has no name"
    return name.group(1)


def test_some_blocks_are_tested() -> None:
    """At least one docs example is marked as tested (so the test below cannot pass vacuously)."""
    assert blocks()


def test_readme_leads_with_pip_install_into_comfyuis_environment() -> None:
    """The README's first code block is `python -m pip install <the distribution in pyproject.toml>`."""
    lang, code = FENCE.findall((ROOT / "README.md").read_text())[0]
    assert lang == "bash"
    assert code.strip() == f"python -m pip install {dist_name()}"


def test_readme_first_example_is_tested_under_inference_mode() -> None:
    """The README's first Python example is marked as tested on the fake GPU and runs under inference mode."""
    text = (ROOT / "README.md").read_text()
    first_python = next(code for lang, code in FENCE.findall(text) if lang == "python")
    tested = [(marker, code) for marker, code in BLOCK.findall(text) if code == first_python]
    assert tested, "the README's first Python example is not marked <!-- tested -->"
    assert "fake GPU" in tested[0][0]
    assert "with torch.inference_mode():" in first_python


def run_block(name: str, code: str) -> dict[str, object]:
    """Run ``code``; returns its namespace (what the example defined, results included)."""
    namespace: dict[str, object] = {"__name__": "docs_example"}
    exec(compile(code, name, "exec"), namespace)  # noqa: S102  (our own docs)
    return namespace


@pytest.mark.parametrize("block", blocks(), ids=[name for name, _, _ in blocks()])
def test_docs_example_runs(
    block: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The marked example runs without error, its asserts included; on the fake GPU it leaves no device memory."""
    name, marker, code = block
    monkeypatch.chdir(tmp_path)
    if "fake GPU" not in marker:
        run_block(name, code)
        return
    import ondevice

    for file_name, fixture in CHECKPOINTS.items():
        (tmp_path / file_name).symlink_to(request.getfixturevalue(fixture))
    gpu = request.getfixturevalue("fake_gpu")
    before = gpu.memory_allocated()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = run_block(name, code)
    assert not [w.message for w in caught if issubclass(w.category, ondevice.DeviceMemoryRetainedWarning)]
    assert gpu.memory_allocated() == before, "the example's results hold device memory"
    assert namespace  # its results stay referenced up to the check above
