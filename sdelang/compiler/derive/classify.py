"""Split an affine drift f(x, t) = a(t) x + b(t)."""
from __future__ import annotations

import sympy as sp


def classify(drift: sp.Expr, x: sp.Symbol) -> tuple[sp.Expr, sp.Expr]:
    """Return (a, b) with drift = a(t) x + b(t): a = df/dx, b = f(0, t).

    The checker has already refused drifts whose slope depends on x.
    """
    a = sp.simplify(sp.diff(drift, x)) if sp.diff(drift, x).has(x) else sp.diff(drift, x)
    return a, drift.subs(x, 0)
