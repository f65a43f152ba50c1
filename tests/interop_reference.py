"""Closed-form kernels of the example SDEs and the exact score and flow map of Gaussian data through them,
written here from the formulas (MATH.md section 1), independent of the generated modules.

For data N(mu, s^2 I) and the kernel N(m x0 + c, v I), p_t = N(m mu + c, (m^2 s^2 + v) I); the flow ODE
is linear in x with the solution x(t) = m_t mu + c_t + (x(r) - m_r mu - c_r) sqrt(V_t / V_r),
V = m^2 s^2 + v, which carries p_r onto p_t.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA_MEAN = 0.3
DATA_STD = 0.5


def _B(t, beta_min=0.1, beta_max=20.0):
    return beta_min * t + (beta_max - beta_min) * t**2 / 2


def _vp(t):
    return torch.exp(-_B(t) / 2), torch.zeros_like(t), -torch.expm1(-_B(t))


def _subvp(t):
    return torch.exp(-_B(t) / 2), torch.zeros_like(t), torch.expm1(-_B(t)) ** 2


def _ve(t, sigma_min=0.01, sigma_max=50.0):
    return torch.ones_like(t), torch.zeros_like(t), (sigma_min * (sigma_max / sigma_min) ** t) ** 2


def _cosine_vp(t, s=0.008):
    phi = lambda u: (u + s) / (1 + s) * math.pi / 2  # noqa: E731
    m = torch.cos(phi(t)) / math.cos(phi(0.0))
    # 1 - m^2 = (cos^2 phi0 - cos^2 phi) / cos^2 phi0 = sin(phi - phi0) sin(phi + phi0) / cos^2 phi0,
    # without the cancellation of 1 - m^2 near t = 0.
    v = torch.sin(phi(t) - phi(0.0)) * torch.sin(phi(t) + phi(0.0)) / math.cos(phi(0.0)) ** 2
    return m, torch.zeros_like(t), v


def _ou(t, theta=1.0, mu=0.5, sigma2=2.0):
    return torch.exp(-theta * t), mu * -torch.expm1(-theta * t), sigma2 / (2 * theta) * -torch.expm1(-2 * theta * t)


def _vdm(t, gamma_min=-13.3, gamma_max=5.0):
    # logSNR = -gamma(t): m^2 = sigmoid(-gamma), v = sigmoid(gamma); m(0)^2 = sigmoid(13.3) < 1.
    gamma = gamma_min + (gamma_max - gamma_min) * t
    return torch.sigmoid(-gamma).sqrt(), torch.zeros_like(t), torch.sigmoid(gamma)


KERNELS = {"vp": _vp, "ve": _ve, "subvp": _subvp, "cosine_vp": _cosine_vp, "ou": _ou, "vdm": _vdm}


def kernel(name: str, t: torch.Tensor):
    """m(t), c(t), v(t) of examples/<name>.sde in float64."""
    return KERNELS[name](t.to(torch.float64))


def marginal(name: str, t: torch.Tensor, mean=DATA_MEAN, std=DATA_STD):
    """Mean and variance of p_t for data N(mean, std^2 I)."""
    m, c, v = kernel(name, t)
    return m * mean + c, m**2 * std**2 + v


def exact_score(name: str, mean=DATA_MEAN, std=DATA_STD):
    """grad log p_t(x) = -(x - m mu - c) / (m^2 s^2 + v), t of shape [B]."""
    def score(x, t, **_):
        mu_t, var_t = marginal(name, t, mean, std)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return (-(x - mu_t.reshape(shape).to(x)) / var_t.reshape(shape).to(x))
    return score


def exact_flow(name: str, x_r: torch.Tensor, r: float, t: float, mean=DATA_MEAN, std=DATA_STD):
    """The probability-flow map from time r to time t for data N(mean, std^2 I)."""
    times = torch.tensor([r, t], dtype=torch.float64)
    mu_t, var_t = marginal(name, times, mean, std)
    return mu_t[1] + (x_r.to(torch.float64) - mu_t[0]) * torch.sqrt(var_t[1] / var_t[0])
