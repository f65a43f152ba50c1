"""Gaussian data N(mu, s^2 I) through any compiled affine SDE: the exact score and densities.

For x0 ~ N(mu, s^2 I) and the kernel N(m(t) x0 + c(t), v(t) I), every marginal is Gaussian,

    p_t = N(m(t) mu + c(t), (m(t)^2 s^2 + v(t)) I),   grad log p_t(x) = -(x - m mu - c) / (m^2 s^2 + v),

so samplers, likelihoods and bounds can be checked against closed forms with a perfect score model.
"""
from __future__ import annotations

import math

import torch


class GaussianData:
    """Data N(mean, std^2 I) of shape `shape` (mean broadcasts over it) diffused by `sde`."""

    def __init__(self, sde, mean, std: float, shape: tuple[int, ...]):
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be positive and finite, got {std!r}")
        self.sde = sde
        self.shape = tuple(shape)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).expand(self.shape).clone()
        self.std = float(std)
        self._means = {}  # (device, dtype) -> mean there: one copy per device, none per call

    def _mean(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._means:
            self._means[key] = self.mean.to(like)
        return self._means[key]

    def _moments(self, t: torch.Tensor, like: torch.Tensor):
        """Mean [B, *shape] and variance [B, 1, ...] of p_t, in like's dtype and device."""
        m = self.sde.mean_coeff(t)
        c = self.sde.mean_offset(t)
        v = self.sde.std(t) ** 2
        expand = self.sde._expand
        mean = expand(m, like) * self._mean(like) + expand(c, like)
        return mean, expand(m**2 * self.std**2 + v, like)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = -(x - m mu - c) / (m^2 s^2 + v)."""
        mean, var = self._moments(t, x)
        return -(x - mean) / var

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x) per sample, in nats."""
        mean, var = self._moments(t, x)
        d = x[0].numel()
        sq = ((x - mean) ** 2 / var).flatten(1).sum(1)
        return -0.5 * sq - 0.5 * d * torch.log(2 * math.pi * var.flatten(1)[:, 0])

    def sample(self, n: int, t: torch.Tensor | None = None, generator=None, dtype=torch.float64):
        """n draws from p_t (p_0, the data, when t is None)."""
        z = torch.randn((n,) + self.shape, generator=generator, dtype=dtype)
        mean = self.mean.to(dtype)
        if t is None:
            return mean + self.std * z
        t = torch.as_tensor(t, dtype=dtype).expand(n)
        mean, var = self._moments(t, z)
        return mean + var.sqrt() * z
