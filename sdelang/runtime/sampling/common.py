"""What every sampler shares: the counted score, argument checks, the start, the kernel on the grid,
the step loop and the final Tweedie step."""
from __future__ import annotations

import math
from numbers import Integral
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ..kinds import kind_of, unavailable_reason
from .grids import SPACINGS, time_grid

# The samplers of affine SDEs; `sample` accepts ALL_METHODS, and methods_for(sde) says which apply.
METHODS = ("em", "reverse_diffusion", "ancestral", "pc", "ald", "ode", "heun", "ddim", "dpm2",
           "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms", "dpmpp_2m_sde",
           "dpmpp_3m_sde")
ALL_METHODS = METHODS + ("splitting", "exponential")
# Those that step with the scalar Gaussian kernel: affine SDEs only.
KERNEL_SAMPLERS = ("reverse_diffusion", "ancestral", "ald", "ddim", "dpm2", "dpmpp_2m", "dpmpp_3m",
                   "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms", "dpmpp_2m_sde", "dpmpp_3m_sde")
# Samplers of coupled linear SDEs only.
COUPLED_SAMPLERS = ("splitting", "exponential")
# Those that integrate the probability-flow ODE: no noise after the prior draw.
DETERMINISTIC = ("ode", "heun", "ddim", "dpm2", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m",
                 "deis", "lms", "exponential")
# The kernel functions the exact-kernel samplers and the final Tweedie step evaluate.
KERNEL_METHODS = ("mean_coeff", "mean_offset", "std", "log_snr")


def methods_for(sde) -> tuple[str, ...]:
    """The sampling methods that work on this module (see the package docstring)."""
    if kind_of(sde) == "affine":
        return METHODS
    kernel_free = tuple(m for m in METHODS if m not in KERNEL_SAMPLERS)
    return kernel_free + (COUPLED_SAMPLERS if kind_of(sde) == "coupled" else ())


class Samples(NamedTuple):
    x: torch.Tensor
    nfe: int


class Counted:
    """score_fn, counting its calls (NFE)."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score_fn(x, t)


class Schedule(NamedTuple):
    """The grid times and the kernel on them, [steps + 1] each: m(t), c(t), v(t), logSNR(t)."""

    t: torch.Tensor
    m: torch.Tensor
    c: torch.Tensor
    v: torch.Tensor
    log_snr: torch.Tensor


def check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def require_affine(sde, what: str, feature: str) -> None:
    """A ValueError unless the module is affine: `what` needs its scalar Gaussian kernel. `feature` is the
    word under which the module's `unavailable` gives the reason."""
    if kind_of(sde) != "affine":
        raise ValueError(f"{what} needs the scalar Gaussian kernel of an affine SDE, but {type(sde).__name__} "
                         f"is a {kind_of(sde)} SDE: {unavailable_reason(sde, feature, 'std')}. Samplers that "
                         f"work on it: {', '.join(methods_for(sde))}")


def require_kernel(sde, what: str) -> None:
    """An affine module with the kernel functions m, c, v, logSNR, which `what` evaluates."""
    require_affine(sde, what, what)
    missing = [name for name in KERNEL_METHODS if not callable(getattr(sde, name, None))]
    if missing:
        raise ValueError(f"{what} needs the Gaussian kernel of an affine SDE, but the module lacks "
                         f"{', '.join(missing)}; compile the SDE with sdelang to get them")


def start(sde, shape, generator, x_T) -> torch.Tensor:
    """x_T: the given start, or a draw from the module's prior."""
    if x_T is None:
        return sde.prior_sampling(tuple(shape), generator=generator)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return x_T


def noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def flat_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each sample, [B]."""
    return x.flatten(1).norm(dim=1)


def schedule(sde, times: torch.Tensor, like: torch.Tensor) -> Schedule:
    """The kernel on the float64 grid, evaluated in float64 once and cast to like's dtype."""
    values = (times, sde.mean_coeff(times), sde.mean_offset(times), sde.std(times) ** 2, sde.log_snr(times))
    return Schedule(*(v.to(like.dtype) for v in values))


def tweedie(sde, score, x: torch.Tensor) -> torch.Tensor:
    """x0 = (x + v s(x, eps) - c) / m at t = eps: E[x0 | x_eps] for the Gaussian kernel."""
    t = torch.full(x.shape[:1], float(sde.eps), dtype=x.dtype, device=x.device)
    m, c, std = (sde._expand(k, x) for k in (sde.mean_coeff(t), sde.mean_offset(t), sde.std(t)))
    return (x + std**2 * score(x, t) - c) / m


def run(sde, score: Counted, x, times, step, *, denoise, progress, after_step, desc) -> Samples:
    """x <- step(x, i, t_i, t_{i+1}) over the grid (then after_step(x, t_{i+1})), then the Tweedie step."""
    batch = x.shape[:1]
    for i in tqdm(range(len(times) - 1), desc=desc, disable=not progress, leave=False):
        t, t_next = times[i].expand(batch), times[i + 1].expand(batch)
        x = step(x, i, t, t_next)
        if after_step is not None:
            x = after_step(x, t_next)
    if denoise:
        x = tweedie(sde, score, x)
    return Samples(x, score.calls)


def fixed_step(sde, score_fn, shape, steps, generator, x_T, *, what, kernel, denoise, spacing="time"):
    """What every fixed-step sampler starts with: checks, the counted score, x_T, the grid, and whether to
    end with the Tweedie step: asked for (denoise) and possible (an affine SDE; on the other kinds denoise
    does nothing). what: the sampler's name; kernel: whether its steps evaluate the Gaussian kernel."""
    steps = check_count("steps", steps, 1)
    check_choice("spacing", spacing, SPACINGS)
    if kernel:
        require_kernel(sde, what)
    if spacing != "time":
        require_affine(sde, f"spacing {spacing!r}", "log_snr")
    denoise = denoise and kind_of(sde) == "affine"
    if denoise or spacing != "time":
        require_kernel(sde, what)
    x = start(sde, shape, generator, x_T)
    grid = time_grid(sde, steps, spacing, x.device)
    return steps, Counted(score_fn), x, grid, denoise

