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
in time and they check out against a numeric matrix exponential at the defaults; otherwise the
generated module computes them from the Van Loan block exponential
    exp([[F0, D0], [0, -F0^T]] r) = [[Phi, Q Phi^-T], [0, Phi^-T]]
in float64 with torch.linalg.matrix_exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import mpmath
import numpy as np
import scipy.linalg
import sympy as sp

from ..ir import CoupledProgram
from .symbolic import bounded, integrate_from, printable, simplest, use_expm1_log1p

R = sp.Dummy("r", positive=True)      # the time change r = B(t)
RHO = sp.Dummy("rho", positive=True)
MATRIX_LIMIT = 8.0                    # seconds for the matrix exponential, and again for the integral
CHECK_TOLERANCE = 1e-9                # relative disagreement with the numeric kernel that refuses a closed form
PRECISION = 1e-7                      # relative float64 error of Sigma near eps that refuses a closed form


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
        return "closed form" if self.closed_form else "numeric (Van Loan matrix exponential, float64)"

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
    if Phi is not None and not (agrees(Phi, Q, F0, D0, p.defaults)
                                and precise(Phi, Q, Sigma0, B.xreplace({t: p.eps}), p.defaults)):
        Phi = Q = None
    return CoupledDerivation(p, phi, B, F0, D0, mean0, Sigma0, Phi, Q)


def closed_kernel(F0: sp.Matrix, D0: sp.Matrix) -> tuple[sp.Matrix | None, sp.Matrix | None]:
    """Phi(r) = exp(F0 r) and Q(r) = int_0^r Phi D0 Phi^T, or (None, None) if SymPy does not find them in time."""
    Phi = bounded(lambda: (F0 * R).exp().applyfunc(sp.simplify), seconds=MATRIX_LIMIT)
    if Phi is None or not all(printable(e) for e in Phi):
        return None, None
    at = Phi.xreplace({R: RHO})
    integrand = at * D0 * at.T

    def integrate():
        return integrand.applyfunc(lambda e: simplest(integrate_from(sp.expand(e), RHO, sp.Integer(0), R)))
    Q = bounded(integrate, seconds=MATRIX_LIMIT)
    if Q is None or any(e.has(sp.Integral) or not printable(e) for e in Q):
        return None, None
    return Phi.applyfunc(simplest), Q


def precise(Phi: sp.Matrix, Q: sp.Matrix, Sigma0: sp.Matrix, r_eps: sp.Expr, defaults: dict) -> bool:
    """Sigma = Phi Sigma0 Phi^T + Q evaluated in float64, as the module will (after the expm1/log1p rewrites
    code generation applies), against 50-digit arithmetic at r = B(eps), 10 B(eps) and 100 B(eps): a closed
    form that cancels near t = 0 (1 - (r^2 + 2 r + 2) exp(-r) / 2 ~ r^3) is not used."""
    Sigma = (Phi * Sigma0.subs(defaults) * Phi.T + Q).subs(defaults)
    entries = [bounded(use_expm1_log1p, e, seconds=2.0) or e for e in Sigma]
    fast = sp.lambdify(R, entries, modules="math")
    r0 = float(sp.N(r_eps.subs(defaults)))
    for r in (r0, 10 * r0, 100 * r0):
        try:
            got = np.array(fast(r), dtype=float)
        except (ValueError, OverflowError, ZeroDivisionError):
            return False
        with mpmath.workdps(50):
            want = np.array([float(sp.N(e.xreplace({R: sp.Float(r, 50)}), 50)) for e in entries])
        if not np.all(np.isfinite(got)) or np.any(np.abs(got - want) > PRECISION * np.abs(want) + 1e-300):
            return False
    return True


def agrees(Phi: sp.Matrix, Q: sp.Matrix, F0: sp.Matrix, D0: sp.Matrix, defaults: dict) -> bool:
    """The closed forms against scipy's matrix exponential (Van Loan) at a few r, with the default parameters:
    a closed form that is complex, singular or wrong at the defaults is not used."""
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
