"""Flow-ODE likelihood at equal accuracy: evaluations (NFE) each solver needs to reach the error of log p that
score_sde's RK45 reaches.

A solver's tolerance is only a request: two solvers at the same rtol = atol reach different errors (the
default "balanced" norm holds log p to the tolerance, scipy's one RMS over [x, log p] lets it reach
sqrt(d + 1) times it). So both are swept over tolerances (half decades, 1e-2 .. 1e-6) and compared on the
work-precision plane: at the errors the baseline reaches at rtol = atol = 1e-3, 1e-4 and 1e-5, the evaluations
each sweep needs to reach them (at_error: interpolated along the sweep's front in log error), the baseline's own
sweep included, so that each is read off its front alike (a single solve lands above or below its front by
chance: on a trained model the error at a given tolerance varies by a factor of two between probes). The error is the mean
over the batch of |log p - reference| in nats (what the bits/dim of a batch carry), the reference dopri8 at
1e-10 with the same Rademacher probe (benchmarks/likelihood_norms.py, where the Gaussian references are checked
against the closed form).

Cases as likelihood_norms.py: VP / VE / subVP with the exact score of Gaussian data and a random MLP, d = 2 and
64, 64 points; with --runs, score models trained on moons, 256 held-out points.

    python benchmarks/likelihood_work.py [--runs RUN_DIR ...] [--sdes vp ve subvp] [--models gaussian mlp]
                                         [--solvers dopri5:balanced rk45_pi:balanced rk45:shared] [--seed S]
                                         [--threads N]

Prints one Markdown row per case and baseline tolerance: the baseline's NFE and error, its front's NFE at that
error, then each sdelang solver's ("-" if no point of its sweep reaches it), and a summary line of the totals
over the cells every solver reached. rk45 with the shared norm is the baseline's solver (tests/test_ode.py): its
column checks the method, and should total close to the baseline's front.
"""
from __future__ import annotations

import argparse
import math

import torch

from likelihood import baseline_log_likelihood
from likelihood_norms import REFERENCE, SEED, cases
from sdelang.runtime.likelihood import log_likelihood

SWEEP = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
BASELINE_TOLS = (1e-3, 1e-4, 1e-5)


def at_error(points, error: float) -> float | None:
    """The NFE at which a solver's sweep reaches `error`: on its work-precision front (the points, by NFE, that
    lower the error), linear in log(error) between the last point above it and the first at or below it; the
    first point's NFE if that already reaches it; None if no point does. Solvers differ by a factor in error
    at equal NFE, which this measures; a sweep point that happens to land just above the target would
    otherwise count the next half decade's evaluations (the baseline against a copy of itself: +12 %)."""
    front = []
    for nfe, err, _ in sorted(points):
        if not front or err < front[-1][1]:
            front.append((nfe, err))
    for k, (nfe, err) in enumerate(front):
        if err <= error:
            if k == 0:
                return float(nfe)
            (n0, e0), (n1, e1) = front[k - 1], (nfe, err)
            return n0 + (n1 - n0) * math.log(e0 / error) / math.log(e0 / e1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], help="run directories of trained score models")
    parser.add_argument("--sdes", nargs="*", default=["vp", "ve", "subvp"], help="examples for the synthetic cases")
    parser.add_argument("--models", nargs="*", default=["gaussian", "mlp"], help="synthetic cases: gaussian, mlp")
    parser.add_argument("--solvers", nargs="+", default=["dopri5:balanced", "rk45_pi:balanced", "rk45:shared"],
                        help="sdelang's solvers as METHOD:NORM")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the Rademacher probe")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    solvers = [tuple(s.split(":")) for s in args.solvers]

    print(f"NFE at the baseline's errors (mean |log p - reference|, nats), probe seed {args.seed}; "
          f"sweep {', '.join(map(str, SWEEP))}\n")
    print("| SDE | model | d | RK45 tol | RK45 NFE: error | RK45's front | "
          + " | ".join(f"{m}, {n}" for m, n in solvers) + " |")
    print("|---|---|---:|---:|---|---:|" + "---:|" * len(solvers))
    totals = {"front": 0, **{s: 0 for s in solvers}}
    for name, model, d, sde, score, x, _ in cases(args.runs, args.sdes, args.models):
        def ours(**options):
            return log_likelihood(sde, score, x, generator=torch.Generator().manual_seed(args.seed), **options)
        reference = ours(**REFERENCE).logp
        probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(args.seed)).to(x) * 2 - 1

        def error_of(logp):
            return float((logp - reference).abs().mean())
        baseline = {}
        for tol in SWEEP:
            logp, nfe = baseline_log_likelihood(sde, score, x, probe, tol, tol)
            baseline[tol] = (nfe, error_of(logp), tol)
        sweeps = {}
        for method, norm in solvers:
            sweeps[(method, norm)] = [(solve.nfe, error_of(solve.logp), tol) for tol in SWEEP
                                      for solve in [ours(rtol=tol, atol=tol, method=method, norm=norm)]]
        for tol in BASELINE_TOLS:
            nfe, error, _ = baseline[tol]
            front = at_error(list(baseline.values()), error)
            reached = {solver: at_error(points, error) for solver, points in sweeps.items()}
            if all(v is not None for v in reached.values()):
                totals["front"] += front
                for solver, value in reached.items():
                    totals[solver] += value
            cells = [f"{v:.0f}" if v is not None else "-" for v in reached.values()]
            print(f"| {name} | {model} | {d} | {tol:g} | {nfe}: {error:.1e} | {front:.0f} | " + " | ".join(cells) + " |",
                  flush=True)
    print(f"\ntotal NFE over the cells every solver reached: RK45's front {totals['front']:.0f}, "
          + ", ".join(f"{m}, {n} {totals[(m, n)]:.0f}" for m, n in solvers))


if __name__ == "__main__":
    main()
