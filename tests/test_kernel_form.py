"""Processes given by their kernel ('x(t) ~ normal(...)') or logSNR ('logsnr(t) = ...').

The compiled modules are compared with closed forms written out by hand below (numpy and scipy, never the
module's own expressions): the stated kernel m, sigma and logSNR, and the SDE coefficients a = alpha'/alpha
and g^2 = (sigma^2)' - 2 a sigma^2 with the derivatives taken by hand. A second, independent check solves
the moment equations m' = a m, v' = 2 a v + g^2 of the module's own sde() with scipy and recovers the stated
kernel: the derived SDE has exactly these marginals. Refusals (a logSNR that increases, a pole inside the
interval) are checked for their location. Tolerances are float64 rounding of the formulas (1e-10 relative)
and the ODE solver's requested tolerance (rtol 1e-10, compared at 1e-7).
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.special import expit

import sdelang
from sdelang.compiler import compile_source
from sdelang.errors import SdeError, Source

RTOL = 1e-10


def _coefficients(sde, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a(t), b(t) and g(t)^2 from the module's sde(), in float64."""
    tt = torch.tensor(t, dtype=torch.float64)
    f0, g = sde.sde(torch.zeros(len(t), 1, dtype=torch.float64), tt)
    f1, _ = sde.sde(torch.ones(len(t), 1, dtype=torch.float64), tt)
    return (f1 - f0).reshape(-1).numpy(), f0.reshape(-1).numpy(), (g**2).reshape(-1).numpy() * np.ones(len(t))


def _kernel(sde, t: np.ndarray) -> dict[str, np.ndarray]:
    tt = torch.tensor(t, dtype=torch.float64)
    return {"m": sde.mean_coeff(tt).reshape(-1).numpy() * np.ones(len(t)),
            "c": sde.mean_offset(tt).reshape(-1).numpy() * np.ones(len(t)),
            "std": sde.std(tt).reshape(-1).numpy() * np.ones(len(t)),
            "log_snr": sde.log_snr(tt).reshape(-1).numpy() * np.ones(len(t))}


def _assert_close(actual, expected, rtol=RTOL, what=""):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, err_msg=what)


def _times(sde, n=9) -> np.ndarray:
    eps, T = float(sde.eps), float(sde.T)
    return np.unique(np.concatenate([np.geomspace(eps, T, n), np.linspace(eps, T, n)]))


def _moments_recover_kernel(sde, m, v, t) -> None:
    """Solve m' = a m, v' = 2 a v + g^2 with the module's a and g^2 from t[0], starting at the hand-written
    kernel there; the solution must be the hand-written kernel at every later t."""
    def rhs(s, y):
        a, _, g2 = _coefficients(sde, np.array([s]))
        return [a[0] * y[0], 2 * a[0] * y[1] + g2[0]]
    sol = solve_ivp(rhs, (t[0], t[-1]), [m(t[0]), v(t[0])], t_eval=t, method="DOP853", rtol=1e-11, atol=1e-14)
    assert sol.success
    _assert_close(sol.y[0], m(t), rtol=1e-7, what="m from the moment equation")
    _assert_close(sol.y[1], v(t), rtol=1e-7, what="v from the moment equation")


# -- the three examples against their formulas --------------------------------------------------------

def test_rectified_flow(examples):
    sde = examples["rectified_flow"].build()
    t = _times(sde)
    k = _kernel(sde, t)
    _assert_close(k["m"], 1 - t, what="alpha = 1 - t")
    _assert_close(k["std"], t, what="sigma = t")
    _assert_close(k["log_snr"], 2 * np.log((1 - t) / t), what="logSNR")
    assert np.all(k["c"] == 0)
    a, b, g2 = _coefficients(sde, t)
    _assert_close(a, -1 / (1 - t), what="a = -1/(1 - t)")
    _assert_close(g2, 2 * t / (1 - t), what="g^2 = 2t/(1 - t)")
    assert np.all(b == 0)
    assert float(sde.v0) == 0
    _moments_recover_kernel(sde, lambda s: 1 - s, lambda s: s**2, t)


@settings(max_examples=10)
@given(gamma_min=st.floats(-15.0, -8.0), gamma_max=st.floats(2.0, 8.0))
def test_vdm(examples, gamma_min, gamma_max):
    sde = examples["vdm"].build(dict(gamma_min=gamma_min, gamma_max=gamma_max))
    t = _times(sde)
    lam = -(gamma_min + (gamma_max - gamma_min) * t)
    rate = -(gamma_max - gamma_min)  # d lam / dt
    k = _kernel(sde, t)
    _assert_close(k["m"], np.sqrt(expit(lam)), what="alpha^2 = sigmoid(logSNR)")
    _assert_close(k["std"], np.sqrt(expit(-lam)), what="sigma^2 = sigmoid(-logSNR)")
    _assert_close(k["log_snr"], lam, what="logSNR as given")
    a, _, g2 = _coefficients(sde, t)
    _assert_close(a, rate * expit(-lam) / 2, what="a = lam' sigmoid(-lam) / 2")
    _assert_close(g2, -rate * expit(-lam), what="g^2 = -lam' sigmoid(-lam)")
    _assert_close(float(sde.v0), expit(gamma_min), what="v0 = sigma(0)^2")


@settings(max_examples=10)
@given(beta_d=st.floats(5.0, 30.0), beta_min=st.floats(0.05, 1.0))
def test_edm_vp_is_vp(examples, beta_d, beta_min):
    """EDM's (s(t), sigma(t)) form of VP: the derived SDE is VP's, dx = -beta/2 x dt + sqrt(beta) dw."""
    sde = examples["edm_vp"].build(dict(beta_d=beta_d, beta_min=beta_min))
    t = _times(sde)
    B = beta_min * t + beta_d * t**2 / 2
    k = _kernel(sde, t)
    _assert_close(k["m"], np.exp(-B / 2), what="m = exp(-B/2)")
    _assert_close(k["std"], np.sqrt(-np.expm1(-B)), what="sigma = sqrt(1 - exp(-B))")
    a, _, g2 = _coefficients(sde, t)
    _assert_close(a, -(beta_min + beta_d * t) / 2, what="a = -beta/2")
    _assert_close(g2, beta_min + beta_d * t, what="g^2 = beta")


def test_show_prints_the_derived_sde(capsys):
    from sdelang.cli import main
    assert main(["show", "examples/rectified_flow.sde"]) == 0
    out = capsys.readouterr().out
    assert "x(t) ~ normal(x(0)*(1 - t), t**2)" in out
    assert "dx = (x/(t - 1)) dt + sqrt(-2*t/(t - 1)) dw" in out


# -- random kernel-form programs ------------------------------------------------------------------------

# alpha(t) as written, alpha and alpha' by hand, and whether T must stay below 1 (a zero of alpha at 1).
ALPHAS = {
    "(1 - t)^{p}": (lambda t, p: (1 - t) ** p, lambda t, p: -p * (1 - t) ** (p - 1), True),
    "exp(-{p} * t^2)": (lambda t, p: np.exp(-p * t**2), lambda t, p: -2 * p * t * np.exp(-p * t**2), False),
    "cos(pi / 2 * t)^{p}": (lambda t, p: np.cos(np.pi * t / 2) ** p,
                            lambda t, p: -p * np.pi / 2 * np.sin(np.pi * t / 2) * np.cos(np.pi * t / 2) ** (p - 1),
                            True),
    "1": (lambda t, p: np.ones_like(t), lambda t, p: np.zeros_like(t), False),
}
# sigma(t)^2 as written, with v and v' by hand: each increases, so with alpha' <= 0, g^2 > 0.
VARIANCES = {
    "{q}^2 * t^(2 * {r})": (lambda t, q, r: q**2 * t ** (2 * r), lambda t, q, r: 2 * r * q**2 * t ** (2 * r - 1)),
    "{q} + t^2": (lambda t, q, r: q + t**2, lambda t, q, r: 2 * t),
    "expm1({r} * t)": (lambda t, q, r: np.expm1(r * t), lambda t, q, r: r * np.exp(r * t)),
}


@st.composite
def kernel_programs(draw):
    alpha_text = draw(st.sampled_from(sorted(ALPHAS)))
    var_text = draw(st.sampled_from(sorted(VARIANCES)))
    p = draw(st.sampled_from([0.5, 1, 2, 3]))
    q = draw(st.sampled_from([0.1, 0.5, 2]))
    r = draw(st.sampled_from([0.5, 1, 1.5]))
    below_pole = ALPHAS[alpha_text][2]
    T = draw(st.sampled_from([0.5, 0.9, 0.99] if below_pole else [0.5, 1, 3]))
    text = (f"sde family\nx(t) ~ normal({alpha_text.format(p=p)} * x(0), {var_text.format(q=q, r=r)})\n"
            f"t in [1e-3, {T}]\n")
    return text, alpha_text, var_text, p, q, r


@settings(max_examples=8)
@given(kernel_programs())
def test_random_kernel_forms_against_hand_formulas(program):
    text, alpha_text, var_text, p, q, r = program
    sde = sdelang.load(text).double()
    alpha, dalpha, _ = ALPHAS[alpha_text]
    v, dv = VARIANCES[var_text]
    t = _times(sde)
    k = _kernel(sde, t)
    _assert_close(k["m"], alpha(t, p), what=text)
    _assert_close(k["std"], np.sqrt(v(t, q, r)), what=text)
    _assert_close(k["log_snr"], np.log(alpha(t, p) ** 2 / v(t, q, r)), rtol=1e-9, what=text)
    a_hand = dalpha(t, p) / alpha(t, p)
    a, b, g2 = _coefficients(sde, t)
    np.testing.assert_allclose(a, a_hand, rtol=RTOL, atol=1e-300, err_msg=text)
    _assert_close(g2, dv(t, q, r) - 2 * a_hand * v(t, q, r), what=text)
    assert np.all(b == 0)
    _assert_close(float(sde.v0), v(np.array([0.0]), q, r)[0], what="v0 = sigma(0)^2")
    _moments_recover_kernel(sde, lambda s: alpha(s, p), lambda s: v(s, q, r), t)


@st.composite
def log_snr_programs(draw):
    """lam(t) = hi - (hi - lo) t^k, decreasing, with lam' = -k (hi - lo) t^(k - 1) by hand."""
    hi = draw(st.sampled_from([6.0, 10.0, 15.0]))
    lo = draw(st.sampled_from([-10.0, -5.0, 0.0]))
    k = draw(st.sampled_from([0.5, 1, 2]))
    return hi, lo, k


@settings(max_examples=6)
@given(log_snr_programs())
def test_random_log_snr_forms_against_hand_formulas(program):
    hi, lo, k = program
    sde = sdelang.load(f"sde fam\nlogsnr(t) = {hi} - ({hi - lo}) * t^{k}\nt in [1e-4, 1]\n").double()
    t = _times(sde)
    lam = hi - (hi - lo) * t**k
    rate = -k * (hi - lo) * t ** (k - 1)
    kern = _kernel(sde, t)
    _assert_close(kern["m"], np.sqrt(expit(lam)))
    _assert_close(kern["std"], np.sqrt(expit(-lam)))
    _assert_close(kern["log_snr"], lam, rtol=1e-9)
    a, _, g2 = _coefficients(sde, t)
    _assert_close(a, rate * expit(-lam) / 2)
    _assert_close(g2, -rate * expit(-lam))
    _moments_recover_kernel(sde, lambda s: np.sqrt(expit(hi - (hi - lo) * s**k)),
                            lambda s: expit(-(hi - (hi - lo) * s**k)), t)


# -- refusals, located ------------------------------------------------------------------------------------

@settings(max_examples=8)
@given(c=st.sampled_from([0.5, 1.0, 2.0]), f=st.sampled_from([0.2, 0.5, 0.9]))
def test_shrinking_noise_is_refused_where_written(c, f):
    """sigma / alpha = t (c - t) peaks at c/2: on [eps, T], c/2 < T < c, logSNR increases after the peak."""
    T = c / 2 * (1 + f)
    text = f"sde shrink\n\nx(t) ~ normal(x(0), (t * ({c} - t))^2)\nt in [1e-3, {T}]\n"
    with pytest.raises(SdeError) as info:
        compile_source(Source(text, "shrink.sde"))
    err = info.value
    assert "does not decrease" in err.message
    where = float(err.message.split("at t = ")[1].split()[0])
    assert c / 2 <= where <= c / 2 + T / 256  # the first point of the checker's grid past the peak
    assert (err.span.line, err.span.column) == (3, 21)  # the variance
    rendered = err.render()
    assert rendered.startswith("shrink.sde:3:21: error:") and "^~" in rendered and "hint:" in rendered


@settings(max_examples=6)
@given(slope=st.sampled_from([0.5, 3.0, 20.0]), start=st.sampled_from([-10.0, 0.0, 4.0]))
def test_increasing_log_snr_is_refused_where_written(slope, start):
    text = f"sde rising\nlogsnr(t) = {start} + {slope} * t\n"
    with pytest.raises(SdeError) as info:
        compile_source(Source(text, "rising.sde"))
    assert info.value.message.startswith("logsnr(t) increases")
    assert (info.value.span.line, info.value.span.column) == (2, 13)


@pytest.mark.parametrize("text", ["x(t) ~ normal((1 - t) * x(0), t^2)",
                                  "dx = -x / (1 - t) dt + sqrt(2 * t / (1 - t)) dw"])
def test_a_pole_at_T_says_to_stop_before_it(text):
    with pytest.raises(SdeError) as info:
        compile_source(Source(f"sde pole\n{text}\nt in [1e-3, 1]\n", "pole.sde"))
    assert "t in [0.001, 0.999]" in info.value.hint
    assert "square root" not in info.value.hint
    assert math.isclose(float(info.value.message.split("at t = ")[1].split()[0]), 1.0)


def test_kernel_with_a_mean_offset_is_ornstein_uhlenbeck():
    """N(e^-t x0 + mu (1 - e^-t), 1 - e^-2t) is the law of dx = -(x - mu) dt + sqrt(2) dw from x(0) = x0."""
    text = "sde ou_kernel\nparam mu: real = 0.7\nx(t) ~ normal(exp(-t) * x(0) + mu * (1 - exp(-t)), 1 - exp(-2 * t))\n"
    sde = sdelang.load(text).double()
    t = _times(sde)
    k = _kernel(sde, t)
    _assert_close(k["m"], np.exp(-t))
    _assert_close(k["c"], 0.7 * -np.expm1(-t))
    _assert_close(k["std"], np.sqrt(-np.expm1(-2 * t)))
    a, b, g2 = _coefficients(sde, t)
    _assert_close(a, -np.ones_like(t))
    _assert_close(b, 0.7 * np.ones_like(t))
    _assert_close(g2, 2 * np.ones_like(t))


@pytest.mark.parametrize("mean", ["(1 - t) * x(0) + x(t)", "x(t) * 0 + x(0)", "x(0.5) + x(0)"])
def test_the_state_at_another_time_in_a_kernel_is_named_as_such(mean):
    """x(t) in its own kernel's mean was reported as 'the time cannot depend on the time t' (its argument checked as
    a constant first); every argument but 0 now gets the kernel's own message, at the call."""
    with pytest.raises(sdelang.SdeError, match=r"in a kernel, 'x' appears only as the data x\(0\)") as info:
        sdelang.load(f"sde k\nx(t) ~ normal({mean}, t^2)\n")
    assert "cannot depend on the time" not in str(info.value)


def test_a_kernel_with_a_parameter_in_its_exponent_compiles_and_is_right():
    """EDM's sigma(t) = (smin^(1/rho) + t (smax^(1/rho) - smin^(1/rho)))^rho with rho a parameter, VP-scaled: putting
    the defaults into the candidate forms (rho = 3 into powers of sums of cube roots) did not end, and the compile
    ran into its 60 s bound. Those evaluations are bounded now; m, sigma and the step's G against the formulas by
    hand, at rho = 3 and 7."""
    text = ("sde karras_vp\nparam smin = 0.002\nparam smax = 80\nparam rho = 3\n"
            "sigma(t) = (smin^(1/rho) + t * (smax^(1/rho) - smin^(1/rho)))^rho\n"
            "x(t) ~ normal(x(0) / sqrt(1 + sigma(t)^2), sigma(t)^2 / (1 + sigma(t)^2))\n"
            "weighting likelihood\nt ~ importance\n")
    module = sdelang.load_module(text)
    t = np.concatenate([np.geomspace(1e-5, 1.0, 30), np.linspace(0.01, 1.0, 30)])
    s = np.maximum(t - 1e-3, 0.0)
    for rho in (3.0, 7.0):
        sde = module.SDE(rho=rho).double()
        lo, hi = 0.002 ** (1 / rho), 80 ** (1 / rho)
        sigma = (lo + t * (hi - lo)) ** rho
        sigma_s = (lo + s * (hi - lo)) ** rho
        kernel = _kernel(sde, t)
        np.testing.assert_allclose(kernel["m"], 1 / np.sqrt(1 + sigma**2), rtol=RTOL)
        np.testing.assert_allclose(kernel["std"], sigma / np.sqrt(1 + sigma**2), rtol=RTOL)
        _, G = sde.discretize(torch.zeros(len(t), 1, dtype=torch.float64), torch.tensor(t), torch.tensor(s))
        # G^2 = v(t) - r^2 v(s) = (sigma_t^2 - sigma_s^2) / (1 + sigma_t^2), the difference written as a factored sum
        want = np.sqrt((sigma - sigma_s) * (sigma + sigma_s) / (1 + sigma**2))
        np.testing.assert_allclose(G.reshape(-1).numpy(), want, rtol=1e-9)


@pytest.mark.parametrize("r", [0.25, 4.0])
def test_a_shifted_cosine_steps_keep_their_digits(r):
    """The shifted cosine logSNR (-2 log tan(pi t / 2) + 2 log r) has m = r / sqrt(r^2 + tan(pi t / 2)^2); a step's
    r - 1 was the ratio of two such roots minus 1, which kept ~u / |r - 1| of itself: 2.4e-6 relative at r = 4,
    t = 1.5e-5 over a step of 1e-5 (r - 1 ~ 1.5e-11). tan^2 - tan^2 by its sum-to-product identity keeps every
    digit. Against mpmath at 50 digits; the bound is float64 rounding of a few operations (1e-12 relative)."""
    mpmath = pytest.importorskip("mpmath")
    sde = sdelang.load("sde shifted\nparam r = 0.25\nlogsnr(t) = -2 * log(tan(pi * t / 2)) + 2 * log(r)\n"
                       "t in [1e-5, 0.999]\n", r=r).double()
    t = np.concatenate([np.geomspace(2e-5, 0.99, 12)] * 2)
    s = t - np.repeat([1e-5, 1e-7], 12)
    f, _ = sde.discretize(torch.ones(len(t), 1, dtype=torch.float64), torch.tensor(t), torch.tensor(s))
    with mpmath.workdps(50):
        def m(u):
            return r / mpmath.sqrt(r**2 + mpmath.tan(mpmath.pi * mpmath.mpf(u) / 2) ** 2)
        want = np.array([float(m(a) / m(b) - 1) for a, b in zip(t, s)])
    _assert_close(f.reshape(-1).numpy(), want, rtol=1e-12, what="r - 1 of a step")


def test_inverse_cdf_of_a_quadratic_root_at_log_snr_zero():
    """Rectified flow with sigma^2 = smin^2 + t^2: logSNR(t) = L gives (1 - E) t^2 + 2 E t + smin^2 - E = 0, E = e^-L,
    and the root (W - sqrt(D)) / (W - 1) was a 0/0 at logSNR = 0 (W = 1): t_icdf 1e-4 off for u within 1e-13 of that
    u0, 6e-6 at 1e-12. Its rationalized form with W - 1 cancelled, (W - smin^2) / (W + sqrt(D)), has no such point,
    and forms that divide by 0 inside the range are left out. Against mpmath's root of Q(t) = u (40 digits): 1e-13."""
    sde = sdelang.load("sde fm_noisy\nparam smin = 0.01\nx(t) ~ normal((1 - t) * x(0), smin^2 + t^2)\n"
                       "t in [1e-5, 0.999]\nweighting likelihood\nt ~ importance\n").double()
    with mpmath.workdps(40):
        smin, eps, T = mpmath.mpf("0.01"), mpmath.mpf(1e-5), mpmath.mpf(0.999)

        def lam(t):
            return 2 * mpmath.log1p(-t) - mpmath.log(smin**2 + t**2)

        def Q(t):
            return (lam(eps) - lam(t)) / (lam(eps) - lam(T))

        t0 = (1 - smin**2) / 2   # logSNR(t0) = 0
        u0 = float(Q(t0))
        for du in (0.0, 1e-15, 1e-13, -1e-13, 1e-12, 1e-10, -1e-10, 1e-6):
            u = u0 + du
            exact = mpmath.findroot(lambda x: Q(x) - mpmath.mpf(u), t0)
            got = float(sde.t_icdf(torch.tensor([u], dtype=torch.float64))[0])
            assert abs(got - float(exact)) <= 1e-13 * float(exact), (du, got, float(exact))
