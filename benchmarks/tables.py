"""Per-call cost of a numeric kernel (table lookups) against a closed-form one, in the same run.

The numeric module is examples/numeric.sde's golden module (log v, logSNR and the inverse CDF are
piecewise Chebyshev tables); the baseline is examples/vp_likelihood.sde's (closed forms, the same
likelihood weighting and importance-sampled t). Each row is the median over repeats of one call at a
batch of B times, and its ratio to the baseline's. `--module PATH` adds other generated modules (for
instance an older build of the numeric example) as further columns.

    python benchmarks/tables.py [--device cpu|cuda] [--dtype float32|float64] [--batch 256 65536]
                                [--module PATH ...]

Prints Markdown tables (those in docs/benchmarks.md). On the CPU, torch runs on one thread, as the
tests do and as the command line does on a small machine (docs/benchmarks.md, "CPU threads").
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of fn() over repeats (after two warm-up calls), synchronised on CUDA."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calls(sde, batch: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    t = sde.sample_t(batch, generator=g)
    x = torch.randn(batch, 2, device=device, dtype=dtype, generator=g)
    u = torch.rand(batch, device=device, dtype=dtype, generator=g)
    return {
        "sample_t": lambda: sde.sample_t(batch, generator=g),
        "t_icdf": lambda: sde.t_icdf(u),
        "marginal_prob": lambda: sde.marginal_prob(x, t),
        "std": lambda: sde.std(t),
        "log_snr": lambda: sde.log_snr(t),
        "discretize": lambda: sde.discretize(x, t),
        "t_density": lambda: sde.t_density(t),
        # What one training batch asks of the SDE: times, the kernel, the weight.
        "training batch": lambda: (sde.marginal_prob(x, sde.sample_t(batch, generator=g)), sde.weight(t)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 65536])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--module", type=Path, nargs="*", default=[], help="further generated modules to time")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    paths = {"closed form (vp_likelihood)": ROOT / "generated/vp_likelihood.py",
             "tables (numeric)": ROOT / "generated/numeric.py"}
    paths.update({str(p): p for p in args.module})
    sdes = {}
    for i, (label, path) in enumerate(paths.items()):
        cls = load(path, f"bench_module_{i}").SDE
        start = time.perf_counter()
        sde = cls()
        built = time.perf_counter() - start
        sdes[label] = sde.to(args.device, dtype)
        print(f"{label}: constructed in {built * 1e3:.1f} ms")
    labels = list(sdes)
    print(f"\ndevice {args.device}, {args.dtype}, median of {args.repeat}; ratio = time / closed form's\n")
    for batch in args.batch:
        print(f"batch {batch}:\n")
        print("| call | " + " | ".join(f"{label} (ms) | ratio" if i else f"{label} (ms)"
                                       for i, label in enumerate(labels)) + " |")
        print("|---|" + "---:|" * (2 * len(labels) - 1))
        table = {label: calls(sde, batch, args.device, dtype) for label, sde in sdes.items()}
        for name in table[labels[0]]:
            seconds = [timed(table[label][name], args.device, args.repeat) for label in labels]
            cells = [f"{seconds[0] * 1e3:.3f}"]
            cells += [f"{s * 1e3:.3f} | {s / seconds[0]:.1f}" for s in seconds[1:]]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
