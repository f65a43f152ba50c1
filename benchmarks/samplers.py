"""Sampler error against the number of score evaluations (NFE), with the exact score of Gaussian data.

Data N(mu, s^2 I) in d = 2 (mu = (1, -0.5), s = 0.5) through an example SDE: every p_t is Gaussian and
its score exact, so the only errors left are the samplers' own.

- Deterministic samplers (ddim, dpm2, dpmpp_2m, dpmpp_3m, dpmpp_3m_published, unipc, unipc_3m, deis, lms, heun,
  ode) start from exact draws x_T ~ p_T and are compared with the exact flow-ODE map
  x_eps = mean_eps + sqrt(var_eps / var_T) (x_T - mean_T): RMS distance / s.
- Stochastic samplers (em, reverse_diffusion, ancestral, pc, ald, dpmpp_2m_sde) start from exact draws of p_T; the
  figure is the relative error of the pooled sample variance, var / s^2 - 1, whose Monte Carlo standard
  error sqrt(2 / (N - 1)) is printed with each table.
Samplers run with denoise=False, so the NFE columns count the sampler's own steps; each runs with its
defaults (`sampling.default_spacing`: EDM's grid for deis, logSNR for the other exponential integrators
and ald, uniform in t for the rest), and the rows marked "logsnr" run em, ancestral and heun on a
logSNR-uniform grid. pc is one reverse-diffusion step and one Langevin step (snr 0.16) per step; ald
takes 5 Langevin steps per level. The seconds column is
the wall time of a row's runs, for orientation only (deterministic rows: 1000 samples; stochastic: n).

    python benchmarks/samplers.py [--sdes vp ve] [--n 20000] [--methods unipc_3m ode]

Prints one Markdown table per SDE (rows: methods, columns: NFE budgets) and the adaptive ODE solver's
NFE and error per tolerance (method "ode"); the tables are the ones in docs/benchmarks.md. --methods
keeps the rows of the methods named.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import sdelang
from sdelang.runtime import sampling
from sdelang.runtime.gaussian import GaussianData

MEAN, STD = (1.0, -0.5), 0.5
BUDGETS = (10, 20, 50, 100, 200, 500)
DETERMINISTIC = ("ddim", "dpm2", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms",
                 "heun")
# (method, options) per row: each sampler at its defaults, and the ones whose default grid is uniform
# in t once more on a logSNR-uniform grid.
ROWS = [("ddim", {}), ("dpm2", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_3m_published", {}), ("unipc", {}),
        ("unipc_3m", {}), ("deis", {}), ("lms", {}), ("heun", {}),
        ("heun", {"spacing": "logsnr"}), ("dpmpp_2m_sde", {}),
        ("em", {}), ("em", {"spacing": "logsnr"}), ("reverse_diffusion", {}), ("ancestral", {}),
        ("ancestral", {"spacing": "logsnr"}), ("pc", {}), ("ald", {})]
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def steps_for(method: str, nfe: int) -> int | None:
    """Steps that spend nfe score evaluations (None where the budget is out of reach)."""
    per_step = {"pc": 2, "ald": 5}.get(method, 1)
    if method == "heun":  # 2 per step, the last step 1
        return (nfe + 1) // 2 if nfe >= 1 else None
    return nfe // per_step if nfe >= per_step else None


def exact_flow(data: GaussianData, x_T: torch.Tensor) -> torch.Tensor:
    n, sde = x_T.shape[0], data.sde
    mean_T, var_T = data._moments(torch.full((n,), float(sde.T), dtype=x_T.dtype), x_T)
    mean_e, var_e = data._moments(torch.full((n,), float(sde.eps), dtype=x_T.dtype), x_T)
    return mean_e + (var_e / var_T).sqrt() * (x_T - mean_T)


def flow_error(data, x_T, out):
    return ((out.x - exact_flow(data, x_T)).pow(2).mean().sqrt() / STD).item()


def variance_error(out):
    return (out.x.var(0).mean() / STD**2 - 1).item()


def table(name: str, n_det: int, n_sto: int, methods: set[str]) -> None:
    sde = sdelang.load(f"examples/{name}.sde").double()
    data = GaussianData(sde, torch.tensor(MEAN), STD, (2,))
    generator = torch.Generator().manual_seed(0)
    x_det = data.sample(n_det, t=float(sde.T), generator=generator)
    x_sto = data.sample(n_sto, t=float(sde.T), generator=generator)
    stderr = math.sqrt(2 / (2 * n_sto - 1))

    print(f"\n### {name}\n")
    print(f"Deterministic: RMS distance to the exact flow map / s ({n_det} samples). Stochastic: relative "
          f"error of the sample variance (N = {2 * n_sto} values, Monte Carlo standard error {stderr:.4f}).\n")
    print("| method | " + " | ".join(f"NFE {b}" for b in BUDGETS) + " | seconds |")
    print("|---|" + "---:|" * (len(BUDGETS) + 1))
    for method, options in ROWS:
        if method not in methods:
            continue
        x_T = x_det if method in DETERMINISTIC else x_sto
        cells, seconds = [], 0.0
        for budget in BUDGETS:
            steps = steps_for(method, budget)
            if steps is None:
                cells.append("–")
                continue
            start = time.perf_counter()
            out = sampling.sample(sde, data.score, x_T.shape, method, steps, x_T=x_T, denoise=False,
                                  generator=torch.Generator().manual_seed(budget), **options)
            seconds += time.perf_counter() - start
            error = flow_error(data, x_T, out) if method in DETERMINISTIC else variance_error(out)
            cells.append(f"{error:.1e}" if method in DETERMINISTIC else f"{error:+.3f}")
        label = method + "".join(f", {value}" for value in options.values())
        print(f"| {label} | " + " | ".join(cells) + f" | {seconds:.1f} |")

    if "ode" not in methods:
        return
    print("\nAdaptive ODE (dopri5, rtol = atol):\n")
    print("| tolerance | NFE | RMS distance / s |")
    print("|---:|---:|---:|")
    for tol in TOLERANCES:
        out = sampling.probability_flow(sde, data.score, x_det.shape, x_T=x_det, denoise=False, rtol=tol, atol=tol)
        print(f"| {tol:.0e} | {out.nfe} | {flow_error(data, x_det, out):.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdes", nargs="*", default=["vp", "ve", "ou"], help="example names")
    parser.add_argument("--n", type=int, default=20000, help="samples for the stochastic samplers")
    parser.add_argument("--methods", nargs="*", default=[method for method, _ in ROWS] + ["ode"],
                        help="rows to run (default: all, and the adaptive ODE as 'ode')")
    args = parser.parse_args()
    # Small elementwise kernels: on a shared 2-core machine one thread is much faster than two.
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, float64, 1 thread")
    for name in args.sdes:
        table(name, n_det=1000, n_sto=args.n, methods=set(args.methods))


if __name__ == "__main__":
    main()
