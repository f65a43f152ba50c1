"""Training objectives: weighted denoising score matching and sliced score matching, for every kind.

Both estimate the weighted score-matching integral (integral convention, as in ScoreFlow, so that
the likelihood weighting lambda = g^2 with reduction="sum" is the bound's score term in nats):

    J(theta; lambda) = 1/2 int_eps^T lambda(t) E_{x_t} | s(x_t, t) - grad log p_t(x_t) |^2 dt

Time is drawn by the module's own sampler (`sde.sample_t`: uniform or importance, as the .sde file
says) with density q(t) = `sde.t_density(t)`, and each draw is weighted by lambda(t) / q(t).

Affine modules (`sde.kind == "affine"`). With a noise-prediction model s = -eps_theta / sigma and
x_t = m x0 + c + sigma z the denoising form is

    lambda / q * 1/2 | s + z / sigma |^2 = lambda / (q sigma^2) * 1/2 | eps_theta - z |^2,

which for q = lambda / (Z sigma^2) (importance sampling) is the constant Z / 2 times |eps_theta - z|^2.

Coupled modules (state u = (u_1..u_K) per data entry, kernel N(Phi u0, Sigma = A A^T)): hybrid
denoising score matching. u_t = mean + A z (`sde.perturb`); only the noisy components enter the reverse
SDE (D = diag(g_k^2) is zero elsewhere), so only their score is learned, s_N = -L_NN^-T eps_N
(`sde.noise_to_score`), whose kernel target is eps_N = z_N. Per draw, summed over the data entries:

    likelihood      1/q * 1/2 sum_k g_k^2 (noise_to_score(eps_theta - z))_k^2
                    = 1/q * 1/2 sum_k g_k^2 |s_k - grad_k log p_0t(u_t | x0)|^2
    score_matching  1/q * 1/2 sum over noisy k of (eps_theta - z)_k^2

General modules (no Gaussian kernel: drift non-affine or diffusion g(x, t)). Denoising needs the
kernel's score as its target, so it is unavailable; training uses sliced score matching on x_t drawn
by simulating the forward SDE (`models.simulate`: Euler-Maruyama from x(0) = x0 + sqrt(v0) z to each
sample's own t, a fixed number of steps per sample). Why not denoising on a simulated short-step
kernel N(x_s + f h, g^2 h) from x_s = x_{t-h}: its target -(x_t - x_s - f h) / (g^2 h) has variance
~ 1 / (g^2 h) per entry, so the loss's variance grows without bound as h shrinks, while a large h
biases the target by the kernel's non-Gaussian O(h) terms; one would still simulate x_s. Sliced score
matching needs samples of p_t only: it is unbiased whatever p_t is (Song et al. 2019), costs one
extra backward pass per projection, and the simulated x_t carry only Euler-Maruyama's O(h) bias,
which `steps` controls.
"""
from __future__ import annotations

import torch

from .config import OBJECTIVES, REDUCTIONS, SIMULATION_STEPS
from .kinds import kind_of, state_shape
from .models import simulate


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
    """lambda(t) / (q(t) sigma(t)^2): the factor in front of 1/2 |eps_theta - z|^2 (affine modules)."""
    return sde.weight(t) / (sde.t_density(t) * sde.std(t) ** 2)


# Why a coupled SDE cannot be trained by sliced score matching.
_HYBRID = ("a coupled SDE's model learns only the noisy components' score (hybrid score matching, zero at the "
           "others), while sliced score matching fits the score of every component")


def _no_denoising(sde) -> str:
    return dict(getattr(sde, "unavailable", {})).get(
        "denoising score matching", "the module has no Gaussian kernel, whose score is the denoising target")


def denoising_loss(sde, model, x0: torch.Tensor, *, generator=None, reduction: str = "sum") -> torch.Tensor:
    """Per-sample weighted denoising score matching, [B]. Affine: lambda / (q sigma^2) * 1/2 |eps_theta(x_t, t) - z|^2,
    t ~ q (the module's sampler), z ~ N(0, I), x_t = m(t) x0 + c(t) + sigma(t) z. Coupled: hybrid
    denoising score matching on the state u_t (module docstring). General: unavailable (ValueError).

    `model(x, t, noise=True)` is eps_theta (a ScoreModel, or one wrapped in DistributedDataParallel);
    x0 is data [B, ...] for every kind; average the result for the batch loss.
    """
    kind = kind_of(sde)
    if kind == "general":
        raise ValueError(f"denoising score matching is unavailable for this SDE: {_no_denoising(sde)}; "
                         "use the sliced objective")
    if kind == "coupled":
        return _hybrid_denoising_loss(sde, model, x0, generator, reduction)
    t, z, x_t = _perturb(sde, x0, generator)
    return time_weight(sde, t) * 0.5 * _reduce((model(x_t, t, noise=True) - z) ** 2, reduction)


def _hybrid_denoising_loss(sde, model, x0, generator, reduction) -> torch.Tensor:
    """Coupled modules: 1/q * 1/2 sum_k g_k^2 (noise_to_score(eps_theta - z))_k^2 (weighting likelihood) or
    1/q * 1/2 sum over noisy k of (eps_theta - z)_k^2 (score_matching), summed over components per data
    entry and reduced over the data entries. noise_to_score is linear, so its value at eps_theta - z is
    s - (kernel score) at the noisy components and 0 elsewhere."""
    t = sde.sample_t(x0.shape[0], generator=generator)
    z = torch.randn((x0.shape[0],) + state_shape(sde, x0.shape[1:]), generator=generator, device=x0.device,
                    dtype=x0.dtype)
    u_t = sde.perturb(x0, t, z)
    error = model(u_t, t, noise=True) - z
    if sde.weighting == "likelihood":
        g = sde.sde(u_t, t)[1]
        per_entry = sum(sde.split(g**2 * sde.noise_to_score(error, t) ** 2))
    elif sde.weighting == "score_matching":
        per_entry = sum(part for part, noisy in zip(sde.split(error**2), sde.noisy) if noisy)
    else:
        raise ValueError(f"hybrid denoising score matching knows the weightings 'likelihood' and "
                         f"'score_matching'; this coupled SDE has {sde.weighting!r}")
    return 0.5 / sde.t_density(t) * _reduce(per_entry, reduction)


def sliced_loss(sde, model, x0: torch.Tensor, *, generator=None, reduction: str = "sum",
                projections: int = 1, steps: int = SIMULATION_STEPS) -> torch.Tensor:
    """Per-sample weighted sliced score matching, [B]: lambda / q * E_v[ v^T (ds/dx) v + 1/2 |s|^2 ], v ~ N(0, I).

    `model(x, t)` is the score. Equal to the score-matching objective up to a constant that does not depend on the model
    (Song et al. 2019), and it needs samples of p_t only, never the kernel's score. x_t comes from the
    kernel for affine modules and from `simulate` (Euler-Maruyama, `steps` steps) for general ones; each
    projection costs one more backward pass (double backprop when training). Coupled modules learn a
    hybrid score (zero at the noiseless components), which sliced score matching cannot target.
    """
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    kind = kind_of(sde)
    if kind == "coupled":
        raise ValueError(f"sliced score matching is unavailable: {_HYBRID}; use the denoising objective")
    if kind == "general":
        t = sde.sample_t(x0.shape[0], generator=generator)
        x_t = simulate(sde, x0, t, steps=steps, generator=generator)
    else:
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


# One per name in config.OBJECTIVES but "auto".
LOSSES = {"denoising": denoising_loss, "sliced": sliced_loss}


def resolve_objective(sde, name: str) -> str:
    """The objective to train `sde` with: `name`, or for "auto" the kind's default (denoising where a kernel
    gives its target, affine and coupled; sliced for general). A choice the kind cannot train is refused
    with the reason."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
    kind = kind_of(sde)
    if name == "auto":
        return "sliced" if kind == "general" else "denoising"
    if kind == "general" and name == "denoising":
        raise ValueError(f"the denoising objective is unavailable for this SDE: {_no_denoising(sde)}; "
                         "use --objective sliced (or auto)")
    if kind == "coupled" and name == "sliced":
        raise ValueError(f"the sliced objective is unavailable: {_HYBRID}; use --objective denoising (or auto)")
    return name
