"""The numeric path: kernels without a closed form, read from piecewise Chebyshev tables the module builds,
with a tabulated inverse CDF (tests/test_numeric_tables.py checks the tables on harder SDEs).

Two SDEs take it: the golden module of examples/numeric.sde, and OFFSET_PROGRAM below, compiled here
(its drift has an offset b = k, so that c(t) is a quadrature too, which numeric.sde never
exercises; k is overridden at construction). Their kernels are checked against SciPy's DOP853 solution
of the moment ODEs, the inverse CDF against the CDF, and the time density against QUADPACK.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import torch

import sdelang
from conftest import import_code
from test_identities import F64, assert_close, coefficients, integrate_log_t

# SymPy finds no antiderivative of exp(t + t^3/3) (c) or of (1 + t) exp(2 t + 2 t^3 / 3) (v): both numeric.
OFFSET_PROGRAM = """\
sde offset_numeric
param k = 1
dx = (-(1 + t^2) * x + k) dt + sqrt(1 + t) dw
t in [1e-5, 2]
steps 500
prior kernel
weighting likelihood
t ~ importance
"""
OFFSET_K = 1.7


@pytest.fixture(scope="module")
def offset_module():
    """OFFSET_PROGRAM compiled from text (about 8 s: SymPy's integrals run to their time limit)."""
    compiled = sdelang.compile_source(sdelang.Source(OFFSET_PROGRAM, "x.sde"))
    return import_code(compiled.code, "sdelang_test_offset_numeric")


@pytest.fixture(params=["numeric", "offset"])
def sde(request, examples, offset_module):
    """The SDE under test, in float64."""
    if request.param == "numeric":
        return examples["numeric"].build()
    return offset_module.SDE(k=OFFSET_K).double()


def test_both_take_the_numeric_path(examples, offset_module):
    """The generated modules say their kernel and their inverse CDF are numeric tables."""
    for module in (examples["numeric"].module, offset_module):
        assert module.SDE.kernel_path == "numeric (piecewise Chebyshev tables)", module.SDE.kernel_path
        assert module.SDE.inverse_cdf_path == "numeric (piecewise Chebyshev table)", module.SDE.inverse_cdf_path
        assert (module.SDE.weighting, module.SDE.t_sampling) == ("likelihood", "importance")


# --- Kernel moments against an ODE solver ------------------------------------------------------------

def solve_moments(sde, t_eval):
    """m' = a m, c' = a c + b, v' = 2 a v + g^2 from m = 1, c = 0, v = v0 (MATH.md 1), and w' = a w + |b|, w(0) = 0:
    w = m int |b| / m >= |c| is the size of the terms c sums: the scale for c, which may cross 0 (and is 0 for
    numeric.sde, where both sides must give exactly 0).
    a, b, g are read off sde.sde(x, t) at x = 0 and 1. DOP853, rtol 1e-10; atol 1e-16 is far below every
    value compared (v(eps) ~ 1e-5), so the control is relative."""
    def rhs(t, y):
        a, b, g = (float(z[0]) for z in coefficients(sde, torch.tensor([t], dtype=F64)))
        m, c, v, w = y
        return [a * m, a * c + b, 2 * a * v + g * g, a * w + abs(b)]

    sol = scipy.integrate.solve_ivp(rhs, (0.0, float(t_eval[-1])), [1.0, 0.0, float(sde.v0), 0.0],
                                    method="DOP853", t_eval=t_eval, rtol=1e-10, atol=1e-16)
    assert sol.success, sol.message
    return [torch.from_numpy(row) for row in sol.y]


def test_kernel_matches_moment_odes(sde):
    """mean_coeff, mean_offset and std equal the solved moment ODEs to 1e-6 relative (std, m) or 1e-6 of the
    terms' size w (c) on 200 times in [eps, T]. The solver's error is ~1e-9 (rtol 1e-10 per step) and the
    tables' ~1e-10, so 1e-6 has ample room;
    marginal_prob must agree with the same methods."""
    eps, T = float(sde.eps), float(sde.T)
    t = np.unique(np.concatenate([np.geomspace(eps, T, 100), np.linspace(eps, T, 100)]))
    m, c, v, w = solve_moments(sde, t)
    t = torch.from_numpy(t)
    assert_close(sde.mean_coeff(t), m, m, 1e-6, "m(t)", t)
    assert_close(sde.mean_offset(t), c, w, 1e-6, "c(t)", t)
    assert_close(sde.std(t), v.sqrt(), v.sqrt(), 1e-6, "sigma(t)", t)
    x0 = torch.linspace(-2, 2, t.shape[0], dtype=F64)[:, None]
    mean, std = sde.marginal_prob(x0, t)
    assert_close(mean[:, 0], m * x0[:, 0] + c, (m * x0[:, 0]).abs() + w, 1e-6, "marginal mean", t)
    assert_close(std, v.sqrt(), v.sqrt(), 1e-6, "marginal std", t)


# --- Inverse CDF from its table ------------------------------------------------------------------------

def count_calls(sde, names):
    """Wrap the instance's methods `names` (those it has) to count calls and the batch sizes they see."""
    calls = []
    for name in names:
        if hasattr(sde, name):
            method = getattr(sde, name)

            def counted(*args, _method=method, _name=name, **kwargs):
                calls.append(_name)
                return _method(*args, **kwargs)

            setattr(sde, name, counted)
    return calls


def test_t_icdf_inverts_t_cdf_in_one_vectorised_call(examples):
    """numeric: t_icdf of 10000 u in one call returns shape [10000] in [eps, T] with |Q(Q^-1(u)) - u| <= 1e-6;
    it is one table lookup, the same for 3 samples as for 10000 (a loop per sample would make 3333 times more),
    and reads no logSNR or CDF (no bisection at call time)."""
    sde, batch = examples["numeric"].build(), 10000
    u = torch.rand(batch, generator=torch.Generator().manual_seed(5), dtype=F64)
    u[:2] = torch.tensor([0.0, 1.0], dtype=F64)
    names = ["log_snr", "t_cdf", "_lookup"]
    calls_large = count_calls(sde, names)
    t = sde.t_icdf(u)
    sde_small = examples["numeric"].build()
    calls_small = count_calls(sde_small, names)
    sde_small.t_icdf(u[:3])
    assert calls_large == calls_small == ["_lookup"], (calls_large, calls_small)
    assert t.shape == (batch,) and t.dtype == F64
    assert bool(((t >= sde.eps) & (t <= sde.T)).all())
    # The table of log t is resolved to ~1e-10 (the compile-time check measures it): 1e-6 is the requirement.
    assert_close(sde.t_cdf(t), u, 1.0, 1e-6, "Q(Q^-1(u)) = u")


def test_offset_t_icdf_inverts_t_cdf(offset_module):
    """OFFSET_PROGRAM: as above for 1000 u in one call (shape [1000], in [eps, T], Q(Q^-1(u)) = u to 1e-6)."""
    sde = offset_module.SDE(k=OFFSET_K).double()
    u = torch.cat([torch.tensor([0.0, 1.0], dtype=F64),
                   torch.rand(998, generator=torch.Generator().manual_seed(6), dtype=F64)])
    t = sde.t_icdf(u)
    assert t.shape == (1000,)
    assert bool(((t >= sde.eps) & (t <= sde.T)).all())
    assert_close(sde.t_cdf(t), u, 1.0, 1e-6, "Q(Q^-1(u)) = u")


# --- The time density ----------------------------------------------------------------------------------

def test_t_density_and_normalised_weight_integrate_to_one(sde):
    """int_eps^T q = 1 and int_eps^T lambda / (Z v) = 1 with Z = logSNR(eps) - logSNR(T) (QUADPACK in log t).
    Allowed: 10 x QUADPACK's error estimate plus 1e-12, the float64 error of the integrands (Z loses about
    one digit of 16 to the difference of logSNRs, the rest is a few roundings)."""
    eps, T = float(sde.eps), float(sde.T)
    ends = sde.log_snr(torch.tensor([eps, T], dtype=F64))
    Z = float(ends[0] - ends[1])
    total, err = integrate_log_t(sde.t_density, eps, T)
    assert abs(total - 1) <= 1e-12 + 10 * err, ("int q", total, err)
    total, err = integrate_log_t(lambda t: sde.weight(t) / (Z * sde.std(t) ** 2), eps, T)
    assert abs(total - 1) <= 1e-12 + 10 * err, ("int lambda / (Z v)", total, err)
    assert math.isfinite(Z) and Z > 0
