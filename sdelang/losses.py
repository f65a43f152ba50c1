"""Training objectives: weighted denoising score matching and sliced score matching.

Both estimate the weighted score-matching integral (integral convention, as in ScoreFlow, so that
the likelihood weighting lambda = g^2 with reduction="sum" is the bound's score term in nats):

    J(theta; lambda) = 1/2 int_eps^T lambda(t) E_{x_t} | s(x_t, t) - grad log p_t(x_t) |^2 dt

Time is drawn by the module's own sampler (`sde.sample_t`: uniform or importance, as the .sde file
says) with density q(t) = `sde.t_density(t)`, and each draw is weighted by lambda(t) / q(t). With a
noise-prediction model s = -eps_theta / sigma and x_t = m x0 + c + sigma z the denoising form is

    lambda / q * 1/2 | s + z / sigma |^2 = lambda / (q sigma^2) * 1/2 | eps_theta - z |^2,

which for q = lambda / (Z sigma^2) (importance sampling) is the constant Z / 2 times |eps_theta - z|^2.
"""
from __future__ import annotations

import torch

from .config import REDUCTIONS


def _reduce(per_entry: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum (the integral above) or mean over the entries of each sample: [B, ...] -> [B]."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    flat = per_entry.flatten(1)
    return flat.sum(1) if reduction == "sum" else flat.mean(1)


def _perturb(sde, x0: torch.Tensor, generator):
    """t ~ q (the module's sampler), z ~ N(0, I) and x_t = m(t) x0 + c(t) + sigma(t) z."""
    t = sde.sample_t(x0.shape[0], generator=generator)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    return t, z, mean + sde._expand(std, x0) * z


def time_weight(sde, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) / (q(t) sigma(t)^2): the factor in front of 1/2 |eps_theta - z|^2."""
    return sde.weight(t) / (sde.t_density(t) * sde.std(t) ** 2)


def denoising_loss(sde, model, x0: torch.Tensor, *, generator=None, reduction: str = "sum") -> torch.Tensor:
    """Per-sample weighted denoising score matching, [B]: lambda / (q sigma^2) * 1/2 |eps_theta(x_t, t) - z|^2,
    t ~ q (the module's sampler), z ~ N(0, I), x_t = m(t) x0 + c(t) + sigma(t) z.

    `model(x, t, noise=True)` is eps_theta (a ScoreModel, or one wrapped in DistributedDataParallel);
    average the result for the batch loss.
    """
    t, z, x_t = _perturb(sde, x0, generator)
    return time_weight(sde, t) * 0.5 * _reduce((model(x_t, t, noise=True) - z) ** 2, reduction)


def sliced_loss(sde, model, x0: torch.Tensor, *, generator=None, reduction: str = "sum",
                projections: int = 1) -> torch.Tensor:
    """Per-sample weighted sliced score matching, [B]: lambda / q * E_v[ v^T (ds/dx) v + 1/2 |s|^2 ], v ~ N(0, I).

    `model(x, t)` is the score. Equal to the score-matching objective up to a constant that does not depend on the model
    (Song et al. 2019), and it needs samples of p_t only, never the kernel's score. Here x_t comes
    from the kernel; each projection costs one more backward pass (double backprop when training).
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    t, _, x_t = _perturb(sde, x0, generator)
    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        s = model(x_t, t)
        total = 0.5 * _reduce(s**2, reduction)
        for _ in range(projections):
            v = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            (jv,) = torch.autograd.grad((s * v).sum(), x_t, create_graph=True)
            total = total + _reduce(jv * v, reduction) / projections
    return sde.weight(t) / sde.t_density(t) * total


# One per name in config.OBJECTIVES.
LOSSES = {"denoising": denoising_loss, "sliced": sliced_loss}
