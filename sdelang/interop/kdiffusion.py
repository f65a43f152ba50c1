"""k-diffusion's form of a compiled affine SDE: a denoiser D(x_k, sigma_k) and sigma schedules.

k-diffusion (Karras et al. 2022) samples the variance-exploding process x_k = x0 + sigma_k z with the
flow ODE dx_k / dsigma_k = (x_k - D(x_k, sigma_k)) / sigma_k, D the denoiser E[x0 | x_k]. Any affine SDE
with kernel N(m(t) x0 + c(t), v(t) I) is that process after a change of variables (MATH.md section 9):

    sigma_k = sqrt(v) / m = exp(-logSNR(t) / 2),    x_k = (x - c(t)) / m(t),    x = m x_k + c,
    D(x_k, sigma_k) = x0_hat(x, t) = (x - c + v s(x, t)) / m          (Tweedie, s the score),

so every k-diffusion sampler runs on any compiled affine SDE and score model. The time of a sigma is
logSNR^-1(-2 log sigma) in float64: by bisection (runtime/logsnr.py) in `time_of_sigma`, and in the
denoiser, called at every step, from a table refined by Newton steps (`_Times`).
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

from ..runtime.kinds import kind_of
from ..runtime.logsnr import log_snr_inverse, log_snr_times

SPACINGS = ("logsnr", "time", "karras")
TABLE_POINTS = 1025  # the Denoiser's table of log t against logSNR, uniform in logSNR
# From the table's interpolation to float64 round-off: ~1e-4 relative where logSNR is smooth in log t, far more
# just above eps where it is linear in t (v0 > 0: VE from N(0, sigma_min^2)), where 3 steps left 3.6e-4.
NEWTON_STEPS = 5


def _require_affine(sde, what: str) -> None:
    if kind_of(sde) != "affine":
        raise ValueError(f"{what} needs an affine SDE (a scalar Gaussian kernel m x0 + c, v); this module is "
                         f"{kind_of(sde)!r}, for which x_k = (x - c) / m and sigma_k = sqrt(v) / m have no meaning")


def _ends(sde) -> tuple[float, float]:
    """logSNR(eps) and logSNR(T) in float64."""
    ends = torch.tensor([float(sde.eps), float(sde.T)], dtype=torch.float64, device=sde._anchor.device)
    hi, lo = sde.log_snr(ends).tolist()
    return hi, lo


def sigma_range(sde) -> tuple[float, float]:
    """(sigma_min, sigma_max) = (exp(-logSNR(eps) / 2), exp(-logSNR(T) / 2)): the k-diffusion noise levels
    of the SDE's own time interval [eps, T]."""
    _require_affine(sde, "sigma_range")
    hi, lo = _ends(sde)
    return math.exp(-hi / 2), math.exp(-lo / 2)


def time_of_sigma(sde, sigma: torch.Tensor) -> torch.Tensor:
    """t = logSNR^-1(-2 log sigma) in float64 on sigma's device, clamped to [eps, T] (sigmas outside
    sigma_range(sde) map to its ends)."""
    _require_affine(sde, "time_of_sigma")
    return log_snr_inverse(sde, -2 * torch.as_tensor(sigma).to(torch.float64).log())


def sigma_of_time(sde, t: torch.Tensor) -> torch.Tensor:
    """sigma_k(t) = exp(-logSNR(t) / 2), in t's dtype."""
    _require_affine(sde, "sigma_of_time")
    return torch.exp(-sde.log_snr(t) / 2)


def get_sigmas(sde, n: int, spacing: str = "logsnr", *, rho: float = 7.0, append_zero: bool = True,
               device=None, dtype=torch.float32) -> torch.Tensor:
    """n decreasing noise levels from sigma_max to sigma_min of the SDE (then 0, k-diffusion's last
    entry, unless append_zero=False), for k-diffusion's `sample_*(model, x, sigmas)`.

    spacing "logsnr": uniform in logSNR, i.e. in log sigma (k-diffusion's exponential schedule; the grid
        of sdelang's own DPM-Solver);
    "time": the sigmas of times uniform in [eps, T] (the grid of score_sde's samplers);
    "karras": EDM's sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    Computed in float64, returned in dtype.
    """
    _require_affine(sde, "get_sigmas")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (the number of noise levels), got {n!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    device = sde._anchor.device if device is None else device
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64, device=device)
    sigma_min, sigma_max = sigma_range(sde)
    if spacing == "logsnr":
        sigmas = sigma_of_time(sde, log_snr_times(sde, 1.0 - ramp))
        sigmas[0], sigmas[-1] = sigma_max, sigma_min
    elif spacing == "time":
        sigmas = sigma_of_time(sde, float(sde.T) + ramp * (float(sde.eps) - float(sde.T)))
    else:
        if not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho must be positive and finite, got {rho!r}")
        top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sigmas = (top + ramp * (bottom - top)) ** rho
    if append_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype)


class _Times:
    """t = logSNR^-1(y) fast, for the denoiser's every call: log t interpolated from a table uniform in
    logSNR (made once by bisection), then Newton steps in log t with the exact slope
    d logSNR / d log t = -t g(t)^2 / v(t) (MATH.md section 3: g^2 / v = -d logSNR / dt for any affine SDE).
    A fixed number of steps and no data-dependent branches: no host-device synchronisation."""

    def __init__(self, sde):
        self.sde = sde
        self.ends = _ends(sde)
        t = log_snr_times(sde, torch.linspace(0.0, 1.0, TABLE_POINTS, dtype=torch.float64, device=sde._anchor.device))
        self.log_t = t.log()
        self.bounds = (math.log(float(sde.eps)), math.log(float(sde.T)))

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        high, low = self.ends
        log_table = self.log_t.to(target.device)
        position = ((high - target) / (high - low) * (TABLE_POINTS - 1)).clamp(0, TABLE_POINTS - 1)
        index = position.floor().long().clamp(max=TABLE_POINTS - 2)
        fraction = position - index
        log_t = log_table[index] * (1 - fraction) + log_table[index + 1] * fraction
        for _ in range(NEWTON_STEPS):
            t = log_t.exp()
            slope = -t * self.sde.sde(t, t)[1] ** 2 / self.sde.std(t) ** 2
            log_t = (log_t - (self.sde.log_snr(t) - target) / slope).clamp(*self.bounds)
        return log_t.exp()


class Denoiser(nn.Module):
    """D(x_k, sigma_k) = E[x0 | x_k] for a compiled affine SDE `sde` and a score function
    `score_fn(x, t, **kwargs)` in the SDE's own variables: k-diffusion's model interface.

    Keyword arguments of a call (k-diffusion's `extra_args`) pass on to score_fn. For a noise-prediction
    network eps(x, t), pass `lambda x, t: -eps(x, t) / sde.std(t)[:, None, ...]`.
    """

    def __init__(self, sde, score_fn):
        super().__init__()
        _require_affine(sde, "Denoiser")
        self.sde = sde
        self.score_fn = score_fn
        self.sigma_min, self.sigma_max = sigma_range(sde)
        self._times = _Times(sde)

    def kernel(self, sigma: torch.Tensor, like: torch.Tensor):
        """t, m(t), c(t), v(t) for sigma [B] (or a scalar), the coefficients expanded against like."""
        sigma = torch.as_tensor(sigma, device=like.device).expand(like.shape[:1])
        t = self._times(-2 * sigma.to(torch.float64).log())
        m, c, std = (self.sde._expand(k.to(like.dtype), like)
                     for k in (self.sde.mean_coeff(t), self.sde.mean_offset(t), self.sde.std(t)))
        return t.to(like.dtype), m, c, std**2

    def to_sde(self, x_k: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, t): the SDE's state and time for k-diffusion's x_k at noise level sigma."""
        t, m, c, _ = self.kernel(sigma, x_k)
        return m * x_k + c, t

    def from_sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_k, sigma_k): k-diffusion's variables for the SDE's state x at times t [B]."""
        m, c = (self.sde._expand(k, x) for k in (self.sde.mean_coeff(t), self.sde.mean_offset(t)))
        return (x - c) / m, sigma_of_time(self.sde, t)

    def forward(self, x_k: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        t, m, c, v = self.kernel(sigma, x_k)
        x = m * x_k + c
        return (x - c + v * self.score_fn(x, t, **kwargs)) / m


class ScoreFromDenoiser(nn.Module):
    """The other direction: the score s(x, t) = (m D(x_k, sigma_k) - (x - c)) / v of a k-diffusion
    denoiser `denoiser(x_k, sigma_k)`, for sdelang's samplers and likelihood on the affine SDE `sde`."""

    def __init__(self, sde, denoiser):
        super().__init__()
        _require_affine(sde, "ScoreFromDenoiser")
        self.sde = sde
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        expand = self.sde._expand
        m, c, std = (expand(k, x) for k in (self.sde.mean_coeff(t), self.sde.mean_offset(t), self.sde.std(t)))
        sigma = sigma_of_time(self.sde, t)
        return (m * self.denoiser((x - c) / m, sigma, **kwargs) - (x - c)) / std**2


def k_diffusion_sampling() -> types.ModuleType:
    """k-diffusion's `sampling` module (its `sample_*` functions and sigma schedules).

    `import k_diffusion` also imports its training and evaluation code (torchvision, CLIP, clean-fid,
    scikit-image). Where those are absent or built for another torch, the installed package's
    sampling.py, which needs only scipy, torchdiffeq, torchsde and tqdm, is loaded on its own, under its
    own name, with the one helper it takes from k_diffusion.utils (`append_dims`).
    Raises ImportError when k-diffusion is not installed.
    """
    try:
        import k_diffusion.sampling as sampling
        return sampling
    except ImportError as error:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion torchsde "
                              "(docs/interop.md)") from error
        failure = error
    name = "sdelang_k_diffusion"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    package = types.ModuleType(name)
    package.__path__ = []
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims
    package.utils = utils
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    sampling_spec = importlib.util.spec_from_file_location(f"{name}.sampling", path)
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules.update({name: package, f"{name}.utils": utils, f"{name}.sampling": module})
    try:
        sampling_spec.loader.exec_module(module)
    except ImportError as error:
        for key in (name, f"{name}.utils", f"{name}.sampling"):
            sys.modules.pop(key, None)
        raise ImportError(f"k-diffusion is installed but neither the package ({failure}) nor its sampling "
                          f"module alone ({error}) imports") from error
    return module


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """x with trailing axes of size 1 up to target_dims axes (k_diffusion.utils.append_dims' contract)."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]
