"""Cold `sdelang compile` wall and CPU time per example, against the cost of starting the command at all.

Each measurement is a fresh process (`python -m sdelang compile examples/NAME.sde -o TMP`), so the
figures include interpreter start-up and imports, as a user sees them. The baseline, measured in the
same run, is `python -m sdelang --help`: the same interpreter, the same imports, no compilation. The
ratio says how much of a compile is derivation rather than start-up, and is comparable across
machines; the absolute seconds are for the machine the table was made on. CPU time (user + system of
the child process) is what the compiler's time limits count, and what a loaded machine does not inflate.

    python benchmarks/compile_time.py [--repeat 3] [--against CHECKOUT] [NAME | PATH.sde ...]

NAME is an example (examples/NAME.sde); benchmarks/programs/ holds programs that once compiled slowly
or took the numeric path (pass their paths). Prints a Markdown table (the one in docs/benchmarks.md);
the median of the repeats is shown.

--against CHECKOUT (another working tree of the project, e.g. `git worktree add --detach /tmp/base main`) puts
that tree's compiler beside this one: for each program the two are run in turn, repeat by repeat, so that a
change in the machine's load falls on both columns alike; the table shows CPU seconds and the kernel's path of
each.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def times(args: list[str], root: Path = ROOT) -> tuple[float, float]:
    """(wall, CPU) seconds of one `python -m sdelang ARGS` process, with the compiler of the tree at root."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdelang", *args], cwd=root, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(root)})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_time(args: list[str], repeat: int) -> tuple[float, float]:
    runs = [times(args) for _ in range(repeat)]
    return statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="example names (default: every examples/*.sde)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is shown")
    parser.add_argument("--against", type=Path, help="another checkout of the project, measured in turn with this one")
    args = parser.parse_args()
    names = args.names or sorted(p.stem for p in (ROOT / "examples").glob("*.sde"))
    if args.against is not None:
        return side_by_side(names, args.against.resolve(), args.repeat)

    baseline, baseline_cpu = median_time(["--help"], args.repeat)
    print(f"baseline `python -m sdelang --help`: {baseline:.2f} s wall, {baseline_cpu:.2f} s CPU "
          f"(median of {args.repeat})\n")
    print("| program | kernel | cold compile, wall (s) | CPU (s) | CPU ratio to baseline |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            path = Path(name) if name.endswith(".sde") else Path("examples") / f"{name}.sde"
            seconds, cpu = median_time(["compile", str(path), "-o", out], args.repeat)
            module = next(Path(out).glob("*.py"))
            kernel = _kernel_path(module)
            module.unlink()
            print(f"| {path.stem} | {kernel} | {seconds:.2f} | {cpu:.2f} | {cpu / baseline_cpu:.1f} |")


def side_by_side(names: list[str], base: Path, repeat: int) -> None:
    """CPU seconds of each program compiled by the checkout at base and by this one, alternating run by run."""
    print(f"before: {base} ({_commit(base)}); after: {ROOT} ({_commit(ROOT)}); median of {repeat}, CPU seconds\n")
    print("| program | before: kernel | before: CPU (s) | after: kernel | after: CPU (s) |")
    print("|---|---|---:|---|---:|")
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            path = (Path(name) if name.endswith(".sde") else ROOT / "examples" / f"{name}.sde").resolve()
            cpu: dict[Path, list[float]] = {base: [], ROOT: []}
            kernels = {}
            for _ in range(repeat):
                for root in (base, ROOT):
                    cpu[root].append(times(["compile", str(path), "-o", out], root)[1])
                    module = next(Path(out).glob("*.py"))
                    kernels[root] = _kernel_path(module)
                    module.unlink()
            print(f"| {path.stem} | {kernels[base]} | {statistics.median(cpu[base]):.2f} | {kernels[ROOT]} | "
                  f"{statistics.median(cpu[ROOT]):.2f} |", flush=True)


def _commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    return result.stdout.strip() + (" with changes" if dirty else "")


def _kernel_path(module: Path) -> str:
    for line in module.read_text().splitlines():
        if line.strip().startswith("kernel_path = "):
            return line.split("=", 1)[1].strip().strip('"')
    return "?"


if __name__ == "__main__":
    main()
