"""The prior N(mu, s2 I) at time T, stated or derived from the kernel.

Derived: the kernel at T with the data term dropped, mu = c(T), s2 = v(T).

    log prior(z) = -d/2 log(2 pi s2) - |z - mu|^2 / (2 s2)
"""
from __future__ import annotations

import sympy as sp

from .kernel import Kernel
from .symbolic import NUMERIC, accurate_constant


def prior(k: Kernel, t: sp.Symbol, T: sp.Expr, mean: sp.Expr | None, variance: sp.Expr | None, defaults: dict
          ) -> tuple[sp.Expr, sp.Expr]:
    if mean is not None and variance is not None:
        return mean, variance
    # The kernel's own forms at T, chosen for their accuracy on [eps, T]; simplified only where float64 loses them.
    return tuple(q.xreplace({t: T}) if q.has(*NUMERIC) else accurate_constant(q.xreplace({t: T}), defaults)
                 for q in (k.c, k.v))
