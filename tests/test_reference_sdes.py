"""The golden VE, VP and sub-VP modules against score_sde's formulas, written out here independently.

score_sde (Song et al. 2021, sde_lib.py) defines the three SDEs by closed forms: the classes below
restate them in float64 NumPy, from the paper and MATH.md, not from the compiler's derivation.
Each test draws parameters from conftest's PARAM_RANGES and times in [eps, T] (Hypothesis, 'ci'
profile) and compares the generated module, in float64, with the reference.

Tolerance. Both sides are short float64 expressions of t. Evaluating such an expression rounds each
intermediate by at most u = 2^-53 relative, and a rounding of an intermediate that depends on t acts
like a relative perturbation of t of that size, which moves f(t) by |t f'(t)| u. So the two sides
agree to within K u (|f| + |t f'(t)|) (absolute near a zero of f, such as logSNR's, relative
elsewhere), where K = 8 bounds the number of roundings along the longest chain of either expression
(the references have at most 6; a larger K would hide real disagreements of a few ulp times 10).
t f'(t) is taken from the reference by a central difference (it only sets a scale).
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from test_identities import F64, assert_close, batch_view, states

U64 = 2.0**-53  # float64 unit roundoff
K = 8  # roundings on the longest chain of one expression (module docstring)


def t_derivative(fn, t):
    """t f'(t) by a central difference in log t, accurate to ~1e-10 relative: enough for a tolerance scale."""
    h = 1e-6
    return (fn(t * (1 + h)) - fn(t * (1 - h))) / (2 * h)


def size(fn, t):
    """|f(t)| + |t f'(t)|: the scale of the rounding error of an expression f of t."""
    return np.abs(fn(t)) + np.abs(t_derivative(fn, t))


# --- score_sde's reference SDEs (float64 NumPy) ---------------------------------------------------

@dataclass(frozen=True)
class VE:
    """VESDE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min)).

    The kernel is N(x0, sigma(t)^2 I) (score_sde perturbs data by sigma(t) at every t, so v(0) = sigma_min^2),
    and the prior N(0, sigma_max^2 I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    prior_variance = property(lambda self: self.sigma_max**2)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def a(self, t):
        return np.zeros_like(t)

    def g(self, t):
        return self.sigma(t) * np.sqrt(2 * np.log(self.sigma_max / self.sigma_min))

    def log_mean_coeff(self, t):
        return np.zeros_like(t)

    def std(self, t):
        return self.sigma(t)

    def log_snr(self, t):
        return -2 * np.log(self.sigma(t))

    def step_variance(self, t, s):
        """G^2 = sigma(t)^2 - sigma(s)^2, written as sigma(s)^2 expm1(2 (t - s) log(sigma_max / sigma_min)),
        the same number without the cancellation of the difference."""
        return self.sigma(s) ** 2 * np.expm1(2 * (t - s) * np.log(self.sigma_max / self.sigma_min))


@dataclass(frozen=True)
class VP:
    """VPSDE: beta(t) = beta_min + t (beta_max - beta_min), f = -beta x / 2, g = sqrt(beta),
    log_mean_coeff = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, std = sqrt(1 - exp(2 log_mean_coeff)),
    prior N(0, I).

    1 - exp(y) is written -expm1(y) throughout: the same number, without float64 losing ~6 digits at t = 1e-5.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    prior_variance = 1.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def a(self, t):
        return -self.beta(t) / 2

    def g(self, t):
        return np.sqrt(self.beta(t))

    def log_mean_coeff(self, t):
        return -t**2 * (self.beta_max - self.beta_min) / 4 - t * self.beta_min / 2

    def std(self, t):
        return np.sqrt(-np.expm1(2 * self.log_mean_coeff(t)))

    def log_snr(self, t):
        lmc = self.log_mean_coeff(t)
        return 2 * lmc - np.log(-np.expm1(2 * lmc))

    def _lmc_difference(self, t, s):
        """log_mean_coeff(t) - log_mean_coeff(s), factored so that it keeps its digits when s is close to t."""
        return -(t - s) * ((t + s) * (self.beta_max - self.beta_min) / 4 + self.beta_min / 2)

    def step_variance(self, t, s):
        """G^2 = v(t) - r^2 v(s) with r = m(t) / m(s): here 1 - exp(2 (lmc(t) - lmc(s)))."""
        return -np.expm1(2 * self._lmc_difference(t, s))


@dataclass(frozen=True)
class SubVP(VP):
    """subVPSDE: VP's drift, g = sqrt(beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2))),
    std = 1 - exp(2 log_mean_coeff) (no square root), prior N(0, I)."""

    def g(self, t):
        discount = -np.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return np.sqrt(self.beta(t) * discount)

    def std(self, t):
        return -np.expm1(2 * self.log_mean_coeff(t))

    def log_snr(self, t):
        lmc = self.log_mean_coeff(t)
        return 2 * lmc - 2 * np.log(-np.expm1(2 * lmc))

    def step_variance(self, t, s):
        """G^2 = v(t) - r^2 v(s) with v = (1 - e^{2 lmc})^2, r^2 = e^{2 (lmc(t) - lmc(s))}; with A = e^{2 lmc(t)},
        B = e^{2 lmc(s)} this is (1 - A)^2 - (A / B)(1 - B)^2 = (1 - A / B)(1 - A B)."""
        both = self.log_mean_coeff(t) + self.log_mean_coeff(s)
        return np.expm1(2 * self._lmc_difference(t, s)) * np.expm1(2 * both)


REFERENCES = {"ve": VE, "vp": VP, "subvp": SubVP}
DEFAULTS = {"ve": {"sigma_min": 0.01, "sigma_max": 50.0}, "vp": {"beta_min": 0.1, "beta_max": 20.0},
            "subvp": {"beta_min": 0.1, "beta_max": 20.0}}
NAMES = list(REFERENCES)


def draw_case(data, example):
    """(module in float64, its reference, times) for drawn parameters; t = eps is always among the times."""
    params = data.draw(example.params(), label="params")
    sde = example.build(params)
    t = torch.cat([torch.tensor([float(sde.eps)], dtype=F64), data.draw(example.times(sde), label="t")])
    return sde, REFERENCES[example.name](**params), t


def check(actual, fn, t, what, *, scale_x=None):
    """actual = fn(t) within K u (|f| + |t f'|) (module docstring); scale_x multiplies for x-dependent terms."""
    tn = t.numpy()
    expected, scale = torch.from_numpy(fn(tn)), torch.from_numpy(size(fn, tn))
    if scale_x is not None:
        expected, scale = batch_view(expected, scale_x) * scale_x, batch_view(scale, scale_x) * scale_x.abs()
    assert_close(actual, expected, scale, K * U64, what, t)


# --- Defaults --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_score_sde_defaults(examples, name):
    """Constructor defaults are score_sde's (sigma 0.01..50, beta 0.1..20, N = 1000), eps = 1e-5, T = 1."""
    module = examples[name].module
    signature = inspect.signature(module.SDE)
    defaults = {k: p.default for k, p in signature.parameters.items()}
    expected = {**DEFAULTS[name], "N": 1000}
    assert {k: defaults.get(k) for k in expected} == expected
    sde = module.SDE()
    assert (sde.eps, sde.T, sde.N) == (1e-5, 1, 1000)
    for param, value in DEFAULTS[name].items():
        assert getattr(sde, param) == value


# --- Forward SDE, kernel, logSNR -------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_sde_is_reference(examples, name, data):
    """sde(x, t) = (a(t) x, g(t)) and diffusion(t) = g(t), with score_sde's a and g."""
    sde, ref, t = draw_case(data, examples[name])
    x = states(data, t.shape[0])
    drift, g = sde.sde(x, t)
    check(drift, ref.a, t, f"{name} drift", scale_x=x)
    check(g, ref.g, t, f"{name} diffusion")
    check(sde.diffusion(t), ref.g, t, f"{name} diffusion(t)")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_marginal_prob_is_reference(examples, name, data):
    """marginal_prob(x0, t) = (exp(log_mean_coeff) x0, std); mean_coeff, mean_offset = 0 and std alike."""
    sde, ref, t = draw_case(data, examples[name])
    x0 = states(data, t.shape[0])
    mean, std = sde.marginal_prob(x0, t)

    def m(t):
        return np.exp(ref.log_mean_coeff(t))

    check(mean, m, t, f"{name} marginal mean", scale_x=x0)
    check(std, ref.std, t, f"{name} marginal std")
    check(sde.mean_coeff(t), m, t, f"{name} mean_coeff")
    assert torch.equal(sde.mean_offset(t), torch.zeros_like(t))
    check(sde.std(t), ref.std, t, f"{name} std")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_log_snr_is_reference(examples, name, data):
    """log_snr = log(mean_coeff^2 / std^2) of the reference (absolute near its zero, relative elsewhere)."""
    sde, ref, t = draw_case(data, examples[name])
    check(sde.log_snr(t), ref.log_snr, t, f"{name} logSNR")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_drift_divergence_is_reference(examples, name, data):
    """drift_divergence(x, t) = d a(t) for x in R^d (score_sde's likelihood uses the trace of df/dx)."""
    sde, ref, t = draw_case(data, examples[name])
    x = states(data, t.shape[0])
    d = x[0].numel()
    check(sde.drift_divergence(x, t), lambda t: d * ref.a(t), t, f"{name} divergence")


# --- Reverse SDE ------------------------------------------------------------------------------------

def _score(x, t):
    """Any function serves as the score: score_sde's reverse() is defined for an arbitrary score_fn."""
    return torch.cos(2 * x) - batch_view(t, x) * x


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("probability_flow", [False, True])
@given(data=st.data())
def test_reverse_sde_is_reference(examples, name, probability_flow, data):
    """score_sde's reverse(): drift f - g^2 s (flow: f - g^2 s / 2), diffusion g (flow: 0)."""
    sde, ref, t = draw_case(data, examples[name])
    x = states(data, t.shape[0])
    drift, g = sde.reverse(_score, probability_flow=probability_flow).sde(x, t)
    half = 0.5 if probability_flow else 1.0
    tn, s = t.numpy(), _score(x, t)
    g2 = torch.from_numpy(ref.g(tn) ** 2)
    expected = batch_view(torch.from_numpy(ref.a(tn)), x) * x - half * batch_view(g2, x) * s
    # Two terms, each within K u of its own size: a x (|a x| + |t a' x|) and g^2 s (|g^2 s| + |t (g^2)' s|).
    scale = (batch_view(torch.from_numpy(size(ref.a, tn)), x) * x.abs()
             + batch_view(torch.from_numpy(size(lambda t: ref.g(t) ** 2, tn)), x) * s.abs())
    assert_close(drift, expected, scale, K * U64, f"{name} reverse drift", t)
    if probability_flow:
        assert torch.equal(g, torch.zeros_like(g))
    else:
        check(g, ref.g, t, f"{name} reverse diffusion")


# --- Discretisation ---------------------------------------------------------------------------------
# score_sde's VESDE.discretize rounds t to an index of a geometric grid and takes G = sqrt(sigma_i^2 -
# sigma_{i-1}^2) with sigma_{-1} = 0; VPSDE.discretize uses beta_i = linspace(beta_min, beta_max, N) / N.
# sdelang's discretize is instead the exact transition of the SDE over [s, t], s = max(t - T/N, 0):
# f = (r - 1) x with r = m(t) / m(s), G^2 = v(t) - r^2 v(s). We test that exact-transition formula,
# written with the references' own m and v (for VE: f = 0, G^2 = sigma(t)^2 - sigma(s)^2).

def step_start(sde, t):
    return torch.clamp(t - sde.T / sde.N, min=0.0)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data(), N=st.sampled_from([1, 10, 1000]))
def test_discretize_drift_is_exact_transition(examples, name, data, N):
    """discretize: f = (m(t) / m(s) - 1) x, s = max(t - T/N, 0) (VE: f = 0), within K u of its terms' sizes."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde, ref = example.build(params, N=N), REFERENCES[name](**params)
    t = torch.cat([torch.tensor([float(sde.eps)], dtype=F64), data.draw(example.times(sde), label="t")])
    x = states(data, t.shape[0])
    s = step_start(sde, t).numpy()
    f, _ = sde.discretize(x, t)

    def r(t):  # s is held fixed: only the t of the numerator m(t) varies
        return np.exp(ref.log_mean_coeff(t) - ref.log_mean_coeff(s))

    # f = r x - x: the terms are r x and x, so the rounding scale is (|r| + |t r'| + 1) |x|. f only enters
    # the step through x_s + f, whose own rounding is u |x|: an error of that size in f is invisible.
    tn = t.numpy()
    expected = batch_view(torch.from_numpy(r(tn) - 1), x) * x
    scale = batch_view(torch.from_numpy(size(r, tn) + 1), x) * x.abs()
    assert_close(f, expected, scale, K * U64, f"{name} step drift", t)


def step_noise_tolerance(ref, t, s, G2):
    """Relative tolerance of G = sqrt(v(t) - r^2 v(s)) as a function of two inputs t and s.

    dG^2/dt = 2 a(t) G^2 + g(t)^2 and dG^2/ds = -r^2 g(s)^2 (from v' = 2 a v + g^2), so the relative
    condition numbers of G are kappa_t = t |2 a G^2 + g^2| / (2 G^2) and kappa_s = s r^2 g(s)^2 / (2 G^2).
    Both are ~ s / (2 T/N) for a small step: G is a difference of two nearby quantities, and any
    evaluation that rounds t- and s-dependent intermediates pays that. Tolerance: K u (1 + kappa_t + kappa_s).
    """
    r2 = np.exp(2 * (ref.log_mean_coeff(t) - ref.log_mean_coeff(s)))
    kappa_t = t * np.abs(2 * ref.a(t) * G2 + ref.g(t) ** 2) / (2 * G2)
    kappa_s = s * r2 * ref.g(s) ** 2 / (2 * G2)
    return 1 + kappa_t + kappa_s


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@given(data=st.data(), N=st.sampled_from([1, 10, 1000]))
def test_discretize_noise_is_exact_transition(examples, name, data, N):
    """discretize: G^2 = v(t) - (m(t) / m(s))^2 v(s), s = max(t - T/N, 0) (VE: sigma(t)^2 - sigma(s)^2),
    within K u times the conditioning of G in (t, s) (step_noise_tolerance)."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde, ref = example.build(params, N=N), REFERENCES[name](**params)
    t = torch.cat([torch.tensor([float(sde.eps)], dtype=F64), data.draw(example.times(sde), label="t")])
    s = step_start(sde, t).numpy()
    _, G = sde.discretize(torch.zeros(t.shape[0], 3, dtype=F64), t)
    G2 = ref.step_variance(t.numpy(), s)
    expected = torch.from_numpy(np.sqrt(G2))
    rtol = torch.from_numpy(step_noise_tolerance(ref, t.numpy(), s, G2))
    assert_close(G, expected, expected * rtol, K * U64, f"{name} step noise G", t)


@given(data=st.data(), N=st.integers(2, 2000))
def test_vp_discretize_agrees_with_score_sde_to_first_order(examples, data, N):
    """VP: sdelang's G^2 and score_sde's beta_i = beta(i / (N - 1)) / N, i = floor(t (N - 1)), differ by O(1/N^2).

    With h = 1/N and Delta B = int_s^t beta = h beta(t - h/2) (beta is linear; t >= h), the exact
    G^2 = 1 - exp(-Delta B) has |G^2 - Delta B| <= Delta B^2 / 2, and |i/(N-1) - (t - h/2)| <= 1/(N-1) gives
    |Delta B - beta_i| <= h (beta_max - beta_min) / (N - 1). Both terms are O(h^2) while G^2 = O(h).
    """
    params = data.draw(examples["vp"].params(), label="params")
    sde, ref = examples["vp"].build(params, N=N), VP(**params)
    h = 1 / N
    t = data.draw(st.lists(st.floats(h, 1.0), min_size=1, max_size=6), label="t")
    t = torch.tensor(t, dtype=F64)
    _, G = sde.discretize(torch.zeros(t.shape[0], 1, dtype=F64), t)
    i = torch.floor(t * (N - 1))
    beta_i = torch.from_numpy(ref.beta(i.numpy() / (N - 1))) * h
    dB = h * torch.from_numpy(ref.beta(t.numpy() - h / 2))
    bound = h * (ref.beta_max - ref.beta_min) / (N - 1) + dB**2 / 2
    rounding = K * U64 * (G**2 + beta_i)  # both sides are float64 values of their own formulas
    assert bool(((G**2 - beta_i).abs() <= bound + rounding).all()), (G**2, beta_i, bound)


# --- Prior ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_prior_logp_is_reference(examples, name, data):
    """score_sde's prior_logp: -d/2 log(2 pi var) - |z|^2 / (2 var), var = sigma_max^2 (VE) or 1 (VP, sub-VP).
    Sums of d = 6 terms of size |z|^2 / var and log(2 pi var): K u relative to the sum of their sizes."""
    example = examples[name]
    params = data.draw(example.params(), label="params")
    sde, ref = example.build(params), REFERENCES[name](**params)
    var = ref.prior_variance
    z = math.sqrt(var) * states(data, data.draw(st.integers(1, 4), label="batch"), scale=2.0)
    d = z[0].numel()
    sq = (z**2).flatten(1).sum(1)
    expected = -d / 2 * math.log(2 * math.pi * var) - sq / (2 * var)
    scale = d / 2 * abs(math.log(2 * math.pi * var)) + sq / (2 * var)
    assert_close(sde.prior_logp(z), expected, scale, K * U64, f"{name} prior_logp")


@pytest.mark.parametrize("name", NAMES)
def test_prior_sampling_has_reference_scale(examples, name):
    """prior_sampling draws N(0, var I): with n = 60000 draws (fixed seed) the sample variance / var is within
    5 standard errors sqrt(2 / n) of 1 and the sample mean / sqrt(var) within 5 / sqrt(n) of 0."""
    sde, var = examples[name].build(), REFERENCES[name]().prior_variance
    n = 60000
    z = sde.prior_sampling((n // 3, 3), generator=torch.Generator().manual_seed(11)).flatten()
    assert abs(float(z.mean())) / math.sqrt(var) <= 5 / math.sqrt(n)
    assert abs(float(z.var()) / var - 1) <= 5 * math.sqrt(2 / n)


# --- Weighting and training times match the source files -------------------------------------------

def declared(name):
    """(weighting, t sampling) as written in examples/<name>.sde, with the language's defaults
    (docs/language.md: weighting likelihood, t ~ uniform)."""
    text = (ROOT / "examples" / f"{name}.sde").read_text()
    code = [line.split("#")[0].strip() for line in text.splitlines()]
    weighting = [line.split(None, 1)[1] for line in code if re.match(r"weighting\s", line)]
    sampling = [line.split("~", 1)[1].strip() for line in code if re.match(r"t\s*~", line)]
    return (weighting or ["likelihood"])[0], (sampling or ["uniform"])[0]


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_weighting_and_t_sampling_match_source(examples, name):
    """The module's weighting and t_sampling attributes are those examples/<name>.sde declares."""
    module = examples[name].module
    assert (module.SDE.weighting, module.SDE.t_sampling) == declared(name)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_weight_and_t_distribution_are_reference(examples, name, data):
    """weight = sigma^2 (score_matching) or g^2 (likelihood), by the source; uniform t on [eps, T]:
    q = 1 / (T - eps), Q(t) = (t - eps) / (T - eps), Q^-1(u) = eps + u (T - eps) (as score_sde samples t)."""
    sde, ref, t = draw_case(data, examples[name])
    weighting, sampling = declared(name)
    lam = {"score_matching": lambda t: ref.std(t) ** 2, "likelihood": lambda t: ref.g(t) ** 2}[weighting]
    check(sde.weight(t), lam, t, f"{name} {weighting} weight")
    assert sampling == "uniform"
    eps, T = 1e-5, 1.0
    check(sde.t_density(t), lambda t: np.full_like(t, 1 / (T - eps)), t, f"{name} t_density")
    check(sde.t_cdf(t), lambda t: (t - eps) / (T - eps), t, f"{name} t_cdf")
    u = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), label="u") + [0.0, 1.0],
                     dtype=F64)
    # eps + u (T - eps): two roundings of terms no larger than T.
    assert_close(sde.t_icdf(u), eps + u * (T - eps), T, K * U64, f"{name} t_icdf")
