"""The loss weighting lambda(t).

    likelihood:      lambda = g^2        (ScoreFlow: J(theta; g^2) bounds the KL)
    score_matching:  lambda = sigma^2 = v
    custom:          the user's positive expression
"""
from __future__ import annotations

import sympy as sp


def weighting(kind: str, custom: sp.Expr | None, g2: sp.Expr, v: sp.Expr) -> sp.Expr:
    if kind == "likelihood":
        return g2
    if kind == "score_matching":
        return v
    assert custom is not None
    return custom
