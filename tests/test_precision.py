"""float32 accuracy of every golden module, against the same module in float64 and, for VE, VP and sub-VP,
against score_sde's closed forms in float64 NumPy (test_reference_sdes).

Every comparison evaluates both sides at the same float32 time t (the float64 side at t converted
exactly), so the only error measured is the module's own float32 arithmetic.

Tolerance (derived, not tuned). Evaluating an expression f(t) in float32 rounds each intermediate by at
most u = 2^-24 relative. A rounding of an intermediate that depends on t acts like a relative
perturbation of t of that size, moving f by |t f'(t)| u; the last rounding costs |f| u. So

    |f32 - f64| <= K u (|f| + |t f'(t)|),           K = 8,

absolute near a zero of f (logSNR crosses 0) and relative elsewhere. K bounds the roundings along the
longest chain of one generated expression after common-subexpression elimination (a chain of 3 to 6
operations, transcendental ones within 1-2 ulp in torch). t f'(t) comes from autograd on the float64
module. Where f is formed from terms larger than itself (a CDF as a difference of logSNRs, a step as a
difference of kernel values at t and s) the scale is the size of those terms, as stated at each test.

cosine_vp needs no special case: its schedule is cos(phi(t)) with phi -> pi/2 at T, where
d log cos(phi) / d log t = -t phi' tan(phi) ~ -180; the |t f'| term is exactly that amplification of
the rounding of phi(t). The numeric path does need one term more, see numeric_term.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from test_identities import F64, assert_close, coefficients, ddt
from test_reference_sdes import REFERENCES, declared

ALL = ["ve", "vp", "subvp", "vp_likelihood", "cosine_vp", "edm_ve", "ou", "numeric"]
F32 = torch.float32
U32 = 2.0**-24  # float32 unit roundoff
K = 8  # roundings along one generated expression (module docstring)


def modules(example, params):
    """The example in float32 and float64. A float32 module holds its parameters as float32 numbers, so a
    parameter below float32's normal range (|p| < 1.2e-38, possible for a parameter declared real) is
    outside what float32 can represent and is not drawn."""
    assume(all(p == 0 or abs(p) >= torch.finfo(F32).tiny for p in params.values()))
    return example.build(params, dtype=F32), example.build(params, dtype=F64)


def float32_times(data, sde, lo=None, hi=None, n=64):
    """float32 times in [lo, hi] (default [eps, T]): a log-spaced grid, a uniform grid and Hypothesis-drawn
    times (log-uniform or uniform), rounded to float32 and kept inside [lo, hi]."""
    lo = float(sde.eps) if lo is None else lo
    hi = float(sde.T) if hi is None else hi
    u = data.draw(st.lists(st.tuples(st.booleans(), st.floats(0.0, 1.0)), min_size=1, max_size=8), label="t")
    drawn = [lo * (hi / lo) ** v if log else lo + v * (hi - lo) for log, v in u]
    grid = np.concatenate([np.geomspace(lo, hi, n), np.linspace(lo, hi, n), drawn])
    t = torch.tensor(grid, dtype=F64).to(F32)
    # Rounding to float32 may step just outside [lo, hi]: move such times one float32 step inside.
    t = torch.where(t.double() < lo, torch.nextafter(t, torch.tensor(math.inf)), t)
    t = torch.where(t.double() > hi, torch.nextafter(t, torch.tensor(-math.inf)), t)
    return t


def numeric_term(sde64, t):
    """The numeric path integrates m(s)^-2-weighted integrands by quadrature and multiplies by
    m(t)^2; exp(+-B) with B = -2 log m is computed from an argument of size B, so each carries a relative
    error u B that the closed forms cancel symbolically and the quadrature cannot. Its constants run the
    quadrature up to T as well (Z, the prior). The extra relative term is |2 log m(t)| + |2 log m(T)|."""
    if not sde64.kernel_path.startswith("numeric"):
        return torch.zeros_like(t)
    T = torch.full_like(t, float(sde64.T))
    return (2 * torch.log(sde64.mean_coeff(t))).abs() + (2 * torch.log(sde64.mean_coeff(T))).abs()


def rounding_scale(sde64, method, t):
    """(f(t), |f| (1 + numeric term) + |t f'(t)|) from the float64 module at the float32 times t."""
    f, df = ddt(getattr(sde64, method), t)
    return f, f.abs() * (1 + numeric_term(sde64, t)) + (t * df).abs()


# --- The requirement: float32 std near t = 0 -----------------------------------------------

@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_float32_std_near_zero_within_1e5(examples, name, data):
    """float32 std(t) is within 1e-5 relative of float64 for t in [1e-5, 1e-2] (clipped to [eps, T]): the
    module in float64 and, for VE, VP and sub-VP, score_sde's closed form."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    t32 = float32_times(data, sde64, max(1e-5, float(sde64.eps)), min(1e-2, float(sde64.T)))
    t = t32.double()
    std32 = sde32.std(t32)
    assert std32.dtype == F32
    assert_close(std32, sde64.std(t), sde64.std(t), 1e-5, f"{name} float32 std vs float64", t)
    if name in REFERENCES:
        expected = torch.from_numpy(REFERENCES[name](**params).std(t.numpy()))
        assert_close(std32, expected, expected, 1e-5, f"{name} float32 std vs score_sde", t)


# --- Every time-only method in float32 --------------------------------------------------------------

@pytest.mark.parametrize("method", ["std", "log_snr", "mean_coeff", "mean_offset", "weight", "t_density"])
@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_float32_method_matches_float64(examples, name, method, data):
    """float32 method(t) is finite and within K u (|f| + |t f'|) of float64 on [eps, T]: of the module in
    float64, and for VE, VP and sub-VP of score_sde's closed form (same scale)."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    t32 = float32_times(data, sde64)
    t = t32.double()
    got = getattr(sde32, method)(t32)
    assert got.dtype == F32 and bool(torch.isfinite(got).all()), f"{name}.{method} not finite in float32"
    expected, scale = rounding_scale(sde64, method, t)
    assert_close(got, expected, scale, K * U32, f"{name}.{method} float32 vs float64", t)
    if name in REFERENCES:
        reference = closed_form(name, params, method, t)
        assert_close(got, reference, scale, K * U32, f"{name}.{method} float32 vs score_sde", t)


def closed_form(name, params, method, t):
    """score_sde's value of method at t (float64 NumPy), from test_reference_sdes' references."""
    ref, tn = REFERENCES[name](**params), t.numpy()
    weighting, _ = declared(name)  # t ~ uniform for all three
    eps, T = 1e-5, 1.0
    values = {
        "std": ref.std,
        "log_snr": ref.log_snr,
        "mean_coeff": lambda t: np.exp(ref.log_mean_coeff(t)),
        "mean_offset": np.zeros_like,
        "weight": (lambda t: ref.std(t) ** 2) if weighting == "score_matching" else (lambda t: ref.g(t) ** 2),
        "t_density": lambda t: np.full_like(t, 1 / (T - eps)),
        "t_cdf": lambda t: (t - eps) / (T - eps),
    }
    return torch.from_numpy(values[method](tn))


def log_snr_ends(sde64):
    ends = sde64.log_snr(torch.tensor([float(sde64.eps), float(sde64.T)], dtype=F64))
    return float(ends[0]), float(ends[1])


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_float32_t_cdf_matches_float64(examples, name, data):
    """float32 t_cdf(t) is within K u of the size of the terms it is a difference of: uniform,
    Q = (t - eps) / (T - eps), terms of size (t + eps) / (T - eps); importance (likelihood),
    Q = (logSNR(eps) - logSNR(t)) / Z, terms of size (|logSNR(eps)| + |logSNR(t)|) / Z (times the numeric
    term on the numeric path); plus |t Q'| for the rounding of t-dependent intermediates."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    t32 = float32_times(data, sde64)
    t = t32.double()
    got = sde32.t_cdf(t32)
    assert bool(torch.isfinite(got).all())
    expected, dQ = ddt(sde64.t_cdf, t)
    eps, T = float(sde64.eps), float(sde64.T)
    if sde64.t_sampling == "uniform":
        terms = (t + eps) / (T - eps)
    else:
        lo, hi = log_snr_ends(sde64)
        terms = (abs(lo) + sde64.log_snr(t).abs()) / (lo - hi) * (1 + numeric_term(sde64, t))
    scale = terms + (t * dQ).abs()
    assert_close(got, expected, scale, K * U32, f"{name}.t_cdf float32 vs float64", t)
    if name in REFERENCES:
        reference = closed_form(name, params, "t_cdf", t)
        assert_close(got, reference, scale, K * U32, f"{name}.t_cdf float32 vs score_sde", t)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data(), u=st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=8))
def test_float32_t_icdf_matches_float64(examples, name, data, u):
    """float32 t_icdf(u) is within K u32 of the size of what it is computed from. Uniform:
    t = eps + u (T - eps), terms of size t. Importance (likelihood): t = logSNR^-1(lo - u Z), lo = logSNR(eps),
    Z = lo - hi; the numeric inverse forms y = lo - u Z, which carries the rounding of terms of size |lo| + u Z
    (and of logSNR(t) itself) and moves t by that over |logSNR'(t)| = Z q(t). The closed forms take the drop
    u Z itself (tests/test_float32_families.py holds them to 1e-5 relative of mpmath) and stay within the same."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    u32 = torch.cat([torch.tensor(u, dtype=F32), torch.linspace(0, 1, 21, dtype=F32)])
    u64 = u32.double()
    got = sde32.t_icdf(u32)
    assert got.dtype == F32 and bool(torch.isfinite(got).all())
    expected = sde64.t_icdf(u64)
    scale = expected.clone()
    if sde64.t_sampling == "importance":
        lo, hi = log_snr_ends(sde64)
        y_terms = abs(lo) + u64 * (lo - hi) + sde64.log_snr(expected).abs() * (1 + numeric_term(sde64, expected))
        scale = scale + y_terms / ((lo - hi) * sde64.t_density(expected))
    assert_close(got, expected, scale, K * U32, f"{name}.t_icdf float32 vs float64", u64)


# --- Discretisation -----------------------------------------------------------------------------------

def step_tolerance(sde64, t):
    """(G, relative tolerance / (K u)) for discretize's G at the float64 module, from its conditioning in
    (t, s): G^2 = v(t) - r^2 v(s), dG^2/dt = 2 a(t) G^2 + g(t)^2, dG^2/ds = -r^2 g(s)^2, so
    kappa_t = t |2 a G^2 + g^2| / (2 G^2), kappa_s = s r^2 g(s)^2 / (2 G^2); both ~ s / (2 T/N) for small
    steps. s = fl(t - T/N) is itself rounded in float32, which is a relative perturbation of s: kappa_s
    covers it. G is a standard deviation, so its accuracy is relative (like std's)."""
    s = torch.clamp(t - sde64.T / sde64.N, min=0.0)
    _, G = sde64.discretize(torch.zeros(t.shape[0], 1, dtype=F64), t)
    G2 = G**2
    a, _, g_t = coefficients(sde64, t)
    _, _, g_s = coefficients(sde64, s)
    r2 = (sde64.mean_coeff(t) / sde64.mean_coeff(s)) ** 2
    kappa_t = t * (2 * a * G2 + g_t**2).abs() / (2 * G2)
    kappa_s = s * r2 * g_s**2 / (2 * G2)
    return G, 1 + kappa_t + kappa_s + numeric_term(sde64, t)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_float32_discretize_noise_matches_float64(examples, name, data):
    """float32 discretize G is finite and within K u (1 + kappa_t + kappa_s) relative of float64 (the module;
    for VE, VP and sub-VP also score_sde's exact transition)."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    t32 = float32_times(data, sde64)
    t = t32.double()
    _, G32 = sde32.discretize(torch.zeros(t.shape[0], 2, dtype=F32), t32)
    assert G32.dtype == F32 and bool(torch.isfinite(G32).all())
    G, rel = step_tolerance(sde64, t)
    assert_close(G32, G, G * rel, K * U32, f"{name} step G float32 vs float64", t)
    if name in REFERENCES:
        ref = REFERENCES[name](**params)
        s = torch.clamp(t - sde64.T / sde64.N, min=0.0)
        expected = torch.from_numpy(np.sqrt(ref.step_variance(t.numpy(), s.numpy())))
        assert_close(G32, expected, expected * rel, K * U32, f"{name} step G float32 vs score_sde", t)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
def test_float32_discretize_drift_matches_float64(examples, name, data):
    """float32 discretize f = (r - 1) x + c(t) - r c(s) is within K u of the size of its terms
    |r x| + |x| + |c(t)| + |r c(s)| (f only enters the step through x_s + f), plus |t f'|-style rounding of r."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = modules(example, params)
    t32 = float32_times(data, sde64)
    t = t32.double()
    x = torch.linspace(-3, 3, t.shape[0], dtype=F64)[:, None]
    f32, _ = sde32.discretize(x.to(F32), t32)
    f, _ = sde64.discretize(x, t)
    s = torch.clamp(t - sde64.T / sde64.N, min=0.0)
    r = sde64.mean_coeff(t) / sde64.mean_coeff(s)
    c_t, c_s = sde64.mean_offset(t), sde64.mean_offset(s)
    _, dm = ddt(sde64.mean_coeff, t)
    _, dc = ddt(sde64.mean_offset, t)
    terms = ((r.abs() + 1 + (t * dm / sde64.mean_coeff(s)).abs()) * x[:, 0].abs()
             + c_t.abs() + (r * c_s).abs() + (t * dc).abs())
    terms = terms * (1 + numeric_term(sde64, t))
    assert_close(f32[:, 0], f[:, 0], terms, K * U32, f"{name} step f float32 vs float64", t)


# --- No NaN or inf anywhere on [eps, T] ------------------------------------------------------------

def _score(x, t):
    return -x / (1 + t.reshape(-1, *([1] * (x.dim() - 1))))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", ALL)
def test_every_method_is_finite_on_interval(examples, name, dtype):
    """Every method returns finite values of the module's dtype at 400 times covering [eps, T] (log- and
    uniformly spaced, both ends included, as rounded to dtype), for u in [0, 1], and for prior draws."""
    sde = examples[name].build(dtype=dtype)
    eps, T = float(sde.eps), float(sde.T)
    t = torch.tensor(np.unique(np.concatenate([np.geomspace(eps, T, 200), np.linspace(eps, T, 200)])),
                     dtype=dtype)
    x = torch.randn(t.shape[0], 2, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    u = torch.linspace(0, 1, 101, dtype=dtype)
    z = sde.prior_sampling((64, 2, 3), generator=torch.Generator().manual_seed(1))
    outputs = {
        "sde": sde.sde(x, t), "diffusion": sde.diffusion(t), "marginal_prob": sde.marginal_prob(x, t),
        "mean_coeff": sde.mean_coeff(t), "mean_offset": sde.mean_offset(t), "std": sde.std(t),
        "log_snr": sde.log_snr(t), "weight": sde.weight(t), "t_density": sde.t_density(t),
        "t_cdf": sde.t_cdf(t), "t_icdf": sde.t_icdf(u),
        "sample_t": sde.sample_t(100, generator=torch.Generator().manual_seed(2)),
        "drift_divergence": sde.drift_divergence(x, t), "discretize": sde.discretize(x, t),
        "prior_sampling": z, "prior_logp": sde.prior_logp(z),
        "reverse.sde": sde.reverse(_score).sde(x, t),
        "reverse.discretize": sde.reverse(_score).discretize(x, t),
        "flow.sde": sde.reverse(_score, probability_flow=True).sde(x, t),
        "flow.discretize": sde.reverse(_score, probability_flow=True).discretize(x, t),
    }
    for what, value in outputs.items():
        for v in value if isinstance(value, tuple) else (value,):
            assert v.dtype == dtype, f"{name}.{what} returned {v.dtype} for a {dtype} module"
            bad = ~torch.isfinite(v)
            assert not bad.any(), f"{name}.{what} is not finite in {dtype} ({int(bad.sum())} entries)"
    assert bool(((outputs["sample_t"] >= t[0]) & (outputs["sample_t"] <= t[-1])).all())


@pytest.mark.parametrize("name", ALL)
def test_float32_discretize_step_keeps_its_digits_near_eps(examples, name):
    """f = (r - 1) x over a step [s, t], both float32 numbers given to both modules, within K u of f itself
    (relative, not of |r x| + |x|): r - 1 is computed as expm1(A(t) - A(s)) (or a product of sines), never as r
    minus 1, which kept only the digits of r that differ from 1 (VP: 4.7e-2 of f at t = eps). OU's offset is
    switched off (mu = 0) so that f is the growth term alone. Scale as in the module docstring: |f| (with the
    numeric path's quadrature term) + |t df/dt| + |s df/ds| (cosine_vp near T)."""
    example = examples[name]
    params = {"mu": 0.0} if name == "ou" else {}
    sde32, sde64 = example.build(params, dtype=F32), example.build(params, dtype=F64)
    lo, hi = float(sde64.eps), float(sde64.T)
    t32 = torch.tensor(np.geomspace(lo, hi, 97), dtype=F64).to(F32).clamp(min=lo)
    for s32 in (torch.clamp(t32 - hi / sde64.N, min=0.0), t32 * 0.999, t32 / 2):
        x = torch.linspace(0.5, 3, t32.shape[0], dtype=F64)[:, None]
        f32, _ = sde32.discretize(x.to(F32), t32, s32)
        t, s = t32.double().requires_grad_(True), s32.double().requires_grad_(True)
        f = sde64.discretize(x, t, s)[0][:, 0]
        df_dt, df_ds = (torch.autograd.grad(f.sum(), (t, s), allow_unused=True, materialize_grads=True)
                        if f.requires_grad else (torch.zeros_like(t), torch.zeros_like(s)))   # VE: f = 0
        f, t, s = f.detach(), t.detach(), s.detach()
        scale = f.abs() * (1 + numeric_term(sde64, t)) + (t * df_dt).abs() + (s * df_ds).abs()
        assert_close(f32[:, 0], f, scale, K * U32, f"{name} step f float32 vs float64", t)
