"""Run the test suite once per ComfyUI version and print a table of the results (``make test``).

Usage: ``python scripts/test_matrix.py [--pytest-args ARGS] NAME=PYTHON[@COMFYUI_PATH] ...``

Each suite runs in its own process, one after the other, with ``COMFYUI_PATH`` set where a checkout
is named (unset otherwise, so the venv's own ``comfy`` package is used), followed by the fake-GPU
``python -m ondevice bench --quick --check-bytes`` in the same environment (it fails when ondevice's
exit copies weights device -> host). Every suite runs even if an earlier one failed. The table goes to
stdout and to ``.cache/matrix-results.md``, then one closing line with the totals; the exit status is 1
if any suite or bench failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


@dataclass
class Result:
    name: str
    comfyui: str
    counts: dict[str, int]
    seconds: float
    returncode: int
    bench: int = 0  # exit status of `ondevice bench --quick --check-bytes`

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.bench == 0


def _run(name: str, spec: str, pytest_args: list[str]) -> Result:
    python, _, checkout = spec.partition("@")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    if checkout:
        env["COMFYUI_PATH"] = str((ROOT / checkout).resolve())
    print(f"\n=== {name}: {python} {'COMFYUI_PATH=' + env['COMFYUI_PATH'] if checkout else '(its own comfy package)'}")
    sys.stdout.flush()
    start = time.monotonic()
    command = [python, "-m", "pytest", *pytest_args]  # the venvs' own interpreters, named by the Makefile
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # noqa: S603
    last = ""
    for line in proc.stdout or ():
        sys.stdout.write(line)
        if COUNTS.search(line):
            last = line
    returncode = proc.wait()
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(last)}
    bench = [python, "-m", "ondevice", "bench", "--quick", "--check-bytes", "--json", f".cache/bench-{name}.json"]
    print(f"\n=== {name}: {' '.join(bench[1:])}")
    sys.stdout.flush()
    bench_status = subprocess.call(bench, cwd=ROOT, env=env)  # noqa: S603
    return Result(name, checkout or "venv's comfy package", counts, time.monotonic() - start, returncode, bench_status)


def _table(results: list[Result]) -> str:
    rows = [
        "| ComfyUI | result | passed | failed | errors | skipped | bench --quick --check-bytes | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.counts
        rows.append(
            f"| {r.name} | {'pass' if r.returncode == 0 else f'FAIL (exit {r.returncode})'} | {c.get('passed', 0)} | "
            f"{c.get('failed', 0)} | {c.get('error', 0)} | {c.get('skipped', 0)} | "
            f"{'pass' if r.bench == 0 else f'FAIL (exit {r.bench})'} | {r.seconds:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pytest-args", default="-q", help="arguments passed to each pytest run")
    parser.add_argument("suites", nargs="+", metavar="NAME=PYTHON[@COMFYUI_PATH]")
    args = parser.parse_args()
    results = []
    for suite in args.suites:
        name, _, spec = suite.partition("=")
        results.append(_run(name, spec, shlex.split(args.pytest_args)))
    table = _table(results)
    out = ROOT / ".cache" / "matrix-results.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")
    print("\n" + table + "\n")
    total = {k: sum(r.counts.get(k, 0) for r in results) for k in ("passed", "failed", "error", "skipped")}
    benches = sum(r.bench == 0 for r in results)
    print(
        f"matrix: {total['passed']} passed, {total['failed'] + total['error']} failed, {total['skipped']} skipped; "
        f"bench --quick --check-bytes passed on {benches} of {len(results)}"
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
