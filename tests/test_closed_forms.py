"""Closed forms that SDEs written as 'dx = ...' should get, checked against formulas written out by hand.

- A drift with a pole at the end of the interval: the interpolant m = 1 - t, v = t^2 as its SDE,
  a = -1/(1 - t), g^2 = 2t/(1 - t) on [1e-3, 0.999], written directly and through d/dt of its kernel.
  int_0^t -1/(1 - s) ds = log(1 - t) is elementary (SymPy's antiderivative log(s - 1) is complex at 0).
  A power of the pole, m = (1 - t)^p under g^2 = 2 (v = 2 (1 - t - (1 - t)^(2p)) / (2p - 1)) and a Brownian
  bridge (v = sig^2 t (1 - t)) went to the numeric tables: their forms' float32 error was measured at exact times,
  and near the pole float32's rounding of t itself (6e-8 at t = 0.9999, against 1 - t = 1e-4) exceeds 1e-5.
- A geometric beta(t) = beta_min r^t, r = beta_max / beta_min: B = beta_min (r^t - 1) / log r.
- VDM's sigmoid schedule as a VP SDE, beta = d/dt softplus(gamma(t)): m^2 = sigmoid(-gamma) / sigmoid(-gamma(0)),
  v = (e^gamma - e^gamma(0)) / (1 + e^gamma).
- VP with beta = 1 + tanh(4 t): B = t + log(cosh(4 t)) / 4, v = 1 - e^-B. SymPy writes e^-B as a product of powers
  of 1 + tanh(4 t), whose 1 - m^2 cancels; every VP-like noise integral is k d/dt(1/m^2), v = -k expm1(2 A).
- An OU process with that rate and a fixed target mu: c = mu (1 - e^-B) as -mu expm1(-B), m = e^-B, v = 1 - e^-2B.
- The cosine schedule written by its SDE (a tan drift): alpha = cos(u) / cos(u0). Its module once failed to build
  (torch.sqrt(2) and torch.exp of a hoisted constant, numbers SymPy made while constants were hoisted).
- VP with a kink, beta = 1 + 10 |t - c|: B in closed form split at the kink (derive/kinks.py), against scipy's
  quadrature for c before, inside and after [0, 1].

Each must compile to a closed-form kernel, equal to the hand formula in float64 (1e-12 relative: rounding
of a few operations) and within 1e-5 relative in float32 on [eps, T] (the project's float32 bound), with
t_icdf finite for every u in [0, 1].
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import sympy as sp
import torch
from scipy.special import expit

import sdelang
from sdelang.compiler.derive import kinks, symbolic
from sdelang.compiler.derive.symbolic import (common_exponential, integrate_from, is_constant_in,
                                             powers_as_exponentials, powers_minus_one)

INTERPOLANT = "sde interp\ndx = -x / (1 - t) dt + sqrt(2 * t / (1 - t)) dw\nt in [1e-3, 0.999]\nt ~ importance\n"
INTERPOLANT_DDT = """sde interp_ddt
m(t) = 1 - t
v(t) = t^2
a(t) = d/dt(log(m(t)))
dx = a(t) * x dt + sqrt(d/dt(v(t)) - 2 * a(t) * v(t)) dw
t in [1e-3, 0.999]
t ~ importance
"""
GEOMETRIC = """sde geometric
param beta_min = 0.1
param beta_max = 20
beta(t) = beta_min * (beta_max / beta_min)^t
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
"""
SIGMOID = """sde vdm_sde
param gamma_min = -13.3
param gamma_max = 5
gamma(t) = gamma_min + (gamma_max - gamma_min) * t
beta(t) = d/dt(softplus(gamma(t)))
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t ~ importance
"""
TANH = """sde tanh_vp
beta(t) = 1 + tanh(4 * t)
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
"""


def _interpolant(t):
    return 1 - t, t


def _geometric(t, beta_min=0.1, beta_max=20.0):
    B = beta_min * np.expm1(t * np.log(beta_max / beta_min)) / np.log(beta_max / beta_min)
    return np.exp(-B / 2), np.sqrt(-np.expm1(-B))


def _sigmoid(t, gamma_min=-13.3, gamma_max=5.0):
    gamma = gamma_min + (gamma_max - gamma_min) * t
    m = np.sqrt(expit(-gamma) / expit(-gamma_min))
    v = np.exp(gamma_min) * np.expm1((gamma_max - gamma_min) * t) / (1 + np.exp(gamma))  # gamma - gamma(0) exactly
    return m, np.sqrt(v)


def _tanh(t):
    # B = int_0^t 1 + tanh(4 s) ds = t + log(cosh(4 t)) / 4, with log cosh x = x + log1p(expm1(-2 x) / 2).
    B = t + (4 * t + np.log1p(np.expm1(-8 * t) / 2)) / 4
    return np.exp(-B / 2), np.sqrt(-np.expm1(-B))


OU_TANH = """sde ou_tanh
param mu = 0.5
theta(t) = 1 + tanh(4 * t)
dx = theta(t) * (mu - x) dt + sqrt(2 * theta(t)) dw
t in [1e-5, 3]
"""


def _ou_tanh(t, mu=0.5):
    # An OU process whose rate theta = 1 + tanh(4 t) SymPy integrates only by the variable change: with
    # B = int theta, m = e^-B, c = mu (1 - e^-B), v = 1 - e^-2B.
    B = t + (4 * t + np.log1p(np.expm1(-8 * t) / 2)) / 4
    return np.exp(-B), np.sqrt(-np.expm1(-2 * B)), -mu * np.expm1(-B)


COSINE_SDE = """sde cosine_sde
param s = 0.008
beta(t) = pi / (1 + s) * tan(pi / 2 * (t + s) / (1 + s))
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
t in [1e-5, 0.999]
"""


def _cosine_sde(t, s=0.008):
    # iDDPM's cosine schedule by its SDE: alpha = cos(u) / cos(u0), u = pi (t + s) / (2 (1 + s)), and
    # 1 - alpha^2 = sin(u - u0) sin(u + u0) / cos(u0)^2 without cancellation.
    u, u0 = np.pi * (t + s) / (2 * (1 + s)), np.pi * s / (2 * (1 + s))
    return np.cos(u) / np.cos(u0), np.sqrt(np.sin(u - u0) * np.sin(u + u0)) / np.cos(u0)


POWER_POLE = """sde power_pole
param p = 1.5
dx = -p * x / (1 - t) dt + sqrt(2) dw
t in [1e-5, 0.999]
t ~ importance
"""


def _power_pole(t, p=1.5):
    # m = (1 - t)^p, v = m^2 int_0^t 2 (1 - s)^(-2p) ds = 2 ((1 - t) - (1 - t)^(2p)) / (2p - 1), the difference as
    # (1 - t) (1 - (1 - t)^(2p - 1)) with expm1: exact, and without cancellation near t = 0.
    v = -2 * (1 - t) * np.expm1((2 * p - 1) * np.log1p(-t)) / (2 * p - 1)
    return (1 - t) ** p, np.sqrt(v)


BRIDGE = """sde bridge
param sig = 1.5
dx = -x / (1 - t) dt + sig dw
t in [1e-5, 0.9999]
t ~ importance
"""


def _bridge(t, sig=1.5):
    # A Brownian bridge pinned at 0 at t = 1: m = 1 - t, v = sig^2 t (1 - t).
    return 1 - t, sig * np.sqrt(t * (1 - t))


CASES = {"interpolant": (INTERPOLANT, _interpolant), "power_pole": (POWER_POLE, _power_pole),
         "bridge": (BRIDGE, _bridge), "interpolant_ddt": (INTERPOLANT_DDT, _interpolant),
         "geometric": (GEOMETRIC, _geometric), "sigmoid": (SIGMOID, _sigmoid), "tanh": (TANH, _tanh),
         "ou_tanh": (OU_TANH, _ou_tanh), "cosine_sde": (COSINE_SDE, _cosine_sde)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_kernel(name):
    text, reference = CASES[name]
    sde = sdelang.load(text)
    assert sde.kernel_path == "closed form"
    eps, T = float(sde.eps), float(sde.T)
    t = np.unique(np.concatenate([np.geomspace(eps, T, 40), np.linspace(eps, T, 40)]))
    methods = ("mean_coeff", "std", "mean_offset")  # the reference gives m, sigma and, if c != 0, c
    t64 = torch.tensor(t, dtype=torch.float64)
    sde64 = sde.double()
    for name, expected in zip(methods, reference(t)):
        np.testing.assert_allclose(getattr(sde64, name)(t64).numpy(), expected, rtol=1e-12, atol=0, err_msg=name)
    sde32 = copy.deepcopy(sde).float()
    t32 = torch.tensor(t, dtype=torch.float32)
    t_exact = t32.double().numpy()  # the float32 times, exactly: the error is the formula's, not t's rounding
    for name, expected in zip(methods, reference(t_exact)):
        np.testing.assert_allclose(getattr(sde32, name)(t32).double().numpy(), expected, rtol=1e-5, atol=0,
                                   err_msg=name)


@pytest.mark.parametrize("p", [0.25, 0.6, 5.0])
def test_power_of_the_pole_at_other_exponents(p):
    """The power (1 - t)^p's closed form holds for p other than the default, on either side of p = 1/2 (where the
    form divides by 2p - 1 = 0, and the module says so rather than returning NaN)."""
    sde = sdelang.load(POWER_POLE, p=p).double()
    t = np.geomspace(1e-5, 0.999, 60)
    m, std = _power_pole(t, p)
    t64 = torch.tensor(t, dtype=torch.float64)
    np.testing.assert_allclose(sde.mean_coeff(t64).numpy(), m, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sde.std(t64).numpy(), std, rtol=1e-12, atol=0)


def test_power_of_the_pole_where_its_form_divides_by_zero():
    with pytest.raises(ValueError, match=r"2\*p - 1 = 0 at p = 0.5"):
        sdelang.load(POWER_POLE, p=0.5)


@pytest.mark.parametrize("name", ["interpolant", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cdf_is_finite_everywhere(name, dtype):
    """u = 0.5 is where the interpolant's logSNR is 0, a 0/0 of the unfactored inverse."""
    sde = sdelang.load(CASES[name][0]).to(dtype)
    u = torch.cat([torch.linspace(0, 1, 2001, dtype=dtype), torch.tensor([0.5], dtype=dtype)])
    t = sde.t_icdf(u)
    assert torch.isfinite(t).all()
    assert bool(((t >= sde.eps) & (t <= sde.T)).all())
    back = sde.t_cdf(t.double()) if dtype == torch.float64 else None
    if back is not None:
        np.testing.assert_allclose(back.numpy(), u.numpy(), atol=1e-10)


def test_log_through_a_pole_is_real():
    t = sp.Symbol("t", positive=True)
    assert sp.simplify(integrate_from(-1 / (1 - t), t, 0, t) - sp.log(1 - t)) == 0
    assert sp.simplify(integrate_from(3 / (t - 2), t, 0, t) - 3 * sp.log(1 - t / 2)) == 0


def test_constant_in_s_whatever_the_parameters():
    s = sp.Symbol("s", positive=True)
    k, c = sp.symbols("k c", positive=True)
    assert is_constant_in(-2 * k / ((c - k) * (c + k)), s)        # constant in s, not in k and c
    assert is_constant_in(sp.exp(k * s) * sp.exp(-k * s) * c, s)  # not cancelled by SymPy, constant all the same
    assert not is_constant_in(k * s, s)
    assert not is_constant_in(sp.exp(-(c - k) * s), s)
    assert is_constant_in(sp.exp(2 * c * s) - sp.exp(c * s) ** 2, s, zero=True)
    assert not is_constant_in(k + 0 * s, s, zero=True)


def test_exponential_integrands_by_inspection(monkeypatch):
    """Integrands that are sums of constants times d/ds exp(E(s)) are integrated by inspection, without SymPy's
    integrator (which takes seconds on them and, under a time limit, made a coupled pair's closed kernel depend on
    the machine's load). The constants depend on the parameters; a term over a sum of exponentials is one
    exponential once factored."""
    monkeypatch.setattr(symbolic, "_definite", lambda *args: None)
    s, r = sp.symbols("s r", positive=True)
    k, c = sp.symbols("k c", positive=True)
    # Q_22 of dx = -k x dt + sqrt(2k) dw, dv = (x - c v) dt + sqrt(2c) dw, as Phi D0 Phi^T gives it
    denominator = (c**2 - 2 * c * k + k**2) * sp.exp(2 * c * s) * sp.exp(2 * k * s)
    pair = sp.expand(2 * c * sp.exp(-2 * c * s) + (2 * k * sp.exp(2 * c * s) - 4 * k * sp.exp(c * s) * sp.exp(k * s)
                                                   + 2 * k * sp.exp(2 * k * s)) / denominator)
    beta = 1 + k * s   # sub-VP-like: beta (1 - e^(-2B)) with B = s + k s^2 / 2
    B = s + k * s**2 / 2
    sub_vp = sp.expand(beta * sp.exp(B) * (1 - sp.exp(-2 * B)))
    for integrand in (pair, sub_vp):
        result = integrate_from(integrand, s, sp.Integer(0), r)
        assert not result.has(sp.Integral)
        for values in ((1.5, 0.5, 0.7), (0.3, 2.0, 3.0)):
            point = {symbol: sp.Float(value, 40) for symbol, value in zip((k, c, r), values)}
            reference = sp.Integral(integrand.xreplace({k: point[k], c: point[c]}), (s, 0, point[r])).evalf(30)
            assert abs(result.xreplace(point).evalf(30) - reference) <= 1e-25 * max(1, abs(reference))


def test_powers_with_exponents_in_a_parameter_power_of_s(monkeypatch):
    """A VE reparametrised as sigma = smin^(1 - s^rho) smax^(s^rho) with rho a parameter: its noise d/ds sigma^2 has
    powers of constants with exponents in s^rho and s^(rho - 1) beside them, which the exponential rewrite turned into
    exp(rho log s) too; it went to the tables, and their step noise G was 185 times too large at rho = 7. Written as
    one exponential per term (s^rho left alone) it is integrated by inspection: sigma(r)^2 - smin^2 exactly."""
    monkeypatch.setattr(symbolic, "_definite", lambda *args: None)
    s, r, rho, smin, smax = sp.symbols("s r rho smin smax", positive=True)
    sigma2 = (smin ** (1 - s**rho) * smax ** (s**rho)) ** 2
    result = integrate_from(sp.diff(sigma2, s), s, sp.Integer(0), r)
    assert not result.has(sp.Integral)
    for values in ((3.0, 0.002, 80.0, 0.7), (7.0, 0.01, 500.0, 1.4e-3), (0.5, 0.1, 2.0, 0.3)):
        # 80 digits: sigma(r)^2 - smin^2 is 1e-19 of smin^2 at r^7 = 1e-20, and both forms cancel that much.
        point = {symbol: sp.Float(value, 80) for symbol, value in zip((rho, smin, smax, r), values)}
        exact = (sigma2.xreplace({s: r}) - smin**2).xreplace(point).evalf(60)
        assert abs(result.xreplace(point).evalf(60) - exact) <= 1e-30 * abs(exact)


def test_power_minus_one_and_factor_guard():
    t, c = sp.symbols("t c", positive=True)
    rewritten = powers_minus_one((1 + c * sp.exp(t)) ** sp.Rational(1, 3) - 1)
    assert rewritten.has(symbolic.expm1) and rewritten.has(symbolic.log1p)
    point = {t: sp.Float("0.3", 30), c: sp.Float("2e-4", 30)}
    exact = ((1 + c * sp.exp(t)) ** sp.Rational(1, 3) - 1).xreplace(point).evalf(30)
    assert abs(rewritten.xreplace(point).evalf(30) - exact) <= 1e-28
    assert powers_minus_one((1 + t) ** 2 - 1) is None   # an integer power expands without cancelling
    # sp.factor would factor a polynomial of degree 199 in exp(t^2 / 20): left out, with its 1 s time limit
    assert symbolic._high_exponential_powers(sp.exp(t * (199 * t + 2) / 20) - 1)
    assert not symbolic._high_exponential_powers(sp.exp(-t / 2 - 3 * t**2 / 4) - 1)


def test_rewrites_that_keep_float32_digits():
    t = sp.Symbol("t", positive=True)
    a, b = sp.symbols("a b", positive=True)
    assert powers_as_exponentials(a**t / b**t - 1) == sp.exp(t * sp.log(a) - t * sp.log(b)) - 1
    g0, r = sp.symbols("g0 r", real=True)
    rewritten = common_exponential(sp.exp(g0 + r * t) - sp.exp(g0))
    assert sp.simplify(rewritten - (sp.exp(g0 + r * t) - sp.exp(g0))) == 0
    assert rewritten.has(sp.exp(r * t) - 1) or rewritten.has(1 - sp.exp(r * t)) or rewritten.has(sp.exp(-r * t) - 1)



def test_numpy_function_agrees_with_lambdify():
    """The compiler's numpy evaluation (chosen forms are measured with it) gives lambdify's values bit for bit, for
    plain and Dummy variables and a parameter named like a Python keyword (lambdify's own path); softplus is
    numpy's logaddexp(0, u), finite where log(1 + e^u) overflows."""
    t, s, lam = sp.Symbol("t"), sp.Dummy("s"), sp.Symbol("lambda")
    grid = np.geomspace(1e-5, 3.0, 17).astype(np.float32)
    cases = [((t,), symbolic.expm1(-t * (2 + 19 * t) / 4) / sp.sqrt(t)),
             ((t, s), symbolic.log1p(sp.exp(-t) - sp.exp(-2 * s)) + sp.atan(t) * sp.Rational(1, 3)),
             ((t,), sp.Abs(sp.tanh(t - 1)) * sp.erf(sp.Rational(1, 2))),
             ((t, lam), lam * sp.cos(t) ** 2 - sp.pi)]
    for variables, expr in cases:
        ours = symbolic.numpy_function(variables, expr)(*[grid] * len(variables))
        reference = sp.lambdify(variables, expr, modules="numpy")(*[grid] * len(variables))
        assert ours.dtype == np.float32 and np.array_equal(ours, reference), expr
    u = 300 * t - 2
    softplus = symbolic.numpy_function(t, symbolic.softplus(u))(grid)
    assert np.array_equal(softplus, np.logaddexp(np.float32(0), 300 * grid - 2)) and np.isfinite(softplus).all()


def test_constant_error_is_float64_from_the_parameters():
    """constant_error evaluates a constant as a module's constructor does, in float64 from the parameters' values:
    sqrt(1 + b / 1e9) - 1 keeps ~1e-16 / 1e-9 of itself (1.4e-7 at b = 2, by hand: the float64 sum rounds 2e-9 to
    the nearest 2^-52), its rationalized form every digit; a form with no parameter is a number, exact."""
    b = sp.Symbol("b", positive=True)
    x = b / 10**9
    cancelling = symbolic.constant_error(sp.sqrt(1 + x) - 1, {b: 2.0})
    assert 1e-8 < cancelling < 1e-6
    assert symbolic.constant_error(x / (sp.sqrt(1 + x) + 1), {b: 2.0}) < 1e-15
    # exp(u) - 1 is computed as expm1(u), as code generation writes it
    assert symbolic.constant_error((sp.exp(x) - 1) / x, {b: 2.0}) < 1e-15
    assert symbolic.constant_error(sp.sqrt(2) - 1, {}) == 0.0


KINK = "sde kink\nparam c = 0.4\nbeta(t) = 1 + 10 * abs(t - c)\ndx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw\n"


def _quad(f, lower, upper, kinks):
    from scipy.integrate import quad
    points = [k for k in kinks if lower < k < upper]
    value, error = quad(f, lower, upper, points=points or None, epsabs=0, epsrel=1e-13, limit=200)
    return value


@pytest.mark.parametrize("c", [0.4, 0.7, 1.5])
def test_kink_integral_against_quadrature(c):
    """int_0^t (1 + 10 |s - c|) ds in closed form (derive/kinks.py), equal to scipy's quadrature split at the kink to
    1e-12 in float64, with the kink before, inside and after [0, 1]; and in float32 near t = 0 within a few roundings,
    where the antiderivative's values F(t) - F(0) (each of size c^2) would leave ~1e-4."""
    s, t = sp.Symbol("s", positive=True), sp.Symbol("t", positive=True)
    C = sp.Symbol("c", positive=True)
    closed = kinks.kink_integral(1 + 10 * sp.Abs(s - C), s, sp.Integer(0), t, {C: c})
    assert closed is not None and not closed.has(sp.Integral)
    f64 = sp.lambdify((t, C), closed, "numpy")
    times = [1e-5, 1e-3, 0.1, c - 1e-6, c, c + 1e-6, 0.9, 1.0]
    for time in [x for x in times if x > 0]:
        reference = _quad(lambda x: 1 + 10 * abs(x - c), 0.0, time, [c])
        assert abs(f64(time, c) - reference) <= 1e-12 * reference, (c, time)
    # Near t = 0, with the kink after 0 and (a real parameter at -c) before it: |c - s| is c - s or s - c there.
    small = np.geomspace(1e-5, 1e-2, 7).astype(np.float32)
    for symbol, value in ((C, c), (sp.Symbol("c", real=True), -c)):
        closed = kinks.kink_integral(1 + 10 * sp.Abs(s - symbol), s, sp.Integer(0), t, {symbol: value})
        ours = symbolic.numpy_function((t, symbol), closed)(small, np.float32(value)).astype(np.float64)
        reference = np.array([_quad(lambda x: 1 + 10 * abs(x - value), 0.0, float(x), [value]) for x in small])
        assert np.max(np.abs(ours - reference) / reference) < 2e-6, value


def test_kink_integral_of_a_richer_polynomial():
    """Powers of |u| odd and even, |u| written both ways round (|2s - 1| and |1 - 2s|), products with s, a lower limit
    that is not 0 and a negative parameter: against quadrature to 1e-12; an integrand that is not polynomial in |u|,
    or with two kinks, gets no closed form here (None)."""
    s, t = sp.Symbol("s", positive=True), sp.Symbol("t", positive=True)
    d = sp.Symbol("d", real=True)
    body = (1 + s) * sp.Abs(2 * s - 1 - d) ** 3 + s**2 * sp.Abs(1 + d - 2 * s) + 3 + d * s
    for d_value in (0.0, -0.3, 0.5):
        closed = kinks.kink_integral(body, s, sp.Rational(1, 1000), t, {d: d_value})
        fn = sp.lambdify((t, d), closed, "mpmath")
        kink = (1 + d_value) / 2
        f = sp.lambdify((s, d), body, "math")
        for time in (2e-3, 0.3, kink, 0.8, 2.0):
            reference = _quad(lambda x: f(x, d_value), 1e-3, time, [kink])
            assert abs(float(fn(time, d_value)) - reference) <= 1e-12 * abs(reference), (d_value, time)
    assert kinks.kink_integral(1 / (1 + sp.Abs(s - d)), s, 0, t) is None
    assert kinks.kink_integral(sp.Abs(s - 1) + sp.Abs(s - 2), s, 0, t) is None
    assert kinks.kink_integral(sp.Abs(s**2 - 1), s, 0, t) is None


def test_kink_vp_compiles_to_a_closed_form():
    """VP with beta = 1 + 10 |t - c|: a closed-form kernel (numeric tables and 11-12 s of compile before), whose std
    and mean_coeff agree with quadrature of B = int_0^t beta to 1e-12 at the default c and at c given to the module."""
    sde = sdelang.load(KINK)
    assert "closed form" in type(sde).kernel_path
    for c in (0.4, 0.7, 1.5):
        module = sdelang.load(KINK, c=c)
        t = torch.tensor([1e-5, 1e-3, 0.2, 0.4, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
        B = np.array([_quad(lambda x: 1 + 10 * abs(x - c), 0.0, float(x), [c]) for x in t])
        np.testing.assert_allclose(module.std(t).numpy(), np.sqrt(-np.expm1(-B)), rtol=1e-12)
        np.testing.assert_allclose(module.mean_coeff(t).numpy(), np.exp(-B / 2), rtol=1e-12)


def test_integrals_are_variables_of_the_constancy_test(monkeypatch):
    """An unevaluated integral counts as one more variable of is_constant_in, split into constants times integrals of
    single terms: int -5/2 e^sin(3s) ds and 5 int e^sin(3r) dr (as simplify writes it) are one variable, so a VP's
    g^2 / m^2 = k d/dt(1/m^2) holds with beta having no antiderivative, and nothing is integrated numerically (that
    took seconds of mpmath quadrature per test)."""
    def no_quadrature(*args):
        raise AssertionError("an integral was evaluated numerically")
    monkeypatch.setitem(symbolic._evalf.evalf_table, sp.Integral, no_quadrature)
    t, s, r = sp.Symbol("t", positive=True), sp.Dummy("s"), sp.Dummy("r")
    A = sp.Integral(-sp.Rational(5, 2) * sp.exp(sp.sin(3 * s)), (s, 0, t))
    simplified = 5 * sp.Integral(sp.exp(sp.sin(3 * r)), (r, 0, t))
    integrand = 5 * sp.exp(sp.sin(3 * t) + simplified)
    assert is_constant_in(integrand / sp.diff(sp.exp(-2 * A), t), t)
    assert symbolic.derivative_multiple(integrand, sp.exp(-2 * A), t) == 1
    assert not is_constant_in(A, t)
    assert not is_constant_in(sp.exp(simplified + 3 * A), t)          # 5 I - 15/2 I: not constant
    assert is_constant_in(sp.exp(simplified + 2 * A) * 7, t)          # 5 I - 5 I
    assert is_constant_in(sp.Integral(sp.exp(s) + 1, (s, 0, t)) - sp.Integral(sp.exp(r), (r, 0, t)) - t, t, zero=True)
    total = sp.Integral(sp.exp(sp.sin(3 * s)), (s, 0, 1))              # a number: constant, like a parameter
    assert is_constant_in(total * sp.exp(A - A), t)
    parts = symbolic._linear_parts(sp.Integral(-sp.Rational(5, 2) * sp.exp(sp.sin(3 * s)) - sp.Rational(1, 20),
                                               (s, 0, t)))
    assert parts == [(-sp.Rational(1, 20) * t, 1), (-sp.Rational(5, 2), sp.Integral(
        sp.exp(sp.sin(3 * symbolic._VARIABLE)), (symbolic._VARIABLE, 0, t)))] or parts[::-1] == [
        (-sp.Rational(1, 20) * t, 1), (-sp.Rational(5, 2), sp.Integral(
            sp.exp(sp.sin(3 * symbolic._VARIABLE)), (symbolic._VARIABLE, 0, t)))]


def test_non_elementary_integrands_skip_the_integrator():
    """The Risch algorithm proves log(1 + e^(10 s - 5)) and a Gompertz curve non-elementary, so SymPy's integrator is
    not run on them; an exponential of a quadratic (erf, which code generation prints) is never skipped, and what
    Risch does not handle (trigonometric, Abs) or integrates (s e^s) is not proved."""
    s = sp.Symbol("s", positive=True)
    k = sp.Symbol("k", positive=True)
    assert symbolic.non_elementary(sp.log(1 + sp.exp(10 * s - 5)) / 2 + sp.Rational(1, 20), s)
    assert symbolic.non_elementary(sp.Rational(1, 10) + 20 * sp.exp(-sp.exp(k * (sp.Rational(1, 2) - s))), s)
    assert not symbolic.non_elementary(sp.exp(-s**2), s)
    assert not symbolic.non_elementary(s * sp.exp(s), s)
    assert not symbolic.non_elementary(sp.exp(sp.sin(3 * s)), s)
    assert not symbolic.non_elementary(1 + sp.Abs(s - k), s)
    t = sp.Symbol("t", positive=True)
    assert integrate_from(sp.exp(-s**2), s, 0, t).has(sp.erf)


def test_numeric_evaluation_of_softplus_expm1_log1p(monkeypatch):
    """softplus, expm1 and log1p are in SymPy's table of numeric evaluators (mpmath, with guard bits): the same values
    as mpmath to 30 digits, inside quadrature too (without SymPy's substitution at each node, which took 1-2 s per
    integral), and softplus does not overflow or lose a tiny value."""
    import mpmath
    x = sp.Symbol("x")
    with mpmath.workdps(40):
        cases = [(symbolic.softplus(sp.Rational(-900)), mpmath.log1p(mpmath.exp(-900))),
                 (symbolic.softplus(sp.Integer(800)), 800 + mpmath.log1p(mpmath.exp(-800))),
                 (symbolic.softplus(sp.Rational(1, 3)), mpmath.log1p(mpmath.exp(mpmath.mpf(1) / 3))),
                 (symbolic.expm1(sp.Rational(1, 10**12)), mpmath.expm1(mpmath.mpf(10) ** -12)),
                 (symbolic.log1p(-sp.Rational(1, 3)), mpmath.log1p(-mpmath.mpf(1) / 3)),
                 (symbolic.expm1(x).evalf(30, subs={x: sp.Rational(1, 7)}), mpmath.expm1(mpmath.mpf(1) / 7))]
        for expr, exact in cases:
            assert abs(sp.Float(expr.evalf(30)) - sp.Float(exact, 40)) <= 1e-29 * abs(sp.Float(exact, 40)), expr
        integral = sp.Integral(symbolic.softplus(10 * x - 5) / 2 + symbolic.log1p(sp.exp(x)), (x, 0, 1))
        with monkeypatch.context() as patch:  # SymPy's slow fallback substitutes into the function at every node
            patch.setattr(sp.Basic, "subs", lambda *args, **kwargs: pytest.fail("evaluated by substitution"))
            integral = integral.evalf(25)
        exact = mpmath.quad(lambda u: mpmath.log1p(mpmath.exp(10 * u - 5)) / 2 + mpmath.log1p(mpmath.exp(u)), [0, 1])
        assert abs(integral - sp.Float(exact, 40)) <= 1e-23
    assert abs(complex(symbolic.log1p(-3).evalf(20)) - complex(mpmath.log(-2))) < 1e-18


@pytest.mark.parametrize("f", ["sin(3*t)", "cos(3*t + 1)", "tan(2*t)", "sin(t)**2", "cos(t**2 + t)**2",
                               "tan(pi*t/2)**2"])
def test_trigonometric_step_differences(f):
    """f(t) - f(s) by the sum-to-product identities (discretize.trigonometric_difference) equals the difference, at
    40 digits, for steps from 0.2 down to 1e-12 (where the difference as written has no digits left in float64)."""
    from sdelang.compiler.derive.discretize import START, trigonometric_difference
    t = sp.Symbol("t", positive=True)
    expr = sp.sympify(f, locals={"t": t})
    difference = trigonometric_difference(expr, t)
    assert difference is not None and difference.has(START)
    for tv, step in ((0.3, 0.2), (0.7, 1e-3), (0.05, 1e-12)):
        point = {t: sp.Float(tv, 50), START: sp.Float(tv, 50) - sp.Float(step, 50)}
        want = (expr.xreplace({t: point[t]}) - expr.xreplace({t: point[START]})).evalf(40)
        assert abs(difference.xreplace(point).evalf(40) - want) <= 1e-30 * abs(want)
