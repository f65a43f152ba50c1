"""Samplers: from the prior at t = T to data at t = eps with a score model s(x, t) ~ grad log p_t(x).

Every sampler takes a compiled SDE module, a score function score_fn(x, t) (t of shape [B]) and the
sample shape [B, ...], and returns Samples(x, nfe): the samples and the number of score evaluations,
each on the whole batch. Fixed-step samplers walk a grid of steps + 1 times from T down to eps:

    em                 Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dw_bar
    reverse_diffusion  the module's exact-kernel discretisation: x <- x - f_i + G_i^2 s + G_i z
    ancestral          a draw from q(x_s | x_t, x0_hat), x0_hat the Tweedie estimate at t
    pc                 a predictor step, then Langevin corrector steps at the new time
    ald                annealed Langevin dynamics (NCSN) over the noise levels std(t_i)
    heun               2nd-order Heun on the flow ODE dx/dt = f - g^2 s / 2
    ddim, dpm2         exponential integrators in noise prediction (DPM-Solver-1 = DDIM; multistep DPM-Solver-2)
    dpmpp_2m, dpmpp_3m multistep exponential integrators in data prediction on y = x - c(t) (DPM-Solver++
                       2M and 3M), for every affine SDE; unipc adds a corrector (order 3 from 2M),
                       unipc_3m the same to 3M (order 4); both on the floored grid (grids.py)
    dpmpp_2m_sde, dpmpp_3m_sde  the same for the reverse SDE (DPM-Solver++ SDE)
    dpmpp_3m_published DPM-Solver++(3M) as published (k-diffusion's dpmpp_3m_sde at eta = 0): its curvature
                       term halved, second order
    deis               the multistep integrator of the noise prediction eps_hat = -sigma s (DEIS-style),
                       third order with the corrector (order 4)
    lms                linear multistep in the noise level sigma / m on (x - c) / m (Adams-Bashforth in
                       sigma of eps_hat, order 4; k-diffusion's lms)
    splitting          coupled SDEs only: Strang splitting, exact Gaussian half steps around a score step
    exponential        coupled SDEs only: multistep exponential integrator of the flow ODE (DEIS-style)
and `ode` solves the flow ODE with an adaptive torchdiffeq solver.

With denoise=True (the default, as in score_sde) every sampler ends with one more score evaluation,
the Tweedie step x0 = (x + v s(x, eps) - c) / m at t = eps: the posterior mean E[x0 | x_eps], which
removes the noise of std sqrt(v(eps)) that the kernel still adds at eps.

Every sampler also takes generator (for the prior draw and all noise) and x_T (a start instead of a
prior draw); fixed-step ones take progress (a tqdm bar), spacing (the time grid: "time", "logsnr",
"edm" or "floored", see grids.py; each sampler's default was chosen by measurement, docs/runtime.md)
and after_step, a function (x, t_next) -> x applied after every step (inpaint uses it).

The three kinds of module (`sde.kind`; modules without the attribute are affine):
- "affine": every method above but splitting.
- "general" (drift or diffusion non-affine in x, g(x, t)): no Gaussian kernel, so em, pc (with the em
  predictor), heun and ode, through the module's reverse SDE, which carries the d(g^2)/dx correction.
- "coupled" (K components per data entry, state u = cat of the components along dim 1): em, pc, heun,
  ode and splitting, on u. `sample` takes the DATA shape [B, C, ...], samples u of shape [B, K C, ...]
  (x_T, if given, is such a u) and returns the data component; the lower-level functions take and
  return the state u.
The exact-kernel samplers (reverse_diffusion, ancestral, ald, the exponential integrators), spacings
"logsnr", "edm" and "floored" and the Tweedie step need the scalar kernel m, c, v of an affine SDE. On
the other kinds the samplers raise a ValueError quoting the module's `unavailable` reason, and denoise does nothing (no score call): there
is no scalar posterior mean to take, and at eps the noise left is tiny (CLD at eps = 1e-5: the
position's kernel std is 1.6e-5).

Step loops make no host-device synchronisation: the grid and the kernel on it are computed before the
loop, in float64, and nothing in the loop reads a tensor's value in Python.

The package, by concern: common (checks, grid, step loop, Tweedie step), grids (time grids),
stochastic (em, reverse_diffusion, ancestral, pc, ald), flow (ode, heun), exponential (ddim, dpm2),
dpmpp (multistep, the DPM-Solver++ family), coupled (splitting, coupled_exponential).
"""
from __future__ import annotations

import functools
import inspect

import torch

from ..kinds import kind_of, state_shape
from .common import (ALL_METHODS, KERNEL_SAMPLERS, METHODS, Samples, check_choice, methods_for, noise,
                     require_affine)
from .coupled import _gaussian_half_steps, coupled_exponential, splitting
from .exponential import exponential_integrator
from .flow import heun, probability_flow
from .grids import SPACINGS, time_grid
from .dpmpp import multistep
from .stochastic import (NORMS, PREDICTORS, _noise_mask, ancestral, annealed_langevin, euler_maruyama,
                         langevin_step, predictor_corrector, reverse_diffusion)

__all__ = ["ALL_METHODS", "KERNEL_SAMPLERS", "METHODS", "NORMS", "PREDICTORS", "SPACINGS", "Samples",
           "ancestral", "annealed_langevin", "coupled_exponential", "default_spacing", "euler_maruyama",
           "exponential_integrator", "heun", "inpaint", "langevin_step", "methods_for", "multistep",
           "predictor_corrector", "probability_flow", "reverse_diffusion", "sample", "splitting", "time_grid"]

_FIXED_STEP = {
    "em": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "pc": predictor_corrector,
    "ald": annealed_langevin,
    "heun": heun,
    "ddim": functools.partial(exponential_integrator, order=1),
    "dpm2": functools.partial(exponential_integrator, order=2),
    "dpmpp_2m": functools.partial(multistep, order=2, form="published"),
    "dpmpp_3m": functools.partial(multistep, order=3),
    "dpmpp_3m_published": functools.partial(multistep, order=3, form="published", spacing="floored"),
    "unipc": functools.partial(multistep, order=2, corrector=True, variable="sigma", spacing="floored"),
    "unipc_3m": functools.partial(multistep, order=3, corrector=True, variable="floored", spacing="floored"),
    "deis": functools.partial(multistep, order=3, corrector=True, prediction="noise", spacing="edm"),
    "lms": functools.partial(multistep, order=4, prediction="noise", variable="sigma", lower_order_final=False,
                             spacing="floored"),
    "dpmpp_2m_sde": functools.partial(multistep, order=2, eta=1.0, form="published"),
    "dpmpp_3m_sde": functools.partial(multistep, order=3, eta=1.0),
    "splitting": splitting,
    "exponential": coupled_exponential,
}


def default_spacing(method: str) -> str:
    """The time grid a fixed-step method walks unless told otherwise (each chosen by measurement,
    docs/runtime.md)."""
    check_choice("fixed-step sampling method", method, tuple(_FIXED_STEP))
    function = _FIXED_STEP[method]
    chosen = getattr(function, "keywords", {}).get("spacing")
    return chosen or inspect.signature(getattr(function, "func", function)).parameters["spacing"].default


def _state_shape(sde, shape) -> tuple[int, ...]:
    """A coupled SDE's state shape for data of shape [B, C, ...]: [B, K C, ...]."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a coupled SDE samples data of shape [B, C, ...] (its {len(sde.components)} components "
                         f"stack along dim 1), got shape {shape}")
    return shape[:1] + state_shape(sde, shape[1:])


def sample(sde, score_fn, shape, method="pc", steps=None, *, generator=None, denoise=True,
           progress=False, **options) -> Samples:
    """Samples of the given shape by `method` (one of methods_for(sde)); steps defaults to sde.N. `options`
    go to the method's function (e.g. snr for pc, rtol for ode). `progress` shows a bar for fixed-step
    methods. For a coupled SDE `shape` is the data's, [B, C, ...]: the method runs on the state u of shape
    [B, K C, ...] from the prior (or x_T, such a state) and the data component of u is returned."""
    check_choice("sampling method", method, ALL_METHODS)
    coupled = kind_of(sde) == "coupled"
    if coupled:
        shape = _state_shape(sde, shape)
    if method == "ode":
        if steps is not None:
            raise ValueError("method 'ode' is adaptive and takes no steps; set its rtol and atol instead")
        out = probability_flow(sde, score_fn, shape, generator=generator, denoise=denoise, **options)
    else:
        steps = sde.N if steps is None else steps
        out = _FIXED_STEP[method](sde, score_fn, shape, steps, generator=generator, denoise=denoise,
                                  progress=progress, **options)
    return Samples(sde.data(out.x), out.nfe) if coupled else out


def inpaint(sde, score_fn, known: torch.Tensor, mask: torch.Tensor, method="pc", steps=None, *,
            generator=None, denoise=True, progress=False, **options) -> Samples:
    """Samples that agree with `known` where mask == 1, by replacement: after every step to time t the
    masked entries become a fresh draw of the forward kernel, m(t) known + c(t) + sigma(t) z, and the
    returned samples equal `known` there exactly. Any fixed-step method of METHODS; mask is 0/1 and
    broadcasts against known. Affine SDEs only (the draw is the scalar kernel's)."""
    require_affine(sde, "inpainting (a draw of the kernel at the known entries)", "marginal_prob")
    if method == "ode":
        raise ValueError("inpainting needs a fixed-step method: the adaptive 'ode' solver has no steps "
                         "to constrain; use 'heun', 'ddim' or 'dpm2' for a deterministic sampler")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (1: keep the entry of known)")
    keep = (mask == 1).expand(known.shape)

    def replace(x, t):
        mean, std = sde.marginal_prob(known, t)
        return torch.where(keep, mean + sde._expand(std, x) * noise(x, generator), x)

    out = sample(sde, score_fn, known.shape, method, steps, generator=generator, denoise=denoise,
                 progress=progress, after_step=replace, **options)
    return Samples(torch.where(keep, known, out.x), out.nfe)
