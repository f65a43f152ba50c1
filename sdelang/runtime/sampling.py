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
    ddim, dpm2         exponential integrators (DPM-Solver-1 = DDIM; multistep DPM-Solver-2)
    splitting          coupled SDEs only: Strang splitting, exact Gaussian half steps around a score step
and `ode` solves the flow ODE with an adaptive torchdiffeq solver.

With denoise=True (the default, as in score_sde) every sampler ends with one more score evaluation,
the Tweedie step x0 = (x + v s(x, eps) - c) / m at t = eps: the posterior mean E[x0 | x_eps], which
removes the noise of std sqrt(v(eps)) that the kernel still adds at eps.

Every sampler also takes generator (for the prior draw and all noise) and x_T (a start instead of a
prior draw); fixed-step ones take progress (a tqdm bar), spacing ("time": uniform in t, "logsnr":
uniform in logSNR, found by bisection) and after_step, a
function (x, t_next) -> x applied after every step (inpaint uses it).

The three kinds of module (`sde.kind`; modules without the attribute are affine):
- "affine": every method above but splitting.
- "general" (drift or diffusion non-affine in x, g(x, t)): no Gaussian kernel, so em, pc (with the em
  predictor), heun and ode, through the module's reverse SDE, which carries the d(g^2)/dx correction.
- "coupled" (K components per data entry, state u = cat of the components along dim 1): em, pc, heun,
  ode and splitting, on u. `sample` takes the DATA shape [B, C, ...], samples u of shape [B, K C, ...]
  (x_T, if given, is such a u) and returns the data component; the lower-level functions take and
  return the state u.
The exact-kernel samplers (reverse_diffusion, ancestral, ald, ddim, dpm2), spacing "logsnr" and the
Tweedie step need the scalar kernel m, c, v of an affine SDE. On the other kinds the samplers raise a
ValueError quoting the module's `unavailable` reason, and denoise does nothing (no score call): there
is no scalar posterior mean to take, and at eps the noise left is tiny (CLD at eps = 1e-5: the
position's kernel std is 1.6e-5).

Step loops make no host-device synchronisation: the grid and the kernel on it are computed before the
loop, in float64, and nothing in the loop reads a tensor's value in Python.
"""
from __future__ import annotations

import functools
import math
from numbers import Integral
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from .kinds import kind_of, state_shape, unavailable_reason
from .logsnr import log_snr_times
from .ode import ADAPTIVE_SOLVERS, solve

# The samplers of affine SDEs; `sample` accepts ALL_METHODS, and methods_for(sde) says which apply.
METHODS = ("em", "reverse_diffusion", "ancestral", "pc", "ald", "ode", "heun", "ddim", "dpm2")
ALL_METHODS = METHODS + ("splitting",)
# Those that step with the scalar Gaussian kernel: affine SDEs only.
KERNEL_SAMPLERS = ("reverse_diffusion", "ancestral", "ald", "ddim", "dpm2")
PREDICTORS = ("em", "reverse_diffusion", "ancestral")
SPACINGS = ("time", "logsnr")
NORMS = ("sample", "batch")
# The kernel functions the exact-kernel samplers and the final Tweedie step evaluate.
KERNEL_METHODS = ("mean_coeff", "mean_offset", "std", "log_snr")


class Samples(NamedTuple):
    x: torch.Tensor
    nfe: int


class _Counted:
    """score_fn, counting its calls (NFE)."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return self.score_fn(x, t)


class _Schedule(NamedTuple):
    """The grid times and the kernel on them, [steps + 1] each: m(t), c(t), v(t), logSNR(t)."""

    t: torch.Tensor
    m: torch.Tensor
    c: torch.Tensor
    v: torch.Tensor
    log_snr: torch.Tensor


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def methods_for(sde) -> tuple[str, ...]:
    """The sampling methods that work on this module (see the module docstring)."""
    if kind_of(sde) == "affine":
        return METHODS
    kernel_free = tuple(m for m in METHODS if m not in KERNEL_SAMPLERS)
    return kernel_free + (("splitting",) if kind_of(sde) == "coupled" else ())


def _require_affine(sde, what: str, feature: str) -> None:
    """A ValueError unless the module is affine: `what` needs its scalar Gaussian kernel. `feature` is the
    word under which the module's `unavailable` gives the reason."""
    if kind_of(sde) != "affine":
        raise ValueError(f"{what} needs the scalar Gaussian kernel of an affine SDE, but {type(sde).__name__} "
                         f"is a {kind_of(sde)} SDE: {unavailable_reason(sde, feature, 'std')}. Samplers that "
                         f"work on it: {', '.join(methods_for(sde))}")


def _require_kernel(sde, what: str) -> None:
    """An affine module with the kernel functions m, c, v, logSNR, which `what` evaluates."""
    _require_affine(sde, what, what)
    missing = [name for name in KERNEL_METHODS if not callable(getattr(sde, name, None))]
    if missing:
        raise ValueError(f"{what} needs the Gaussian kernel of an affine SDE, but the module lacks "
                         f"{', '.join(missing)}; compile the SDE with sdelang to get them")


def _start(sde, shape, generator, x_T) -> torch.Tensor:
    """x_T: the given start, or a draw from the module's prior."""
    if x_T is None:
        return sde.prior_sampling(tuple(shape), generator=generator)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return x_T


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _flat_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each sample, [B]."""
    return x.flatten(1).norm(dim=1)


def _time_grid(sde, steps: int, spacing: str, device) -> torch.Tensor:
    """steps + 1 times from T down to eps, in float64: uniform in t, or uniform in logSNR(t)."""
    eps, T = float(sde.eps), float(sde.T)
    if spacing == "time":
        return torch.linspace(T, eps, steps + 1, dtype=torch.float64, device=device)
    grid = log_snr_times(sde, torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device))
    grid[0], grid[-1] = T, eps
    return grid


def _schedule(sde, times: torch.Tensor, like: torch.Tensor) -> _Schedule:
    """The kernel on the float64 grid, evaluated in float64 once and cast to like's dtype."""
    values = (times, sde.mean_coeff(times), sde.mean_offset(times), sde.std(times) ** 2, sde.log_snr(times))
    return _Schedule(*(v.to(like.dtype) for v in values))


def _tweedie(sde, score, x: torch.Tensor) -> torch.Tensor:
    """x0 = (x + v s(x, eps) - c) / m at t = eps: E[x0 | x_eps] for the Gaussian kernel."""
    t = torch.full(x.shape[:1], float(sde.eps), dtype=x.dtype, device=x.device)
    m, c, std = (sde._expand(k, x) for k in (sde.mean_coeff(t), sde.mean_offset(t), sde.std(t)))
    return (x + std**2 * score(x, t) - c) / m


def _run(sde, score: _Counted, x, times, step, *, denoise, progress, after_step, desc) -> Samples:
    """x <- step(x, i, t_i, t_{i+1}) over the grid (then after_step(x, t_{i+1})), then the Tweedie step."""
    batch = x.shape[:1]
    for i in tqdm(range(len(times) - 1), desc=desc, disable=not progress, leave=False):
        t, t_next = times[i].expand(batch), times[i + 1].expand(batch)
        x = step(x, i, t, t_next)
        if after_step is not None:
            x = after_step(x, t_next)
    if denoise:
        x = _tweedie(sde, score, x)
    return Samples(x, score.calls)


def _em_step(sde, score, generator):
    """Euler-Maruyama on the reverse SDE, time running backwards by dt = t - t_next > 0:
    x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    reverse = sde.reverse(score)

    def step(x, i, t, t_next):
        drift, g = reverse.sde(x, t)
        dt = sde._expand(t - t_next, x)
        return x - drift * dt + sde._expand(g, x) * dt.sqrt() * _noise(x, generator)
    return step


def _reverse_diffusion_step(sde, score, generator):
    """score_sde's reverse-diffusion predictor x <- x - f + G^2 s + G z, (f, G) = sde.discretize(x, t, s):
    the module's exact transition over [t_next, t], so every step lands on the next grid time."""
    reverse = sde.reverse(score)

    def step(x, i, t, t_next):
        f, G = reverse.discretize(x, t, t_next)
        return x - f + sde._expand(G, x) * _noise(x, generator)
    return step


def _ancestral_step(sde, score, generator, k: _Schedule):
    """A draw from the posterior of the exact kernel, x_s ~ q(x_s | x_t, x0_hat), s = t_{i+1} < t = t_i.

    With y = x - c, y_s ~ N(m_s x0, v_s) and y_t | y_s ~ N(r y_s, G^2), r = m_t / m_s,
    G^2 = v_t - r^2 v_s = -v_t expm1(logSNR_t - logSNR_s). The posterior is
    N((G^2 m_s x0 + r v_s y_t) / v_t, v_s G^2 / v_t); with x0_hat = (y_t + v_t s) / m_t its mean
    simplifies to (y_t + G^2 s) / r. For VP this is DDPM's ancestral step, for VE score_sde's.
    """
    def step(x, i, t, t_next):
        shrink = -torch.expm1(k.log_snr[i] - k.log_snr[i + 1])  # G^2 / v_t = 1 - SNR_t / SNR_s
        r = k.m[i] / k.m[i + 1]
        mean = k.c[i + 1] + (x - k.c[i] + k.v[i] * shrink * score(x, t)) / r
        return mean + (k.v[i + 1] * shrink).sqrt() * _noise(x, generator)
    return step


def langevin_step(score_fn, x: torch.Tensor, t: torch.Tensor, snr: float, generator=None, *,
                  norms="batch", mask: torch.Tensor | None = None) -> torch.Tensor:
    """One Langevin corrector step x <- x + delta s + sqrt(2 delta) z, z ~ N(0, I), with the step
    delta = 2 (snr |z| / |s|)^2 (score_sde's rule, its alpha taken as 1).

    norms="batch" (score_sde's choice): |z| and |s| are batch means, one step for all samples. For
    p_t = N(mu, V I) this chain is stationary at variance V (1 + snr^2), 2.6 % above V at snr = 0.16.
    norms="sample": each sample's own norms. The step then depends on the state (a sample near a mode,
    |s| small, takes a long one), which changes the stationary law: measured on Gaussian data (VP and
    VE, 100 PC steps, snr = 0.16) the sample variance is 5-8 times too large in d = 2, 23-29 % too large
    in d = 16 and 8-9 % in d = 64, against 2-3 % with batch norms in d = 2.
    mask (0/1, broadcasting against x): only the entries where it is 1 move (s and z are zeroed elsewhere),
    and |z|, |s| are the norms over those entries. For a coupled SDE it selects the noisy components N:
    the step is Langevin dynamics on the conditional law p_t(u_N | the other components), which leaves
    p_t invariant, with delta = 2 (snr |z_N| / |s_N|)^2.
    """
    _check_positive("snr", snr)
    _check_choice("norms", norms, NORMS)
    s = score_fn(x, t)
    z = _noise(x, generator)
    if mask is not None:
        s, z = s * mask, z * mask
    if norms == "sample":
        ratio = _flat_norm(z) / _flat_norm(s)
        ratio = ratio.reshape(ratio.shape + (1,) * (x.dim() - 1))
    else:
        ratio = _flat_norm(z).mean() / _flat_norm(s).mean()
    delta = 2 * (snr * ratio) ** 2
    return x + delta * s + (2 * delta).sqrt() * z


def _noise_mask(sde, x: torch.Tensor) -> torch.Tensor | None:
    """For a coupled state x: 1 at the entries of its noisy components, 0 elsewhere, [1, K C, ...].
    None for the other kinds, where every entry carries noise."""
    if kind_of(sde) != "coupled":
        return None
    return sde.join([torch.full_like(part[:1], float(noisy)) for part, noisy in zip(sde.split(x), sde.noisy)])


def _predictor(name: str, sde, score, generator, grid: torch.Tensor, like: torch.Tensor):
    """The step function of a predictor of PREDICTORS on the float64 grid."""
    if name == "em":
        return _em_step(sde, score, generator)
    if name == "reverse_diffusion":
        return _reverse_diffusion_step(sde, score, generator)
    return _ancestral_step(sde, score, generator, _schedule(sde, grid, like))


def _fixed_step(sde, score_fn, shape, steps, generator, x_T, *, what, kernel, denoise, spacing="time"):
    """What every fixed-step sampler starts with: checks, the counted score, x_T, the grid, and whether to
    end with the Tweedie step: asked for (denoise) and possible (an affine SDE; on the other kinds denoise
    does nothing). what: the sampler's name; kernel: whether its steps evaluate the Gaussian kernel."""
    steps = _check_count("steps", steps, 1)
    _check_choice("spacing", spacing, SPACINGS)
    if kernel:
        _require_kernel(sde, what)
    if spacing == "logsnr":
        _require_affine(sde, "spacing 'logsnr'", "log_snr")
    denoise = denoise and kind_of(sde) == "affine"
    if denoise or spacing == "logsnr":
        _require_kernel(sde, what)
    x = _start(sde, shape, generator, x_T)
    grid = _time_grid(sde, steps, spacing, x.device)
    return steps, _Counted(score_fn), x, grid, denoise


def euler_maruyama(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True,
                   progress=False, x_T=None, after_step=None) -> Samples:
    """Euler-Maruyama on the reverse SDE from T to eps. NFE: steps (+1 with denoise)."""
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="em",
                                                 kernel=False, denoise=denoise, spacing=spacing)
    return _run(sde, score, x, grid.to(x.dtype), _em_step(sde, score, generator), denoise=denoise,
                progress=progress, after_step=after_step, desc="em")


def reverse_diffusion(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True,
                      progress=False, x_T=None, after_step=None) -> Samples:
    """The reverse-diffusion predictor x <- x - f_i + G_i^2 s + G_i z, (f_i, G_i) the module's exact
    transition over each step of the grid. NFE: steps (+1)."""
    _require_affine(sde, "reverse_diffusion", "reverse_diffusion")
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T,
                                                 what="reverse_diffusion", kernel=False, denoise=denoise,
                                                 spacing=spacing)
    return _run(sde, score, x, grid.to(x.dtype), _reverse_diffusion_step(sde, score, generator),
                denoise=denoise, progress=progress, after_step=after_step, desc="reverse diffusion")


def ancestral(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True, progress=False,
              x_T=None, after_step=None) -> Samples:
    """Ancestral sampling with the exact kernel's posterior (see _ancestral_step). NFE: steps (+1)."""
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="ancestral",
                                                 kernel=True, denoise=denoise, spacing=spacing)
    k = _schedule(sde, grid, x)
    return _run(sde, score, x, k.t, _ancestral_step(sde, score, generator, k), denoise=denoise,
                progress=progress, after_step=after_step, desc="ancestral")


def predictor_corrector(sde, score_fn, shape, steps, *, predictor=None, corrector_steps=1, snr=0.16,
                        norms="batch", spacing="time", generator=None, denoise=True, progress=False, x_T=None,
                        after_step=None) -> Samples:
    """Predictor-corrector: per step, one predictor step to t_{i+1} (one of PREDICTORS; by default
    reverse_diffusion on affine SDEs as in score_sde, em on the other kinds, the one that needs no kernel),
    then corrector_steps Langevin steps at t_{i+1} (see langevin_step for snr and norms; on a coupled SDE
    they move the noisy components only). NFE: steps (corrector_steps + 1) (+1)."""
    if predictor is None:
        predictor = "reverse_diffusion" if kind_of(sde) == "affine" else "em"
    _check_choice("predictor", predictor, PREDICTORS)
    if predictor != "em":
        _require_affine(sde, f"pc with the {predictor} predictor", predictor)
    _check_count("corrector_steps", corrector_steps, 0)
    _check_positive("snr", snr)
    _check_choice("norms", norms, NORMS)
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="pc",
                                                 kernel=predictor == "ancestral", denoise=denoise,
                                                 spacing=spacing)
    predict = _predictor(predictor, sde, score, generator, grid, x)
    mask = _noise_mask(sde, x)

    def step(x, i, t, t_next):
        x = predict(x, i, t, t_next)
        for _ in range(corrector_steps):
            x = langevin_step(score, x, t_next, snr, generator, norms=norms, mask=mask)
        return x
    return _run(sde, score, x, grid.to(x.dtype), step, denoise=denoise, progress=progress,
                after_step=after_step, desc="pc")


def annealed_langevin(sde, score_fn, shape, steps, *, corrector_steps=5, step_lr=None, spacing="logsnr",
                      generator=None, denoise=True, progress=False, x_T=None, after_step=None) -> Samples:
    """Annealed Langevin dynamics (Song & Ermon 2019): at each noise level sigma_i = std(t_i), i = 1..steps,
    corrector_steps steps x <- x + alpha_i / 2 s(x, t_i) + sqrt(alpha_i) z with
    alpha_i = step_lr sigma_i^2 / sigma_min^2, sigma_min = std(eps). NFE: steps corrector_steps (+1).

    step_lr defaults to sigma_min^2, i.e. alpha_i = sigma_i^2 (stable: alpha < 4 var(p_t) as var >= v).
    NCSN's 2e-5 at sigma_min = 0.01 is 0.2 sigma_min^2; on Gaussian data with 100 levels of 5 steps
    that left a variance 21 % too large, against 4 % here. The levels are uniform in logSNR by default,
    NCSN's geometric noise levels for VE. Where the mean still moves at low noise (m(t) < 1 or c(t)
    varying: VP, sub-VP, OU) the chain, whose steps shrink with sigma^2, cannot follow it there, and the
    samples keep the mean of the level where it froze: this is a sampler for VE SDEs.
    """
    _check_count("corrector_steps", corrector_steps, 1)
    if step_lr is not None:
        _check_positive("step_lr", step_lr)
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="ald",
                                                 kernel=True, denoise=denoise, spacing=spacing)
    k = _schedule(sde, grid, x)
    alpha = k.v if step_lr is None else step_lr * k.v / k.v[-1]

    def step(x, i, t, t_next):
        for _ in range(corrector_steps):
            x = x + alpha[i + 1] / 2 * score(x, t_next) + alpha[i + 1].sqrt() * _noise(x, generator)
        return x
    return _run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step,
                desc="ald")


def probability_flow(sde, score_fn, shape, *, rtol=1e-5, atol=1e-5, solver="dopri5", generator=None,
                     denoise=True, x_T=None) -> Samples:
    """The flow ODE dx/dt = f - g^2 s / 2 from T to eps with torchdiffeq's adaptive `solver` (one of
    ADAPTIVE_SOLVERS), through the module's flow drift (for general SDEs f - d(g^2)/dx / 2 - g^2 s / 2).
    NFE: the solver's evaluations of the drift (+1 with denoise, affine SDEs only)."""
    _check_choice("ODE solver", solver, ADAPTIVE_SOLVERS)
    _check_positive("rtol", rtol)
    _check_positive("atol", atol)
    denoise = denoise and kind_of(sde) == "affine"
    if denoise:
        _require_kernel(sde, "the Tweedie denoising step")
    x = _start(sde, shape, generator, x_T)
    score = _Counted(score_fn)
    flow = sde.reverse(score, probability_flow=True)
    batch = x.shape[:1]
    times = torch.tensor([float(sde.T), float(sde.eps)], dtype=x.dtype, device=x.device)
    # The drift is evaluated in x's dtype; ode.solve never steps past eps (below it, VP's g^2 < 0).
    x = solve(lambda t, y: flow.sde(y, t.to(y.dtype).expand(batch))[0], x, times, rtol=rtol, atol=atol,
              method=solver)[-1]
    if denoise:
        x = _tweedie(sde, score, x)
    return Samples(x, score.calls)


def heun(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True, progress=False,
         x_T=None, after_step=None) -> Samples:
    """Heun's method on the flow ODE, d = f - g^2 s / 2: x_e = x + h d(x, t),
    x <- x + h (d(x, t) + d(x_e, t_next)) / 2, h = t_next - t; the last step is Euler (x_e), which
    keeps the global order 2. NFE: 2 steps - 1 (+1)."""
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="heun",
                                                 kernel=False, denoise=denoise, spacing=spacing)
    flow = sde.reverse(score, probability_flow=True)

    def step(x, i, t, t_next):
        h = sde._expand(t_next - t, x)
        d = flow.sde(x, t)[0]
        euler = x + h * d
        if i == steps - 1:
            return euler
        return x + h * (d + flow.sde(euler, t_next)[0]) / 2
    return _run(sde, score, x, grid.to(x.dtype), step, denoise=denoise, progress=progress,
                after_step=after_step, desc="heun")


def exponential_integrator(sde, score_fn, shape, steps, *, order=2, spacing="logsnr", generator=None,
                           denoise=True, progress=False, x_T=None, after_step=None) -> Samples:
    """DPM-Solver for any affine SDE (Lu et al. 2022), order 1 (= DDIM) or multistep order 2.

    With y = x - c(t) the flow ODE is dy/dt = a(t) y - g^2 s / 2, and in lambda = log(m / sigma)
    = logSNR / 2 its exact solution from s to t is y_t = (m_t / m_s) y_s - m_t int e^-lambda eps(lambda),
    eps = -sigma s the noise prediction. With h = lambda_t - lambda_s and eps_hat_i = -sigma_i s(x_i, t_i):
        order 1: y_t = (m_t / m_s) y_s - sigma_t expm1(h) eps_hat_i
        order 2: minus sigma_t (expm1(h) - h) (eps_hat_i - eps_hat_{i-1}) / h_{i-1}, the integral of the
                 linear extrapolation of eps in lambda from the last two steps (no extra NFE);
                 the first step is order 1.
    Steps are uniform in logSNR by default. NFE: steps (+1).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    steps, score, x, grid, denoise = _fixed_step(sde, score_fn, shape, steps, generator, x_T,
                                                 what="ddim" if order == 1 else "dpm2", kernel=True,
                                                 denoise=denoise, spacing=spacing)
    k = _schedule(sde, grid, x)
    lam, sigma = k.log_snr / 2, k.v.sqrt()
    previous = None  # eps_hat of the step before, for the multistep update

    def step(x, i, t, t_next):
        nonlocal previous
        eps_hat = -sigma[i] * score(x, t)
        h = lam[i + 1] - lam[i]
        y = k.m[i + 1] / k.m[i] * (x - k.c[i]) - sigma[i + 1] * torch.expm1(h) * eps_hat
        if order == 2 and i > 0:
            slope = (eps_hat - previous) / (lam[i] - lam[i - 1])
            y = y - sigma[i + 1] * (torch.expm1(h) - h) * slope
        previous = eps_hat
        return y + k.c[i + 1]
    return _run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step,
                desc=f"dpm-solver-{order}")


class _HalfSteps(NamedTuple):
    """The splitting sampler's Gaussian half steps u <- E u + e + R z, per half step j (2 per grid step)."""

    E: torch.Tensor  # [2 steps, K, K]
    e: torch.Tensor  # [2 steps, K]
    R: torch.Tensor  # [2 steps, K, K], R R^T = C, the half step's noise covariance


def _prior_score_parts(sde) -> tuple[torch.Tensor, torch.Tensor]:
    """P = Sigma_T^-1 and mu_T of the prior, float64: its score is s_G(u) = -P (u - mu_T) per entry."""
    return torch.cholesky_inverse(sde._prior_chol), sde._prior_mean


def _gaussian_half_steps(sde, increments: torch.Tensor) -> _HalfSteps:
    """The exact transition of du = (M u + b) drho + G0 dW over each rho-increment h (float64 [n]):
    M = -(F0 + D0 P), b = D0 P mu_T (see `splitting`).

    E = exp(M h) and e = int_0^h exp(M r) dr b are blocks of exp([[M, b], [0, 0]] h); the covariance
    C = int_0^h exp(M r) D0 exp(M^T r) dr comes from Van Loan's exp([[-M, D0], [0, M^T]] h) =
    [[exp(-M h), Y], [0, exp(M^T h)]] as C = exp(M^T h)^T Y. R is C's symmetric square root, by eigh:
    C is singular at noiseless components and nearly so over short steps, where Cholesky can fail."""
    P, mu = _prior_score_parts(sde)
    F0, D0 = sde.F0, sde.D0
    K = F0.shape[0]
    M = -(F0 + D0 @ P)
    h = increments[:, None, None]
    affine = F0.new_zeros(K + 1, K + 1)
    affine[:K, :K], affine[:K, K] = M, D0 @ P @ mu
    mean_map = torch.linalg.matrix_exp(affine * h)
    van_loan = F0.new_zeros(2 * K, 2 * K)
    van_loan[:K, :K], van_loan[:K, K:], van_loan[K:, K:] = -M, D0, M.T
    blocks = torch.linalg.matrix_exp(van_loan * h)
    C = blocks[:, K:, K:].transpose(1, 2) @ blocks[:, :K, K:]
    values, vectors = torch.linalg.eigh((C + C.transpose(1, 2)) / 2)
    R = vectors * values.clamp(min=0).sqrt()[:, None, :] @ vectors.transpose(1, 2)
    return _HalfSteps(mean_map[:, :K, :K], mean_map[:, :K, K], R)


def _mix(sde, M: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """M [K, K] applied to each entry's K components of the coupled state u [B, K C, ...]."""
    parts = torch.stack(sde.split(u), 1)                                   # [B, K, C, ...]
    return sde.join(torch.tensordot(M, parts, dims=([1], [1])).unbind(0))


def splitting(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True, progress=False,
              x_T=None, after_step=None) -> Samples:
    """Strang splitting of a coupled linear SDE's reverse SDE: per grid step from t to t_next,
    A(half) S(full) A(half), with exact Gaussian A steps. `shape` is the state's, [B, K C, ...].

    In r = B(t) = int_0^t phi, run backwards (rho = B(T) - B(t) grows as t falls), the reverse SDE
    du = [F u - D s] dt + G dw_bar with F = phi(t) F0, D = G G^T = phi(t) D0 reads
        du = [-F0 u + D0 s(u, t)] drho + G0 dW,   G0 G0^T = D0
    (dt = -drho / phi, and G dw_bar over dt has covariance phi D0 |dt| = D0 drho). With the prior's score
    s_G(u) = -P (u - mu_T), P = Sigma_T^-1 (Sigma_T = _prior_chol _prior_chol^T, mu_T = _prior_mean),
    split s = s_G + (s - s_G):
      (A) du = (M u + b) drho + G0 dW, M = -(F0 + D0 P), b = D0 P mu_T: linear in u, so over a
          rho-increment h exactly u <- E u + e + R z, z ~ N(0, I), with
              E = exp(M h),  e = int_0^h exp(M r) dr b,  R R^T = int_0^h exp(M r) D0 exp(M^T r) dr
          (matrix exponentials, Van Loan's method for the covariance; see _gaussian_half_steps);
      (S) du = D0 (s(u, t) - s_G(u)) drho: one Euler step over the grid step's whole increment
          B(t) - B(t_next), at the midpoint t_m = (t + t_next) / 2, on the state after the first A.
    The A half steps cover [t_m, t] and [t_next, t_m] in r. The matrices are computed in float64 before
    the loop (no host-device synchronisation in it) and cast to u's dtype. It is Dockhorn et al.'s
    symmetric splitting (SSCS), with the prior's score for their stationary one.
    Exact for any number of steps when s = s_G: S is then the identity and the A steps compose to the
    exact transition. Otherwise first order, like em, because S is an Euler step on D0 (s - s_G), which
    is stiff near eps (CLD with Gaussian data, exact score: the error of d x_eps / d mu is 0.0169 at 100
    steps against em's 0.0189, and halves with twice the steps; S evaluated at t instead of t_m measured
    0.0159). S is stable while the increment stays below about 2 / (g0^2 (1 / Sigma_c - 1 / Sigma_T)),
    Sigma_c the conditional variance of the noisy components at t_m; on CLD Sigma_c grows from gamma M
    fast enough (about gamma M + g0^2 t) that no step count diverges: at 2, 5, 10 steps the variance of
    Gaussian data came out 3.5, 2.1 and 0.6 times the true one, em's 4200, 310 and 9 times.
    Coupled SDEs only; denoise does nothing. NFE: steps, one score call per step.
    """
    if kind_of(sde) != "coupled":
        raise ValueError(f"splitting needs a coupled linear SDE (F0, D0, the prior's Sigma_T), but "
                         f"{type(sde).__name__} is a {kind_of(sde)} SDE. Samplers that work on it: "
                         f"{', '.join(methods_for(sde))}")
    steps, score, u, grid, _ = _fixed_step(sde, score_fn, shape, steps, generator, x_T, what="splitting",
                                           kernel=False, denoise=False, spacing=spacing)
    middle = (grid[:-1] + grid[1:]) / 2
    r, r_middle = sde.time_change(grid), sde.time_change(middle)
    half = _gaussian_half_steps(sde, torch.stack([r[:-1] - r_middle, r_middle - r[1:]], 1).reshape(-1))
    P, mu = _prior_score_parts(sde)
    E, e, R = (v.to(u.dtype) for v in half)
    euler = ((r[:-1] - r[1:])[:, None, None] * sde.D0).to(u.dtype)  # the S step's D0 (B(t) - B(t_next))
    P, mu = P.to(u.dtype), mu.to(u.dtype)
    middle = middle.to(u.dtype)
    batch = u.shape[:1]

    def gaussian(u, j):
        moved = _mix(sde, E[j], u) + _mix(sde, R[j], _noise(u, generator))
        return sde.join(part + e[j, k] for k, part in enumerate(sde.split(moved)))

    def step(u, i, t, t_next):
        u = gaussian(u, 2 * i)
        gap = score(u, middle[i].expand(batch)) + _mix(sde, P, sde.join(
            part - mu[k] for k, part in enumerate(sde.split(u))))      # s - s_G
        return gaussian(u + _mix(sde, euler[i], gap), 2 * i + 1)
    return _run(sde, score, u, grid.to(u.dtype), step, denoise=False, progress=progress,
                after_step=after_step, desc="splitting")


_FIXED_STEP = {
    "em": euler_maruyama,
    "reverse_diffusion": reverse_diffusion,
    "ancestral": ancestral,
    "pc": predictor_corrector,
    "ald": annealed_langevin,
    "heun": heun,
    "ddim": functools.partial(exponential_integrator, order=1),
    "dpm2": functools.partial(exponential_integrator, order=2),
    "splitting": splitting,
}


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
    _check_choice("sampling method", method, ALL_METHODS)
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
    _require_affine(sde, "inpainting (a draw of the kernel at the known entries)", "marginal_prob")
    if method == "ode":
        raise ValueError("inpainting needs a fixed-step method: the adaptive 'ode' solver has no steps "
                         "to constrain; use 'heun', 'ddim' or 'dpm2' for a deterministic sampler")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (1: keep the entry of known)")
    keep = (mask == 1).expand(known.shape)

    def replace(x, t):
        mean, std = sde.marginal_prob(known, t)
        return torch.where(keep, mean + sde._expand(std, x) * _noise(x, generator), x)

    out = sample(sde, score_fn, known.shape, method, steps, generator=generator, denoise=denoise,
                 progress=progress, after_step=replace, **options)
    return Samples(torch.where(keep, known, out.x), out.nfe)
