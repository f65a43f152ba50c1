"""derive/signs.py: schedules written with abs and sign, their derivatives and their jumps, checked against
one-sided numeric limits and the pieces written out by hand."""
from __future__ import annotations

import math

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


SIGN_OU = """sde sign_ou
param k = 2
param c = 0.1
param mu: real = 1
dx = -k * sign(t - c) * (x - mu) dt + dw
t in [1e-5, 2]
"""


@pytest.mark.parametrize("values", [{}, {"c": 0.7, "mu": -50.0}])
def test_a_drift_that_changes_sign_at_a_parameter(values):
    """dx = -k sign(t - c) (x - mu) dt + dw: the state is pushed away from mu before c and pulled back after. The
    VP-like test of the noise integrand probed (0, 1) at c = 0.71 only before c, took 1 / (2 k sign(t - c)) for a
    constant and gave v = -(1/2k) expm1(-2A) m^2, right before c and wrong after (log 0 at t = 2c); it now probes
    either side of each kink. m, c(t) and std against the pieces by hand (mpmath, v by quadrature split at c), at and
    around c: float64 within 1e-9 (absolute where c(t) passes 0); steps ending at c (a piece boundary of the tables): r - 1 within 1e-7."""
    k, c, mu = 2.0, values.get("c", 0.1), values.get("mu", 1.0)
    sde = sdelang.load(SIGN_OU, **values).double()
    with mpmath.workdps(30):
        C = mpmath.mpf(c)

        def A(t):
            return k * t if t <= C else k * (2 * C - t)

        def reference(t):
            t = mpmath.mpf(t)
            v = mpmath.exp(2 * A(t)) * mpmath.quad(lambda s: mpmath.exp(-2 * A(s)), [0, t] if t <= C else [0, C, t])
            return mpmath.exp(A(t)), mu * (1 - mpmath.exp(A(t))), mpmath.sqrt(v)

        for t in (0.05, math.nextafter(c, 0), c, math.nextafter(c, 1), 1.5 * c, 2 * c, 1.0, 2.0):
            x = torch.tensor([t], dtype=torch.float64)
            got = (sde.mean_coeff(x), sde.mean_offset(x), sde.std(x))
            for value, exact in zip(got, reference(t)):
                # relative, or absolute where c(t) = mu (1 - m) passes 0 (t = 2c)
                assert abs(float(value) - float(exact)) <= 1e-9 * max(abs(float(exact)), 1), (t, float(value))
        for fraction in (1e-3, 1e-5):
            end = torch.tensor([c], dtype=torch.float64)
            growth = float(mpmath.expm1(A(C) - A(C * (1 - mpmath.mpf(float(fraction))))))
            f, _ = sde.discretize(torch.zeros(1, 1, dtype=torch.float64) + mu + 1, end, end * (1 - fraction))
            assert float(f) == pytest.approx(growth, rel=1e-7)


@pytest.mark.parametrize("values", [{}, {"k": 1000.0, "c": 0.9}])
def test_a_diffusion_that_jumps_gets_a_table_piece_boundary_there(values):
    """dx = sqrt(1 + k (1 + sign(t - c)) / 2) dw, v = t + k max(t - c, 0), tabulated: the tables had no piece
    boundary at c (only 0, powers of two, eps and T), the piece across the jump was halved to the shortest width and
    v came 2.8e-11 high from c on; G of a step ending at c was 3.5e-6 off over 1e-5 of t (4.4e-3 at k = 1000, 1e-6 of
    t). The module finds c when built (a scan and bisection of the arguments of abs and sign) and breaks its pieces
    there: G within 1e-9 of the exact one on steps ending at c, starting at c and across it."""
    program = "sde sign_ve\nparam k = 8\nparam c = 0.4\ndx = sqrt(1 + k * (1 + sign(t - c)) / 2) dw\nt in [1e-5, 1]\n"
    k, c = values.get("k", 8.0), values.get("c", 0.4)
    sde = sdelang.load(program, **values).double()
    with mpmath.workdps(30):
        def v(t):
            return t + k * max(t - mpmath.mpf(c), 0)

        for start, end in ((c * (1 - 1e-5), c), (c * (1 - 1e-6), c), (c, c * (1 + 1e-5)), (c * 0.99, c * 1.01)):
            s, t = (torch.tensor([x], dtype=torch.float64) for x in (start, end))
            G = float(mpmath.sqrt(v(mpmath.mpf(end)) - v(mpmath.mpf(start))))
            _, g = sde.discretize(torch.ones(1, 1, dtype=torch.float64), t, s)
            assert float(g) == pytest.approx(G, rel=1e-9), (start, end)


def test_steps_of_a_signed_square_and_of_abs_of_a_sine_keep_their_digits():
    """Two more kinked forms of the step rule, each against the kernel by hand (mpmath, 40 digits), near eps and past
    the kinks: a kernel with E = log alpha = -2 t - k sign(t - c) (t - c)^2 - k c^2 (c = 0.9, k = 20; r - 1 was
    2.2e-7 off over steps of 1e-5 of t near eps: sign(u) p(t) was a plain difference) and a logSNR
    8 - 16 t - 4 |sin(3 t) - 1/2| (r - 1 2.6e-7 off: |u| of a u that is no polynomial was a plain difference; now
    u(t) - u(s) by the sum-to-product rule). Within 1e-12."""
    kernel = sdelang.load("sde sq_sign\nparam c = 0.5\nparam k = 3\nE(t) = -2 * t - k * sign(t - c) * (t - c)^2 - k * c^2\n"
                          "x(t) ~ normal(exp(E(t)) * x(0), -expm1(2 * E(t)))\n", c=0.9, k=20.0).double()
    c, k = mpmath.mpf("0.9"), mpmath.mpf(20)

    def E(t):
        return -2 * t - k * mpmath.sign(t - c) * (t - c) ** 2 - k * c**2

    points = (1.5e-5, 1e-4, 1e-3, 0.5, 0.9, 0.9001, 1.0)
    assert _worst_step_error(kernel, E, lambda t: -mpmath.expm1(2 * E(t)), points, (1e-3, 1e-5)) < 1e-12

    sine = sdelang.load("sde sin_abs\nlogsnr(t) = 8 - 16 * t - 4 * abs(sin(3 * t) - 1/2)\n").double()

    def lam(t):
        return 8 - 16 * t - 4 * abs(mpmath.sin(3 * t) - mpmath.mpf(1) / 2)

    points = (1.5e-5, 3.3e-5, 1e-4, 1e-3, 0.1, 0.2, 0.5, 1.0)
    assert _worst_step_error(sine, lambda t: -mpmath.log1p(mpmath.exp(-lam(t))) / 2,
                             lambda t: 1 / (1 + mpmath.exp(lam(t))), points, (1e-3, 1e-5)) < 1e-12
