"""Mathematical identities that every generated module must satisfy (MATH.md sections 1-5, 7).

Each test draws random valid parameters and times (Hypothesis, derandomized), works in float64,
and checks the generated code against another part of itself or against autograd, SciPy or
SymPy; none compares against stored numbers.
"""
from __future__ import annotations

import math

import pytest
import scipy.integrate
import scipy.stats
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ALL = ["ve", "vp", "subvp", "vp_likelihood", "cosine_vp", "edm_ve", "ou", "numeric"]
CLOSED_FORM = [n for n in ALL if n != "numeric"]
LIKELIHOOD_IMPORTANCE = ["vp_likelihood", "edm_ve", "numeric"]  # weighting likelihood, t ~ importance

F64 = torch.float64


def ddt(fn, t):
    """(fn(t), d/dt fn(t)) by autograd, for an fn that acts on each entry of t separately."""
    t = t.detach().clone().requires_grad_(True)
    y = fn(t)
    if not y.requires_grad:  # a constant in t (torch.full_like keeps no graph)
        return y.detach(), torch.zeros_like(t)
    (grad,) = torch.autograd.grad(y.sum(), t, allow_unused=True)
    return y.detach(), torch.zeros_like(t) if grad is None else grad


def coefficients(sde, t):
    """a(t), b(t), g(t) read off the generated sde(): drift at x = 0 is b, at x = 1 it is a + b."""
    zeros = torch.zeros(t.shape[0], 1, dtype=t.dtype)
    f0, g = sde.sde(zeros, t)
    f1, _ = sde.sde(zeros + 1, t)
    return (f1 - f0)[:, 0], f0[:, 0], g


def assert_close(actual, expected, scale, rtol, what, at=None):
    """|actual - expected| <= rtol * scale elementwise, scale the size of the terms being compared."""
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    scale = torch.as_tensor(scale, dtype=F64).expand_as(actual)
    err = (actual - expected).abs()
    bad = ~(err <= rtol * scale + 1e-300)  # written so that NaN fails
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        where = "" if at is None else f" at t = {at.flatten()[i % at.numel()].item()!r}"
        raise AssertionError(f"{what}{where}: got {actual.flatten()[i].item()!r}, expected "
                             f"{expected.flatten()[i].item()!r} (error {err.flatten()[i].item():.3g}, "
                             f"allowed {rtol * scale.flatten()[i].item():.3g})")


def batch_view(v, x):
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def draws(data, example, **build):
    sde = example.build(data.draw(example.params(), label="params"), **build)
    return sde, data.draw(example.times(sde), label="t")


def states(data, batch, shape=(2, 3), scale=3.0):
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, *shape, generator=g, dtype=F64)


def integrate_log_t(fn, eps, T):
    """int_eps^T fn(t) dt as int fn(e^w) e^w dw (SciPy QUADPACK): smooth even where fn ~ 1/t."""
    def integrand(w):
        t = torch.tensor([math.exp(w)], dtype=F64)
        return float(fn(t)[0]) * math.exp(w)
    return scipy.integrate.quad(integrand, math.log(eps), math.log(T), epsabs=0.0, epsrel=1e-12, limit=400)


# --- 1. Kernel moments solve the moment ODEs -----------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_kernel_moments_solve_moment_odes(examples, name, data):
    """m' = a m, c' = a c + b, v' = 2 a v + g^2 (MATH.md 1), a, b, g from sde(), derivatives by autograd."""
    sde, t = draws(data, examples[name])
    a, b, g = coefficients(sde, t)
    m, dm = ddt(sde.mean_coeff, t)
    c, dc = ddt(sde.mean_offset, t)
    v, dv = ddt(lambda t: sde.std(t) ** 2, t)
    assert_close(dm, a * m, (a * m).abs(), 1e-9, "m' = a m", t)
    assert_close(dc, a * c + b, (a * c).abs() + b.abs(), 1e-9, "c' = a c + b", t)
    assert_close(dv, 2 * a * v + g**2, (2 * a * v).abs() + g**2, 1e-9, "v' = 2 a v + g^2", t)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_kernel_starts_at_data(examples, name, data):
    """m(0) = 1, c(0) = 0, v(0) = v0: the initial conditions of the moment ODEs.

    A kernel read from numeric tables (numeric) reads them at their start, eps * 1e-6, for any earlier
    time: there m, c and v are within 1e-6 of eps's distance from their initial values (v ~ g(0)^2 t)."""
    sde = examples[name].build(data.draw(examples[name].params()))
    zero = torch.zeros(1, dtype=F64)
    eps = torch.full((1,), float(sde.eps), dtype=F64)
    v0 = float(sde.v0)
    if sde.kernel_path.startswith("numeric"):
        assert_close(sde.mean_coeff(zero), 1.0, (sde.mean_coeff(eps) - 1).abs(), 1e-6, "m(0)")
        assert_close(sde.mean_offset(zero), 0.0, sde.mean_offset(eps).abs() + 1e-300, 1e-6, "c(0)")
        assert_close(sde.std(zero) ** 2, v0, (sde.std(eps) ** 2 - v0).abs(), 1e-6, "v(0) = v0")
        return
    assert_close(sde.mean_coeff(zero), 1.0, 1.0, 1e-15, "m(0)")
    assert_close(sde.mean_offset(zero), 0.0, 1.0, 1e-15, "c(0)")
    assert_close(sde.std(zero) ** 2, v0, max(v0, 1e-300), 1e-12, "v(0) = v0")


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_marginal_prob_is_kernel(examples, name, data):
    """marginal_prob(x0, t) = (m x0 + c, sigma), diffusion(t) = g from sde()."""
    sde, t = draws(data, examples[name])
    x0 = states(data, t.shape[0])
    mean, std = sde.marginal_prob(x0, t)
    m, c = batch_view(sde.mean_coeff(t), x0), batch_view(sde.mean_offset(t), x0)
    assert mean.shape == x0.shape and std.shape == t.shape
    assert_close(mean, m * x0 + c, (m * x0).abs() + c.abs(), 1e-13, "marginal mean")
    assert_close(std, sde.std(t), sde.std(t), 1e-13, "marginal std", t)
    _, _, g = coefficients(sde, t)
    assert_close(sde.diffusion(t), g, g, 1e-14, "diffusion(t) = sde()[1]", t)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_log_snr_is_log_of_signal_to_noise(examples, name, data):
    """logSNR = log(m^2 / sigma^2), and it decreases: d/dt logSNR = -g^2 / v."""
    sde, t = draws(data, examples[name])
    m, std = sde.mean_coeff(t), sde.std(t)
    expected = 2 * torch.log(m) - 2 * torch.log(std)
    scale = 2 * torch.log(m).abs() + 2 * torch.log(std).abs() + 1e-3
    lsnr, dlsnr = ddt(sde.log_snr, t)
    assert_close(lsnr, expected, scale, 1e-11, "logSNR = log(m^2/v)", t)
    _, _, g = coefficients(sde, t)
    assert_close(dlsnr, -(g**2) / std**2, g**2 / std**2, 1e-8, "logSNR' = -g^2/v", t)


# --- Reverse SDE, flow ODE, divergence ------------------------------------------------------------

def _score(x, t):
    """An arbitrary (not a true) score: the identities below hold for any score function."""
    return torch.sin(3 * x) * (1 + batch_view(t, x)) - 0.5 * x**2


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_flow_drift_is_mean_of_forward_and_reverse(examples, name, data):
    """reverse drift = f - g^2 s, flow drift = f - g^2 s / 2 = (forward + reverse) / 2 (MATH.md 2)."""
    sde, t = draws(data, examples[name])
    x = states(data, t.shape[0])
    rev, flow = sde.reverse(_score), sde.reverse(_score, probability_flow=True)
    assert (rev.N, rev.T, rev.eps) == (sde.N, sde.T, sde.eps)
    # The SDE itself, then the discretised reverse-diffusion predictor (score_sde's
    # ReverseDiffusionPredictor) with the step's f and G in place of f and g.
    for method in ("sde", "discretize"):
        f, g = getattr(sde, method)(x, t)
        f_rev, g_rev = getattr(rev, method)(x, t)
        f_flow, g_flow = getattr(flow, method)(x, t)
        g2s = batch_view(g**2, x) * _score(x, t)
        scale = f.abs() + g2s.abs()
        assert_close(f_rev, f - g2s, scale, 1e-13, f"{method}: reverse drift f - g^2 s")
        assert_close(f_flow, (f + f_rev) / 2, scale, 1e-13, f"{method}: flow drift = mean of forward and reverse")
        assert torch.equal(g_rev, g), f"{method}: reverse noise = forward noise"
        assert torch.equal(g_flow, torch.zeros_like(g)), f"{method}: the flow ODE has no noise"


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_drift_divergence_is_trace_of_jacobian(examples, name, data):
    """drift_divergence(x, t) = sum_i d f_i / d x_i, the exact trace by autograd, for d = 6 > 1."""
    sde, t = draws(data, examples[name])
    x = states(data, t.shape[0]).requires_grad_(True)
    drift = sde.sde(x, t)[0].flatten(1)
    trace = torch.zeros(t.shape[0], dtype=F64)
    for i in range(drift.shape[1]):
        (grad,) = torch.autograd.grad(drift[:, i].sum(), x, retain_graph=True)
        trace = trace + grad.flatten(1)[:, i]
    div = sde.drift_divergence(x.detach(), t)
    assert div.shape == t.shape
    assert_close(div, trace, trace.abs(), 1e-12, "div f = d a(t)", t)


# --- Discretisation: the exact transition over one step -------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data(), N=st.sampled_from([1, 10, 1000]), explicit=st.booleans())
def test_discretize_is_exact_transition(examples, name, data, N, explicit):
    """x_t = x_s + f + G z with s = max(t - T/N, 0) or a given s <= t, r = m(t)/m(s):
    f = (r - 1) x + c(t) - r c(s), G^2 = v(t) - r^2 v(s) (docs: What the compiler derives)."""
    example = examples[name]
    sde = example.build(data.draw(example.params()), N=N)
    t = torch.cat([torch.tensor([float(sde.eps)], dtype=F64), data.draw(example.times(sde))])
    x = states(data, t.shape[0])
    if explicit:  # any earlier time, as samplers on their own grids pass it
        fraction = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(t), max_size=len(t))),
                                dtype=F64)
        s = fraction * t
        f, G = sde.discretize(x, t, s)
    else:
        f, G = sde.discretize(x, t)
        s = torch.clamp(t - sde.T / N, min=0.0)
    r = sde.mean_coeff(t) / sde.mean_coeff(s)
    c_t, c_s = sde.mean_offset(t), sde.mean_offset(s)
    v_t, v_s = sde.std(t) ** 2, sde.std(s) ** 2
    expected_f = batch_view(r - 1, x) * x + batch_view(c_t - r * c_s, x)
    scale = batch_view(r + 1, x) * x.abs() + batch_view(c_t.abs() + (r * c_s).abs(), x)
    assert_close(f, expected_f, scale, 1e-12, "step drift f")
    # v(t) - r^2 v(s) cancels: allow what float64 loses there, 1e-12 of v(t).
    assert_close(G**2, v_t - r**2 * v_s, v_t, 1e-12, "step variance G^2", t)


# --- Training time: weighting, density, CDF, inverse ---------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_weight_is_declared_weighting(examples, name, data):
    """lambda = g^2 (likelihood) or sigma^2 (score_matching); uniform t has density 1 / (T - eps)."""
    sde, t = draws(data, examples[name])
    _, _, g = coefficients(sde, t)
    expected = {"likelihood": g**2, "score_matching": sde.std(t) ** 2}[sde.weighting]
    assert_close(sde.weight(t), expected, expected, 1e-13, f"{sde.weighting} weight", t)
    if sde.t_sampling == "uniform":
        q = 1 / (sde.T - sde.eps)
        assert_close(sde.t_density(t), q, q, 1e-14, "uniform density", t)


@pytest.mark.parametrize("name", LIKELIHOOD_IMPORTANCE)
@given(data=st.data())
def test_importance_weight_is_constant_Z(examples, name, data):
    """Under t ~ q the loss weight lambda / (q sigma^2) is the constant Z = logSNR(eps) - logSNR(T)."""
    sde, t = draws(data, examples[name])
    ends = torch.tensor([float(sde.eps), float(sde.T)], dtype=F64)
    lsnr = sde.log_snr(ends)
    Z = lsnr[0] - lsnr[1]
    w = sde.weight(t) / (sde.t_density(t) * sde.std(t) ** 2)
    assert_close(w, Z.expand_as(w), Z.abs(), 1e-10, "lambda / (q v) = Z", t)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=4)
@given(data=st.data())
def test_t_density_integrates_to_one(examples, name, data):
    """int_eps^T q(t) dt = 1 (QUADPACK in log t, float64; tolerance from its error estimate)."""
    sde = examples[name].build(data.draw(examples[name].params()))
    total, err = integrate_log_t(sde.t_density, float(sde.eps), float(sde.T))
    assert abs(total - 1) <= 1e-9 + 10 * err, (total, err)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_t_density_is_derivative_of_t_cdf(examples, name, data):
    """q = d/dt Q (autograd), Q(eps) = 0, Q(T) = 1."""
    sde, t = draws(data, examples[name])
    _, dQ = ddt(sde.t_cdf, t)
    q = sde.t_density(t)
    assert_close(dQ, q, q, 1e-9, "q = Q'", t)
    ends = sde.t_cdf(torch.tensor([float(sde.eps), float(sde.T)], dtype=F64))
    assert_close(ends, torch.tensor([0.0, 1.0], dtype=F64), 1.0, 1e-12, "Q(eps) = 0, Q(T) = 1")


@pytest.mark.parametrize("name", ALL)
@given(data=st.data(), u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_t_cdf_and_t_icdf_are_inverse(examples, name, data, u):
    """Q(Q^-1(u)) = u and Q^-1(Q(t)) = t."""
    sde, t = draws(data, examples[name])
    u = torch.tensor(u + [0.0, 1.0], dtype=F64)
    assert_close(sde.t_cdf(sde.t_icdf(u)), u, 1.0, 1e-10, "Q(Q^-1(u)) = u")
    assert_close(sde.t_icdf(sde.t_cdf(t)), t, t, 1e-9, "Q^-1(Q(t)) = t", t)


@pytest.mark.parametrize("name", ALL)
def test_sample_t_follows_t_cdf(examples, name):
    """sample_t lies in [eps, T] and its empirical CDF matches t_cdf: one-sample Kolmogorov-Smirnov
    test, fixed seed, rejected at alpha = 1e-3 (a correct sampler fails with probability 1e-3 per seed;
    the seed is fixed, so the outcome is deterministic)."""
    sde = examples[name].build()
    n = 1000 if name == "numeric" else 5000  # numeric: 64 bisection steps of quadratures per draw
    t = sde.sample_t(n, generator=torch.Generator().manual_seed(1234))
    assert t.shape == (n,) and t.dtype == F64
    assert bool(((t >= sde.eps) & (t <= sde.T)).all())

    def cdf(values):
        return sde.t_cdf(torch.as_tensor(values, dtype=F64)).numpy()

    result = scipy.stats.kstest(t.numpy(), cdf)
    assert result.pvalue > 1e-3, result


# --- Prior -----------------------------------------------------------------------------------------

# The prior each source states; "kernel" means N(c(T), v(T) I).
PRIORS = {
    "ve": lambda sde: (0.0, sde.sigma_max**2),
    "vp": lambda sde: (0.0, 1.0),
    "subvp": lambda sde: (0.0, 1.0),
    "vp_likelihood": lambda sde: (0.0, 1.0),
    "cosine_vp": lambda sde: (0.0, 1.0),
    "edm_ve": lambda sde: (0.0, 80.0**2),
    "ou": "kernel",
    "numeric": "kernel",
}


def prior_of(name, sde):
    if PRIORS[name] == "kernel":
        T = torch.tensor([float(sde.T)], dtype=F64)
        return float(sde.mean_offset(T)), float(sde.std(T)) ** 2
    return PRIORS[name](sde)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_prior_logp_is_normal_log_prob(examples, name, data):
    """prior_logp(z) = sum over entries of log N(z_i; mean, var), against torch.distributions."""
    sde = examples[name].build(data.draw(examples[name].params()))
    mean, var = prior_of(name, sde)
    z = mean + math.sqrt(var) * states(data, data.draw(st.integers(1, 4)), scale=1.5)
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=F64), torch.tensor(math.sqrt(var), dtype=F64))
    expected = normal.log_prob(z).flatten(1).sum(1)
    assert_close(sde.prior_logp(z), expected, expected.abs(), 1e-12, "prior_logp")


@pytest.mark.parametrize("name", ALL)
def test_prior_sampling_moments(examples, name):
    """prior_sampling draws N(mean, var): sample mean and variance within 5 standard errors (fixed seed)."""
    sde = examples[name].build()
    mean, var = prior_of(name, sde)
    n = 40000
    z = sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(7))
    assert z.shape == (n, 2) and z.dtype == F64
    z = z.flatten()
    assert abs(float(z.mean()) - mean) <= 5 * math.sqrt(var / z.numel())
    assert abs(float(z.var()) / var - 1) <= 5 * math.sqrt(2 / z.numel())


# --- 2. Generated code against SymPy's evaluation of the derivation --------------------------------

def _sympy_at(expr, subs):
    value = sp.N(expr.xreplace(subs), 30)
    if not value.is_real:
        raise AssertionError(f"{expr} is not real at {subs}: {value}")
    return float(value)


def _extra_symbol(expr, known):
    """The one symbol of expr that is neither t nor a parameter (a step start, a dimension, u, y)."""
    (sym,) = expr.free_symbols - known
    return sym


@pytest.mark.parametrize("name", CLOSED_FORM)
@settings(max_examples=8)
@given(data=st.data())
def test_generated_code_equals_sympy(compiled, examples, name, data):
    """Each method, in float64, equals the derivation's SymPy expression evaluated to 30 digits."""
    fresh = compiled(name)
    d, p = fresh.compiled.derivation, fresh.compiled.derivation.program
    params = data.draw(st.fixed_dictionaries(
        {prm.name: st.floats(*examples[name].ranges[prm.name]) for prm in p.params}), label="params")
    sde = fresh.module.SDE(**params).double()
    t_values = data.draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3), label="u")
    eps, T = float(sde.eps), float(sde.T)
    t_values = [min(max(eps * (T / eps) ** u, eps), T) for u in t_values]
    t_sym = p.t
    base = {prm.symbol: sp.Float(params[prm.name], 30) for prm in p.params}
    known = set(base) | {t_sym}
    imp = d.importance
    uniform = p.t_sampling == "uniform"
    density = 1 / (p.T - p.eps) if uniform else imp.density
    cdf = (t_sym - p.eps) / (p.T - p.eps) if uniform else imp.cdf

    t = torch.tensor(t_values, dtype=F64)
    a, b, g = coefficients(sde, t)
    s = torch.clamp(t - sde.T / sde.N, min=0.0)
    x6 = torch.zeros(t.shape[0], 6, dtype=F64)
    step_offset = sde.discretize(x6[:, :1], t)[0][:, 0]  # f = (r - 1) x + offset
    step_ratio = sde.discretize(x6[:, :1] + 1, t)[0][:, 0] - step_offset + 1
    checks = [
        ("a", d.a, a), ("b", d.b, b), ("g^2", d.g2, g**2),
        ("m", d.kernel.m, sde.mean_coeff(t)), ("c", d.kernel.c, sde.mean_offset(t)),
        ("std", d.kernel.std, sde.std(t)), ("v", d.kernel.v, sde.std(t) ** 2),
        ("logSNR", d.log_snr, sde.log_snr(t)), ("weight", d.weight, sde.weight(t)),
        ("t_density", density, sde.t_density(t)), ("t_cdf", cdf, sde.t_cdf(t)),
        ("drift_divergence", d.divergence, sde.drift_divergence(x6, t)),
        ("discretize ratio", d.step.ratio, step_ratio), ("discretize offset", d.step.offset, step_offset),
    ]
    for what, expr, values in checks:
        for i, tv in enumerate(t_values):
            subs = dict(base)
            subs[t_sym] = sp.Float(tv, 30)
            for extra in expr.free_symbols - known:  # the step start s, or the dimension d
                subs[extra] = 6 if what == "drift_divergence" else sp.Float(float(s[i]), 30)
            expected = _sympy_at(expr, subs)
            # Relative, except for the CDF (in [0, 1]) and logSNR (crosses 0): absolute there.
            scale = abs(expected) + (1.0 if what in ("t_cdf", "logSNR") else 1e-300)
            assert_close(values[i], expected, scale, 1e-10, f"{name} {what} at t = {tv!r}")

    mean, var = _sympy_at(d.prior_mean, base), _sympy_at(d.prior_variance, base)
    z = torch.linspace(-3, 3, 12, dtype=F64).reshape(2, 6)
    expected = [-3 * math.log(2 * math.pi * var) - float(((row - mean) ** 2).sum()) / (2 * var) for row in z]
    assert_close(sde.prior_logp(z), torch.tensor(expected, dtype=F64), torch.tensor(expected).abs(), 1e-12,
                 f"{name} prior_logp with the derived prior")


@pytest.mark.parametrize("name", ["vp_likelihood", "edm_ve"])
@settings(max_examples=8)
@given(data=st.data(), u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4))
def test_t_icdf_equals_sympy_inverse(compiled, examples, name, data, u):
    """The closed-form Q^-1 in float64 equals the derived inverse at 30 digits (through logSNR^-1 when
    it is the likelihood weighting, of the drop u (logSNR(eps) - logSNR(T)) of logSNR below logSNR(eps))."""
    fresh = compiled(name)
    d, p = fresh.compiled.derivation, fresh.compiled.derivation.program
    assert d.importance.inverse is not None, "expected a closed-form inverse CDF"
    params = data.draw(st.fixed_dictionaries(
        {prm.name: st.floats(*examples[name].ranges[prm.name]) for prm in p.params}))
    sde = fresh.module.SDE(**params).double()
    base = {prm.symbol: sp.Float(params[prm.name], 30) for prm in p.params}
    inverse = d.importance.inverse
    arg = _extra_symbol(inverse, set(base) | {p.t})
    got = sde.t_icdf(torch.tensor(u, dtype=F64))
    for i, ui in enumerate(u):
        if d.importance.by_log_snr:
            lo, hi = (d.log_snr.xreplace({p.t: p.eps}).xreplace(base), d.log_snr.xreplace({p.t: p.T}).xreplace(base))
            value = sp.Float(ui, 30) * (lo - hi)
        else:
            value = sp.Float(ui, 30)
        expected = min(max(_sympy_at(inverse, {**base, arg: value}), float(sde.eps)), float(sde.T))
        assert_close(got[i], expected, expected, 1e-10, f"{name} t_icdf({ui!r})")


