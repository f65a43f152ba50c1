"""Time grids of the fixed-step samplers: steps + 1 times from T down to eps, in float64.

    time    uniform in t
    logsnr  uniform in logSNR(t) = log(m^2 / v)
    edm     Karras et al.'s (2022) rho-schedule in the noise level sigma_k = exp(-logSNR / 2), the std of
            x / m - c / m (k-diffusion's sigma): sigma_i = (sigma_max^(1/rho) + i / steps
            (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7, i.e. steps crowd towards eps
    floored uniform in w = log(sigma + SIGMA_FLOOR), sigma as for edm: uniform in logSNR where
            sigma >> 1e-3 and uniform in sigma below, where the data prediction E[x0 | x] no longer
            changes on a log scale (it is x0 + O(sigma^2) for any data of scale well above the floor). An
            SDE whose eps lies far below the floor in sigma (subvp: 1e-6) gets a few short steps there
            instead of the two fifths of a logSNR grid that it would otherwise take.

The last three need the scalar kernel's logSNR and invert it by bisection (logsnr.py). Which grid suits a
sampler was measured (docs/runtime.md): each sampler's default is in its signature.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..logsnr import log_snr_inverse

SPACINGS = ("time", "logsnr", "edm", "floored")
RHO = 7.0
# The noise level sigma (std of x / m - c / m) below which the floored grid steps uniformly in sigma;
# chosen by measurement (docs/runtime.md) for data of unit scale.
SIGMA_FLOOR = 1e-3


def floored_log_sigma(log_snr):
    """w = log(sigma + SIGMA_FLOOR), sigma = exp(-logSNR / 2), of a tensor or a numpy array (logaddexp: no
    overflow of sigma at low logSNR)."""
    lib = torch if isinstance(log_snr, torch.Tensor) else np
    return lib.logaddexp(-log_snr / 2, lib.full_like(log_snr, math.log(SIGMA_FLOOR)))


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
    elif spacing == "floored":
        lo, hi = floored_log_sigma(first), floored_log_sigma(last)
        targets = -2 * torch.log(torch.exp(lo + u * (hi - lo)) - SIGMA_FLOOR)
    else:
        # sigma^(1/rho) = exp(-logSNR / (2 rho)), linear in u.
        lo, hi = torch.exp(-first / (2 * rho)), torch.exp(-last / (2 * rho))
        targets = -2 * rho * torch.log(lo + u * (hi - lo))
    # exp(hi) - SIGMA_FLOOR may round to 0 where sigma(eps) is below SIGMA_FLOOR * 1e-16: the ends are known.
    targets[0], targets[-1] = first, last
    grid = log_snr_inverse(sde, targets)
    grid[0], grid[-1] = T, eps
    return grid
