"""Exact-transition discretisation for the reverse-diffusion predictor.

Over one step from s to t > s the forward kernel is exact:

    x_t | x_s ~ N(r x_s + c(t) - r c(s), G^2),   r = m(t) / m(s),
    G^2 = v(t) - r^2 v(s) = -v(t) expm1(logSNR(t) - logSNR(s)),

the last form avoiding the cancellation of two nearly equal variances when
logSNR(t) - logSNR(s) is simplified symbolically (for VE it is -2 log(sigma_max /
sigma_min) (t - s), with no cancellation at all). In the convention
x_t = x_s + f + G z this gives f = (r - 1) x + c(t) - r c(s). Of the equivalent
forms of r - 1, c(t) - r c(s) and G^2 the one most accurate in float32 over steps
of length T/N (and shorter) is kept: r - 1 as expm1(A(t) - A(s)) where m = exp(A),
since r computed first and 1 subtracted after keeps only the digits of r that
differ from 1 (VP's increment lost 5e-2 of itself in float32 over a step at t = eps).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from sympy.codegen.cfunctions import expm1

from .kernel import Kernel
from .symbolic import SIMPLIFY_LIMIT, Accuracy, bounded, printable, rewrites, sum_to_product

START = sp.Dummy("s", positive=True)  # the start of the step (a Dummy: never a user's name)


@dataclass(frozen=True)
class Step:
    ratio: sp.Expr      # r = m(t) / m(s)
    growth: sp.Expr     # r - 1, in a form that does not cancel over a short step
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
    if isinstance(ratio, sp.exp):
        # The common case, m = exp(A): expm1 of A(t) - A(s), with t - s as a factor where it is one.
        A = ratio.args[0]
        exponents = [A, bounded(lambda e: sp.factor(sp.expand(e)), A, seconds=SIMPLIFY_LIMIT)]
        if A.has(sp.cos):
            exponents.append(bounded(sum_to_product, A, seconds=SIMPLIFY_LIMIT))   # cos(3 s) - cos(3 t)
        if isinstance(k.m, sp.exp):
            # A(t) - A(s) by step_difference: an exponential schedule's A = -b0 (e^(k t) - 1) / (2 k) is not a
            # polynomial, and its difference is -b0 e^(k s) expm1(k (t - s)) / (2 k).
            exponents.append(bounded(lambda: step_difference(k.m.args[0], t), seconds=SIMPLIFY_LIMIT))
        growths = [ratio - 1] + [expm1(e) for e in exponents if e is not None and printable(e)]
    else:
        growths = rewrites(ratio - 1)   # a ratio of cosines becomes a product of sines, (1 + d - t) / (1 + d - s) ...
    growth = best(growths)
    offset = best(rewrites(k.c - ratio * k.c.xreplace(at_start))) if k.c != 0 else sp.Integer(0)
    drop = lsnr - lsnr.xreplace(at_start)
    # Logs expanded and like terms collected: VE's drop becomes -2 (t - s) log(sigma_max / sigma_min).
    collected = bounded(lambda d: sp.factor(sp.expand(sp.expand_log(d, force=True))), drop, seconds=SIMPLIFY_LIMIT)
    drops = [drop] if collected is None or not printable(collected) else [drop, collected]
    candidates = [-k.v * (sp.exp(d) - 1) for d in drops]
    # G^2 = m(t)^2 (N(t) - N(s)), N = v / m^2: with v0 > 0 the logSNR drop is a difference of nearly equal logs
    # (VE: G^2 = (v(s) / v(t) - 1) v(t) lost 1e-2 in float32 at t = 1e-5); termwise in t - s it keeps its digits.
    noise = bounded(lambda: step_difference(sp.powsimp(k.v / k.m**2), t), seconds=SIMPLIFY_LIMIT)
    if noise is not None and printable(noise):
        # m(t)^2 into each term, its exponentials combined: exp(2 theta (s - t)), not exp(2 theta s) exp(-2 theta t),
        # which overflows first.
        candidates.append(sp.Add(*[sp.powsimp(k.m**2 * term, combine="exp") for term in sp.Add.make_args(noise)]))
    variance = best(candidates)
    return Step(ratio, growth, offset, variance)


def step_difference(N: sp.Expr, t: sp.Symbol, depth: int = 0) -> sp.Expr:
    """N(t) - N(s) term by term, without the difference of nearly equal values when s ~ t: a term c exp(u(t))
    gives c exp(u(s)) expm1(u(t) - u(s)), a term c p(t) exp(u(t)) with p a polynomial gives
    c exp(u(s)) (p(t) expm1(u(t) - u(s)) + (p(t) - p(s))), with u(t) - u(s) itself a step difference (a (t - s)
    for a linear u, (t - s) (b0 + b1 (t + s) / 2) for VP's quadratic B, c exp(k s) expm1(k (t - s)) for an exponential
    schedule's); a polynomial or rational term keeps its factor (t - s); a constant gives nothing; any other term
    stays a difference."""
    out = []
    for term in sp.Add.make_args(sp.expand(N.rewrite(sp.exp), power_base=False, power_exp=True, log=False)):
        coeff, f = term.as_independent(t, as_Add=False)
        f = sp.powsimp(f, combine="exp")
        if f == 1:
            continue
        exps = [f] if isinstance(f, sp.exp) else [e for e in sp.Mul.make_args(f) if isinstance(e, sp.exp)]
        if len(exps) == 1:
            p = sp.Mul(*(e for e in sp.Mul.make_args(f) if e is not exps[0]))   # f / exp would keep exp(u) exp(-u)
            arg = sp.expand(sp.expand_log(exps[0].args[0], force=True))
            if p.is_polynomial(t) and (arg.is_polynomial(t) or depth == 0):
                # u(t) - u(s) by the same rule, one level down (an exponent that is itself an exponential).
                rise = sp.factor(arg - arg.xreplace({t: START})) if arg.is_polynomial(t) else step_difference(arg, t, 1)
                at_start = sp.exp(arg.xreplace({t: START}))
                out.append(coeff * at_start * (p * expm1(rise) + sp.factor(p - p.xreplace({t: START}))))
                continue
        if f.is_polynomial(t) or f.is_rational_function(t):
            out.append(coeff * sp.factor(sp.together(f - f.xreplace({t: START}))))
            continue
        out.append(term - term.xreplace({t: START}))
    return sp.Add(*out)
