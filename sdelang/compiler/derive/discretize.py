"""Exact-transition discretisation for the reverse-diffusion predictor.

Over one step from s to t > s the forward kernel is exact:

    x_t | x_s ~ N(r x_s + c(t) - r c(s), G^2),   r = m(t) / m(s),
    G^2 = v(t) - r^2 v(s) = -v(t) expm1(logSNR(t) - logSNR(s)),

the last form avoiding the cancellation of two nearly equal variances when
logSNR(t) - logSNR(s) is simplified symbolically (for VE it is -2 log(sigma_max /
sigma_min) (t - s), with no cancellation at all). In the convention
x_t = x_s + f + G z this gives f = (r - 1) x + c(t) - r c(s). Of the equivalent
forms of r, c(t) - r c(s) and G^2 the one most accurate in float32 over steps
of length T/N (and shorter) is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .kernel import Kernel
from .symbolic import SIMPLIFY_LIMIT, Accuracy, bounded, printable, rewrites

START = sp.Dummy("s", positive=True)  # the start of the step (a Dummy: never a user's name)


@dataclass(frozen=True)
class Step:
    ratio: sp.Expr      # r = m(t) / m(s)
    offset: sp.Expr     # c(t) - r c(s)
    variance: sp.Expr   # G^2


def discretize(k: Kernel, lsnr: sp.Expr, t: sp.Symbol, accuracy: Accuracy, N: int) -> Step:
    at_start = {t: START}
    step = accuracy.T / N  # s = max(t - T/N, 0)

    def best(candidates):
        return accuracy.best_over_steps(candidates, t, START, step)

    # m = exp(A): the ratio is exp(A(t) - A(s)), and powsimp finds it; simplify on two variables
    # is slow and adds nothing here.
    ratio = sp.powsimp(k.m / k.m.xreplace(at_start))
    offset = best(rewrites(k.c - ratio * k.c.xreplace(at_start))) if k.c != 0 else sp.Integer(0)
    drop = lsnr - lsnr.xreplace(at_start)
    # Logs expanded and like terms collected: VE's drop becomes -2 (t - s) log(sigma_max / sigma_min).
    collected = bounded(lambda d: sp.factor(sp.expand(sp.expand_log(d, force=True))), drop, seconds=SIMPLIFY_LIMIT)
    drops = [drop] if collected is None or not printable(collected) else [drop, collected]
    variance = best([-k.v * (sp.exp(d) - 1) for d in drops])
    return Step(ratio, offset, variance)
