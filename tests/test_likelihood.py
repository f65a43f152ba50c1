"""sdelang.runtime.likelihood against closed forms: Gaussian data N(mu, s^2 I) through affine SDEs.

With the exact score of Gaussian data every quantity has a closed form (MATH.md section 5):
p_t = N(m mu + c, S_t I) with S_t = m^2 s^2 + v, the flow ODE maps x_eps to
x_t = m_t mu + c_t + sqrt(S_t / S_eps) (x_eps - m_eps mu - c_eps), and ScoreFlow's bound is tight.
Statistical checks use fixed seeds and tolerances of 5 Monte Carlo standard errors.
"""
from __future__ import annotations

import math

import pytest
import scipy.integrate
import scipy.stats
import torch

from sdelang.runtime.config import ODE_NORMS
from sdelang.runtime.gaussian import GaussianData
from sdelang.runtime.logsnr import log_snr_inverse
from sdelang.runtime.likelihood import (Bound, LogLikelihood, _log_snr_uniform_times, bits_per_dim,
                                bound, log_likelihood)

F64 = torch.float64
MEAN = [0.7, -0.4, 1.2]
STD = 0.5
# The accuracy asked of the flow-ODE likelihood at the default rtol = atol = 1e-5, per dimension.
NATS_PER_DIM = 1e-3


def tensor(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def full(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), float(value), dtype=like.dtype, device=like.device)


def use_p_T_as_prior(sde, data: GaussianData):
    """The model whose prior is p_T itself: its flow-ODE density at eps is exactly p_eps.

    The compiled priors are N(c(T), v(T) I) or a fixed normal, which drop the data term m(T) mu of
    p_T; at x(T) ~ p_T that shifts log p by up to 0.015 nats per dimension here (VE: x(T) ~ 50,
    mu = 0.7, |x mu| / sigma_max^2 ~ 0.015), above NATS_PER_DIM. With this prior the comparison with
    GaussianData.log_prob at eps is exact; test_model_prior_density covers the compiled prior.
    """
    sde.prior_logp = lambda z: data.log_prob(z, full(sde.T, z))
    return sde


def gaussian_setup(examples, name: str, dtype=F64, shape=(3,), seed=0, n=4):
    """The example's SDE, data N(mean, STD^2 I) with mean != 0 (MEAN for d = 3), and n draws from it."""
    sde = examples[name].build(dtype=dtype)
    mean = tensor(*MEAN) if shape == (3,) else torch.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape)
    data = GaussianData(sde, mean, STD, shape)
    x = data.sample(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return sde, data, x


def random_score(d: int, seed: int = 1, hidden: int = 16):
    """A score with a dense, x-dependent Jacobian: -x plus a random tanh MLP of (x, t)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d + 1, hidden, generator=g, dtype=F64) / 2
    b1 = torch.randn(hidden, generator=g, dtype=F64)
    w2 = torch.randn(hidden, d, generator=g, dtype=F64) / math.sqrt(hidden)

    def score(x, t):
        h = torch.tanh(torch.cat([x, t[:, None]], 1) @ w1.to(x) + b1.to(x))
        return h @ w2.to(x) - x
    return score


def marginal(sde, data: GaussianData, t: torch.Tensor):
    """m(t), c(t), v(t) and S(t) = m^2 s^2 + v, the variance of p_t, each [B]."""
    m, c, v = sde.mean_coeff(t), sde.mean_offset(t), sde.std(t) ** 2
    return m, c, v, m**2 * data.std**2 + v


def cross_entropy_at_eps(sde, data: GaussianData, x: torch.Tensor) -> torch.Tensor:
    """E_{y ~ N(m x + c, v I)}[-log N(y; m mu + c, S I)] = d/2 log(2 pi S) + (m^2 |x - mu|^2 + d v) / (2 S), at eps."""
    m, _, v, S = marginal(sde, data, full(sde.eps, x))
    d = x[0].numel()
    sq = ((x - data.mean.to(x)) ** 2).flatten(1).sum(1)
    return 0.5 * d * torch.log(2 * math.pi * S) + (m**2 * sq + d * v) / (2 * S)


# --- log_likelihood: exact trace ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["ve", "vp", "subvp", "vp_likelihood", "cosine_vp", "edm_ve", "ou", "numeric"])
def test_exact_trace_equals_analytic_density(examples, name):
    sde, data, x = gaussian_setup(examples, name)
    use_p_T_as_prior(sde, data)
    result = log_likelihood(sde, data.score, x, exact_trace=True)
    expected = data.log_prob(x, full(sde.eps, x))
    assert isinstance(result, LogLikelihood)
    assert torch.equal(result.stderr, torch.zeros_like(result.logp))
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=NATS_PER_DIM * x.shape[1])


@pytest.mark.parametrize("name", ["ve", "vp", "ou"])
def test_model_prior_density(examples, name):
    """With the compiled prior the model density is prior(Phi(x)) |det dPhi/dx|, Phi the flow map eps -> T.

    For Gaussian data Phi(x) = mu_T + sqrt(S_T / S_eps) (x - mu_eps), so
    log p_model(x) = log prior(Phi(x)) + d/2 log(S_T / S_eps).
    """
    sde, data, x = gaussian_setup(examples, name)
    eps = full(sde.eps, x)
    m_eps, c_eps, _, S_eps = marginal(sde, data, eps)
    m_T, c_T, _, S_T = marginal(sde, data, full(sde.T, x))
    mu, ratio = data.mean, (S_T / S_eps)[:, None]
    phi = m_T[:, None] * mu + c_T[:, None] + ratio.sqrt() * (x - m_eps[:, None] * mu - c_eps[:, None])
    expected = sde.prior_logp(phi) + 0.5 * x.shape[1] * ratio[:, 0].log()
    result = log_likelihood(sde, data.score, x, exact_trace=True)
    torch.testing.assert_close(result.logp, expected, rtol=0, atol=NATS_PER_DIM * x.shape[1])
    # The test sees the prior: the compiled prior moves log p by more than the tolerance.
    mismatch = (expected - data.log_prob(x, eps)).abs().max()
    assert mismatch > NATS_PER_DIM * x.shape[1], f"prior mismatch {mismatch:.2g} nats is below the tolerance"


# --- log_likelihood: Hutchinson ----------------------------------------------------------------

ROWS, PROBES = 500, 4


@pytest.fixture(scope="module", params=["rademacher", "gaussian"])
def hutchinson_run(request, examples):
    """One datapoint repeated ROWS times, PROBES probes each: ROWS independent estimates of one logp."""
    sde = examples["vp"].build()
    score = random_score(3)
    x = tensor(0.3, -0.5, 1.1)[None]
    exact = log_likelihood(sde, score, x, exact_trace=True).logp[0]
    result = log_likelihood(sde, score, x.repeat(ROWS, 1), probes=PROBES, noise=request.param,
                            generator=torch.Generator().manual_seed(2))
    return exact, result


def test_hutchinson_is_unbiased(hutchinson_run):
    exact, result = hutchinson_run
    # The rows are i.i.d. estimates: their mean has standard error sd / sqrt(ROWS). 1e-4 allows for
    # the two solves' different step sequences (both at rtol = atol = 1e-5).
    standard_error = result.logp.std() / math.sqrt(ROWS)
    assert standard_error > 0
    assert (result.logp.mean() - exact).abs() <= 5 * standard_error + 1e-4


def test_hutchinson_stderr_matches_spread(hutchinson_run):
    """The reported stderr^2 and the rows' empirical variance both estimate Var(logp estimate)."""
    _, result = hutchinson_run
    # Some rows may report 0: in d = 3 there are only 4 Rademacher probes up to sign. None may be nan,
    # and probes shared across a row's copies would make every row report 0.
    assert torch.isfinite(result.stderr).all() and (result.stderr > 0).any()
    empirical = result.logp.var()
    reported = (result.stderr**2).mean()
    # Standard errors of the two estimates: sample variance sqrt((mu4 - (n-3)/(n-1) var^2) / n), a mean
    # sd / sqrt(n). Their sum bounds the standard error of the difference whatever their correlation.
    centred = result.logp - result.logp.mean()
    se_empirical = torch.sqrt(((centred**4).mean() - (ROWS - 3) / (ROWS - 1) * empirical**2) / ROWS)
    se_reported = (result.stderr**2).std() / math.sqrt(ROWS)
    assert (empirical - reported).abs() <= 5 * (se_empirical + se_reported)


def test_gaussian_probe_spread_matches_closed_form(examples):
    """Gaussian data and Gaussian probes: the Hutchinson error has a closed-form variance.

    ds/dx = -I / S_t, so one probe eps gives the exact logp plus C (|eps|^2 - d) with
    C = int_eps^T g^2 / (2 S) dt = 1/2 log(S_T / S_eps) - log(m_T / m_eps) (from S' = 2 a S + g^2):
    variance 2 d C^2 per probe, 2 d C^2 / K for the mean of K.
    """
    sde, data, x = gaussian_setup(examples, "vp", n=1)
    rows, probes, d = 2000, 4, x.shape[1]
    m, _, _, S = marginal(sde, data, torch.tensor([sde.eps, float(sde.T)], dtype=F64))
    C = 0.5 * torch.log(S[1] / S[0]) - torch.log(m[1] / m[0])
    variance = 2 * d * C**2 / probes
    exact = log_likelihood(sde, data.score, x, exact_trace=True).logp
    result = log_likelihood(sde, data.score, x.repeat(rows, 1), probes=probes, noise="gaussian",
                            generator=torch.Generator().manual_seed(3))
    # Rows are i.i.d. with the known variance: their mean is off by sqrt(variance / rows) at most 5 times
    # (1e-4 for the solves' different steps), and their empirical variance and the mean reported stderr^2
    # both estimate it, each to within 5 of its own standard errors (taken from the sample).
    assert (result.logp.mean() - exact).abs() <= 5 * torch.sqrt(variance / rows) + 1e-4
    reported = result.stderr**2
    assert (reported.mean() - variance).abs() <= 5 * reported.std() / math.sqrt(rows)
    centred = result.logp - exact
    assert (centred.pow(2).mean() - variance).abs() <= 5 * centred.pow(2).std() / math.sqrt(rows)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rademacher_is_exact_for_isotropic_jacobian_on_images(examples, dtype):
    """Gaussian data have ds/dx = -I / S_t, where Rademacher probes give the trace with zero variance.

    x has image shape [B, C, H, W]; both probes and the exact trace must give p_eps (float64 reference).
    """
    sde, data, x = gaussian_setup(examples, "vp", dtype=dtype, shape=(1, 4, 4), n=2)
    use_p_T_as_prior(sde, data)
    expected = data.log_prob(x.double(), full(sde.eps, x.double()))
    tolerance = NATS_PER_DIM * x[0].numel()
    hutchinson = log_likelihood(sde, data.score, x, probes=2, generator=torch.Generator().manual_seed(0))
    assert hutchinson.logp.dtype == dtype
    assert hutchinson.stderr.abs().max() <= 1e-6  # the two probes' estimates agree to rounding
    torch.testing.assert_close(hutchinson.logp.double(), expected, rtol=0, atol=tolerance)
    exact = log_likelihood(sde, data.score, x, exact_trace=True)
    torch.testing.assert_close(exact.logp.double(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("exact_trace", [True, False])
def test_zero_score_on_ve_leaves_x_in_place(examples, exact_trace):
    """VE has f = 0: with s = 0 the flow is at rest and log p_eps(x) = log prior(x), whatever the probe."""
    sde, data, x = gaussian_setup(examples, "ve")
    result = log_likelihood(sde, lambda y, t: torch.zeros_like(y), x, exact_trace=exact_trace,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.logp, sde.prior_logp(x), rtol=1e-12, atol=1e-12)


# --- log_likelihood: dtype, NFE, grad mode, arguments --------------------------------------------

@pytest.mark.parametrize("name", ["ve", "vp", "ou"])
def test_float32_matches_analytic_density(examples, name):
    sde, data, x = gaussian_setup(examples, name, dtype=torch.float32)
    use_p_T_as_prior(sde, data)
    result = log_likelihood(sde, data.score, x, exact_trace=True)
    assert result.logp.dtype == torch.float32 and torch.isfinite(result.logp).all()
    expected = data.log_prob(x.double(), full(sde.eps, x.double()))
    # The float64 accuracy target: float32 rounding of logp ~ 5 nats is 1e-6, far below it.
    torch.testing.assert_close(result.logp.double(), expected, rtol=0, atol=NATS_PER_DIM * x.shape[1])


def test_nfe_counts_score_calls_and_no_grad_callers(examples):
    sde, data, x = gaussian_setup(examples, "vp")
    calls = 0

    def counted(y, t):
        nonlocal calls
        calls += 1
        return data.score(y, t)

    for exact_trace in (True, False):
        calls = 0
        result = log_likelihood(sde, counted, x, exact_trace=exact_trace, generator=torch.Generator().manual_seed(0))
        assert result.nfe == calls > 0
        with torch.no_grad():
            quiet = log_likelihood(sde, counted, x, exact_trace=exact_trace, generator=torch.Generator().manual_seed(0))
        assert torch.equal(quiet.logp, result.logp)
        assert not quiet.logp.requires_grad
    assert torch.isnan(result.stderr).all()  # one Hutchinson probe: no spread to report


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "rk4"}, "method"),
    ({"method": "dopri"}, "method"),
    ({"noise": "uniform"}, "noise"),
    ({"probes": 0}, "probes"),
    ({"probes": 2.0}, "probes"),
    ({"exact_trace": True, "probes": 3}, "exact_trace"),
    ({"rtol": 0.0}, "rtol"),
    ({"atol": -1e-5}, "atol"),
])
def test_log_likelihood_rejects_bad_arguments(examples, kwargs, message):
    sde, data, x = gaussian_setup(examples, "vp")
    with pytest.raises(ValueError, match=message):
        log_likelihood(sde, data.score, x, **kwargs)


def test_log_likelihood_rejects_unbatched_x(examples):
    sde, data, x = gaussian_setup(examples, "vp")
    with pytest.raises(ValueError, match=r"\[B, \.\.\.\]"):
        log_likelihood(sde, data.score, x[0])


# --- bits_per_dim ----------------------------------------------------------------------------------

def test_bits_per_dim_hand_computed():
    D = 5
    # Uniform density on [-1, 1]^D: p_x = 2^-D, so p_y = 1 on [0, 1]^D and 8-bit data cost 8 bits.
    assert bits_per_dim(tensor(-D * math.log(2)), D).item() == pytest.approx(8.0, abs=1e-12)
    # The same data seen on [0, 1] (scale 1): p_x = 1.
    assert bits_per_dim(tensor(0.0), D, scale=1.0).item() == pytest.approx(8.0, abs=1e-12)
    # Continuous data: p_x = 2^-D is 1 bit per dimension.
    assert bits_per_dim(tensor(-D * math.log(2)), D, levels=None).item() == pytest.approx(1.0, abs=1e-12)
    # N(0, 1) at its mode: log p = -D/2 log(2 pi), i.e. log2(2 pi) / 2 bits per dimension.
    mode = tensor(-0.5 * D * math.log(2 * math.pi))
    assert bits_per_dim(mode, D, levels=None).item() == pytest.approx(0.5 * math.log2(2 * math.pi), abs=1e-12)
    # MATH.md: 256 levels on [-1, 1] add 8 - log2(2) = 7 bits to the density of x.
    logp = tensor(-3.0, -40.0)
    torch.testing.assert_close(bits_per_dim(logp, D), -logp / (D * math.log(2)) + 7, rtol=0, atol=1e-12)
    # Four levels (2 bits) on [0, 1]: a density 4^D on y is exactly the uniform distribution on the levels.
    assert bits_per_dim(tensor(D * math.log(4)), D, scale=1.0, levels=4).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({"dims": 0}, "dims"), ({"dims": 2.5}, "dims"), ({"scale": 0.0}, "scale"),
    ({"levels": 1}, "levels"), ({"levels": 256.0}, "levels"),
])
def test_bits_per_dim_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bits_per_dim(torch.zeros(1), **{"dims": 3, **kwargs})


# --- bound -----------------------------------------------------------------------------------------

def bound_setup(examples, name: str):
    """Datapoints mu + r e1, so that a score error along e2 is orthogonal to x - mu, and prior p_T."""
    sde = examples[name].build()
    mu = tensor(0.7, -0.4)
    data = GaussianData(sde, mu, STD, (2,))
    x = mu + torch.tensor([[0.0, 0.0], [1.0, 0.0], [-0.6, 0.0]], dtype=F64)
    use_p_T_as_prior(sde, data)
    return sde, data, x


BOUND_SAMPLES = 10000


@pytest.mark.parametrize("name", ["vp", "ou", *(pytest.param(n, marks=pytest.mark.slow)
                                                for n in ["ve", "subvp", "cosine_vp", "edm_ve", "numeric"])])
def test_bound_is_tight_for_the_exact_score(examples, name):
    """With the true score and prior p_T the path KL equals the KL at eps: the bound is the cross-entropy."""
    sde, data, x = bound_setup(examples, name)
    result = bound(sde, data.score, x, samples=BOUND_SAMPLES, generator=torch.Generator().manual_seed(0))
    assert isinstance(result, Bound) and result.nfe == 1
    assert ((result.value - cross_entropy_at_eps(sde, data, x)).abs() <= 5 * result.stderr).all()


@pytest.mark.parametrize("name", ["vp", pytest.param("ou", marks=pytest.mark.slow)])
def test_bound_grows_by_the_score_error(examples, name):
    """A score error delta adds 1/2 int g^2 (|delta|^2 + 2 delta . E[s - k | x]) dt to the bound.

    For Gaussian data E[s - k | x] = -m (x - mu) / S_t, orthogonal to delta here, so the increase is
    1/2 |delta|^2 int_eps^T g^2 dt, and the perturbed bound stays above the cross-entropy.
    """
    sde, data, x = bound_setup(examples, name)
    delta = tensor(0.0, 1.0)
    exact = bound(sde, data.score, x, samples=BOUND_SAMPLES, generator=torch.Generator().manual_seed(0))
    perturbed = bound(sde, lambda y, t: data.score(y, t) + delta, x, samples=BOUND_SAMPLES,
                      generator=torch.Generator().manual_seed(0))
    g2_integral, _ = scipy.integrate.quad(lambda t: float(sde.diffusion(torch.tensor([t], dtype=F64))[0] ** 2),
                                          sde.eps, sde.T, epsabs=0.0, epsrel=1e-10, limit=200)
    increase = 0.5 * (delta**2).sum() * g2_integral
    # sd(A - B) <= sd(A) + sd(B) whatever the correlation (the two share their random draws).
    assert ((perturbed.value - exact.value - increase).abs() <= 5 * (exact.stderr + perturbed.stderr)).all()
    assert (perturbed.value >= cross_entropy_at_eps(sde, data, x) - 5 * perturbed.stderr).all()


@pytest.mark.parametrize("name", ["vp", "cosine_vp", "ou",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ["ve", "subvp", "edm_ve"])])
def test_k_terms_closed_form_equals_monte_carlo(examples, name):
    """1/2 int E[-g^2 |k|^2 - 2 div f] dt = -(d/2) log(v(T) / v(eps)), estimated with t ~ q, the bound's sampler.

    With t ~ q = g^2 / (v L), L = logSNR(eps) - logSNR(T), and k = -z / sigma the integrand divided by q
    is -L |z|^2 - 2 d a v L / g^2; a wrong sampler density biases the second term.
    """
    sde = examples[name].build()
    d, n = 2, 20000
    t = _log_snr_uniform_times(sde, n, "cpu", torch.Generator().manual_seed(1))
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=F64)
    ends = torch.tensor([sde.eps, float(sde.T)], dtype=F64)
    span = sde.log_snr(ends)[0] - sde.log_snr(ends)[1]
    a = sde.drift_divergence(z, t) / d
    draws = 0.5 * (-span * (z**2).sum(1) - 2 * d * a * sde.std(t) ** 2 * span / sde.diffusion(t) ** 2)
    closed_form = -d * torch.log(sde.std(ends)[1] / sde.std(ends)[0])
    assert (draws.mean() - closed_form).abs() <= 5 * draws.std() / math.sqrt(n)


@pytest.mark.parametrize("name", ["vp", "cosine_vp",
                                  *(pytest.param(n, marks=pytest.mark.slow) for n in ["edm_ve", "ou"])])
def test_bound_times_are_uniform_in_log_snr(examples, name):
    """Kolmogorov-Smirnov: P(sqrt(n) D > 2.69) ~ 2 exp(-2 * 2.69^2) = 1e-6 for a correct sampler."""
    sde = examples[name].build()
    n = 20000
    t = _log_snr_uniform_times(sde, n, "cpu", torch.Generator().manual_seed(4))
    ends = torch.tensor([sde.eps, float(sde.T)], dtype=F64)
    hi, lo = sde.log_snr(ends)
    u = ((hi - sde.log_snr(t)) / (hi - lo)).numpy()
    assert scipy.stats.kstest(u, "uniform").statistic <= 2.69 / math.sqrt(n)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp", "vp_likelihood", "cosine_vp", "edm_ve", "ou", "numeric"])
def test_log_snr_inverse(examples, name):
    sde = examples[name].build()
    ends = torch.tensor([sde.eps, float(sde.T)], dtype=F64)
    hi, lo = sde.log_snr(ends)
    target = lo + (hi - lo) * torch.linspace(0, 1, 101, dtype=F64)
    t = log_snr_inverse(sde, target)
    assert ((t >= sde.eps) & (t <= sde.T)).all()
    torch.testing.assert_close(sde.log_snr(t), target, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t[[0, -1]], ends.flip(0), rtol=1e-12, atol=0)


def test_bound_float32_images_in_chunks(examples):
    sde = examples["vp"].build(dtype=torch.float32)
    data = GaussianData(sde, torch.linspace(-1.0, 1.0, 16).reshape(1, 4, 4), STD, (1, 4, 4))
    use_p_T_as_prior(sde, data)
    x = data.sample(2, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    calls = 0

    def counted(y, t):
        nonlocal calls
        calls += 1
        return data.score(y, t)

    result = bound(sde, counted, x, samples=2000, samples_per_call=800, generator=torch.Generator().manual_seed(0))
    assert result.nfe == calls == 3
    assert result.value.dtype == torch.float32 and torch.isfinite(result.value).all()
    expected = cross_entropy_at_eps(examples["vp"].build(), data, x.double())
    assert ((result.value.double() - expected).abs() <= 5 * result.stderr.double()).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": 0}, "samples"), ({"samples": 10.0}, "samples"), ({"samples_per_call": 0}, "samples_per_call"),
])
def test_bound_rejects_bad_arguments(examples, kwargs, message):
    sde, data, x = bound_setup(examples, "vp")
    with pytest.raises(ValueError, match=message):
        bound(sde, data.score, x, **kwargs)


@pytest.mark.parametrize("norm", ODE_NORMS)
def test_each_step_error_norm_meets_the_closed_form_in_64_dimensions(examples, norm):
    """Gaussian data through VP at d = 64, x holding 64 entries per datapoint to log p's one: whichever norm
    combines their step errors, log p at the default rtol = atol = 1e-5 is within 2e-3 nats (3e-5 per
    dimension) of log p_eps (Rademacher probes are exact here). Measured: 7e-4 at worst under "shared",
    2e-4 under "balanced", 1.4e-4 under "max"."""
    sde, data, x = gaussian_setup(examples, "vp", shape=(64,), n=16)
    use_p_T_as_prior(sde, data)
    result = log_likelihood(sde, data.score, x, norm=norm, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.logp, data.log_prob(x, full(sde.eps, x)), rtol=0, atol=2e-3)


# A VP given by a logSNR with a kink at t = c: a and g^2 jump there.
KINKED = "sde kinked\nparam c = 0.4\nlogsnr(t) = 10 - 20 * t - 3 * abs(t - c)\nt in [1e-5, 1]\nprior kernel\n"


def test_flow_solves_land_on_the_kinks_of_the_coefficients():
    """The module gives the times where its coefficients have a kink (kink_times, at its parameters), and the
    likelihood and the flow sampler solve segment by segment between them, never evaluating on one. Reference: Gaussian
    data N(0.7, 0.3^2 I), whose exact score and flow map are affine (m^2 = sigmoid(logSNR), v = sigmoid(-logSNR),
    written here). Solved across the kink, log p was 4.7e-7 nats off at rtol = atol = 1e-9 (1e-8 without a kink)
    and the flow sampler 7.5e-4 of the data's scale off at 1e-5; now 1.2e-8 and 1.4e-5."""
    import sdelang
    from sdelang.runtime.likelihood import log_likelihood
    from sdelang.runtime.sampling import sample

    module = type(sdelang.load(KINKED))
    assert module().kink_times() == [0.4] and module(c=0.7).kink_times() == [0.7]
    sde = module().double()
    mu, s0, d = 0.7, 0.3, 2

    def moments(t):   # the marginal's mean and variance, and v
        lam = 10 - 20 * t - 3 * (t - 0.4).abs()
        return torch.sigmoid(lam).sqrt() * mu, torch.sigmoid(lam) * s0**2 + torch.sigmoid(-lam), torch.sigmoid(-lam)

    def score(x, t):
        mean, var, _ = moments(t.double())
        return -(x - mean[:, None]) / var[:, None]

    x = mu + s0 * torch.randn(64, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps, T = torch.tensor(1e-5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    (me, ve, _), (mT, vT, noise) = moments(eps), moments(T)
    xT = mT + (vT / ve).sqrt() * (x - me)
    want = -0.5 * (xT**2).sum(1) / noise - 0.5 * d * torch.log(2 * math.pi * noise) + 0.5 * d * torch.log(vT / ve)
    got = log_likelihood(sde, score, x, exact_trace=True, rtol=1e-9, atol=1e-9).logp
    assert (got - want).abs().max() < 4e-8
    start = mT + vT.sqrt() * torch.randn(4000, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    at_eps = me + (ve / vT).sqrt() * (start - mT)
    _, _, v_eps = moments(eps)
    want = (at_eps - v_eps * (at_eps - me) / ve) / (me / mu)   # Tweedie's denoised mean at eps
    out = sample(sde, score, (4000, d), method="ode", x_T=start)
    assert ((out.x - want).pow(2).mean().sqrt() / s0) < 1e-4
