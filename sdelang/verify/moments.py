"""sde() against the kernel: the moment ODEs, by finite differences in float64 (MATH.md sections 1, 6, 7).

    moment_odes          scalar kernels: m' = a m, c' = a c + b, v' = 2 a v + g^2
    coupled_moment_odes  coupled kernels: Phi' = F Phi, Sigma' = F Sigma + Sigma F^T + D
"""
from __future__ import annotations

from typing import Callable

import torch

from .common import (IDENTITY_BOUND, NA, NORMAL, CheckResult, Comparison, Settings, affine_coefficients,
                     affine_kernel, check_grid, components, coupled_coefficients, times, worst_row)

FD_STEP = 1e-4       # finite-difference step, relative to the time scale of the kernel at t
FD_SAFETY = 10.0     # tolerance = FD_SAFETY x the estimated finite-difference error
ROUNDING = 1e-13     # relative error of one float64 evaluation of m, c or v (a few hundred ulps)
# Relative error of one float64 evaluation of a coupled kernel's entries: the bound two float64 formulas must
# meet. Closed forms cancel near t = 0 (CLD's Q_xx = (expm1(2a) - 2a - 2a^2) exp(-2a) ~ 4a^3 / 3) and a
# matrix exponential is accurate relative to its largest entry, so a small entry like Sigma_xx near t = 0
# carries errors far above an ulp: 5e-12 for examples/cld.sde at t = 1e-5, 2e-8 for examples/underdamped.sde
# at t = 1e-3 (against 50-digit arithmetic); smooth in t there, so the finite differences do not see them.
COUPLED_ROUNDING = IDENTITY_BOUND


def derivatives(fn: Callable, t: torch.Tensor, h: torch.Tensor, lo: float, hi: float):
    """Second-order finite differences D(h), D(2h) of fn at t (central, or one-sided where t -+ 2h would
    leave [lo, hi]), an estimate of D(h)'s truncation error |D(h) - D(2h)| / 3 (D(h) - f' ~ K h^2, so
    D(2h) - D(h) ~ 3 K h^2), and the largest |fn| used (for the rounding error). fn maps times [n] to
    values [n, ...]; every entry is differentiated."""
    # Clamped: the points a stencil does not use are still evaluated, and must stay inside [lo, hi].
    values = {k: fn(torch.clamp(t + k * h, lo, hi)) for k in (-4, -2, -1, 0, 1, 2, 4)}
    shape = (-1,) + (1,) * (values[0].dim() - 1)
    step = h.reshape(shape)
    central = ((values[1] - values[-1]) / (2 * step), (values[2] - values[-2]) / (4 * step))
    forward = ((-3 * values[0] + 4 * values[1] - values[2]) / (2 * step),
               (-3 * values[0] + 4 * values[2] - values[4]) / (4 * step))
    backward = ((3 * values[0] - 4 * values[-1] + values[-2]) / (2 * step),
                (3 * values[0] - 4 * values[-2] + values[-4]) / (4 * step))
    use_forward, use_backward = (t - 2 * h < lo).reshape(shape), (t + 2 * h > hi).reshape(shape)
    d1, d2 = (torch.where(use_forward, f, torch.where(use_backward, b, c))
              for f, b, c in zip(forward, backward, central))
    size = torch.stack([v.abs() for v in values.values()]).amax(0)
    return d1, (d1 - d2).abs() / 3, size


def _residuals(name: str, t: torch.Tensor, h: torch.Tensor, derivative, rhs: torch.Tensor, scale: torch.Tensor,
               label: Callable[[int, int], str], rounding: float = ROUNDING) -> CheckResult:
    """One moment ODE lhs = rhs, entry by entry: the residual relative to `scale` (|lhs| + each rhs term)
    against FD_SAFETY x (truncation + 4 rounding max|fn| / h) + IDENTITY_BOUND x scale, also relative.
    label(i, e) names time i and entry e (flat index)."""
    lhs, truncation, size = derivative
    step = h.reshape((-1,) + (1,) * (lhs.dim() - 1))
    residual = (lhs - rhs).abs()
    scale = lhs.abs() + scale
    tolerance = FD_SAFETY * (truncation + 4 * rounding * size / step) + IDENTITY_BOUND * scale
    relative = torch.where(scale > 0, scale, torch.ones_like(scale))
    error, bound = (residual / relative).reshape(len(t), -1), (tolerance / relative).reshape(len(t), -1)
    # Values that float64 holds only as subnormal numbers (m = e^-700 of a VP with beta_max = 1e4) have lost
    # digits: their differences say nothing about the formula. Exactly 0 is kept (c = 0 for b = 0).
    tiny = ((size > 0) & (size < NORMAL)).reshape(len(t), -1)
    comparisons = [Comparison(float(error[i, e]), float(bound[i, e]), label(i, e))
                   for i in range(len(t)) for e in range(error.shape[1]) if not tiny[i, e]]
    note = f"relative residual at {len(t)} times in [eps, T]"
    if tiny.any():
        note += f", {int(tiny.any(1).sum())} left out where the values are below {NORMAL:g}"
    if not comparisons:
        return CheckResult(name, NA, note=note)
    return worst_row(name, comparisons, note)


def moment_odes(sde, settings: Settings) -> list[CheckResult]:
    """The kernel of marginal_prob() against the coefficients of sde(): m' = a m, c' = a c + b and
    v' = 2 a v + g^2, with a = f(1) - f(0), b = f(0), derivatives by finite differences in float64.

    Step h = 1e-4 / (1/t + |a| + g^2 / v): a ten-thousandth of the time over which m or v change by a
    factor e. Tolerance: 10 x (the truncation error |D(h) - D(2h)| / 3 + the rounding error
    4 x 1e-13 max|f| / h) + 1e-9 of the row's scale (|lhs| + |each rhs term|), per time.
    """
    eps, T = times(sde)
    t = check_grid(sde)
    a, b, g = affine_coefficients(sde, t)
    m, c, v = affine_kernel(sde, t)
    rate = 1 / t + a.abs() + torch.where(v > 0, g**2 / v, torch.zeros_like(v))
    h = FD_STEP / rate

    def derivative(i):
        return derivatives(lambda s: affine_kernel(sde, s)[i], t, h, eps, T)

    def label(i, entry):
        return f"t = {float(t[i]):.4g}"

    equations = (
        ("m' = a m", derivative(0), (a * m,)),
        ("c' = a c + b", derivative(1), (a * c, b)),
        ("v' = 2 a v + g^2", derivative(2), (2 * a * v, g**2)),
    )
    return [_residuals(name, t, h, d, sum(terms), sum(term.abs() for term in terms), label)
            for name, d, terms in equations]


# -- Coupled kernels --------------------------------------------------------------------------------------

def coupled_moment_odes(sde, settings: Settings) -> list[CheckResult]:
    """kernel(t) = (Phi, Sigma) against sde(): Phi' = F Phi and Sigma' = F Sigma + Sigma F^T + D, with F(t)
    read off sde() at the basis states and D = diag(g_k^2) its noise, derivatives by finite differences in
    float64, entry by entry.

    Step h = 1e-4 / (1/t + |F| + max_k g_k^2 / Sigma_kk), |F| the largest absolute row sum: a ten-thousandth
    of the time over which the kernel changes by a factor e. The tolerance is moment_odes', per entry, relative
    to |lhs| + the absolute values of the right-hand side's terms (|F| |Phi|, |F| |Sigma| + |Sigma| |F|^T + D),
    with a rounding error of 1e-9 per evaluation (COUPLED_ROUNDING).
    """
    eps, T = times(sde)
    t = check_grid(sde)
    F, _, g = coupled_coefficients(sde, t)
    F = F.to(torch.float64)
    D = torch.diag_embed(g.to(torch.float64) ** 2)
    Phi, Sigma = sde.kernel(t)
    variances = Sigma.diagonal(dim1=-2, dim2=-1)
    noise = torch.where(variances > 0, g**2 / variances, torch.zeros_like(variances)).amax(-1)
    h = FD_STEP / (1 / t + F.abs().sum(-1).amax(-1) + noise)
    names, K = list(sde.components), components(sde)

    def label(matrix):
        return lambda i, e: f"{matrix}[{names[e // K]},{names[e % K]}] at t = {float(t[i]):.4g}"

    transposed = F.transpose(1, 2)
    return [
        _residuals("Phi' = F Phi", t, h, derivatives(lambda s: sde.kernel(s)[0], t, h, eps, T), F @ Phi,
                   F.abs() @ Phi.abs(), label("Phi"), COUPLED_ROUNDING),
        _residuals("Sigma' = F Sigma + Sigma F^T + D", t, h, derivatives(lambda s: sde.kernel(s)[1], t, h, eps, T),
                   F @ Sigma + Sigma @ transposed + D,
                   F.abs() @ Sigma.abs() + Sigma.abs() @ transposed.abs() + D, label("Sigma"), COUPLED_ROUNDING),
    ]
