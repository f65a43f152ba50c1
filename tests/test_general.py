"""The general kind: SDEs with a drift not affine in x or a diffusion g(x, t) (docs/language.md, "Three kinds
of SDE"; MATH.md sections 2 and 7).

Four programs: the golden cubic_langevin, and three compiled here from text, each with an independent
reference written from its source by hand (REFERENCES):
- double_well: f = a x - x^3, g^2 = 2 D, whose stationary law exp((a x^2 / 2 - x^4 / 4) / D) has the score f / D;
- wobble: g(x, t)^2 = 2 + c sin(x) e^-t depends on x and t, f = (g^2)'/2 - g^2 x / 2 keeps N(0, 1) stationary
  at every t;
- spreading: f = x / 2 - x^3 / (4 (1 + t)), g^2 = 1 + x^2 / 2 carries N(0, 1) to N(0, 1 + t) (constructed from
  the Fokker-Planck equation; see test_fokker_planck).

The derivations are checked against autograd (d(g^2)/dx, div f), against the reference drifts and diffusions,
and against stationary and time-dependent solutions of the Fokker-Planck equation, in float64 over Hypothesis-
drawn parameters, times and states.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import scipy.stats
import sympy as sp
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdelang
from sdelang.compiler.derive.reverse import SCORE
from conftest import ROOT, Example, import_code
from sdelang.cli import main
from test_identities import F64, assert_close

F32 = torch.float32

DOUBLE_WELL = """\
sde double_well
param a = 1
param D = 1
dx = (a * x - x^3) dt + sqrt(2 * D) dw
t in [1e-5, 1]
prior normal(0, 1)
weighting likelihood
"""

WOBBLE = """\
sde wobble
param c = 1
h(x, t) = 2 + c * sin(x) * exp(-t)
dx = (c * cos(x) * exp(-t) / 2 - h(x, t) * x / 2) dt + sqrt(h(x, t)) dw
t in [1e-5, 2]
prior normal(0, 1)
weighting exp(-t)
"""

SPREADING = """\
sde spreading
dx = (x / 2 - x^3 / (4 * (1 + t))) dt + sqrt(1 + x^2 / 2) dw
t in [1e-5, 2]
prior normal(0, 3)
weighting 1
"""


@dataclass(frozen=True)
class Reference:
    """A general SDE written out by hand from its source: f(x, t, p), g^2(x, t, p), lambda(t, p), the prior, and
    the score of a law the SDE leaves stationary (None if there is none)."""

    f: Callable
    f_terms: Callable  # the sum of |each term of f|: the scale of f's rounding errors
    g2: Callable
    weight: Callable
    prior: Callable  # p -> (mean, variance)
    stationary_score: Callable | None
    why: str  # the reason `unavailable` must give


REFERENCES = {
    "cubic_langevin": Reference(
        f=lambda x, t, p: -p["beta"] / 4 * x**3,
        f_terms=lambda x, t, p: p["beta"] / 4 * x.abs()**3,
        g2=lambda x, t, p: p["beta"] * (1 + x**2 / 2) + 0 * t,
        weight=lambda t, p: p["beta"] + 0 * t,
        prior=lambda p: (0.0, 1.0),
        stationary_score=lambda x, t, p: -x,
        why="the diffusion depends on x"),
    "double_well": Reference(
        f=lambda x, t, p: p["a"] * x - x**3 + 0 * t,
        f_terms=lambda x, t, p: p["a"] * x.abs() + x.abs()**3 + 0 * t,
        g2=lambda x, t, p: 2 * p["D"] + 0 * x + 0 * t,
        weight=lambda t, p: 2 * p["D"] + 0 * t,
        prior=lambda p: (0.0, 1.0),
        stationary_score=lambda x, t, p: (p["a"] * x - x**3) / p["D"],
        why="the drift is not affine in x"),
    "wobble": Reference(
        f=lambda x, t, p: (p["c"] * torch.cos(x) * torch.exp(-t) / 2
                           - (2 + p["c"] * torch.sin(x) * torch.exp(-t)) * x / 2),
        f_terms=lambda x, t, p: (p["c"] * torch.exp(-t) / 2 + (2 + p["c"] * torch.exp(-t)) * x.abs() / 2),
        g2=lambda x, t, p: 2 + p["c"] * torch.sin(x) * torch.exp(-t),
        weight=lambda t, p: torch.exp(-t),
        prior=lambda p: (0.0, 1.0),
        stationary_score=lambda x, t, p: -x,
        why="the diffusion depends on x"),
    "spreading": Reference(
        f=lambda x, t, p: x / 2 - x**3 / (4 * (1 + t)),
        f_terms=lambda x, t, p: x.abs() / 2 + x.abs()**3 / (4 * (1 + t)),
        g2=lambda x, t, p: 1 + x**2 / 2 + 0 * t,
        weight=lambda t, p: 1 + 0 * t,
        prior=lambda p: (0.0, 3.0),
        stationary_score=None,
        why="the diffusion depends on x"),
}
RANGES = {
    "double_well": {"a": (0.5, 2.0), "D": (0.5, 2.0)},
    "wobble": {"c": (0.05, 1.5)},  # positive (as declared), and g^2 >= 2 - c > 0
    "spreading": {},
}
TEXTS = {"double_well": DOUBLE_WELL, "wobble": WOBBLE, "spreading": SPREADING}
NAMES = ["cubic_langevin", "double_well", "wobble", "spreading"]
UNAVAILABLE_METHODS = ["marginal_prob", "mean_coeff", "mean_offset", "std", "log_snr"]


@pytest.fixture(scope="module")
def compiled() -> dict[str, sdelang.Compiled]:
    """name -> the compiler's output for every program, examples/cubic_langevin.sde included (~0.1 s each)."""
    texts = {"cubic_langevin": (ROOT / "examples" / "cubic_langevin.sde").read_text(), **TEXTS}
    return {name: sdelang.compile_source(sdelang.Source(text, f"{name}.sde")) for name, text in texts.items()}


@pytest.fixture(scope="module")
def programs(other_examples, compiled) -> dict[str, Example]:
    """name -> Example: the golden cubic_langevin and the programs above, compiled from text."""
    out = {"cubic_langevin": other_examples["cubic_langevin"]}
    for name in TEXTS:
        out[name] = Example(name, import_code(compiled[name].code, f"sdelang_test_general_{name}"), RANGES[name])
    return out


def draw(data, example):
    """A float64 module at drawn parameters, the parameters with defaults filled in, times [B] and states [B, 2, 3]."""
    params = data.draw(example.params(), label="params")
    sde = example.build(params)
    full = {name: getattr(sde, name) for name in example.ranges}
    t = data.draw(example.times(sde), label="t")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    x = 2.0 * torch.randn(t.shape[0], 2, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sde, full, t, x


def column(t, x):
    """[B] -> [B, 1, ..., 1] against x."""
    return t.reshape(t.shape + (1,) * (x.dim() - 1))


def entrywise_grad(fn, x):
    """d fn(x)_i / d x_i for an fn acting on each entry of x separately (autograd; 0 where fn keeps no graph,
    as for a constant g written with expand or full_like)."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    if not y.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


# --- The forward SDE against the source ------------------------------------------------------------------

def test_kind_and_paths(programs):
    """Every program is of the general kind: no kernel, uniform training time, no initial noise."""
    for name in NAMES:
        sde = programs[name].build()
        assert sde.kind == "general", name
        assert sde.t_sampling == "uniform" and sde.kernel_path.startswith("none"), name
        assert float(sde.v0) == 0.0, name


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_sde_is_the_source(programs, name, data):
    """sde(x, t) = (f(x, t), g(x, t)), both of x's shape, against the drift and diffusion written from the source."""
    sde, p, t, x = draw(data, programs[name])
    ref, tt = REFERENCES[name], column(t, x)
    f, g = sde.sde(x, t)
    assert f.shape == x.shape and g.shape == x.shape
    f_ref, g2_ref = ref.f(x, tt, p), ref.g2(x, tt, p)
    assert_close(f, f_ref, ref.f_terms(x, tt, p), 1e-13, "f(x, t)")
    assert_close(g**2, g2_ref, g2_ref, 1e-13, "g(x, t)^2")
    assert bool((g > 0).all())


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_noise_gradient_is_autograd(programs, name, data):
    """noise_gradient(x, t) = d(g^2)/dx entrywise, by autograd through sde()'s g."""
    sde, _, t, x = draw(data, programs[name])
    expected = entrywise_grad(lambda y: sde.sde(y, t)[1] ** 2, x)
    got = sde.noise_gradient(x, t)
    assert got.shape == x.shape
    g2 = sde.sde(x, t)[1] ** 2
    # d(g^2)/dx can vanish (double_well: g^2 constant): the scale is g^2 (1 + |x|), the size of its terms.
    assert_close(got, expected, g2 * (1 + x.abs()), 1e-13, "d(g^2)/dx")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_drift_divergence_is_trace_of_jacobian(programs, name, data):
    """drift_divergence(x, t) = sum_i df_i/dx_i: f acts entrywise, so the trace is the sum of autograd's
    entrywise derivatives; checked against the full Jacobian's trace for one sample too."""
    sde, _, t, x = draw(data, programs[name])
    derivative = entrywise_grad(lambda y: sde.sde(y, t)[0], x)
    expected = derivative.flatten(1).sum(1)
    div = sde.drift_divergence(x, t)
    assert div.shape == t.shape
    assert_close(div, expected, derivative.abs().flatten(1).sum(1), 1e-13, "div f")
    jac = torch.autograd.functional.jacobian(lambda y: sde.sde(y, t[:1])[0], x[:1]).reshape(6, 6)
    assert_close(div[:1], jac.trace().reshape(1), jac.diagonal().abs().sum(), 1e-13, "div f = tr(df/dx)")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_weight_and_uniform_time(programs, name, data):
    """weight(t) = the declared lambda(t); t ~ uniform on [eps, T]: density 1/(T - eps), CDF, inverse CDF."""
    sde, p, t, _ = draw(data, programs[name])
    expected = REFERENCES[name].weight(t, p)
    assert_close(sde.weight(t), expected, expected, 1e-14, "lambda(t)", t)
    q = 1 / (sde.T - sde.eps)
    assert_close(sde.t_density(t), torch.full_like(t, q), q, 1e-14, "uniform density", t)
    assert_close(sde.t_cdf(t), (t - sde.eps) * q, 1.0, 1e-14, "uniform CDF", t)
    u = torch.linspace(0, 1, 11, dtype=F64)
    assert_close(sde.t_cdf(sde.t_icdf(u)), u, 1.0, 1e-14, "Q(Q^-1(u)) = u")


@pytest.mark.parametrize("name", NAMES)
def test_sample_t_is_uniform(programs, name):
    """sample_t's draws lie in [eps, T] and pass a one-sample Kolmogorov-Smirnov test against U(eps, T) at
    alpha = 1e-3 (fixed seed: deterministic; a correct sampler fails for 1 seed in 1000)."""
    sde = programs[name].build()
    t = sde.sample_t(5000, generator=torch.Generator().manual_seed(11))
    assert t.dtype == F64 and bool(((t >= sde.eps) & (t <= sde.T)).all())
    result = scipy.stats.kstest(t.numpy(), scipy.stats.uniform(sde.eps, sde.T - sde.eps).cdf)
    assert result.pvalue > 1e-3, result


# --- Reverse SDE and flow ODE ------------------------------------------------------------------------------

def any_score(x, t):
    """An arbitrary (not a true) score: the drift identities hold for any score function."""
    return torch.sin(2 * x) * (1 + column(t, x)) - 0.3 * x**2


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_reverse_and_flow_drifts(programs, name, data):
    """reverse drift f - d(g^2)/dx - g^2 s, flow drift f - (d(g^2)/dx + g^2 s) / 2 = (forward + reverse) / 2
    (MATH.md 2 and 7), with d(g^2)/dx by autograd; reverse noise g, flow noise 0."""
    sde, _, t, x = draw(data, programs[name])
    rev, flow = sde.reverse(any_score), sde.reverse(any_score, probability_flow=True)
    assert (rev.N, rev.T, rev.eps) == (sde.N, sde.T, sde.eps)
    f, g = sde.sde(x, t)
    correction = entrywise_grad(lambda y: sde.sde(y, t)[1] ** 2, x)
    g2s = g**2 * any_score(x, t)
    scale = f.abs() + correction.abs() + g2s.abs()
    f_rev, g_rev = rev.sde(x, t)
    f_flow, g_flow = flow.sde(x, t)
    assert_close(f_rev, f - correction - g2s, scale, 1e-13, "reverse drift")
    assert_close(f_flow, (f + f_rev) / 2, scale, 1e-13, "flow drift = (forward + reverse) / 2")
    assert torch.equal(g_rev, g) and torch.equal(g_flow, torch.zeros_like(g))


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_derivation_is_what_the_module_computes(programs, compiled, name, data):
    """The derivation's SymPy reverse and flow drifts (what `sdelang show` prints) equal the generated module's at
    drawn (x, t, s), evaluated by lambdify in float64: the module's code and the printed formulas cannot drift
    apart. Relative to the size of the terms, 1e-12."""
    sde, p, t, x = draw(data, programs[name])
    d = compiled[name].derivation
    prog = d.program
    params = [prm.symbol for prm in prog.params]
    seed = data.draw(st.integers(0, 2**32 - 1), label="score seed")
    s = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    f, g = sde.sde(x, t)
    terms = f.abs() + sde.noise_gradient(x, t).abs() + (g**2 * s).abs()
    args = (x, column(t, x).expand_as(x), s, *[torch.full_like(x, p[prm.name]) for prm in prog.params])
    for flow, expr in ((False, d.reverse_drift), (True, d.flow_drift)):
        fn = sp.lambdify((prog.x, prog.t, SCORE, *params), expr, modules="numpy")
        expected = torch.as_tensor(np.broadcast_to(fn(*(a.numpy() for a in args)), x.shape), dtype=F64)
        got = sde.reverse(lambda y, tt: s, probability_flow=flow).sde(x, t)[0]
        assert_close(got, expected, terms, 1e-12, f"{'flow' if flow else 'reverse'} drift = derivation")


@pytest.mark.parametrize("name", [n for n in NAMES if REFERENCES[n].stationary_score is not None])
@given(data=st.data())
def test_stationary_law(programs, name, data):
    """For a law p the SDE leaves stationary, with its score s: the flow drift is 0 (the probability current
    f p - 1/2 d(g^2 p)/dx vanishes) and the reverse drift is minus the forward drift, f - d(g^2)/dx - g^2 s
    = f - 2 (f - flow) = -f. cubic_langevin and wobble: N(0, 1), s = -x; double_well: s = f / D."""
    sde, p, t, x = draw(data, programs[name])
    s = REFERENCES[name].stationary_score
    score = lambda y, tt: s(y, column(tt, y), p)  # noqa: E731
    f, g = sde.sde(x, t)
    terms = f.abs() + sde.noise_gradient(x, t).abs() + (g**2 * score(x, t)).abs()
    flow_drift, _ = sde.reverse(score, probability_flow=True).sde(x, t)
    reverse_drift, _ = sde.reverse(score).sde(x, t)
    assert_close(flow_drift, torch.zeros_like(x), terms, 1e-13, "flow drift of the stationary law")
    assert_close(reverse_drift, -f, terms, 1e-13, "reverse drift = -forward drift")


def normal_logpdf(x, variance):
    return -0.5 * math.log(2 * math.pi) - 0.5 * torch.log(variance) - x**2 / (2 * variance)


@pytest.mark.parametrize("name", ["cubic_langevin", "wobble", "spreading"])
@given(data=st.data())
def test_fokker_planck(programs, name, data):
    """dp/dt = -d(f p)/dx + 1/2 d^2(g^2 p)/dx^2 (MATH.md 7) for the known solution p_t = N(0, V(t)), all derivatives
    by autograd through sde() alone: V = 1 for cubic_langevin and wobble (stationary), V = 1 + t for spreading.
    spreading was built for this: for p_t = N(0, V), the current J = f p - 1/2 d(g^2 p)/dx must equal
    V'/(2 V) x p, which with g^2 = 1 + x^2/2 and V = 1 + t gives f = x/2 - x^3/(4 (1 + t))."""
    sde, _, t, x = draw(data, programs[name])
    x = x.clone().requires_grad_(True)
    # Time per entry, so that autograd gives dp/dt entry by entry; the SDE itself sees t of shape [B].
    tt = column(t, x).expand_as(x).clone().requires_grad_(True)
    V = 1 + tt if name == "spreading" else 1 + 0 * tt
    p = normal_logpdf(x, V).exp()
    f, g = sde.sde(x, t)
    (dp_dt,) = torch.autograd.grad(p.sum(), tt, create_graph=True)
    (dfp,) = torch.autograd.grad((f * p).sum(), x, create_graph=True)
    (dg2p,) = torch.autograd.grad((g**2 * p).sum(), x, create_graph=True)
    (d2g2p,) = torch.autograd.grad(dg2p.sum(), x, retain_graph=True)
    # The round-off scale is the size of the products the derivatives expand into, not of their sums, which
    # cancel (to 0 for a stationary law): with q = |x| / V = |dp/dx| / p,
    # (f p)' = f' p + f p' and (g^2 p)'' = (g^2)'' p + 2 (g^2)' p' + g^2 p''.
    (df,) = torch.autograd.grad(f.sum(), x, create_graph=True)
    (dg2,) = torch.autograd.grad((g**2).sum(), x, create_graph=True)
    (d2g2,) = torch.autograd.grad(dg2.sum(), x)
    q = x.abs() / V
    terms = p * (df.abs() + f.abs() * q + (d2g2.abs() + 2 * dg2.abs() * q + g**2 * (1 / V + q**2)) / 2)
    rhs = -dfp + d2g2p / 2
    assert_close(dp_dt.detach(), rhs.detach(), terms.detach() + dp_dt.detach().abs(), 1e-12, "Fokker-Planck")


@given(data=st.data())
def test_flow_with_exact_score_transports_the_law(programs, data):
    """spreading with the exact score s = -x / (1 + t) of p_t = N(0, 1 + t): the flow drift is the velocity
    V'/(2 V) x = x / (2 (1 + t)) that carries N(0, V(t)) to N(0, V(t + dt)), whatever g(x, t) is."""
    sde, _, t, x = draw(data, programs["spreading"])
    flow = sde.reverse(lambda y, tt: -y / (1 + column(tt, y)), probability_flow=True)
    expected = x / (2 * (1 + column(t, x)))
    f, g = sde.sde(x, t)
    assert_close(flow.sde(x, t)[0], expected, f.abs() + g**2 * x.abs(), 1e-13, "flow drift x / (2 (1 + t))")


# --- Discretisation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data(), N=st.sampled_from([1, 10, 1000]), explicit=st.booleans())
def test_discretize_is_euler(programs, name, data, N, explicit):
    """discretize(x, t, s) = (f(x, t) (t - s), g(x, t) sqrt(t - s)), s = max(t - T/N, 0) by default; the reverse
    SDE's discretize is the same Euler step of its own drift and noise."""
    example = programs[name]
    sde, _, t, x = draw(data, example)
    sde.N = N
    if explicit:
        fraction = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(t), max_size=len(t)), label="s/t")
        s = torch.tensor(fraction, dtype=F64) * t
        args = (x, t, s)
    else:
        s = torch.clamp(t - sde.T / N, min=0.0)
        args = (x, t)
    dt = column(t - s, x)
    f, g = sde.sde(x, t)
    step_f, step_g = sde.discretize(*args)
    assert_close(step_f, f * dt, (f * dt).abs(), 1e-15, "Euler drift step")
    assert_close(step_g, g * dt.sqrt(), g * dt.sqrt(), 1e-15, "Euler noise step")
    rev = sde.reverse(any_score)
    rf, rg = rev.sde(x, t)
    back_f, back_g = rev.discretize(*args)
    assert_close(back_f, rf * dt, (rf * dt).abs(), 1e-15, "reverse Euler drift step")
    assert_close(back_g, rg * dt.sqrt(), rg * dt.sqrt(), 1e-15, "reverse Euler noise step")


# --- Prior ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_prior_logp_is_stated_normal(programs, name, data):
    """prior_logp(z) = sum of log N(z_i; mean, variance) with the stated prior, against scipy.stats.norm."""
    sde, p, _, x = draw(data, programs[name])
    mean, var = REFERENCES[name].prior(p)
    z = mean + math.sqrt(var) * x
    expected = torch.from_numpy(scipy.stats.norm(mean, math.sqrt(var)).logpdf(z.numpy())).flatten(1).sum(1)
    got = sde.prior_logp(z)
    assert got.shape == (z.shape[0],)
    assert_close(got, expected, expected.abs(), 1e-13, "prior_logp")


@pytest.mark.parametrize("name", NAMES)
def test_prior_sampling_moments(programs, name):
    """prior_sampling draws N(mean, var): sample mean within 5 standard errors sqrt(var / n), sample variance
    within 5 standard errors var sqrt(2 / n) (normal fourth moment), fixed seed."""
    sde = programs[name].build()
    mean, var = REFERENCES[name].prior({})
    n = 40000
    z = sde.prior_sampling((n // 4, 4), generator=torch.Generator().manual_seed(5))
    assert z.shape == (n // 4, 4) and z.dtype == F64
    z = z.flatten()
    assert abs(float(z.mean()) - mean) <= 5 * math.sqrt(var / n)
    assert abs(float(z.var()) / var - 1) <= 5 * math.sqrt(2 / n)


# --- What a general SDE cannot do ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_unavailable_methods_raise_with_reason(programs, name):
    """The kernel's methods raise NotImplementedError naming the method and the reason recorded in `unavailable`."""
    sde = programs[name].build()
    why = REFERENCES[name].why
    assert "importance sampling of t" in sde.unavailable and "denoising score matching" in sde.unavailable
    t = torch.full((2,), 0.5, dtype=F64)
    x = torch.zeros(2, 3, dtype=F64)
    calls = {"marginal_prob": lambda: sde.marginal_prob(x, t), "mean_coeff": lambda: sde.mean_coeff(t),
             "mean_offset": lambda: sde.mean_offset(t), "std": lambda: sde.std(t), "log_snr": lambda: sde.log_snr(t)}
    for method in UNAVAILABLE_METHODS:
        reason = sde.unavailable[method]
        assert why in reason, (method, reason)
        with pytest.raises(NotImplementedError) as info:
            calls[method]()
        assert method in str(info.value) and reason in str(info.value)


def test_compile_prints_notes(tmp_path, capsys):
    """`sdelang compile` of a general SDE prints why it has no kernel and what is unavailable."""
    source = tmp_path / "double_well.sde"
    source.write_text(DOUBLE_WELL)
    assert main(["compile", str(source), "-o", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{source} -> {tmp_path / 'out' / 'double_well.py'}"
    notes = [line.strip() for line in lines[1:]]
    assert len(notes) == 2 and all(n.startswith("note: ") for n in notes), lines
    assert "no Gaussian kernel" in notes[0] and "the drift is not affine in x" in notes[0]
    assert "sliced score matching" in notes[0]
    assert notes[1].startswith("note: unavailable: ")
    for feature in (*UNAVAILABLE_METHODS, "importance sampling of t"):
        assert feature in notes[1], feature


# --- float32 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_float32_matches_float64(programs, name, data):
    """In float32, at float32 times from eps to T, sde, noise_gradient and drift_divergence are finite and within
    8 u (u = 2^-24) of the float64 module, relative to the size of the terms each one sums (the sum of |terms| of
    f; g; g^2 (1 + |x|) for d(g^2)/dx; sum |df/dx| for div f): each is a chain of at most 8 roundings after
    common-subexpression elimination, with x and t exactly representable on both sides."""
    example = programs[name]
    params = data.draw(example.params(), label="params")
    sde32, sde64 = example.build(params, dtype=F32), example.build(params)
    p = {k: getattr(sde64, k) for k in example.ranges}
    t = torch.tensor([sde64.eps, 2 * sde64.eps, 1e-3, 0.5, float(sde64.T)], dtype=F32)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    x = (2.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))).to(F32)
    x64, t64 = x.double(), t.double()
    bound = 8 * 2.0**-24
    f32, g32 = sde32.sde(x, t)
    f64, g64 = sde64.sde(x64, t64)
    assert f32.dtype == F32 and g32.dtype == F32
    for what, got, want, scale in [
        ("f", f32, f64, REFERENCES[name].f_terms(x64, column(t64, x64), p)),
        ("g", g32, g64, g64),
        ("d(g^2)/dx", sde32.noise_gradient(x, t), sde64.noise_gradient(x64, t64), g64**2 * (1 + x64.abs())),
        ("div f", sde32.drift_divergence(x, t), sde64.drift_divergence(x64, t64),
         entrywise_grad(lambda y: sde64.sde(y, t64)[0], x64).abs().sum(1)),
    ]:
        assert got.dtype == F32 and bool(torch.isfinite(got).all()), what
        assert_close(got, want, scale, bound, f"float32 {what}")


LOGISTIC = """\
sde logistic
param a = 1.5
h(u) = u * sigmoid(u)
dx = (sin(x) * t - a * h(x)) dt + sqrt(1 + t * x^2 + softplus(x)) dw
t in [0.01, 1]
prior normal(0, 1)
weighting 1
"""


@pytest.mark.parametrize("dtype, big", [(F32, 100.0), (F64, 800.0)])
def test_softplus_and_sigmoid_of_the_state_do_not_overflow(dtype, big):
    """softplus(x) and SymPy's derivatives of softplus and sigmoid print in forms that stay finite where exp(x)
    overflows (x = 100 in float32, 800 in float64): log1p(exp(x)) was inf and exp(x) / (exp(x) + 1) NaN there.
    Reference: the same formulas in float64 numpy with numpy's own stable logaddexp and expit-like forms."""
    sde = import_code(sdelang.compile_source(sdelang.Source(LOGISTIC, "logistic.sde")).code,
                      "sdelang_test_logistic").SDE().to(dtype)
    x = torch.tensor([[big, -big, 30.0, -30.0, 0.5]], dtype=dtype)
    t = torch.tensor([0.5], dtype=dtype)
    f, g = sde.sde(x, t)
    dg2 = sde.noise_gradient(x, t)
    div = torch.stack([sde.drift_divergence(x[:, i:i + 1], t)[0] for i in range(x.shape[1])])
    xs = x[0].double().numpy()
    sig = np.where(xs >= 0, 1 / (1 + np.exp(-np.abs(xs))), np.exp(-np.abs(xs)) / (1 + np.exp(-np.abs(xs))))
    want_f = np.sin(xs) * 0.5 - 1.5 * xs * sig
    want_g = np.sqrt(1 + 0.5 * xs**2 + np.logaddexp(xs, 0.0))
    want_dg2 = 2 * 0.5 * xs + sig
    want_div = 0.5 * np.cos(xs) - 1.5 * (sig + xs * sig * (1 - sig))
    tol = 1e-5 if dtype == F32 else 1e-12
    for what, got, want in (("f", f[0], want_f), ("g", g[0], want_g), ("d(g^2)/dx", dg2[0], want_dg2),
                            ("divergence", div, want_div)):
        got = got.double().numpy()
        assert np.isfinite(got).all(), what
        assert np.allclose(got, want, rtol=tol, atol=tol * np.abs(want).max()), (what, got, want)


def test_t_icdf_stays_inside_the_interval_in_float32():
    """eps + u (T - eps) at u = 1 rounds one float32 step past T for some eps and T (these); the module clamps."""
    text = "sde long_t\ndx = -x^3 dt + 1 dw\nt in [0.004880162470814877, 1.846344406475625]\nprior normal(0, 1)\n"
    sde = import_code(sdelang.compile_source(sdelang.Source(text, "long_t.sde")).code, "sdelang_test_long_t").SDE()
    u = torch.linspace(0, 1, 10001, dtype=F32)
    t = sde.to(F32).t_icdf(u)
    assert float(t.max()) <= float(torch.tensor(sde.T, dtype=F32)) and float(t.min()) >= float(torch.tensor(sde.eps, dtype=F32))


def test_load_refuses_values_that_make_a_state_dependent_diffusion_negative():
    """g(x, t) = sqrt(c + tanh(x)) is real for every state only while c >= 1. `compile --param c=0.5` refused it;
    `sdelang.load(..., c=0.5)` (and so `check` and `train`) built a module whose noise was NaN for x <= -1. The
    values now go through the program's checks, located at the SDE line."""
    text = "sde gpar\nparam c = 2\ndx = (x - x^3) dt + sqrt(c + tanh(x)) dw\nprior normal(0, 1)\nweighting 1\n"
    assert torch.isfinite(sdelang.load(text, c=1.5).sde(torch.full((2, 1), -4.0), torch.full((2,), 0.5))[1]).all()
    with pytest.raises(sdelang.SdeError, match=r"the diffusion is negative at x = -4.*\(with c = 0\.5\)"):
        sdelang.load(text, c=0.5)


def test_a_stiff_stable_drift_gets_its_input_scaling_table():
    """dx = -50 x^3 dt + dw on [1e-3, 5] is stable (stationary law ~ exp(-25 x^4)), but explicit Euler with the
    table's 256 steps blew up, and `train` refused it as diverging. The table now retries with 8 and 64 Euler steps
    between its points (the same seed each time: deterministic). Its std at T against the stationary law's,
    sqrt(Gamma(3/4) / (5 Gamma(1/4))) = 0.260: within 5 standard errors of a std from 1024 paths (1/sqrt(2 n))
    plus 1 % for Euler's bias (0.6 % between 8 and 64 steps, measured)."""
    from sdelang.runtime import models

    sde = sdelang.load("sde stiff\ndx = -50 * x^3 dt + dw\nt in [1e-3, 5]\nprior normal(0, 1)\nweighting 1\n")
    table = models.simulated_moments(sde, 1.0, paths=1024)
    assert table.shape == (2, models.MOMENT_POINTS) and torch.isfinite(table).all()
    stationary = math.sqrt(math.gamma(0.75) / (5 * math.gamma(0.25)))
    assert abs(float(table[1, -1]) / stationary - 1) <= 5 / math.sqrt(2 * 1024) + 0.01
    # a program that needs no retry keeps its table bit for bit (runs saved before rebuild the same model)
    calm = sdelang.load("sde calm\ndx = -x^3 dt + dw\nt in [1e-3, 2]\nprior normal(0, 1)\nweighting 1\n")
    assert torch.equal(models.simulated_moments(calm, 1.0, paths=1024),
                       models._moment_table(calm.to("cpu", torch.float64), 1.0, models.MOMENT_POINTS, 1024, 0, 1))


def test_sign_of_the_state_is_differentiated_almost_everywhere():
    """sign(x) in a general SDE's drift and diffusion: d/dx sign(x) is 0 away from x = 0 (SymPy's 2 DiracDelta(x),
    which stopped the compile with an internal error). The module's drift divergence and d(g^2)/dx are autograd's,
    written here: for f = -sign(x) x^2, div f = -2 |x| per entry; for g^2 = 2 + sign(x), d(g^2)/dx = 0."""
    sde = sdelang.load("sde signs\ndx = -sign(x) * x^2 dt + sqrt(2 + sign(x)) dw\nprior normal(0, 1)\nweighting 1\n")
    x = torch.tensor([[-1.5, 0.3, 2.0], [0.7, -0.2, -3.0]], dtype=F64)
    t = torch.full((2,), 0.5, dtype=F64)
    sde = sde.double()
    assert torch.allclose(sde.drift_divergence(x, t), (-2 * x.abs()).sum(1), rtol=1e-14, atol=0)
    assert torch.equal(sde.noise_gradient(x, t), torch.zeros_like(x))
    drift, g = sde.sde(x, t)
    assert torch.allclose(drift, -torch.sign(x) * x**2, rtol=1e-15, atol=0)
    assert torch.allclose(g**2, 2 + torch.sign(x), rtol=1e-15, atol=0)


def test_divergence_of_a_tanh_drift_in_float32():
    """d/dx tanh(2 x) = 2 - 2 tanh(2 x)^2 cancels in float32 (6e-5 of itself at |x| = 4, nothing left past 9); the
    module writes 2 / cosh(2 x)^2. Against the same written here in float64: 1e-6 relative for |x| <= 20."""
    sde = sdelang.load("sde squash\ndx = -tanh(2 * x) dt + sqrt(2) dw\nprior normal(0, 1)\nweighting 1\n")
    x = torch.tensor([[0.1, 1.0, 2.0, 4.0, 8.0, -20.0]], dtype=F32)
    got = sde.float().drift_divergence(x, torch.full((1,), 0.5, dtype=F32)).double()
    want = (-2 / torch.cosh(2 * x.double())**2).sum(1)
    assert torch.isfinite(got).all() and float((got / want - 1).abs().max()) < 1e-6
    per_entry = [sde.float().drift_divergence(x[:, i:i + 1], torch.full((1,), 0.5, dtype=F32)).double()
                 for i in range(x.shape[1])]
    for i, value in enumerate(per_entry):
        assert abs(float(value / (-2 / torch.cosh(2 * x[0, i].double())**2)) - 1) < 1e-6, float(x[0, i])
