"""Exact-transition discretisation for the reverse-diffusion predictor.

Over one step from s to t > s the forward kernel is exact:

    x_t | x_s ~ N(r x_s + c(t) - r c(s), G^2),   r = m(t) / m(s),
    G^2 = v(t) - r^2 v(s) = -v(t) expm1(logSNR(t) - logSNR(s)),

the last form avoiding the cancellation of two nearly equal variances. In the
convention x_t = x_s + f + G z this gives f = (r - 1) x + c(t) - r c(s).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .kernel import Kernel
from .symbolic import simplest

START = sp.Dummy("s", positive=True)  # the start of the step (a Dummy: never a user's name)


@dataclass(frozen=True)
class Step:
    ratio: sp.Expr      # r = m(t) / m(s)
    offset: sp.Expr     # c(t) - r c(s)
    variance: sp.Expr   # G^2; the generated code evaluates it through logSNR as above


def discretize(k: Kernel, lsnr: sp.Expr, t: sp.Symbol) -> Step:
    at_start = {t: START}
    ratio = simplest(k.m / k.m.xreplace(at_start))
    offset = simplest(k.c - ratio * k.c.xreplace(at_start)) if k.c != 0 else sp.Integer(0)
    variance = -k.v * (sp.exp(lsnr - lsnr.xreplace(at_start)) - 1)
    return Step(ratio, offset, variance)
