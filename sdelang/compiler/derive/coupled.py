"""Derivations for a coupled linear SDE du = F(t) u dt + G(t) dw (MATH.md section 6).

u holds K components per data entry (e.g. CLD's position x and velocity v); G is diagonal, one noise
g_k(t) per line, D = G G^T = diag(g_k^2). The checker has made sure that F and D share one time
profile, F(t) = phi(t) F0 and D(t) = phi(t) D0, so with r = B(t) = int_0^t phi the kernel is a
function of r alone:

    mean   Phi(r) u0,           Phi(r) = exp(F0 r)                          (Phi' = F Phi)
    cov    Sigma = Phi Sigma0 Phi^T + Q(r),  Q(r) = int_0^r Phi(rho) D0 Phi(rho)^T drho
                                                              (Sigma' = F Sigma + Sigma F^T + D)

u0 = (data, initial means of the auxiliary components), Sigma0 = diag(initial variances, 0 for the
data). SymPy's matrix exponential and the integral give Phi and Q in closed form when it finds them
in time and they check out, entry by entry, against 50-digit arithmetic at the defaults; otherwise the
generated module computes them in float64 by scaling and doubling: r = 2^s h with |F0| h <= 1/2, the Taylor
series of Phi(h) and Q(h) (whose leading terms keep every entry's digits near r = 0, however small: Q_xx ~ r^3
for CLD), then s doublings
    Phi(2h) = Phi(h)^2,    Q(2h) = Q(h) + Phi(h) Q(h) Phi(h)^T
(sums of positive semi-definite terms: no factor that grows with r, unlike Van Loan's block exponential, whose
exp(-F0^T r) loses the digits of Q over long horizons). s depends on each r alone, so a time's kernel does not
depend on the batch it comes in.
"""
from __future__ import annotations

from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

from ..ir import CoupledProgram
from .symbolic import bounded, integrate_from, printable, simplest, use_expm1_log1p

R = sp.Dummy("r", positive=True)      # the time change r = B(t)
RHO = sp.Dummy("rho", positive=True)
# Seconds for the matrix exponential, and again for the integral. From K = 3 on, SymPy needs the roots of a cubic
# or worse and has not finished one within 8 s (a three-component chain spent 9 s of a compile looking); the
# numeric path is as precise, so the search gets a short budget there. For K = 2, 16 s: it was raised when a pair's
# closed kernel took 4-5 s of CPU (its Q integrals went to SymPy's integrator, which integration by inspection now
# spares: 0.2 s) and fell to the numeric path late in a long test process.
MATRIX_LIMIT = {2: 16.0}
MATRIX_LIMIT_LARGE = 1.0
CHECK_TOLERANCE = 1e-9                # relative disagreement with the numeric kernel that refuses a closed form
# Relative float64 error of an entry of Phi or Q (Q_ij on the scale sqrt(Q_ii Q_jj)) that refuses a closed form:
# the hybrid score is a Schur complement of Sigma, which multiplies the error of Q by up to cond(Q) / sqrt(t).
PRECISION = 1e-12


@dataclass(frozen=True)
class CoupledDerivation:
    program: CoupledProgram
    phi: sp.Expr                          # the time profile phi(t)
    B: sp.Expr                            # int_0^t phi
    F0: sp.Matrix
    D0: sp.Matrix                         # diagonal
    mean0: sp.Matrix                      # u0 without the data: initial means, 0 at the data
    Sigma0: sp.Matrix
    Phi: sp.Matrix | None                 # closed forms in R, or None (numeric path)
    Q: sp.Matrix | None

    @property
    def closed_form(self) -> bool:
        return self.Phi is not None

    @property
    def kernel_path(self) -> str:
        return "closed form" if self.closed_form else "numeric (Taylor series and doubling, float64)"

    @property
    def inverse_cdf_path(self) -> str:
        if self.program.t_sampling == "uniform":
            return "closed form (t ~ uniform)"
        return "numeric (tabulated CDF, float64)"

    @property
    def noisy(self) -> tuple[bool, ...]:
        return tuple(d != 0 for d in self.D0.diagonal())


def time_profile(p: CoupledProgram) -> sp.Expr:
    """phi(t): the time-dependent factor of the first nonzero coefficient (1 for constant coefficients)."""
    entries = [sp.diff(c.drift, d.symbol) for c in p.components for d in p.components]
    entries += [c.diffusion**2 for c in p.components]
    first = next(e for e in entries if e != 0)
    _, dependent = first.as_independent(p.t, as_Add=False)
    # Positive, so that r = B(t) grows from 0: the kernel's series near r = 0 and its doublings assume r >= 0, and
    # a profile of the drift's sign (dx = s(t) (v - x) dt gives -s(t)) would make r negative for every t.
    middle = dependent.xreplace({p.t: (p.eps + p.T) / 2}).xreplace(p.defaults)
    if middle.is_negative or (middle.is_negative is None and dependent.could_extract_minus_sign()):
        dependent = -dependent
    return dependent


def derive_coupled(p: CoupledProgram) -> CoupledDerivation:
    t, comps = p.t, p.components
    phi = time_profile(p)
    F = sp.Matrix([[sp.diff(c.drift, d.symbol) for d in comps] for c in comps])
    F0 = F.applyfunc(lambda e: simplest(sp.simplify(e / phi)))
    D0 = sp.diag(*[simplest(sp.simplify(c.diffusion**2 / phi)) for c in comps])
    B = simplest(integrate_from(phi, t, sp.Integer(0), t)) if phi != 1 else t
    mean0 = sp.Matrix([c.init_mean if c.init_mean is not None else 0 for c in comps])
    Sigma0 = sp.diag(*[c.init_variance if c.init_variance is not None else 0 for c in comps])
    Phi, Q = closed_kernel(F0, D0)
    r_range = (B.xreplace({t: p.eps}), B.xreplace({t: p.T}))
    if Phi is not None and not (agrees(Phi, Q, F0, D0, p.defaults) and precise(Phi, Q, r_range, p.defaults)):
        Phi = Q = None
    return CoupledDerivation(p, phi, B, F0, D0, mean0, Sigma0, Phi, Q)


def closed_kernel(F0: sp.Matrix, D0: sp.Matrix) -> tuple[sp.Matrix | None, sp.Matrix | None]:
    """Phi(r) = exp(F0 r) and Q(r) = int_0^r Phi D0 Phi^T, or (None, None) if SymPy does not find them in time."""
    limit = MATRIX_LIMIT.get(F0.rows, MATRIX_LIMIT_LARGE)
    Phi = bounded(lambda: (F0 * R).exp().applyfunc(sp.simplify), seconds=limit)
    if Phi is None or not all(printable(e) for e in Phi):
        return None, None
    at = Phi.xreplace({R: RHO})
    integrand = at * D0 * at.T

    def integrate():
        return integrand.applyfunc(lambda e: simplest(integrate_from(sp.expand(e), RHO, sp.Integer(0), R)))
    Q = bounded(integrate, seconds=limit)
    if Q is None or any(e.has(sp.Integral) or not printable(e) for e in Q):
        return None, None
    return Phi.applyfunc(simplest), Q


def precise(Phi: sp.Matrix, Q: sp.Matrix, r_range: tuple[sp.Expr, sp.Expr], defaults: dict) -> bool:
    """Phi and Q evaluated in float64, as the module will (after the expm1/log1p rewrites code generation applies),
    against 50-digit arithmetic at r = B(eps) 10^k up to B(T), entry by entry (Q_ij on the scale sqrt(Q_ii Q_jj)): a
    closed form that cancels near t = 0 (1 - (r^2 + 2 r + 2) exp(-r) / 2 ~ r^3) or far from it is not used."""
    entries = [bounded(use_expm1_log1p, e, seconds=2.0) or e for e in (*Phi.subs(defaults), *Q.subs(defaults))]
    fast = sp.lambdify(R, entries, modules="math")
    r0, r1 = (float(sp.N(r.subs(defaults))) for r in r_range)
    k = Phi.rows
    for r in [r0 * 10.0**j for j in range(int(np.log10(r1 / r0)) + 1)] + [r1]:
        try:
            got = np.array(fast(r), dtype=float)
        except (ValueError, OverflowError, ZeroDivisionError, TypeError):
            return False
        with mpmath.workdps(50):
            want = np.array([float(sp.N(e.xreplace({R: sp.Float(r, 50)}), 50)) for e in entries])
        diag = np.sqrt(np.abs(np.diag(want[k * k:].reshape(k, k))))
        # Phi's entries on their own size, or 1e-4 of the largest where one crosses zero.
        phi = np.abs(want[:k * k])
        scale = np.concatenate([phi + 1e-4 * phi.max(), np.outer(diag, diag).ravel() + 1e-300])
        if not np.all(np.isfinite(got)) or np.any(np.abs(got - want) > PRECISION * scale):
            return False
    return True


def agrees(Phi: sp.Matrix, Q: sp.Matrix, F0: sp.Matrix, D0: sp.Matrix, defaults: dict) -> bool:
    """The closed forms against scipy's matrix exponential (Van Loan) at a few r, with the default parameters:
    a closed form that is complex, singular or wrong at the defaults is not used."""
    import scipy.linalg   # here, not at the top: it costs a fifth of a second of every compile's start-up
    f0 = np.array(F0.subs(defaults).evalf(), dtype=float)
    d0 = np.array(D0.subs(defaults).evalf(), dtype=float)
    k = f0.shape[0]
    for r in (1e-3, 0.1, 1.0, 3.0):
        block = scipy.linalg.expm(np.block([[f0, d0], [np.zeros((k, k)), -f0.T]]) * r)
        phi_ref = block[:k, :k]
        q_ref = block[:k, k:] @ phi_ref.T
        try:
            phi = np.array(Phi.subs(defaults).xreplace({R: r}).evalf(), dtype=float)
            q = np.array(Q.subs(defaults).xreplace({R: r}).evalf(), dtype=float)
        except TypeError:  # complex, or a symbol left over
            return False
        scale_phi, scale_q = np.abs(phi_ref).max(), max(np.abs(q_ref).max(), 1e-300)
        if not (np.abs(phi - phi_ref).max() <= CHECK_TOLERANCE * scale_phi
                and np.abs(q - q_ref).max() <= CHECK_TOLERANCE * max(scale_q, 1e-12)):
            return False
    return True
