"""The prior N(mu, s2 I) at time T, stated or derived from the kernel.

Derived: the kernel at T with the data term dropped, mu = c(T), s2 = v(T).

    log prior(z) = -d/2 log(2 pi s2) - |z - mu|^2 / (2 s2)
"""
from __future__ import annotations

import sympy as sp

from .kernel import Kernel
from .symbolic import NUMERIC, constant_error, simplest


def prior(k: Kernel, t: sp.Symbol, T: sp.Expr, mean: sp.Expr | None, variance: sp.Expr | None, defaults: dict
          ) -> tuple[sp.Expr, sp.Expr]:
    if mean is not None and variance is not None:
        return mean, variance
    return _at_T(k.c, t, T, defaults), _at_T(k.v, t, T, defaults)


def _at_T(q: sp.Expr, t: sp.Symbol, T: sp.Expr, defaults: dict) -> sp.Expr:
    """q(T) in the kernel's own form, which was chosen for its accuracy on [eps, T]; simplified anew only where that
    is not within 1e-12 in float64 at the defaults (SymPy's simplify of a constant with numbers in every exponent
    ran to its 1 s limit for every kernel-form schedule of the probes, and gave what the examples already had)."""
    at_T = q.xreplace({t: T})
    if at_T.has(*NUMERIC) or constant_error(at_T, defaults) <= 1e-12:
        return at_T
    return simplest(at_T)
