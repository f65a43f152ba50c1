"""The other way: a .sde program from a diffusers DDPM-style discrete schedule (docs/interop.md, "DDPM").

A DDPM chain x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) z, k = 0 .. N-1 (diffusers' 0-based
timesteps; x_{-1} the data), is the discretisation of the VP SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dw
with N beta_k = beta((k + 1) / N): timestep k is time t_k = (k + 1) / N, and the kernel
N(m(t) x0, (1 - m^2) I) of the SDE matches alphas_cumprod_k = prod_{j <= k} (1 - beta_j) = m(t_k)^2
up to the discretisation error that `correspondence_error` measures:

    linear             beta_k = beta_start + k/(N-1) (beta_end - beta_start);
                       beta(t) = N (beta_start + t (beta_end - beta_start))   (score_sde's VP for 1e-4, 0.02)
    scaled_linear      beta_k = (a + k/(N-1) (b - a))^2, a, b = sqrt(beta_start), sqrt(beta_end);
                       beta(t) = N (a + t (b - a))^2
    squaredcos_cap_v2  beta_k = min(1 - abar((k+1)/N) / abar(k/N), 0.999), abar(t) = cos((t + 0.008)/1.008 pi/2)^2;
                       the cosine VP with m(t)^2 = abar(t) / abar(0), exact for every k below the capped last step

The program's interval is [1/N, T] (eps: timestep 0, the least noise the model was trained on), with
T = 1 (timestep N-1) for the linear schedules and (N - 1) / N for the cosine one, whose continuous
beta is infinite at t = 1.
"""
from __future__ import annotations

import json
import math
import os

import torch

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
COSINE_OFFSET = 0.008
COSINE_CAP = 0.999


def _config(config) -> dict:
    """A DDPM scheduler config: a dict, a diffusers scheduler (its .config) or the path of its
    scheduler_config.json (or of the folder holding it)."""
    if hasattr(config, "config"):
        config = dict(config.config)
    elif isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "scheduler_config.json")
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    if not isinstance(config, dict):
        raise TypeError(f"expected a scheduler config (dict, scheduler or path), got {type(config).__name__}")
    config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
              **config}
    if config.get("trained_betas") is not None:
        raise ValueError("the config gives trained_betas, an arbitrary table: no closed-form beta(t) to write; "
                         "only beta_schedule linear, scaled_linear or squaredcos_cap_v2 are translated")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr makes the last alphas_cumprod 0 (logSNR = -inf), which no "
                         "SDE on a finite interval reaches; translate the schedule without it")
    if config["beta_schedule"] not in SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {', '.join(SCHEDULES)}; got {config['beta_schedule']!r}")
    N = config["num_train_timesteps"]
    if isinstance(N, bool) or not isinstance(N, int) or N < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {N!r}")
    for key in ("beta_start", "beta_end"):
        if not (isinstance(config[key], (int, float)) and 0 < config[key] < 1):
            raise ValueError(f"{key} must be a number in (0, 1), got {config[key]!r}")
    return config


def discrete_betas(config) -> torch.Tensor:
    """The DDPM betas of the config in float64, by the formulas of the module docstring."""
    config = _config(config)
    N, schedule = config["num_train_timesteps"], config["beta_schedule"]
    ramp = torch.linspace(0.0, 1.0, N, dtype=torch.float64)
    if schedule == "linear":
        return config["beta_start"] + ramp * (config["beta_end"] - config["beta_start"])
    if schedule == "scaled_linear":
        a, b = math.sqrt(config["beta_start"]), math.sqrt(config["beta_end"])
        return (a + ramp * (b - a)) ** 2
    k = torch.arange(N, dtype=torch.float64)
    abar = lambda t: torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2  # noqa: E731
    return torch.clamp(1 - abar((k + 1) / N) / abar(k / N), max=COSINE_CAP)


def interval(config) -> tuple[float, float]:
    """(eps, T) = (1/N, 1) for the linear schedules, (1/N, (N-1)/N) for squaredcos_cap_v2."""
    config = _config(config)
    N = config["num_train_timesteps"]
    return 1 / N, (1.0 if config["beta_schedule"] != "squaredcos_cap_v2" else (N - 1) / N)


def ddpm_program(config, name: str | None = None) -> str:
    """The .sde program of the VP SDE whose discretisation the DDPM schedule `config` is (module docstring).
    Load it with `sdelang.load(text)`. Its parameters are N beta_start and N beta_end (linear: beta_min and
    beta_max, as score_sde's VP) or their square roots (scaled_linear: root_min, root_max)."""
    config = _config(config)
    N, schedule = config["num_train_timesteps"], config["beta_schedule"]
    name = name or f"ddpm_{schedule}"
    eps, T = interval(config)
    head = [f"# The VP SDE of diffusers' DDPM schedule beta_schedule = {schedule}, num_train_timesteps = {N}",
            "# (sdelang.interop.ddpm): DDPM timestep k is time t = (k + 1) / N.", "", f"sde {name}", ""]
    if schedule == "squaredcos_cap_v2":
        body = [f"s = {COSINE_OFFSET!r}", "phi(t) = (t + s) / (1 + s) * pi / 2",
                "alpha_bar(t) = cos(phi(t))^2 / cos(phi(0))^2", "beta(t) = -d/dt(log(alpha_bar(t)))"]
    elif schedule == "linear":  # beta_min, beta_max = N beta_start, N beta_end: score_sde's VP parameters
        body = [f"param beta_min = {N * config['beta_start']!r}", f"param beta_max = {N * config['beta_end']!r}",
                "beta(t) = beta_min + t * (beta_max - beta_min)"]
    else:  # beta = N (a + t (b - a))^2 = (root_min + t (root_max - root_min))^2, roots of N beta_start, N beta_end
        body = [f"param root_min = {math.sqrt(N * config['beta_start'])!r}",
                f"param root_max = {math.sqrt(N * config['beta_end'])!r}",
                "beta(t) = (root_min + t * (root_max - root_min))^2"]
    tail = ["", "dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw", "",
            f"t in [{eps!r}, {T!r}]", f"steps {N}", "prior normal(0, 1)", "weighting score_matching",
            "t ~ uniform", ""]
    return "\n".join(head + body + tail)


def correspondence_error(config, sde=None) -> dict[str, float]:
    """How far the SDE's kernel is from the DDPM chain at t_k = (k + 1) / N, over the timesteps the
    interval covers: the largest differences of sqrt(alphas_cumprod_k) against m(t_k) and of
    sqrt(1 - alphas_cumprod_k) against sigma(t_k), and of their logSNR (log(abar / (1 - abar)))."""
    from ..loader import load

    config = _config(config)
    sde = load(ddpm_program(config)) if sde is None else sde
    sde = sde.to(torch.float64)
    N = config["num_train_timesteps"]
    eps, T = interval(config)
    abar = torch.cumprod(1 - discrete_betas(config), 0)
    k = torch.arange(N, dtype=torch.float64)
    keep = (k + 1) / N <= T * (1 + 1e-12)
    t, abar = ((k + 1) / N)[keep], abar[keep]
    m, std, log_snr = sde.mean_coeff(t), sde.std(t), sde.log_snr(t)
    discrete_log_snr = torch.log(abar) - torch.log1p(-abar)
    return {"mean_coeff": float((abar.sqrt() - m).abs().max()), "std": float(((1 - abar).sqrt() - std).abs().max()),
            "log_snr": float((discrete_log_snr - log_snr).abs().max()), "timesteps": int(keep.sum())}


def ddpm_score(model, sde, num_train_timesteps: int, prediction_type: str = "epsilon"):
    """s(x, t) for sdelang's samplers and likelihood from a DDPM model `model(x, k)` (a diffusers UNet's
    output `.sample` is taken), called at the fractional timestep k = N t - 1. prediction_type:
    "epsilon": s = -eps / sigma; "sample": s = (m x0_hat - x) / sigma^2; "v_prediction" (v = m eps -
    sigma x0): eps = sigma x + m v, for the variance-preserving kernel (m^2 + sigma^2 = 1)."""
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTIONS)}; got {prediction_type!r}")
    N = num_train_timesteps

    def score(x, t):
        out = model(x, t * N - 1)
        out = getattr(out, "sample", out)
        m, std = (sde._expand(f(t), x) for f in (sde.mean_coeff, sde.std))
        if prediction_type == "sample":
            return (m * out - x) / std**2
        eps = out if prediction_type == "epsilon" else std * x + m * out
        return -eps / std
    return score
