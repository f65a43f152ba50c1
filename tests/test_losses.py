"""Score models and training objectives against closed forms.

Gaussian data N(mu, s^2 I) make every expectation explicit. Monte Carlo tolerances are 5 standard
errors of the estimate, computed from the same draws (a false alarm has probability ~6e-7).
"""
from __future__ import annotations

import math

import pytest
import torch

from sdelang.runtime.config import ModelConfig
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.losses import denoising_loss, sliced_loss, time_weight
from sdelang.runtime.models import ScoreModel, build_model

D = 3


class Exact(torch.nn.Module):
    """The true score of Gaussian data, plus an optional constant offset delta in eps-space."""

    def __init__(self, sde, data, delta=0.0):
        super().__init__()
        self.sde, self.data, self.delta = sde, data, delta

    def forward(self, x, t, noise=False):
        eps = -self.sde._expand(self.sde.std(t), x) * self.data.score(x, t) + self.delta
        return eps if noise else -eps / self.sde._expand(self.sde.std(t), x)


def close(samples: torch.Tensor, expected: float, sigmas: float = 5.0):
    mean = samples.mean()
    stderr = samples.std() / math.sqrt(samples.numel())
    assert abs(mean - expected) <= sigmas * stderr + 1e-12, (float(mean), expected, float(stderr))


def log_snr_span(sde) -> float:
    t = torch.tensor([sde.eps, sde.T], dtype=torch.float64)
    low, high = sde.log_snr(t)
    return float(low - high)


@pytest.mark.parametrize("name", ["vp", "vp_likelihood", "ve", "ou"])
def test_zero_model_loss_is_the_weighting_integral(examples, name):
    """With eps_theta = 0 the loss is lambda / (q sigma^2) |z|^2 / 2, whose mean is d/2 int lambda / sigma^2 dt:
    d/2 (T - eps) for lambda = sigma^2, d/2 (logSNR(eps) - logSNR(T)) for lambda = g^2 (any sampler of t)."""
    sde = examples[name].build()
    zero = Exact(sde, GaussianData(sde, 0.0, 1.0, (D,)), delta=0.0)
    zero.forward = lambda x, t, noise=False: torch.zeros_like(x)  # eps_theta = 0 (noise=True is all the loss asks)
    x0 = torch.zeros(40_000, D, dtype=torch.float64)
    loss = denoising_loss(sde, zero, x0, generator=torch.Generator().manual_seed(0))
    expected = D / 2 * (log_snr_span(sde) if sde.weighting == "likelihood" else sde.T - sde.eps)
    close(loss, expected)


def test_importance_sampling_makes_the_time_weight_constant(examples):
    """t ~ q = lambda / (Z sigma^2): lambda / (q sigma^2) = Z for every t (MATH.md section 3)."""
    sde = examples["vp_likelihood"].build()
    t = sde.sample_t(1000, generator=torch.Generator().manual_seed(1))
    w = time_weight(sde, t)
    torch.testing.assert_close(w, torch.full_like(w, log_snr_span(sde)), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["vp", "subvp", "vp_likelihood", "ou"])
def test_exact_score_minimises_the_denoising_loss(examples, name):
    """eps* = -sigma grad log p_t minimises E|eps - z|^2 given x_t; an offset delta adds exactly
    E[w] |delta|^2 / 2 (the cross term has mean zero). Same draws for both losses (common numbers)."""
    sde = examples[name].build()
    data = GaussianData(sde, 0.7, 0.4, (D,))
    x0 = data.sample(40_000, generator=torch.Generator().manual_seed(2))
    delta = 0.3
    base = denoising_loss(sde, Exact(sde, data), x0, generator=torch.Generator().manual_seed(3))
    moved = denoising_loss(sde, Exact(sde, data, delta), x0, generator=torch.Generator().manual_seed(3))
    t = sde.sample_t(x0.shape[0], generator=torch.Generator().manual_seed(3))
    weight = time_weight(sde, t)
    close(moved - base - weight * D * delta**2 / 2, 0.0)


@pytest.mark.parametrize("name", ["vp", "vp_likelihood"])
def test_sliced_loss_of_the_exact_score(examples, name):
    """With the true score, E[v^T (ds/dx) v + |s|^2 / 2] = -E|grad log p_t|^2 / 2 = -d / (2 var_t):
    the loss averages to -d/2 int lambda / var_t dt, var_t = m^2 s^2 + v (checked by quadrature)."""
    sde = examples[name].build()
    data = GaussianData(sde, -0.5, 0.6, (D,))
    x0 = data.sample(20_000, generator=torch.Generator().manual_seed(4))
    loss = sliced_loss(sde, Exact(sde, data), x0, generator=torch.Generator().manual_seed(5))
    t = torch.linspace(sde.eps, sde.T, 200_001, dtype=torch.float64)
    var = sde.mean_coeff(t) ** 2 * 0.36 + sde.std(t) ** 2
    integrand = sde.weight(t) / var
    integral = float(torch.trapezoid(integrand, t))
    close(loss, -D / 2 * integral)


def test_score_model_is_minus_noise_over_sigma(examples):
    sde = examples["ve"].build()
    model = build_model(sde, (D,), ModelConfig(width=16, depth=1, embedding=8)).double()
    x = torch.randn(5, D, dtype=torch.float64)
    t = sde.sample_t(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x, t), -model(x, t, noise=True) / sde.std(t)[:, None])


@pytest.mark.parametrize("shape, kind", [((2,), "mlp"), ((1, 8, 8), "unet"), ((1, 28, 28), "unet"), ((3, 8, 8), "mlp")])
def test_models_keep_the_data_shape(examples, shape, kind):
    sde = examples["vp"].build(dtype=torch.float32)
    model = build_model(sde, shape, ModelConfig(kind=kind, width=16, depth=2, embedding=8))
    x = torch.randn((4,) + shape)
    out = model(x, sde.sample_t(4))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_input_scaling_is_generic(examples):
    """The network sees (x - c) / sqrt(m^2 s^2 + v): unit variance at every t for data of std s."""
    seen = []
    sde = examples["ou"].build()

    class Probe(torch.nn.Module):
        def forward(self, x, tau):
            seen.append(x)
            return torch.zeros_like(x)

    model = ScoreModel(sde, Probe(), data_std=0.4)
    data = GaussianData(sde, 0.0, 0.4, (D,))
    for t in (sde.eps, 0.3, sde.T):
        seen.clear()
        x_t = data.sample(20_000, torch.tensor(t), generator=torch.Generator().manual_seed(6))
        model(x_t, torch.full((20_000,), t, dtype=torch.float64), noise=True)
        # unit variance: the sample variance's standard error is sqrt(2 / n) ~ 0.01 (5 sigma: 0.05)
        assert abs(seen[0].var() - 1.0) < 0.05


@pytest.mark.parametrize("config, message", [
    (ModelConfig(kind="transformer"), "unknown model kind"),
    (ModelConfig(kind="unet"), "needs image data"),
    (ModelConfig(kind="unet", depth=4), "divisible by 8"),
    (ModelConfig(width=4), "width must be >= 8"),
    (ModelConfig(embedding=5), "even number"),
])
def test_model_config_errors(examples, config, message):
    sde = examples["vp"].build()
    shape = (1, 28, 28) if config.depth == 4 else (2,)
    with pytest.raises(ValueError, match=message):
        build_model(sde, shape, config)


def test_bad_reduction_and_projections(examples):
    sde = examples["vp"].build()
    data = GaussianData(sde, 0.0, 1.0, (D,))
    x0 = data.sample(4)
    with pytest.raises(ValueError, match="reduction"):
        denoising_loss(sde, Exact(sde, data), x0, reduction="max")
    with pytest.raises(ValueError, match="projections"):
        sliced_loss(sde, Exact(sde, data), x0, projections=0)
