"""Flow-ODE likelihood: evaluations (NFE) and error of log p for each solver under each step-error norm, against RK45.

The state (x, accumulated divergence) is a pair of tensors, and the step-error norm decides how
their errors, each divided by atol + rtol |y|, combine into the number held below 1
(sdelang.runtime.ode.NORMS):
- max: the larger of the two RMS (torchdiffeq's default);
- shared: one RMS over every entry, as scipy's solve_ivp on the concatenated state;
- balanced: the RMS of the two mean squares, so log p's RMS error stays within sqrt(2) of the tolerance
  however many entries x has.
The solvers (--methods): torchdiffeq's dopri5, and sdelang's rk45 (the same Dormand-Prince pair with scipy
RK45's step control; sdelang.runtime.ode.rk45). The baseline is score_sde's path, scipy RK45
(benchmarks/likelihood.py). Every solve of a case uses the
same Rademacher probe, so all estimate the same quantity; the reference is dopri8 at rtol = atol =
1e-10 (max norm) with that probe, and each row gives |log p - reference| over the batch (mean and max,
nats). For the Gaussian cases the reference is checked against the closed form of the model density,
prior(Phi(x)) (S_T / S_eps)^(d/2), Phi the flow map (tests/test_likelihood.py, test_model_prior_density).

Cases, VP / VE / subVP (examples/vp.sde, ve.sde, subvp.sde), float64, 64 points, d = 2 and 64: the exact
score of Gaussian data N(0.5, 0.5^2 I); a random MLP of (x, t) (benchmarks/likelihood.py; not on VE, where
g^2 / 2 up to 2e4 times its raw output makes the flow blow up); sdelang's score model as `sdelang train`
builds it, untrained (input scaling, Gaussian part, random network). With --runs: score models trained on
moons (`sdelang train examples/vp_likelihood.sde --data moons --steps 2000 --out RUN`, and ve.sde,
subvp.sde), 256 held-out points.

    python benchmarks/likelihood_norms.py [--runs RUN_DIR ...] [--sdes vp ve subvp] [--models gaussian mlp untrained]
                                          [--tol 1e-5 1e-4 1e-3] [--methods dopri5 rk45] [--seeds K] [--threads N]

Prints a Markdown table; each solver cell is "NFE: mean / max |error|". With --seeds K, each cell is the NFE
summed over K further probes (seeds 1..K), without a reference: how much of an NFE difference is the
step sequence's chance.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sdelang
from likelihood import baseline_log_likelihood, mlp_score
from sdelang.runtime.config import ModelConfig
from sdelang.runtime.data import load_data
from sdelang.runtime.evaluate import held_out
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.likelihood import log_likelihood
from sdelang.runtime.models import build_model
from sdelang.runtime.ode import NORMS
from sdelang.runtime.training import load_run

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
REFERENCE = dict(method="dopri8", rtol=1e-10, atol=1e-10, norm="max")


def closed_form(sde, data: GaussianData, x: torch.Tensor) -> torch.Tensor:
    """log prior(Phi(x)) + d/2 log(S_T / S_eps): the model density of Gaussian data's exact score."""
    def moments(t):
        tb = torch.full((x.shape[0],), t, dtype=x.dtype)
        m, c = sde.mean_coeff(tb)[:, None], sde.mean_offset(tb)[:, None]
        return m * data.mean.to(x) + c, m**2 * data.std**2 + sde.std(tb)[:, None] ** 2
    mean_eps, S_eps = moments(float(sde.eps))
    mean_T, S_T = moments(float(sde.T))
    ratio = S_T / S_eps
    return sde.prior_logp(mean_T + ratio.sqrt() * (x - mean_eps)) + 0.5 * x.shape[1] * ratio[:, 0].log()


def cases(runs: list[str], sdes: list[str], models: list[str]):
    """(SDE name, model, d, sde, score, x, closed-form log p or None) for each case."""
    for name in sdes:
        sde = sdelang.load(ROOT / "examples" / f"{name}.sde").double()
        for d in (2, 64):
            data = GaussianData(sde, 0.5, 0.5, (d,))
            x = data.sample(64, generator=torch.Generator().manual_seed(SEED))
            if "gaussian" in models:
                yield name, "Gaussian exact score", d, sde, data.score, x, closed_form(sde, data, x)
            if "mlp" in models and name != "ve":    # g^2 / 2 (up to 2e4 on VE) times its raw output blows up
                yield name, "MLP 2x256, random", d, sde, mlp_score(d), x, None
            if "untrained" in models:
                torch.manual_seed(SEED)
                untrained = build_model(sde, (d,), ModelConfig()).double().eval().requires_grad_(False)
                yield name, "ScoreModel, untrained", d, sde, untrained, x, None
    for run_dir in runs:
        run = load_run(run_dir, device="cpu")
        model = run.model.double()
        x = held_out(load_data(run.config.data, split="test"), 256, torch.Generator().manual_seed(SEED)).double()
        yield Path(run.config.sde_name).stem, f"{run.config.data}, trained {run.step} steps", x.shape[1], model.sde, \
            model, x, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], help="run directories of trained score models")
    parser.add_argument("--sdes", nargs="*", default=["vp", "ve", "subvp"], help="examples for the synthetic cases")
    parser.add_argument("--models", nargs="*", default=["gaussian", "mlp", "untrained"],
                        help="synthetic cases: gaussian, mlp, untrained")
    parser.add_argument("--seeds", type=int, default=0,
                        help="instead: NFE alone (no reference), summed over probe seeds 1..SEEDS")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3], help="rtol = atol")
    parser.add_argument("--methods", nargs="+", default=["dopri5", "rk45"], help="sdelang's solvers to compare")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    columns = [(method, norm) for method in args.methods for norm in NORMS]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"{', '.join(args.methods)} per norm against scipy RK45; float64, CPU; reference {REFERENCE['method']} at "
          f"{REFERENCE['rtol']:g}; cells: NFE: mean / max |log p - reference| (nats)\n")
    print("| SDE | model | d | points | tol | reference NFE | RK45 | "
          + " | ".join(f"{m}, {n}" for m, n in columns) + " |")
    print("|---|---|---:|---:|---:|---:|---|" + "---|" * len(columns))
    for name, model, d, sde, score, x, exact in cases(args.runs, args.sdes, args.models):
        def ours(seed=SEED, **options):
            return log_likelihood(sde, score, x, generator=torch.Generator().manual_seed(seed), **options)
        if args.seeds:
            for tol in args.tol:
                totals = [0] * (1 + len(columns))
                for seed in range(1, args.seeds + 1):
                    probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(seed)).to(x) * 2 - 1
                    totals[0] += baseline_log_likelihood(sde, score, x, probe, tol, tol)[1]
                    for k, (method, norm) in enumerate(columns):
                        totals[1 + k] += ours(seed, rtol=tol, atol=tol, method=method, norm=norm).nfe
                print(f"| {name} | {model} | {d} | {x.shape[0]} | {tol:g} | seeds 1-{args.seeds} | "
                      + " | ".join(map(str, totals)) + " |", flush=True)
            continue
        # log_likelihood's probe for probes=1 is this draw from a generator seeded alike.
        probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(SEED)).to(x) * 2 - 1
        reference = ours(**REFERENCE)
        ref_note = ""
        if exact is not None:
            ref_note = f" (closed form within {float((reference.logp - exact).abs().max()):.0e})"

        def cell(logp, nfe):
            error = (logp - reference.logp).abs()
            return f"{nfe}: {float(error.mean()):.1e} / {float(error.max()):.1e}"
        for tol in args.tol:
            rk45 = cell(*baseline_log_likelihood(sde, score, x, probe, tol, tol))
            solves = [ours(rtol=tol, atol=tol, method=method, norm=norm) for method, norm in columns]
            norms = [cell(solve.logp, solve.nfe) for solve in solves]
            print(f"| {name} | {model} | {d} | {x.shape[0]} | {tol:g} | {reference.nfe}{ref_note} | {rk45} | "
                  + " | ".join(norms) + " |", flush=True)


if __name__ == "__main__":
    main()
