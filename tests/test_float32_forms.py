"""float32 near t = eps for forms that cancel: expm1(u) - u - ... - u^k / k! (printer.ExpTail) and differences
v(t) - v(s) over a step (derive.discretize.step_difference).

An OU process with a moving target b(t) = theta k t has c(t) = k (theta t + expm1(-theta t)) / theta ~ k theta t^2 / 2:
printed directly, float32 returned exactly 0 at t = 1e-5 and was 2.2e-2 off at 1e-3. References: mpmath at 40 digits
from the formula written here by hand, at the float32 time the module sees (no module code).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.codegen.cfunctions import expm1

import sdelang
from conftest import import_code
from sdelang.compiler.codegen.printer import ExpTail, TensorPrinter, expm1_tails

MOVING = """\
sde moving
param theta = 1
param k: real = 1
dx = -theta * (x - k * t) dt + sqrt(2) dw
t in [1e-5, 5]
"""


@pytest.fixture(scope="module")
def moving():
    return import_code(sdelang.compile_source(sdelang.Source(MOVING, "moving.sde")).code, "sdelang_test_tails_moving")


def c_exact(theta, k, t):
    with mpmath.workdps(40):
        theta, k, t = mpmath.mpf(theta), mpmath.mpf(k), mpmath.mpf(t)
        return float(k * (theta * t + mpmath.expm1(-theta * t)) / theta)


@settings(max_examples=30, deadline=None)
@given(theta=st.floats(0.1, 5.0), k=st.floats(0.1, 3.0), sign=st.sampled_from([-1.0, 1.0]),
       log_t=st.lists(st.floats(math.log(1e-5), math.log(5.0)), min_size=4, max_size=4))
def test_float32_mean_offset_of_a_moving_target(moving, theta, k, sign, log_t):
    """float32 mean_offset within 1e-5 relative of mpmath on [1e-5, 5] (measured <= 3e-7): the series branch near 0,
    the direct form (16 ulps of cancellation at most) from |theta t| = 1/8 on."""
    sde = moving.SDE(theta=theta, k=sign * k).float()
    t = torch.tensor(np.exp(log_t), dtype=torch.float32)
    got = sde.mean_offset(t)
    assert got.dtype == torch.float32
    for ti, ci in zip(t.tolist(), got.tolist()):
        want = c_exact(theta, sign * k, ti)
        assert abs(ci - want) <= 1e-5 * abs(want), (ti, ci, want)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 64 * 2.0**-24), (torch.float64, 64 * 2.0**-53)])
def test_exp_tail_printed_code(k, dtype, rtol):
    """The printed ExpTail(u, k) against mpmath for u in [-3, 3] (0 excluded), within 64 ulps relative: the direct
    form's cancellation where it takes over (measured <= 20 ulps in float32, at k = 3); the series is exact to the
    last bit below the switch."""
    u = sp.Symbol("u")
    code = TensorPrinter({u: "u"}).doprint(ExpTail(u, k))
    values = torch.cat([-torch.logspace(-6, math.log10(3), 200), torch.logspace(-6, math.log10(3), 200)]).to(dtype)
    got = eval(code, {"torch": torch, "u": values})  # noqa: S307 - code printed here, from a fixed expression
    for ui, gi in zip(values.tolist(), got.tolist()):
        with mpmath.workdps(40):
            x = mpmath.mpf(ui)
            want = float(mpmath.exp(x) - sum(x**n / mpmath.factorial(n) for n in range(k + 1)))
        assert abs(gi - want) <= rtol * abs(want), (k, ui, gi, want)


def test_tails_are_found_in_a_sum():
    """c expm1(u) - c u - c u^2 / 2 becomes c ExpTail(u, 2); a sum that is not a tail is left alone."""
    a, t = sp.symbols("a t", positive=True)
    expr = 3 * expm1(a * t) - 3 * a * t - sp.Rational(3, 2) * a**2 * t**2 + t
    assert expm1_tails(expr) == 3 * ExpTail(a * t, 2) + t
    other = expm1(a * t) - 2 * a * t
    assert not expm1_tails(other).has(ExpTail)


VE_V0 = """\
sde ve_v0
param smin = 0.01
param smax = 50
param init = 0.25
dx = sqrt(2 * log(smax / smin)) * smin * (smax / smin)^t dw
v0 = init
t in [1e-5, 1]
steps 1000
"""


@pytest.fixture(scope="module")
def ve_v0():
    return import_code(sdelang.compile_source(sdelang.Source(VE_V0, "ve_v0.sde")).code, "sdelang_test_forms_ve_v0")


def G_exact(smin, smax, t, s):
    """G^2 = v(t) - v(s) = smin^2 ((smax/smin)^2t - (smax/smin)^2s) for VE, whatever v0."""
    with mpmath.workdps(40):
        smin, smax, t, s = (mpmath.mpf(x) for x in (smin, smax, t, s))
        return float(mpmath.sqrt(smin**2 * ((smax / smin) ** (2 * t) - (smax / smin) ** (2 * s))))


@settings(max_examples=30, deadline=None)
@given(smin=st.floats(1e-3, 0.5), ratio=st.floats(10.0, 1e4), v0=st.floats(1e-3, 4.0),
       log_t=st.lists(st.floats(math.log(1e-5), 0.0), min_size=4, max_size=4),
       fraction=st.sampled_from([None, 0.5, 0.999]))
def test_float32_discretize_noise_with_initial_variance(ve_v0, smin, ratio, v0, log_t, fraction):
    """VE with v0 > 0: float32 discretize's G within 1e-5 relative of mpmath, for the default step (s = t - T/N,
    clamped at 0) and steps to half and 0.999 of t (measured <= 5e-7). G^2 = (v(s)/v(t) - 1) v(t) cancelled
    (9.3e-3 off at t = 1e-5 with v0 = 0.25); it is now smin^2 (smax/smin)^2s expm1(2 log(smax/smin) (t - s))."""
    sde = ve_v0.SDE(smin=smin, smax=smin * ratio, init=v0).float()
    t = torch.tensor(np.exp(log_t), dtype=torch.float32)
    s = None if fraction is None else t * fraction
    _, G = sde.discretize(torch.zeros(len(t), 2), t, s)
    starts = torch.clamp(t - sde.T / sde.N, min=0.0) if s is None else s
    for ti, si, gi in zip(t.tolist(), starts.tolist(), G.tolist()):
        want = G_exact(smin, smin * ratio, ti, si)
        assert abs(gi - want) <= 1e-5 * want, (ti, si, gi, want)


def test_forms_at_moved_parameters_are_measured_as_the_module_computes_them():
    """symbolic._stressed_errors (the tie-break at parameters moved 100-fold) evaluates each form with its constant
    subexpressions computed once at 30 digits and the rest in float32, without putting the values into the SymPy
    form: log(expm1(k t)) overflows float32 at k = 100 on [0, 2] (inf), k t + log(-expm1(-k t)) does not; and where
    both are finite the errors agree with those of the forms with the values put in (the slower path it replaced)
    to a factor of 3, or both are float32 rounding."""
    import sympy as sp
    from sympy.codegen.cfunctions import expm1

    from sdelang.compiler.derive import symbolic

    t, k = sp.Symbol("t", positive=True), sp.Symbol("k", positive=True)
    forms = [sp.log(expm1(k * t)), k * t + sp.log(-expm1(-k * t))]
    columns = (np.geomspace(1e-5, 2.0, 25).astype(np.float32).astype(np.float64),)
    errors = symbolic._stressed_errors(forms, (t,), columns, {k: 100.0}, 0.0)
    assert errors[0] == np.inf and errors[1] < 1e-6
    forms = [sp.exp(-k * t) * expm1(k * t), -expm1(-k * t), (1 + k * t - sp.exp(-k * t) - k * t)]
    for value in (0.01, 1.0, 100.0):
        fast = symbolic._stressed_errors(forms, (t,), columns, {k: value}, 0.0)
        ats = [symbolic._at_defaults(f, {k: value}) for f in forms]
        reference = symbolic._reference(ats, (t,), columns)
        slow = [symbolic._float32_error(at, (t,), columns, reference) for at in ats]
        for a, b in zip(fast, slow):
            assert max(a, b) < symbolic.ROUNDING_TIE or a / 3 <= b <= 3 * a, (value, fast, slow)
