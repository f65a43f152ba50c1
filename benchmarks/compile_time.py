"""Cold `sdelang compile` wall time per example, against the cost of starting the command at all.

Each measurement is a fresh process (`python -m sdelang compile examples/NAME.sde -o TMP`), so the
figures include interpreter start-up and imports, as a user sees them. The baseline, measured in the
same run, is `python -m sdelang --help`: the same interpreter, the same imports, no compilation. The
ratio says how much of a compile is derivation rather than start-up, and is comparable across
machines; the absolute seconds are for the machine the table was made on.

    python benchmarks/compile_time.py [--repeat 3] [NAME ...]

Prints a Markdown table (the one in docs/benchmarks.md); the median of the repeats is shown.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall_time(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdelang", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_time(args: list[str], repeat: int) -> float:
    return statistics.median(wall_time(args) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="example names (default: every examples/*.sde)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in (ROOT / "examples").glob("*.sde"))

    baseline = median_time(["--help"], args.repeat)
    print(f"baseline `python -m sdelang --help`: {baseline:.2f} s (median of {args.repeat})\n")
    print("| example | kernel | cold compile (s) | ratio to baseline |")
    print("|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            seconds = median_time(["compile", f"examples/{name}.sde", "-o", out], args.repeat)
            kernel = _kernel_path(Path(out) / f"{name}.py")
            print(f"| {name} | {kernel} | {seconds:.2f} | {seconds / baseline:.1f} |")


def _kernel_path(module: Path) -> str:
    for line in module.read_text().splitlines():
        if line.strip().startswith("kernel_path = "):
            return line.split("=", 1)[1].strip().strip('"')
    return "?"


if __name__ == "__main__":
    main()
