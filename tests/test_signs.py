"""derive/signs.py: schedules written with abs and sign, their derivatives and their jumps, checked against
one-sided numeric limits and the pieces written out by hand."""
from __future__ import annotations

import mpmath
import pytest
import sympy as sp

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
