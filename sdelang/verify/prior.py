"""The prior: prior_logp() against prior_sampling(), and how far p_T, the law of the state at T, is from it.

    prior_gap            scalar kernels: KL(p_T || prior) and I(x0; x_T) in closed form, data N(0, s^2)
    prior_gap_simulated  no kernel: KL of a Gaussian fit of Euler-Maruyama paths at T
    coupled_prior_gap    coupled kernels: KL(p_T || prior) and I(x0; u_T) of K-dimensional Gaussians
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .common import (FAIL, IDENTITY_BOUND, KL_WARNING, OK, STANDARD_ERRORS, WARN, CheckResult, Comparison, Settings,
                     affine_kernel, column, components, initial_mean, not_applicable, worst_row)
from .simulation import euler_grid, scalar_paths, starts_at_zero

NOT_GAUSSIAN = "prior_logp is not a normalised Gaussian log-density (see the row above)"
ROUGH_SCALES = (1.0, 1e6, 1e12)  # first offsets from 0: one moves L past its rounding for V below ~1e36


def prior_gaussian(sde) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean mu [K] and covariance V [K, K] of a Gaussian prior over one data entry's K components (K = 1 for
    scalar modules), read off L(u) = prior_logp(u) = const - 1/2 (u - mu)^T P (u - mu), P = V^-1, by
    _quadratic_fit: first at unit offsets from 0 (or 1e6, 1e12 where L is flat there), then twice more at
    offsets of one standard deviation from the mean read so far, where L changes by O(1). Unit offsets
    alone lose the precision P ~ 1/V of a wide prior to the rounding of L: 1.3e-8 of it for V = 9e6.
    Also returns the largest misfit of L against log N(u; mu, V) at u = mu and u = mu + 2.5 C w (C C^T = V,
    w a unit vector): zero for a normalised Gaussian log-density; NaN and inf when L is not a downward
    paraboloid."""
    K = components(sde)
    fit = next((f for f in (_quadratic_fit(sde, np.zeros(K), scale * np.eye(K)) for scale in ROUGH_SCALES)
                if f is not None), None)
    for _ in range(2):  # twice: a first reading through L's rounding may be off by orders of magnitude
        if fit is not None:
            fit = _quadratic_fit(sde, fit[0], np.linalg.cholesky(fit[1]))
    if fit is None:
        return np.full(K, math.nan), np.full((K, K), math.nan), math.inf
    mu, V = fit
    C = np.linalg.cholesky(V)
    probes = np.stack([mu, mu + 2.5 * C @ (np.ones(K) / math.sqrt(K))])
    y = probes - mu
    gaussian = (-0.5 * K * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(V)[1]
                - 0.5 * np.einsum("bi,ij,bj->b", y, np.linalg.inv(V), y))
    misfit = np.abs(sde.prior_logp(column(probes, sde._anchor)).double().cpu().numpy() - gaussian).max()
    return mu, V, float(misfit)


def _quadratic_fit(sde, center: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The mean and covariance of the paraboloid through L(w) = prior_logp(center + C w) at w = 0, +-e_i and
    e_i + e_j: in w, P_ii = 2 L(0) - L(e_i) - L(-e_i), P_ij = L(e_i) + L(e_j) - L(0) - L(e_i + e_j),
    P w_mu = (L(e_i) - L(-e_i)) / 2; then mu = center + C w_mu, V = C P^-1 C^T. None when that P is not
    finite and positive definite."""
    K = len(center)
    eye = np.eye(K)
    pairs = [(i, j) for i in range(K) for j in range(i + 1, K)]
    w = np.concatenate([np.zeros((1, K)), eye, -eye] + [(eye[i] + eye[j])[None] for i, j in pairs])
    L = sde.prior_logp(column(center + w @ C.T, sde._anchor)).double().cpu().numpy()
    L0, plus, minus = L[0], L[1:K + 1], L[K + 1:2 * K + 1]
    P = np.diag(2 * L0 - plus - minus)
    for (i, j), both in zip(pairs, L[2 * K + 1:]):
        P[i, j] = P[j, i] = plus[i] + plus[j] - L0 - both
    if not (np.isfinite(P).all() and np.linalg.eigvalsh(P).min() > 0):
        return None
    Vw = np.linalg.inv(P)
    return center + C @ (Vw @ ((plus - minus) / 2)), C @ Vw @ C.T


def gaussian_kl(mean, variance, prior_mean, prior_variance) -> float:
    """KL(N(mean, variance) || N(prior_mean, prior_variance)) in nats, for numbers or a K-vector and K x K
    matrices: 1/2 [tr(V^-1 S) - K + log det V - log det S + (m - mu)^T V^-1 (m - mu)]; in one dimension
    1/2 [r - 1 - log r + (m - mu)^2 / V], r = S / V."""
    m, mu = np.atleast_1d(np.asarray(mean, float)), np.atleast_1d(np.asarray(prior_mean, float))
    S, V = np.atleast_2d(np.asarray(variance, float)), np.atleast_2d(np.asarray(prior_variance, float))
    d = m - mu
    return float(0.5 * (np.trace(np.linalg.solve(V, S)) - len(m) + np.linalg.slogdet(V)[1]
                        - np.linalg.slogdet(S)[1] + d @ np.linalg.solve(V, d)))


def prior_sampling_row(sde, settings: Settings) -> CheckResult:
    """prior_logp() a normalised Gaussian log-density (misfit within 1e-9), and prior_sampling()'s sample
    means and covariances within 5 standard errors of its mu and V: sqrt(V_kk / n) for a mean,
    sqrt((V_ii V_jj + V_ij^2) / (n - 1)) for a covariance entry (V sqrt(2 / (n - 1)) for a variance)."""
    mu, V, misfit = prior_gaussian(sde)
    n, K, k = settings.paths, components(sde), STANDARD_ERRORS
    u = sde.prior_sampling((n, K), generator=settings.generator(sde._anchor.device, 2)).double().cpu().numpy()
    mean, covariance = u.mean(0), np.atleast_2d(np.cov(u, rowvar=False))
    names = list(sde.components) if K > 1 else ["z"]
    comparisons = [Comparison(misfit, IDENTITY_BOUND, "prior_logp against log N(u; mu, V)")]
    comparisons += [Comparison(abs(mean[i] - mu[i]), k * math.sqrt(V[i, i] / n),
                               f"sample mean {mean[i]:.6g} vs mu {mu[i]:.6g}" + (f" ({names[i]})" if K > 1 else ""))
                    for i in range(K)]
    for i, j in ((i, j) for i in range(K) for j in range(i, K)):
        what = "sample variance" if K == 1 else f"sample covariance [{names[i]},{names[j]}]"
        comparisons.append(Comparison(abs(covariance[i, j] - V[i, j]),
                                      k * math.sqrt((V[i, i] * V[j, j] + V[i, j] ** 2) / (n - 1)),
                                      f"{what} {covariance[i, j]:.6g} vs V {V[i, j]:.6g}"))
    return worst_row("prior: logp vs sampling", comparisons, f"{n} draws, 5 SE")


def _gap_advice(signal: float, variance_ratio: float) -> str:
    if signal > KL_WARNING:
        return "x_T still carries the data: raise T or the diffusion (e.g. beta_max, sigma_max)"
    if abs(variance_ratio - 1) > math.sqrt(2 * KL_WARNING):
        return "the prior's variance is not v(T): state 'prior kernel' or match the prior to N(c(T), v(T))"
    return "the prior's mean is not c(T): state 'prior kernel' or match the prior to N(c(T), v(T))"


def prior_gap(sde, settings: Settings) -> list[CheckResult]:
    """For data N(0, s^2) per dimension (s = --data-std): p_T = N(c_T, m_T^2 s^2 + v_T), and
    KL(p_T || prior) in closed form, in nats per dimension; and I(x0; x_T) = 1/2 log(1 + m_T^2 s^2 / v_T),
    the information about the data left at T (E_x0 KL(p_0T(.|x0) || prior) = I + KL). Either above
    0.01 nats per dimension is a warning: the prior term of the likelihood bound is that large.

    I(x0; x_T) matters on its own: for VP and data of unit variance p_T is N(0, 1) whatever T, so
    KL(p_T || prior) = 0 even when x_T is far from independent of x0."""
    rows = [prior_sampling_row(sde, settings)]
    mu, V, misfit = prior_gaussian(sde)
    if not misfit <= IDENTITY_BOUND:  # NaN included
        return rows + not_applicable(("KL(p_T || prior)", "I(x0; x_T)"), NOT_GAUSSIAN)
    mu, V = float(mu[0]), float(V[0, 0])
    s = settings.data_std
    m, c, v = (float(q) for q in affine_kernel(sde, column([float(sde.T)], sde._anchor)))
    variance = m**2 * s**2 + v
    kl = gaussian_kl(c, variance, mu, V)
    information = 0.5 * math.log1p(m**2 * s**2 / v)
    law = f"data N(0, {s:g}^2): p_T = N({c:.4g}, {variance:.4g}), prior N({mu:.4g}, {V:.4g})"
    kl_note = law if kl <= KL_WARNING else f"{law}; {_gap_advice(information, variance / V)}"
    info_note = f"m(T) = {m:.3g}, v(T) = {v:.4g}"
    if information > KL_WARNING:
        info_note += f"; {_gap_advice(information, variance / V)}"
    return rows + [CheckResult("KL(p_T || prior)", _gap_status(kl), kl, KL_WARNING, _finite_note(kl, kl_note)),
                   CheckResult("I(x0; x_T)", _gap_status(information), information, KL_WARNING,
                               _finite_note(information, info_note))]


def _gap_status(value: float) -> str:
    """ok within KL_WARNING, warn above it, FAIL when not a number at all (NaN compares false both ways)."""
    return OK if value <= KL_WARNING else WARN if math.isfinite(value) else FAIL


def _finite_note(value: float, note: str) -> str:
    return note if math.isfinite(value) else f"{note}; not finite: the kernel or the prior at T is not finite"


def prior_gap_simulated(sde, settings: Settings) -> list[CheckResult]:
    """Without a kernel: p_T estimated by Euler-Maruyama paths from data N(0, s^2), its Gaussian fit
    N(mean, var) compared with the prior by KL (an estimate: the fit ignores p_T's non-Gaussian shape;
    its Monte Carlo error is reported, by the delta method on the sample mean and variance)."""
    rows = [prior_sampling_row(sde, settings)]
    mu, V, misfit = prior_gaussian(sde)
    if not misfit <= IDENTITY_BOUND:  # NaN included
        return rows + not_applicable(("KL(p_T || prior)",), NOT_GAUSSIAN)
    mu, V = float(mu[0]), float(V[0, 0])
    like, s, n = sde._anchor, settings.data_std, settings.paths
    start = 0.0 if starts_at_zero(sde, like) else float(sde.eps)
    T = float(sde.T)
    initial = math.sqrt(s**2 + float(getattr(sde, "v0", 0.0)))  # x(0) = data + N(0, v0)
    grid = euler_grid(sde, start, initial**2, [T], settings.steps, like)
    run = scalar_paths(sde, column([0.0], like), column([initial], like), n, grid, [T],
                       settings.generator(like.device, 3))
    x = run.fine[0][0, :, 0].double()
    diverged = int((~torch.isfinite(x)).sum())
    if diverged:
        return rows + [CheckResult("KL(p_T || prior)", FAIL, math.inf, KL_WARNING,
                                   f"{diverged} of {n} Euler-Maruyama paths from data N(0, {s:g}^2) are not finite "
                                   f"at T: the SDE blows up (or needs smaller steps than --steps {settings.steps})")]
    mean, variance = float(x.mean()), float(x.var())
    kl = gaussian_kl(mean, variance, mu, V)
    # d KL / d mean = (mean - mu) / V,  d KL / d var = (1 / V - 1 / var) / 2;  Var(mean) = var / n,
    # Var(sample variance) ~ (m4 - var^2) / n.
    m4 = float(((x - mean) ** 4).mean())
    se = math.sqrt(((mean - mu) / V) ** 2 * variance / n + ((1 / V - 1 / variance) / 2) ** 2 * (m4 - variance**2) / n)
    note = (f"estimate: Gaussian fit N({mean:.4g}, {variance:.4g}) of {n} Euler-Maruyama paths from data "
            f"N(0, {s:g}^2) vs prior N({mu:.4g}, {V:.4g}), SE {se:.2g}")
    if kl > KL_WARNING:
        note += "; raise T or the diffusion, or move the prior to the simulated p_T"
    return rows + [CheckResult("KL(p_T || prior)", _gap_status(kl), kl, KL_WARNING, _finite_note(kl, note))]


def _vector(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def coupled_prior_gap(sde, settings: Settings) -> list[CheckResult]:
    """For data N(0, s^2) per entry: u_T = Phi_T u0 + noise ~ N(Phi_T u0_aux, s^2 c c^T + Sigma_T) with
    c = Phi_T e_data, a K-dimensional Gaussian per data entry, so in closed form, in nats per data entry:
    KL(p_T || prior) (gaussian_kl), and I(x0; u_T) = 1/2 log det(Sigma_T + s^2 c c^T) / det Sigma_T
    = 1/2 log(1 + s^2 c^T Sigma_T^-1 c), the information about the data left at T. Either above 0.01 nats
    per data entry is a warning, as for scalar kernels."""
    rows = [prior_sampling_row(sde, settings)]
    mu, V, misfit = prior_gaussian(sde)
    if not misfit <= IDENTITY_BOUND:  # NaN included
        return rows + not_applicable(("KL(p_T || prior)", "I(x0; u_T)"), NOT_GAUSSIAN)
    s = settings.data_std
    Phi, Sigma = (q[0].double().cpu().numpy() for q in sde.kernel(column([float(sde.T)], sde._anchor)))
    c = Phi[:, sde.data_index]
    mean = Phi @ initial_mean(sde).cpu().numpy()
    covariance = Sigma + s**2 * np.outer(c, c)
    kl = gaussian_kl(mean, covariance, mu, V)
    information = 0.5 * math.log1p(s**2 * c @ np.linalg.solve(Sigma, c))
    advice = "u_T still carries the data: raise T or the time scale (e.g. beta)"
    kl_note = (f"data N(0, {s:g}^2) per entry: p_T = N({_vector(mean)}, diag {_vector(np.diag(covariance))}), "
               f"prior N({_vector(mu)}, diag {_vector(np.diag(V))}); nats per data entry")
    info_note = f"Phi(T) e_data = {_vector(c)}, diag Sigma(T) = {_vector(np.diag(Sigma))}"
    return rows + [
        CheckResult("KL(p_T || prior)", WARN if kl > KL_WARNING else OK, kl, KL_WARNING,
                    kl_note + (f"; {advice}" if kl > KL_WARNING else "")),
        CheckResult("I(x0; u_T)", WARN if information > KL_WARNING else OK, information, KL_WARNING,
                    info_note + (f"; {advice}" if information > KL_WARNING else "")),
    ]
