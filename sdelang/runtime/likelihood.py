"""Likelihoods of a score model under a compiled SDE (MATH.md section 5).

- `log_likelihood`: log p_eps(x) by integrating the probability-flow ODE from eps to T,
  log p_eps(x) = log prior(x(T)) + int_eps^T div f_flow(x(t), t) dt, with the divergence of the
  score terms taken exactly or by Hutchinson's estimator. Every kind of module: affine, general
  (g(x, t): the flow drift carries -d(g^2)/dx / 2) and coupled (a bound on log p(x) with the
  auxiliary components' initial noise drawn and its log-density subtracted).
- `bits_per_dim`: nats of a density on the model's x -> bits per dimension of the data.
- `bound`: ScoreFlow's per-datapoint upper bound on the cross-entropy at eps (Song et al. 2021,
  Theorem 3), with t drawn uniformly in logSNR; affine SDEs only.

A score function is any callable score_fn(x, t) -> [B, ...] with t of shape [B]. Both likelihoods
assume it treats the rows of a batch independently (as any network in eval mode does): the batch is
repeated per probe or per sample.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .config import DEFAULT_LIKELIHOOD_SOLVER, DEFAULT_NORM
from .logsnr import log_snr_times
from .ode import ADAPTIVE_SOLVERS, NORMS, breakpoints, solve_through
from .kinds import kind_of, unavailable_reason

ScoreFn = Callable[[Tensor, Tensor], Tensor]

NOISES = ("rademacher", "gaussian")
# Halvings of [log eps, log T] (width < 40) that leave it narrower than float64 resolution.


class LogLikelihood(NamedTuple):
    logp: Tensor    # [B] log p_eps(x) in nats: the model density at time eps (coupled SDEs: the bound)
    stderr: Tensor  # [B] standard error of logp over the Hutchinson probes and, for coupled SDEs, the
                    # auxiliary draws (0 exact and not coupled, nan for one copy)
    nfe: int        # evaluations of the flow drift, each one score call on the whole (repeated) batch


class Bound(NamedTuple):
    value: Tensor   # [B] upper bound on E_{x_eps ~ p_0eps(.|x)}[-log p_eps(x_eps)], nats
    stderr: Tensor  # [B] Monte Carlo standard error of value (nan for one sample)
    nfe: int        # score calls


def log_likelihood(sde, score_fn: ScoreFn, x: Tensor, *, exact_trace: bool = False, probes: int = 1,
                   noise: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                   method: str = DEFAULT_LIKELIHOOD_SOLVER, norm: str = DEFAULT_NORM,
                   generator: torch.Generator | None = None) -> LogLikelihood:
    """log p_eps(x) = log prior(x(T)) + int_eps^T div f_flow(x(t), t) dt along the flow ODE.

    The flow drift f_flow is the module's, sde.reverse(score_fn, probability_flow=True).sde: f - g^2 s / 2
    (affine), f - d(g^2)/dx / 2 - g^2 s / 2 (general, g(x, t)), F u - D s / 2 (coupled). The state
    (x, accumulated divergence) goes from eps to T under it with the adaptive `method` at tolerances rtol,
    atol, on x's device and in x's dtype: "rk45_pi" (default), the Dormand-Prince 5(4) pair with scipy RK45's
    error estimate and a PI step control (ode.rk45), which reaches the error of log p of score_sde's RK45 with
    fewer evaluations (docs/benchmarks.md); "rk45", scipy's RK45 itself (with norm="shared" it takes RK45's
    steps); torchdiffeq's dopri5, dopri8, ... A step's error, divided by atol + rtol |y|, is
    an RMS over the batch for x and for the divergence integral, and `norm` combines the two (ode.NORMS):
      - "balanced" (default): the RMS of the two mean squares. The log-likelihood's RMS step error stays
        within sqrt(2) of the tolerance however many entries x has, while x's entries average with it;
      - "max": the larger of the two, each held to the tolerance (stricter, more steps);
      - "shared": one RMS over all (d + 1) B entries, as scipy's solve_ivp: the log-likelihood's part can
        grow to sqrt(d + 1) times the tolerance, and did (docs/benchmarks.md).
    Each is held per batch, not per datapoint, and the result's error accumulates over the steps. At the
    default 1e-5 (rk45_pi, "balanced"): about 4e-5 nats at d = 64 on VP with Gaussian data; on the trained
    2-D models of docs/benchmarks.md 9e-4 to 1.6e-3 nats on the mean of 256 points, 3e-3 to 1.2e-2 at the
    worst (scipy's RK45 6.5e-4 to 3.8e-3 and 4e-3 to 1.6e-2). Lower rtol, atol to tighten it.
    div f_flow = div f + div (f_flow - f): div f is the module's analytic `drift_divergence`, and the
    rest (the score term, and the d(g^2)/dx correction of a general SDE) is differentiated by autograd:
      - exact_trace=True: the trace of its Jacobian, one backward pass per entry of a sample (small d);
      - otherwise Hutchinson's eps^T J eps, one backward pass, with a probe eps (`noise`: Rademacher +-1
        or standard normal) drawn once per solve and kept fixed. With probes=K the batch is solved K
        times side by side with independent probes: logp is the mean of the K estimates and stderr
        their standard deviation / sqrt(K).
    Coupled SDEs: x is the DATA [B, C, ...]. Each copy draws its auxiliary components,
    u0 = sde.init_sampling(x, generator) (before the probes), solves the flow for the state u from u0,
    and returns log p_eps(u0) - init_logp(u0), where p_eps is the model's density of u. Averaged over
    the draw v0 ~ q this is E_q[log p(x, v0) - log q(v0)] = log p(x) - KL(q(v0) || p(v0 | x)) <= log p(x):
    the likelihood of x with the entropy of v0 subtracted (Dockhorn et al. 2022), a lower bound; with
    probes=K the K copies draw independent u0 and stderr covers that spread too.
    `generator` draws the probes (and u0) and must live on x's device. The result carries no gradient:
    the solve runs without autograd, which is switched on only inside each step for the Jacobian, so
    no-grad callers are fine.
    """
    _check_batch(x)
    if method not in ADAPTIVE_SOLVERS:
        raise ValueError(f"method must be one of {', '.join(ADAPTIVE_SOLVERS)} (adaptive ODE solvers), "
                         f"got {method!r}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol!r}, atol={atol!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
    if not (isinstance(probes, int) and probes >= 1):
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    if exact_trace and probes != 1:
        raise ValueError(f"probes={probes} asks for Hutchinson estimates, but exact_trace=True computes the "
                         f"trace exactly; pass one or the other")

    batch = x.shape[0]
    copies = 1 if exact_trace else probes
    # Row k * batch + b holds datapoint b under probe k.
    x0 = x.detach().repeat(copies, *(1,) * (x.dim() - 1))
    coupled = kind_of(sde) == "coupled"
    if coupled:
        x0 = sde.init_sampling(x0, generator)
        initial = sde.init_logp(x0)   # first: an initial law without a density is refused before the solve
    divergence = _exact_divergence if exact_trace else _hutchinson(_probe(x0, noise, generator))
    reverse = sde.reverse(score_fn, probability_flow=True)
    nfe = 0

    def flow(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        xt = state[0]
        tb = t.to(xt.dtype).expand(xt.shape[0])
        with torch.enable_grad():
            xg = xt.detach().requires_grad_(True)
            drift = reverse.sde(xg, tb)[0]
            # f's divergence is analytic; autograd takes the rest's, the part that holds the score.
            rest = divergence(drift - sde.sde(xg, tb)[0], xg)
        return drift.detach(), sde.drift_divergence(xt, tb) + rest

    with torch.no_grad():
        # ode.solve lands the last step on T: the coefficients may not exist past it (cosine schedule). float64 times:
        # torchdiffeq keeps time in float64 whatever the state's dtype. The kinks of the coefficients, if any, are
        # segment ends on the way.
        xT, integral = solve_through(flow, (x0, x0.new_zeros(x0.shape[0])), breakpoints(sde), rtol=rtol, atol=atol,
                                     method=method, norm=norm, device=x.device)
        estimates = sde.prior_logp(xT) + integral
        if coupled:
            estimates = estimates - initial
        estimates = estimates.reshape(copies, batch)
    logp = estimates.mean(0)
    if exact_trace and not coupled:
        stderr = torch.zeros_like(logp)
    elif copies == 1:
        stderr = torch.full_like(logp, math.nan)
    else:
        stderr = estimates.std(0) / math.sqrt(copies)
    return LogLikelihood(logp, stderr, nfe)


def _check_batch(x: Tensor) -> None:
    if not (isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] >= 1 and x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor of shape [B, ...] with B >= 1 and at least one "
                         f"data dimension, got {getattr(x, 'shape', type(x).__name__)}")


def _probe(like: Tensor, noise: str, generator: torch.Generator | None) -> Tensor:
    """A Hutchinson probe shaped like `like`: Rademacher (+-1) or standard normal entries."""
    if noise == "gaussian":
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def _grad(out: Tensor, x: Tensor, retain_graph: bool) -> Tensor:
    """d(out)/dx, zero where out does not depend on x (a constant score such as s = 0 is a valid model)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(out, x, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _hutchinson(probe: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """div v ~ eps^T (dv/dx) eps = eps . grad_x (v . eps): one backward pass, unbiased since E eps eps^T = I."""
    def divergence(v: Tensor, x: Tensor) -> Tensor:
        return (_grad((v * probe).sum(), x, retain_graph=False) * probe).flatten(1).sum(1)
    return divergence


def _exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """div v = sum_i dv_i/dx_i, one backward pass per entry i of a sample.

    Summing v_i over the batch before differentiating is exact because row b of v depends on row b of x only.
    """
    flat = v.flatten(1)
    d = flat.shape[1]
    trace = x.new_zeros(x.shape[0])
    for i in range(d):
        trace = trace + _grad(flat[:, i].sum(), x, retain_graph=i < d - 1).flatten(1)[:, i]
    return trace


def bits_per_dim(logp: Tensor, dims: int, *, scale: float = 2.0, levels: int | None = 256) -> Tensor:
    """Bits per dimension of data whose model density on x is exp(logp), D = dims entries per datapoint.

    levels=L (discrete data, e.g. 8-bit images with L = 256): the data y = (k + u) / L in [0, 1]^D,
    k in {0..L-1}^D, u ~ U(0, 1)^D (uniform dequantisation), are seen by the model as
    x = scale * y + shift, so log p_y = log p_x + D log(scale) and
        bpd = -log p_y / (D ln 2) + log2(L),
    an upper bound on the bits per dimension of the discrete k when logp is averaged over u. With
    scale = 2 (data in [-1, 1]) and L = 256 this is -log p_x / (D ln 2) + 7 (MATH.md section 5).
    levels=None (continuous data): bpd = -log p_x / (D ln 2), the density of x itself in bits; scale
    does not enter.
    """
    if not (isinstance(dims, int) and dims >= 1):
        raise ValueError(f"dims must be a positive integer (entries per datapoint), got {dims!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    if levels is None:
        return -logp / (dims * math.log(2))
    if not (isinstance(levels, int) and levels >= 2):
        raise ValueError(f"levels must be an integer >= 2 (values per entry) or None for continuous data, "
                         f"got {levels!r}")
    return -(logp + dims * math.log(scale)) / (dims * math.log(2)) + math.log2(levels)


def bound(sde, score_fn: ScoreFn, x: Tensor, *, samples: int = 1000, samples_per_call: int | None = None,
          generator: torch.Generator | None = None) -> Bound:
    """ScoreFlow's bound (Theorem 3) on the cross-entropy at eps, per datapoint, by Monte Carlo.

    Convention: on [eps, T] with x_t ~ p_0t(. | x) = N(m x + c, v I), d entries per sample,
        E_{x_eps ~ p_0eps(.|x)}[-log p_eps(x_eps)]
            <= -E log prior(x_T) + 1/2 int_eps^T E[g^2 |s - k|^2 - g^2 |k|^2 - 2 div f] dt,   k = -z / sigma,
    p_eps the density at eps of the SDE model (reverse SDE from the prior with score s): the path KL
    on [eps, T] bounds the KL of the eps marginals (data processing), and the entropy of p_0t(.|x)
    follows dH/dt = E div f + g^2 / 2 E|k|^2. It is an equality when s is the true score of data whose
    p_T is the prior. The k-only terms are exact, since E|k|^2 = d / v and v' / v = 2 a + g^2 / v:
        1/2 int_eps^T (-g^2 d / v - 2 d a) dt = -(d / 2) log(v(T) / v(eps)).
    The score term is sampled with t ~ q(t) = g^2 / (v (L(eps) - L(T))), uniform in L = logSNR (as
    -dL/dt = g^2 / v), so g^2 |s - k|^2 / q = (L(eps) - L(T)) |sigma s + z|^2; x_T is drawn from the
    kernel at T. Each of `samples` draws per datapoint takes a fresh (t, z, x_T):
        value = mean_j [ -log prior(x_T^j) + (L(eps) - L(T)) / 2 |sigma s + z|^2_j ] - (d / 2) log(v(T) / v(eps)),
    stderr = their standard deviation / sqrt(samples). The score is called on samples_per_call
    (default all) copies of the batch at a time. Runs under the caller's grad mode; `generator`
    must live on x's device. Affine SDEs only (see require_bound).
    """
    require_bound(sde)
    _check_batch(x)
    if not (isinstance(samples, int) and samples >= 1):
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    chunk = samples if samples_per_call is None else samples_per_call
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"samples_per_call must be an integer >= 1 or None, got {samples_per_call!r}")

    batch, d = x.shape[0], x[0].numel()
    ends = torch.tensor([float(sde.eps), float(sde.T)], dtype=torch.float64, device=x.device)
    log_snr_eps, log_snr_T = sde.log_snr(ends)
    sigma_eps, sigma_T = sde.std(ends)
    k_terms = (-d * torch.log(sigma_T / sigma_eps)).to(x.dtype)
    span = (log_snr_eps - log_snr_T).to(x.dtype)
    t_end = torch.full((chunk * batch,), float(sde.T), dtype=x.dtype, device=x.device)

    draws = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        xr = x.repeat(n, *(1,) * (x.dim() - 1))
        t = _log_snr_uniform_times(sde, n * batch, x.device, generator).to(x.dtype)
        z = torch.randn(xr.shape, generator=generator, dtype=x.dtype, device=x.device)
        mean, std = sde.marginal_prob(xr, t)
        std = sde._expand(std, xr)
        residual = std * score_fn(mean + std * z, t) + z
        mean_T, std_T = sde.marginal_prob(xr, t_end[: n * batch])
        z_T = torch.randn(xr.shape, generator=generator, dtype=x.dtype, device=x.device)
        prior = sde.prior_logp(mean_T + sde._expand(std_T, xr) * z_T)
        draws.append((0.5 * span * residual.flatten(1).pow(2).sum(1) - prior).reshape(n, batch))
    draws = torch.cat(draws)
    value = draws.mean(0) + k_terms
    stderr = draws.std(0) / math.sqrt(samples) if samples > 1 else torch.full_like(value, math.nan)
    return Bound(value, stderr, -(-samples // chunk))


def require_bound(sde) -> None:
    """A ValueError unless `bound` applies: it integrates the scalar kernel's score -z / sigma(t) and samples
    t uniformly in logSNR, so it needs an affine SDE; the error quotes the module's `unavailable` reason."""
    if kind_of(sde) != "affine":
        raise ValueError(f"the likelihood bound (ScoreFlow Theorem 3) needs the scalar Gaussian kernel of an "
                         f"affine SDE, but {type(sde).__name__} is a {kind_of(sde)} SDE: "
                         f"{unavailable_reason(sde, 'bound', 'std')}. Use log_likelihood (sdelang nll without "
                         f"--bound) instead")


def _log_snr_uniform_times(sde, n: int, device, generator: torch.Generator | None) -> Tensor:
    """n float64 times t = L^{-1}(L(eps) - u (L(eps) - L(T))), u ~ U(0, 1): density g^2 / (v (L(eps) - L(T)))."""
    return log_snr_times(sde, torch.rand(n, generator=generator, dtype=torch.float64, device=device))
