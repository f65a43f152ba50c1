"""sdelang.interop.ddpm: .sde programs from diffusers' DDPM schedules, and their error against the chain."""
from __future__ import annotations

import math

import pytest
import torch

import sdelang
from sdelang.interop import ddpm
from sdelang.runtime.likelihood import log_likelihood

CONFIGS = {
    "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                      "num_train_timesteps": 1000},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
}


def load(schedule, **changes):
    return sdelang.load(ddpm.ddpm_program({**CONFIGS[schedule], **changes})).to(torch.float64)


@pytest.mark.parametrize("schedule", CONFIGS)
def test_discrete_betas_are_diffusers(schedule):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(**CONFIGS[schedule])
    assert torch.allclose(ddpm.discrete_betas(CONFIGS[schedule]).float(), theirs.betas, rtol=1e-6, atol=0)
    assert torch.allclose(ddpm.discrete_betas(theirs).float(), theirs.betas, rtol=1e-6, atol=0)


def test_config_files_are_read(tmp_path):
    import json

    (tmp_path / "scheduler_config.json").write_text(json.dumps(CONFIGS["scaled_linear"]))
    assert ddpm.ddpm_program(tmp_path) == ddpm.ddpm_program(CONFIGS["scaled_linear"])


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_the_kernel_is_the_continuous_schedule(schedule):
    """m(t) = exp(-B(t)/2), B = int_0^t N beta(u) du written here in closed form, against the module."""
    c = CONFIGS[schedule]
    N, bs, be = c["num_train_timesteps"], c["beta_start"], c["beta_end"]
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    if schedule == "linear":
        B = N * (bs * t + (be - bs) * t**2 / 2)
    else:
        a, b = math.sqrt(bs), math.sqrt(be)
        B = N * ((a + t * (b - a)) ** 3 - a**3) / (3 * (b - a))
    sde = load(schedule)
    assert torch.allclose(sde.mean_coeff(t), torch.exp(-B / 2), rtol=1e-12)
    assert torch.allclose(sde.std(t), torch.sqrt(-torch.expm1(-B)), rtol=1e-12)
    assert (sde.eps, sde.T, sde.N) == (1e-3, 1, 1000)


def test_cosine_schedule_is_exact_below_the_cap():
    """squaredcos_cap_v2: alphas_cumprod_k = abar((k + 1)/N) / abar(0) = m(t_k)^2 exactly (telescoping)
    for k <= N - 2; the capped last step lies beyond T = (N - 1)/N."""
    errors = ddpm.correspondence_error(CONFIGS["squaredcos_cap_v2"], load("squaredcos_cap_v2"))
    assert errors["timesteps"] == 999
    assert errors["mean_coeff"] < 1e-13 and errors["std"] < 1e-12 and errors["log_snr"] < 1e-10


@pytest.mark.parametrize("schedule, bound", [("linear", (2e-3, 2e-3, 0.1)), ("scaled_linear", (1e-3, 1e-3, 0.03))])
def test_linear_schedules_are_first_order_discretisations(schedule, bound):
    """The chain's alphas_cumprod against the SDE's kernel at t_k = (k + 1)/N: measured largest errors of
    sqrt(abar) 9.9e-4 / 8.5e-4, of sqrt(1 - abar) 1.3e-3 / 2.5e-4 and of logSNR 0.095 / 0.021 (linear /
    scaled_linear, N = 1000); doubling N with the same continuous beta (beta_start, beta_end halved)
    halves them (first order: log(1 - beta) = -beta + O(beta^2) and the grid offset are O(1/N))."""
    errors = ddpm.correspondence_error(CONFIGS[schedule], load(schedule))
    assert all(e < b for e, b in zip((errors["mean_coeff"], errors["std"], errors["log_snr"]), bound)), errors
    c = CONFIGS[schedule]
    finer = {**c, "num_train_timesteps": 2000, "beta_start": c["beta_start"] / 2, "beta_end": c["beta_end"] / 2}
    finer_errors = ddpm.correspondence_error(finer)
    assert 1.6 < errors["log_snr"] / finer_errors["log_snr"] < 2.4, (errors, finer_errors)


@pytest.mark.parametrize("prediction", ddpm.PREDICTIONS)
def test_ddpm_score_converts_each_prediction(prediction):
    """A model exact for data N(0.3, 0.25) in each parameterisation, called at k = N t - 1, gives the exact
    score: -(x - 0.3 m) / (0.25 m^2 + sigma^2), with m, sigma from the closed-form cosine kernel."""
    sde = load("squaredcos_cap_v2")
    phi = lambda t: (t + 0.008) / 1.008 * math.pi / 2  # noqa: E731

    def kernel(k):
        t = (k + 1) / 1000
        m = (torch.cos(phi(t)) / math.cos(phi(0.0)))[:, None]
        return m, torch.sqrt(1 - m**2)

    def model(x, k):
        m, sigma = kernel(k)
        x0 = 0.3 + m * 0.25 * (x - 0.3 * m) / (0.25 * m**2 + sigma**2)
        eps = (x - m * x0) / sigma
        return {"epsilon": eps, "sample": x0, "v_prediction": m * eps - sigma * x0}[prediction]

    t = torch.tensor([0.01, 0.3, 0.7, 0.99], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    m, sigma = kernel(t * 1000 - 1)
    expected = -(x - 0.3 * m) / (0.25 * m**2 + sigma**2)
    assert torch.allclose(ddpm.ddpm_score(model, sde, 1000, prediction)(x, t), expected, rtol=1e-7)


def test_a_ddpm_model_evaluated_with_sdelang_s_likelihood():
    """A model exact for the cosine chain (data N(0.3, 0.25)) through ddpm_score and sdelang's flow-ODE
    likelihood: log p_eps(x) = log N(x; 0.3 m, 0.25 m^2 + sigma^2) at t = eps, plus the prior's mismatch
    log N(x_T; 0, 1) - log p_T(x_T) at the exact flow image x_T (about 5e-4 here), to the solver's
    tolerance (exact trace, 2-D data, rtol = atol = 1e-6)."""
    sde = load("squaredcos_cap_v2")
    phi = lambda t: (t + 0.008) / 1.008 * math.pi / 2  # noqa: E731

    def model(x, k):
        t = (k + 1) / 1000
        m = (torch.cos(phi(t)) / math.cos(phi(0.0))).reshape(-1, 1)
        return (x - 0.3 * m) * torch.sqrt(1 - m**2) / (0.25 * m**2 + 1 - m**2)
    x = 0.3 + 0.5 * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = log_likelihood(sde, ddpm.ddpm_score(model, sde, 1000), x, exact_trace=True, rtol=1e-6, atol=1e-6).logp
    def gaussian(t):
        m = math.cos(phi(t)) / math.cos(phi(0.0))
        return 0.3 * m, 0.25 * m**2 + 1 - m**2

    def log_normal(y, mean, var):
        return -((y - mean) ** 2).sum(1) / (2 * var) - math.log(2 * math.pi * var)
    (mean, var), (mean_T, var_T) = gaussian(1e-3), gaussian(0.999)
    x_T = mean_T + (x - mean) * math.sqrt(var_T / var)
    expected = log_normal(x, mean, var) + log_normal(x_T, 0.0, 1.0) - log_normal(x_T, mean_T, var_T)
    assert torch.allclose(got, expected, atol=5e-5), (got - expected)


def test_schedules_without_a_formula_are_refused():
    with pytest.raises(ValueError, match="trained_betas"):
        ddpm.ddpm_program({"trained_betas": [0.1, 0.2]})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        ddpm.ddpm_program({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        ddpm.ddpm_program({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="num_train_timesteps must be an integer >= 2"):
        ddpm.ddpm_program({"num_train_timesteps": 1})
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        ddpm.ddpm_score(None, None, 1000, "flow")
