"""Stochastic samplers of the reverse SDE: Euler-Maruyama, score_sde's reverse diffusion, ancestral
sampling from the exact kernel's posterior, predictor-corrector with Langevin steps, annealed Langevin."""
from __future__ import annotations

import torch

from ..kinds import kind_of
from .common import (Schedule, check_choice, check_count, check_positive, fixed_step, flat_norm, noise,
                     require_affine, run, schedule)

PREDICTORS = ("em", "reverse_diffusion", "ancestral")
NORMS = ("sample", "batch")


def _em_step(sde, score, generator):
    """Euler-Maruyama on the reverse SDE, time running backwards by dt = t - t_next > 0:
    x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    reverse = sde.reverse(score)

    def step(x, i, t, t_next):
        drift, g = reverse.sde(x, t)
        dt = sde._expand(t - t_next, x)
        return x - drift * dt + sde._expand(g, x) * dt.sqrt() * noise(x, generator)
    return step


def _reverse_diffusion_step(sde, score, generator):
    """score_sde's reverse-diffusion predictor x <- x - f + G^2 s + G z, (f, G) = sde.discretize(x, t, s):
    the module's exact transition over [t_next, t], so every step lands on the next grid time."""
    reverse = sde.reverse(score)

    def step(x, i, t, t_next):
        f, G = reverse.discretize(x, t, t_next)
        return x - f + sde._expand(G, x) * noise(x, generator)
    return step


def _ancestral_step(sde, score, generator, k: Schedule):
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
        return mean + (k.v[i + 1] * shrink).sqrt() * noise(x, generator)
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
    check_positive("snr", snr)
    check_choice("norms", norms, NORMS)
    s = score_fn(x, t)
    z = noise(x, generator)
    if mask is not None:
        s, z = s * mask, z * mask
    if norms == "sample":
        ratio = flat_norm(z) / flat_norm(s)
        ratio = ratio.reshape(ratio.shape + (1,) * (x.dim() - 1))
    else:
        ratio = flat_norm(z).mean() / flat_norm(s).mean()
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
    return _ancestral_step(sde, score, generator, schedule(sde, grid, like))


def euler_maruyama(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True,
                   progress=False, x_T=None, after_step=None) -> Samples:
    """Euler-Maruyama on the reverse SDE from T to eps. NFE: steps (+1 with denoise)."""
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what="em",
                                                 kernel=False, denoise=denoise, spacing=spacing)
    return run(sde, score, x, grid.to(x.dtype), _em_step(sde, score, generator), denoise=denoise,
                progress=progress, after_step=after_step, desc="em")


def reverse_diffusion(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True,
                      progress=False, x_T=None, after_step=None) -> Samples:
    """The reverse-diffusion predictor x <- x - f_i + G_i^2 s + G_i z, (f_i, G_i) the module's exact
    transition over each step of the grid. NFE: steps (+1)."""
    require_affine(sde, "reverse_diffusion", "reverse_diffusion")
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T,
                                                 what="reverse_diffusion", kernel=False, denoise=denoise,
                                                 spacing=spacing)
    return run(sde, score, x, grid.to(x.dtype), _reverse_diffusion_step(sde, score, generator),
                denoise=denoise, progress=progress, after_step=after_step, desc="reverse diffusion")


def ancestral(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True, progress=False,
              x_T=None, after_step=None) -> Samples:
    """Ancestral sampling with the exact kernel's posterior (see _ancestral_step). NFE: steps (+1)."""
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what="ancestral",
                                                 kernel=True, denoise=denoise, spacing=spacing)
    k = schedule(sde, grid, x)
    return run(sde, score, x, k.t, _ancestral_step(sde, score, generator, k), denoise=denoise,
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
    check_choice("predictor", predictor, PREDICTORS)
    if predictor != "em":
        require_affine(sde, f"pc with the {predictor} predictor", predictor)
    check_count("corrector_steps", corrector_steps, 0)
    check_positive("snr", snr)
    check_choice("norms", norms, NORMS)
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what="pc",
                                                 kernel=predictor == "ancestral", denoise=denoise,
                                                 spacing=spacing)
    predict = _predictor(predictor, sde, score, generator, grid, x)
    mask = _noise_mask(sde, x)

    def step(x, i, t, t_next):
        x = predict(x, i, t, t_next)
        for _ in range(corrector_steps):
            x = langevin_step(score, x, t_next, snr, generator, norms=norms, mask=mask)
        return x
    return run(sde, score, x, grid.to(x.dtype), step, denoise=denoise, progress=progress,
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
    check_count("corrector_steps", corrector_steps, 1)
    if step_lr is not None:
        check_positive("step_lr", step_lr)
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what="ald",
                                                 kernel=True, denoise=denoise, spacing=spacing)
    k = schedule(sde, grid, x)
    alpha = k.v if step_lr is None else step_lr * k.v / k.v[-1]

    def step(x, i, t, t_next):
        for _ in range(corrector_steps):
            x = x + alpha[i + 1] / 2 * score(x, t_next) + alpha[i + 1].sqrt() * noise(x, generator)
        return x
    return run(sde, score, x, k.t, step, denoise=denoise, progress=progress, after_step=after_step,
                desc="ald")

