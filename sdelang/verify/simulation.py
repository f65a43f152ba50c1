"""Euler-Maruyama simulation of the forward SDE against its Gaussian kernel (MATH.md sections 1, 6, 7).

    forward_simulation          scalar kernels: the mean m x0 + c and the variance v of marginal_prob()
    coupled_forward_simulation  coupled kernels: the mean Phi u0 and the K x K covariance Sigma per entry

Both compare the Richardson extrapolation 2 E_N - E_{N/2} of N-step and N/2-step runs (the same Brownian
increments) with the kernel, with tolerance 5 Monte Carlo standard errors + |E_N - E_{N/2}|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .common import (START_POINTS, STANDARD_ERRORS, CheckResult, Comparison, Settings, column, comparison_times,
                     components, coupled_coefficients, flat, kind_of, not_applicable, times, worst_row)

# The kernel mean is linear in x0 and the covariance does not depend on it, so two starting points pin both
# down; a third would cost half as much again of the slowest check.
COUPLED_START_POINTS = (-2.0, 3.0)
STIFF_STEP = 0.25       # largest |df/dx| dt of a fine Euler-Maruyama step (stable up to 2, first-order well below 1)
MAX_STEP_FACTOR = 16    # steps raised at most this many times for a stiff drift (the check's time grows alike)


def starts_at_zero(sde, like: torch.Tensor) -> bool:
    """Whether drift and diffusion are finite at t = 0, so that paths can start from the data there."""
    K = components(sde)
    t = torch.zeros(2, dtype=like.dtype, device=like.device)
    f, g = sde.sde(torch.tensor([[0.0] * K, [1.0] * K], dtype=like.dtype, device=like.device), t)
    return bool(torch.isfinite(f).all() and torch.isfinite(g).all())


def _rates(sde, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """How fast the drift moves the state and the noise rate, on a time grid. Scalar modules: |df/dx|
    (through f(1) - f(0); exact for affine drifts) and g^2, for a diffusion that depends on x the larger of
    g(0)^2 and g(1)^2. Coupled modules: the largest absolute row sum of F(t) and the largest g_k(t)^2."""
    if kind_of(sde) == "coupled":
        F, _, g = coupled_coefficients(sde, t)
        return F.abs().sum(-1).amax(-1).cpu().numpy(), (g**2).amax(-1).cpu().numpy()
    n = t.shape[0]
    ones, zeros = (torch.full((n, 1), v, dtype=t.dtype, device=t.device) for v in (1.0, 0.0))
    f1, g1 = sde.sde(ones, t)
    f0, g0 = sde.sde(zeros, t)
    slope = (flat(f1, n, t) - flat(f0, n, t)).abs()
    noise = torch.maximum(flat(g0, n, t) ** 2, flat(g1, n, t) ** 2)
    return slope.cpu().numpy(), noise.cpu().numpy()


def _cumulative(values: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Trapezoidal int_{t[0]}^{t[i]} values, for every i."""
    return np.concatenate([[0.0], np.cumsum((values[1:] + values[:-1]) / 2 * np.diff(t))])


def euler_grid(sde, start: float, initial_variance: float, stops: list[float], steps: int,
               like: torch.Tensor) -> np.ndarray:
    """An Euler-Maruyama time grid from `start` through every time in `stops`, with about `steps` steps.

    The steps are equal in the clock  C(t) = (t - start) / (T - start) + int |a| + log W(t),  with |a| the
    drift's rate (|df/dx|, or the row-sum norm of F for coupled SDEs) and W(t) = W0 + int_start^t g^2 the
    noise variance accumulated so far, W0 = the initial variance plus a tenth of the noise that arrives
    before stops[0]. So every step keeps |a| dt and the relative growth of the noise variance small, whether
    the scale is set by a stiff drift (cosine schedule near T, CLD's oscillator), by a diffusion that grows
    exponentially (VE) or by one that vanishes at t = 0 (EDM's g^2 = 2 t).
    Each span between two consecutive stops gets an even number of steps, so that every other point of the
    grid is a grid with half the steps that also passes through `stops`.
    """
    T = float(sde.T)
    geometric = np.geomspace(max(start, stops[0] * 1e-3), T, 2049)
    dense = np.unique(np.concatenate([[start], np.linspace(start, T, 4097), geometric, stops]))
    slope, noise = _rates(sde, column(dense, like))
    noise = np.where(np.isfinite(noise), noise, 0.0)
    clock = (dense - start) / (T - start) + _cumulative(np.where(np.isfinite(slope), slope, 0.0), dense)
    accumulated = _cumulative(noise, dense)
    floor = initial_variance + 0.1 * np.interp(stops[0], dense, accumulated)
    if floor > 0:
        clock = clock + np.log((floor + accumulated) / floor)
    knots = [start] + list(stops)
    total = np.interp(knots[-1], dense, clock) - np.interp(knots[0], dense, clock)
    grid = [np.array([start])]
    for lo, hi in zip(knots[:-1], knots[1:]):
        c_lo, c_hi = np.interp([lo, hi], dense, clock)
        pairs = max(1, round(steps / 2 * (c_hi - c_lo) / total))
        inner = np.interp(np.linspace(c_lo, c_hi, 2 * pairs + 1)[1:-1], clock, dense)
        grid.append(np.concatenate([inner, [hi]]))
    return np.concatenate(grid)


def stable_grid(sde, start: float, initial_variance: float, stops: list[float], steps: int,
                like: torch.Tensor) -> tuple[np.ndarray | None, str]:
    """euler_grid with about `steps` steps, or more where the drift is so stiff that Euler-Maruyama with them
    is unstable or far from its first-order regime: (grid, what was done) or (None, why not).

    A step's |df/dx| dt is held to STIFF_STEP (the coarse run's to twice that). The grid spaces steps by a
    clock that counts int |df/dx|, so the largest |df/dx| dt falls in proportion to the steps: they are raised
    to what that asks, at most MAX_STEP_FACTOR times `steps` (a VP with beta_max = 1e4 reaches |a| dt = 2.5 at
    1000 steps and gets about 11,000). Beyond that the comparison would measure the integrator, not the module."""
    asked = steps
    for _ in range(3):
        grid = euler_grid(sde, start, initial_variance, stops, steps, like)
        slope, _ = _rates(sde, column(grid[:-1], like))
        stiffness = float(np.nanmax(slope * np.diff(grid)))
        if stiffness <= STIFF_STEP:
            return grid, "" if steps == asked else f" (raised from {asked} so that |df/dx| dt <= {STIFF_STEP:g})"
        steps = int(math.ceil(steps * stiffness / STIFF_STEP * 1.1 / 100) * 100)
        if steps > MAX_STEP_FACTOR * asked:
            break
    return None, (f"Euler-Maruyama with {asked} steps takes |df/dx| dt up to {stiffness:.3g} (stable and accurate "
                  f"at {STIFF_STEP:g}): too stiff to compare with the kernel; rerun with --steps {steps}")


@dataclass(frozen=True)
class Paths:
    """Euler-Maruyama states at `times` on the fine grid and on the grid with every other point."""

    times: list[float]
    fine: list[torch.Tensor]     # each [P, n, D]: P starting points, n paths, D numbers per path
    coarse: list[torch.Tensor]
    steps: int


def simulate(sde, start: torch.Tensor, grid: np.ndarray, stops: list[float], generator: torch.Generator,
             unpack: Callable[[torch.Tensor], torch.Tensor]) -> Paths:
    """Euler-Maruyama u <- u + f(u, t) dt + g(u, t) dW from the state `start` at grid[0] (in the module's own
    layout), on `grid` and, with the same Brownian increments summed pairwise, on every other point of it.
    unpack(u) gives the states at the stops as [P, n, D]."""
    fine = start
    coarse = fine.clone()
    dt = torch.as_tensor(np.diff(grid), dtype=fine.dtype)
    wanted = set(stops)
    fine_out, coarse_out = [], []
    for k in range(len(grid) - 1):
        # t of shape [1] broadcasts over the batch: the coefficients are computed once per step, not per path.
        t = torch.full((1,), float(grid[k]), dtype=fine.dtype, device=fine.device)
        # Drawn in float32 (several times faster than float64 on CPUs), used in float64: rounding the
        # normal draws to 7 digits changes their moments by ~1e-7, far below the Monte Carlo error.
        z = torch.randn(fine.shape, generator=generator, dtype=torch.float32, device=fine.device)
        dw = z.to(fine.dtype) * dt[k].sqrt()
        drift, g = sde.sde(fine, t)
        fine = fine + drift * dt[k] + sde._expand(g, fine) * dw
        if k % 2 == 0:  # a coarse step spans fine steps k and k + 1, from the coarse state at grid[k]
            coarse_drift, coarse_g = sde.sde(coarse, t)
            increment = dw
        else:
            increment = increment + dw
            coarse = (coarse + coarse_drift * (dt[k - 1] + dt[k])
                      + sde._expand(coarse_g, coarse) * increment)
        if float(grid[k + 1]) in wanted:
            fine_out.append(unpack(fine))
            coarse_out.append(unpack(coarse))
    return Paths(stops, fine_out, coarse_out, len(grid) - 1)


def scalar_paths(sde, mean: torch.Tensor, std: torch.Tensor, paths: int, grid: np.ndarray, stops: list[float],
                 generator: torch.Generator) -> Paths:
    """simulate() for a scalar module, from x = mean[p] + std[p] z for P starting points, `paths` each: the
    sde() calls see x of shape [P paths, 1]."""
    P = len(mean)
    z = torch.randn(P, paths, generator=generator, dtype=torch.float32, device=mean.device).to(mean.dtype)
    start = (mean[:, None] + std[:, None] * z).reshape(P * paths, 1)
    return simulate(sde, start, grid, stops, generator, lambda x: x.reshape(P, paths, 1))


@dataclass(frozen=True)
class Moment:
    """A Richardson-extrapolated Monte Carlo moment [P]: estimate 2 E_N - E_{N/2}, its standard error, and the
    first-order Euler-Maruyama bias of the fine run, |E_N - E_{N/2}|."""

    estimate: torch.Tensor
    se: torch.Tensor
    bias: torch.Tensor

    @staticmethod
    def of(fine: torch.Tensor, coarse: torch.Tensor) -> "Moment":
        """From per-path values [P, n] of the fine and the coarse run."""
        n = fine.shape[1]
        m_fine, m_coarse = fine.mean(1), coarse.mean(1)
        return Moment(2 * m_fine - m_coarse, (2 * fine - coarse).std(1) / math.sqrt(n), (m_fine - m_coarse).abs())

    def compare(self, i: int, exact: float, where: str) -> Comparison:
        estimate = float(self.estimate[i])
        return Comparison(abs(estimate - exact), float(STANDARD_ERRORS * self.se[i] + self.bias[i]),
                          f"{where} (EM {estimate:.6g}, kernel {exact:.6g})")


def covariance(fine: torch.Tensor, coarse: torch.Tensor, i: int, j: int) -> Moment:
    """Cov(u_i, u_j) from [P, n, D] states: per-path products of deviations from the sample means, scaled by
    n / (n - 1) so that their mean is the unbiased sample covariance."""
    n = fine.shape[1]
    deviations = [(s - s.mean(1, keepdim=True)) * math.sqrt(n / (n - 1)) for s in (fine, coarse)]
    return Moment.of(*(d[..., i] * d[..., j] for d in deviations))


def forward_simulation(sde, settings: Settings) -> list[CheckResult]:
    """Euler-Maruyama paths of the forward SDE against marginal_prob()'s mean m x0 + c and variance v.

    Paths start at t = 0 from m(0) x0 + c(0) + sqrt(v0) z if drift and diffusion are finite there, else at eps from
    the kernel at eps. At each comparison time and each x0 the Richardson-extrapolated estimate
    2 E_fine - E_coarse (Euler-Maruyama is weak order 1, so its first-order bias cancels) is compared with
    the kernel, with tolerance  k SE + |E_fine - E_coarse|:  SE the Monte Carlo standard error of the
    extrapolated estimate (from the per-path values 2 X_fine - X_coarse, and for the variance from
    2 (X_fine - mean)^2 - (X_coarse - mean)^2), k = 5, plus the estimated first-order bias of the fine run,
    far above the O(dt^2) bias that extrapolation leaves.
    """
    like = sde._anchor
    x0 = column(START_POINTS, like)
    eps, _ = times(sde)
    if starts_at_zero(sde, like):
        start, v0 = 0.0, float(getattr(sde, "v0", 0.0))
        # x(0) ~ N(m(0) x0 + c(0), v0): m(0) = 1, c(0) = 0 but for a kernel stated with alpha(0) != 1 (VDM).
        zero = torch.zeros_like(x0)
        mean0 = sde.mean_coeff(zero).reshape(-1) * x0 + sde.mean_offset(zero).reshape(-1)
        noise0 = torch.full_like(x0, math.sqrt(v0))
        initial_variance = v0
    else:
        start = eps
        mean0, std0 = sde.marginal_prob(x0[:, None], torch.full_like(x0, eps))
        mean0, noise0 = mean0.reshape(-1), flat(std0, len(x0), like)
        initial_variance = float(noise0.max()) ** 2
    stops = comparison_times(sde, start)
    grid, raised = stable_grid(sde, start, initial_variance, stops, settings.steps, like)
    if grid is None:
        return not_applicable(("forward EM: mean", "forward EM: variance"), raised)
    run = scalar_paths(sde, mean0, noise0, settings.paths, grid, stops, settings.generator(like.device, 1))
    means, variances = [], []
    for t, fine, coarse in zip(stops, run.fine, run.coarse):
        mean, std = sde.marginal_prob(x0[:, None], torch.full_like(x0, t))
        mean, variance = mean.reshape(-1), flat(std, len(x0), like) ** 2
        first, second = Moment.of(fine[..., 0], coarse[..., 0]), covariance(fine, coarse, 0, 0)
        for i, start_point in enumerate(START_POINTS):
            where = f"t = {t:.4g}, x0 = {start_point:g}"
            means.append(first.compare(i, float(mean[i]), where))
            variances.append(second.compare(i, float(variance[i]), where))
    how = (f"{settings.paths} paths x {len(x0)} starting points, {run.steps} steps{raised} from t = {start:g}; "
           f"tolerance 5 SE + EM bias (N vs N/2 steps)")
    return [worst_row("forward EM: mean", means, how), worst_row("forward EM: variance", variances, how)]


def coupled_forward_simulation(sde, settings: Settings) -> list[CheckResult]:
    """Euler-Maruyama paths of a coupled SDE's state u against the kernel: the mean Phi u0 and the K x K
    covariance Sigma of marginal_prob(x0, t), for the data fixed at x0 = -2 and 3.

    Paths start at t = 0 from init_sampling(x0) (the data fixed, the auxiliary components drawn from their
    initial laws) if drift and diffusion are finite there, else at eps from perturb(x0, eps, z); the n paths
    of a starting point are n data entries of one state [1, K n]. Every mean and every covariance entry is
    compared as in forward_simulation: the Richardson estimate 2 E_fine - E_coarse within 5 standard errors
    (from the per-path values) + |E_fine - E_coarse|.
    """
    like = sde._anchor
    K, names = components(sde), list(sde.components)
    x0 = column(COUPLED_START_POINTS, like)
    P, n = len(x0), settings.paths
    eps, _ = times(sde)
    generator = settings.generator(like.device, 1)
    # One row per starting point, its n paths as n data entries: u [P, K n], whose components are contiguous
    # blocks (sde() joins them along dim 1 several times faster than for u [P n, K]).
    data = x0[:, None].expand(P, n).contiguous()
    if starts_at_zero(sde, like):
        start = 0.0
        u = sde.init_sampling(data, generator=generator)
        initial_variance = float(sde.Sigma0.diagonal().max())
    else:
        start = eps
        at_eps = torch.full((P,), eps, dtype=like.dtype, device=like.device)
        z = torch.randn(P, K * n, generator=generator, dtype=like.dtype, device=like.device)
        u = sde.perturb(data, at_eps, z)
        initial_variance = float(sde.kernel(at_eps[:1])[1].diagonal(dim1=-2, dim2=-1).max())
    stops = comparison_times(sde, start)
    grid, raised = stable_grid(sde, start, initial_variance, stops, settings.steps, like)
    if grid is None:
        return not_applicable(("forward EM: mean", "forward EM: covariance"), raised)
    run = simulate(sde, u, grid, stops, generator, lambda state: torch.stack(sde.split(state), -1))
    pairs = [(i, j) for i in range(K) for j in range(i, K)]
    means, covariances = [], []
    for t, fine, coarse in zip(stops, run.fine, run.coarse):
        mean, Sigma = sde.marginal_prob(x0[:, None], torch.full_like(x0, t))
        first = [Moment.of(fine[..., k], coarse[..., k]) for k in range(K)]
        second = {(i, j): covariance(fine, coarse, i, j) for i, j in pairs}
        for p, start_point in enumerate(COUPLED_START_POINTS):
            where = f"t = {t:.4g}, x0 = {start_point:g}"
            means += [first[k].compare(p, float(mean[p, k]), f"{where}, {names[k]}") for k in range(K)]
            covariances += [second[i, j].compare(p, float(Sigma[p, i, j]), f"{where}, Sigma[{names[i]},{names[j]}]")
                            for i, j in pairs]
    how = (f"{n} paths x {P} data points, {run.steps} steps{raised} from t = {start:g}; "
           f"tolerance 5 SE + EM bias (N vs N/2 steps)")
    return [worst_row("forward EM: mean", means, how), worst_row("forward EM: covariance", covariances, how)]
