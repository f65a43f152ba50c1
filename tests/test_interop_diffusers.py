"""sdelang.interop.diffusers: the scheduler protocol on compiled SDEs, against exact references.

Data N(0.3, 0.5^2 I) with the exact noise prediction (interop_reference.py), so the samplers' results
are compared with closed forms; a tiny UNet2DModel checks the training and sampling loop end to end.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import sdelang  # noqa: E402
from interop_reference import EXAMPLES, exact_flow, exact_score, kernel, marginal  # noqa: E402
from sdelang.interop.diffusers import SDEScheduler  # noqa: E402
from sdelang.runtime.sampling import exponential_integrator  # noqa: E402

SDES = ["vp", "ve", "subvp", "cosine_vp", "ou"]


def scheduler(name, **config):
    return SDEScheduler((EXAMPLES / f"{name}.sde").read_text(), **config)


def exact_eps(name, scheduler):
    """The exact noise prediction eps = -sqrt(v) s at model timestep tau (reference kernel)."""
    score = exact_score(name)

    def eps(x, tau):
        t = scheduler.time(tau).reshape(-1).expand(x.shape[:1]).to(torch.float64)
        return -score(x, t) * kernel(name, t)[2].sqrt().reshape(-1, *(1,) * (x.dim() - 1))
    return eps


def exact_x0(name, scheduler):
    """The exact posterior mean E[x0 | x_t] = mu + m s^2 (x - m mu - c) / (m^2 s^2 + v)."""
    def x0(x, tau):
        t = scheduler.time(tau).reshape(-1).expand(x.shape[:1]).to(torch.float64)
        m, c, v = (q.reshape(-1, *(1,) * (x.dim() - 1)) for q in kernel(name, t))
        return 0.3 + m * 0.25 * (x - m * 0.3 - c) / (m**2 * 0.25 + v)
    return x0


def loop(s, model, x, stop_before_last=False, generator=None):
    """diffusers' sampling loop: for tau in timesteps: x = step(model(x, tau), tau, x).prev_sample."""
    taus = s.timesteps[:-1] if stop_before_last else s.timesteps
    for tau in taus:
        x = s.step(model(x, tau), tau, x, generator=generator).prev_sample
    return x


def start(name, s, n=64, seed=0):
    mean, var = marginal(name, torch.tensor([s.T], dtype=torch.float64))
    return mean + var.sqrt() * torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", SDES)
def test_add_noise_and_input_scaling_are_the_kernel(name):
    s = scheduler(name, data_std=0.5)
    taus = torch.tensor([0.01, 100.0, 500.0, 1000.0])
    t = taus.double() * s.T / 1000
    m, c, v = (q[:, None] for q in kernel(name, t))
    x0, noise = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(s.add_noise(x0, noise, taus), m * x0 + c + v.sqrt() * noise, rtol=1e-6, atol=1e-9)
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(s.scale_model_input(x, taus), (x - c) / torch.sqrt(m**2 * 0.25 + v), rtol=1e-6)
    mean, var = marginal(name, torch.tensor([s.T], dtype=torch.float64), mean=0.0, std=0.0)
    assert (s.init_noise_mean, s.init_noise_sigma) == pytest.approx((mean.item(), var.sqrt().item()), rel=1e-4)


def test_timesteps_and_spacings():
    s = scheduler("vp")
    s.set_timesteps(9)
    assert s.timesteps[0] == 1000 and s.timesteps[-1] == pytest.approx(1e-2, rel=1e-5)
    lam = s.sde.log_snr(s.time(s.timesteps)).double()
    assert torch.allclose(lam.diff(), lam.diff()[:1].expand(8), rtol=1e-5)  # uniform in logSNR
    s = scheduler("vp", timestep_spacing="time")
    s.set_timesteps(5)
    assert torch.allclose(s.timesteps, torch.linspace(1000, 1e-2, 5))
    assert len(s) == 1000


@pytest.mark.parametrize("name", SDES)
def test_ddim_is_sdelang_ddim(name):
    """solver "ddim" (eta 0) on the logSNR grid is DPM-Solver-1, sdelang's order-1 exponential integrator,
    and its last step is the Tweedie denoiser: both give the same samples, to the rounding of the float32
    timesteps the model is given (t differs from the step's float64 time by ~6e-8 relative)."""
    s = scheduler(name, solver="ddim")
    s.set_timesteps(25)
    x_T = start(name, s)
    ours = loop(s, exact_eps(name, s), x_T)
    sde = sdelang.load(EXAMPLES / f"{name}.sde").to(torch.float64)
    reference = exponential_integrator(sde, exact_score(name), x_T.shape, 24, order=1, x_T=x_T).x
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("solver, order", [("ddim", 1), ("dpmsolver++", 2)])
def test_deterministic_solvers_converge_to_the_exact_flow_map(name, solver, order):
    """Up to the last time eps the solvers follow the flow ODE: the error against the exact flow map falls
    about 2^order-fold per doubling of the steps (measured 1.95-2.0 and 3.7-4.1 from 32 to 64 steps) and
    at 64 steps is below 0.1 (DDIM, measured 0.03-0.07) or 0.01 (DPM-Solver++(2M), measured 1e-3-5e-3)."""
    errors = []
    for n in (32, 64):
        s = scheduler(name, solver=solver)
        s.set_timesteps(n)
        x_T = start(name, s)
        x = loop(s, exact_eps(name, s), x_T, stop_before_last=True)
        exact = exact_flow(name, x_T, s.T, s.eps)
        errors.append(((x - exact).abs().max() / exact.abs().max()).item())
    assert errors[0] / errors[1] > 2**order * 0.8, errors
    assert errors[1] < (0.1 if order == 1 else 0.01), errors


@pytest.mark.parametrize("name", SDES)
def test_sample_prediction_gives_the_same_steps(name):
    s_eps = scheduler(name)
    s_x0 = scheduler(name, prediction_type="sample")
    for s in (s_eps, s_x0):
        s.set_timesteps(12)
    x_T = start(name, s_eps)
    a = loop(s_eps, exact_eps(name, s_eps), x_T)
    b = loop(s_x0, exact_x0(name, s_x0), x_T)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)  # float32 timesteps, as above


@pytest.mark.parametrize("name", SDES)
def test_ancestral_step_is_the_exact_posterior(name):
    """eta = 1 with the true x0 as the model's "sample" prediction: x' ~ q(x' | x, x0) = N(m' x0 + c' +
    (r v'/v)(x - m x0 - c), v' (v - r^2 v') / v), r = m / m'. Mean and variance of 20000 draws from one
    x within 5 Monte Carlo standard errors (sd / sqrt(n) and var sqrt(2 / n))."""
    s = scheduler(name, solver="ddim", eta=1.0, prediction_type="sample")
    s.set_timesteps(10)
    tau, tau_next = s.timesteps[3], s.timesteps[4]
    t, t_next = (s.time(v).reshape(1).double() for v in (tau, tau_next))
    (m, c, v), (m2, c2, v2) = (tuple(q.item() for q in kernel(name, u)) for u in (t, t_next))
    x, x0 = 0.7, -0.2
    out = s.step(torch.full((20000, 1), x0, dtype=torch.float64), tau, torch.full((20000, 1), x, dtype=torch.float64),
                 generator=torch.Generator().manual_seed(0)).prev_sample
    r = m / m2
    mean = m2 * x0 + c2 + r * v2 / v * (x - m * x0 - c)
    var = v2 * (v - r**2 * v2) / v
    n = out.numel()
    assert abs(out.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.var().item() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("name", ["vp", "ve", "ou"])
def test_ancestral_steps_reach_the_data(name):
    """eta = 1 with the exact x0 predictor, 400 steps: 4000 draws of N(0.3, 0.25) within 5 Monte Carlo
    standard errors (s / sqrt(n), s / sqrt(2n)) + 0.015, the sampler's own bias (with x0_hat in place of
    x0 the std falls short by 0.056, 0.014, 0.003 at 50, 200, 800 steps on VP)."""
    s = scheduler(name, solver="ddim", eta=1.0)
    s.set_timesteps(400)
    g = torch.Generator().manual_seed(0)
    x = loop(s, exact_eps(name, s), s.prior_sample((4000, 1), generator=g, dtype=torch.float64), generator=g)
    n = x.numel()
    assert abs(x.mean().item() - 0.3) < 5 * 0.5 / math.sqrt(n) + 0.015
    assert abs(x.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n) + 0.015


def test_training_weight_is_the_file_s_weighting():
    """vp_likelihood: lambda = g^2, t ~ importance, so lambda / (q v) is the constant
    Z = logSNR(eps) - logSNR(T); vp: lambda = v, t uniform, the weight is T - eps."""
    s = scheduler("vp_likelihood")
    taus = s.sample_timesteps(6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1e-5, 1.0], dtype=torch.float64)
    m, _, v = kernel("vp", t)
    Z = (torch.log(m**2 / v)[0] - torch.log(m**2 / v)[1]).item()
    assert torch.allclose(s.training_weight(taus).double(), torch.full((6,), Z, dtype=torch.float64), rtol=1e-5)
    s = scheduler("vp")
    assert torch.allclose(s.training_weight(torch.tensor([1.0, 500.0])), torch.full((2,), 1 - 1e-5))
    s = scheduler("vp", prediction_type="sample")
    tau = torch.tensor([300.0])
    m, _, v = kernel("vp", torch.tensor([0.3], dtype=torch.float64))
    assert s.training_weight(tau).item() == pytest.approx(((1 - 1e-5) * m**2 / v).item(), rel=1e-5)


def test_config_round_trip_keeps_the_source_and_parameters(tmp_path):
    s = scheduler("vp", sde_params={"beta_max": 30.0}, solver="ddim", eta=0.5, data_std=0.6)
    s.save_pretrained(tmp_path)
    loaded = SDEScheduler.from_pretrained(tmp_path)
    assert loaded.config.sde_source == s.config.sde_source and loaded.config.sde_params == {"beta_max": 30.0}
    assert (loaded.config.solver, loaded.config.eta, loaded.config.data_std) == ("ddim", 0.5, 0.6)
    assert loaded.sde.beta_max == 30.0
    assert torch.equal(loaded.timesteps, s.timesteps)


def test_bad_configurations_are_refused():
    source = (EXAMPLES / "vp.sde").read_text()
    for kwargs, message in [({"solver": "euler"}, "solver must be one of dpmsolver"),
                            ({"prediction_type": "v_prediction"}, "prediction_type must be one of"),
                            ({"eta": 2.0}, "eta must lie in"), ({"data_std": 0.0}, "data_std must be positive"),
                            ({"timestep_spacing": "karras"}, "timestep_spacing must be one of")]:
        with pytest.raises(ValueError, match=message):
            SDEScheduler(source, **kwargs)
    with pytest.raises(ValueError, match="program's text"):
        SDEScheduler(str(EXAMPLES / "vp.sde"))
    with pytest.raises(ValueError, match="affine SDE"):
        SDEScheduler((EXAMPLES / "cld.sde").read_text())
    s = SDEScheduler(source)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        s.step(torch.zeros(1, 2), 123.4, torch.zeros(1, 2))


def test_unet2d_trains_and_samples_through_the_scheduler():
    """The diffusers loop end to end on random 8x8 images: a few optimiser steps with the scheduler's
    timesteps, noise, input scaling and weights, then sampling; shapes and finiteness only (the example
    script trains for real)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    s = scheduler("cosine_vp", data_std=0.5)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    for _ in range(3):
        tau = s.sample_timesteps(16)
        noise = torch.randn_like(x0)
        noisy = s.add_noise(x0, noise, tau)
        pred = unet(s.scale_model_input(noisy, tau), tau).sample
        loss = (s.training_weight(tau) * ((pred - noise) ** 2).flatten(1).mean(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    s.set_timesteps(5)
    x = s.prior_sample((4, 1, 8, 8))
    with torch.no_grad():
        for tau in s.timesteps:
            x = s.step(unet(s.scale_model_input(x, tau), tau).sample, tau, x).prev_sample
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_example_script_runs(tmp_path, capsys):
    """examples/diffusers_digits.py end to end in a few steps: it writes the model, the scheduler (whose
    config reloads to the same SDE) and the samples."""
    pytest.importorskip("sklearn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("diffusers_digits", EXAMPLES / "diffusers_digits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--sde", str(EXAMPLES / "vp.sde"), "--steps", "2", "-n", "4", "--sample-steps", "2",
                        "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "samples/s" in capsys.readouterr().out
    assert (tmp_path / "samples.png").exists() and (tmp_path / "unet" / "config.json").exists()
    loaded = SDEScheduler.from_pretrained(tmp_path / "scheduler")
    assert loaded.config.sde_source == (EXAMPLES / "vp.sde").read_text()


@pytest.mark.cuda
def test_scheduler_on_cuda_matches_cpu():
    s = scheduler("ou")
    s.set_timesteps(6)
    x_T = start("ou", s, n=8)
    cpu = loop(s, exact_eps("ou", s), x_T.float())
    s.set_timesteps(6, device="cuda")
    cuda = loop(s, lambda x, tau: exact_eps("ou", s)(x.cpu(), tau.cpu()).to(x), x_T.float().cuda())
    assert cuda.device.type == "cuda" and torch.allclose(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
    x0, noise, tau = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1.0, 10.0, 100.0, 1000.0])
    assert torch.allclose(s.add_noise(x0.cuda(), noise.cuda(), tau.cuda()).cpu(), s.add_noise(x0, noise, tau),
                          rtol=1e-6, atol=1e-6)
