"""The coupled kind: du = F(t) u dt + G(t) dw with K components per data entry (docs/language.md, "Three kinds
of SDE"; MATH.md sections 6 and 7; derive/coupled.py).

Programs (SPECS): the golden cld, and programs compiled here from text:
- prof: CLD with the time profile beta(t) = bmin + t (bmax - bmin) on every coefficient, components written in
  the order (v, x) so that the data is the second one;
- pair: two noisy components, x driving v one way: SymPy's closed form is precise at every t, so the compiler
  keeps it (CLD's and prof's closed forms cancel near t = 0, and they take the numeric path);
- hol: a K = 3 higher-order Langevin system (x, v, a), noise on a only (the coupling of a to v is -2 beta;
  test_repeated_coefficient_constructs has -beta);
- mix: K = 3 with the data in the middle, noise on two components and nonzero initial means;
- osc: an underdamped oscillator (complex eigenvalues), 'weighting score_matching', t ~ uniform;
- chain4: a K = 4 chain (x, v, a, j) on [1e-5, 10], noise on j only.
Each is written out by hand from its source (F(t), g_k(t)^2, initial laws): the independent reference the
module is checked against. hol, mix, osc and chain4 take the numeric path (Taylor series and doubling) when
compiled as they are, after SymPy spends up to 8 s of its budget looking for a closed form; the default set
compiles them with `closed_kernel` replaced by one that finds nothing (the same code at once: the slow test
checks that), and compiles pair both ways, so that the closed form is checked against the numeric path.

References: SciPy's DOP853 solution of the moment ODEs Phi' = F Phi, Sigma' = F Sigma + Sigma F^T + D; Van Loan's
integral by a doubling recursion of SciPy's expm; autograd; Schur complements and scipy.stats densities in
NumPy; mpmath's Van Loan block exponential at 60 to 90 digits where float64 itself is in question; Monte Carlo with fixed seeds and tolerances of
5 standard errors.

Covariances are compared entry by entry on the scale sqrt(S_ii S_jj) (their entries differ by up to 1e10 near
eps, where the noiseless variances grow like t^2 or faster), plus a normwise floor: a matrix exponential, or a
closed form evaluated in float64, is accurate relative to the largest entry, which a tiny entry cannot beat.

Each Hypothesis test draws half the profile's examples (10 in 'ci'): every example builds a module, whose
constructor tabulates the time density on 4097 points (0.05 s for K = 3).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdelang
import sdelang.compiler.derive.coupled
from conftest import ROOT, Example, import_code
from sdelang.cli import main
from test_identities import F64, assert_close, integrate_log_t

F32 = torch.float32
U = 2.0**-52  # float64 unit roundoff (spacing at 1)
# Half the profile's examples per Hypothesis test (10 in 'ci'), a twentieth for those that solve ODEs or integrate.
EXAMPLES = max(10, settings.default.max_examples // 2)
FEW_EXAMPLES = max(3, settings.default.max_examples // 20)

PROF = """\
sde prof
param bmin = 0.1
param bmax = 20
param m = 4
param gamma = 0.04
beta(t) = bmin + t * (bmax - bmin)
dv = (-beta(t) * x - 2 * sqrt(m) * beta(t) * v) dt + sqrt(4 * beta(t) / sqrt(m)) dw
dx = m * beta(t) * v dt
v(0) ~ normal(0, gamma / m)
t in [1e-5, 1]
t ~ importance
"""

HOL = """\
sde hol
param beta = 2
param gamma = 3
dx = beta * v dt
dv = (-beta * x + beta * a) dt
da = (-2 * beta * v - gamma * beta * a) dt + sqrt(2 * gamma * beta) dw
v(0) ~ normal(0, 0.1)
a(0) ~ normal(0, 0.1)
t in [1e-5, 1]
t ~ importance
"""

MIX = """\
sde mix
param k = 1.5
da = (-k * a + x) dt + sqrt(2 * k) dw
dx = (a - v) dt
dv = (x - 2 * k * v) dt + sqrt(k) dw
a(0) ~ normal(0.3, 0.5)
v(0) ~ normal(-0.2, 0.1)
t in [1e-4, 1.5]
weighting likelihood
t ~ importance
"""

PAIR = """\
sde pair
param k = 1.5
param c = 0.5
dx = -k * x dt + sqrt(2 * k) dw
dv = (x - c * v) dt + sqrt(2 * c) dw
v(0) ~ normal(0.2, 0.5)
t in [1e-3, 2]
weighting likelihood
t ~ importance
"""

# A profile of the drift's sign: the first coefficient, dx/dx, is -s(t), yet r = B(t) must grow from 0 (a negative
# profile once sent every t down the kernel's near-0 branch: weight 12.7 % off at t = 10, NaN importance tables).
NEG = """\
sde neg
param k = 1
s(t) = 1 + k * t
dx = s(t) * (v - x) dt + sqrt(2 * s(t)) dw
dv = s(t) * (x - 2 * v) dt
v(0) ~ normal(0, 0.5)
t in [1e-5, 4]
weighting likelihood
t ~ importance
"""

CHAIN4 = """\
sde chain4
param beta = 2
param gamma = 2
dx = beta * v dt
dv = (-beta * x + beta * a) dt
da = (-beta * v + beta * j) dt
dj = (-beta * a - gamma * beta * j) dt + sqrt(2 * gamma * beta) dw
v(0) ~ normal(0, 0.1)
a(0) ~ normal(0, 0.1)
j(0) ~ normal(0, 0.1)
t in [1e-5, 10]
weighting likelihood
t ~ importance
"""

OSC = """\
sde osc
param omega = 2
param damp = 0.3
dx = v dt
dv = (-omega^2 * x - damp * v) dt + sqrt(2 * damp) dw
v(0) ~ normal(0, 1)
t in [1e-3, 3]
weighting score_matching
"""


@dataclass(frozen=True)
class Spec:
    """A coupled SDE written out by hand from its source: F(p, t) [K, K], g^2(p, t) [K], the initial laws
    (means, variances; 0 at the data) and the data's index."""

    text: str | None  # None: the golden module
    ranges: dict[str, tuple[float, float]]
    F: Callable
    g2: Callable
    init: Callable
    data: int
    weighting: str
    t_sampling: str


def _cld_F(p, t):
    b, mi = p["beta"], p["M_inv"]
    return np.array([[0.0, b * mi], [-b, -2 * b * math.sqrt(mi)]])


def _prof_beta(p, t):
    return p["bmin"] + t * (p["bmax"] - p["bmin"])


SPECS = {
    "cld": Spec(None, {"beta": (1.0, 8.0), "gamma": (0.01, 0.2), "M_inv": (1.0, 8.0)},
                F=_cld_F,
                g2=lambda p, t: np.array([0.0, 4 * p["beta"] / math.sqrt(p["M_inv"])]),
                init=lambda p: (np.zeros(2), np.array([0.0, p["gamma"] / p["M_inv"]])),
                data=0, weighting="likelihood", t_sampling="importance"),
    "prof": Spec(PROF, {"bmin": (0.05, 1.0), "bmax": (5.0, 30.0), "m": (1.0, 8.0), "gamma": (0.01, 0.2)},
                 F=lambda p, t: _prof_beta(p, t) * np.array([[-2 * math.sqrt(p["m"]), -1.0], [p["m"], 0.0]]),
                 g2=lambda p, t: np.array([4 * _prof_beta(p, t) / math.sqrt(p["m"]), 0.0]),
                 init=lambda p: (np.zeros(2), np.array([p["gamma"] / p["m"], 0.0])),
                 data=1, weighting="likelihood", t_sampling="importance"),
    # Stiff at beta = 8, gamma = 5 (eigenvalue -36.7: test_numeric_path_stiff_system); nearly singular near eps at
    # beta = 0.5 (test_importance_table_of_a_chain_near_eps).
    "hol": Spec(HOL, {"beta": (0.5, 8.0), "gamma": (1.0, 5.0)},
                F=lambda p, t: p["beta"] * np.array([[0.0, 1, 0], [-1, 0, 1], [0, -2, -p["gamma"]]]),
                g2=lambda p, t: np.array([0.0, 0.0, 2 * p["gamma"] * p["beta"]]),
                init=lambda p: (np.zeros(3), np.array([0.0, 0.1, 0.1])),
                data=0, weighting="likelihood", t_sampling="importance"),
    "mix": Spec(MIX, {"k": (0.5, 3.0)},
                F=lambda p, t: np.array([[-p["k"], 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -2 * p["k"]]]),
                g2=lambda p, t: np.array([2 * p["k"], 0.0, p["k"]]),
                init=lambda p: (np.array([0.3, 0.0, -0.2]), np.array([0.5, 0.0, 0.1])),
                data=1, weighting="likelihood", t_sampling="importance"),
    "pair": Spec(PAIR, {"k": (1.0, 2.0), "c": (0.2, 0.8)},
                 F=lambda p, t: np.array([[-p["k"], 0.0], [1.0, -p["c"]]]),
                 g2=lambda p, t: np.array([2 * p["k"], 2 * p["c"]]),
                 init=lambda p: (np.array([0.0, 0.2]), np.array([0.0, 0.5])),
                 data=0, weighting="likelihood", t_sampling="importance"),
    "neg": Spec(NEG, {"k": (0.3, 2.0)},
                F=lambda p, t: (1 + p["k"] * t) * np.array([[-1.0, 1.0], [1.0, -2.0]]),
                g2=lambda p, t: np.array([2 * (1 + p["k"] * t), 0.0]),
                init=lambda p: (np.zeros(2), np.array([0.0, 0.5])),
                data=0, weighting="likelihood", t_sampling="importance"),
    "chain4": Spec(CHAIN4, {"beta": (0.5, 4.0), "gamma": (0.5, 4.0)},
                   F=lambda p, t: p["beta"] * np.array([[0.0, 1, 0, 0], [-1, 0, 1, 0], [0, -1, 0, 1],
                                                        [0, 0, -1, -p["gamma"]]]),
                   g2=lambda p, t: np.array([0.0, 0.0, 0.0, 2 * p["gamma"] * p["beta"]]),
                   init=lambda p: (np.zeros(4), np.array([0.0, 0.1, 0.1, 0.1])),
                   data=0, weighting="likelihood", t_sampling="importance"),
    "osc": Spec(OSC, {"omega": (1.0, 4.0), "damp": (0.05, 1.0)},
                F=lambda p, t: np.array([[0.0, 1.0], [-p["omega"] ** 2, -p["damp"]]]),
                g2=lambda p, t: np.array([0.0, 2 * p["damp"]]),
                init=lambda p: (np.zeros(2), np.array([0.0, 1.0])),
                data=0, weighting="score_matching", t_sampling="uniform"),
}
# The modules under test: "<name>" as the compiler builds it (closed form for pair), "<name>:numeric" with the
# closed form withheld (the numeric path). The kernel's tests run on all; the rest, which only consume the
# kernel, on MAIN.
VARIANTS = ["cld", "prof", "pair", "pair:numeric", "hol:numeric", "mix:numeric", "osc:numeric", "chain4:numeric",
            "neg"]
MAIN = ["cld", "prof", "pair", "hol:numeric", "mix:numeric", "osc:numeric", "chain4:numeric", "neg"]
CLOSED = ["pair"]
IMPORTANCE = [v for v in MAIN if SPECS[v.partition(":")[0]].t_sampling == "importance"]
LIKELIHOOD = [v for v in MAIN if SPECS[v.partition(":")[0]].weighting == "likelihood"]
# Those whose Schur complement a float64 reference can still compute near eps: chain4's noiseless block has
# cond ~ 1e25 there (test_kernel_and_weight_against_mpmath checks it against mpmath instead).
FLOAT64_REFERENCE = [v for v in MAIN if not v.startswith("chain4")]
# The Van Loan path's accuracy relative to the largest entry of Sigma over these ranges, against DOP853: measured
# <= 6.5e-11 (prof at bmax = 30, where B(T) = 15); 1e-9 leaves a factor 15.
NUMERIC_NORMWISE = 1e-9


def no_closed_form(F0, D0):
    return None, None


def compile_text(text: str, name: str, numeric: bool):
    """The generated module of `text`; numeric=True withholds SymPy's closed form (the numeric path)."""
    with pytest.MonkeyPatch.context() as mp:
        if numeric:
            mp.setattr(sdelang.compiler.derive.coupled, "closed_kernel", no_closed_form)
        compiled = sdelang.compile_source(sdelang.Source(text, f"{name}.sde"))
    return import_code(compiled.code, f"sdelang_test_coupled_{name}{'_numeric' if numeric else ''}")


@pytest.fixture(scope="module")
def programs(other_examples) -> dict[str, Example]:
    """variant -> Example (about 10 s: SymPy's search for the closed forms of prof and pair; the numeric variants
    compile at once)."""
    out = {}
    for variant in VARIANTS:
        name, _, path = variant.partition(":")
        spec = SPECS[name]
        if spec.text is None and not path:
            module = other_examples[name].module
        else:
            text = spec.text if spec.text is not None else (ROOT / "examples" / f"{name}.sde").read_text()
            module = compile_text(text, name, numeric=bool(path))
        out[variant] = Example(name, module, spec.ranges)
    return out


# --- helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build64(example, params=None):
    """The module in float64, built once (Example.build builds in float32, then rebuilds its tables on .to())."""
    with float64_default():
        sde = example.module.SDE(**(params or {}))
    assert sde._anchor.dtype == F64
    return sde


def params_of(sde, name):
    return {k: getattr(sde, k) for k in SPECS[name].ranges}


def draw(data, example):
    """A float64 module at drawn parameters, its parameters, and times [B] in [eps, T]."""
    sde = build64(example, data.draw(example.params(), label="params"))
    return sde, params_of(sde, example.name), data.draw(example.times(sde), label="t")


def reference_F_D(name, p, times):
    """F(t) [B, K, K] and D(t) = diag(g_k^2) [B, K, K] from the hand-written source, float64 tensors."""
    spec = SPECS[name]
    F = np.stack([spec.F(p, float(t)) for t in times])
    D = np.stack([np.diag(spec.g2(p, float(t))) for t in times])
    return torch.from_numpy(F), torch.from_numpy(D)


def corr_scale(S):
    """sqrt(S_ii S_jj): the natural size of covariance entry (i, j); off-diagonal ones may cross 0."""
    d = S.diagonal(dim1=-2, dim2=-1).abs()
    return (d[..., :, None] * d[..., None, :]).sqrt()


def cov_bound(S_ref, rtol, normwise):
    """rtol sqrt(S_ii S_jj) + normwise max |S| per matrix (module docstring)."""
    return rtol * corr_scale(S_ref) + normwise * S_ref.abs().amax((-2, -1), keepdim=True)


def correlation_condition(S):
    """cond_2 of the correlation matrix of each S [B, K, K]: how much a Cholesky factorisation, a solve or a
    Schur complement amplifies relative rounding of S's entries (NumPy SVD)."""
    d = S.diagonal(dim1=-2, dim2=-1).sqrt()
    C = (S / (d[..., :, None] * d[..., None, :])).numpy()
    return torch.from_numpy(np.linalg.cond(C))


def sensitivity(fn, S):
    """sum over the entries i <= j of |fn(S with S_ij and S_ji times 1 + 4 u) - fn(S)| (NumPy, S one matrix): the
    change of fn when each entry of S is off by 4 u relative, counted at full size whatever the signs - a measured
    componentwise condition number of fn at S, times 4 u. fn returns an array."""
    base = np.asarray(fn(S))
    total = np.zeros_like(base)
    for i in range(S.shape[0]):
        for j in range(i, S.shape[0]):
            bumped = S.copy()
            bumped[i, j] *= 1 + 4 * U
            bumped[j, i] = bumped[i, j]
            total += np.abs(np.asarray(fn(bumped)) - base)
    return base, total


def schur(S, noisy):
    """The covariance of the noisy components given the others, S_NN - S_ND S_DD^-1 S_DN (NumPy)."""
    n = [i for i, v in enumerate(noisy) if v]
    d = [i for i, v in enumerate(noisy) if not v]
    S = np.asarray(S)
    return S[np.ix_(n, n)] - S[np.ix_(n, d)] @ np.linalg.solve(S[np.ix_(d, d)], S[np.ix_(d, n)])


def d_dt(fn, t):
    """fn(t) [B, ...] and its derivative in t (autograd, entrywise in the batch)."""
    t = t.detach().clone().requires_grad_(True)
    y = fn(t)
    grads = torch.zeros_like(y)
    flat, gflat = y.reshape(y.shape[0], -1), grads.reshape(y.shape[0], -1)
    for j in range(flat.shape[1]):
        if flat[:, j].requires_grad:
            (g,) = torch.autograd.grad(flat[:, j].sum(), t, retain_graph=True, allow_unused=True)
            if g is not None:
                gflat[:, j] = g
    return y.detach(), grads


def states(seed, batch, K, C=3, scale=2.0):
    return scale * torch.randn(batch, K * C, generator=torch.Generator().manual_seed(seed), dtype=F64)


def per_entry(u, K):
    """u [B, K C] -> [B, C, K]: the K components of each data entry."""
    return torch.stack(u.chunk(K, dim=1), -1)


def join(v):
    """[B, C, K] -> u [B, K C]."""
    return torch.cat(v.unbind(-1), 1)


# --- structure, and the forward SDE against the source ---------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_structure(programs, variant):
    """kind, components, data index, noisy components and the kernel path each variant must have."""
    name, _, path = variant.partition(":")
    spec, sde = SPECS[name], build64(programs[variant])
    g2 = spec.g2(params_of(sde, name), 0.5)
    assert sde.kind == "coupled" and len(sde.components) == len(g2)
    assert sde.data_index == spec.data and sde.components[spec.data] == "x"
    assert list(sde.noisy) == [bool(g > 0) for g in g2]
    assert (sde.weighting, sde.t_sampling) == (spec.weighting, spec.t_sampling)
    assert sde.kernel_path == ("closed form" if variant in CLOSED else "numeric (Taylor series and doubling, float64)")
    for missing in ("discretize", "mean_coeff", "mean_offset", "std", "log_snr"):
        assert not hasattr(sde, missing), missing
    assert any("discretize" in key for key in sde.unavailable)
    u = states(0, 2, len(g2))
    parts = sde.split(u)
    assert len(parts) == len(g2) and torch.equal(sde.join(parts), u) and torch.equal(sde.data(u), parts[spec.data])


@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_sde_is_the_source(programs, variant, data):
    """sde(u, t) = (F(t) u, g_k(t)) per entry, g of u's shape, diffusion(t) = g_k [B, K]; profile(t) F0 = F(t),
    profile(t) D0 = D(t), and time_change = int_0^t profile (B(0) = 0, B' = phi by autograd)."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    F, D = reference_F_D(example.name, p, t)
    K = F.shape[-1]
    u = states(data.draw(st.integers(0, 2**32 - 1), label="seed"), t.shape[0], K)
    drift, g = sde.sde(u, t)
    assert drift.shape == u.shape and g.shape == u.shape
    ue = per_entry(u, K)
    expected = torch.einsum("bij,bcj->bci", F, ue)
    scale = torch.einsum("bij,bcj->bci", F.abs(), ue.abs())
    assert_close(per_entry(drift, K), expected, scale, 1e-13, "drift F(t) u")
    g2 = D.diagonal(dim1=1, dim2=2)
    assert_close(per_entry(g, K) ** 2, g2[:, None, :].expand(-1, u.shape[1] // K, -1), g2[:, None, :] + 1e-300,
                 1e-13, "g_k(t)^2")
    assert_close(sde.diffusion(t) ** 2, g2, g2 + 1e-300, 1e-13, "diffusion(t)^2")
    phi = sde.profile(t)[:, None, None]
    assert_close(phi * sde.F0, F, F.abs(), 1e-13, "profile(t) F0 = F(t)")
    assert_close(phi * sde.D0, D, D.abs(), 1e-13, "profile(t) D0 = D(t)")
    _, dB = d_dt(sde.time_change, t)
    assert_close(dB, sde.profile(t), sde.profile(t).abs(), 1e-12, "B'(t) = phi(t)")
    assert float(sde.time_change(torch.zeros(1, dtype=F64))[0]) == 0.0


# --- the kernel --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", CLOSED)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_kernel_solves_moment_odes(programs, variant, data):
    """Phi' = F Phi and Sigma' = F Sigma + Sigma F^T + D (MATH.md 6) with F, D from the source, the derivatives of
    the closed form by autograd (exact up to rounding: 1e-10 of each entry's terms, where central differences
    would need ~1e-6, plus 8 u of the largest term, the rounding a cancelling closed form leaves in a small
    entry). The numeric path is checked against the ODE solver instead (next tests): autograd through
    torch.linalg.matrix_exp of a block of norm ~ 30 is itself off by up to 1e-7 of the terms."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    F, D = reference_F_D(example.name, p, t)
    Phi, dPhi = d_dt(lambda s: sde.kernel(s)[0], t)
    S, dS = d_dt(lambda s: sde.kernel(s)[1], t)
    assert Phi.dtype == F64 and S.dtype == F64
    p_terms = F.abs() @ Phi.abs()
    assert_close(dPhi, F @ Phi, 1e-10 * p_terms + 8 * U * p_terms.amax((1, 2), keepdim=True), 1.0, "Phi' = F Phi")
    FS, terms = F @ S, F.abs() @ S.abs()
    s = terms + terms.transpose(1, 2) + D
    assert_close(dS, FS + FS.transpose(1, 2) + D, cov_bound(s, 1e-10, 8 * U), 1.0, "Sigma' = F Sigma + Sigma F^T + D")


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_kernel_starts_at_initial_law(programs, variant, data):
    """Phi(0) = I and Sigma(0) = diag(initial variances), from the source's initial laws: exactly on the numeric path
    (the series at h = 0), within 64 u on the closed form, whose Q(0) is a sum of O(1) terms that cancel."""
    example = programs[variant]
    sde = build64(example, data.draw(example.params(), label="params"))
    _, var0 = SPECS[example.name].init(params_of(sde, example.name))
    Phi, S = sde.kernel(torch.zeros(1, dtype=F64))
    tolerance = 64 * U if variant in CLOSED else 0.0
    assert_close(Phi[0], torch.eye(len(var0), dtype=F64), 1.0, tolerance, "Phi(0) = I")
    assert_close(S[0], torch.from_numpy(np.diag(var0)), 1.0, tolerance, "Sigma(0) = Sigma0")


def solve_moments(name, p, var0, times):
    """Phi and Sigma from the moment ODEs with the source's F(t), D(t) (SciPy DOP853, rtol 1e-12). Sigma's diagonal
    is controlled relative to itself (atol 1e-30: the noiseless variances start at ~1e-13); Phi and Sigma's
    off-diagonal entries, which decay through 1e-15 and below, get atol 1e-18, under which the step size collapses
    on rounding noise."""
    spec, K = SPECS[name], len(var0)

    def rhs(t, y):
        F, D = spec.F(p, t), np.diag(spec.g2(p, t))
        Phi, S = y[:K * K].reshape(K, K), y[K * K:].reshape(K, K)
        return np.concatenate([(F @ Phi).ravel(), (F @ S + S @ F.T + D).ravel()])

    y0 = np.concatenate([np.eye(K).ravel(), np.diag(var0).ravel()])
    atol = np.concatenate([np.full(K * K, 1e-18), np.where(np.eye(K, dtype=bool), 1e-30, 1e-18).ravel()])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, float(times[-1])), y0, method="DOP853", t_eval=times,
                                    rtol=1e-12, atol=atol)
    assert sol.success, sol.message
    y = torch.from_numpy(sol.y.T)
    return y[:, :K * K].reshape(-1, K, K), y[:, K * K:].reshape(-1, K, K)


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=FEW_EXAMPLES)
@given(data=st.data())
def test_kernel_matches_ode_solver(programs, variant, data):
    """kernel(t) against SciPy's solution of the moment ODEs on 30 times from eps to T: Phi within 1e-8 of max |Phi|,
    Sigma_ij within 1e-8 of sqrt(Sigma_ii Sigma_jj) plus NUMERIC_NORMWISE of max |Sigma|. The solver's local error
    is 1e-12 relative; over its few hundred steps it stays below 1e-10."""
    example = programs[variant]
    sde = build64(example, data.draw(example.params(), label="params"))
    p = params_of(sde, example.name)
    _, var0 = SPECS[example.name].init(p)
    times = np.geomspace(float(sde.eps), float(sde.T), 30)
    Phi_ref, S_ref = solve_moments(example.name, p, var0, times)
    Phi, S = sde.kernel(torch.from_numpy(times))
    assert_close(Phi, Phi_ref, Phi_ref.abs().amax((1, 2), keepdim=True), 1e-8, "Phi against DOP853")
    assert_close(S, S_ref, cov_bound(S_ref, 1e-8, NUMERIC_NORMWISE), 1.0, "Sigma against DOP853")


def van_loan_by_doubling(A, E):
    """Phi = expm(A) and Q = int_0^1 expm(A r) E expm(A r)^T dr: Van Loan's block exponential at A / 2^k (small,
    so that expm(-A^T) does not grow), then k doublings Phi <- Phi^2, Q <- Q + Phi Q Phi^T (sums of positive
    semidefinite terms): stable where one block exponential of A is not."""
    K = A.shape[0]
    k = max(0, int(np.ceil(np.log2(max(np.abs(A).sum(1).max(), 1e-300) / 0.25))))
    block = scipy.linalg.expm(np.block([[A, E], [np.zeros((K, K)), -A.T]]) / 2**k)
    Phi = block[:K, :K]
    Q = block[:K, K:] @ Phi.T  # the integral over the first 2^-k of the step
    for _ in range(k):
        Q = Q + Phi @ Q @ Phi.T
        Phi = Phi @ Phi
    return Phi, (Q + Q.T) / 2


GL_NODES, GL_WEIGHTS = np.polynomial.legendre.leggauss(20)


def integrated(name, p, s, t):
    """int_s^t F and int_s^t D from the source by 20-point Gauss-Legendre: exact for these coefficients, which are
    polynomials of degree <= 1 in t."""
    spec = SPECS[name]
    mid, half = (t + s) / 2, (t - s) / 2
    F_int = half * sum(w * spec.F(p, mid + half * x) for x, w in zip(GL_NODES, GL_WEIGHTS))
    D_int = half * sum(w * np.diag(spec.g2(p, mid + half * x)) for x, w in zip(GL_NODES, GL_WEIGHTS))
    return F_int, D_int


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_transition_is_exact_step(programs, variant, data):
    """transition(B(t) - B(s)) is the exact step from s to t: F(r) = phi(r) F0 commute for all r, so with
    A = int_s^t F and E = int_s^t D (quadrature of the source's coefficients), Phi = expm(A) and Q is Van Loan's
    integral for the constant pair (A, E) (van_loan_by_doubling): independent of the module's F0, D0 and B.
    Phi within 1e-11 of max |Phi|; Q_ij within 1e-10 of sqrt(Q_ii Q_jj) plus NUMERIC_NORMWISE of max |Q|, plus 16 u
    of max |Q| over [0, T]: the closed forms write Q as constants of that size minus decaying terms (cld's
    Q_vv = 1/M^-1 - (...) exp(-2a)), so their rounding does not shrink with t - s, which may be one ulp of t;
    plus what the rounding of r itself moves (below)."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    fraction = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(t), max_size=len(t)), label="s/t")
    s = torch.tensor(fraction, dtype=F64) * t
    Phi, Q = sde.transition(sde.time_change(t) - sde.time_change(s))
    q_T = van_loan_by_doubling(*integrated(example.name, p, 0.0, float(sde.T)))[1]
    floor = 16 * U * float(np.abs(q_T).max())
    # r = B(t) - B(s) carries the rounding of B(t), 4 u |B(t)|: a shift of the step by 4 u |B(t)| / phi(t) in time,
    # which moves Phi by |F| |Phi| and Q by |D| + 2 |F| |Q| times that.
    shift = 4 * U * sde.time_change(t).abs() / sde.profile(t).abs()
    F, D = reference_F_D(example.name, p, t)
    F_max, D_max = F.abs().amax((1, 2)), D.abs().amax((1, 2))
    for i in range(len(t)):
        phi_ref, q_ref = (torch.from_numpy(m) for m in van_loan_by_doubling(
            *integrated(example.name, p, float(s[i]), float(t[i]))))
        where = f"[{float(s[i])!r}, {float(t[i])!r}]"
        phi_max = phi_ref.abs().max()
        assert_close(Phi[i], phi_ref, 1e-11 * phi_max + shift[i] * F_max[i] * phi_max, 1.0, f"Phi over {where}")
        q_shift = shift[i] * (D_max[i] + 2 * F_max[i] * float(np.abs(q_T).max()))
        assert_close(Q[i], q_ref, cov_bound(q_ref, 1e-10, NUMERIC_NORMWISE) + floor + q_shift, 1.0, f"Q over {where}")


@pytest.mark.parametrize("name", CLOSED)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_closed_form_equals_numeric_path(programs, name, data):
    """The closed form (SymPy) and the numeric path (Taylor series and doubling) of the same program agree: Phi
    within 1e-12 of max |Phi|, Sigma_ij within 1e-10 of sqrt(Sigma_ii Sigma_jj) plus NUMERIC_NORMWISE of max |Sigma|;
    the weight within 1e-9 cond(C) relative, C Sigma's correlation matrix (the Schur complement amplifies Sigma's
    relative errors by up to cond(C))."""
    closed, numeric = programs[name], programs[f"{name}:numeric"]
    params = data.draw(closed.params(), label="params")
    a, b = build64(closed, params), build64(numeric, params)
    t = data.draw(closed.times(a), label="t")
    Pa, Sa = a.kernel(t)
    Pb, Sb = b.kernel(t)
    assert_close(Pa, Pb, Pb.abs().amax((1, 2), keepdim=True), 1e-12, "Phi closed = numeric")
    assert_close(Sa, Sb, cov_bound(Sb, 1e-10, NUMERIC_NORMWISE), 1.0, "Sigma closed = numeric")
    w = b.weight(t)
    assert_close(a.weight(t), w, w * correlation_condition(b.kernel(t)[1]), 1e-9, "weight closed = numeric", t)


# --- marginal_prob, perturb, noise_to_score ------------------------------------------------------------------

@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_marginal_prob_is_kernel(programs, variant, data):
    """marginal_prob(x0, t) = (Phi (x0 e_data + m0), Sigma) with m0 the source's initial means, per data entry."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    spec = SPECS[example.name]
    mean0, _ = spec.init(p)
    K = len(mean0)
    x0 = states(data.draw(st.integers(0, 2**32 - 1), label="seed"), t.shape[0], 1, C=4)
    mean, S = sde.marginal_prob(x0, t)
    Phi, S_kernel = sde.kernel(t)
    assert mean.shape == (t.shape[0], 4 * K) and S.shape == (t.shape[0], K, K)
    u0 = torch.from_numpy(mean0)[None, None, :].repeat(t.shape[0], 4, 1)
    u0[:, :, spec.data] = x0
    expected = torch.einsum("bij,bcj->bci", Phi, u0)
    assert_close(per_entry(mean, K), expected, torch.einsum("bij,bcj->bci", Phi.abs(), u0.abs()), 1e-14, "mean")
    assert torch.equal(S, S_kernel)


@pytest.mark.parametrize("variant", MAIN)
def test_perturb_matches_marginal_monte_carlo(programs, variant):
    """perturb(x0, t, z), z ~ N(0, I): over n = 20000 entries sharing one x0 per row, the sample mean of each
    component is within 5 standard errors sqrt(Sigma_kk / n) of the kernel mean and each sample covariance within
    5 standard errors sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n) of Sigma (fixed seed)."""
    sde = build64(programs[variant])
    K, n = len(sde.components), 20000
    t = torch.tensor([float(sde.eps), 0.01, 0.3, float(sde.T)], dtype=F64)
    x0 = torch.tensor([-1.5, 0.0, 0.7, 2.0], dtype=F64)[:, None].expand(-1, n)
    z = torch.randn(4, K * n, generator=torch.Generator().manual_seed(3), dtype=F64)
    u = per_entry(sde.perturb(x0, t, z), K)
    mean, S = sde.marginal_prob(x0, t)
    mean = per_entry(mean, K)[:, 0]
    centred = u - u.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1)
    d = S.diagonal(dim1=1, dim2=2)
    assert_close(u.mean(1), mean, 5 * (d / n).sqrt(), 1.0, "Monte Carlo mean of perturb")
    se = ((d[:, :, None] * d[:, None, :] + S**2) / n).sqrt()
    assert_close(cov, S, 5 * se, 1.0, "Monte Carlo covariance of perturb")


@pytest.mark.parametrize("variant", FLOAT64_REFERENCE)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_noise_to_score_is_kernel_score(programs, variant, data):
    """noise_to_score(z) with u = perturb(x0, t, z) equals grad_u log N(u; mean, Sigma) = -Sigma^-1 (u - mean) (NumPy
    solve) at the noisy components and is exactly 0 at the others (hybrid score matching); it ignores the
    noiseless entries of its argument. Tolerance: 64 K times the reference's measured sensitivity to 4 u relative
    errors in Sigma's entries (`sensitivity`), plus 4 u |Sigma^-1| (|u| + |mean|) (forming u - mean). The module
    factors its own Sigma (its Cholesky and score factors from the kernel's formulas), not marginal_prob's S: the
    two agree to some tens of u, not 4 (a draw near eps measured 44 times the 4 u change; 16 K allowed 32): still
    1e-13 relative, six orders inside the bound the modules state."""
    example = programs[variant]
    sde, _, t = draw(data, example)
    K = len(sde.components)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    x0 = states(seed, t.shape[0], 1, C=3)
    z = states(seed + 1, t.shape[0], K, C=3, scale=1.0)
    u = sde.perturb(x0, t, z)
    mean, S = sde.marginal_prob(x0, t)
    y = per_entry(u - mean, K).numpy()
    solved = [sensitivity(lambda Si: -np.linalg.solve(Si, y[b].T).T, S[b].numpy()) for b in range(t.shape[0])]
    expected = torch.from_numpy(np.stack([value for value, _ in solved]))
    change = torch.from_numpy(np.stack([delta for _, delta in solved]))
    inverse = torch.linalg.inv(S).abs()[:, None]
    scale = (64 * K * change
             + 4 * U * (inverse @ (per_entry(u, K).abs() + per_entry(mean, K).abs()).unsqueeze(-1)).squeeze(-1))
    score = per_entry(sde.noise_to_score(z, t), K)
    noisy = torch.tensor(sde.noisy)
    assert_close(score[..., noisy], expected[..., noisy], scale[..., noisy], 1.0, "s_N = -(Sigma^-1 (u - mean))_N")
    assert bool((score[..., ~noisy] == 0).all()), "the noiseless components get no score"
    other = per_entry(z, K).clone()
    other[..., ~noisy] = 7.0
    assert torch.equal(sde.noise_to_score(join(other), t), sde.noise_to_score(z, t))


@pytest.mark.parametrize("variant", FLOAT64_REFERENCE)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_weight_is_expected_likelihood_loss(programs, variant, data):
    """weight(t) = sum over noisy k of g_k^2 (Sigma_c^-1)_kk, Sigma_c the Schur complement of the noiseless block
    (NumPy), for the likelihood weighting: the expectation over eps ~ N(0, I) of sum_k g_k^2 noise_to_score(eps)_k^2,
    since s_N = -L_NN^-T eps_N has covariance Sigma_c^-1. 1 for 'score_matching'. Tolerance: 16 K times the
    reference's measured sensitivity to 4 u relative errors in Sigma's entries (`sensitivity`), plus 16 K u of w:
    near eps the complement cancels by up to 1e16 (hol), and no bound from one condition number of Sigma is both
    safe and sharp there."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    spec = SPECS[example.name]
    w = sde.weight(t)
    assert w.shape == t.shape and w.dtype == F64
    if spec.weighting == "score_matching":
        assert torch.equal(w, torch.ones_like(t))
        return
    S = sde.kernel(t)[1].numpy()
    K = S.shape[-1]
    expected, change = [], []
    for i, tv in enumerate(t.tolist()):
        g2 = spec.g2(p, tv)
        noisy = g2 > 0
        value, delta = sensitivity(lambda Si: np.sum(g2[noisy] * np.diag(np.linalg.inv(schur(Si, noisy)))), S[i])
        expected.append(float(value))
        change.append(float(delta))
    expected, change = torch.tensor(expected, dtype=F64), torch.tensor(change, dtype=F64)
    assert_close(w, expected, 16 * K * (change + U * expected.abs()), 1.0, "w(t)", t)


@pytest.mark.parametrize("variant", LIKELIHOOD)
def test_weight_is_monte_carlo_expectation(programs, variant):
    """weight(t) = E sum_k g_k^2 noise_to_score(e, t)_k^2, e ~ N(0, I): the identity the likelihood-weighted loss
    relies on. n = 20000 entries per time, fixed seed; within 5 standard errors (sample std / sqrt(n))."""
    sde = build64(programs[variant])
    K, n = len(sde.components), 20000
    t = torch.tensor([float(sde.eps), 1e-3, 0.1, float(sde.T)], dtype=F64)
    e = torch.randn(4, K * n, generator=torch.Generator().manual_seed(9), dtype=F64)
    s = per_entry(sde.noise_to_score(e, t), K)
    samples = (sde.diffusion(t)[:, None, :] ** 2 * s**2).sum(-1)
    se = samples.std(1) / math.sqrt(n)
    assert_close(samples.mean(1), sde.weight(t), 5 * se, 1.0, "Monte Carlo E[sum g^2 s^2]", t)


# --- the training-time sampler -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=FEW_EXAMPLES)
@given(data=st.data())
def test_t_density_integrates_to_one(programs, variant, data):
    """int_eps^T q(t) dt = 1 by QUADPACK in log t (the table is piecewise constant in log t, with steps of ~1e-3
    relative that QUADPACK's error estimate covers), within 1e-8 + 10 x its error estimate."""
    example = programs[variant]
    sde = build64(example, data.draw(example.params(), label="params"))
    total, err = integrate_log_t(sde.t_density, float(sde.eps), float(sde.T))
    assert abs(total - 1) <= 1e-8 + 10 * err, (total, err)


@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), u=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6))
def test_t_cdf_inverse_and_derivative(programs, variant, data, u):
    """Q(Q^-1(u)) = u, Q^-1(Q(t)) = t, Q(eps) = 0, Q(T) = 1, and q = dQ/dt (autograd, inside the table's cells).
    Q^-1(Q(t)) within 1e-12 t plus 8 u / q(t): Q(t) is known to a few u, which moves its inverse by that over q.
    Q is the cubic Hermite interpolant in log t of exact values and slopes at the grid's points and q = w / Z exactly,
    so Q' differs from q by the interpolant's derivative error, O(h^3) with h = log(T / eps) / 4096 ~ 3e-3 (up to
    1.1e-9 relative where w is a closed form), and by w's own error where a kernel is integrated numerically (a chain
    by Gauss-Legendre: 1.9e-8, as Q' follows w at the grid's points and q at t): held to the modules' bound 1e-7."""
    sde, _, t = draw(data, programs[variant])
    u = torch.tensor(u + [0.0, 1.0], dtype=F64)
    assert_close(sde.t_cdf(sde.t_icdf(u)), u, 1.0, 1e-10, "Q(Q^-1(u)) = u")
    assert_close(sde.t_icdf(sde.t_cdf(t)), t, 1e-12 * t + 8 * U / sde.t_density(t), 1.0, "Q^-1(Q(t)) = t", t)
    ends = sde.t_cdf(torch.tensor([float(sde.eps), float(sde.T)], dtype=F64))
    assert_close(ends, torch.tensor([0.0, 1.0], dtype=F64), 1.0, 1e-14, "Q(eps) = 0, Q(T) = 1")
    _, dQ = d_dt(sde.t_cdf, t)
    q = sde.t_density(t)
    assert_close(dQ, q, q, 1e-7, "q = Q'", t)


@pytest.mark.parametrize("variant", IMPORTANCE)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_t_density_proportional_to_weight(programs, variant, data):
    """q(t) = w(t) / Z with Z = int_eps^T w by QUADPACK in log t (rtol 1e-12), and the CDF Q(t) = int_eps^t w / Z by
    QUADPACK too: q within 1e-9 relative, Q within 1e-9 absolute (Simpson's rule on 4096 cells in log t and the
    cubic Hermite between its points, ~1e-12 here; the trapezoid rule with linear interpolation before left q 1e-3
    off and Q 2e-6)."""
    sde, _, t = draw(data, programs[variant])
    eps, T = float(sde.eps), float(sde.T)
    t = torch.cat([t, torch.tensor([eps, T], dtype=F64)])
    Z, err = integrate_log_t(sde.weight, eps, T)
    assert err <= 1e-10 * Z
    assert_close(sde.t_density(t), sde.weight(t) / Z, sde.weight(t) / Z, 1e-9, "q = w / Z", t)
    for time in t[:3].tolist():
        partial, _ = integrate_log_t(sde.weight, eps, time) if time > eps else (0.0, 0.0)
        assert abs(float(sde.t_cdf(torch.tensor([time], dtype=F64))) - partial / Z) <= 1e-9, time


@pytest.mark.parametrize("variant", MAIN)
def test_sample_t_follows_t_cdf(programs, variant):
    """sample_t lies in [eps, T] and passes a one-sample Kolmogorov-Smirnov test against t_cdf at alpha = 1e-3
    (fixed seed: deterministic; a correct sampler fails for 1 seed in 1000)."""
    sde = build64(programs[variant])
    t = sde.sample_t(5000, generator=torch.Generator().manual_seed(1234))
    assert t.shape == (5000,) and t.dtype == F64
    assert bool(((t >= sde.eps) & (t <= sde.T)).all())
    result = scipy.stats.kstest(t.numpy(), lambda v: sde.t_cdf(torch.as_tensor(v, dtype=F64)).numpy())
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("variant", [v for v in MAIN if v not in IMPORTANCE])
def test_uniform_time_density(programs, variant):
    """t ~ uniform: q = 1 / (T - eps)."""
    sde = build64(programs[variant])
    t = torch.tensor([float(sde.eps), 0.5, float(sde.T)], dtype=F64)
    q = 1 / (sde.T - sde.eps)
    assert_close(sde.t_density(t), torch.full_like(t, q), q, 1e-14, "uniform density")


# --- reverse SDE, flow ODE, divergence ------------------------------------------------------------------------

def any_score(u, t):
    """An arbitrary (not a true) score: the drift identities hold for any score function."""
    return torch.sin(2 * u) * (1 + t[:, None]) - 0.3 * u**2


@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_reverse_and_flow_drifts(programs, variant, data):
    """reverse drift F u - D s, flow drift F u - D s / 2 = (forward + reverse) / 2 (MATH.md 7), D = diag(g_k^2) from
    the source; reverse noise g, flow noise 0."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    F, D = reference_F_D(example.name, p, t)
    K = F.shape[-1]
    u = states(data.draw(st.integers(0, 2**32 - 1), label="seed"), t.shape[0], K)
    rev, flow = sde.reverse(any_score), sde.reverse(any_score, probability_flow=True)
    assert (rev.N, rev.T, rev.eps) == (sde.N, sde.T, sde.eps)
    f, g = sde.sde(u, t)
    Ds = per_entry(any_score(u, t), K) * D.diagonal(dim1=1, dim2=2)[:, None, :]
    scale = per_entry(f.abs(), K) + Ds.abs()
    f_rev, g_rev = rev.sde(u, t)
    f_flow, g_flow = flow.sde(u, t)
    assert_close(per_entry(f_rev, K), per_entry(f, K) - Ds, scale, 1e-13, "reverse drift F u - D s")
    assert_close(f_flow, (f + f_rev) / 2, join(scale), 1e-13, "flow = (forward + reverse) / 2")
    assert torch.equal(g_rev, g) and torch.equal(g_flow, torch.zeros_like(g))


@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data(), mu=st.floats(-2.0, 2.0), sd=st.floats(0.1, 2.0))
def test_flow_with_exact_score_carries_the_marginals(programs, variant, data, mu, sd):
    """For data x0 ~ N(mu, sd^2) the marginal of u_t is N(m, C), m = Phi (mu e_d + m0), C = Sigma + sd^2 Phi e_d e_d^T
    Phi^T (kernel()), with score -C^-1 (u - m). With that score the flow drift is affine, v(u) = v(m) + J (u - m),
    and must carry the Gaussian along the moment ODEs of the source: v(m) = F m and J C + C J^T = F C + C F^T + D;
    the reverse drift b, run backwards with noise D, likewise: b(m) = F m and J_b C + C J_b^T - D = F C + C F^T + D.
    J is read off the drift at m + sqrt(C_jj) e_j. Tolerance 64 u cond(C) of the largest term (D C^-1 C cancels
    to D) plus 1e-12 of each entry's terms."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    spec = SPECS[example.name]
    F, D = reference_F_D(example.name, p, t)
    mean0, _ = spec.init(p)
    K = len(mean0)
    e_d = torch.zeros(K, dtype=F64)
    e_d[spec.data] = 1.0
    Phi, S = sde.kernel(t)
    m = Phi @ (torch.from_numpy(mean0) + mu * e_d)
    col = Phi @ e_d
    C = S + sd**2 * col[:, :, None] * col[:, None, :]
    Cinv = torch.linalg.inv(C)

    def score(u, s):
        y = per_entry(u, K) - m[:, None, :]
        return join(-(Cinv[:, None] @ y.unsqueeze(-1)).squeeze(-1))

    step = C.diagonal(dim1=1, dim2=2).sqrt()  # [B, K]
    points = m[:, None, :] + torch.cat([torch.zeros(t.shape[0], 1, K, dtype=F64), torch.diag_embed(step)], 1)
    u = join(points)  # one data entry per point: C = K + 1
    FC = F @ C
    target = FC + FC.transpose(1, 2) + D
    terms = F.abs() @ C.abs()
    s = terms + terms.transpose(1, 2) + D
    bound = cov_bound(s, 1e-12, 0) + 64 * U * correlation_condition(C)[:, None, None] * s.amax((1, 2), keepdim=True)
    for flow in (True, False):
        v = per_entry(sde.reverse(score, probability_flow=flow).sde(u, t)[0], K)
        J = ((v[:, 1:] - v[:, :1]) / step[:, :, None]).transpose(1, 2)  # J[:, i, j] = d v_i / d u_j
        what = "flow" if flow else "reverse"
        Fm = (F @ m.unsqueeze(-1)).squeeze(-1)
        assert_close(v[:, 0], Fm, (F.abs() @ m.abs().unsqueeze(-1)).squeeze(-1) + 1e-300, 1e-12, f"{what}: v(m) = F m")
        JC = J @ C
        transported = JC + JC.transpose(1, 2) - (0 if flow else D)
        assert_close(transported, target, bound, 1.0, f"{what}: J C + C J^T = F C + C F^T + D")


@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_drift_divergence_is_trace(programs, variant, data):
    """drift_divergence(u, t) = (entries per component) tr F(t), F from the source, and equals autograd's trace of
    d(F u)/du."""
    example = programs[variant]
    sde, p, t = draw(data, example)
    F, _ = reference_F_D(example.name, p, t)
    K = F.shape[-1]
    u = states(data.draw(st.integers(0, 2**32 - 1), label="seed"), t.shape[0], K, C=4)
    div = sde.drift_divergence(u, t)
    diagonal = F.diagonal(dim1=1, dim2=2)
    assert div.shape == t.shape
    assert_close(div, 4 * diagonal.sum(-1), 4 * diagonal.abs().sum(-1) + 1e-300, 1e-13, "div = C tr F")
    jac = torch.autograd.functional.jacobian(lambda v: sde.sde(v, t[:1])[0], u[:1]).reshape(4 * K, 4 * K)
    assert_close(div[:1], jac.trace().reshape(1), jac.diagonal().abs().sum() + 1e-300, 1e-13, "div = tr(J)")


# --- prior and initial law ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_prior_logp_is_multivariate_normal(programs, variant, data):
    """prior_logp(u) = sum over entries of log N(u_entry; Phi(T) m0, Sigma(T)), against scipy.stats.multivariate_normal,
    the mean from the source's initial means (the data term dropped)."""
    example = programs[variant]
    sde = build64(example, data.draw(example.params(), label="params"))
    mean0, _ = SPECS[example.name].init(params_of(sde, example.name))
    K = len(mean0)
    Phi, S = sde.kernel(torch.tensor([float(sde.T)], dtype=F64))
    law = scipy.stats.multivariate_normal(Phi[0].numpy() @ mean0, S[0].numpy())
    u = states(data.draw(st.integers(0, 2**32 - 1), label="seed"), 3, K, C=5, scale=1.5)
    ue = per_entry(u, K).numpy()
    expected = torch.tensor([law.logpdf(ue[b]).sum() for b in range(3)], dtype=F64)
    got = sde.prior_logp(u)
    assert got.shape == (3,)
    assert_close(got, expected, expected.abs(), 1e-12, "prior_logp")


@pytest.mark.parametrize("variant", MAIN)
def test_prior_sampling_moments(programs, variant):
    """prior_sampling draws N(Phi(T) m0, Sigma(T)) per entry: sample mean and covariance within 5 standard errors
    (as in test_perturb_matches_marginal_monte_carlo), n = 20000 entries, fixed seed."""
    example = programs[variant]
    sde = build64(example)
    mean0, _ = SPECS[example.name].init(params_of(sde, example.name))
    K, n = len(mean0), 20000
    Phi, S = sde.kernel(torch.tensor([float(sde.T)], dtype=F64))
    mean, S = Phi[0] @ torch.from_numpy(mean0), S[0]
    u = sde.prior_sampling((10, K * n // 10), generator=torch.Generator().manual_seed(21))
    assert u.shape == (10, K * n // 10) and u.dtype == F64
    ue = per_entry(u, K).reshape(n, K)
    centred = ue - ue.mean(0)
    cov = centred.T @ centred / (n - 1)
    d = S.diagonal()
    assert_close(ue.mean(0), mean, 5 * (d / n).sqrt(), 1.0, "prior sample mean")
    assert_close(cov, S, 5 * ((d[:, None] * d[None, :] + S**2) / n).sqrt(), 1.0, "prior sample covariance")


@pytest.mark.parametrize("variant", MAIN)
def test_init_sampling_and_logp(programs, variant):
    """init_sampling keeps x0 at the data and draws each other component from its initial law (mean and variance
    within 5 standard errors, n = 20000, fixed seed); init_logp is the sum of their log densities (scipy.stats.norm)."""
    example = programs[variant]
    sde = build64(example)
    spec = SPECS[example.name]
    mean0, var0 = spec.init(params_of(sde, example.name))
    K, n = len(mean0), 20000
    x0 = torch.linspace(-2, 2, n, dtype=F64).reshape(2, n // 2)
    u0 = sde.init_sampling(x0, generator=torch.Generator().manual_seed(4))
    parts = sde.split(u0)
    assert u0.shape == (2, K * n // 2) and torch.equal(parts[spec.data], x0)
    expected = np.zeros(2)
    for k in range(K):
        if k == spec.data:
            continue
        v = parts[k].flatten()
        assert abs(float(v.mean()) - mean0[k]) <= 5 * math.sqrt(var0[k] / n), k
        assert abs(float(v.var()) / var0[k] - 1) <= 5 * math.sqrt(2 / n), k
        expected += scipy.stats.norm(mean0[k], math.sqrt(var0[k])).logpdf(parts[k].numpy()).sum(1)
    assert_close(sde.init_logp(u0), torch.from_numpy(expected), torch.from_numpy(np.abs(expected)), 1e-12, "init_logp")


# --- float32 ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_near_eps(programs, variant):
    """A float32 module (its tables rebuilt in float64 by .to()) gives finite weight, t_density, noise_to_score and
    marginal_prob at float32 times from eps to T, within 8 u32 (u32 = 2^-24) of the float64 module, relative to the
    size of the terms: the kernel, the weight and the table are float64 and cast once, and the mean is K products
    and sums in float32 (the times are float32 numbers on both sides, so no error comes from t)."""
    example = programs[variant]
    sde32, sde64 = example.build(dtype=F32), build64(example)
    K = len(sde64.components)
    t = torch.tensor([sde64.eps, 1.5 * sde64.eps, 1e-3, 0.1, float(sde64.T)], dtype=F32)
    t64 = t.double()
    bound = 8 * 2.0**-24
    x0 = torch.linspace(-2, 2, 5 * 3, dtype=F32).reshape(5, 3)
    z = torch.randn(5, 3 * K, generator=torch.Generator().manual_seed(2)).to(F32)
    mean32, S32 = sde32.marginal_prob(x0, t)
    mean64, S64 = sde64.marginal_prob(x0.double(), t64)
    Phi = sde64.kernel(t64)[0]
    offset = Phi @ sde64.mean0
    column = Phi[:, :, sde64.data_index]
    mean_scale = join(torch.stack([column[:, k, None].abs() * x0.double().abs() + offset[:, k, None].abs()
                                   for k in range(K)], -1))
    s32, s64 = sde32.noise_to_score(z, t), sde64.noise_to_score(z.double(), t64)
    for what, got, want, scale in [
        ("weight", sde32.weight(t), sde64.weight(t64), sde64.weight(t64)),
        ("t_density", sde32.t_density(t), sde64.t_density(t64), sde64.t_density(t64)),
        ("noise_to_score", s32, s64, s64.abs().amax(1, keepdim=True)),
        ("marginal mean", mean32, mean64, mean_scale),
        ("marginal Sigma", S32, S64, corr_scale(S64)),
    ]:
        assert got.dtype == F32 and bool(torch.isfinite(got).all()), what
        assert_close(got, want, scale, bound, f"float32 {what}")


# --- the command line and the compiler -------------------------------------------------------------------------

def test_compile_prints_notes(tmp_path, capsys, monkeypatch):
    """`sdelang compile` of a coupled SDE names its components and kernel path and what is unavailable (the
    closed form withheld to keep this fast: the note then names the numeric path)."""
    monkeypatch.setattr(sdelang.compiler.derive.coupled, "closed_kernel", no_closed_form)
    source = tmp_path / "hol.sde"
    source.write_text(HOL)
    assert main(["compile", str(source), "-o", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{source} -> {tmp_path / 'out' / 'hol.py'}"
    notes = [line.strip() for line in lines[1:]]
    assert len(notes) == 2 and all(n.startswith("note: ") for n in notes), lines
    assert "coupled SDE (x, v, a)" in notes[0] and "numeric (Taylor series" in notes[0]
    for feature in ("discretize", "reverse_diffusion", "ancestral", "ScoreFlow"):
        assert feature in notes[1], feature


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hol", "mix", "osc", "chain4"])
def test_numeric_programs_take_the_numeric_path(name):
    """Compiled as they are (3-20 s of SymPy each), hol, mix and osc get no closed form, and their code is exactly
    what the default set tests (compiled with the closed form withheld)."""
    text = SPECS[name].text
    natural = sdelang.compile_source(sdelang.Source(text, f"{name}.sde"))
    assert natural.derivation.kernel_path.startswith("numeric")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdelang.compiler.derive.coupled, "closed_kernel", no_closed_form)
        forced = sdelang.compile_source(sdelang.Source(text, f"{name}.sde"))
    assert natural.code == forced.code


# --- known defects (strict xfail: each fails now, and its reason says why) --------------------------------------

NUMBERS = """\
sde numeric_coefficients
beta(t) = 0.1 + 19.9 * t
dx = 4 * beta(t) * v dt
dv = (-beta(t) * x - 4 * beta(t) * v) dt + sqrt(2 * beta(t)) dw
v(0) ~ normal(0, 0.01)
t in [1e-5, 1]
t ~ importance
"""


def test_closed_form_with_numeric_coefficients_keeps_precision():
    """With numbers for coefficients SymPy's closed form Q_xx = 1 - (r^2 + 2 r + 2) exp(-r) / 2 cancels near r = 0
    (the weight at eps came out 2.2e19 instead of 3.0e5): whichever path the compiler takes, Sigma and the weight
    at small t agree with the numeric path's, the weight within what a correctly rounded Sigma allows
    (16 K u cond(C) relative)."""
    name = "numeric_coefficients"
    compiled = build64(Example(name, compile_text(NUMBERS, name, numeric=False), {}))
    numeric = build64(Example(name, compile_text(NUMBERS, name, numeric=True), {}))
    t = torch.tensor([1e-5, 1e-4, 1e-3], dtype=F64)
    S, S_ref = compiled.kernel(t)[1], numeric.kernel(t)[1]
    assert_close(S, S_ref, cov_bound(S_ref, 1e-10, NUMERIC_NORMWISE), 1.0, "Sigma")
    w = numeric.weight(t)
    assert_close(compiled.weight(t), w, w * 16 * 2 * U * correlation_condition(S_ref), 1.0, "weight", t)


def test_repeated_coefficient_constructs():
    """hol with the textbook couplings -beta (v <- x) and -beta (a <- v): the same entry twice in F0 (it was printed
    as a common-subexpression name with no statement defining it: NameError when the module was built)."""
    text = HOL.replace("da = (-2 * beta * v", "da = (-beta * v")
    sde = build64(Example("hol", compile_text(text, "hol_repeated", numeric=True), {}))
    assert float(sde.F0[1, 0]) == float(sde.F0[2, 1]) == -2.0


def test_numeric_path_stiff_system(programs):
    """hol with beta = 8, gamma = 5 (eigenvalues -1.7 +- 8.2i and -36.7): kernel(T) against the moment ODEs, within
    the tolerances of test_kernel_matches_ode_solver (Van Loan's single block exponential, which the numeric path
    used before, had Sigma(T) off by 63% here: its block expm(-F0^T r) grows like exp(|lambda_fast| r))."""
    sde = build64(programs["hol:numeric"], {"beta": 8.0, "gamma": 5.0})
    p = params_of(sde, "hol")
    _, var0 = SPECS["hol"].init(p)
    times = np.array([0.5, float(sde.T)])
    _, S_ref = solve_moments("hol", p, var0, times)
    S = sde.kernel(torch.from_numpy(times))[1]
    assert_close(S, S_ref, cov_bound(S_ref, 1e-8, NUMERIC_NORMWISE), 1.0, "Sigma against DOP853 (stiff)")


def truth(name, p, t, digits=60):
    """Sigma(t) [K, K] and the likelihood weight sum_k g_k^2 (Sigma_c^-1)_kk of a program, in mpmath at `digits`
    digits: Van Loan's block exponential of (A, E) = (int_0^t F, int_0^t D) from the source (F(t) = phi(t) F0
    commute), Sigma = Phi Sigma0 Phi^T + Q, then the Schur complement Sigma_c of the noiseless components."""
    spec = SPECS[name]
    A, E = integrated(name, p, 0.0, t)
    _, var0 = spec.init(p)
    K = len(var0)
    noisy = [k for k in range(K) if spec.g2(p, t)[k] > 0]
    quiet = [k for k in range(K) if k not in noisy]
    # expm(-A^T) grows like exp(|lambda| t): the block at A / 2^k, then k doublings (all at `digits` digits).
    k = max(0, int(np.ceil(np.log2(max(np.abs(A).sum(1).max(), 1e-300)))))
    with mpmath.workdps(digits):
        block = mpmath.zeros(2 * K, 2 * K)
        for i in range(K):
            for j in range(K):
                block[i, j], block[i, j + K], block[i + K, j + K] = A[i, j], E[i, j], -A[j, i]
        X = mpmath.expm(block / 2**k)
        Phi = X[0:K, 0:K]
        Q = X[0:K, K:2 * K] * Phi.T
        for _ in range(k):
            Q, Phi = Q + Phi * Q * Phi.T, Phi * Phi
        S = Phi * mpmath.diag([mpmath.mpf(v) for v in var0]) * Phi.T + Q
        S = (S + S.T) / 2
        sub = lambda rows, cols: mpmath.matrix([[S[i, j] for j in cols] for i in rows])  # noqa: E731
        Sc = sub(noisy, noisy)
        if quiet:
            Sc = Sc - sub(noisy, quiet) * mpmath.inverse(sub(quiet, quiet)) * sub(quiet, noisy)
        inverse = mpmath.inverse(Sc)
        g2 = spec.g2(p, t)
        w = sum(mpmath.mpf(g2[k]) * inverse[n, n] for n, k in enumerate(noisy))
        return torch.tensor([[float(S[i, j]) for j in range(K)] for i in range(K)], dtype=F64), float(w)


def hol_truth(p, t, digits=50):
    return truth("hol", p, t, digits)


def test_hybrid_score_precise_near_eps(programs):
    """hol at its defaults: weight(t) at t = 1e-3 against mpmath (50 digits), within what a correctly rounded Sigma
    allows, 16 K u cond(C) relative (as in test_weight_is_expected_likelihood_loss). (A Cholesky factor of the
    Van Loan path's Sigma was 1.7% off here: cond(C) ~ 1e8.)"""
    sde = build64(programs["hol:numeric"])
    p = params_of(sde, "hol")
    t = 1e-3
    S_true, w_true = hol_truth(p, t)
    w = float(sde.weight(torch.tensor([t], dtype=F64))[0])
    kappa = float(correlation_condition(S_true[None])[0])
    assert abs(w - w_true) <= 16 * 3 * U * kappa * w_true, (w, w_true, kappa)


def test_importance_table_of_a_chain_near_eps(programs):
    """hol at beta = 0.5, gamma = 1.45 (cond of Sigma's correlation matrix 2e16 at eps, where a Cholesky factor of
    Sigma failed and the weight came out anywhere from 1e5 to 2e16): the weight at the table's first 8 points within
    1e-9 of mpmath's (50 digits), far within the 1e-6 the table needs; measured 3e-15."""
    p = {"beta": 0.5, "gamma": 1.44921875}
    sde = build64(programs["hol:numeric"], p)
    t = sde._log_t[:8].exp()
    want = torch.tensor([hol_truth(p, float(tv))[1] for tv in t], dtype=F64)
    assert_close(sde.weight(t), want, want, 1e-9, "weight near eps", t)


# --- accuracy to float64, batch independence, singular kernels -------------------------------------------------

@pytest.mark.parametrize("variant", MAIN)
@settings(max_examples=FEW_EXAMPLES)
@given(data=st.data())
def test_kernel_and_weight_against_mpmath(programs, variant, data):
    """Sigma(t) and weight(t) at eps, 10 eps, 1e-3, 0.1 and T (T = 10 for chain4) against `truth` (mpmath, 60
    digits): Sigma_ij within 1e-12 of sqrt(Sigma_ii Sigma_jj), the weight within 1e-10 relative (measured <= 5e-15 and
    2e-14; the issue asks 1e-6). The reference's inputs int_0^t F, int_0^t D are float64, whose rounding moves the
    truth by ~|A| u relative, below 1e-13 here."""
    example = programs[variant]
    sde = build64(example, data.draw(example.params(), label="params"))
    p = params_of(sde, example.name)
    for t in (float(sde.eps), 10 * float(sde.eps), 1e-3, 0.1, float(sde.T)):
        S_ref, w_ref = truth(example.name, p, t)
        S = sde.kernel(torch.tensor([t], dtype=F64))[1][0]
        assert_close(S, S_ref, corr_scale(S_ref), 1e-12, f"Sigma({t!r}) against mpmath")
        if sde.weighting == "likelihood":
            w = sde.weight(torch.tensor([t], dtype=F64))
            assert_close(w, torch.tensor([w_ref], dtype=F64), abs(w_ref), 1e-10, f"weight({t!r}) against mpmath")


@pytest.mark.parametrize("variant", MAIN)
def test_results_do_not_depend_on_the_batch(programs, variant):
    """kernel, weight, t_density and noise_to_score of 7 times at once equal, bit for bit, those of each time alone:
    no reduction order, algorithm or scaling chosen from the whole batch (torch.linalg.matrix_exp chose its degree
    from the batch's largest norm and gave a batch of 1 and of 2 different tiny entries)."""
    sde = build64(programs[variant])
    K = len(sde.components)
    t = torch.tensor([float(sde.eps), 3e-5, 1e-3, 0.02, 0.3, 0.9, float(sde.T)], dtype=F64)
    t = torch.clamp(t, float(sde.eps), float(sde.T))
    eps = states(4, len(t), K)
    together = [*sde.kernel(t), sde.weight(t), sde.t_density(t), sde.noise_to_score(eps, t)]
    for i in range(len(t)):
        alone = [*sde.kernel(t[i:i + 1]), sde.weight(t[i:i + 1]), sde.t_density(t[i:i + 1]),
                 sde.noise_to_score(eps[i:i + 1], t[i:i + 1])]
        for what, a, b in zip(["Phi", "Sigma", "weight", "t_density", "noise_to_score"], alone, together):
            assert torch.equal(a[0], b[i]), (what, float(t[i]))


SINGULAR = """\
sde singular
dx = v dt
dy = v dt
dv = -v dt + sqrt(2) dw
y(0) ~ normal(0, 0)
v(0) ~ normal(0, 1)
t in [1e-3, 1]
weighting likelihood
"""


def test_singular_kernel_is_reported():
    """x and y both integrate v from 0, so Sigma(t) is singular at every t: the module refuses to build, naming the
    time, rather than train with a factor of round-off."""
    module = compile_text(SINGULAR, "singular", numeric=True)
    with pytest.raises(ValueError, match=r"numerically singular at t = 0\.001"):
        module.SDE()


AT_REST = """\
sde at_rest
dx = (v - x) dt
dv = (x - v) dt + sqrt(2) dw
v(0) ~ normal(0, 0)
t in [1e-3, 1]
weighting likelihood
"""


def test_an_auxiliary_component_started_at_a_point():
    """v(0) ~ normal(0, 0) trains (Sigma(t) > 0 for t > 0: the noise reaches x through v), but its initial law has
    no density, so the likelihood is refused with the reason, before the solve, rather than math.log(0)."""
    from sdelang.runtime.likelihood import log_likelihood
    module = compile_text(AT_REST, "at_rest", numeric=False)
    sde = build64(Example("at_rest", module, {}))
    t = torch.tensor([1e-3, 0.1, 1.0], dtype=F64)
    assert torch.isfinite(sde.weight(t)).all() and (sde.weight(t) > 0).all()
    calls = []

    def score(u, s):
        calls.append(1)
        return torch.zeros_like(u)

    with pytest.raises(ValueError, match=r"v\(0\) ~ normal\(mean, 0\) starts at a point.*positive variance"):
        log_likelihood(sde, score, torch.zeros(2, 1, dtype=F64))
    assert not calls


def test_perturb_keeps_the_noisy_factor_near_zero(programs):
    """chain4 near t = 0: perturb's factor at the noisy component equals sqrt(Sigma_c), the conditional variance given
    the noiseless components, from mpmath (`truth`: Sigma_c = g^2 / weight for one noisy component), within 1e-12
    relative. Gram-Schmidt on the rows of the factor kept two digits of it at t = 1e-6 (the noisy row's remainder
    is ~1e-3 of the row), so training pairs u = mean + A z were not drawn at the score their target states."""
    sde = build64(programs["chain4:numeric"])
    p = params_of(sde, "chain4")
    K = len(sde.components)
    for t in (1e-7, 1e-6, 1e-5, 1e-3):
        _, w = truth("chain4", p, t)
        g2 = SPECS["chain4"].g2(p, t)
        (k,) = [i for i in range(K) if g2[i] > 0]
        expected = math.sqrt(g2[k] / w)
        at, x0 = torch.tensor([t], dtype=F64), torch.zeros(1, 1, dtype=F64)
        unit = torch.zeros(1, K, dtype=F64)
        unit[0, k] = 1.0
        got = float((sde.perturb(x0, at, unit) - sde.perturb(x0, at, torch.zeros_like(unit)))[0, k])
        assert abs(got / expected - 1) < 1e-12, (t, got, expected)
