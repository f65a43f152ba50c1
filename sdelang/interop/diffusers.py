"""A diffusers scheduler for any compiled affine SDE (docs/interop.md, "diffusers").

`SDEScheduler(sde_source, sde_params)` compiles the program text and follows diffusers' scheduler
protocol: `set_timesteps`, `timesteps`, `step` (returning `prev_sample` and `pred_original_sample`),
`add_noise`, `scale_model_input`, `init_noise_sigma`, and `save_pretrained` / `from_pretrained`, whose
config carries the .sde source and parameters. Conventions (any affine kernel N(m x0 + c, v I)):

    model timestep   tau = num_train_timesteps * t / T   (a float; t in [eps, T])
    add_noise        x_t = m(t) x0 + c(t) + sqrt(v(t)) noise
    model input      (x - c(t)) / sqrt(m(t)^2 data_std^2 + v(t))   (scale_model_input, sdelang's own scaling)
    prediction       "epsilon": eps_hat, x0_hat = (x - c - sqrt(v) eps_hat) / m;  "sample": x0_hat itself
    training         t ~ the .sde file's time sampler (`sample_timesteps`), loss weight
                     lambda / (q v) per |eps_hat - noise|^2 (`training_weight`; times m^2 / v for "sample")

Sampling steps between the times of `set_timesteps` (uniform in logSNR by default), with y = x - c,
lambda = logSNR / 2, h = lambda_next - lambda (MATH.md sections 4 and 9):

    "dpmsolver++"  y' = (sigma'/sigma) y + m' (1 - e^-h) D, D = x0_hat, or from the second step on the
                   multistep D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev, r = h_prev / h
    "ddim"         y' = m' x0_hat + sqrt(v' - s^2) eps_hat + s z, s^2 = eta^2 v' (v - r^2 v') / v,
                   r = m/m' (eta = 1: the exact posterior q(x' | x, x0_hat), ancestral sampling)

and the step from the last time (eps) returns x0_hat: n timesteps cost n model evaluations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..loader import load
from ..runtime.kinds import kind_of
from ..runtime.logsnr import log_snr_times
from ..runtime.losses import time_weight

PREDICTIONS = ("epsilon", "sample")
SOLVERS = ("dpmsolver++", "ddim")
SPACINGS = ("logsnr", "time")


@dataclass
class SDESchedulerOutput(BaseOutput):
    """`prev_sample`: x at the next (smaller) time; `pred_original_sample`: the model's x0_hat."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class SDEScheduler(SchedulerMixin, ConfigMixin):
    """diffusers' scheduler protocol for the affine SDE in `sde_source` (program text) with parameters
    `sde_params` (module docstring for every convention)."""

    order = 1

    @register_to_config
    def __init__(self, sde_source: str, sde_params: dict | None = None, num_train_timesteps: int = 1000,
                 prediction_type: str = "epsilon", solver: str = "dpmsolver++", eta: float = 0.0,
                 timestep_spacing: str = "logsnr", data_std: float = 1.0):
        _choice("prediction_type", prediction_type, PREDICTIONS)
        _choice("solver", solver, SOLVERS)
        _choice("timestep_spacing", timestep_spacing, SPACINGS)
        if not (0.0 <= float(eta) <= 1.0):
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: ancestral), got {eta!r}")
        if not (math.isfinite(data_std) and data_std > 0):
            raise ValueError(f"data_std must be positive and finite, got {data_std!r}")
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        if "\n" not in sde_source:
            raise ValueError("sde_source is the program's text (e.g. Path('vp.sde').read_text()), not a path")
        self.sde = load(sde_source, **(sde_params or {})).to(torch.float64)
        if kind_of(self.sde) != "affine":
            raise ValueError(f"SDEScheduler needs an affine SDE (a scalar Gaussian kernel); this one is "
                             f"{kind_of(self.sde)!r}")
        self.T, self.eps = float(self.sde.T), float(self.sde.eps)
        mean, variance = self.sde._prior()
        self.init_noise_mean, self.init_noise_sigma = float(mean), math.sqrt(float(variance))
        self._on_device = {}
        self.set_timesteps(int(self.sde.N))

    # Times and the kernel -------------------------------------------------------------------------

    def time(self, timesteps) -> torch.Tensor:
        """t = T tau / num_train_timesteps for model timesteps tau (float64)."""
        tau = torch.as_tensor(timesteps)
        dtype = torch.float32 if tau.device.type == "mps" else torch.float64
        return tau.to(dtype) * (self.T / self.config.num_train_timesteps)

    def _sde(self, device):
        """The module on `device` (a copy per device, made once)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.sde
        if device not in self._on_device:
            self._on_device[device] = load(self.config.sde_source, **(self.config.sde_params or {})).to(
                device, torch.float32 if device.type == "mps" else torch.float64)
        return self._on_device[device]

    def kernel(self, timesteps, like: torch.Tensor):
        """m, c, sqrt(v) at the model timesteps, [B] or scalar, expanded against like, in like's dtype."""
        t = self.time(timesteps).to(like.device).reshape(-1)
        sde = self._sde(like.device)
        values = (sde.mean_coeff(t), sde.mean_offset(t), sde.std(t))
        return tuple(sde._expand(v.expand(like.shape[:1]) if v.numel() == 1 else v, like).to(like.dtype)
                     for v in values)

    # Training -------------------------------------------------------------------------------------

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = m(t) x0 + c(t) + sqrt(v(t)) noise."""
        m, c, std = self.kernel(timesteps, original_samples)
        return m * original_samples + c + std * noise

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """(x - c) / sqrt(m^2 data_std^2 + v): unit-scale network input at every t (use it in training too)."""
        if timestep is None:
            raise ValueError("scale_model_input needs the timestep: the input scale depends on t")
        m, c, std = self.kernel(timestep, sample)
        return (sample - c) * torch.rsqrt(m**2 * self.config.data_std**2 + std**2)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device=None):
        """batch_size model timesteps with t drawn by the .sde file's time sampler (uniform or importance)."""
        t = self.sde.sample_t(batch_size, generator=generator)
        return (t * (self.config.num_train_timesteps / self.T)).to(device=device, dtype=torch.float32)

    def training_weight(self, timesteps) -> torch.Tensor:
        """The weight of the squared error of each draw, in the configured prediction type, so that the mean
        over draws estimates the .sde file's weighted score-matching objective: lambda / (q v) for
        |eps_hat - noise|^2, times m^2 / v for |x0_hat - x0|^2 (as eps_hat - noise = m (x0 - x0_hat) / sqrt(v))."""
        t = self.time(torch.as_tensor(timesteps).cpu()).reshape(-1)
        weight = time_weight(self.sde, t)
        if self.config.prediction_type == "sample":
            weight = weight * self.sde.mean_coeff(t) ** 2 / self.sde.std(t) ** 2
        return weight.to(torch.as_tensor(timesteps).device, torch.float32)

    # Sampling -------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None):
        """num_inference_steps times from T down to eps (uniform in logSNR or in t), as model timesteps."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n = num_inference_steps
        if n == 1:
            times = torch.tensor([self.T], dtype=torch.float64)
        elif self.config.timestep_spacing == "time":
            times = torch.linspace(self.T, self.eps, n, dtype=torch.float64)
        else:
            times = log_snr_times(self.sde, torch.linspace(1.0, 0.0, n, dtype=torch.float64))
            times[0], times[-1] = self.T, self.eps
        self.num_inference_steps = n
        self._times = times
        self._lambda = self.sde.log_snr(times) / 2
        self.timesteps = (times * (self.config.num_train_timesteps / self.T)).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._previous = None  # (x0_hat, h) of the step before, for the multistep solver

    def _index(self, timestep) -> int:
        """The step's index: the next one in order, checked against the timestep given."""
        index = 0 if self._step_index is None else self._step_index
        if index >= self.num_inference_steps:
            raise ValueError("step() was called more often than set_timesteps() made timesteps; call "
                             "set_timesteps() again to start a new sampling run")
        expected = float(self.timesteps[index])
        given = float(torch.as_tensor(timestep).reshape(-1)[0])
        if not math.isclose(given, expected, rel_tol=1e-5, abs_tol=1e-6):
            matches = (self.timesteps - given).abs().argmin().item()
            if not math.isclose(float(self.timesteps[matches]), given, rel_tol=1e-5, abs_tol=1e-6):
                raise ValueError(f"timestep {given} is not one of scheduler.timesteps; step() must be called "
                                 f"with the timesteps of set_timesteps(), in order")
            index = matches
            self._previous = None
        return index

    def _kernel_at(self, i: int):
        t = self._times[i:i + 1]
        return (float(self.sde.mean_coeff(t)), float(self.sde.mean_offset(t)), float(self.sde.std(t)))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """One step from timestep to the next one of `timesteps` (from the last one, to x0_hat)."""
        i = self._index(timestep)
        m, c, std = self._kernel_at(i)
        if self.config.prediction_type == "epsilon":
            eps_hat = model_output
            x0_hat = (sample - c - std * eps_hat) / m
        else:
            x0_hat = model_output
            eps_hat = (sample - c - m * x0_hat) / std
        self._step_index = i + 1
        if i == self.num_inference_steps - 1:
            prev = x0_hat
        elif self.config.solver == "ddim":
            prev = self._ddim(i, x0_hat, eps_hat, generator)
        else:
            prev = self._dpmsolver(i, sample, x0_hat)
        if not return_dict:
            return (prev,)
        return SDESchedulerOutput(prev_sample=prev, pred_original_sample=x0_hat)

    def _ddim(self, i, x0_hat, eps_hat, generator):
        m, _, std = self._kernel_at(i)
        m_next, c_next, std_next = self._kernel_at(i + 1)
        r = m / m_next
        s2 = self.config.eta**2 * std_next**2 * max(std**2 - r**2 * std_next**2, 0.0) / std**2
        out = m_next * x0_hat + c_next + math.sqrt(max(std_next**2 - s2, 0.0)) * eps_hat
        if s2 > 0:
            z = torch.randn(x0_hat.shape, generator=generator, dtype=x0_hat.dtype,
                            device=generator.device if generator is not None else x0_hat.device)
            out = out + math.sqrt(s2) * z.to(x0_hat.device)
        return out

    def _dpmsolver(self, i, sample, x0_hat):
        _, c, std = self._kernel_at(i)
        m_next, c_next, std_next = self._kernel_at(i + 1)
        h = float(self._lambda[i + 1] - self._lambda[i])
        D = x0_hat
        if self._previous is not None:
            previous, h_previous = self._previous
            r = h_previous / h
            D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * previous
        self._previous = (x0_hat, h)
        return std_next / std * (sample - c) + m_next * -math.expm1(-h) * D + c_next

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None,
                     dtype=torch.float32) -> torch.Tensor:
        """A draw from the prior N(init_noise_mean, init_noise_sigma^2 I): where to start sampling (a
        pipeline that starts from randn * init_noise_sigma misses a nonzero prior mean, e.g. OU's)."""
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype,
                        device=generator.device if generator is not None else device)
        return (self.init_noise_mean + self.init_noise_sigma * z).to(device)

    def __len__(self):
        return self.config.num_train_timesteps
