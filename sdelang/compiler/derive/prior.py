"""The prior N(mu, s2 I) at time T, stated or derived from the kernel.

Derived: the kernel at T with the data term dropped, mu = c(T), s2 = v(T).

    log prior(z) = -d/2 log(2 pi s2) - |z - mu|^2 / (2 s2)
"""
from __future__ import annotations

import sympy as sp

from .kernel import Kernel
from .symbolic import simplest


def prior(k: Kernel, t: sp.Symbol, T: sp.Expr, mean: sp.Expr | None, variance: sp.Expr | None
          ) -> tuple[sp.Expr, sp.Expr]:
    if mean is not None and variance is not None:
        return mean, variance
    return simplest(k.c.xreplace({t: T})), simplest(k.v.xreplace({t: T}))
