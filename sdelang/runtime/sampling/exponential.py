"""DDIM and the noise-prediction multistep DPM-Solver-2 (the data-prediction solvers are in dpmpp.py)."""
from __future__ import annotations

import torch

from .common import Samples, fixed_step, run, schedule


def exponential_integrator(sde, score_fn, shape, steps, *, order=2, spacing="logsnr", generator=None,
                           denoise=True, progress=False, x_T=None, after_step=None) -> Samples:
    """DPM-Solver for any affine SDE (Lu et al. 2022), order 1 (= DDIM) or multistep order 2.

    With y = x - c(t) the flow ODE is dy/dt = a(t) y - g^2 s / 2, and in lambda = log(m / sigma)
    = logSNR / 2 its exact solution from s to t is y_t = (m_t / m_s) y_s - m_t int e^-lambda eps(lambda),
    eps = -sigma s the noise prediction. With h = lambda_t - lambda_s and eps_hat_i = -sigma_i s(x_i, t_i):
        order 1: y_t = (m_t / m_s) y_s - sigma_t expm1(h) eps_hat_i
        order 2: minus sigma_t (expm1(h) - h) (eps_hat_i - eps_hat_{i-1}) / h_{i-1}, the integral of the
                 linear extrapolation of eps in lambda from the last two steps (no extra NFE);
                 the first step is order 1.
    Steps are uniform in logSNR by default. NFE: steps (+1).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T,
                                                 what="ddim" if order == 1 else "dpm2", kernel=True,
                                                 denoise=denoise, spacing=spacing)
    k = schedule(sde, grid, x)
    lam, sigma = k.log_snr / 2, k.v.sqrt()
    previous = None  # eps_hat of the step before, for the multistep update

    def step(x, i, t, t_next):
        nonlocal previous
        eps_hat = -sigma[i] * score(x, t)
        h = lam[i + 1] - lam[i]
        y = k.m[i + 1] / k.m[i] * (x - k.c[i]) - sigma[i + 1] * torch.expm1(h) * eps_hat
        if order == 2 and i > 0:
            slope = (eps_hat - previous) / (lam[i] - lam[i - 1])
            y = y - sigma[i + 1] * (torch.expm1(h) - h) * slope
        previous = eps_hat
        return y + k.c[i + 1]
    return run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step,
                desc=f"dpm-solver-{order}")

