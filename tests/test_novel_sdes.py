"""SDEs from papers that are not among examples/, compiled and compared with references that do not use
sdelang's code: the moment ODEs m' = a m, c' = a c + b, v' = 2 a v + g^2 solved by scipy (DOP853,
rtol 1e-13) or a closed form written here by hand. The bounds are the novel-SDE issue's: float64
relative error 1e-7 on [eps, T], float32 1e-5 (absolute 1e-7 where a quantity crosses zero), and the
time sampler finite for every u in [0, 1]."""
from __future__ import annotations

import math
import sys

import mpmath
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import sdelang

def _sigmoid_difference(a, b):
    """sigmoid(a) - sigmoid(b) without cancellation: (e^-b - e^-a) / ((1 + e^-a)(1 + e^-b)), e^-b - e^-a by expm1."""
    return -np.exp(-b) * np.expm1(b - a) / ((1 + np.exp(-a)) * (1 + np.exp(-b)))


def _sigmoid_gamma(t):
    return _sigmoid_difference(3.0, 6.0 * t - 3.0) / _sigmoid_difference(3.0, -3.0)


def _sigmoid_one_minus_gamma(t):
    return _sigmoid_difference(6.0 * t - 3.0, -3.0) / _sigmoid_difference(3.0, -3.0)


# Karras' sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho as a VE kernel, rho a parameter (PROGRAMS
# and SHORT_STEPS).
KARRAS = """param smin = 0.002
param smax = 80
param rho = 7
x(t) ~ normal(x(0), ((smin^(1/rho) + t * (smax^(1/rho) - smin^(1/rho)))^rho)^2)
t in [1e-5, 1]
prior normal(0, smax^2)
"""

# name -> (program, a(t), b(t), g2(t), v0, exact (m, c, v) or None)
PROGRAMS = {
    # A linear interpolant written by its SDE (Albergo & Vanden-Eijnden; Liu et al.): m = 1 - t, v = t^2, the
    # drift has a pole at t = 1, just past T.
    "interpolant_sde": ("""
sde interpolant_sde
dx = -x / (1 - t) dt + sqrt(2 * t / (1 - t)) dw
t in [1e-3, 0.999]
prior kernel
weighting likelihood
t ~ importance
""", lambda t: -1 / (1 - t), lambda t: 0.0, lambda t: 2 * t / (1 - t), 0.0,
        lambda t: (1 - t, 0.0 * t, t**2)),
    # A VP schedule that oscillates: no closed form for the variance.
    "oscillating_vp": ("""
sde oscillating_vp
beta(t) = 1 + sin(30 * t)^2
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 3]
prior normal(0, 1)
weighting likelihood
t ~ importance
""", lambda t: -0.5 * (1 + np.sin(30 * t) ** 2), lambda t: 0.0, lambda t: 1 + np.sin(30 * t) ** 2, 0.0, None),
    # An exponential beta, beta(t) = b0 e^(k t): t_icdf is (log(b0 + k L) - log(b0)) / k with L ~ b0 eps near u = 0, a
    # difference of nearly equal logs that was 1.1e-3 off in float32 (now log1p(k L / b0) / k).
    "exponential_vp": ("""
sde exponential_vp
param b0 = 0.2
param k = 6
beta(t) = b0 * exp(k * t)
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 1]
prior kernel
weighting likelihood
t ~ importance
""", lambda t: -0.1 * np.exp(6 * t), lambda t: 0.0, lambda t: 0.2 * np.exp(6 * t), 0.0,
        lambda t: (np.exp(-0.2 * np.expm1(6 * t) / 12), 0.0 * t, -np.expm1(-0.2 * np.expm1(6 * t) / 6))),
    # A geometric beta schedule: beta(t) = beta_min (beta_max / beta_min)^t.
    "geometric_vp": ("""
sde geometric_vp
param beta_min = 0.1
param beta_max = 20
beta(t) = beta_min * (beta_max / beta_min)^t
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 1]
prior normal(0, 1)
weighting likelihood
t ~ importance
""", lambda t: -0.5 * 0.1 * 200.0**t, lambda t: 0.0, lambda t: 0.1 * 200.0**t, 0.0, None),
    # An OU process pulled toward a moving mean mu(t) = sin(2 t) (time-varying b(t)).
    "moving_mean_ou": ("""
sde moving_mean_ou
param theta = 2
dx = theta * (sin(2 * t) - x) dt + sqrt(2 * theta) dw
t in [1e-5, 4]
prior normal(0, 1)
weighting likelihood
t ~ uniform
""", lambda t: -2.0, lambda t: 2.0 * np.sin(2 * t), lambda t: 4.0, 0.0, None),
    # A Brownian bridge whose pole sits a parameter d past T: the antiderivative log(1 + d - t) has a negative
    # argument once written in t - d - 1, which must not reach the module as math.log of a negative number.
    "bridge_pole_param": ("""
sde bridge_pole_param
param d = 0.001
dx = -x / (1 + d - t) dt + 1 dw
t in [1e-5, 1]
prior kernel
weighting likelihood
t ~ importance
""", lambda t: -1 / (1.001 - t), lambda t: 0.0, lambda t: 1.0, 0.0,
        lambda t: ((1.001 - t) / 1.001, 0.0 * t, t * (1.001 - t) / 1.001)),
    # An OU process whose rate grows, theta(t) = 1 + t/2, pulled toward k sin(t).
    "ou_growing_rate": ("""
sde ou_growing_rate
param k: real = 0.7
theta(t) = 1 + t / 2
dx = theta(t) * (k * sin(t) - x) dt + sqrt(2 * theta(t)) dw
t in [1e-5, 4]
prior kernel
weighting likelihood
t ~ importance
""", lambda t: -(1 + t / 2), lambda t: 0.7 * np.sin(t) * (1 + t / 2), lambda t: 2 * (1 + t / 2), 0.0, None),
    # An OU process started from x(0) + N(0, 1e-4): SymPy merges v0 into e^(2 t) - 1 as e^(2 t) - 9999/10000, whose
    # float32 value near t = 0 cancels; every closed form found did, and the variance went to the numeric tables.
    # Written expm1(2 t) + 1/10000 (symbolic.use_expm1_log1p) it keeps its closed form.
    "ou_small_v0": ("""
sde ou_small_v0
param theta = 1
dx = -theta * x dt + sqrt(2 * theta) dw
v0 = 1/10000
t in [1e-5, 6]
prior normal(0, 1)
weighting likelihood
t ~ importance
""", lambda t: -1.0, lambda t: 0.0, lambda t: 2.0, 1e-4,
        lambda t: (np.exp(-t), 0.0 * t, 1e-4 * np.exp(-2 * t) - np.expm1(-2 * t))),
    # A Brownian-bridge kernel toward y (BBDM, Li et al. 2023): an offset c(t) = t y and a variance that vanishes at both
    # ends; the derived SDE has a = -1/(1 - t), b = y / (1 - t), g^2 = 2 s.
    "brownian_bridge_kernel": ("""
sde brownian_bridge_kernel
param y: real = 0.5
param s = 1
x(t) ~ normal((1 - t) * x(0) + t * y, 2 * s * (t - t^2))
t in [1e-3, 0.999]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0, lambda t: (1 - t, 0.5 * t, 2 * (t - t * t))),
    # Karras' sigma(t) as a VE kernel (KARRAS).
    "karras_sigma_kernel": ("sde karras_sigma_kernel\n" + KARRAS + "weighting likelihood\nt ~ importance\n",
                            None, None, None, 0.0,
        lambda t: (1 + 0 * t, 0 * t, (0.002 ** (1 / 7) + t * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 14)),
    # score_sde's VP written by its logSNR and shifted by 1.5 (a shifted schedule): m = (1 + e^-1.5 expm1(B))^(-1/2).
    "shifted_vp_logsnr": ("""
sde shifted_vp_logsnr
param shift: real = 1.5
logsnr(t) = shift - log(expm1(t / 10 + 199 * t^2 / 20))
t in [1e-5, 1]
prior normal(0, 1)
weighting likelihood
t ~ importance
""", None, None, None, 0.0,
        lambda t: (1 / np.sqrt(1 + np.exp(-1.5) * np.expm1(t / 10 + 9.95 * t * t)), 0 * t,
                   np.exp(-1.5) * np.expm1(t / 10 + 9.95 * t * t) / (1 + np.exp(-1.5) * np.expm1(t / 10 + 9.95 * t * t)))),
    # Chen's sigmoid schedule (2023) by its kernel: gamma(t) = (sigmoid(end / tau) - sigmoid(z(t))) / (sigmoid(end / tau)
    # - sigmoid(start / tau)), z(t) = (start + t (end - start)) / tau; 1 - gamma is a difference of sigmoids near t = 0.
    "sigmoid_schedule": ("""
sde sigmoid_schedule
param start: real = -3
param end = 3
param tau = 1
v_start = sigmoid(start / tau)
v_end = sigmoid(end / tau)
gamma(t) = (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
x(t) ~ normal(sqrt(gamma(t)) * x(0), 1 - gamma(t))
t in [1e-5, 0.999]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0, lambda t: (np.sqrt(_sigmoid_gamma(t)), 0 * t, _sigmoid_one_minus_gamma(t))),
    # A VE process started from x(0) + N(0, sigma_min^2), sigma(t) geometric (NCSN's schedule, v0 > 0).
    "ve_with_v0": ("""
sde ve_with_v0
param sigma_min = 0.01
param sigma_max = 50
sigma(t) = sigma_min * (sigma_max / sigma_min)^t
dx = sqrt(2 * log(sigma_max / sigma_min)) * sigma(t) dw
v0 = sigma_min^2
t in [1e-5, 1]
prior normal(0, sigma_max^2)
weighting likelihood
t ~ importance
""", lambda t: 0.0, lambda t: 0.0, lambda t: 2 * math.log(5000) * (0.01 * 5000.0**t) ** 2, 1e-4,
        lambda t: (1 + 0 * t, 0 * t, (0.01 * 5000.0**t) ** 2)),
    # Diffusion-LM's sqrt schedule (Li et al. 2022) by its kernel: alpha_bar = 1 - sqrt(t + s).
    "sqrt_schedule": ("""
sde sqrt_schedule
x(t) ~ normal(sqrt(1 - sqrt(t + 1e-4)) * x(0), sqrt(t + 1e-4) - sqrt(1e-4))
t in [1e-5, 0.98]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0,
        lambda t: (np.sqrt(1 - np.sqrt(t + 1e-4)), 0 * t, np.sqrt(t + 1e-4) - np.sqrt(1e-4))),
    # The cosine schedule (Nichol & Dhariwal) by its logSNR: lambda(t) = -2 log tan(pi t / 2).
    "cosine_logsnr": ("""
sde cosine_logsnr
logsnr(t) = -2 * log(tan(pi * t / 2))
t in [1e-4, 0.999]
prior normal(0, 1)
weighting likelihood
t ~ importance
""", None, None, None, 0.0,
        lambda t: (np.cos(np.pi * t / 2), 0 * t, np.sin(np.pi * t / 2) ** 2)),
    # IR-SDE's mean-reverting process (Luo et al. 2023): pulled to mu at rate theta(t), g^2 / theta = 2 lam^2 fixed.
    "mean_reverting": ("""
sde mean_reverting
param mu: real = 0.3
param lam = 0.5
theta(t) = 0.1 + 2 * sin(pi * t / 2)^2
dx = theta(t) * (mu - x) dt + sqrt(2 * lam^2 * theta(t)) dw
t in [1e-5, 1]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0,
        lambda t: (np.exp(-(1.1 * t - np.sin(np.pi * t) / np.pi)), -0.3 * np.expm1(-(1.1 * t - np.sin(np.pi * t) / np.pi)),
                   -0.25 * np.expm1(-2 * (1.1 * t - np.sin(np.pi * t) / np.pi)))),
    # TrigFlow (Lu & Song 2024): x_t = cos(t) x0 + sigma_d sin(t) z, up to just before pi / 2 where cos vanishes.
    "trigflow": ("""
sde trigflow
param sd = 0.5
x(t) ~ normal(cos(t) * x(0), sd^2 * sin(t)^2)
t in [1e-4, 1.5]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0, lambda t: (np.cos(t), 0 * t, 0.25 * np.sin(t) ** 2)),
    # Flow matching's path with sigma_min (Lipman et al. 2023): sigma(t) = 1 - (1 - smin) (1 - t).
    "flow_matching_sigma_min": ("""
sde flow_matching_sigma_min
param smin = 0.001
x(t) ~ normal((1 - t) * x(0), (1 - (1 - smin) * (1 - t))^2)
t in [1e-5, 0.999]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0, lambda t: (1 - t, 0 * t, (0.001 + 0.999 * t) ** 2)),
    # Simple diffusion's interpolated shifted cosine logSNR (Hoogeboom et al. 2023): shift 2 log 2 at t = 0 to -4 log 2.
    "interpolated_cosine_logsnr": ("""
sde interpolated_cosine_logsnr
logsnr(t) = -2 * log(tan(pi * t / 2)) + 2 * log(2) - 6 * log(2) * t
t in [1e-4, 0.999]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0,
        lambda t: (np.sqrt(1 / (1 + np.tan(np.pi * t / 2) ** 2 / 4.0 ** (1 - 3 * t))), 0 * t,
                   1 / (1 + 4.0 ** (1 - 3 * t) / np.tan(np.pi * t / 2) ** 2))),
    # Unit noise written with a bare dw; m = 1 / (1 + t), v = (t + t^2 + t^3 / 3) / (1 + t)^2.
    "harmonic_decay": ("""
sde harmonic_decay
dx = -x / (1 + t) dt + dw
t in [1e-5, 5]
prior kernel
weighting likelihood
t ~ importance
""", None, None, None, 0.0, lambda t: (1 / (1 + t), 0 * t, (t + t * t + t**3 / 3) / (1 + t) ** 2)),
}


def _reference(name: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, c, v) at times t from the exact form, or from the moment ODEs solved by scipy."""
    _, a, b, g2, v0, exact = PROGRAMS[name]
    if exact is not None:
        m, c, v = exact(t)
        return np.broadcast_to(m, t.shape), np.broadcast_to(c, t.shape), np.broadcast_to(v, t.shape)

    def moments(s, y):
        m, c, v = y
        return [a(s) * m, a(s) * c + b(s), 2 * a(s) * v + g2(s)]

    solution = solve_ivp(moments, (0.0, float(t.max())), [1.0, 0.0, v0], method="DOP853", t_eval=t,
                         rtol=1e-13, atol=1e-22)
    assert solution.success
    return solution.y


@pytest.fixture(scope="module")
def modules():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = sdelang.load(PROGRAMS[name][0]).to(torch.float64)
        return cache[name]

    return get


def _times(sde) -> np.ndarray:
    eps, T = float(sde.eps), float(sde.T)
    # geometric near eps, uniform across, and dense near T (where poles sit); not the modules' own nodes
    grid = np.concatenate([np.geomspace(eps, T, 97), np.linspace(eps, T, 101), T - np.geomspace(1e-6, 0.1, 23) * (T - eps)])
    return np.unique(np.clip(grid * (1 + 1e-9 * np.sin(np.arange(grid.size))), eps, T))


def _moments(sde, t: np.ndarray, dtype=torch.float64):
    """m(t), c(t), v(t) by the module's own methods, computed in `dtype`."""
    sde = sde.to(dtype)
    tt = torch.tensor(t, dtype=dtype)
    with torch.no_grad():
        m, c, std = sde.mean_coeff(tt), sde.mean_offset(tt), sde.std(tt)
    sde.to(torch.float64)
    return tuple(np.broadcast_to(q.double().numpy(), t.shape) for q in (m, c, std.double() ** 2))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_kernel_matches_an_independent_reference(modules, name):
    sde = modules(name)
    t = _times(sde)
    m_ref, c_ref, v_ref = _reference(name, t)
    m, c, v = _moments(sde, t)
    scale_c = np.maximum(np.abs(c_ref), np.abs(m_ref) * 1e-3)   # c crosses zero: relative to m's size there
    assert np.max(np.abs(m / m_ref - 1)) < 1e-7, name
    assert np.max(np.abs(c - c_ref) / scale_c) < 1e-7, name
    assert np.max(np.abs(v / v_ref - 1)) < 1e-7, name


# The sigmoid schedule's m = sqrt(gamma) vanishes at t = 1, just past T: its forms tie at the default parameters, and
# the one kept by size was 2e-5 off at t = 0.999; ties are now measured again with each parameter moved 100-fold,
# where the accurate form stands out (symbolic.most_accurate).
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_float32_stays_within_1e_5(modules, name):
    sde = modules(name)
    t = _times(sde)
    t = t.astype(np.float32).astype(np.float64)   # times a float32 tensor holds exactly
    m64, c64, v64 = _moments(sde, t)
    m32, c32, v32 = _moments(sde, t, torch.float32)
    assert np.max(np.abs(m32 / m64 - 1)) < 1e-5, name
    assert np.max(np.abs(c32 - c64) / np.maximum(np.abs(c64), 1e-2 * np.abs(m64))) < 1e-5 or \
        np.max(np.abs(c32 - c64)) < 1e-7, name
    assert np.max(np.abs(np.sqrt(v32 / v64) - 1)) < 1e-5, name


@pytest.mark.parametrize("name", sorted(PROGRAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_time_sampler_is_finite_and_inverts_its_cdf(modules, name, dtype):
    sde = modules(name).to(dtype)
    try:
        u = torch.linspace(0, 1, 2001, dtype=dtype)
        with torch.no_grad():
            t = sde.t_icdf(u)
            assert torch.isfinite(t).all() and (t >= sde.eps * (1 - 1e-6)).all() and (t <= sde.T * (1 + 1e-6)).all()
            draws = sde.sample_t(4096, generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(draws).all()
            if dtype == torch.float64:
                inner = torch.linspace(0.001, 0.999, 999, dtype=dtype)
                assert torch.allclose(sde.t_cdf(sde.t_icdf(inner)), inner, atol=1e-7, rtol=0)
    finally:
        sde.to(torch.float64)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_float32_time_sampler_matches_float64(modules, name):
    """t_icdf in float32 within 1e-5 relative of float64: the form is chosen by its float32 error, which must be
    measured with the constants as the module holds them (Python floats that do not promote float32)."""
    sde = modules(name)
    u = torch.cat([torch.tensor([0.0, 1e-6, 1e-5, 1e-4, 1e-3]), torch.linspace(0.01, 0.99, 99)])
    try:
        with torch.no_grad():
            t64 = sde.to(torch.float64).t_icdf(u.double())
            t32 = sde.to(torch.float32).t_icdf(u)
    finally:
        sde.to(torch.float64)
    assert torch.max(torch.abs(t32.double() / t64 - 1)) < 1e-5, name


DATA_MEAN, DATA_STD = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5


def _gaussian_marginal(name: str, t: float) -> tuple[torch.Tensor, float]:
    """Mean and variance of p_t for data N(DATA_MEAN, DATA_STD^2 I), from the reference moments."""
    m, c, v = (float(q[0]) for q in _reference(name, np.array([t])))
    return m * DATA_MEAN + c, m * m * DATA_STD**2 + v


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_flow_ode_and_likelihood_with_the_exact_score(modules, name):
    """The runtime on each program, with the exact score of Gaussian data: the adaptive flow ODE from draws of p_T
    lands on the exact flow map x_eps = mean_eps + sqrt(S_eps / S_T) (x_T - mean_T), and the likelihood (exact trace)
    equals the model's density prior(Phi(x)) p_eps(x) / p_T(Phi(x)), Phi the exact flow map eps -> T; means and
    variances S from the reference moments, not the module's. The solves run at rtol = atol = 1e-7 (flow) and
    1e-6 (likelihood); the bounds, 1e-4 of the data's scale and 1e-4 nats, leave room for the error each step's
    tolerance lets accumulate (its largest, 9e-6 of the scale and 7e-6 nats, on the bridges with a pole just past
    T, where the flow error is 12x larger at 1e-6), while a drift or g^2 off by 1e-3 misses them."""
    from sdelang.runtime import sampling
    from sdelang.runtime.gaussian import GaussianData
    from sdelang.runtime.likelihood import log_likelihood

    sde = modules(name)
    score = GaussianData(sde, DATA_MEAN, DATA_STD, (2,)).score
    (mean_e, S_e), (mean_T, S_T) = (_gaussian_marginal(name, float(time)) for time in (sde.eps, sde.T))
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampling.probability_flow(sde, score, z.shape, x_T=mean_T + math.sqrt(S_T) * z, denoise=False,
                                    rtol=1e-7, atol=1e-7)
    assert (out.x - (mean_e + math.sqrt(S_e) * z)).abs().max() < 1e-4 * DATA_STD, name

    x = mean_e + math.sqrt(S_e) * z[:32]
    x_T = mean_T + math.sqrt(S_T / S_e) * (x - mean_e)

    def log_normal(y, mean, variance):
        return -((y - mean) ** 2).sum(1) / (2 * variance) - math.log(2 * math.pi * variance)

    expected = log_normal(x, mean_e, S_e) + sde.prior_logp(x_T) - log_normal(x_T, mean_T, S_T)
    result = log_likelihood(sde, score, x, exact_trace=True, rtol=1e-6, atol=1e-6)
    assert (result.logp - expected).abs().max() < 1e-4, name


def test_inverse_cdf_of_a_cube_root_near_eps():
    """The OU process with rate 1 / (1 + t) under the likelihood weighting: Q^-1 solves (1 + t)^3 = 1 + c e^drop,
    t = (1 + c e^drop)^(1/3) - 1, which loses ~u / t near eps (Q(Q^-1(u)) 2.1e-5 off in float32); written
    expm1(log1p(c e^drop) / 3) it keeps float32's digits. Q from L = log(m^2 / v) in mpmath, 30 digits:
    Q(Q^-1(u)) within 1e-6 of u (float32) and 1e-12 (float64)."""
    module = sdelang.load("sde ou_decay\ndx = -x / (1 + t) dt + sqrt(2) dw\nt in [1e-4, 5]\n"
                          "weighting likelihood\nt ~ importance\n")
    with mpmath.workdps(30):
        L = lambda t: -mpmath.log(2 * ((1 + mpmath.mpf(t)) ** 3 - 1) / 3)  # noqa: E731
        Z = L(1e-4) - L(5)
        us = [0.0, 1e-6, 1e-4, 1e-3, 0.1, 0.5, 0.9, 1.0]
        for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            ts = module.to(dtype).t_icdf(torch.tensor(us, dtype=dtype)).tolist()
            assert max(abs((L(1e-4) - L(t)) / Z - u) for t, u in zip(ts, us)) <= bound, dtype


def test_float32_at_a_rate_far_from_the_default():
    """OU compiled at rate theta = 1, used at theta = 30 on [1e-4, 2]: v / m^2 = (e^(2 theta t) - 1) / (2 theta) reaches
    e^120, past float32. logSNR, t_cdf (were -inf) and t_icdf (0.1 off in Q) in float32 against mpmath (30 digits):
    logSNR within 1e-6 relative, Q and Q(Q^-1(u)) within 1e-6."""
    module = sdelang.load("sde ou_rate\nparam theta = 1\ndx = -theta * x dt + sqrt(2 * theta) dw\n"
                          "t in [1e-4, 2]\nweighting likelihood\nt ~ importance\n")
    sde = type(module)(theta=30.0).to(torch.float32)
    with mpmath.workdps(30):
        L = lambda t: -mpmath.log(mpmath.expm1(60 * mpmath.mpf(t)))  # noqa: E731 (v / m^2 = expm1(2 theta t))
        Z = L(1e-4) - L(2)
        t = torch.tensor([1e-4, 1e-3, 0.05, 0.5, 1.0, 2.0], dtype=torch.float32)
        times = t.double().tolist()
        assert max(abs(a / L(b) - 1) for a, b in zip(sde.log_snr(t).tolist(), times)) <= 1e-6
        assert max(abs(a - (L(1e-4) - L(b)) / Z) for a, b in zip(sde.t_cdf(t).tolist(), times)) <= 1e-6
        us = [0.0, 1e-6, 1e-3, 0.5, 0.999, 1.0]
        ts = sde.t_icdf(torch.tensor(us, dtype=torch.float32)).double().tolist()
        assert max(abs((L(1e-4) - L(a)) / Z - u) for a, u in zip(ts, us)) <= 1e-6


# The likelihood weighting written out, `weighting beta(t)`: the CDF's antiderivative is log(expm1(-B)), real as
# a difference F(t) - F(eps) but the log of a negative number term by term: the module once refused to build
# ("math domain error"). Linear and quadratic beta; B(t) = int_0^t beta by hand.
WRITTEN_OUT = {
    "linear": ("param b0 = 0.1\nparam b1 = 19.9\nbeta(t) = b0 + b1 * t\n",
               lambda t: 0.1 * t + 19.9 * t**2 / 2),
    "quadratic": ("param b0 = 0.1\nparam b1 = 4\nparam b2 = 15\nbeta(t) = b0 + b1 * t + b2 * t^2\n",
                  lambda t: 0.1 * t + 2 * t**2 + 5 * t**3),
}


@pytest.mark.parametrize("schedule", sorted(WRITTEN_OUT))
def test_likelihood_weighting_written_as_a_custom_one(schedule):
    """q, Q and Q^-1 of `weighting beta(t)` against Q(t) = (L(eps) - L(t)) / Z, L = -log(expm1(B(t))) (mpmath, 30
    digits): float64 within 1e-12, float32 within 1e-6 (Q and Q(Q^-1(u)) absolute, q relative)."""
    header, B = WRITTEN_OUT[schedule]
    program = (f"sde written_out\n{header}dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw\nt in [1e-5, 1]\n"
               f"prior normal(0, 1)\nweighting beta(t)\nt ~ importance\n")
    module = sdelang.load(program)
    with mpmath.workdps(30):
        L = lambda t: -mpmath.log(mpmath.expm1(B(mpmath.mpf(t))))  # noqa: E731
        Z = L(1e-5) - L(1)
        Q = lambda t: (L(1e-5) - L(t)) / Z  # noqa: E731
        ts = [1e-5, 2e-5, 1e-4, 1e-3, 0.01, 0.1, 0.5, 1.0]
        us = [0.0, 1e-6, 1e-3, 0.1, 0.5, 0.9, 1.0]
        for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
            sde = module.to(dtype)
            t = torch.tensor(ts, dtype=dtype)
            assert max(abs(Q(a) - b) for a, b in zip(ts, sde.t_cdf(t).tolist())) <= bound
            assert max(abs(b / (-mpmath.diff(L, a) / Z) - 1) for a, b in zip(ts, sde.t_density(t).tolist())) <= bound
            assert max(abs(Q(a) - u) for a, u in zip(sde.t_icdf(torch.tensor(us, dtype=dtype)).tolist(), us)) <= bound


# discretize over short steps in float32, against the exact one-step law at the same float32 (s, t) in mpmath
# (40 digits): name -> (program, m(t), v(t)); sub-VP and cosine in kernel form, whose closed forms the step's
# rewrites work on (the numeric tables' step: test_float32_discretize_on_the_tables). G^2 = v(t) - r^2 v(s) was
# computed as a ratio or a difference of values of B, 1.5e-3 (VP with a quadratic beta), 5e-4 (exponential beta), 1.1e-3 (sub-VP), 2.8e-3 (cosine) and 5.5e-2
# (flow matching with sigma_min) off at h = 1e-5; cosine 1.4e-5 and flow matching 5e-4 at the default h = 1e-3.
SHORT_STEPS = {
    "quadratic_vp": ("""
sde quadratic_vp
beta(t) = 1/10 + 4 * t + 15 * t^2
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 1]
""", lambda t: mpmath.exp(-(t / 10 + 2 * t**2 + 5 * t**3) / 2), lambda t: -mpmath.expm1(-(t / 10 + 2 * t**2 + 5 * t**3))),
    "exponential_vp": ("""
sde exponential_vp
beta(t) = 1/5 * exp(6 * t)
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 1]
""", lambda t: mpmath.exp(-mpmath.expm1(6 * t) / 60), lambda t: -mpmath.expm1(-mpmath.expm1(6 * t) / 30)),
    "sub_vp": ("""
sde sub_vp
B(t) = t / 10 + 199/20 * t^2
x(t) ~ normal(exp(-B(t) / 2) * x(0), (1 - exp(-B(t)))^2)
t in [1e-5, 1]
""", lambda t: mpmath.exp(-(t / 10 + 199 * t**2 / 20) / 2), lambda t: mpmath.expm1(-(t / 10 + 199 * t**2 / 20)) ** 2),
    # Sub-VP by its SDE with numbers for the parameters: the variance's integrand, (1 + 199 t) sinh(B) / 5 to SymPy, took
    # the numeric tables (G 3e-3 off at h = 1e-5) until the inspection for c E' e^E terms gathered each exponential.
    "sub_vp_sde": ("""
sde sub_vp_sde
beta(t) = 1/10 + 199/10 * t
B(t) = t / 10 + 199/20 * t^2
dx = -1/2 * beta(t) * x dt + sqrt(beta(t) * (1 - exp(-2 * B(t)))) dw
t in [1e-5, 1]
""", lambda t: mpmath.exp(-(t / 10 + 199 * t**2 / 20) / 2), lambda t: mpmath.expm1(-(t / 10 + 199 * t**2 / 20)) ** 2),
    "cosine_vp": ("""
sde cosine_vp
phi(t) = (t + 1/125) / (1 + 1/125) * pi / 2
x(t) ~ normal(cos(phi(t)) / cos(phi(0)) * x(0), 1 - cos(phi(t))^2 / cos(phi(0))^2)
t in [1e-5, 0.9946]
""", lambda t: mpmath.cos((t + mpmath.mpf(1) / 125) / (1 + mpmath.mpf(1) / 125) * mpmath.pi / 2)
        / mpmath.cos(mpmath.mpf(1) / 125 / (1 + mpmath.mpf(1) / 125) * mpmath.pi / 2),
        lambda t: 1 - (mpmath.cos((t + mpmath.mpf(1) / 125) / (1 + mpmath.mpf(1) / 125) * mpmath.pi / 2)
                       / mpmath.cos(mpmath.mpf(1) / 125 / (1 + mpmath.mpf(1) / 125) * mpmath.pi / 2)) ** 2),
    # An OU process whose rate decays, theta = 1 / (1 + t): N = v / m^2 = 2 ((1 + t)^3 - 1) / 3 is a polynomial, whose
    # difference termwise (2 t - 2 s and the rest rounded apart) or as a ratio left G 8e-5 off at the default step.
    "ou_decay": ("""
sde ou_decay
dx = -x / (1 + t) dt + sqrt(2) dw
t in [1e-4, 5]
""", lambda t: 1 / (1 + t), lambda t: 2 * ((1 + t) ** 3 - 1) / (3 * (1 + t) ** 2)),
    # beta = 1 / sqrt(t), integrable at 0: B = 2 sqrt(t), whose difference over a step lost ~2 t / (t - s) roundings
    # (G 3.6e-5 off at the default step) until sqrt(t) - sqrt(s) became (t - s) / (sqrt(t) + sqrt(s)).
    "sqrt_beta": ("""
sde sqrt_beta
dx = -1/2 * x / sqrt(t) dt + t^(-1/4) dw
t in [1e-5, 1]
""", lambda t: mpmath.exp(-mpmath.sqrt(t)), lambda t: -mpmath.expm1(-2 * mpmath.sqrt(t))),
    # A cosine schedule by its logSNR: m = sqrt(sigmoid(logSNR)) came out |sin(pi (t - 1) / 2)|, whose ratio over a
    # step cancels (G 2.1e-5 off); with the sign proved on [eps, T] the Abs goes and r - 1 is a product of sines.
    "cosine_logsnr": ("""
sde cosine_logsnr
logsnr(t) = -2 * log(tan(pi * t / 2))
t in [1e-4, 0.99]
""", lambda t: mpmath.cos(mpmath.pi * t / 2), lambda t: mpmath.sin(mpmath.pi * t / 2) ** 2),
    "flow_matching": ("""
sde flow_matching
x(t) ~ normal((1 - t) * x(0), (1/100 + 99/100 * t)^2)
t in [1e-5, 0.99]
""", lambda t: 1 - t, lambda t: (mpmath.mpf(1) / 100 + 99 * t / 100) ** 2),
    # The same with sigma_min = 1e-3 up to 0.999, 1e-3 before the pole of N = v / m^2: one fraction for N(t) - N(s)
    # has a numerator that cancels there (G 2e-5 off); written (P/Q)(s)^2 expm1(2 log1p(...)) it does not.
    "flow_matching_near_the_pole": ("""
sde flow_matching_near_the_pole
x(t) ~ normal((1 - t) * x(0), (1/1000 + 999/1000 * t)^2)
t in [1e-5, 0.999]
""", lambda t: 1 - t, lambda t: (mpmath.mpf(1) / 1000 + 999 * t / 1000) ** 2),
    # Karras' sigma = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho as a VE kernel: G^2 = sigma(t)^2 - sigma(s)^2
    # is a difference of 14th powers (2.7e-3 off at h = 1e-5), kept by discretize.power_step_difference.
    "karras_ve": ("sde karras_ve\n" + KARRAS, lambda t: mpmath.mpf(1),
        lambda t: (mpmath.mpf("0.002") ** (mpmath.mpf(1) / 7) + t * (mpmath.mpf(80) ** (mpmath.mpf(1) / 7)
                                                                    - mpmath.mpf("0.002") ** (mpmath.mpf(1) / 7))) ** 14),
}


@pytest.mark.parametrize("name", sorted(SHORT_STEPS))
def test_float32_discretize_over_short_steps(name):
    """G within 1e-5 relative and f = (r - 1) x within 1e-5 |x| in float32, for steps h = 1e-3 (the default T / N),
    1e-4 and 1e-5 ending at t from 0.01 to T (the issue's float32 bound)."""
    program, m, v = SHORT_STEPS[name]
    sde = sdelang.load(program).float()
    assert sde.kernel_path == "closed form"
    T = float(sde.T)
    worst_G, worst_f = short_step_errors(sde, m, v, [0.01, 0.1, 0.3, 0.5, 0.7, 0.9 * T, T])
    assert worst_G <= 1e-5 and worst_f <= 1e-5, (worst_G, worst_f)
    # The first step starts at s = 0, where a form that divides by a value at s must not be taken.
    f, G = sde.discretize(torch.ones(2, 1), torch.tensor([1e-5, 1e-4]), torch.zeros(2))
    assert torch.isfinite(f).all() and torch.isfinite(G).all() and (G > 0).all()


def short_step_errors(sde, m, v, times):
    """The largest relative errors of G and of f = (r - 1) x (x = -1.7) of float32 steps of h = 1e-3, 1e-4, 1e-5
    ending at the times, against mpmath (40 digits) at the same float32 (s, t), for a kernel with c = 0."""
    worst_G = worst_f = 0.0
    for h in (1e-3, 1e-4, 1e-5):
        t = torch.tensor(times, dtype=torch.float32)
        s = t - h
        x = torch.full((len(t), 1), -1.7, dtype=torch.float32)
        f, G = sde.discretize(x, t, s)
        assert f.dtype == G.dtype == torch.float32
        with mpmath.workdps(40):
            for i, (ti, si) in enumerate(zip(t.double().tolist(), s.double().tolist())):
                ti, si = mpmath.mpf(ti), mpmath.mpf(si)
                r = m(ti) / m(si)
                worst_G = max(worst_G, float(abs(G[i].item() / mpmath.sqrt(v(ti) - r**2 * v(si)) - 1)))
                worst_f = max(worst_f, float(abs(f[i, 0].item() - (r - 1) * -1.7) / 1.7))
    return worst_G, worst_f


def test_float32_discretize_on_the_tables(examples):
    """The same bounds where m and v come from the numeric tables (examples/numeric.sde, beta = 1 + t^2 + sin 3t):
    the step looks the tables up and combines them in float64. In float32, G was 2.4e-5 off at the default step and
    4.5e-3 at h = 1e-5 (log v(t) - log v(s) with ~2^-24 |log v| of error); now 6e-8. The reference: B in closed
    form, v = m^2 int_0^t beta (1 + u) e^B(u) du by mpmath's quadrature, 40 digits."""
    sde = examples["numeric"].build(dtype=torch.float32)
    assert sde.kernel_path != "closed form"
    B = lambda t: t + t**3 / 3 + (1 - mpmath.cos(3 * t)) / 3  # noqa: E731
    m = lambda t: mpmath.exp(-B(t) / 2)  # noqa: E731
    v = lambda t: m(t) ** 2 * mpmath.quad(  # noqa: E731
        lambda u: (1 + u**2 + mpmath.sin(3 * u)) * (1 + u) * mpmath.exp(B(u)), [0, t])
    T = float(sde.T)
    worst_G, worst_f = short_step_errors(sde, m, v, [0.01, 0.1, 0.5, 0.9 * T, T])
    assert worst_G <= 1e-5 and worst_f <= 1e-5, (worst_G, worst_f)


THIRD_ORDER = """
sde third_order
param L = 2
dx = v dt
dv = (-x + L * y) dt
dy = (-L * v - 2 * y) dt + 2 dw
v(0) ~ normal(0, 0.04)
y(0) ~ normal(0, 0.04)
t in [1e-5, 10]
weighting likelihood
t ~ uniform
"""


def test_a_three_component_chain_matches_the_lyapunov_ode():
    """A third-order Langevin chain (position, velocity, a driven third component) on [1e-5, 10]: Phi(t) and
    Sigma(t) against Phi' = F Phi, Sigma' = F Sigma + Sigma F^T + D solved by scipy (DOP853, rtol 1e-13),
    to 1e-6 of each matrix's size, and independent of the batch a time comes in."""
    sde = sdelang.load(THIRD_ORDER).to(torch.float64)
    F = np.array([[0.0, 1, 0], [-1, 0, 2], [0, -2, -2]])
    D = np.diag([0.0, 0, 4])
    Sigma0 = np.diag([0.0, 0.04, 0.04])

    def flow(s, y):
        Phi, Sigma = y[:9].reshape(3, 3), y[9:].reshape(3, 3)
        return np.concatenate([(F @ Phi).ravel(), (F @ Sigma + Sigma @ F.T + D).ravel()])

    t = np.unique(np.concatenate([np.geomspace(1e-5, 10, 40), np.linspace(1e-5, 10, 41)]))
    solution = solve_ivp(flow, (0.0, 10.0), np.concatenate([np.eye(3).ravel(), Sigma0.ravel()]), method="DOP853",
                         t_eval=t, rtol=1e-13, atol=1e-20)
    assert solution.success
    with torch.no_grad():
        Phi, Sigma = sde.kernel(torch.tensor(t))
    order = [sde.components.index(name) for name in ("x", "v", "y")]   # the module's order of the state
    for i in range(len(t)):
        Phi_ref = solution.y[:9, i].reshape(3, 3)
        Sigma_ref = solution.y[9:, i].reshape(3, 3)
        got_Phi = Phi[i].numpy()[np.ix_(order, order)]
        got_Sigma = Sigma[i].numpy()[np.ix_(order, order)]
        assert np.abs(got_Phi - Phi_ref).max() <= 1e-6 * np.abs(Phi_ref).max(), t[i]
        assert np.abs(got_Sigma - Sigma_ref).max() <= 1e-6 * np.abs(Sigma_ref).max(), t[i]
    with torch.no_grad():
        alone = [sde.kernel(torch.tensor([time]))[1][0] for time in t[::7]]
    assert all(torch.equal(a, b) for a, b in zip(alone, Sigma[::7]))


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_float32_coefficients_within_their_rounding(modules, name):
    """sde()'s a(t) and g(t) in float32 against float64 at float32 times: computed in float64 and rounded once,
    within one unit u = 2^-24 of float32 (a rounding is at most u/2) plus 2^-40 (|q| + |t q'(t)|) for float64's
    own roundings. Computed in float32 they were held only to 8 u (1 + |t q'/q|), the effect of roundings acting
    as relative perturbations of t, and the shifted logSNR's a(t) = logSNR' sigmoid(-logSNR) / 2 still missed
    that by 1.09x. Kernel-form programs take a and g^2 from the kernel's most accurate forms. The sigmoid
    schedule's a(t) near T was 4.4x the looser bound (2.3e-4 relative at t = 0.999 before a was taken from the
    kernel's forms, 4.6e-5 after) until forms tied at the defaults were compared with the parameters moved."""
    sde = modules(name)
    t32 = torch.tensor(_times(sde), dtype=torch.float64).to(torch.float32)
    t32 = t32[(t32.double() >= float(sde.eps)) & (t32.double() <= float(sde.T))]
    x = torch.ones(len(t32), 1, dtype=torch.float64)
    try:
        t = t32.double().requires_grad_(True)
        drift, g = sde.to(torch.float64).sde(x, t)
        a = drift[:, 0] - sde.sde(torch.zeros_like(x), t)[0][:, 0]
        da, dg = (torch.autograd.grad(q.sum(), t, retain_graph=True)[0] if q.requires_grad else torch.zeros_like(t)
                  for q in (a, g))   # a constant coefficient has no graph
        with torch.no_grad():
            drift32, g32 = sde.to(torch.float32).sde(x.float(), t32)
            a32 = drift32[:, 0] - sde.sde(torch.zeros_like(x).float(), t32)[0][:, 0]
    finally:
        sde.to(torch.float64)
    u = 2.0**-24
    # a32 is read as (a + b) - b in float32: that sum's rounding, u/2 |a + b|, and the difference's, u/2 |a|, are
    # the test's own (zero where b = 0).
    reading = u * (drift[:, 0].detach().abs() + a.detach().abs()) / 2 * (drift[:, 0] != a)
    for what, q32, q, dq, extra in (("a", a32, a, da, reading), ("g", g32, g, dg, 0)):
        q, dq = q.detach(), dq.detach()
        bound = u * q.abs() + 2.0**-40 * (q.abs() + (t.detach() * dq).abs()) + extra + 1e-30
        assert torch.all((q32.double() - q).abs() <= bound), (name, what, float(((q32.double() - q).abs() / bound).max()))


PULLED_TO_A_DECAYING_TARGET = """
sde decaying_target
{theta}
param mu: real = 2
dx = theta * (mu * exp(-t) - x) dt + 0.8 dw
t in [1e-5, 5]
weighting likelihood
t ~ uniform
"""


def test_a_parameter_where_the_closed_form_divides_by_zero():
    """c(t) = mu theta e^(-theta t) expm1((theta - 1) t) / (theta - 1) holds for theta != 1: the module refuses
    theta = 1 with a message (it raised ZeroDivisionError from its constants), works at other values, and the
    constant the message suggests derives the case: c(t) = mu t e^(-t)."""
    sde = sdelang.load(PULLED_TO_A_DECAYING_TARGET.format(theta="param theta = 1.5"))
    with pytest.raises(ValueError, match=r"theta - 1 = 0 at theta = 1\.0: .*declare theta in the program as a"):
        type(sde)(theta=1.0)
    t = torch.tensor([1e-5, 0.3, 2.0, 5.0], dtype=torch.float64)
    near = type(sde)(theta=1.0 + 2**-30).to(torch.float64)
    fixed = sdelang.load(PULLED_TO_A_DECAYING_TARGET.format(theta="theta = 1")).to(torch.float64)
    exact = 2 * t * torch.exp(-t)
    assert torch.allclose(fixed.mean_offset(t), exact, rtol=1e-12, atol=0)
    assert torch.allclose(near.mean_offset(t), exact, rtol=1e-7, atol=0)


def test_a_parameter_beside_numeric_tables():
    """Divisors read from the tables (Z = logSNR(eps) - logSNR(T) here) are not checked in the constructor, which
    runs before the tables are built: such a check raised AttributeError from every module with tables and a
    parameter in a divisor."""
    sde = sdelang.load("sde tabulated_noise\nparam a = 0.5\ndx = -a * x dt + sqrt(2 + sin(10 * t)) dw\n"
                       "t in [1e-5, 1]\nweighting likelihood\nt ~ importance\n")
    assert sde.kernel_path.startswith("numeric")
    other = type(sde)(a=0.7).to(torch.float64)
    t = torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)
    assert torch.isfinite(other.t_density(t)).all() and torch.isfinite(other.std(t)).all()


def test_a_small_v0_keeps_its_closed_form(modules):
    """The variance of ou_small_v0 is a closed form (not the tables), accurate in float32 near eps."""
    sde = modules("ou_small_v0")
    assert sde.kernel_path == "closed form"
    t = torch.tensor([1e-5, 1.1e-5, 1e-4, 1e-3], dtype=torch.float32)
    assert torch.allclose(sde.to(torch.float32).std(t).double(), sde.to(torch.float64).std(t.double()), rtol=1e-5, atol=0)


def test_float32_steps_at_parameters_far_from_the_defaults(examples):
    """discretize computes in float64 and rounds once: VDM's r - 1 = expm1(-log1p(e^gamma_min e^(B(s)) expm1(...) /
    (e^(B(s) + gamma_min) + 1)) / 2), chosen at the defaults, overflowed float32 with a logSNR spanning 100 and gave
    f = -x (r = 0) where r is 0.95."""
    params = {"gamma_min": -50.0, "gamma_max": 50.0}
    t = torch.tensor([0.1, 0.5, 0.9, 0.95, 1.0])
    s = t - 1e-3
    x = torch.ones(5, 1)
    f32, G32 = examples["vdm"].build(params, dtype=torch.float32).discretize(x, t, s)
    f64, G64 = examples["vdm"].build(params).discretize(x.double(), t.double(), s.double())
    assert torch.allclose(f32.double(), f64, rtol=1e-6, atol=1e-7) and torch.allclose(G32.double(), G64, rtol=1e-6)


def test_float32_mean_and_std_with_a_large_exponent(examples):
    """mean_coeff, std and marginal_prob compute in float64 and round once: VP with beta_max = 200 has m = e^u with u
    ~ -50 at T (m ~ 1e-22, a normal float32 number), where float32 arithmetic on the exponent lost 5.5e-6 of m."""
    params = {"beta_min": 0.1, "beta_max": 200.0}
    t = torch.linspace(0.5, 1.0, 51)
    sde32, sde64 = examples["vp"].build(params, dtype=torch.float32), examples["vp"].build(params)
    for name in ("mean_coeff", "std"):
        got, want = getattr(sde32, name)(t).double(), getattr(sde64, name)(t.double())
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=2**-23, atol=0), name
    mean, std = sde32.marginal_prob(torch.ones(51, 1), t)
    assert mean.dtype == std.dtype == torch.float32
    assert torch.allclose(mean[:, 0].double(), sde64.mean_coeff(t.double()), rtol=2**-23, atol=0)


FAST_OU = """
sde fast_ou
param k = 500
dx = -k * x dt + sqrt(2 * k) dw
t in [1e-5, 1]
prior normal(0, 1)
weighting likelihood
t ~ importance
"""


@pytest.mark.parametrize("rate, written", [(20, "number"), (300, "number"), (500, "number"), (3000, "number"),
                                           (500, "parameter")])
def test_inverse_cdf_of_a_fast_process(rate, written):
    """An OU process with rate k under the likelihood weighting: t = log1p(K e^drop) / 2k, drop up to Z ~ 2k. SymPy
    read e^(2k t) as a polynomial of degree 2k in e^t and ran out of time from k = 300 (solved in tau = 2k t now),
    and at k = 500 e^drop overflows float64 (Z = 1005): printed as softplus(drop + log K) the inverse is a closed
    form at every rate (a table before, 4-5 s of compile; at k = 3000 also because the check of the root turned
    e^(6000 t) into a Python complex, which overflowed). Against mpmath's root of logSNR(t) = logSNR(eps) - u Z
    (40 digits): relative error of t below 8 u of each dtype (the few roundings of a float64 closed form, then one to
    float32). With the rate a parameter SymPy solves in e^(2k t) at once; the softplus form then needs the sign of
    K = -e^(2k eps) expm1(-2k eps), which its assumptions cannot tell (expm1's is its argument's)."""
    program = FAST_OU.replace("k = 500", f"k = {rate}")
    if written == "number":
        program = program.replace(f"param k = {rate}\n", "").replace("-k * x", f"-{rate} * x").replace("2 * k", str(2 * rate))
    sde = sdelang.load(program)
    assert sde.inverse_cdf_path == "closed form"
    with mpmath.workdps(40):
        def L(t):
            return -2 * rate * t - mpmath.log(-mpmath.expm1(-2 * rate * t))
        eps, T = mpmath.mpf("1e-5"), mpmath.mpf(1)
        Z = L(eps) - L(T)
        u = [0.0, 1e-6, 1e-3, 0.1, 0.5, 0.7, 0.9, 0.99, 1 - 1e-6, 1.0]
        ref = [float(mpmath.findroot(lambda x: L(x) - (L(eps) - mpmath.mpf(p) * Z), (eps, T), solver="anderson"))
               if 0 < p < 1 else float(eps if p == 0 else T) for p in u]
    ref = torch.tensor(ref, dtype=torch.float64)
    for dtype, unit in ((torch.float64, 2.0**-53), (torch.float32, 2.0**-24)):
        with torch.no_grad():
            t = sde.to(dtype).t_icdf(torch.tensor(u, dtype=dtype)).double()
        assert torch.all((t / ref - 1).abs() <= 8 * unit), (rate, dtype, float((t / ref - 1).abs().max()))


def test_an_inverse_that_overflows_float64_goes_to_a_table():
    """A form of the inverse that overflows float64 for some drop in [0, Z] at the defaults is refused, so that the
    module tabulates the inverse instead of returning inf, clamped to T, for the upper part of [0, 1]. Here the
    factor c of exp(drop) is a real parameter, whose sign SymPy cannot know, so no softplus form is offered."""
    import importlib

    import sympy as sp
    from sympy.codegen.cfunctions import expm1

    importance = importlib.import_module("sdelang.compiler.derive.importance")

    t, c = sp.Symbol("t", positive=True), sp.Symbol("c", real=True)
    lsnr = -1000 * t - sp.log(-expm1(-1000 * t))
    args = (lsnr, t, {c: 0.01}, sp.Float(1e-5), sp.Integer(1))
    assert importance._accurate_inverse(sp.log(1 + c * sp.exp(importance.DROP)) / 1000, *args) is None
    assert importance._accurate_inverse(sp.log(1 + c * sp.exp(importance.DROP / 2)) / 1000, *args) is not None


def test_inverse_cdf_at_a_rate_given_to_the_module():
    """Forms are chosen at the defaults: compiled with rate 20, the inverse was log1p(K e^drop) / 2k, and a module
    built with k = 500 (Z = 1005) overflowed to t = T for every u above 0.8 (|Q(t) - u| = 0.2 at u = 0.8), silently.
    Where a softplus form exists it is the only kind considered now: Q(t_icdf(u)) = u to 1e-12 at 25 to 100 times
    the default rate."""
    module = type(sdelang.load(FAST_OU.replace("k = 500", "k = 20")))
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for k in (20.0, 500.0, 2000.0):
        sde = module(k=k).double()
        with torch.no_grad():
            assert (sde.t_cdf(sde.t_icdf(u)) - u).abs().max() < 1e-12, k


@pytest.mark.parametrize("program, values, message", [
    ("ou_small_v0", {"theta": 100.0}, r"t_icdf misses the inverse of t_cdf by 0\.4"),
    ("exponential_vp", {"k": 1000.0}, r"b0 = 0\.2, k = 1000\.0 overflow float64 in this module's constants"),
])
def test_parameters_where_the_forms_chosen_at_the_defaults_fail(examples, program, values, message):
    """Forms are chosen at the program's defaults; far from them a closed form can leave float64. Each of these
    built without complaint and then returned t = T for most u (OU at 100 times its rate, |Q(t) - u| = 0.41), or
    raised a bare OverflowError (an exponential VP whose B(1) = 0.2 e^1000 / 1000). The module now checks itself when
    it is built and says what to do; at the defaults the same check passes (every module here runs it)."""
    module = examples[program[9:-4]].module.SDE if program.startswith("examples/") else \
        type(sdelang.load(PROGRAMS[program][0]))
    with pytest.raises(ValueError, match=message + r".*make these the defaults \('param name = value'\) and recompile"):
        module(**values)
    module()


@pytest.mark.parametrize("beta_max", [2000.0, 1e4, 1e6])
def test_vp_likelihood_far_from_its_defaults(examples, beta_max):
    """VP's variance as -expm1(-B) for any beta (kernel.py): the likelihood-weighted inverse CDF compiled at beta_max =
    20 is right at 100 to 50000 times that (at 100 times it once returned NaN for u above 0.70, then was refused by
    the construction check). Against mpmath's root of logSNR(t) = logSNR(eps) - u Z at 50 digits."""
    sde = examples["vp_likelihood"].module.SDE(beta_max=beta_max).double()
    bmin, eps, T = float(sde.beta_min), float(sde.eps), float(sde.T)
    u = [0.0, 1e-6, 1e-3, 0.1, 0.5, 0.7, 0.9, 0.99, 1 - 1e-6, 1.0]
    with mpmath.workdps(50):
        def L(t):
            B = bmin * t + (beta_max - bmin) * t**2 / 2
            return -B - mpmath.log(-mpmath.expm1(-B))
        lo, Z = L(mpmath.mpf(eps)), L(mpmath.mpf(eps)) - L(mpmath.mpf(T))
        ref = [float(mpmath.findroot(lambda x: L(x) - (lo - p * Z), (mpmath.mpf(eps), mpmath.mpf(T)), solver="anderson"))
               if 0 < p < 1 else (eps if p == 0 else T) for p in u]
    with torch.no_grad():
        got = sde.t_icdf(torch.tensor(u, dtype=torch.float64))
    assert torch.all((got / torch.tensor(ref, dtype=torch.float64) - 1).abs() <= 1e-13), got


def test_load_recompiles_where_the_forms_fail(tmp_path, monkeypatch):
    """sdelang.load (and so the CLI's --param) compiles the program again with the values as its defaults when the
    module refuses them: the OU process at 100 times its rate then gets a tabulated inverse, Q(t_icdf(u)) = u to
    1e-12. Where even the program cannot hold the SDE (an exponential VP at k = 1000: beta = 0.2 e^(1000 t) passes
    float64's range at t = 0.71) the recompile's error says so, an overflow and not a pole."""
    monkeypatch.setenv("SDELANG_CACHE", str(tmp_path))
    sde = sdelang.load(PROGRAMS["ou_small_v0"][0], theta=100.0).double()
    assert sde.theta == 100.0
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    with torch.no_grad():
        assert (sde.t_cdf(sde.t_icdf(u)) - u).abs().max() < 1e-12
    with pytest.raises(sdelang.SdeError, match=r"the drift overflows float64 at t = 0\.71\d* \(with k = 1000\b.*it is "
                                               r"finite there.*beyond 1\.8e308"):
        sdelang.load(PROGRAMS["exponential_vp"][0], k=1000.0)


DECAYING_NOISE = """sde decaying_noise
param theta = 1
param lam: real = 0.5
dx = -theta * x dt + sqrt(2) * exp(lam * t) dw
t in [1e-3, 1]
"""
CHEN_SIGMOID = """sde chen_sigmoid
param st: real = -3
param en = 3
param tau = 0.7
gam(t) = (sigmoid(en / tau) - sigmoid((t * (en - st) + st) / tau)) / (sigmoid(en / tau) - sigmoid(st / tau))
x(t) ~ normal(sqrt(gam(t)) * x(0), 1 - gam(t))
t in [1e-5, 0.999]
weighting likelihood
t ~ importance
"""


def test_load_recompiles_where_the_constants_or_tables_fail(tmp_path, monkeypatch):
    """Values whose module constants leave math's domain or divide by zero, or whose tables cannot be resolved, are
    refused by the constructor as far from the defaults (a ValueError naming them), and load recompiles with them:
    lam = -1.5 < -theta once gave a bare 'math domain error' (log(1 / (lam + theta)), a constant), tau = 0.2 in Chen's
    sigmoid schedule 'the kernel tables cannot be resolved' though at that default it compiles to a closed form.
    Both then match their references: v = e^(-2 theta t) expm1(2 (lam + theta) t) / (lam + theta), and sigma^2 =
    1 - gamma(t) with mpmath."""
    monkeypatch.setenv("SDELANG_CACHE", str(tmp_path))
    module = sdelang.load_module(DECAYING_NOISE)
    with pytest.raises(ValueError, match=r"^the parameters theta = 1\.0, lam = -1\.5 leave a function's domain .*"
                                         r"make these the defaults"):
        module.SDE(lam=-1.5)
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    v = torch.exp(-2 * t) * torch.expm1(-t) / -0.5
    torch.testing.assert_close(sdelang.load(DECAYING_NOISE, lam=-1.5).double().std(t), v.sqrt(), rtol=1e-10, atol=0)

    with pytest.raises(ValueError, match=r"the kernel tables cannot be resolved .* with the parameters st = -3\.0, "
                                         r"en = 3\.0, tau = 0\.2 .*make these the defaults"):
        sdelang.load_module(CHEN_SIGMOID).SDE(tau=0.2)
    sde = sdelang.load(CHEN_SIGMOID, tau=0.2).double()
    sigmoid = lambda u: 1 / (1 + mpmath.exp(-u))  # noqa: E731
    with mpmath.workdps(50):
        gamma = [(sigmoid(15) - sigmoid((6 * mpmath.mpf(s) - 3) / mpmath.mpf("0.2"))) / (sigmoid(15) - sigmoid(-15))
                 for s in (0.01, 0.3, 0.9)]
        want = torch.tensor([float(mpmath.sqrt(1 - g)) for g in gamma], dtype=torch.float64)
    torch.testing.assert_close(sde.std(torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)), want, rtol=1e-9, atol=0)


COUPLED_LOG_NOISE = """sde coupled_log_noise
param beta = 4
param lam: real = 2
dx = beta * v dt
dv = (-beta * x - 2 * beta * v) dt + sqrt(2 * log(lam) * beta) dw
v(0) ~ normal(0, 0.1)
"""
GENERAL_LOG_DRIFT = "sde general_log_drift\nparam lam: real = 2\ndx = -x^3 * log(lam) dt + sqrt(2) dw\nprior normal(0, 1)\n"


@pytest.mark.parametrize("text", [COUPLED_LOG_NOISE, GENERAL_LOG_DRIFT], ids=["coupled", "general"])
def test_coupled_and_general_constants_name_the_values_they_fail_at(tmp_path, monkeypatch, text):
    """Coupled and general modules hoist constants too (log(lam) here): lam = -1 gave a bare 'math domain error'
    from their constructors. They name the values now, as affine modules do, and load recompiles with them, which
    gives the compiler's located error for the coupled program (its noise is not real there)."""
    monkeypatch.setenv("SDELANG_CACHE", str(tmp_path))
    module = sdelang.load_module(text)
    with pytest.raises(ValueError, match=r"^the parameters .*lam = -1\.0 leave a function's domain .*make these the "
                                         r"defaults"):
        module.SDE(lam=-1.0)
    if "coupled" in text:
        with pytest.raises(sdelang.SdeError, match=r"the diffusion of dv is not a real number .*with lam = -1"):
            sdelang.load(text, lam=-1.0)


def test_sub_vp_with_a_large_beta_keeps_its_closed_form():
    """Sub-VP by its SDE with beta_max = 200 written as numbers: the variance's integrand (1 + 1999 s) sinh(B) / 5 has
    terms near e^28 at s = 0.53, and the inspection's check that the derivative of c e^B matches it asked for an
    absolute 1e-20 of a difference evaluated to 30 digits (1e-15 there), so the kernel went to the numeric tables.
    The check is relative to the terms' size now: closed form v = expm1(-B)^2, within 1e-13 of mpmath."""
    sde = sdelang.load("sde sub_vp_200\nbeta(t) = 1/10 + 1999/10 * t\nB(t) = t / 10 + 1999/20 * t^2\n"
                       "dx = -1/2 * beta(t) * x dt + sqrt(beta(t) * (1 - exp(-2 * B(t)))) dw\nt in [1e-5, 1]\n"
                       ).double()
    assert sde.kernel_path == "closed form"
    ts = [1e-5, 1e-3, 0.1, 0.5, 1.0]
    with torch.no_grad():
        std = sde.std(torch.tensor(ts, dtype=torch.float64)).tolist()
    with mpmath.workdps(30):
        for t, s in zip(ts, std):
            exact = -mpmath.expm1(-(mpmath.mpf(t) / 10 + 1999 * mpmath.mpf(t) ** 2 / 20))
            assert abs(s / exact - 1) < 1e-13, t


@pytest.mark.parametrize("v0", [0.25, 25.0, 1e4])
def test_ve_with_initial_variance_inverts_near_eps_far_from_its_default(v0):
    """VE with v0 > 0: t = sqrt((v0 + eps^2) e^drop - v0) cancelled v0 in float64 once v0 >> eps^2 (1.7e-7 relative
    at u = 0 with v0 = 1e4, 5e-7 at u = 1e-12); written (v0 + eps^2) expm1(drop) + eps^2 it keeps every digit. Against
    mpmath (30 digits) of logSNR^-1(logSNR(eps) - u Z), logSNR = -log(v0 + t^2), within 1e-13 relative."""
    sde = sdelang.load("sde ve_v0\nparam v0p = 0.25\ndx = sqrt(2 * t) dw\nv0 = v0p\nt in [1e-3, 80]\nprior kernel\n"
                       "weighting likelihood\nt ~ importance\n", v0p=v0).double()
    u = [0.0, 1e-12, 1e-9, 1e-6, 0.5, 1.0]
    with mpmath.workdps(30):
        eps, T = mpmath.mpf("1e-3"), mpmath.mpf(80)
        L = lambda t: -mpmath.log(v0 + t * t)  # noqa: E731
        Z = L(eps) - L(T)
        ref = [float(mpmath.sqrt(mpmath.exp(-(L(eps) - mpmath.mpf(p) * Z)) - v0)) for p in u]
    with torch.no_grad():
        got = sde.t_icdf(torch.tensor(u, dtype=torch.float64))
    assert torch.all((got / torch.tensor(ref, dtype=torch.float64) - 1).abs() <= 1e-13), got


# The Laplace logSNR schedule (Hang et al. 2024): logSNR = mu - b sign(1/2 - t) log(1 - 2 |t - 1/2|), i.e.
# mu - b log(2 t) up to t = 1/2 and mu + b log(2 - 2 t) after it, joined with one slope (-2 b) but not one curvature.
LAPLACE = ("sde laplace\nparam mu = 1\nparam b = 1/2\nlogsnr(t) = mu - b * sign(1/2 - t) * log(1 - 2 * abs(t - 1/2))\n"
           "t in [1e-3, 0.999]\nprior kernel\nweighting likelihood\nt ~ importance\n")


@pytest.fixture(scope="module")
def laplace():
    return sdelang.load(LAPLACE)


def test_laplace_log_snr_schedule(laplace):
    """Every quantity against the schedule's two pieces written by hand (mpmath, 30 digits), at log-spaced times, both
    sides of t = 1/2 and 1/2 itself (where sign(0) = 0 once made the drift 0 and logSNR' 0; the 1000-step uniform grid
    on [1e-3, 0.999] lands on it): float64 within 1e-7 relative (logSNR relative to max(|logSNR|, 1), the CDF absolute),
    float32 within 1e-5; t_icdf's Q(t) within 1e-7 (float64) and 1e-5 (float32) of u over all of [0, 1], never NaN.
    Before the sign builtin (and written u / |u|) the program was refused as 'a pole at t = 0.5'; with the 0/0 removed the
    compile-time reference solve crawled on float64 noise near t = 0 until the 60 s bound."""
    mu, b = 1, mpmath.mpf(1) / 2
    with mpmath.workdps(30):
        def lam(t):
            return mu - b * mpmath.log(2 * t) if t <= 0.5 else mu + b * mpmath.log(2 - 2 * t)

        def rate(t):  # -logSNR'
            return b / t if t <= 0.5 else b / (1 - t)

        Z = lam(mpmath.mpf("1e-3")) - lam(mpmath.mpf("0.999"))
        reference = {
            "log_snr": lam, "std": lambda t: mpmath.sqrt(1 / (1 + mpmath.exp(lam(t)))),
            "mean_coeff": lambda t: mpmath.sqrt(1 / (1 + mpmath.exp(-lam(t)))),
            "diffusion": lambda t: mpmath.sqrt(rate(t) / (1 + mpmath.exp(lam(t)))),
            "t_density": lambda t: rate(t) / Z, "t_cdf": lambda t: (lam(mpmath.mpf("1e-3")) - lam(t)) / Z}
        times = np.unique(np.concatenate([np.geomspace(1e-3, 0.999, 60), 1 - np.geomspace(1e-3, 0.5, 30),
                                          [0.5 - 1e-9, 0.5, 0.5 + 1e-9]]))
        us = np.concatenate([[0.0, 1e-9], np.linspace(0, 1, 101)[1:-1], [0.5 + 1e-9, 1.0]])
        for dtype, bound in ((torch.float64, 1e-7), (torch.float32, 1e-5)):
            sde = laplace.to(dtype)
            t = torch.tensor(times, dtype=dtype)
            exact_t = [mpmath.mpf(float(s)) for s in t.double()]   # the times float32 holds
            for name, ref in reference.items():
                with torch.no_grad():
                    got = getattr(sde, name)(t).double().reshape(-1).tolist()
                want = [ref(s) for s in exact_t]
                scale = [1.0 if name == "t_cdf" else max(abs(w), 1) if name == "log_snr" else abs(w) for w in want]
                worst = max(float(abs(g - w) / s) for g, w, s in zip(got, want, scale))
                assert worst <= bound, (name, dtype, worst)
            with torch.no_grad():
                ts = sde.t_icdf(torch.tensor(us, dtype=dtype)).double().tolist()
            assert all(math.isfinite(s) for s in ts)
            assert max(abs(float((lam(mpmath.mpf("1e-3")) - lam(mpmath.mpf(s))) / Z) - u)
                       for s, u in zip(ts, us)) <= bound, dtype


def test_laplace_module_states_its_checked_error(laplace):
    """The inverse CDF is a table; the compile-time check (against DOP853 solved in two stretches, split at the kink
    t = 1/2, from 30-digit coefficients where float64 cancels near t = 0) found it within the bound, and says so."""
    doc = sys.modules[type(laplace).__module__].__doc__
    assert "piecewise Chebyshev" in doc and "within the bound 1e-07" in doc


def test_a_drift_that_jumps_is_tabulated_and_checked():
    """dx = -(1 + d/dt |t - 1/2|) x dt + dw: a = -1 - sign(t - 1/2) jumps at t = 1/2, m = exp(1/2 - t - |t - 1/2|).
    The compile-time reference once failed there ('Required step size is less than spacing between numbers': one
    solve across the jump, then sign(0) = 0 at the start of the stretch after it) and the module said 'NOT checked';
    now it is solved in stretches split at the jump, with one-sided values at their ends. m and std against mpmath's
    quadrature of v = int_0^t m(t)^2 / m(s)^2 ds (30 digits, split at 1/2): float64 1e-9, float32 1e-6, at and around
    the jump."""
    sde = sdelang.load("sde kink\ndx = -(1 + d/dt(abs(t - 0.5))) * x dt + 1 dw\n")
    doc = sys.modules[type(sde).__module__].__doc__
    assert "within the bound 1e-07" in doc
    ts = [1e-5, 1e-3, 0.1, 0.4999, 0.5, 0.5001, 0.7, 1.0]
    with mpmath.workdps(30):
        def A(t):
            return mpmath.mpf(1) / 2 - t - abs(t - mpmath.mpf(1) / 2)

        for dtype, bound in ((torch.float64, 1e-9), (torch.float32, 1e-6)):
            module = sde.to(dtype)
            t = torch.tensor(ts, dtype=dtype)
            with torch.no_grad():
                m, s = module.mean_coeff(t).double().tolist(), module.std(t).double().tolist()
            for i, ti in enumerate(mpmath.mpf(x) for x in t.double().tolist()):
                nodes = [0, ti] if ti <= 0.5 else [0, mpmath.mpf(1) / 2, ti]
                v = mpmath.quad(lambda r: mpmath.exp(2 * A(ti) - 2 * A(r)), nodes)
                assert abs(m[i] / mpmath.exp(A(ti)) - 1) <= bound, (dtype, ts[i])
                assert abs(s[i] / mpmath.sqrt(v) - 1) <= bound, (dtype, ts[i])


def test_a_noise_rate_with_a_removable_zero_over_zero_at_t0_is_checked():
    """g^2 = (1 - e^(-k t)) / t is 0/0 at t = 0, where the reference solve starts: its 30-digit evaluation raised
    ZeroDivisionError there (float64 gives NaN, which moves the start to 1e-12 eps), reported as 'the reference
    solution failed ()' and a module marked NOT checked. Now NaN as in float64. v(t) = E1(k t) + log(k t) + gamma
    (by hand, mpmath 30 digits): std within 1e-9 in float64."""
    sde = sdelang.load("sde expm1_rate\nparam k = 5\ndx = sqrt(-expm1(-k * t) / t) dw\nt in [1e-5, 2]\n"
                       "weighting likelihood\nt ~ importance\n").double()
    assert "within the bound 1e-07" in sys.modules[type(sde).__module__].__doc__
    ts = [1e-5, 1e-3, 0.1, 1.0, 2.0]
    with torch.no_grad():
        std = sde.std(torch.tensor(ts, dtype=torch.float64)).tolist()
    with mpmath.workdps(30):
        for t, s in zip(ts, std):
            x = 5 * mpmath.mpf(t)
            assert abs(s / mpmath.sqrt(mpmath.e1(x) + mpmath.log(x) + mpmath.euler) - 1) <= 1e-9, t


SIGMOID_SCHEDULE = """\
sde sigmoid_schedule
param start: real = -3
param stop = 3
param tau = 0.7
gamma(t) = (sigmoid(stop / tau) - sigmoid((start + (stop - start) * t) / tau)) / (sigmoid(stop / tau) - sigmoid(start / tau))
x(t) ~ normal(sqrt(gamma(t)) * x(0), 1 - gamma(t))
t in [1e-5, 0.995]
"""


def test_step_of_a_sigmoid_schedule_keeps_its_digits():
    """Chen's sigmoid schedule (alpha^2 = gamma(t), a difference of sigmoids of t, normalised): r - 1 over a step of
    1e-5 of t near eps is ~1e-11, and from N = v / m^2 written term by term (sigmoids of t minus sigmoids of s) it
    was 3e-7 off in float64. N = C (e^(k t) - 1) / (e^(k (t - 1)) - 1) differenced by the product rule, each
    factor's difference e^(k s) expm1(k (t - s)), keeps it. r - 1 and G against mpmath (60 digits, from gamma as
    written here) at the times and starts the module is given: float64 within 1e-10, float32 within 1e-5 (steps of
    1e-3 and 1e-5 of t), at the defaults and at moved parameters."""
    sde = sdelang.load(SIGMOID_SCHEDULE)
    for params in ({}, {"start": -1.0, "stop": 4.0, "tau": 0.3}):
        start, stop, tau = (params.get(k, d) for k, d in (("start", -3.0), ("stop", 3.0), ("tau", 0.7)))
        with mpmath.workdps(60):
            def gamma(t):
                sig = lambda x: 1 / (1 + mpmath.exp(-x))  # noqa: E731
                lo, hi = sig(mpmath.mpf(start) / tau), sig(mpmath.mpf(stop) / tau)
                return (hi - sig((start + (stop - start) * t) / mpmath.mpf(tau))) / (hi - lo)

            for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
                module = type(sde)(**params).to(dtype)
                for t0, rel, f, G, T, S in _short_steps(module, dtype, (1.5e-5, 3.3e-5, 1e-3, 0.3, 0.99)):
                    r = mpmath.sqrt(gamma(T) / gamma(S))
                    want_G = mpmath.sqrt((1 - gamma(T)) - r**2 * (1 - gamma(S)))
                    assert abs(f / (r - 1) - 1) <= bound, (params, dtype, t0, rel)
                    assert abs(G / want_G - 1) <= bound, (params, dtype, t0, rel)


def _short_steps(module, dtype, times):
    """(t0, rel, f, G, t, s) of module.discretize at x = 1 over steps of 1e-3 and 1e-5 of t ending at each time, t and
    s as mpmath numbers at the values the module is given (float32's rounding of them included)."""
    for t0 in times:
        for rel in (1e-3, 1e-5):
            t = torch.tensor([t0], dtype=dtype)
            s = (t.double() * (1 - rel)).to(dtype)
            with torch.no_grad():
                f, G = module.discretize(torch.ones(1, 1, dtype=dtype), t, s)
            yield (t0, rel, f.double().item(), G.double().item(), mpmath.mpf(t.double().item()),
                   mpmath.mpf(s.double().item()))


def test_step_growth_of_a_logit_log_snr_keeps_its_digits():
    """logSNR = 2 log(1/t - 1): r - 1 = m(t) / m(s) - 1 is ~1e-14 over a step of 1e-5 of t at t = 3e-5, and as a ratio
    minus 1 it was 5e-3 off in float64. From N = v / m^2 = (t / (1 - t))^2 it is expm1(-log1p((N(t) - N(s)) /
    (1 + N(s))) / 2), N(t) - N(s) one fraction with t - s as a factor. Against mpmath (60 digits) at the times and
    starts the module is given: float64 within 1e-10, float32 within 1e-5 (steps of 1e-3 and 1e-5 of t)."""
    sde = sdelang.load("sde logit_logsnr\nlogsnr(t) = 2 * log(1 / t - 1)\nt in [1e-5, 0.999]\n")
    with mpmath.workdps(60):
        def m(t):
            return 1 / mpmath.sqrt(1 + (t / (1 - t)) ** 2)

        for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            module = sde.to(dtype)
            for t0, rel, f, _, T, S in _short_steps(module, dtype, (1.5e-5, 3.3e-5, 1e-3, 0.3, 0.9)):
                assert abs(f / (m(T) / m(S) - 1) - 1) <= bound, (dtype, t0, rel)


# Hang et al.'s Cauchy logSNR schedule, mu + b tan(pi/2 (1 - 2t)) = mu + b cot(pi t): +inf at t = 0 and -inf at t = 1.
CAUCHY = """sde cauchy
param mu: real = 1
param b = 1
logsnr(t) = mu + b * tan(pi / 2 * (1 - 2 * t))
t in [1e-3, 0.999]
weighting likelihood
t ~ importance
"""


@pytest.mark.parametrize("mu, b", [(1.0, 1.0), (0.0, 2.0), (-3.0, 0.5)])
def test_inverse_cdf_of_the_cauchy_schedule(mu, b):
    """t_icdf(u) = 1/2 - atan((y - mu) / b) / pi, y = logSNR(eps) - u Z, by mpmath, to 1e-9 relative for u in [0, 1],
    float32 finite. SymPy's root atan(b / (y - mu)) / pi is the other branch once t > 1/2 (t_icdf = eps for every
    u > 1/2), which log-spaced probes of [1e-3, 0.999] did not see; and the inverse table of logSNR was 5e-3 off
    near u = 1/2, its tolerance taken from the logSNR's size below eps (6e13 at 1e-14 of t)."""
    sde = type(sdelang.load(CAUCHY))(mu=mu, b=b).double()
    near = np.geomspace(1e-9, 1e-2, 8)
    u = np.concatenate([np.linspace(0.0, 1.0, 201), 0.5 + near, 0.5 - near])
    with mpmath.workdps(30):
        L = lambda t: mu + b * mpmath.cot(mpmath.pi * t)   # noqa: E731
        top, Z = L(mpmath.mpf("1e-3")), L(mpmath.mpf("1e-3")) - L(mpmath.mpf("0.999"))
        want = np.array([float(mpmath.mpf(1) / 2 - mpmath.atan((top - mpmath.mpf(x) * Z - mu) / b) / mpmath.pi)
                         for x in u])
    with torch.no_grad():
        got = sde.t_icdf(torch.tensor(u, dtype=torch.float64)).numpy()
        got32 = sde.float().t_icdf(torch.tensor(u, dtype=torch.float32))
    assert np.abs(got / want - 1).max() < 1e-9
    assert torch.isfinite(got32).all() and (got32 >= 1e-3 * (1 - 1e-6)).all() and (got32 <= 0.999 * (1 + 1e-6)).all()


def test_float32_noise_of_a_tiny_step():
    """G below float32's normal range (1e-19) keeps its digits: its square, 1e-38 and below, was rounded to float32
    before the square root (12 % off at t = 1e-3, s = t/2 for logSNR = 100 - 110 t). Against G^2 = -v(t)
    expm1(logSNR(t) - logSNR(s)), v = sigmoid(-logSNR), in mpmath."""
    sde = sdelang.load("sde steep\nlogsnr(t) = 100 - 110 * t\nt in [1e-4, 1]\n").float()
    t = torch.tensor([1e-3, 2e-3, 1e-2], dtype=torch.float32)
    s = t / 2
    with torch.no_grad():
        _, G = sde.discretize(torch.zeros(3, 1), t, s)
    with mpmath.workdps(30):
        want = [float(mpmath.sqrt(-mpmath.expm1(110 * (float(b) - float(a))) / (1 + mpmath.exp(100 - 110 * float(a)))))
                for a, b in zip(t.tolist(), s.tolist())]
    assert want[0] < 1e-19   # the case: a G^2 under float32's least normal number
    assert np.abs(G.reshape(-1).double().numpy() / np.array(want) - 1).max() < 1e-5


def test_step_growth_of_a_power_law_logsnr():
    """r - 1 = m(t)/m(s) - 1 of a VP given by logSNR = -k log t + c0 (m^2 = sigmoid(logSNR)), over steps of 1e-5
    and 1e-3 of t near eps and from s = 0, against mpmath: 1e-12 in float64, 1e-6 in float32. Written as a ratio of
    square roots minus 1 it was 1.8e-4 off in float64 (the accurate form, a power's difference from s, was 0 inf at
    s = 0, so it lost)."""
    sde = sdelang.load("sde powlaw\nparam k = 2.5\nparam c0: real = 1\nlogsnr(t) = -k * log(t) + c0\n"
                       "t in [1e-3, 5]\n")
    t = np.array([1e-3, 1.34e-3, 1.8e-3, 1e-2, 0.3, 1e-3, 0.3])
    s = np.concatenate([t[:5] * (1 - 1e-5), t[5:] * (1 - 1e-3)])
    t, s = np.append(t, 2e-3), np.append(s, 0.0)
    with mpmath.workdps(40):
        m = lambda u: mpmath.sqrt(1 / (1 + mpmath.mpf(u) ** 2.5 * mpmath.exp(-1)))   # noqa: E731
        want = np.array([float(m(a) / m(b) - 1) for a, b in zip(t, s)])
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        with torch.no_grad():
            f, _ = sde.to(dtype).discretize(torch.ones(len(t), 1, dtype=dtype), torch.tensor(t, dtype=dtype),
                                            torch.tensor(s, dtype=dtype))
        got = f.reshape(-1).double().numpy()
        if dtype == torch.float32:   # float32 inputs: the reference at the times float32 holds
            with mpmath.workdps(40):
                want = np.array([float(m(float(np.float32(a))) / m(float(np.float32(b))) - 1) for a, b in zip(t, s)])
        assert np.abs(got / want - 1).max() < bound, dtype


def test_importance_cdf_near_eps_with_a_decaying_rate():
    """Q(t) = (logSNR(eps) - logSNR(t)) / Z for an OU process with rate th0 / (1 + t), logSNR = -log((1 + t)^(2 th0)
    - 1), in mpmath: 1e-9 relative at t = eps (1 + 1e-5), where Q ~ 6e-7. Its constant log(1 + eps), which SymPy
    writes log(100001/100000), was math.log of the rounded ratio: Q(eps) = -4e-13 and 6.6e-7 relative off there."""
    sde = sdelang.load("sde ou_decay\nparam th0 = 1.5\ndx = -th0 / (1 + t) * x dt + sqrt(2 * th0 / (1 + t)) dw\n"
                       "t in [1e-5, 5]\nweighting likelihood\nt ~ importance\n").double()
    t = 1e-5 * (1 + np.array([0.0, 1e-7, 1e-5, 1e-3, 0.1]))
    with mpmath.workdps(40):
        L = lambda u: -mpmath.log((1 + mpmath.mpf(u)) ** 3 - 1)   # noqa: E731
        want = np.array([float((L(1e-5) - L(u)) / (L(1e-5) - L(5))) for u in t])
    with torch.no_grad():
        got = sde.t_cdf(torch.tensor(t, dtype=torch.float64)).numpy()
    assert got[0] == want[0] == 0.0
    assert np.abs(got[2:] / want[2:] - 1).max() < 1e-9 and abs(got[1] - want[1]) < 5e-16


def test_a_weighting_made_negative_by_a_parameter_is_refused():
    """weighting 1 + c sin(10 t) is positive at the default c = 0.5, as the compiler proves, and negative at c = 2,
    where the module built with it had a negative weight and density of t and a CDF that was not monotone (1.007 at
    c = 50). The module refuses such values when built, naming the time; sdelang.load passes the error on."""
    program = ("sde wavy\nparam c = 0.5\ndx = -x dt + sqrt(2) dw\nweighting 1 + c * sin(10 * t)\nt ~ importance\n")
    assert float(sdelang.load(program).weight(torch.tensor([0.47])).min()) > 0
    for c in (2.0, 50.0):
        with pytest.raises(ValueError, match=r"weight is negative at t = 0\.\d+ with the parameters c = "):
            sdelang.load(program, c=c)
