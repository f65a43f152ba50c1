"""Divergence of an affine drift: div_x (a(t) x + b(t)) = d a(t), d the data dimension."""
from __future__ import annotations

import sympy as sp

DIM = sp.Dummy("d", positive=True, integer=True)  # the data dimension


def drift_divergence(a: sp.Expr) -> sp.Expr:
    return DIM * a
