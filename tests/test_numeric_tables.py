"""The numeric tables (derive/tables.py, templates/_tables.j2) on SDEs that are hard for them.

Each program below is compiled from text and its module compared with references written here by hand
(closed forms, or SciPy's DOP853 at rtol 1e-12 and QUADPACK on the coefficients as typed below), never
with the module's own code: float64 within 1e-7 relative (the bound the module states) on [eps, T],
inverse CDFs without NaN or inf for every u in [0, 1] in float32 and float64.

- POLE: m = 1 - t, v = t^2 written as an SDE, a(t) = -1/(1 - t), g^2 = 2t/(1 - t), on [1e-3, 0.999]:
  a pole just past T, logSNR = 0 inside (where a formula for the inverse has 0/0). Its integrals are
  elementary (the compiler finds closed forms); POLE_TABLES, a = -e^t / (1 - t), has the same pole and
  an exponential-integral m, so everything there is a table.
- OSCILLATING: beta = 1 + b1 sin(w t)^2 on [1e-5, 3], w = 30 by default (Hypothesis varies w and b1),
  g^2 = beta (1 + t), so that v = m^2 int beta (1 + s) e^B ds has no closed form.
- NONELEMENTARY: a = -sqrt(1 + t^3) (an elliptic integral), b = k: m, c and v are all tables; v0 = init,
  0 by default.
- CUSTOM: VP with lambda / v = exp(sin(5 t)): the importance CDF and its inverse are tables.
"""
from __future__ import annotations

import importlib
import math
import warnings

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.codegen.cfunctions import expm1

import sdelang
from conftest import import_code
from sdelang import verify
from sdelang.compiler import accuracy, codegen
from sdelang.compiler.derive.kernel import log_of_positive

emit_module = importlib.import_module("sdelang.compiler.codegen.emit")  # the module, not its emit()

F64, F32 = torch.float64, torch.float32
BOUND = 1e-7  # what the modules state; the tables reach ~1e-10, the references ~1e-11

POLE = """\
sde pole
dx = -1/(1 - t) * x dt + sqrt(2 * t / (1 - t)) dw
t in [1e-3, 0.999]
prior kernel
weighting likelihood
t ~ importance
"""
POLE_TABLES = """\
sde pole_tables
dx = -exp(t) / (1 - t) * x dt + sqrt(2 * t / (1 - t)) dw
t in [1e-3, 0.999]
prior kernel
weighting likelihood
t ~ importance
"""
OSCILLATING = """\
sde oscillating
param w = 30
param b1: real = 1
beta(t) = 1 + b1 * sin(w * t)^2
dx = -1/2 * beta(t) * x dt + sqrt(beta(t) * (1 + t)) dw
t in [1e-5, 3]
prior kernel
weighting likelihood
t ~ importance
"""
NONELEMENTARY = """\
sde nonelementary
param k = 1
param init = 0
dx = (-sqrt(1 + t^3) * x + k) dt + 1 dw
v0 = init
t in [1e-4, 2]
prior kernel
weighting likelihood
t ~ importance
"""
CUSTOM = """\
sde custom_weight
param beta_min = 0.1
param beta_max = 20
beta(t) = beta_min + t * (beta_max - beta_min)
B(t) = beta_min * t + (beta_max - beta_min) * t^2 / 2
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
weighting -expm1(-B(t)) * exp(sin(5 * t))
t ~ importance
"""
# A cosine logSNR with a weighting whose importance CDF has no closed form: the SDE's coefficients are inf * 0 at t = 0,
# where the compile-time reference starts (it once failed there, leaving the tables unchecked, with numpy warnings).
COSINE_TABLES = """\
sde cosine_tables
L(t) = -2 * log(tan(pi * t / 2))
logsnr(t) = L(t)
t in [1e-4, 0.999]
weighting sigmoid(1 - L(t))
t ~ importance
"""
# Noise that starts at 0 (g(0) = 0) on a start of variance v0 > 0: logSNR is flat near eps (v - v0 ~ t^2), so the
# inverse CDF t(u) ~ sqrt(eps^2 + c u) turns within u ~ 1e-11 of 0, below what the logSNR table resolves. Its
# inverse table once halved there to 4000 pieces and the module refused to build.
FLAT_START = """\
sde flat_start
param init = 0.25
dx = sqrt(2 * t + t^2 * exp(t)) dw
v0 = init
t in [1e-5, 2]
weighting likelihood
t ~ importance
"""
# A state that grows: v ~ e^{2A} with A = k (3 t - sin(6 t) / 12) / 2, which no closed form reaches.
GROWING = """
sde growing
param k: real = 12
dx = k * (1 + sin(3 * t)^2) * x dt + dw
"""

# A family of growing states for Hypothesis: rate, frequency, noise slope, start variance and drift offset all vary
# at construction (the tables, tail included, are built there).
GROWING_FAMILY = """\
sde growing_family
param k = 8
param w = 3
param c = 1
param b: real = 0.5
param init = 0.25
dx = (k * (1 + sin(w * t)^2) * x + b) dt + sqrt(1 + c * t) dw
v0 = init
t in [1e-4, 1]
"""

# A VP whose beta is a sigmoid rising to 2000 at t = 1/2: no closed form of A = -B/2 is accurate in float32 (a
# difference of large logs near t = 0), and the head integral's factor e^{B} reaches e^{1000}, past float64. The
# tables could not be built ("a singularity inside [eps, T]?"); now v = -expm1(2A) with A from a table.
STEEP_SIGMOID = """\
sde steep_sigmoid
param beta_min = 0.1
param beta_max = 2000
param k = 100
beta(t) = beta_min + (beta_max - beta_min) / (1 + exp(-k * (t - 0.5)))
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
"""

# q ~ exp(k t^3) (weighting t e^(k t^3) over v = t): for k = 60 the CDF stays within 1e-13 of 0 up to t = 0.78, for
# k = -60 within 2e-12 of 1 past t = 0.74, below what the inverse table resolves; the table's t_icdf(0) was 0.78 and
# its t_icdf(1) 0.74.
FLAT_ENDS = """\
sde flat_ends
param k: real = 60
dx = 1 dw
t in [1e-5, 1]
weighting t * exp(k * t^3)
t ~ importance
"""
PROGRAMS = {"growing": GROWING, "pole": POLE, "pole_tables": POLE_TABLES, "oscillating": OSCILLATING,
            "nonelementary": NONELEMENTARY, "custom": CUSTOM, "cosine_tables": COSINE_TABLES, "flat_start": FLAT_START,
            "flat_ends": FLAT_ENDS, "steep_sigmoid": STEEP_SIGMOID, "growing_family": GROWING_FAMILY}
TABULATED = ["pole_tables", "oscillating", "nonelementary", "custom", "cosine_tables", "flat_start", "growing",
             "steep_sigmoid"]


@pytest.fixture(scope="module")
def compiled():
    """name -> Compiled, each program compiled once (a few seconds each: SymPy's integrals time out)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = sdelang.compile_source(sdelang.Source(PROGRAMS[name], f"{name}.sde"))
        return cache[name]
    return get


def module(compiled, name):
    return import_code(compiled(name).code, f"sdelang_test_tables_{name}")


def times(eps, T, n=300, seed=0):
    """Log-spaced and uniform times in [eps, T] (not the tables' nodes), ends included."""
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([np.geomspace(eps, T, n // 2), rng.uniform(eps, T, n // 2), [eps, T]]))


def relative(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    err = np.abs(got - want) / np.abs(want)
    return float(np.max(np.where(np.isnan(err), np.inf, err)))


def moments(a, b, g2, ts, v0=0.0):
    """m, c, v and the scale of c's terms from A' = a, I' = g2 e^-2A, J' = b e^-A, W' = |b| e^-A (DOP853,
    rtol 1e-12: ~1e-11 relative)."""
    def rhs(t, y):
        A = y[0]
        return [a(t), g2(t) * math.exp(-2 * A), b(t) * math.exp(-A), abs(b(t)) * math.exp(-A)]

    sol = scipy.integrate.solve_ivp(rhs, (0.0, ts[-1]), [0.0] * 4, method="DOP853", t_eval=ts,
                                    rtol=1e-12, atol=1e-40)
    assert sol.success, sol.message
    A, I, J, W = sol.y
    m = np.exp(A)
    return m, m * J, m**2 * (v0 + I), m * W


# --- A pole just past T: exact references ------------------------------------------------------------

def test_pole_matches_its_closed_forms(compiled):
    """m = 1 - t, sigma = t, logSNR = 2 log((1 - t) / t), Q^-1(u) = 1 / (1 + exp(y(u) / 2)) in float64 to
    1e-7 relative on [1e-3, 0.999], including the u where logSNR = 0 (t = 1/2)."""
    sde = module(compiled, "pole").SDE().double()
    eps, T = 1e-3, 0.999
    ts = times(eps, T)
    t = torch.tensor(ts, dtype=F64)
    assert relative(sde.mean_coeff(t), 1 - ts) <= BOUND
    assert relative(sde.std(t), ts) <= BOUND
    lsnr = 2 * np.log((1 - ts) / ts)
    assert np.max(np.abs(sde.log_snr(t).numpy() - lsnr) / np.maximum(np.abs(lsnr), 1)) <= BOUND
    lo, hi = 2 * math.log((1 - eps) / eps), 2 * math.log((1 - T) / T)
    u = np.concatenate([np.linspace(0, 1, 1001), [lo / (lo - hi)]])  # the last: logSNR = 0
    want = 1 / (1 + np.exp((lo - u * (lo - hi)) / 2))
    got = sde.t_icdf(torch.tensor(u, dtype=F64)).numpy()
    assert relative(got, want) <= BOUND
    assert relative(sde.t_cdf(torch.tensor(want[1:-2], dtype=F64)), u[1:-2]) <= BOUND


@pytest.mark.parametrize("name", ["pole", "pole_tables", "oscillating", "custom"])
def test_inverse_cdf_is_finite_for_every_u(compiled, name):
    """t_icdf on 10001 u in [0, 1] (0 and 1 exactly) and sample_t, in float32 and float64: finite, within
    [eps, T], nondecreasing in u."""
    for dtype in (F32, F64):
        sde = module(compiled, name).SDE().to(dtype)
        u = torch.linspace(0, 1, 10001, dtype=dtype)
        t = sde.t_icdf(u)
        assert t.dtype == dtype and bool(torch.isfinite(t).all())
        assert bool(((t >= sde.eps) & (t <= sde.T)).all())
        assert bool((t[1:] >= t[:-1]).all())
        assert bool(torch.isfinite(sde.sample_t(4096, generator=torch.Generator().manual_seed(0))).all())


def test_pole_in_tables_matches_the_moment_odes(compiled):
    """a = -e^t / (1 - t), g^2 = 2t / (1 - t) on [1e-3, 0.999]: m and std within 1e-7 of DOP853, and
    Q(t_icdf(u)) = u within 1e-7 relative in t, with Q from the same solution (uniform in logSNR)."""
    mod = module(compiled, "pole_tables")
    assert mod.SDE.kernel_path == "numeric (piecewise Chebyshev tables)"
    sde = mod.SDE().double()
    eps, T = 1e-3, 0.999
    a, g2 = (lambda s: -math.exp(s) / (1 - s)), (lambda s: 2 * s / (1 - s))
    ts = times(eps, T)
    m, _, v, _ = moments(a, lambda s: 0.0, g2, ts)
    t = torch.tensor(ts, dtype=F64)
    assert relative(sde.mean_coeff(t), m) <= BOUND
    assert relative(sde.std(t), np.sqrt(v)) <= BOUND
    u = np.linspace(0, 1, 201)[1:-1]
    got = sde.t_icdf(torch.tensor(u, dtype=F64)).numpy()
    grid = np.unique(np.concatenate([[eps, T], got]))
    m, _, v, _ = moments(a, lambda s: 0.0, g2, grid)
    lsnr = np.log(m**2 / v)
    Q = (lsnr[0] - lsnr) / (lsnr[0] - lsnr[-1])
    q = np.array([g2(s) for s in grid]) / v / (lsnr[0] - lsnr[-1])
    where = np.searchsorted(grid, got)
    assert np.max(np.abs(Q[where] - u) / (q[where] * got)) <= BOUND


def test_pole_float32_std_near_eps(compiled):
    """float32 std = t to 1e-5 relative on [1e-3, 0.999] (the closed form SymPy found for v lost 2e-2)."""
    sde = module(compiled, "pole").SDE().float()
    ts = times(1e-3, 0.999)
    got = sde.std(torch.tensor(ts, dtype=F32)).double().numpy()
    assert relative(got, ts.astype(np.float32).astype(np.float64)) <= 1e-5


# --- Oscillating and non-elementary schedules against DOP853 -----------------------------------------

def oscillating_reference(w, b1, ts):
    beta = lambda s: 1 + b1 * math.sin(w * s) ** 2  # noqa: E731
    m, _, v, _ = moments(lambda s: -beta(s) / 2, lambda s: 0.0, lambda s: beta(s) * (1 + s), ts)
    return m, v


def check_oscillating(mod, w, b1):
    sde = mod.SDE(w=w, b1=b1).double()
    ts = times(1e-5, 3.0, n=200, seed=int(w * 1000) % 97)
    m, v = oscillating_reference(w, b1, ts)
    t = torch.tensor(ts, dtype=F64)
    assert relative(sde.mean_coeff(t), m) <= BOUND
    assert relative(sde.std(t), np.sqrt(v)) <= BOUND
    lsnr = np.log(m**2 / v)
    assert np.max(np.abs(sde.log_snr(t).numpy() - lsnr) / np.maximum(np.abs(lsnr), 1)) <= BOUND


def test_oscillating_schedule_matches_the_moment_odes(compiled):
    """beta = 1 + sin(30 t)^2 on [1e-5, 3] (a fixed 48-point rule was 1.3e-3 off at t = 3 on such a
    schedule): m, std and logSNR within 1e-7 of DOP853."""
    mod = module(compiled, "oscillating")
    assert mod.SDE.kernel_path == "numeric (piecewise Chebyshev tables)"
    check_oscillating(mod, 30.0, 1.0)


@settings(max_examples=6)
@given(w=st.floats(1.0, 60.0), b1=st.floats(0.0, 4.0))
def test_oscillating_schedules_at_other_parameters(compiled, w, b1):
    """The tables are built at construction: any frequency w and amplitude b1 stays within 1e-7."""
    check_oscillating(module(compiled, "oscillating"), w, b1)


def test_nonelementary_kernel_matches_the_moment_odes(compiled):
    """a = -sqrt(1 + t^3), b = k = 1.7, g = 1 on [1e-4, 2]: m, c (relative to the size of its terms) and std
    within 1e-7 of DOP853; all three are tables."""
    mod = module(compiled, "nonelementary")
    assert mod.SDE.kernel_path == "numeric (piecewise Chebyshev tables)"
    sde = mod.SDE(k=1.7).double()
    ts = times(1e-4, 2.0)
    m, c, v, scale = moments(lambda s: -math.sqrt(1 + s**3), lambda s: 1.7, lambda s: 1.0, ts)
    t = torch.tensor(ts, dtype=F64)
    assert relative(sde.mean_coeff(t), m) <= BOUND
    assert np.max(np.abs(sde.mean_offset(t).numpy() - c) / scale) <= BOUND
    assert relative(sde.std(t), np.sqrt(v)) <= BOUND


ABS_SCHEDULE = """\
sde abs_schedule
param c = 0.4
beta(t) = 1 + 10 * abs(t - c)
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
"""


def test_a_variance_written_with_a_minus_sign_tabulates_a_real_log():
    """VP with beta = 1 + 10 |t - c|, c a parameter: m is a table, and v = -expm1(2 log m). Its log v column is
    log(-expm1(...)), not log(-1) + log(expm1(...)) = I pi + ..., a complex column the module could not build.
    The module's std within 1e-7 of DOP853 on v' = 2 a v + g^2, at the default c and another."""
    t = sympy.Symbol("t", positive=True)
    A = sympy.Integral(-sympy.Abs(t - sympy.Symbol("s")) - sympy.Rational(1, 2), (sympy.Symbol("s"), 0, t))
    assert not log_of_positive(-expm1(2 * A)).has(sympy.I)
    assert log_of_positive(sympy.exp(2 * A) * expm1(-2 * A)) == 2 * A + sympy.log(expm1(-2 * A))
    mod = import_code(sdelang.compile_source(sdelang.Source(ABS_SCHEDULE, "abs_schedule.sde")).code, "abs_schedule")
    ts = times(1e-5, 1.0)
    for c in (0.4, 0.7):
        beta = lambda s: 1 + 10 * abs(s - c)  # noqa: E731
        _, _, v, _ = moments(lambda s: -beta(s) / 2, lambda s: 0.0, beta, ts)
        assert relative(mod.SDE(c=c).double().std(torch.tensor(ts, dtype=F64)), np.sqrt(v)) <= BOUND


# --- A custom weighting whose importance CDF has no closed form --------------------------------------

def test_custom_importance_cdf_and_inverse(compiled):
    """q proportional to exp(sin(5 t)) on [1e-5, 1]: t_cdf against QUADPACK, t_icdf against brentq on that
    CDF, both within 1e-7 (the CDF absolutely, t relatively); t_density integrates to 1."""
    mod = module(compiled, "custom")
    assert mod.SDE.inverse_cdf_path == "numeric (piecewise Chebyshev table)"
    sde = mod.SDE().double()
    eps, T = float(sde.eps), float(sde.T)
    f = lambda s: math.exp(math.sin(5 * s))  # noqa: E731
    Z = scipy.integrate.quad(f, eps, T, epsabs=0, epsrel=1e-13)[0]
    cdf = lambda s: scipy.integrate.quad(f, eps, s, epsabs=0, epsrel=1e-13)[0] / Z  # noqa: E731
    ts = times(eps, T, n=60)
    got = sde.t_cdf(torch.tensor(ts, dtype=F64)).numpy()
    assert np.max(np.abs(got - [cdf(s) for s in ts])) <= BOUND
    u = np.linspace(0, 1, 41)
    want = [eps, *(scipy.optimize.brentq(lambda s: cdf(s) - x, eps, T, xtol=1e-15, rtol=1e-14) for x in u[1:-1]), T]
    assert relative(sde.t_icdf(torch.tensor(u, dtype=F64)), want) <= BOUND
    total = scipy.integrate.quad(lambda s: float(sde.t_density(torch.tensor([s], dtype=F64))), eps, T,
                                 epsabs=0, epsrel=1e-12, limit=200)[0]
    assert abs(total - 1) <= 1e-9


def test_inverse_cdf_where_the_cdf_starts_flat(compiled):
    """FLAT_START: v(t) = init + t^2 + e^t (t^2 - 2t + 2) - 2 exactly, so Q(t) = log(v(t) / v(eps)) / log(v(T) / v(eps))
    and its inverse are computed here with mpmath at 40 digits. The module builds; at u down to 1e-14,
    Q(t_icdf(u)) is within 1e-14 of u (the float64 rounding of the logSNR it inverts), and t itself within the
    1e-7 bound where u >= 1e-8 (below, the same rounding is amplified by dt/du ~ t / u: 2e-7 measured at 1e-10)."""
    mod = module(compiled, "flat_start")
    assert mod.SDE.inverse_cdf_path == "numeric (piecewise Chebyshev table)"
    sde = mod.SDE().double()
    with mpmath.workdps(40):
        v = lambda s: mpmath.mpf("0.25") + s**2 + mpmath.exp(s) * (s**2 - 2 * s + 2) - 2  # noqa: E731
        eps, T = mpmath.mpf(float(sde.eps)), mpmath.mpf(float(sde.T))
        Q = lambda s: mpmath.log(v(s) / v(eps)) / mpmath.log(v(T) / v(eps))  # noqa: E731
        us = [0.0, 1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 0.01, 0.3, 0.7, 0.99, 1.0]
        got = sde.t_icdf(torch.tensor(us, dtype=F64)).tolist()
        for u, t in zip(us, got):
            assert abs(Q(mpmath.mpf(t)) - u) <= 1e-14, (u, t)
            want = mpmath.findroot(lambda s: Q(s) - u, (eps, T), solver="anderson") if 0 < u < 1 else (eps if u == 0 else T)
            if u == 0 or u >= 1e-8:
                assert abs(t / want - 1) <= BOUND, (u, t, want)


@pytest.mark.parametrize("k", [60.0, -60.0])
def test_inverse_cdf_ends_where_the_cdf_is_flat(compiled, k):
    """FLAT_ENDS: t_icdf(0) = eps and t_icdf(1) = T exactly, in float64 and float32, though the CDF is flat to the
    table's resolution over a quarter or more of [eps, T] at one end; nondecreasing and finite on 100001 u with Q(t_icdf(u))
    within 1e-10 of u; and `sdelang check`'s rows on the time sampler pass."""
    mod = module(compiled, "flat_ends")
    assert mod.SDE.inverse_cdf_path == "numeric (piecewise Chebyshev table)"
    sde = mod.SDE(k=k).double()
    u = torch.linspace(0, 1, 100001, dtype=F64)
    t = sde.t_icdf(u)
    assert bool(torch.isfinite(t).all()) and bool((t[1:] >= t[:-1]).all())
    assert float((sde.t_cdf(t) - u).abs().max()) <= 1e-10
    rows = verify.time_sampler(sde, verify.Settings(paths=4096))
    assert [r for r in rows if r.status != verify.OK] == [], verify.format_table(rows)
    for dtype in (F64, F32):
        ends = sde.to(dtype).t_icdf(torch.tensor([0.0, 1.0], dtype=dtype))
        assert ends.tolist() == torch.tensor([sde.eps, sde.T], dtype=dtype).tolist()


# --- What the compiler says ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TABULATED)
def test_the_module_states_its_checked_error(compiled, name):
    """Each module's docstring states the method and the error the compile-time check measured, within the
    bound; the compile gives no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no numpy RuntimeWarning escapes the compile either
        c = compiled(name)
    assert c.warnings == ()
    doc = import_code(c.code, f"sdelang_test_doc_{name}").__doc__
    assert "piecewise Chebyshev" in doc and "Checked at compile time" in doc and "within the bound 1e-07" in doc


@pytest.mark.parametrize("k", [12.0, 4.0, -12.0])
def test_a_growing_state_gets_its_step_noise(compiled, k):
    """discretize's G^2 read from the head of the tables, v(t) - r^2 v(s), cancels where v barely moves in relative
    terms over a step: for a state that grows (v ~ e^{2A}, e^{33} at T for k = 12) G was 0 at the default step
    instead of 0.0318. From the tail W(t) = m^2 int_t^T g^2 / m^2 it is r^2 W(s) - W(t), which the module takes
    where it is the smaller. G against the step's own variance (w' = 2 a w + g^2 from w(s) = 0, SciPy's DOP853 at
    rtol 1e-12, by hand here) within the modules' bound 1e-7, over steps of 1e-3, 1e-2, 0.3 and 1e-5, near 0, 1/2
    and T; k = -12 (a decaying state, no tail) as well."""
    sde = module(compiled, "growing").SDE(k=k).double()
    a = lambda u: k * (1 + math.sin(3 * u) ** 2)  # noqa: E731

    def w(s, t):
        with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
            sol = scipy.integrate.solve_ivp(lambda u, y: [2 * a(u) * y[0] + 1], (s, t), [0.0], method="DOP853",
                                            rtol=1e-12, atol=1e-300)
        return sol.y[0, -1]

    steps = [(0.999, 1.0), (0.99, 1.0), (0.5, 0.501), (1e-9, 1e-3), (1e-5, 2e-5), (0.3, 0.6), (0.7, 0.70001)]
    s, t = (torch.tensor(column, dtype=F64) for column in zip(*steps))
    _, G = sde.discretize(torch.zeros(len(steps), 1, dtype=F64), t, s)
    want = np.sqrt([w(*step) for step in steps])
    assert relative(G.reshape(-1).numpy(), want) <= BOUND


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(k=st.floats(1.0, 15.0), w=st.floats(0.5, 20.0), c=st.floats(0.01, 5.0), b=st.floats(-2.0, 2.0),
       init=st.floats(0.01, 4.0))
def test_growing_states_keep_their_moments_and_step_noise(compiled, k, w, c, b, init):
    """Growing states (a = k (1 + sin(w t)^2) > 0, g^2 = 1 + c t, an offset b, v0 > 0) at random parameters: m, c
    (relative to the scale of its terms), std and discretize's G over steps of 1e-3, 1e-2 and 0.3 within the bound
    1e-7 of references by hand (DOP853 at rtol 1e-12 on the moment and step-variance ODEs)."""
    sde = module(compiled, "growing_family").SDE(k=k, w=w, c=c, b=b, init=init).double()
    a = lambda u: k * (1 + math.sin(w * u) ** 2)  # noqa: E731
    g2 = lambda u: 1 + c * u  # noqa: E731
    ts = times(1e-4, 1.0, n=60)
    m, mean, v, scale = moments(a, lambda u: b, g2, ts, v0=init)
    t = torch.tensor(ts, dtype=F64)
    assert relative(sde.mean_coeff(t), m) <= BOUND
    # c passes 0 where b does: relative to the scale of its terms (0 = 0 exactly for b = 0).
    assert np.max(np.abs(sde.mean_offset(t).numpy() - mean) / (np.maximum(np.abs(mean), scale) + 1e-300)) <= BOUND
    assert relative(sde.std(t), np.sqrt(v)) <= BOUND

    def step_variance(lo, hi):
        with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
            sol = scipy.integrate.solve_ivp(lambda u, y: [2 * a(u) * y[0] + g2(u)], (lo, hi), [0.0],
                                            method="DOP853", rtol=1e-12, atol=1e-300)
        return sol.y[0, -1]

    ends = ts[::6]
    steps = [(max(e - h, 0.0), e) for e in ends for h in (1e-3, 1e-2, 0.3) if e - h > 1e-4]
    lo, hi = (torch.tensor(col, dtype=F64) for col in zip(*steps))
    _, G = sde.discretize(torch.zeros(len(steps), 1, dtype=F64), hi, lo)
    assert relative(G.reshape(-1).numpy(), np.sqrt([step_variance(*step) for step in steps])) <= BOUND


def test_tables_at_float32s_T_agree_with_the_closed_form_parts(compiled):
    """float32's T is past T (0.999 -> 0.99900001, what t_icdf(1) and sample_t give in float32): the tables were
    clamped at T while closed-form parts of the same quantity used the time given, so std was 6e-6 off there and a
    step's G ending there 3e-4 (1e-5 step). POLE_TABLES (a = -e^t / (1 - t), tables throughout) at that time in
    float32 against DOP853 on the moment and step-variance ODEs at the same time: within float32's 1e-5."""
    sde = module(compiled, "pole_tables").SDE()
    T32 = sde.t_icdf(torch.tensor([1.0]))
    t_end = float(T32)
    assert t_end > 0.999
    a = lambda u: -math.exp(u) / (1 - u)  # noqa: E731
    g2 = lambda u: 2 * u / (1 - u)  # noqa: E731
    _, _, v, _ = moments(a, lambda u: 0.0, g2, np.array([0.5, t_end]))
    assert abs(float(sde.std(T32)) / math.sqrt(v[-1]) - 1) <= 1e-5
    start = torch.tensor([0.999 - 1e-5])
    with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
        w = scipy.integrate.solve_ivp(lambda u, y: [2 * a(u) * y[0] + g2(u)], (float(start), t_end), [0.0],
                                      method="DOP853", rtol=1e-12, atol=1e-300).y[0, -1]
    _, G = sde.discretize(torch.zeros(1, 1), T32, start)
    assert abs(float(G) / math.sqrt(w) - 1) <= 1e-5


@pytest.mark.parametrize("bmax, k", [(2000.0, 100.0), (1e4, 200.0)])
def test_a_steep_vp_schedule_builds_and_is_right(compiled, bmax, k):
    """STEEP_SIGMOID: m, std, logSNR and G over steps of 1e-3, 1e-5 and 1e-7 against mpmath at 40 digits of the
    closed forms by hand (B = beta_min t + (beta_max - beta_min) (log1p(e^{k (t - 1/2)}) - log1p(e^{-k/2})) / k,
    v = -expm1(-B)), within the modules' bound 1e-7 in float64, at the defaults and at a steeper schedule (G was a
    difference of table values there, 2e-7 off over steps of 1e-7, and r - 1 a difference of logs); float32
    finite."""
    sde = module(compiled, "steep_sigmoid").SDE(beta_max=bmax, k=k).double()
    mp = mpmath.mp.clone()
    mp.dps = 40
    bmin, bmax, k = mp.mpf("0.1"), mp.mpf(bmax), mp.mpf(k)

    def B(x):
        x = mp.mpf(float(x))
        return bmin * x + (bmax - bmin) * (mp.log1p(mp.exp(k * (x - mp.mpf(1) / 2))) - mp.log1p(mp.exp(-k / 2))) / k

    ts = times(1e-5, 1.0, n=120)
    t = torch.tensor(ts, dtype=F64)
    m = np.array([float(mp.exp(-B(x) / 2)) for x in ts])
    normal = m > 1e-300   # e^{-B/2} underflows float64 past t ~ 0.75 for beta_max = 1e4: 0 is all either can say
    assert relative(sde.mean_coeff(t).numpy()[normal], m[normal]) <= BOUND
    assert relative(sde.std(t), [float(mp.sqrt(-mp.expm1(-B(x)))) for x in ts]) <= BOUND
    lsnr = np.array([float(-mp.log(mp.expm1(B(x)))) for x in ts])
    assert np.max(np.abs(sde.log_snr(t).numpy() - lsnr) / np.maximum(np.abs(lsnr), 1)) <= BOUND
    for h in (1e-3, 1e-5, 1e-7):
        s = torch.clamp(t[::4] - h, min=0.0)
        f, G = sde.discretize(torch.ones(len(s), 1, dtype=F64), t[::4], s)
        drops = [B(lo) - B(hi) for lo, hi in zip(s.tolist(), ts[::4])]
        assert relative(G.reshape(-1).numpy(), [float(mp.sqrt(-mp.expm1(d))) for d in drops]) <= BOUND
        assert relative(f.reshape(-1).numpy(), [float(mp.expm1(d / 2)) for d in drops]) <= BOUND   # r - 1
    single = module(compiled, "steep_sigmoid").SDE(beta_max=float(bmax), k=float(k))
    t32 = t.float()
    assert all(torch.isfinite(q).all() for q in (single.std(t32), single.log_snr(t32), single.mean_coeff(t32)))


def test_coarse_tables_are_caught(compiled, monkeypatch):
    """A mutation: tables resolved to 1e-3 with 6 points a piece. The module's own check at construction refuses
    it (its t_icdf misses the inverse of t_cdf by 7e-4), so the compile-time check reports that it could not be
    built (the warning the CLI prints); before that check the compile-time one reported an error above the bound."""
    d = compiled("oscillating").derivation
    monkeypatch.setattr(emit_module, "TABLE_TOLERANCE", 1e-3)
    monkeypatch.setattr(emit_module, "TABLE_DEGREE", 6)
    code = codegen.emit(d)
    report = accuracy.check_tables(d, code)
    assert not report.ok and "t_icdf misses the inverse of t_cdf" in report.warning(), report
    with pytest.raises(ValueError, match="t_icdf misses"):
        check_oscillating(import_code(code, "sdelang_test_tables_coarse"), 30.0, 1.0)


def test_a_table_that_cannot_be_built_is_an_error_not_a_guess(compiled):
    """At parameters where a column is not finite on [eps, T] (here b1 = -2: beta (1 + t) < 0 at times, so
    v goes negative and log v is NaN), construction raises a ValueError that says so."""
    with pytest.raises(ValueError, match="cannot be resolved"):
        module(compiled, "oscillating").SDE(b1=-2.0)


@pytest.mark.parametrize("name", ["oscillating", "pole_tables"])
def test_a_first_step_from_zero_is_the_kernel(compiled, name):
    """A step from s = 0 (the default at t = eps when T/N >= eps), where x_0 is the data: G must be sqrt(v(eps)) and
    f the kernel's (m(eps) - 1) x. The tables reach below eps to 1e-12 eps for this (from 1e-6 eps, G was 5e-7 off)."""
    sde = module(compiled, name).SDE().double()
    t = torch.tensor([float(sde.eps)], dtype=F64)
    x = torch.full((1, 1), 1.5, dtype=F64)
    f, G = sde.discretize(x, t, torch.zeros_like(t))
    assert abs(G.item() / sde.std(t).item() - 1) < 1e-10
    assert abs(f.item() / ((sde.mean_coeff(t).item() - 1) * 1.5) - 1) < 1e-10


@pytest.mark.parametrize("init", [0.25, 25.0])
def test_a_start_variance_keeps_the_step_noise(compiled, init):
    """With v0 > 0 a tabulated v = m^2 (v0 + I(t)) is v0 m^2 and a little near t = 0, and a step's noise read from
    two values of log v cancels: G over a step of 1e-5 of t near eps was 2.2e-8 (v0 = 0.25) and 8.5e-7 (v0 = 25)
    off in float64. From log I's own column, I = int_0^t g^2 / m^2, it keeps its digits whatever v0 (3.3e-11). G
    against the step's own variance (w' = 2 a w + g^2 from w(s) = 0, SciPy's DOP853 at rtol 1e-12, by hand here)
    within the modules' bound 1e-7, at steps of 1e-5, 1e-3 and 0.3 of t near eps, at 1/2 and at T."""
    sde = module(compiled, "nonelementary").SDE(init=init).double()

    def w(s, t):
        with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
            sol = scipy.integrate.solve_ivp(lambda u, y: [-2 * math.sqrt(1 + u**3) * y[0] + 1], (s, t), [0.0],
                                            method="DOP853", rtol=1e-12, atol=1e-300)
        return sol.y[0, -1]

    steps = [(t * (1 - h), t) for t in (1.2e-4, 3e-4, 1e-3, 0.5, 2.0) for h in (1e-5, 1e-3, 0.3)]
    s, t = (torch.tensor(column, dtype=F64) for column in zip(*steps))
    _, G = sde.discretize(torch.zeros(len(steps), 1, dtype=F64), t, s)
    want = np.sqrt([w(a, b) for a, b in zip(s.tolist(), t.tolist())])
    assert relative(G.reshape(-1).numpy(), want) <= BOUND


@pytest.mark.parametrize("rate", [2.0, 500.0])
def test_the_compile_time_reference_at_a_rate_past_float64s_range(rate):
    """The reference that checks the tables, for an OU process dx = -k x dt + sqrt(2 k) dw on [1e-5, 1]: m, std,
    logSNR and the likelihood-weighted Q against their closed forms. At k = 500 the integrating factor e^{kt}
    leaves float64 (e^1000); the solver then shrank its steps until the compile's 60 s CPU limit stopped an
    ordinary program. Now it falls back to the moment equations as they are, within 1e-9 here."""
    import types

    import sympy as sp

    t = sp.Symbol("t", positive=True)
    k = sp.Float(rate)
    d = types.SimpleNamespace(program=types.SimpleNamespace(t=t, weighting="likelihood"), a=-k + 0 * t, b=0 * t,
                              g2=2 * k + 0 * t, weight=2 * k + 0 * t)
    eps, T = 1e-5, 1.0
    ts = np.geomspace(eps, T, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # nothing for the user's terminal either
        ref = accuracy._Reference(d, {}, eps, T, 0.0).solve(ts)
    v = -np.expm1(-2 * rate * ts)
    log_snr = -2 * rate * ts - np.log(v)
    np.testing.assert_allclose(ref["m"], np.exp(-rate * ts), rtol=1e-9, atol=0)
    np.testing.assert_allclose(ref["std"], np.sqrt(v), rtol=1e-9)
    np.testing.assert_allclose(ref["logSNR"], log_snr, rtol=1e-9)
    lo = -2 * rate * eps - np.log(-np.expm1(-2 * rate * eps))
    hi = -2 * rate * T - np.log(-np.expm1(-2 * rate * T))
    np.testing.assert_allclose(ref["Q"], (lo - log_snr) / (lo - hi), rtol=0, atol=1e-9)


def test_uniform_training_times_build_no_importance_table():
    """The same weighting with t ~ uniform: the module never computes the importance CDF, so it has no table to
    build and nothing to check (it once built one at every construction, and the compile warned that its tables
    reached an 'inf' error, having measured nothing)."""
    compiled = sdelang.compile_source(sdelang.Source(CUSTOM.replace("t ~ importance", "t ~ uniform")))
    assert not compiled.derivation.tables
    assert compiled.warnings == ()
    sde = import_code(compiled.code, "custom_uniform").SDE().double()
    t = torch.tensor([1e-5, 0.5, 1.0], dtype=F64)
    assert torch.allclose(sde.t_cdf(t), (t - 1e-5) / (1 - 1e-5), rtol=0, atol=1e-15)
