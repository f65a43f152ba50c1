"""float32 against float64: a float32 copy of the module against the float64 one at the same times, near eps
and across [eps, T] (MATH.md section 1: 1 - exp(-B) and the like lose every digit in float32 near t = 0).

    float32_precision  each kind's functions of t within 1e-4 relative (logSNR: absolute); coupled modules
                       also noise_to_score, marginal_prob's mean and covariance, and prior_logp
"""
from __future__ import annotations

import copy
import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from .common import FLOAT32_BOUND, CheckResult, Comparison, Settings, components, kind_of, times, worst_row

FLOAT32_UNIT = torch.finfo(torch.float32).eps   # 2^-23, the spacing of float32 numbers relative to their size


def _relative(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """|low - high| / |high| per time (the largest over any trailing entries); 0 where they agree exactly. Below
    float32's smallest normal number a value cannot be held to a relative error in float32 at all (m = e^-109 of an
    OU process at 100 times its rate underflows to 0): there the error is taken against that number instead."""
    error = (low - high).abs()
    scale = high.abs().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(error == 0, error, error / scale).reshape(len(high), -1).amax(-1)


def _absolute(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """|low - high| per time, for a quantity that crosses 0 (logSNR); where |high| is so large that 4 units of
    float32 rounding exceed FLOAT32_BOUND (|logSNR| > 210: a VP with beta_max = 1e4 reaches -5000, held to 5e-4
    by float32's spacing alone), on the scale of those 4 units instead."""
    scale = (high.abs() * (4 * FLOAT32_UNIT / FLOAT32_BOUND)).clamp(min=1)
    return ((low - high).abs() / scale).reshape(len(high), -1).amax(-1)


def _vector_relative(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max_k |low_k - high_k| / max_k |high_k| per time, for the K components of a vector [n, K] (one of which
    may be 0: a relative error of each entry would mean nothing there)."""
    error = (low - high).abs().amax(-1)
    return torch.where(error == 0, error, error / high.abs().amax(-1))


def _covariance_relative(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """max_ij |low_ij - high_ij| / sqrt(high_ii high_jj) per time, for covariances [n, K, K]: each entry on the
    scale of its standard deviations (a small covariance entry between large variances is not small news)."""
    variances = high.diagonal(dim1=-2, dim2=-1)
    scale = (variances[:, :, None] * variances[:, None, :]).sqrt()
    error = (low - high).abs()
    return torch.where(error == 0, error, error / scale).flatten(1).amax(-1)


class Probe(NamedTuple):
    """A function of the times compared in float32 and float64, and how its error is measured per time."""

    fn: Callable
    error: Callable = _relative


def _state(sde, t: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((t.shape[0], components(sde)), value, dtype=t.dtype, device=t.device)


def _diffusion_of_sde(sde, t: torch.Tensor) -> torch.Tensor:
    """g from sde() at x = 1/2 (a diffusion g(x, t) has x's shape; one entry per time, per component)."""
    _, g = sde.sde(_state(sde, t, 0.5), t)
    if kind_of(sde) == "coupled":
        return g
    return g.reshape(t.shape[0], -1)[:, 0] if g.dim() > 1 else g


KERNEL = {"std": Probe(lambda sde, t: sde.std(t)), "log_snr": Probe(lambda sde, t: sde.log_snr(t), _absolute),
          "mean_coeff": Probe(lambda sde, t: sde.mean_coeff(t))}
TIME = {"weight": Probe(lambda sde, t: sde.weight(t)), "t_density": Probe(lambda sde, t: sde.t_density(t)),
        "g of sde()": Probe(_diffusion_of_sde)}
COUPLED = {
    "weight": TIME["weight"], "t_density": TIME["t_density"], "g of sde()": Probe(_diffusion_of_sde, _vector_relative),
    "noise_to_score": Probe(lambda sde, t: sde.noise_to_score(_state(sde, t, 1.0), t), _vector_relative),
    "marginal_prob mean": Probe(lambda sde, t: sde.marginal_prob(_state(sde, t, 1.0)[:, :1], t)[0], _vector_relative),
    "marginal_prob covariance": Probe(lambda sde, t: sde.marginal_prob(_state(sde, t, 1.0)[:, :1], t)[1],
                                      _covariance_relative),
}
PROBES = {"affine": {**KERNEL, **TIME}, "general": TIME, "coupled": COUPLED}


def _values(probe: Probe, module, t: torch.Tensor) -> torch.Tensor:
    """The probe's values [n, ...] in float64 (a constant returned as a number is repeated per time)."""
    v = torch.as_tensor(probe.fn(module, t)).double()
    return v.expand(len(t)) if v.dim() == 0 else v


def precision_times(sde) -> np.ndarray:
    """eps x 1, 2, 5, 10, 20, 50, ... up to T, and 65 evenly spaced times in [eps, T]."""
    eps, T = times(sde)
    ladder = [eps * f * 10**k for k in range(int(math.log10(T / eps)) + 2) for f in (1, 2, 5)]
    return np.unique(np.concatenate([[t for t in ladder if t <= T], np.linspace(eps, T, 65)]))


def _prior_comparisons(single, double) -> list[Comparison]:
    """prior_logp at u = 0, (1, ..., 1) and (1/2, -1/2, ...) per entry: |difference| / max(|log p|, 1), as log p
    is a sum of terms of order one (a relative error means nothing where it crosses 0)."""
    K = components(double)
    states = np.stack([np.zeros(K), np.ones(K), 0.5 * (-1.0) ** np.arange(K)])
    low = single.prior_logp(torch.as_tensor(states, dtype=torch.float32, device=single._anchor.device)).double()
    high = double.prior_logp(torch.as_tensor(states, dtype=torch.float64, device=double._anchor.device))
    error = (low - high).abs() / high.abs().clamp(min=1)
    error = torch.where(torch.isfinite(low), error, torch.full_like(error, math.inf))
    return [Comparison(float(error[i]), FLOAT32_BOUND, f"prior_logp at u = ({', '.join(f'{v:g}' for v in states[i])})")
            for i in range(3)]


def float32_precision(sde, settings: Settings, probes: dict | None = None) -> list[CheckResult]:
    """The kind's probes (PROBES) in float32 against float64: finite, and within 1e-4 relative (log_snr:
    absolute). float64 is evaluated at the float32-rounded times, so that the error measured is the module's
    float32 arithmetic, not the rounding of t itself. Coupled modules: prior_logp too."""
    kind = kind_of(sde)
    probes = probes if probes is not None else PROBES[kind]
    single = copy.deepcopy(sde).float()
    t32 = torch.as_tensor(precision_times(sde), dtype=torch.float32, device=sde._anchor.device)
    t64 = t32.double()
    n = len(t32)
    comparisons = []
    for name, probe in probes.items():
        low, high = _values(probe, single, t32), _values(probe, sde, t64)
        error = probe.error(low, high)
        finite = torch.isfinite(low).reshape(n, -1).all(-1)
        error = torch.where(finite, error, torch.full_like(error, math.inf))
        comparisons += [Comparison(float(error[i]), FLOAT32_BOUND, f"{name} at t = {float(t32[i]):.4g}")
                        for i in range(n)]
    names = list(probes)
    if kind == "coupled":
        comparisons += _prior_comparisons(single, sde)
        names.append("prior_logp")
    absolute = (" (log_snr: absolute, beyond |log_snr| = 210 relative to 4 float32 units)"
                if any(p.error is _absolute for p in probes.values()) else "")
    return [worst_row("float32 vs float64", comparisons,
                      f"relative error{absolute} of {', '.join(names)} at {n} times from eps to T")]
