"""Reverse-time SDE and probability-flow ODE (Anderson 1982; Song et al. 2021).

    reverse:  dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar
    flow:     dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t)
"""
from __future__ import annotations

import sympy as sp

SCORE = sp.Dummy("score", real=True)  # stands for the score s(x, t)


def reverse_drift(drift: sp.Expr, g2: sp.Expr) -> sp.Expr:
    return drift - g2 * SCORE


def flow_drift(drift: sp.Expr, g2: sp.Expr) -> sp.Expr:
    return drift - g2 * SCORE / 2
