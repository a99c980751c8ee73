"""The examples in docs/ marked as tested run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"<!-- tested[^>]*-->\s*```python\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for n, code in enumerate(BLOCK.findall(page.read_text())):
            found.append((f"{page.name}#{n}", code))
    return found


def test_some_blocks_are_tested() -> None:
    """At least one docs example is marked as tested (so the test below cannot pass vacuously)."""
    assert blocks()


@pytest.mark.parametrize(("name", "code"), blocks(), ids=[name for name, _ in blocks()])
def test_docs_example_runs(name: str, code: str) -> None:
    """The marked example runs without error, its asserts included."""
    exec(compile(code, name, "exec"), {"__name__": "docs_example"})  # noqa: S102  (our own docs)
