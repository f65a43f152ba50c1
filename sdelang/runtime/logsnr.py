"""Times spaced uniformly in logSNR: the inverse of a compiled SDE's logSNR(t), by bisection.

logSNR = log(m^2 / v) decreases monotonically on [eps, T], so t = logSNR^-1(y) is found by bisection,
all targets at once. Used where no closed-form inverse is at hand whatever the .sde file says: the
samplers' logSNR grids and the likelihood bound's importance-sampled times.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

BISECTION_STEPS = 64


def log_snr_inverse(sde, target: Tensor) -> Tensor:
    """t in [eps, T] with logSNR(t) = target (float64), by vectorised bisection.

    logSNR decreases in t, so where logSNR(mid) > target the root lies above mid. Bisecting log t
    rather than t resolves times near eps to full relative precision; the fixed step count keeps
    the loop free of host-device synchronisation.
    """
    lo = torch.full_like(target, math.log(float(sde.eps)))
    hi = torch.full_like(target, math.log(float(sde.T)))
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = sde.log_snr(mid.exp()) > target
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (0.5 * (lo + hi)).exp().clamp(float(sde.eps), float(sde.T))


def log_snr_times(sde, u: Tensor) -> Tensor:
    """t = logSNR^-1(logSNR(eps) - u (logSNR(eps) - logSNR(T))) for u in [0, 1] (float64): u = 0 is eps,
    u = 1 is T, and u ~ U(0, 1) draws t with density g^2 / (v (logSNR(eps) - logSNR(T)))."""
    ends = torch.tensor([float(sde.eps), float(sde.T)], dtype=torch.float64, device=u.device)
    log_snr_eps, log_snr_T = sde.log_snr(ends)
    return log_snr_inverse(sde, log_snr_eps - u * (log_snr_eps - log_snr_T))
