"""The training-time sampler: t_density() against t_cdf(), t_icdf(), sample_t() and the form its sampling
states (MATH.md section 3).

    time_sampler  t_density integrates to t_cdf; t_density has its form (uniform; importance: proportional
                  to lambda / sigma^2, or for a tabulated density to weight(t)); t_icdf inverts t_cdf;
                  sample_t's draws follow t_cdf (Kolmogorov-Smirnov)

A tabulated density (coupled SDEs with t ~ importance) is the derivative of a CDF that is linear in log t
between the table's points exp(_log_t): q(t) t is constant on each cell, so its integral is exact on
panels that are the table's cells, and its form is checked against weight(t) within the table's error.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import (IDENTITY_BOUND, KS_LEVEL, NA, OK, FAIL, CheckResult, Comparison, Settings, check_grid, column,
                     times, worst_row)

QUADRATURE_BOUND = 1e-8  # |int q - Q| and Q(Q^-1(u)) - u: float64 formulas and 64-step bisections reach 1e-12
GAUSS_NODES = 8
REFINE_BOUND = 1e-12     # a panel's Gauss-Legendre sum and its halves' agree to this, relative, or it is halved
REFINE_LEVELS = 20
TABLE_SAFETY = 2.0       # a tabulated density's tolerance: twice the error estimate of its normaliser


def table_points(sde) -> np.ndarray | None:
    """The points t of a tabulated CDF (cubic Hermite in log t between them), eps and T exactly at the ends; None for
    a module whose density has a formula."""
    log_t = getattr(sde, "_log_t", None)
    if log_t is None:
        return None
    eps, T = times(sde)
    t = np.exp(log_t.double().cpu().numpy())
    t[0], t[-1] = eps, T
    return t


def _panels(sde) -> np.ndarray:
    """Panel ends on [eps, T]: the cells of a tabulated density; otherwise log-spaced, where a density ~ 1/t
    near eps lives, evenly spaced, and graded toward T, where a density ~ 1/(t_pole - t) lives when the
    interval stops just before a pole (an interpolant's 1/(1 - t) on [eps, 0.999])."""
    table = table_points(sde)
    if table is not None:
        return table
    eps, T = times(sde)
    toward_T = T - np.geomspace((T - eps) * 1e-6, (T - eps) / 2, 129)
    return np.unique(np.concatenate([np.geomspace(eps, T, 257), np.linspace(eps, T, 257), toward_T]))


def _integrals(sde, ends: np.ndarray) -> torch.Tensor:
    """int q over each panel [ends[i], ends[i+1]] by 8-point Gauss-Legendre in log t (q(t) dt = q t du,
    u = log t): exact for polynomials of degree 15 in log t on each panel, so for a tabulated density
    (q t constant on each of its cells) exact up to rounding. A panel whose two halves disagree with it by more
    than REFINE_BOUND is halved again, up to REFINE_LEVELS times: a schedule with a kink (beta = 1 + 10 |t - c|)
    has one in q, which a fixed panel across it integrates to only ~1e-7."""
    lo, hi = np.log(ends[:-1]), np.log(ends[1:])
    whole = _gauss(sde, lo, hi)
    total = whole.copy()
    index = np.arange(len(lo))
    for _ in range(REFINE_LEVELS):
        mid = (lo + hi) / 2
        left, right = _gauss(sde, lo, mid), _gauss(sde, mid, hi)
        halves = left + right
        np.add.at(total, index, halves - whole)   # an index appears twice once a panel has halves
        coarse = np.abs(halves - whole) > REFINE_BOUND * np.maximum(np.abs(halves), 1e-300)
        if not coarse.any():
            break
        # Each unsettled panel goes on as its two halves, both counted in its own entry.
        lo, hi = np.concatenate([lo[coarse], mid[coarse]]), np.concatenate([mid[coarse], hi[coarse]])
        whole, index = np.concatenate([left[coarse], right[coarse]]), np.concatenate([index[coarse]] * 2)
    return torch.as_tensor(total)


def _gauss(sde, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """8-point Gauss-Legendre of q t over [lo, hi] in u = log t, per panel."""
    nodes, weights = np.polynomial.legendre.leggauss(GAUSS_NODES)
    u = (lo + hi)[:, None] / 2 + (hi - lo)[:, None] / 2 * nodes
    t = column(np.exp(u).reshape(-1), sde._anchor)
    q = (sde.t_density(t) * t).reshape(u.shape).double().cpu().numpy()
    return (q * weights).sum(1) * (hi - lo) / 2


def ks_uniform(u: torch.Tensor) -> tuple[float, float]:
    """Kolmogorov-Smirnov statistic D of samples u against U(0, 1), and its p-value by Stephens'
    approximation: Q_KS((sqrt(n) + 0.12 + 0.11 / sqrt(n)) D), Q_KS(x) = 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2),
    within 3 % of the exact p-value for n >= 50 (scipy.stats.kstwo, compared in the tests)."""
    u = torch.sort(u.double().cpu().reshape(-1)).values
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = float(torch.maximum(i / n - u, u - (i - 1) / n).max())
    return d, kolmogorov_tail((math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d)


def kolmogorov_tail(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 x^2), clipped to [0, 1]."""
    if x < 0.2:  # the series converges slowly here, where the tail is 1 to 12 digits
        return 1.0
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101))))


def ks_critical(n: int, level: float = KS_LEVEL) -> float:
    """The D above which the KS p-value falls below `level`, from kolmogorov_tail by bisection."""
    lo, hi = 0.2, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kolmogorov_tail(mid) > level else (lo, mid)
    return hi / (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n))


def time_sampler(sde, settings: Settings) -> list[CheckResult]:
    """The training-time sampler: t_density integrates to t_cdf, has the form its sampling states, t_cdf
    inverts t_icdf, and sample_t's draws follow t_cdf."""
    return [density_integral(sde), density_form(sde), cdf_inverse(sde), sample_t_ks(sde, settings)]


def density_integral(sde) -> CheckResult:
    """int_eps^t t_density = t_cdf(t) at every panel end t, and int_eps^T t_density = 1, within 1e-8."""
    ends = _panels(sde)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(_integrals(sde, ends), 0)])
    cdf = sde.t_cdf(column(ends, sde._anchor)).double().cpu()
    total = float(cumulative[-1])
    comparisons = [Comparison(abs(total - 1), QUADRATURE_BOUND, f"int_eps^T q = {total:.12g}")]
    comparisons += [Comparison(float((cumulative[i] - cdf[i]).abs()), QUADRATURE_BOUND,
                               f"int_eps^t q vs t_cdf at t = {ends[i]:.4g}") for i in range(len(ends))]
    panels = "cells of the table" if table_points(sde) is not None else "panels"
    return worst_row("t_density integrates to t_cdf", comparisons,
                     f"8-point Gauss-Legendre on {len(ends) - 1} {panels} in log t")


def cdf_inverse(sde) -> CheckResult:
    """t_cdf(eps) = 0, t_cdf(T) = 1, t_icdf(0) = eps, t_icdf(1) = T and t_cdf(t_icdf(u)) = u on 1025 u in
    [0, 1], within 1e-8."""
    eps, T = times(sde)
    u = column(np.linspace(0, 1, 1025), sde._anchor)
    t = sde.t_icdf(u)
    back = sde.t_cdf(t)
    ends = sde.t_cdf(column([eps, T], sde._anchor))
    comparisons = [Comparison(float(ends[0].abs()), QUADRATURE_BOUND, "t_cdf(eps) = 0"),
                   Comparison(float((ends[1] - 1).abs()), QUADRATURE_BOUND, "t_cdf(T) = 1"),
                   Comparison(float(((t[0] - eps) / eps).abs()), QUADRATURE_BOUND, "t_icdf(0) = eps (relative)"),
                   Comparison(float(((t[-1] - T) / T).abs()), QUADRATURE_BOUND, "t_icdf(1) = T (relative)")]
    comparisons += [Comparison(float((back[i] - u[i]).abs()), QUADRATURE_BOUND,
                               f"t_cdf(t_icdf(u)) at u = {float(u[i]):.4g}") for i in range(len(u))]
    return worst_row("t_icdf inverts t_cdf", comparisons, "absolute difference")


def sample_t_ks(sde, settings: Settings) -> CheckResult:
    """sample_t's draws inside [eps, T], and t_cdf of them uniform on (0, 1): Kolmogorov-Smirnov statistic
    below its critical value at level 1e-3 (a correct sampler fails with probability 1e-3)."""
    eps, T = times(sde)
    n = settings.paths // 4  # a quarter of the paths: numeric inverse CDFs cost 64 bisection steps per draw
    draws = sde.sample_t(n, generator=settings.generator(sde._anchor.device, 4))
    inside = bool(((draws >= eps) & (draws <= T)).all())
    d, p = ks_uniform(sde.t_cdf(draws))
    critical = ks_critical(n)
    return CheckResult("sample_t vs t_cdf (KS)", OK if d <= critical and inside else FAIL, d, critical,
                       f"KS statistic of t_cdf(sample_t) against U(0, 1), {n} draws, p = {p:.3g} "
                       f"(fails below {KS_LEVEL:g})" + ("" if inside else "; draws outside [eps, T]"))


def density_form(sde) -> CheckResult:
    """t_density has its stated form: 1 / (T - eps) for uniform sampling; for importance sampling
    proportional to weight(t) / std(t)^2 (MATH.md section 3), so q v / lambda is the same at every time,
    or, for a tabulated density, proportional to weight(t) (tabulated_form)."""
    eps, T = times(sde)
    if sde.t_sampling == "importance" and table_points(sde) is not None:
        return tabulated_form(sde)
    name = f"t_density form ({sde.t_sampling})"
    if sde.t_sampling == "uniform":
        t = check_grid(sde)
        deviation, form = (sde.t_density(t).double() * (T - eps) - 1).abs(), "q (T - eps) from 1"
    elif hasattr(sde, "std"):
        t = check_grid(sde)
        ratio = sde.t_density(t).double() * sde.std(t).double() ** 2 / sde.weight(t).double()
        deviation, form = (ratio / ratio.median() - 1).abs(), "q sigma^2 / lambda from its median"
    else:
        return CheckResult(name, NA, note="importance sampling without a scalar kernel or a table of its CDF")
    comparisons = [Comparison(float(deviation[i]), IDENTITY_BOUND, f"t = {float(t[i]):.4g}") for i in range(len(t))]
    return worst_row(name, comparisons, f"relative deviation of {form}")


def tabulated_form(sde) -> CheckResult:
    """A tabulated importance density against q(t) = w(t) / Z, w = weight(t), Z = int_eps^T w, at the
    midpoint (in log t) of every cell of the table.

    The module's density is w / Z with Z from its table (Simpson's rule on the cells in u = log t, m = w t). Here Z
    is Simpson's rule on the same cells, its error estimated by Richardson's comparison with the rule on cells
    twice as long, |Z_h - Z_2h| / 15; the tolerance, relative, is twice that estimate over Z plus 1e-9. A table
    normalised by the trapezoid rule instead is off by ~h^2 m'' / 12 (1e-6 for cld) and fails.
    """
    t_table = table_points(sde)
    u = np.log(t_table)
    h = np.diff(u)
    t_mid = np.exp((u[:-1] + u[1:]) / 2)
    like = sde._anchor
    m_ends = (sde.weight(column(t_table, like)).double().cpu().numpy()) * t_table
    m_mid = (sde.weight(column(t_mid, like)).double().cpu().numpy()) * t_mid
    q_mid = sde.t_density(column(t_mid, like)).double().cpu().numpy()
    Z = float(np.sum(h * (m_ends[:-1] + 4 * m_mid + m_ends[1:]) / 6))
    pairs = len(h) // 2 * 2   # cells two at a time: the rule on [u_i, u_i+2] with u_i+1 as its midpoint
    Z2 = float(np.sum((h[:pairs:2] + h[1:pairs:2]) * (m_ends[:pairs:2] + 4 * m_ends[1:pairs + 1:2]
                                                        + m_ends[2:pairs + 2:2]) / 6))
    Z2 += float(np.sum(h[pairs:] * (m_ends[pairs:-1] + 4 * m_mid[pairs:] + m_ends[pairs + 1:]) / 6))
    deviation = np.abs(q_mid * t_mid * Z / m_mid - 1)
    bound = TABLE_SAFETY * abs(Z - Z2) / 15 / Z + IDENTITY_BOUND
    comparisons = [Comparison(float(deviation[i]), bound, f"t = {t_mid[i]:.4g}") for i in range(len(h))]
    return worst_row("t_density form (importance)", comparisons,
                     f"relative deviation of q Z / weight at the midpoints of the table's {len(h)} cells "
                     f"(h = {h.max():.3g} in log t), Z = int weight by Simpson's rule; tolerance twice its error "
                     f"estimate")
