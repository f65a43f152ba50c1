"""Training speed against torch's CPU thread count: the measurement behind the CLI's thread default.

For each model (the 2-D MLP on moons, the U-Net on 8x8 digits), trains a few steps in a fresh process with
each thread count and prints seconds per step and the ratio to one thread, measured in the same run.
torch's own default is every core; the CLI's default (cli.commands.default_threads) is one thread on
machines of up to four cores. A ratio above 1 means more threads were slower.

    python benchmarks/threads.py [--steps 30] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "moons, MLP": ["--data", "moons"],
    "digits, U-Net": ["--data", "digits", "--model", "unet", "--width", "32", "--depth", "2"],
}


def seconds_per_step(extra: list[str], threads: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, "-m", "sdelang", "train", str(ROOT / "examples" / "vp_likelihood.sde"), *extra,
                "--steps", str(steps), "--out", str(Path(folder) / "run"), "--threads", str(threads), "--quiet",
                "--plot-samples", "0", "--checkpoint-every", str(steps)]
        started = time.perf_counter()
        subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}")
    args = parser.parse_args()
    counts = [int(k) for k in args.threads.split(",")]
    print(f"{os.cpu_count()} cores; {args.steps} training steps each, start-up included\n")
    print("| model | " + " | ".join(f"{k} thread{'s' if k > 1 else ''} (s/step)" for k in counts) + " | ratio |")
    print("|---|" + "---:|" * (len(counts) + 1))
    for name, extra in CASES.items():
        times = [seconds_per_step(extra, k, args.steps) for k in counts]
        ratio = " / ".join(f"{t / times[0]:.2f}" for t in times[1:])
        print(f"| {name} | " + " | ".join(f"{t:.3f}" for t in times) + f" | {ratio} |")


if __name__ == "__main__":
    main()
