"""k-diffusion's samplers on compiled SDEs through sdelang.interop.kdiffusion, against exact flow maps.

Data N(0.3, 0.5^2 I): the exact score is closed-form (interop_reference.py, independent of the generated
modules), so a sampler's error is its own discretisation error, which shrinks at its known order.
"""
from __future__ import annotations

import math

import pytest
import torch

import sdelang
from interop_reference import EXAMPLES, exact_flow, exact_score, kernel
from sdelang.interop import kdiffusion as kd
from sdelang.runtime import sampling
from sdelang.runtime.sampling import exponential_integrator

SDES = ["vp", "ve", "subvp", "cosine_vp", "ou"]


@pytest.fixture(scope="module")
def k():
    pytest.importorskip("torchsde")
    try:
        return kd.k_diffusion_sampling()
    except ImportError as error:
        pytest.skip(f"k-diffusion is not installed ({error})")


def load(name):
    return sdelang.load(EXAMPLES / f"{name}.sde").to(torch.float64)


def start(name, sde, n=64, d=3, seed=0):
    """x_T drawn from the exact p_T (so the flow map stays in the data's region)."""
    g = torch.Generator().manual_seed(seed)
    T = torch.tensor([float(sde.T)], dtype=torch.float64)
    m, c, v = kernel(name, T)
    return m * 0.3 + c + torch.sqrt(m**2 * 0.25 + v) * torch.randn(n, d, generator=g, dtype=torch.float64)


def run(k, sampler, name, steps, spacing="karras", **options):
    """x at eps from x_T at T by k-diffusion's sampler on the SDE's sigma range; and the exact x(eps)."""
    sde = load(name)
    denoiser = kd.Denoiser(sde, exact_score(name))
    x_T = start(name, sde)
    sigmas = kd.get_sigmas(sde, steps + 1, spacing, append_zero=False, dtype=torch.float64)
    x_k, _ = denoiser.from_sde(x_T, torch.full((len(x_T),), float(sde.T), dtype=torch.float64))
    out = getattr(k, sampler)(denoiser, x_k, sigmas, disable=True, **options)
    x_eps, _ = denoiser.to_sde(out, sigmas[-1])
    return x_eps, exact_flow(name, x_T, float(sde.T), float(sde.eps))


def error(k, sampler, name, steps, spacing="karras"):
    x, exact = run(k, sampler, name, steps, spacing)
    return ((x - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize("name", SDES)
def test_sigma_range_is_the_kernel_at_the_ends(name):
    sde = load(name)
    ends = torch.tensor([float(sde.eps), float(sde.T)], dtype=torch.float64)
    m, _, v = kernel(name, ends)
    expected = (v.sqrt() / m).tolist()
    assert kd.sigma_range(sde) == pytest.approx(expected, rel=1e-10)
    for spacing in kd.SPACINGS:
        sigmas = kd.get_sigmas(sde, 12, spacing, dtype=torch.float64)
        assert sigmas[0].item() == pytest.approx(expected[1], rel=1e-10)
        assert sigmas[-2].item() == pytest.approx(expected[0], rel=1e-10)
        assert sigmas[-1].item() == 0 and (sigmas[:-2] > sigmas[1:-1]).all()


@pytest.mark.parametrize("name", SDES)
def test_time_of_sigma_inverts_the_kernel(name):
    sde = load(name)
    t = torch.linspace(float(sde.eps), float(sde.T), 50, dtype=torch.float64)
    m, _, v = kernel(name, t)
    assert torch.allclose(kd.time_of_sigma(sde, v.sqrt() / m), t, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", SDES)
def test_denoiser_times_are_the_bisection_s(name):
    """The denoiser's fast inverse (table + Newton) agrees with the bisection to float64 round-off over
    the whole sigma range, ends included, and clamps beyond it as the bisection does."""
    sde = load(name)
    lo, hi = kd.sigma_range(sde)
    sigma = torch.cat([torch.logspace(math.log10(lo), math.log10(hi), 997, dtype=torch.float64),
                       torch.tensor([lo / 2, hi * 2], dtype=torch.float64)])
    t, _, _, _ = kd.Denoiser(sde, exact_score(name)).kernel(sigma, torch.zeros(len(sigma), 1, dtype=torch.float64))
    assert torch.allclose(t, kd.time_of_sigma(sde, sigma), rtol=1e-12, atol=0)


def test_denoiser_times_just_above_sigma_min_with_a_start_variance():
    """VE from N(0, sigma_min^2) (v0 > 0): logSNR is linear in t near eps, where log t interpolated from the table is
    far off; the Newton steps still reach the bisection and an mpmath inverse of the kernel (1e-10) just above
    sigma_min, where three steps had left 3.6e-4."""
    import mpmath

    sde = sdelang.load("sde ve_start\nparam sigma_min = 0.01\nparam sigma_max = 378\n"
                       "sigma(t) = sigma_min * (sigma_max / sigma_min)^t\ndx = sqrt(d/dt(sigma(t)^2)) dw\n"
                       "v0 = sigma_min^2\nt in [1e-5, 1]\nprior normal(0, sigma_max^2)\n").double()
    lo, _ = kd.sigma_range(sde)
    sigma = torch.tensor([lo * (1 + 1e-6), lo * 1.0001, lo * 1.01], dtype=torch.float64)
    t, _, _, _ = kd.Denoiser(sde, lambda x, t: x).kernel(sigma, torch.zeros(3, 1, dtype=torch.float64))
    with mpmath.workdps(30):
        # v(t) = sigma_min^2 + sigma_min^2 ((sigma_max / sigma_min)^(2t) - 1), m = 1: sigma_k^2 = v.
        rate = 2 * mpmath.log(mpmath.mpf(378) / mpmath.mpf("0.01"))
        want = [float(mpmath.log((mpmath.mpf(x) / mpmath.mpf("0.01")) ** 2) / rate) for x in sigma.tolist()]
    assert torch.allclose(t, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0)
    assert torch.allclose(t, kd.time_of_sigma(sde, sigma), rtol=1e-10, atol=0)


def test_grids_of_each_spacing():
    sde = load("vp")
    lo, hi = kd.sigma_range(sde)
    log_sigma = kd.get_sigmas(sde, 9, "logsnr", append_zero=False, dtype=torch.float64).log()
    assert torch.allclose(log_sigma, torch.linspace(math.log(hi), math.log(lo), 9, dtype=torch.float64))
    times = kd.time_of_sigma(sde, kd.get_sigmas(sde, 9, "time", append_zero=False, dtype=torch.float64))
    assert torch.allclose(times, torch.linspace(1.0, 1e-5, 9, dtype=torch.float64), rtol=1e-9)
    karras = kd.get_sigmas(sde, 9, "karras", rho=7.0, append_zero=False, dtype=torch.float64) ** (1 / 7)
    assert torch.allclose(karras, torch.linspace(hi ** (1 / 7), lo ** (1 / 7), 9, dtype=torch.float64))


@pytest.mark.parametrize("name", SDES)
def test_denoiser_is_the_posterior_mean(name):
    """For Gaussian data E[x0 | x_t] = mu + m s^2 (x - m mu - c) / (m^2 s^2 + v), in closed form."""
    sde = load(name)
    denoiser = kd.Denoiser(sde, exact_score(name))
    t = torch.linspace(float(sde.eps), float(sde.T), 7, dtype=torch.float64)
    m, c, v = (q[:, None] for q in kernel(name, t))
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = 0.3 + m * 0.25 * (x - m * 0.3 - c) / (m**2 * 0.25 + v)
    x_k, sigma = denoiser.from_sde(x, t)
    assert torch.allclose(denoiser(x_k, sigma), expected, rtol=1e-8, atol=1e-10)
    # The score from a denoiser is (m D - (x - c)) / v: the difference carries round-off of about
    # 1e-16 |x|, which the division by v (1e-12 for subVP at eps) magnifies; compare v s.
    back = kd.ScoreFromDenoiser(sde, denoiser)(x, t)
    assert torch.allclose(v * back, v * exact_score(name)(x, t), rtol=1e-8, atol=1e-14 * x.abs().max())


def reference_denoiser(x_k, sigma):
    """In k-diffusion's variables x_k = x0 + sigma z for every SDE, so with data N(mu, s^2 I) the
    denoiser is mu + s^2 / (s^2 + sigma^2) (x_k - mu), whatever m and c were."""
    sigma = sigma.reshape(-1, *(1,) * (x_k.dim() - 1))
    return 0.3 + 0.25 / (0.25 + sigma**2) * (x_k - 0.3)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("sampler", ["sample_heun", "sample_dpmpp_2m", "sample_lms"])
def test_k_samplers_on_the_sde_equal_them_on_the_ve_form(k, name, sampler):
    """The adapter is an exact change of variables: a sampler run through it on the SDE lands, mapped
    back, where the same sampler on the closed-form VE-form denoiser lands (to float64 round-off)."""
    sde = load(name)
    x, _ = run(k, sampler, name, 24)
    sigmas = kd.get_sigmas(sde, 25, "karras", append_zero=False, dtype=torch.float64)
    x_T = start(name, sde)
    m_T, c_T, _ = kernel(name, torch.tensor([float(sde.T)], dtype=torch.float64))
    reference = getattr(k, sampler)(reference_denoiser, (x_T - c_T) / m_T, sigmas, disable=True)
    m, c, _ = kernel(name, torch.tensor([float(sde.eps)], dtype=torch.float64))
    assert torch.allclose(x, m * reference + c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("sampler", ["sample_heun", "sample_dpmpp_2m"])
def test_k_samplers_converge_to_the_exact_flow_map(k, name, sampler):
    """Second-order samplers: the error against the exact flow map falls about 4-fold when the steps
    double (measured 4.0 to 4.4 from 32 to 64 Karras steps; a wrong denoiser converges to another map
    and stalls), and at 64 steps is below 1e-2 of the data's scale (measured 2e-3 to 6e-3: the sigma
    range spans 1e-3 to 150, so the error constant is large)."""
    coarse, fine = error(k, sampler, name, 32), error(k, sampler, name, 64)
    assert coarse / fine > 3.2, (coarse, fine)
    assert fine < 1e-2, (coarse, fine)


@pytest.mark.parametrize("name", SDES)
def test_k_euler_on_the_logsnr_grid_is_sdelang_ddim(name, k):
    """Euler in sigma_k is DDIM (x_k' = D + (sigma'/sigma)(x_k - D)): both give the same numbers."""
    sde = load(name)
    x_T = start(name, sde)
    score = exact_score(name)
    ddim = exponential_integrator(sde, score, x_T.shape, 20, order=1, spacing="logsnr", denoise=False,
                                  x_T=x_T).x
    denoiser = kd.Denoiser(sde, score)
    sigmas = kd.get_sigmas(sde, 21, "logsnr", append_zero=False, dtype=torch.float64)
    x_k, _ = denoiser.from_sde(x_T, torch.full((len(x_T),), float(sde.T), dtype=torch.float64))
    x_eps, _ = denoiser.to_sde(k.sample_euler(denoiser, x_k, sigmas, disable=True), sigmas[-1])
    assert torch.allclose(x_eps, ddim, rtol=1e-9, atol=1e-9)


# sdelang's grid -> k-diffusion's schedule of the same sigmas (edm is Karras et al.'s rho = 7 schedule).
SAME_GRID = [("logsnr", "logsnr"), ("edm", "karras")]


@pytest.mark.parametrize("ours, theirs", SAME_GRID)
@pytest.mark.parametrize("name", ["vp", "ou"])  # ou: c(t) != 0
@pytest.mark.parametrize("method, sampler, options, steps", [
    ("lms", "sample_lms", {}, 6),
    ("lms", "sample_lms", {}, 12),
    ("dpmpp_3m_published", "sample_dpmpp_3m_sde", {"eta": 0.0}, 12)])
def test_k_samplers_are_sdelang_samplers(k, name, method, sampler, options, steps, ours, theirs):
    """sdelang's `lms` is k-diffusion's lms (Adams-Bashforth in sigma_k = e^{-lambda} on the noise
    prediction, order 4 after a warm-up at orders 1, 2, 3, and to the last step), and `dpmpp_3m_published`
    is its dpmpp_3m_sde at eta = 0 (DPM-Solver++(3M)'s published weights; below 10 steps sdelang's lowers
    the order of the last steps, k-diffusion's does not), both written from the formulas: on the same
    sigmas they give the same x at eps to float64 rounding (measured 1e-15 relative; k-diffusion's lms
    coefficients come from scipy's quad, exact for cubics). On a uniform-t grid they agree to 1e-13 ..
    5e-12: the adapter finds the times of its sigmas by Newton steps, a rounding-level change of the grid
    that long last steps magnify."""
    x_eps, _ = run(k, sampler, name, steps, theirs, **options)
    sde = load(name)
    x_T = start(name, sde)
    out = sampling.sample(sde, exact_score(name), x_T.shape, method, steps, x_T=x_T, denoise=False,
                          spacing=ours).x
    assert ((out - x_eps).abs().max() / x_eps.abs().max()).item() < 1e-12


@pytest.mark.parametrize("name", ["vp", "ou"])
def test_k_ancestral_sampler_reaches_the_data(k, name):
    """sample_euler_ancestral down to sigma = 0 (the denoiser's last output): mean and std of 4000 draws of
    N(0.3, 0.25) within 5 Monte Carlo standard errors (mean: s / sqrt(n); std: s / sqrt(2 n)), widened by
    the sampler's bias, measured below 0.01 at 200 steps."""
    sde = load(name).to(torch.float32)
    torch.manual_seed(0)
    denoiser = kd.Denoiser(sde, exact_score(name))
    sigmas = kd.get_sigmas(sde, 200, "karras")
    x = torch.randn(4000, 1) * sigmas[0]
    out = k.sample_euler_ancestral(denoiser, x, sigmas, disable=True)
    n = out.numel()
    assert abs(out.mean().item() - 0.3) < 5 * 0.5 / math.sqrt(n) + 0.01
    assert abs(out.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n) + 0.01


def test_float32_denoiser_matches_float64():
    sde = load("cosine_vp")
    denoiser64 = kd.Denoiser(sde, exact_score("cosine_vp"))
    denoiser32 = kd.Denoiser(load("cosine_vp").to(torch.float32), exact_score("cosine_vp"))
    sigmas = kd.get_sigmas(sde, 10, append_zero=False, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * sigmas[:, None]
    d64 = denoiser64(x, sigmas)
    d32 = denoiser32(x.float(), sigmas.float())
    assert torch.allclose(d32.double(), d64, rtol=1e-4, atol=1e-5)


def test_other_kinds_are_refused():
    sde = sdelang.load(EXAMPLES / "cld.sde")
    with pytest.raises(ValueError, match="affine SDE.*coupled"):
        kd.Denoiser(sde, lambda x, t: x)


def test_bad_schedule_arguments():
    sde = load("vp")
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        kd.get_sigmas(sde, 1)
    with pytest.raises(ValueError, match="spacing must be one of"):
        kd.get_sigmas(sde, 10, "cosine")
    with pytest.raises(ValueError, match="rho must be positive"):
        kd.get_sigmas(sde, 10, "karras", rho=0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["vp", "ou"])
def test_denoiser_on_cuda_matches_cpu(name):
    sde = load(name)
    sigmas = kd.get_sigmas(sde, 8, append_zero=False, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64) * sigmas[:, None]
    cpu = kd.Denoiser(sde, exact_score(name))(x, sigmas)
    cuda = kd.Denoiser(load(name).to("cuda"), exact_score(name))(x.cuda(), sigmas.cuda())
    assert cuda.device.type == "cuda" and torch.allclose(cuda.cpu(), cpu, rtol=1e-10, atol=1e-12)
