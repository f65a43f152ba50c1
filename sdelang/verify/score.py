"""Hybrid score matching (coupled SDEs, MATH.md section 6): noise_to_score() against the kernel's score, and
the identity that makes the likelihood-weighted loss's expected weight equal weight(t).

    hybrid_score  noise_to_score(z) = grad log p_0t(u_t | x0) at the noisy components (0 elsewhere), exactly;
                  E_e[ sum_k g_k^2 noise_to_score(e)_k^2 ] = weight(t) for e ~ N(0, I), by Monte Carlo
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import (IDENTITY_BOUND, NA, STANDARD_ERRORS, CheckResult, Comparison, Settings, check_grid, column,
                     comparison_times, components, inversion_rounding, worst_row)


def hybrid_score(sde, settings: Settings) -> list[CheckResult]:
    return [kernel_score(sde, settings), weight_identity(sde, settings)]


def score_map(Sigma: torch.Tensor, noisy: list[bool]) -> torch.Tensor:
    """M [n, |N|, K] with grad_N log N(y; 0, Sigma) = -M y for the noisy components N, through their conditional
    law given the others O: M = Sigma_c^-1 [I at N, -Sigma_NO Sigma_OO^-1 at O], Sigma_c = Sigma_NN -
    Sigma_NO Sigma_OO^-1 Sigma_ON (equal to the rows N of Sigma^-1, but without solving with the whole of
    Sigma, which near t = 0 is ill-conditioned: the data component's variance starts at 0)."""
    N = [k for k, is_noisy in enumerate(noisy) if is_noisy]
    O = [k for k, is_noisy in enumerate(noisy) if not is_noisy]
    n, K = Sigma.shape[0], Sigma.shape[-1]
    rows = torch.zeros(n, len(N), K, dtype=Sigma.dtype, device=Sigma.device)
    rows[:, :, N] = torch.eye(len(N), dtype=Sigma.dtype, device=Sigma.device)
    S_c = Sigma[:, N][:, :, N]
    if O:
        S_NO = Sigma[:, N][:, :, O]
        regression = torch.linalg.solve(Sigma[:, O][:, :, O], S_NO.transpose(1, 2)).transpose(1, 2)
        rows[:, :, O] = -regression
        S_c = S_c - regression @ S_NO.transpose(1, 2)
    return torch.linalg.solve(S_c, rows)


def kernel_score(sde, settings: Settings) -> CheckResult:
    """For u_t = perturb(x0, t, z) at the check times (x0 from -2 to 3, z ~ N(0, I)): noise_to_score(z, t)
    equals the kernel's score -M (u_t - mean) of marginal_prob(x0, t) at the noisy components (score_map),
    and is exactly 0 at the others. Tolerance, relative to the score's largest entry: 1e-9 + the rounding of
    u_t - mean carried through M, |M| 4 eps (|u_t| + |mean|) (u_t = mean + A z and the difference each round
    once; with |mean| >> sqrt(Sigma) near t = 0 this is the larger term), and the rounding of M itself, which
    comes from a float64 Sigma: inversion_rounding(Sigma) |M| |u_t - mean|."""
    t = check_grid(sde)
    n, K = t.shape[0], components(sde)
    like = sde._anchor
    x0 = column(np.linspace(-2.0, 3.0, n), like)[:, None]
    z = torch.randn(n, K, generator=settings.generator(like.device, 6), dtype=like.dtype, device=like.device)
    u = sde.perturb(x0, t, z).double()
    mean, Sigma = (q.double() for q in sde.marginal_prob(x0, t))
    M = score_map(Sigma, list(sde.noisy))
    exact = -(M @ (u - mean)[..., None])[..., 0]
    rounding = (M.abs() @ (4 * torch.finfo(torch.float64).eps * (u.abs() + mean.abs()))[..., None])[..., 0]
    score = sde.noise_to_score(z, t).double()
    noisy = torch.as_tensor(sde.noisy, device=like.device)
    size = exact.abs().amax(-1)
    error = (score[:, noisy] - exact).abs().amax(-1) / size
    # M from a rounded Sigma carries inversion_rounding(Sigma) relative error, on the scale |M| |u_t - mean|.
    carried = inversion_rounding(Sigma) * (M.abs() @ (u - mean).abs()[..., None])[..., 0].amax(-1)
    bound = IDENTITY_BOUND + (rounding.amax(-1) + carried) / size
    leak = score[:, ~noisy].abs().amax(-1) if not bool(noisy.all()) else torch.zeros(n, dtype=torch.float64)
    comparisons = [Comparison(float(error[i]), float(bound[i]), f"noisy components at t = {float(t[i]):.4g}")
                   for i in range(n)]
    comparisons += [Comparison(float(leak[i]), 0.0, f"noiseless components at t = {float(t[i]):.4g} (must be 0)")
                    for i in range(n)]
    return worst_row("noise_to_score = kernel score", comparisons,
                     f"u_t = perturb(x0, t, z), relative difference at {n} times (noiseless components: absolute)")


def weight_identity(sde, settings: Settings) -> CheckResult:
    """E_e[ sum_k g_k^2 noise_to_score(e, t)_k^2 ] = weight(t), e ~ N(0, I): the expected likelihood-weighted
    loss per unit noise error, which the importance density of t is proportional to. Monte Carlo with
    --paths draws at each comparison time; tolerance 5 standard errors of the sample mean. Only for the
    likelihood weighting (score_matching's weight is 1: its loss is 1/2 |eps_N - z_N|^2)."""
    name = "E[g^2 noise_to_score^2] = weight"
    if sde.weighting != "likelihood":
        return CheckResult(name, NA, note=f"weighting {sde.weighting}: weight(t) = 1, not the likelihood-weighted "
                                          f"loss's expected weight")
    like, n = sde._anchor, settings.paths
    generator = settings.generator(like.device, 5)
    comparisons = []
    for t in comparison_times(sde, 0.0):
        # The n draws as n data entries of one state [1, K n]: the kernel is factorised once, not n times.
        at = torch.full((1,), t, dtype=like.dtype, device=like.device)
        e = torch.randn(1, components(sde) * n, generator=generator, dtype=like.dtype, device=like.device)
        _, g = sde.sde(e, at)
        terms = sum(sde.split(g**2 * sde.noise_to_score(e, at) ** 2))[0].double()
        estimate, weight = float(terms.mean()), float(sde.weight(at))
        se = float(terms.std()) / math.sqrt(n)
        comparisons.append(Comparison(abs(estimate - weight), STANDARD_ERRORS * se,
                                      f"t = {t:.4g} (MC {estimate:.6g}, weight {weight:.6g})"))
    return worst_row(name, comparisons, f"{n} draws of e ~ N(0, I) per time, 5 SE")
