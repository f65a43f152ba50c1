"""The samplers (sdelang/runtime/sampling/) against closed forms, with exact scores.

For data N(mu, s^2 I) and an affine SDE every marginal is Gaussian (sdelang.runtime.gaussian.GaussianData), so:
- the flow ODE map is known, x_eps = mean_eps + sqrt(var_eps / var_T) (x_T - mean_T): deterministic
  samplers are compared with it pointwise and their order of convergence measured (no Monte Carlo);
- for data at a single point x0 the score is the kernel's, and DDIM / DPM-Solver and the ancestral
  step are then exact for any grid;
- stochastic samplers' sample means and variances are compared with mu and s^2, with tolerances of
  5 Monte Carlo standard errors plus the sampler's discretisation bias, measured and stated below.
Samplers start from exact draws of p_T (x_T=...), so the prior's small mismatch with p_T (a property
of the SDE, not of the sampler) does not enter; one test checks the default start is the prior.
"""
from __future__ import annotations

import math

import pytest
import torch

from sdelang.runtime import sampling
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.sampling import METHODS, Samples

F64 = torch.float64
SDES = ["ve", "vp", "subvp", "ou", "cosine_vp"]  # ou: c(t) != 0; cosine_vp: T < 1
MEAN, STD = (1.0, -0.5), 0.5                     # data N(MEAN, STD^2 I) in d = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core machine torch's intra-op threads contend: small elementwise ops run up to
    # 100x slower with 2 threads than with 1. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(examples, name, dtype=F64):
    return examples[name].build(dtype=dtype)


def gaussian(sde, d=2):
    return GaussianData(sde, torch.tensor(MEAN).repeat(d // 2), STD, (d,))


def start(data, n, seed, dtype=F64):
    """n exact draws of p_T and a generator for the sampler's own noise."""
    generator = torch.Generator().manual_seed(seed)
    return data.sample(n, t=float(data.sde.T), generator=generator, dtype=dtype), generator


def exact_flow(data, x_T):
    """The flow ODE map from T to eps for Gaussian data: mean_eps + sqrt(var_eps / var_T) (x_T - mean_T)."""
    sde, n = data.sde, x_T.shape[0]
    mean_T, var_T = data._moments(torch.full((n,), float(sde.T), dtype=x_T.dtype), x_T)
    mean_e, var_e = data._moments(torch.full((n,), float(sde.eps), dtype=x_T.dtype), x_T)
    return mean_e + (var_e / var_T).sqrt() * (x_T - mean_T)


def assert_moments(x, mean, std, mean_allowance, var_allowance, what):
    """Per-dimension sample mean and variance of x [n, d] against N(mean, std^2): within 5 standard
    errors of their sampling distributions (std / sqrt(n) and std^2 sqrt(2 / (n - 1))) plus an allowance
    (in units of std and std^2) for the sampler's discretisation bias."""
    n = x.shape[0]
    mean = torch.as_tensor(mean, dtype=x.dtype).expand(x.shape[1:])
    mean_err = ((x.mean(0) - mean) / std).abs().max().item()
    var_err = (x.var(0) / std**2 - 1).abs().max().item()
    mean_tol = 5 / math.sqrt(n) + mean_allowance
    var_tol = 5 * math.sqrt(2 / (n - 1)) + var_allowance
    assert mean_err <= mean_tol, f"{what}: mean off by {mean_err:.4f} std (allowed {mean_tol:.4f})"
    assert var_err <= var_tol, f"{what}: variance off by {100 * var_err:.2f}% (allowed {100 * var_tol:.2f}%)"


# Settings for the fast moment test, and the allowances for the discretisation bias they leave: the
# largest |bias| over SDES and both dimensions, measured with n = 250,000 (standard errors 0.002 on
# the mean in units of std, 0.003 on the relative variance), plus 0.01, rounded up to 0.005.
#   method             settings        mean bias / std     relative variance bias
#   em                 200, logsnr     0.010 (cosine_vp)   0.035 (ou)
#   reverse_diffusion  400             0.007 (ou)          0.059 (ou)
#   ancestral          200, logsnr     0.002               0.091 (subvp)
#   pc                 200             0.008 (ou)          0.091 (ou)
#   ald                100 x 5         per SDE, below      0.053 (cosine_vp)
#   ode                rtol 1e-4       0.004               0.006
#   heun               50              0.008 (ou)          0.073 (ou)
#   ddim               100             0.003               0.095 (subvp)
#   dpm2               50              0.003               0.032 (subvp)
#   dpmpp_2m           50              0.003               0.014 (subvp)
#   dpmpp_3m           50              0.003               0.004 (ve)
#   dpmpp_3m_published 50              0.003               0.004 (ve)
#   unipc              50              0.003               0.005 (subvp)
#   unipc_3m           50              0.003               0.004 (ve)
#   deis               50              0.003               0.004 (ve)
#   lms                50              0.003               0.011 (subvp)
#   dpmpp_2m_sde       100             0.004               0.013 (subvp)
#   dpmpp_3m_sde       100             0.004               0.006 (subvp)
# Annealed Langevin's steps shrink with the noise (alpha = sigma^2), so at low noise the chain stops
# following p_t and keeps the samples of the level where it froze; where the mean still moves there
# (m(t) < 1) they are shrunk towards c. Its mean bias / std: ve 0.002, vp 0.024, subvp 0.170 (sigma ~ B(t)
# there, so m is further from 1 at equal noise), ou 0.023, cosine_vp 0.025.
FAST = {
    "em": (dict(steps=200, spacing="logsnr"), 0.02, 0.045),
    "reverse_diffusion": (dict(steps=400), 0.02, 0.07),
    "ancestral": (dict(steps=200, spacing="logsnr"), 0.015, 0.105),
    "pc": (dict(steps=200), 0.02, 0.105),
    "ald": (dict(steps=100), dict(ve=0.015, vp=0.035, subvp=0.18, ou=0.035, cosine_vp=0.04), 0.065),
    "ode": (dict(rtol=1e-4, atol=1e-4), 0.015, 0.02),
    "heun": (dict(steps=50), 0.02, 0.085),
    "ddim": (dict(steps=100), 0.015, 0.105),
    "dpm2": (dict(steps=50), 0.015, 0.045),
    "dpmpp_2m": (dict(steps=50), 0.015, 0.025),
    "dpmpp_3m": (dict(steps=50), 0.015, 0.015),
    "dpmpp_3m_published": (dict(steps=50), 0.015, 0.015),
    "unipc": (dict(steps=50), 0.015, 0.015),
    "unipc_3m": (dict(steps=50), 0.015, 0.015),
    "deis": (dict(steps=50), 0.015, 0.015),
    "lms": (dict(steps=50), 0.015, 0.025),
    "dpmpp_2m_sde": (dict(steps=100), 0.015, 0.025),
    "dpmpp_3m_sde": (dict(steps=100), 0.015, 0.02),
}

# The same with finer steps and n = 50,000, measured with n = 100,000 (standard errors 0.003 and 0.0045);
# allowance: the largest |bias| plus 0.015, rounded up to 0.005.
#   em 1000 logsnr          0.003 / 0.015 (ou)      reverse_diffusion 1000  0.005 / 0.025 (ou)
#   ancestral 1000 logsnr   0.003 / 0.027 (subvp)   pc 1000                 0.005 / 0.029 (subvp; snr^2
#   ald 500 x 5             per SDE / 0.028 (subvp)     = 0.026 is the corrector's, see the Langevin test)
#   ode rtol 1e-5           0.001 / 0.005           heun 200                0.002 / 0.011 (ou)
#   ddim 500                0.001 / 0.022 (subvp)   dpm2 200                0.001 / 0.006
# ald mean bias / std: ve 0.004, vp 0.010, subvp 0.079, ou 0.007, cosine_vp 0.009.
SLOW = {
    "em": (dict(steps=1000, spacing="logsnr"), 0.02, 0.03),
    "reverse_diffusion": (dict(steps=1000), 0.025, 0.04),
    "ancestral": (dict(steps=1000, spacing="logsnr"), 0.02, 0.045),
    "pc": (dict(steps=1000), 0.025, 0.045),
    "ald": (dict(steps=500), dict(ve=0.02, vp=0.03, subvp=0.095, ou=0.025, cosine_vp=0.025), 0.045),
    "ode": (dict(), 0.02, 0.02),
    "heun": (dict(steps=200), 0.02, 0.03),
    "ddim": (dict(steps=500), 0.02, 0.04),
    "dpm2": (dict(steps=200), 0.02, 0.025),
    # The multistep solvers at 200 steps: their bias at 50 steps is already within the FAST allowances, and
    # at 200 it is below 1e-3 (order 2 or more); the allowances are 4.4 standard errors of the mean
    # (1/sqrt(50,000)) and 4.7 of the variance (sqrt(2/50,000)), as for the methods above.
    "dpmpp_2m": (dict(steps=200), 0.02, 0.03),
    "dpmpp_3m": (dict(steps=200), 0.02, 0.03),
    "dpmpp_3m_published": (dict(steps=200), 0.02, 0.03),
    "unipc": (dict(steps=200), 0.02, 0.03),
    "unipc_3m": (dict(steps=200), 0.02, 0.03),
    "deis": (dict(steps=200), 0.02, 0.03),
    "lms": (dict(steps=200), 0.02, 0.03),
    "dpmpp_2m_sde": (dict(steps=200), 0.02, 0.03),
    "dpmpp_3m_sde": (dict(steps=200), 0.02, 0.03),
}


def check_moments(examples, name, method, settings, n, seed):
    sde = build(examples, name)
    data = gaussian(sde)
    options, mean_allowance, var_allowance = settings[method]
    if isinstance(mean_allowance, dict):
        mean_allowance = mean_allowance[name]
    x_T, generator = start(data, n, seed)
    out = sampling.sample(sde, data.score, x_T.shape, method, generator=generator, x_T=x_T, **options)
    assert_moments(out.x, data.mean, STD, mean_allowance, var_allowance, f"{name} {method}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SDES)
def test_samples_match_the_data(examples, name, method):
    check_moments(examples, name, method, FAST, n=4000, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SDES)
def test_samples_match_the_data_fine_steps(examples, name, method):
    check_moments(examples, name, method, SLOW, n=50_000, seed=2)


@pytest.mark.parametrize("name", SDES)
def test_reverse_diffusion_on_a_logsnr_grid(examples, name):
    """The module's discretize(x, t, s) steps between any two grid times, so reverse diffusion runs on a
    logSNR grid too. Bias measured at 200 steps, n = 200,000: mean <= 0.022 std, variance <= 8.2 %
    (subvp); on OU the variance error drops from 12 % (uniform grid) to 4.4 %. Allowances: those + 0.01."""
    sde = build(examples, name)
    data = gaussian(sde)
    x_T, generator = start(data, 4000, seed=5)
    out = sampling.sample(sde, data.score, x_T.shape, "reverse_diffusion", 200, spacing="logsnr",
                          generator=generator, x_T=x_T)
    assert out.nfe == 201
    assert_moments(out.x, data.mean, STD, 0.032, 0.092, f"{name} reverse_diffusion logsnr")


def test_default_start_is_a_draw_from_the_prior(examples):
    sde = build(examples, "ve")
    data = gaussian(sde)
    shape = (8, 2)
    out = sampling.sample(sde, data.score, shape, "em", 5, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    x_T = sde.prior_sampling(shape, generator=generator)
    again = sampling.sample(sde, data.score, shape, "em", 5, generator=generator, x_T=x_T)
    assert torch.equal(out.x, again.x)


# --- NFE bookkeeping ----------------------------------------------------------------------------------

K, M = 7, 3
NFE = {  # score evaluations for K steps, M corrector steps, without the final Tweedie step
    "em": K, "reverse_diffusion": K, "ancestral": K, "pc": K * (M + 1), "ald": K * M,
    "heun": 2 * K - 1, "ddim": K, "dpm2": K, "dpmpp_2m": K, "dpmpp_3m": K, "unipc": K, "unipc_3m": K, "deis": K,
    "dpmpp_3m_published": K, "lms": K, "dpmpp_2m_sde": K, "dpmpp_3m_sde": K,
}


@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_nfe_counts_score_calls(examples, method, denoise):
    sde = build(examples, "vp")
    data = gaussian(sde)
    calls = []

    def score(x, t):
        calls.append(x.shape)
        return data.score(x, t)
    steps = None if method == "ode" else K
    options = {"corrector_steps": M} if method in ("pc", "ald") else {}
    out = sampling.sample(sde, score, (16, 2), method, steps, denoise=denoise, **options)
    assert out.nfe == len(calls)
    assert all(shape == (16, 2) for shape in calls)  # every call on the whole batch
    if method != "ode":
        assert out.nfe == NFE[method] + denoise


# --- deterministic samplers against the exact flow map ------------------------------------------------

def flow_error(sde, method, steps, **options):
    data = gaussian(sde)
    x_T, _ = start(data, 64, seed=0)
    out = sampling.sample(sde, data.score, x_T.shape, method, steps, x_T=x_T, denoise=False, **options)
    return (out.x - exact_flow(data, x_T)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("method, order", [("ddim", 1), ("dpm2", 2), ("heun", 2)])
@pytest.mark.parametrize("name", SDES)
def test_order_of_convergence(examples, name, method, order):
    """The error against the exact flow map falls as steps^-order: log2(e(160) / e(320)) within 0.1 of the
    order, on a logSNR-uniform grid. Measured: at most 0.05 from it (subvp heun; 0.11 from 80 to 160)."""
    sde = build(examples, name)
    options = {"spacing": "logsnr"}
    coarse, fine = (flow_error(sde, method, k, **options) for k in (160, 320))
    observed = math.log2(coarse / fine)
    assert abs(observed - order) < 0.1, f"{name} {method}: observed order {observed:.3f}, expected {order}"


@pytest.mark.parametrize("name", SDES)
def test_adaptive_ode_converges_to_the_exact_flow(examples, name):
    """RMS error to the exact flow map: below 20 rtol at rtol = 1e-4 (measured at most 2.9 rtol), and
    shrinking at least tenfold from rtol = 1e-4 to 1e-6 (measured 55-1500 fold)."""
    sde = build(examples, name)
    data = gaussian(sde)
    x_T, _ = start(data, 64, seed=0)
    exact = exact_flow(data, x_T)
    errors = []
    for tol in (1e-4, 1e-6):
        out = sampling.probability_flow(sde, data.score, x_T.shape, x_T=x_T, denoise=False, rtol=tol, atol=tol)
        errors.append((out.x - exact).pow(2).mean().sqrt().item())
    assert errors[0] < 20 * 1e-4
    assert errors[1] < errors[0] / 10


def point_score(sde, x0):
    """The score of data at the single point x0: the kernel's, -(x - m x0 - c) / v."""
    def score(x, t):
        mean, std = sde.marginal_prob(x0.expand_as(x), t)
        return -(x - mean) / sde._expand(std, x) ** 2
    return score


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
@pytest.mark.parametrize("method", ["ddim", "dpm2"])
@pytest.mark.parametrize("name", SDES)
def test_exponential_integrator_is_exact_for_a_point_mass(examples, name, method, spacing):
    """For data at x0 the noise prediction eps_hat = (x - m x0 - c) / sigma is constant along the flow,
    x_t = m_t x0 + c_t + sigma_t eps, and the exponential integrator integrates it exactly for any grid:
    float64 rounding only (1e-10 relative; at most 4e-15 seen)."""
    sde = build(examples, name)
    x0 = torch.tensor([[0.7, -1.3]], dtype=F64)
    eps = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    T, e = (torch.full((32,), float(v), dtype=F64) for v in (sde.T, sde.eps))
    at = lambda t: sde.marginal_prob(x0.expand(32, 2), t)[0] + sde._expand(sde.std(t), eps) * eps  # noqa: E731
    out = sampling.sample(sde, point_score(sde, x0), (32, 2), method, 7, x_T=at(T), denoise=False,
                          spacing=spacing)
    torch.testing.assert_close(out.x, at(e), rtol=1e-10, atol=1e-10 * at(e).abs().max().item())


@pytest.mark.parametrize("name", SDES)
def test_ancestral_step_is_exact_for_a_point_mass(examples, name):
    """For data at x0, x0_hat = x0 and the ancestral step samples q(x_s | x_t, x0) exactly: started from
    p_T(. | x0), every grid time t_i holds N(m_i x0 + c_i, v_i). Checked at each of the 10 grid times:
    the standardised samples' mean and variance within 5 standard errors of 0 and 1 (n = 4000 x d = 2)."""
    sde = build(examples, name)
    x0 = torch.tensor([[0.7, -1.3]], dtype=F64)
    n = 4000
    generator = torch.Generator().manual_seed(4)
    T = torch.full((n,), float(sde.T), dtype=F64)
    mean, std = sde.marginal_prob(x0.expand(n, 2), T)
    x_T = mean + sde._expand(std, mean) * torch.randn(n, 2, generator=generator, dtype=F64)
    seen = []

    def record(x, t):
        mean, std = sde.marginal_prob(x0.expand_as(x), t)
        seen.append((x - mean) / sde._expand(std, x))
        return x
    sampling.ancestral(sde, point_score(sde, x0), (n, 2), 10, generator=generator, x_T=x_T, denoise=False,
                       after_step=record, spacing="logsnr")
    assert len(seen) == 10
    for i, z in enumerate(seen):
        assert_moments(z.flatten()[:, None], 0.0, 1.0, 0, 0, f"{name}, grid time {i + 1}")


@pytest.mark.parametrize("method", ["em", "ddim", "ode"])
def test_denoise_is_one_tweedie_step(examples, method):
    """denoise=True adds one score evaluation, x0 = (x + v s(x, eps) - c) / m at eps, to the samples that
    denoise=False returns (on ou with mu = -2, theta = 3: c(eps) = 6e-5, m(eps) = 1 - 3e-5; float64
    rounding only, 1e-12)."""
    sde = examples["ou"].build({"theta": 3.0, "mu": -2.0})
    data = gaussian(sde)
    x_T, _ = start(data, 16, seed=0)
    steps = None if method == "ode" else 5
    raw, denoised = (sampling.sample(sde, data.score, x_T.shape, method, steps, x_T=x_T, denoise=d,
                                     generator=torch.Generator().manual_seed(1)) for d in (False, True))
    eps = torch.full((16,), float(sde.eps), dtype=F64)
    m, c, v = sde.mean_coeff(eps)[0], sde.mean_offset(eps)[0], sde.std(eps)[0] ** 2
    torch.testing.assert_close(denoised.x, (raw.x + v * data.score(raw.x, eps) - c) / m, rtol=1e-12, atol=1e-12)
    assert denoised.nfe == raw.nfe + 1


# --- the Langevin corrector -----------------------------------------------------------------------------

@pytest.mark.parametrize("norms", ["batch", "sample"])
def test_langevin_step_follows_its_formula(norms):
    """x + delta s + sqrt(2 delta) z with delta = 2 (snr |z| / |s|)^2, norms per sample or batch means."""
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = -3 * x + 1
    snr = 0.3
    new = sampling.langevin_step(lambda x, t: -3 * x + 1, x, torch.zeros(5, dtype=F64), snr,
                                 torch.Generator().manual_seed(1), norms=norms)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    z_norm, s_norm = z.flatten(1).norm(dim=1), s.flatten(1).norm(dim=1)
    if norms == "batch":
        z_norm, s_norm = z_norm.mean(), s_norm.mean()
    delta = (2 * (snr * z_norm / s_norm) ** 2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(new, x + delta * s + (2 * delta).sqrt() * z, rtol=1e-14, atol=1e-14)


def test_langevin_corrector_stationary_variance(examples):
    """Langevin steps with the batch rule on p_t = N(mu_t, V I) are stationary at variance V (1 + snr^2),
    not V. With x at variance P, |s| = |x - mu| / V, so the batch means give delta = 2 snr^2 V^2 / P; the
    chain x <- x - delta (x - mu) / V + sqrt(2 delta) z is stationary where P = V / (1 - delta / (2 V)),
    i.e. P = V (1 + snr^2). snr = 0.5 makes that 25 % above V; each step multiplies the distance to it by
    (1 - delta / V)^2 = 0.36, so 30 steps from p_t reach it. Mean and variance within 5 standard errors
    (n = 20000, d = 2, per dimension: 5 % on the variance)."""
    sde = build(examples, "vp")
    data = gaussian(sde)
    snr, n = 0.5, 20000
    t = torch.full((n,), 0.3, dtype=F64)
    generator = torch.Generator().manual_seed(5)
    x = data.sample(n, t=0.3, generator=generator)
    for _ in range(30):
        x = sampling.langevin_step(data.score, x, t, snr, generator)
    mean, var = data._moments(t[:1], x[:1])
    assert_moments(x, mean[0], math.sqrt(var.item() * (1 + snr**2)), 0, 0, "vp Langevin at t = 0.3")


# --- inpainting -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pc", "ancestral", "ddim"])
@pytest.mark.parametrize("name", ["vp", "ou"])
def test_inpainting_keeps_known_entries_and_samples_the_rest(examples, name, method):
    """mask == 1 entries equal `known` exactly; the others, independent of them under N(mu, s^2 I), follow
    the data marginal: same tolerances as the fast moment test (pc, ancestral: 200 steps; ddim: 100)."""
    sde = build(examples, name)
    data = gaussian(sde, d=4)
    n = 4000
    known = data.sample(n, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0])
    options, mean_allowance, var_allowance = FAST[method]
    out = sampling.inpaint(sde, data.score, known, mask, method, generator=torch.Generator().manual_seed(7),
                           **options)
    assert torch.equal(out.x[:, [0, 3]], known[:, [0, 3]])
    assert_moments(out.x[:, [1, 2]], data.mean[[1, 2]], STD, mean_allowance, var_allowance, f"{name} {method}")


def test_inpainting_resets_known_entries_to_forward_kernel_draws(examples):
    """After every step the known entries are fresh draws m(t) known + c(t) + sigma(t) z: the score sees
    them standardised to N(0, 1) at each of the 19 times after T (n = 500 x 2 entries x 19 steps, mean and
    variance within 5 standard errors)."""
    sde = examples["ou"].build({"mu": -2.0})
    data = gaussian(sde, d=4)
    known = data.sample(500, generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    seen = []

    def score(x, t):
        mean, std = sde.marginal_prob(known, t)
        seen.append(((x - mean) / sde._expand(std, x))[:, 1:3])
        return data.score(x, t)
    sampling.inpaint(sde, score, known, mask, "em", 20, generator=torch.Generator().manual_seed(9), denoise=False)
    z = torch.cat(seen[1:]).flatten()[:, None]  # the first call sees the prior draw at T
    assert len(seen) == 20
    assert_moments(z, 0.0, 1.0, 0, 0, "known entries after each step")


# --- dtypes, shapes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_float32_images(examples, method):
    """[B, 1, 4, 4] samples in float32: the shape and dtype are kept and every value is finite, on an SDE
    with c != 0 and on the one whose kernel is computed by quadrature."""
    for name in ("ou", "numeric"):
        sde = build(examples, name, torch.float32)
        data = GaussianData(sde, 0.5, 0.3, (1, 4, 4))
        steps = None if method == "ode" else 20
        out = sampling.sample(sde, data.score, (64, 1, 4, 4), method, steps,
                              generator=torch.Generator().manual_seed(0))
        assert out.x.shape == (64, 1, 4, 4) and out.x.dtype == torch.float32
        assert torch.isfinite(out.x).all(), f"{name} {method}: non-finite samples"


@pytest.mark.parametrize("method", ["ode", "heun", "ddim", "dpm2"])
@pytest.mark.parametrize("name", ["vp", "ve", "ou"])
def test_float32_deterministic_samplers_agree_with_float64(examples, name, method):
    """From the same x_T, float32 ends within 1e-4 of float64 (samples are of order 1): float32 rounding
    (6e-8) carried through the steps; the largest difference seen is 2e-6 for the fixed-step ones. ode's
    adaptive steps differ between the dtypes, so there the two differ by the solver's error at rtol = atol
    = 1e-5 instead: on vp float64 takes 57 evaluations and ends 2.6e-4 from the exact flow map, float32
    69 and 6e-6 (before the first step followed torchdiffeq's rule, both took 69, 7e-6 apart)."""
    data64 = gaussian(build(examples, name))
    data32 = gaussian(build(examples, name, torch.float32))
    x_T, _ = start(data64, 256, seed=0)
    steps = None if method == "ode" else 50
    runs = [sampling.sample(data.sde, data.score, x.shape, method, steps, x_T=x)
            for data, x in ((data64, x_T), (data32, x_T.float()))]
    assert runs[1].x.dtype == torch.float32
    torch.testing.assert_close(runs[1].x.double(), runs[0].x, rtol=0, atol=1e-3 if method == "ode" else 1e-4)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ode"])
def test_fixed_step_samplers_never_read_tensor_values_on_the_host(examples, method, monkeypatch):
    """Reading a tensor's value in Python (bool(), if, .item(), float(), int(), .tolist()) is what makes a
    host-device synchronisation; the fixed-step samplers do none, from start to end (the adaptive ODE
    solver's step control must, and is left out)."""
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read on the host")
    sde = build(examples, "ou")
    data = gaussian(sde)
    for name in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = sampling.sample(sde, data.score, (8, 2), method, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert torch.isfinite(out.x).all()


def test_progress_bar_changes_nothing(examples, capsys):
    sde = build(examples, "vp")
    data = gaussian(sde)
    runs = [sampling.sample(sde, data.score, (8, 2), "pc", 5, generator=torch.Generator().manual_seed(0),
                            progress=progress) for progress in (False, True)]
    assert torch.equal(runs[0].x, runs[1].x) and runs[0].nfe == runs[1].nfe
    assert "pc" in capsys.readouterr().err


# --- bad arguments ---------------------------------------------------------------------------------------

class NoKernel:
    """A module with the reverse SDE but without the Gaussian kernel's functions."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):
        if name in ("mean_coeff", "log_snr"):
            raise AttributeError(name)
        return getattr(self.module, name)


@pytest.mark.parametrize("call, message", [
    (lambda s, f: sampling.sample(s, f, (4, 2), "langevin"), "unknown sampling method 'langevin'; choose one of em"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "em", 0), "steps must be an integer >= 1, got 0"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "heun", 2.5), "steps must be an integer >= 1, got 2.5"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ode", 10), "'ode' is adaptive and takes no steps"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ode", solver="rk4"), "unknown ODE solver 'rk4'"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ode", rtol=0), "rtol must be a positive number"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "pc", 3, predictor="euler"), "unknown predictor 'euler'"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "pc", 3, corrector_steps=-1), "corrector_steps must be"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "pc", 3, snr=-0.1), "snr must be a positive number"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "pc", 3, norms="max"), "unknown norms 'max'"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ald", 3, corrector_steps=0), "corrector_steps must be"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ald", 3, step_lr=0.0), "step_lr must be a positive"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "ddim", 3, spacing="log"), "unknown spacing 'log'"),
    (lambda s, f: sampling.exponential_integrator(s, f, (4, 2), 3, order=3), "order must be 1 or 2"),
    (lambda s, f: sampling.sample(s, f, (4, 2), "em", 3, x_T=torch.zeros(4, 3)), "x_T has shape (4, 3)"),
    (lambda s, f: sampling.sample(NoKernel(s), f, (4, 2), "dpm2", 3), "lacks mean_coeff, log_snr"),
    (lambda s, f: sampling.inpaint(s, f, torch.zeros(4, 2), torch.ones(2), "ode"), "fixed-step method"),
    (lambda s, f: sampling.inpaint(s, f, torch.zeros(4, 2), torch.full((2,), 0.5)), "only 0 and 1"),
])
def test_bad_arguments_raise_value_error(examples, call, message):
    sde = build(examples, "vp", torch.float32)
    with pytest.raises(ValueError) as info:
        call(sde, gaussian(sde).score)
    assert message in str(info.value)


def test_samples_is_a_named_tuple(examples):
    sde = build(examples, "vp")
    out = sampling.sample(sde, gaussian(sde).score, (3, 2), "ddim", 2)
    x, nfe = out
    assert isinstance(out, Samples) and x is out.x and nfe == out.nfe == 3
