"""derive/signs.py: schedules written with abs and sign, their derivatives and their jumps, checked against
one-sided numeric limits and the pieces written out by hand."""
from __future__ import annotations

import mpmath
import pytest
import sympy as sp
import torch

import sdelang
from sdelang.compiler.derive.discretize import START, step_difference
from sdelang.compiler.derive.signs import canonical, derivative, jumps, kinks

t = sp.Symbol("t", positive=True)
half = sp.Rational(1, 2)
u = t - half


@pytest.mark.parametrize("expr, want", [
    ((half - t) / sp.Abs(u), -sp.sign(u)),               # u / |u|, the argument's sign normalised
    ((2 * t - 1) / sp.Abs(u), 2 * sp.sign(u)),
    (sp.Abs(u) / (half - t), -sp.sign(u)),
    (sp.sign(half - t) * sp.sign(u), -sp.Integer(1)),     # sign^2 = 1
    (sp.sign(u) ** 3, sp.sign(u)),
    (sp.sign(u) * (2 * t - 1) * t, 2 * t * sp.Abs(u)),    # sign(u) k u = k |u|
])
def test_canonical_forms(expr, want):
    assert sp.simplify(canonical(expr) - want) == 0


@pytest.mark.parametrize("expr", [
    sp.sign(half - t) * sp.log(1 - 2 * sp.Abs(u)),        # the Laplace logSNR's shape
    (half - t) / sp.Abs(u) * sp.log(1 - 2 * sp.Abs(u)),
    sp.Abs(u) * u + t,                                    # a kinked rate's integral
    sp.sign(u) * u**2,
])
def test_derivative_is_the_continuous_one(expr):
    """d/dt at t = 1/2 itself equals the two-sided limit of difference quotients (mpmath, 40 digits; steps of 1e-15,
    so within 1e-12), and away from it the plain derivative: the delta SymPy adds is gone, sign(0)^2 is not 0."""
    d = derivative(expr, t)
    assert not d.has(sp.DiracDelta)
    f = sp.lambdify(t, expr, "mpmath")
    with mpmath.workdps(40):
        for point in (mpmath.mpf(1) / 2, mpmath.mpf("0.3"), mpmath.mpf("0.8")):
            h = mpmath.mpf("1e-15")
            # one-sided quotients that do not evaluate at the point itself (the u / |u| form is 0/0 there)
            left, right = (f(point - h) - f(point - 2 * h)) / h, (f(point + 2 * h) - f(point + h)) / h
            value = sp.N(d.subs(t, sp.Rational(str(point))), 30)
            assert abs(value - (left + right) / 2) < 1e-12 and abs(left - right) < 1e-12, (expr, point)


def test_jumps_and_kinks_are_located():
    assert jumps(5 - 10 * t - sp.sign(u), t, 1e-3, 1.0, {}) == [0.5]
    assert jumps(sp.sign(half - t) * sp.log(1 - 2 * sp.Abs(u)), t, 1e-3, 0.999, {}) == []
    assert jumps(sp.sign(t - 2), t, 1e-3, 1.0, {}) == []             # its root is outside [eps, T]
    assert kinks([1 + sp.Abs(t - sp.Rational(3, 10)), sp.sign(u)], t, 1e-3, 1.0, {}) == pytest.approx([0.3, 0.5], abs=1e-15)
    assert kinks([sp.Abs(sp.cos(3 * t))], t, 1e-3, 2.0, {}) == pytest.approx([float(sp.pi) / 6, float(sp.pi) / 2], abs=1e-15)
    assert kinks([sp.Abs((t - sp.Rational(1, 3))**2)], t, 1e-3, 1.0, {}) == []   # touched, not crossed: |u| = u


@pytest.mark.parametrize("f", [sp.Abs(t - sp.Rational(3, 10)), (t - sp.Rational(3, 10)) * sp.Abs(t - sp.Rational(3, 10)),
                               t**2 * sp.Abs(2 * t - 1) + 3 * sp.Abs(2 * t - 1)])
def test_step_difference_of_a_kink_is_exact_on_both_sides_and_across(f):
    """absolute_difference's |u(t)| - |u(s)| = sign(u(t)) (u(t) - u(s)) + (sign(u(t)) - sign(u(s))) u(s) against
    f(t) - f(s) in 50 digits: steps before, after, across and ending at the kink, and a zero-length one on it."""
    d = sp.lambdify((t, START), step_difference(f, t), "mpmath")
    plain = sp.lambdify(t, f, "mpmath")
    kink = mpmath.mpf(3) / 10 if f.has(t - sp.Rational(3, 10)) else mpmath.mpf(1) / 2
    with mpmath.workdps(50):
        for end, start in ((0.2, 0.1), (0.8, 0.7), (0.9, 0.05), (kink, kink - 0.01), (kink + 0.01, kink), (kink, kink)):
            end, start = mpmath.mpf(end), mpmath.mpf(start)
            exact = plain(end) - plain(start)
            assert abs(d(end, start) - exact) <= mpmath.mpf(10) ** -45 * max(1, abs(plain(end))), (f, end, start)


def _kinked_step_reference(log_m, v, t, s):
    """(r - 1, G) over the step [s, t] from m = exp(log_m) and v written by hand, in 40 digits."""
    with mpmath.workdps(40):
        t, s = mpmath.mpf(t), mpmath.mpf(s)
        r = mpmath.exp(log_m(t) - log_m(s))
        return float(r - 1), float(mpmath.sqrt(v(t) - r**2 * v(s)))


def _worst_step_error(sde, log_m, v, points, steps):
    worst = 0.0
    for time in points:
        for fraction in steps:
            end = torch.tensor([time], dtype=torch.float64)
            start = end * (1 - fraction)
            growth, G = _kinked_step_reference(log_m, v, float(end), float(start))
            f, g = sde.discretize(torch.ones(1, 1, dtype=torch.float64), end, start)
            worst = max(worst, abs(float(f) - growth) / abs(growth), abs(float(g) - G) / G)
    return worst


def test_a_kinked_log_snr_keeps_its_steps_digits():
    """logSNR = 10 - 4 t - 16 (t - 0.3 + |t - 0.3|): the step's |t - 0.3| - |s - 0.3| was a plain difference, so that
    r - 1 (~1e-14 over a step of 1e-5 of t at t = 1.5e-5) and G lost their digits: G 1.3e-3 off in float64 there and
    1.4e-6 at steps of 1e-3 of t, where the schedule written without abs keeps every digit. Both against the pieces by
    hand (mpmath, 40 digits) before, at and after the kink: within 1e-12 (it was 2.6e-3)."""
    sde = sdelang.load("sde kinked\nlogsnr(t) = 10 - 4 * t - 16 * (t - 0.3 + abs(t - 0.3))\n").double()

    def lam(t):
        return 10 - 4 * t - 32 * max(t - mpmath.mpf(3) / 10, 0)

    def log_m(t):
        return -mpmath.log1p(mpmath.exp(-lam(t))) / 2

    def v(t):
        return 1 / (1 + mpmath.exp(lam(t)))

    points = (1.5e-5, 3e-5, 1e-4, 1e-3, 0.05, 0.3, 0.30001, 0.5, 1.0)
    assert _worst_step_error(sde, log_m, v, points, (1e-3, 1e-5, 1e-6)) < 1e-12
    # a step across the kink
    growth, G = _kinked_step_reference(log_m, v, 0.31, 0.29)
    f, g = sde.discretize(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0.31], dtype=torch.float64),
                          torch.tensor([0.29], dtype=torch.float64))
    assert float(f) == pytest.approx(growth, rel=1e-12) and float(g) == pytest.approx(G, rel=1e-12)


def test_a_vp_with_a_kinked_beta_keeps_its_steps_digits_after_the_kink():
    """beta = b0 + b1 |t - c| at b0 = 0.01, b1 = 2000, c = 0.9: B(t) has (t - c) |t - c|, which expanded into
    t |t - c| - c |t - c| cancelled in B(t) - B(s) just after the kink, where beta is small: r - 1 1.1e-5 off over a
    step of 1e-6 of t at t = 0.900001. Against B written by hand (mpmath, 40 digits): within 1e-10."""
    program = ("sde kinked_vp\nparam b0 = 0.1\nparam b1 = 20\nparam c = 0.3\nbeta(t) = b0 + b1 * abs(t - c)\n"
               "dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw\n")
    b0, b1, c = mpmath.mpf("0.01"), mpmath.mpf(2000), mpmath.mpf("0.9")
    sde = sdelang.load(program, b0=0.01, b1=2000.0, c=0.9).double()

    def B(t):
        return b0 * t + b1 * (c * abs(c) + (t - c) * abs(t - c)) / 2

    points = (0.5, 0.899, 0.9, 0.900001, 0.90001, 0.9001, 0.95, 1.0)
    assert _worst_step_error(sde, lambda t: -B(t) / 2, lambda t: -mpmath.expm1(-B(t)), points, (1e-3, 1e-5, 1e-6)) < 1e-10
