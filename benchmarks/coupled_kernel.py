"""Coupled kernels: per-call time and accuracy of the generated numeric path against Van Loan's block exponential.

For K = 2 (examples/cld.sde), 3 (a third-order chain) and 4 (a fourth-order chain on [1e-5, 10]) the script
compiles the program (recording the compile's CPU time in a fresh process), builds the float64 module and times, per
call on a batch of times in [eps, T]:

    transition   the module's Phi(r), Q(r) (Taylor series and doubling, fixed elementwise sums)
    van loan     the baseline: torch.linalg.matrix_exp of the 2K x 2K Van Loan block, Q = E12 Phi^T
    weight       the module's hybrid-score weight (kernel, square-root factor, triangular solves)

and prints the ratio transition / van loan, with the largest error of Sigma(eps), Sigma(T) (entrywise on the scale
sqrt(S_ii S_jj)) of each method against mpmath (60 digits).

    python benchmarks/coupled_kernel.py [--batch 256] [--repeat 50]
"""
from __future__ import annotations

import argparse
import importlib.util
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mpmath
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

CHAIN3 = """\
sde chain3
param beta = 2
param gamma = 3
dx = beta * v dt
dv = (-beta * x + beta * a) dt
da = (-2 * beta * v - gamma * beta * a) dt + sqrt(2 * gamma * beta) dw
v(0) ~ normal(0, 0.1)
a(0) ~ normal(0, 0.1)
t in [1e-5, 1]
t ~ importance
"""

CHAIN4 = """\
sde chain4
param beta = 2
param gamma = 2
dx = beta * v dt
dv = (-beta * x + beta * a) dt
da = (-beta * v + beta * j) dt
dj = (-beta * a - gamma * beta * j) dt + sqrt(2 * gamma * beta) dw
v(0) ~ normal(0, 0.1)
a(0) ~ normal(0, 0.1)
j(0) ~ normal(0, 0.1)
t in [1e-5, 10]
weighting likelihood
t ~ importance
"""


def compile_cpu(source: Path, out: Path) -> float:
    """CPU seconds of `python -m sdelang compile source -o out` in a fresh process (children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "sdelang", "compile", str(source), "-o", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def van_loan(sde, r):
    k = sde.F0.shape[0]
    block = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
    block[:k, :k], block[:k, k:], block[k:, k:] = sde.F0, sde.D0, -sde.F0.T
    E = torch.linalg.matrix_exp(block * r[:, None, None])
    Phi = E[:, :k, :k]
    return Phi, E[:, :k, k:] @ Phi.transpose(1, 2)


def sigma_truth(sde, r):
    """Sigma at r from mpmath: Van Loan's block at r / 2^k, k doublings, 60 digits."""
    F0, D0, S0 = (m.numpy() for m in (sde.F0, sde.D0, sde.Sigma0))
    K = F0.shape[0]
    k = max(0, int(np.ceil(np.log2(max(np.abs(F0).sum(1).max() * r, 1e-300)))))
    with mpmath.workdps(60):
        block = mpmath.zeros(2 * K, 2 * K)
        for i in range(K):
            for j in range(K):
                block[i, j], block[i, j + K], block[i + K, j + K] = F0[i, j] * r, D0[i, j] * r, -F0[j, i] * r
        X = mpmath.expm(block / 2**k)
        Phi, Q = X[0:K, 0:K], X[0:K, K:2 * K] * X[0:K, 0:K].T
        for _ in range(k):
            Q, Phi = Q + Phi * Q * Phi.T, Phi * Phi
        S = Phi * mpmath.matrix(S0.tolist()) * Phi.T + Q
        return np.array([[float(S[i, j]) for j in range(K)] for i in range(K)])


def error(S, S_ref):
    d = np.sqrt(np.abs(np.diag(S_ref)))
    return float(np.max(np.abs(S - S_ref) / np.outer(d, d)))


def per_call(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "chain3.sde").write_text(CHAIN3)
        (tmp / "chain4.sde").write_text(CHAIN4)
        programs = [("cld", ROOT / "examples" / "cld.sde"), ("chain3", tmp / "chain3.sde"),
                    ("chain4", tmp / "chain4.sde")]
        print("| program | K | compile CPU (s) | transition (ms) | van loan (ms) | ratio | weight (ms) "
              "| Sigma error, series (eps, T) | Sigma error, van loan (eps, T) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---|")
        for name, source in programs:
            cpu = compile_cpu(source, tmp / "out")
            sde = load(tmp / "out" / f"{name}.py").SDE().double()
            K = len(sde.components)
            t = torch.exp(torch.linspace(np.log(sde.eps), np.log(sde.T), args.batch, dtype=torch.float64))
            r = sde.time_change(t)
            ours = per_call(lambda: sde.transition(r), args.repeat)
            base = per_call(lambda: van_loan(sde, r), args.repeat)
            weight = per_call(lambda: sde.weight(t), args.repeat)
            ends = torch.tensor([sde.eps, sde.T], dtype=torch.float64)
            r_ends = sde.time_change(ends)
            S_ours = sde.kernel(ends)[1].numpy()
            Phi_vl, Q_vl = van_loan(sde, r_ends)
            S_vl = (Phi_vl @ sde.Sigma0 @ Phi_vl.transpose(1, 2) + Q_vl).numpy()
            truth = [sigma_truth(sde, float(x)) for x in r_ends]
            e_ours = ", ".join(f"{error(S_ours[i], truth[i]):.1e}" for i in range(2))
            e_vl = ", ".join(f"{error(S_vl[i], truth[i]):.1e}" for i in range(2))
            print(f"| {name} | {K} | {cpu:.2f} | {ours * 1e3:.2f} | {base * 1e3:.2f} | {ours / base:.2f} "
                  f"| {weight * 1e3:.2f} | {e_ours} | {e_vl} |")


if __name__ == "__main__":
    main()
