"""The worst compile time over a generated corpus of large and pathological programs, against the bound.

Every compilation must end within sdelang.compiler.COMPILE_SECONDS of CPU time, with a module or a located
error (exit 0 or 2, never 3). This script writes programs that push each part of the compiler (the
front end's limits, thousands of definitions, helpers that grow when inlined, SDEs that SymPy cannot
integrate, coefficients with poles or sign changes inside [eps, T], general and coupled SDEs), compiles
each in a fresh process, and prints a Markdown table of CPU seconds and exit status, with the baseline
`python -m sdelang --help` (start-up and imports, no compilation) measured in the same run.

    python benchmarks/compile_bound.py [--only NAME ...]

CPU time, not wall time: on a loaded machine the wall time is larger by the load factor, the bound is not.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdelang.compiler import COMPILE_SECONDS  # noqa: E402


def corpus() -> dict[str, str]:
    programs = {
        "parentheses at the depth limit": "sde p\ndx = -x dt + sqrt(" + "(" * 95 + "2" + ")" * 95 + ") dw\n",
        "sum of 95 terms": "sde s\ndx = -x dt + sqrt(" + " + ".join(f"{k} * t^{k % 7}" for k in range(1, 96)) + ") dw\n",
        "95 minus signs": "sde m\ndx = " + "-" * 95 + "x dt + 1 dw\n",
        "sin nested 45 deep": "sde n\ndx = -x dt + sqrt(2 + " + "sin(" * 45 + "t" + ")" * 45 + ") dw\n",
        "expression 600 levels deep": "sde d\ndx = -x dt + sqrt(" + "(" * 600 + "2" + ")" * 600 + ") dw\n",
        "10,000 parameters": "sde params\n" + "".join(f"param p{i} = 1\n" for i in range(10_000))
                             + "dx = -p0 * x dt + sqrt(2 * p9999) dw\n",
        "2,000 helpers in a chain": "sde chain\nf0(t) = 1 + t\n"
                                   + "".join(f"f{k}(t) = f{k - 1}(t) + t / {k}\n" for k in range(1, 2000))
                                   + "dx = -x dt + sqrt(f1999(t)) dw\n",
        "helpers doubling in size": "sde doubling\nf0(t) = 1 + t\n"
                                    + "".join(f"f{k}(t) = sin(f{k - 1}(t)) + f{k - 1}(t)^2\n" for k in range(1, 31))
                                    + "dx = -x dt + sqrt(1 + f30(t)^2) dw\n",
        "product of 2^30 factors": "sde product\nf0(t) = 1 + t\n"
                                   + "".join(f"f{k}(t) = f{k - 1}(t) * f{k - 1}(t + 1)\n" for k in range(1, 31))
                                   + "dx = -x dt + sqrt(1 + f30(t)^2) dw\n",
        "pole inside [eps, T]": "sde pole\ndx = -x dt + 1/abs(t - 0.3) dw\n",
        "d/dt(abs(t - 0.5)) in the drift": "sde kink\ndx = -(1 + d/dt(abs(t - 0.5))) * x dt + 1 dw\n",
        "d/dt(abs(t - 0.5)) in the diffusion": "sde kink2\ndx = -x dt + sqrt(2 + d/dt(abs(t - 0.5))) dw\n",
        "diffusion t^t * exp(sin(1/t))": "sde wild\ndx = -x dt + t^t * exp(sin(1/t)) dw\n",
        "tower exp(exp(exp(t)))": "sde tower\ndx = -exp(exp(exp(t))) * x dt + sqrt(2) dw\nt in [1e-3, 1]\n",
        "sign change in 1e-4": "sde brief\ndx = -x dt + (abs(t - 0.3) - 1e-4) dw\n",
        "general SDE, degree-40 drift": "sde poly\ndx = -(" + " + ".join(f"x^{k} / {k + 1}" for k in range(1, 41, 2))
                                        + ") dt + sqrt(1 + x^2) dw\nprior normal(0, 1)\nweighting 1\n",
        "coupled SDE, 4 components": "sde c4\nparam beta = 4\n"
                                     "dx = beta * v dt\ndv = -beta * (x + u) dt + sqrt(2 * beta) dw\n"
                                     "du = beta * (v - y) dt + sqrt(beta) dw\ndy = beta * u dt\n"
                                     "v(0) ~ normal(0, 1)\nu(0) ~ normal(0, 1)\ny(0) ~ normal(0, 1)\n",
    }
    return programs


def cpu_seconds(args: list[str], cwd: Path) -> tuple[float, int, str]:
    """Child CPU seconds (user + system), exit status and the first line of standard error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-m", "sdelang", *args], cwd=cwd, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used, result.returncode, (result.stderr.splitlines() or [""])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="names (substrings) of the programs to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        baseline, _, _ = cpu_seconds(["--help"], folder)
        print(f"bound: {COMPILE_SECONDS:g} s of CPU time; baseline `sdelang --help`: {baseline:.2f} s\n")
        print("| program | CPU s | / baseline | exit | first line of the answer |")
        print("| --- | ---: | ---: | ---: | --- |")
        worst = (0.0, "")
        for name, text in corpus().items():
            if args.only and not any(o in name for o in args.only):
                continue
            path = folder / "program.sde"
            path.write_text(text)
            used, status, first = cpu_seconds(["compile", str(path), "-o", str(folder / "out")], folder)
            first = first.replace(str(path), "program.sde").replace("|", "\\|")[:110] or "compiled"
            print(f"| {name} | {used:.1f} | {used / baseline:.0f} | {status} | {first} |", flush=True)
            worst = max(worst, (used, name))
        print(f"\nworst: {worst[0]:.1f} s CPU ({worst[1]}), bound {COMPILE_SECONDS:g} s")


if __name__ == "__main__":
    main()
