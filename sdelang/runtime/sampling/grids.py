"""Time grids of the fixed-step samplers: steps + 1 times from T down to eps, in float64.

    time    uniform in t
    logsnr  uniform in logSNR(t) = log(m^2 / v)
    edm     Karras et al.'s (2022) rho-schedule in the noise level sigma_k = exp(-logSNR / 2), the std of
            x / m - c / m (k-diffusion's sigma): sigma_i = (sigma_max^(1/rho) + i / steps
            (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7, i.e. steps crowd towards eps

The last two need the scalar kernel's logSNR and invert it by bisection (logsnr.py). Which grid suits a
sampler was measured (docs/runtime.md): each sampler's default is in its signature.
"""
from __future__ import annotations

import torch

from ..logsnr import log_snr_inverse

SPACINGS = ("time", "logsnr", "edm")
RHO = 7.0


def time_grid(sde, steps: int, spacing: str, device, rho: float = RHO) -> torch.Tensor:
    """steps + 1 float64 times from T down to eps (both ends exact) with the given spacing."""
    eps, T = float(sde.eps), float(sde.T)
    if spacing == "time":
        return torch.linspace(T, eps, steps + 1, dtype=torch.float64, device=device)
    ends = torch.tensor([T, eps], dtype=torch.float64, device=device)
    first, last = sde.log_snr(ends)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    if spacing == "logsnr":
        targets = first + u * (last - first)
    else:
        # sigma^(1/rho) = exp(-logSNR / (2 rho)), linear in u.
        lo, hi = torch.exp(-first / (2 * rho)), torch.exp(-last / (2 * rho))
        targets = -2 * rho * torch.log(lo + u * (hi - lo))
    grid = log_snr_inverse(sde, targets)
    grid[0], grid[-1] = T, eps
    return grid
