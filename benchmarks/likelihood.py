"""Flow-ODE log-likelihood: sdelang.runtime.likelihood.log_likelihood against a score_sde-style baseline.

The baseline follows the path of score_sde's likelihood.py (written here from its description):
scipy.integrate.solve_ivp(method="RK45") on the flattened state [x, accumulated divergence], with a
numpy round trip at every evaluation, and the flow drift f - g^2 s / 2 evaluated twice per
evaluation: once for the drift, once more inside the Hutchinson estimate (autograd through the whole
drift). sdelang integrates with its default solver (rk45_pi: the same pair, PI step control) on the tensors'
device, takes div f from the module and differentiates only the score: one score call per evaluation.

Both run the same Dormand-Prince 5(4) pair at the same rtol = atol = 1e-5, on the same data, with the
same model, and with the same Rademacher probe (drawn as log_likelihood draws it from the same seed),
so they estimate the same quantity: their bits/dim differ by solver error only, shown against the
Hutchinson standard error of the batch mean (from a 4-probe run) for scale. Models: the exact score
of Gaussian data (where Rademacher probes are exact; the analytic bits/dim of p_eps is shown too) and
an MLP score network with random weights, in d = 2 and d = 64, on the VP SDE.

    python benchmarks/likelihood.py [--batch 64] [--repeat 3] [--threads N]

Prints a Markdown table; times are the fastest of the interleaved repeats, "speed-up" is baseline time / sdelang
time from the same run, and "per NFE" the same ratio per drift evaluation. NFE may differ: the step
controllers differ (PI against scipy's), and the norm that combines x's error with the divergence
integral's is sdelang's default ("balanced", the RMS of the two mean squares) where solve_ivp takes one
RMS over [x, divergence], in which the likelihood is 1 entry in d + 1. benchmarks/likelihood_norms.py
compares the norms and solvers at equal tolerance, benchmarks/likelihood_work.py at equal accuracy.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from pathlib import Path

import numpy as np
import scipy.integrate
import torch

import sdelang
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.likelihood import bits_per_dim, log_likelihood

ROOT = Path(__file__).resolve().parents[1]
RTOL = ATOL = 1e-5
SEED = 0


def baseline_log_likelihood(sde, score_fn, x: torch.Tensor, probe: torch.Tensor, rtol: float, atol: float):
    """score_sde's path: solve_ivp RK45 over numpy, two drift evaluations per step. Returns (logp, nfe)."""
    batch, shape = x.shape[0], x.shape

    def flow_drift(y, t):
        f, g = sde.sde(y, t)
        return f - sde._expand(0.5 * g**2, y) * score_fn(y, t)

    def divergence(y, t):
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad((flow_drift(y, t) * probe).sum(), y)
        return (grad * probe).flatten(1).sum(1)

    def ode(t, state):
        y = torch.from_numpy(state[:-batch].reshape(shape)).to(x)
        tb = torch.full((batch,), t, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            drift = flow_drift(y, tb)
        return np.concatenate([drift.cpu().numpy().reshape(-1), divergence(y, tb).cpu().numpy()])

    start = np.concatenate([x.cpu().numpy().reshape(-1), np.zeros(batch)])
    solution = scipy.integrate.solve_ivp(ode, (sde.eps, sde.T), start, rtol=rtol, atol=atol, method="RK45")
    end = solution.y[:, -1]
    x_T = torch.from_numpy(end[:-batch].reshape(shape)).to(x)
    return sde.prior_logp(x_T) + torch.from_numpy(end[-batch:]).to(x), solution.nfev


def mlp_score(d: int, hidden: int = 256) -> torch.nn.Module:
    """A small score network (x, t) -> R^d with random weights, as an untrained model would have."""
    torch.manual_seed(SEED)
    net = torch.nn.Sequential(torch.nn.Linear(d + 1, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.SiLU(), torch.nn.Linear(hidden, d)).double()

    def score(x, t):
        return net(torch.cat([x, t[:, None]], 1))
    return score


def timed_pair(first, second, repeat: int):
    """Fastest of `repeat` interleaved calls of each: (seconds, result) for first and for second.

    Interleaving exposes both to the same background load; the minimum is the run least disturbed by
    it (the timeit module's advice), which matters on a shared machine.
    """
    runs = {first: [], second: []}
    for _ in range(repeat):
        for fn in (first, second):
            start = time.perf_counter()
            result = fn()
            runs[fn].append((time.perf_counter() - start, result))
    return [min(runs[fn], key=lambda run: run[0]) for fn in (first, second)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1024], help="datapoints per solve")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    sde = sdelang.load(ROOT / "examples" / "vp.sde").double()
    print(f"VP SDE, rtol = atol = {RTOL:g}, float64, CPU ({torch.get_num_threads()} threads), "
          f"fastest of {args.repeat}\n")
    print("| model | d | batch | baseline NFE | sdelang NFE | baseline (s) | sdelang (s) | speed-up | per NFE | "
          "baseline bpd | sdelang bpd | Hutchinson stderr | analytic bpd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, d in itertools.product(args.batch, (2, 64)):
        data = GaussianData(sde, 0.5, 0.5, (d,))
        x = data.sample(batch, generator=torch.Generator().manual_seed(SEED))
        eps = torch.full((batch,), sde.eps, dtype=torch.float64)
        for model, score, exact in (("Gaussian exact score", data.score, True),
                                    ("MLP 2x256, random", mlp_score(d), False)):
            # log_likelihood's probe for probes=1 is this draw from a generator seeded alike.
            probe = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(SEED)).to(x) * 2 - 1
            (base_s, (base_logp, base_nfe)), (ours_s, ours) = timed_pair(
                lambda: baseline_log_likelihood(sde, score, x, probe, RTOL, ATOL),
                lambda: log_likelihood(sde, score, x, rtol=RTOL, atol=ATOL,
                                       generator=torch.Generator().manual_seed(SEED)),
                args.repeat)
            # Spread of one probe's estimate, from 4 probes: sd = stderr * sqrt(4) per datapoint.
            spread = log_likelihood(sde, score, x, probes=4, rtol=RTOL, atol=ATOL,
                                    generator=torch.Generator().manual_seed(SEED + 1)).stderr * 2
            batch_stderr = spread.pow(2).mean().sqrt() / math.sqrt(batch) / (d * math.log(2))
            analytic = (f"{bits_per_dim(data.log_prob(x, eps), d, levels=None).mean():.5f}"
                        if exact else "-")
            per_nfe = (base_s / base_nfe) / (ours_s / ours.nfe)
            print(f"| {model} | {d} | {batch} | {base_nfe} | {ours.nfe} | {base_s:.3f} | {ours_s:.3f} | "
                  f"{base_s / ours_s:.1f} | {per_nfe:.1f} | {bits_per_dim(base_logp, d, levels=None).mean():.5f} | "
                  f"{bits_per_dim(ours.logp, d, levels=None).mean():.5f} | {batch_stderr:.1e} | {analytic} |")
    print("\nbpd: bits per dimension of continuous x (levels=None), batch mean. Hutchinson stderr: standard "
          "error of that mean over probes (0 for the Gaussian score, whose Jacobian is a multiple of I). "
          "analytic: log p_eps of the data, which the model misses by its prior's mismatch with p_T.")


if __name__ == "__main__":
    main()
