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

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .kernel import Kernel, log_of_positive
from .symbolic import (SIMPLIFY_LIMIT, Accuracy, Smaller, bounded, exponential_powers, is_closed, is_constant_in,
                       log_growth, printable, rewrites, sum_to_product, use_expm1_log1p)

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

    N = sp.powsimp(k.v / k.m**2)
    differences = _differences(N, t)   # of N = v / m^2 over the step: for G^2, and r - 1 of a VP kernel
    total = k.v + k.m**2
    preserving = bool(bounded(is_constant_in, total, t, seconds=SIMPLIFY_LIMIT))   # v + m^2 = C
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
        # m = C q(t)^e: r - 1 = expm1(e log1p((q(t) - q(s)) / q(s))) (a VP given by its logSNR, m^2 = sigmoid(logSNR):
        # r - 1 as a ratio lost 2.2e-3 of G in float32 over a step of 1e-5).
        powers = bounded(power_steps, k.m, t, seconds=SIMPLIFY_LIMIT)
        if powers is not None:
            _, e, q_start, d = powers
            growth = expm1(e * log1p(d / q_start))
            growths += [growth] if printable(growth) else []
        growths += _variance_preserving_growths(N, differences, t) if preserving else []
    growth = best(growths)
    offset = best(rewrites(k.c - ratio * k.c.xreplace(at_start))) if k.c != 0 else sp.Integer(0)
    drop = lsnr - lsnr.xreplace(at_start)
    # Logs expanded and like terms collected: VE's drop becomes -2 (t - s) log(sigma_max / sigma_min).
    collected = bounded(lambda d: sp.factor(sp.expand(sp.expand_log(d, force=True))), drop, seconds=SIMPLIFY_LIMIT)
    drops = [drop] if collected is None or not printable(collected) else [drop, collected]
    candidates = [-k.v * (sp.exp(d) - 1) for d in drops]
    # G^2 = m(t)^2 (N(t) - N(s)), N = v / m^2: with v0 > 0 the logSNR drop is a difference of nearly equal logs
    # (VE: G^2 = (v(s) / v(t) - 1) v(t) lost 1e-2 in float32 at t = 1e-5); termwise in t - s it keeps its digits.
    noise = differences["termwise"]
    if noise is not None:
        # m(t)^2 into each term, its exponentials combined: exp(2 theta (s - t)), not exp(2 theta s) exp(-2 theta t),
        # which overflows first.
        candidates.append(sp.Add(*[sp.powsimp(k.m**2 * term, combine="exp") for term in sp.Add.make_args(noise)]))
    factored = bounded(lambda: exponential_step_factors(N, t), seconds=SIMPLIFY_LIMIT)
    if factored is not None and printable(factored):
        candidates.append(sp.powsimp(k.m**2 * factored, combine="exp"))
    candidates += [k.m**2 * differences[name] for name in ("rational", "power", "product")
                   if differences[name] is not None]
    if preserving:
        # Variance preserving, v + m^2 = C: G^2 = C (1 - r^2) = -C (r - 1)(r + 1), from the accurate r - 1 (a cosine
        # schedule's r - 1 is a product of sines, its v a difference of cosines over the step).
        C = bounded(sp.simplify, total.xreplace({t: sp.Integer(0)}), seconds=SIMPLIFY_LIMIT)
        if C is not None and not C.has(sp.zoo, sp.nan, sp.oo, -sp.oo) and printable(C):
            candidates.append(-C * growth * (2 + growth))
    if k.vp_multiple is not None and not is_closed(k.v):
        # VP-like noise with v from the tables: G^2 = -k (r - 1)(r + 1) from the accurate r - 1, not a difference of
        # table values, which the forms above are, all (a sigmoid beta rising to 1e4 lost 2e-7 of G over steps of 1e-7
        # that way, ~1e-13 of table rounding over a G^2 ~ step); forms with tables cannot be measured, and the
        # shortest of them was kept.
        return Step(ratio, growth, offset, -k.vp_multiple * growth * (2 + growth))
    variance = best(candidates)
    return Step(ratio, growth, offset, variance)


def head_integral(k: Kernel, t: sp.Symbol) -> sp.Expr | None:
    """The Integral int_0^t g^2 / m^2 in a variance v = m^2 (v0 + int_0^t g^2 / m^2) that has one (None if v holds
    no such Integral or more than one)."""
    of_m = k.m.atoms(sp.Integral)
    heads = [i for i in k.v.atoms(sp.Integral)
             if i not in of_m and len(i.limits) == 1 and i.limits[0][1] == 0 and i.limits[0][2] == t]
    return heads[0] if len(heads) == 1 else None


def from_head(step: Step, log_head: sp.Expr, m: sp.Expr, t: sp.Symbol) -> Step:
    """The step's noise G^2 = m(t)^2 (I(t) - I(s)), I = int_0^t g^2 / m^2, from log I's table column.

    With an initial variance v0 > 0, v = m^2 (v0 + I) is v0 m^2 and a little near t = 0, and every form of G^2 from
    log v differences two nearly equal table values: G was 1.7e-7 off in float64 over a step of 1e-5 of t near
    eps with v0 = 0.09, 6.6e-6 with v0 = 9. I(t) - I(s) = -I(t) expm1(log I(s) - log I(t)) does not depend on v0
    (log I ~ log t near 0 has its digits), and m(t)^2 I(t) is one exponential, which neither overflows nor
    underflows where v does not."""
    start = {t: START}
    scale = sp.exp(2 * log_of_positive(m) + log_head)
    return Step(step.ratio, step.growth, step.offset, -scale * expm1(log_head.xreplace(start) - log_head))


def with_tail(step: Step, W: sp.Expr, v: sp.Expr, t: sp.Symbol) -> Step:
    """The step's noise read from the tail W(t) = m(t)^2 int_t^T g^2 / m^2 as well, where that cancels less.

    G^2 = m(t)^2 int_s^t g^2 / m^2 is v(t) - r^2 v(s) (from the head, int_0^t) and also r^2 W(s) - W(t) (from
    the tail): the first loses the digits of its size v(t), the second of r^2 W(s). For a state that grows
    (g^2 / m^2 decays) the head's integral has all but converged, and v(t) - r^2 v(s) cancelled completely: G = 0
    instead of 0.0318 at the default step of dx = 12 (1 + sin(3 t)^2) x dt + dw. The module takes the form whose
    size is smaller, point by point (Smaller: a torch.where)."""
    start = {t: START}
    r2 = step.ratio**2
    tail = r2 * W.xreplace(start)
    return Step(step.ratio, step.growth, step.offset, Smaller(tail, v, tail - W, step.variance))


def tail_helps(a: sp.Expr, t: sp.Symbol, defaults: dict, T: float) -> bool:
    """True if m = exp(int a) grows by more than e^(1/2) over some stretch of [0, T] at the default parameters
    (so that g^2 / m^2 decays there and the step's noise from the tail cancels less than from the head), and
    m^2 stays within float64's range (the tail column is m^2 times an integral of g^2 / m^2)."""
    A = log_growth(a, t, defaults, T)
    if A is None:
        return False
    return bool(np.max(A - np.minimum.accumulate(A)) > 0.5 and np.max(np.abs(2 * A)) < 600)


def exponential_step_factors(N: sp.Expr, t: sp.Symbol) -> sp.Expr | None:
    """N(t) - N(s) for N a rational function of exp(u(t)) (every exponential exp(q u), q rational), factored as a
    rational function of X = exp(u(t)) and Y = exp(u(s)), each factor X^a Y^b - X^c Y^d with a - c = d - b written
    -X^c Y^b expm1((a - c) (u(t) - u(s))), u(t) - u(s) a step difference. Sub-VP's N = e^B - 2 + e^-B has
    N(t) - N(s) = (X - Y)(XY - 1) / (XY): termwise (step_difference) the e^B and e^-B terms cancel near t = 0 and
    the ratio form loses (t - s) to rounding; factored, it is e^-B(s) expm1(B(t) - B(s)) (-expm1(-B(t) - B(s))).
    None where N is not of that kind or nothing cancels."""
    expanded = sp.expand(N.rewrite(sp.exp), power_base=False, power_exp=True, log=False)
    expanded = sp.Add(*[sp.powsimp(term, combine="exp") for term in sp.Add.make_args(expanded)])
    powers = exponential_powers(e for e in expanded.atoms(sp.exp) if e.has(t))
    if powers is None:
        return None
    base, exponents = powers
    X, Y = sp.Dummy("X", positive=True), sp.Dummy("Y", positive=True)
    in_X = expanded.xreplace({e: X**n for e, n in exponents.items()})
    if in_X.has(t):
        return None
    difference = sp.factor(sp.together(in_X - in_X.xreplace({X: Y})))
    rise = step_difference(base, t)   # u(t) - u(s), without cancellation

    def expm1_form(factor):
        terms = sp.Add.make_args(sp.expand(factor))
        if len(terms) != 2:
            return factor
        monomials = [_monomial(term, X, Y) for term in terms]
        if None in monomials:
            return factor
        (c1, (a, b)), (c2, (c, d)) = monomials
        if c2 != -c1 or a - c != d - b or a == c:
            return factor
        # c1 X^a Y^b - c1 X^c Y^d = c1 X^c Y^b (X^(a - c) - Y^(a - c)) = c1 X^c Y^b Y^(a - c) expm1((a - c) rise)
        return c1 * X**c * Y**b * Y ** (a - c) * expm1((a - c) * rise)

    numerator, denominator = sp.fraction(difference)
    factors = []
    for f in sp.Mul.make_args(numerator):
        f, n = (f.base, f.exp) if f.is_Pow and f.exp.is_Integer else (f, 1)
        factors.append(expm1_form(f) ** n)
    if not any(f.has(expm1) for f in factors):
        return None
    back = {X: sp.exp(base), Y: sp.exp(base.xreplace({t: START}))}
    return (sp.Mul(*factors) / denominator).xreplace(back)


def _differences(N: sp.Expr, t: sp.Symbol) -> dict[str, sp.Expr | None]:
    """N(t) - N(s) in the forms that keep t - s as a factor, each bounded, None where not found or not printable:
    "termwise" (step_difference), "rational" (for a rational N, one factored fraction: an OU process with rate
    1 / (1 + t) has N = 2 ((1 + t)^3 - 1) / 3, and termwise the linear term's 2 t - 2 s and the others round apart,
    G 8e-5 off in float32 at the default step), "power" (power_step_difference) and "product"
    (product_difference)."""
    found = {"termwise": bounded(step_difference, N, t, seconds=SIMPLIFY_LIMIT),
             "rational": bounded(lambda: sp.factor(sp.together(N - N.xreplace({t: START}))), seconds=SIMPLIFY_LIMIT)
             if N.is_rational_function(t) else None,
             "power": bounded(power_step_difference, N, t, seconds=SIMPLIFY_LIMIT),
             "product": bounded(product_difference, N, t, seconds=SIMPLIFY_LIMIT)}
    return {name: d if d is not None and printable(d) else None for name, d in found.items()}


def _variance_preserving_growths(N: sp.Expr, differences: dict, t: sp.Symbol) -> list[sp.Expr]:
    """r - 1 of a variance-preserving kernel, v + m^2 = C, from N = v / m^2 = e^-logSNR: m^2 = C / (1 + N), so
    r - 1 = expm1(-log1p((N(t) - N(s)) / (1 + N(s))) / 2), with N(t) - N(s) in the forms of `_differences`.
    A ratio of m's minus 1 keeps only the digits in which r differs from 1: a logit logSNR, 2 log(1/t - 1), had r - 1
    5e-3 off in float64 over a step of 1e-5 of t at t = 3e-5, a cosine kernel 3e-5 (both near 1e-14 in size)."""
    if any(p.is_Pow and not p.exp.is_Number for p in sp.preorder_traversal(N)):
        # A power with a parameter for exponent (Karras' sigma^(2 rho)): measuring these forms at moved parameters could
        # take the compile's whole 60 s (an intermittent test failure); its other forms are left to do.
        return []
    start = N.xreplace({t: START})
    return [g for d in differences.values() if d is not None
            for g in [expm1(-log1p(d / (1 + start)) / 2)] if printable(g)]


def power_step_difference(N: sp.Expr, t: sp.Symbol) -> sp.Expr | None:
    """N(t) - N(s) for N = C q(t)^e (C and e free of t) as C q(s)^e expm1(e log1p(d / q(s))), d = q(t) - q(s) with
    t - s as a factor (power_steps). Karras' sigma = (a + b t)^rho makes VE's G^2 = sigma(t)^2 - sigma(s)^2 a
    difference of 14th powers, 2.7e-3 off in float32 over a step of 1e-5; a linear interpolant with sigma_min has
    N = ((smin + (1 - smin) t) / (1 - t))^2, whose difference as one fraction has a numerator that cancels near T.
    None where N is not such a power."""
    found = power_steps(N, t)
    if found is None:
        return None
    C, e, q_start, d = found
    return C * q_start ** e * expm1(e * log1p(d / q_start))


def product_difference(N: sp.Expr, t: sp.Symbol) -> sp.Expr | None:
    """N(t) - N(s) for N = C f_1(t) ... f_n(t), n >= 2, by the product rule over the step,
    sum_i f_1(s) ... f_(i-1)(s) (f_i(t) - f_i(s)) f_(i+1)(t) ... f_n(t), with each factor's difference a
    step_difference (f = q), -d / (q(t) q(s)) (f = 1 / q, d = q(t) - q(s) a step_difference) or
    power_step_difference (f = q^e), and each q written with expm1 where it is e^u - c. Chen's sigmoid kernel
    (given by gamma(t) = (sigmoid(end / tau) - sigmoid(u(t))) / (...)) has N = C (e^(k t) - 1) / (e^(k (t - 1)) - 1):
    termwise its terms are sigmoids of t and of s, whose difference lost 3e-7 of r - 1 in float64 over a step of
    1e-5 of t near eps; none of the other forms applies (two exponentials with parameter rates). None where N is no
    such product."""
    C, rest = N.as_independent(t, as_Add=False)
    factors = sp.Mul.make_args(rest)
    if len(factors) < 2:
        return None
    at_t, at_s, differences = [], [], []
    for f in factors:
        q, e = f.as_base_exp()
        if e.has(t) or not q.has(t):
            return None
        q_start = use_expm1_log1p(sp.powsimp(q.xreplace({t: START}), combine="exp"))
        d = step_difference(q, t)
        if not d.has(START) or d.has(sp.Integral):
            return None
        if e == 1:
            difference = d
        elif e == -1:
            difference = -d / (use_expm1_log1p(q) * q_start)
        elif (difference := power_step_difference(f, t)) is None:
            return None
        at_t.append(use_expm1_log1p(q)**e)
        at_s.append(q_start**e)
        differences.append(difference)
    return C * sp.Add(*[sp.Mul(*at_s[:i], differences[i], *at_t[i + 1:]) for i in range(len(factors))])


def power_steps(N: sp.Expr, t: sp.Symbol) -> tuple[sp.Expr, sp.Expr, sp.Expr, sp.Expr] | None:
    """(C, e, q(s), q(t) - q(s)) for N = C q(t)^e, the difference one factored fraction for a rational q, else a
    step_difference (a logSNR-form VP's m = (1 + a expm1(B(t)))^(-1/2)); None if N is no such power or q(0) may be 0
    (rectified flow's N = (t / (1 - t))^2): the first step starts at s = 0, and the forms divide by q(s)."""
    C, rest = sp.together(N).as_independent(t, as_Add=False)
    rest = sp.powdenest(rest, force=True)   # sqrt(1 / X) as X^(-1/2)
    if rest.is_Pow:
        q, e = rest.base, rest.exp
    else:
        # C P^e / Q^e as C (P / Q)^e
        (P, e), (Q, e_den) = (f.as_base_exp() for f in sp.fraction(rest))
        if Q != 1 and e_den != e:
            return None
        q = P / Q
    if e.has(t) or not q.has(t) or e == 1 or _at_zero(q, t).is_zero is not False:
        return None
    q_start = q.xreplace({t: START})
    d = sp.factor(sp.together(q - q_start)) if q.is_rational_function(t) else step_difference(q, t)
    if not d.has(START) or d.has(sp.Integral):
        return None
    return C, e, q_start, d


def _at_zero(q: sp.Expr, t: sp.Symbol) -> sp.Expr:
    """q at t = 0, as the limit from above where putting 0 in is undefined: 1 + exp(k log t - c0) (a VP given by
    logSNR = -k log t + c0) is 1 there, not nan."""
    value = q.xreplace({t: 0})
    if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        limit = bounded(sp.limit, q, t, 0, "+", seconds=SIMPLIFY_LIMIT)
        return limit if limit is not None else value
    return value


def _monomial(term, X, Y):
    """(c, (a, b)) for term = c X^a Y^b, c free of X and Y; None otherwise."""
    c, rest = term.as_independent(X, Y, as_Add=False)
    powers = rest.as_powers_dict()
    if set(powers) - {X, Y, sp.S.One} or not all(n.is_Integer for n in powers.values()):
        return None
    return c, (powers.get(X, 0), powers.get(Y, 0))


def step_difference(N: sp.Expr, t: sp.Symbol, depth: int = 0) -> sp.Expr:
    """N(t) - N(s) term by term, without the difference of nearly equal values when s ~ t: a term c exp(u(t))
    gives c exp(u(s)) expm1(u(t) - u(s)), a term c p(t) exp(u(t)) with p a polynomial gives
    c exp(u(s)) (p(t) expm1(u(t) - u(s)) + (p(t) - p(s))), with u(t) - u(s) itself a step difference (a (t - s)
    for a linear u, (t - s) (b0 + b1 (t + s) / 2) for VP's quadratic B, c exp(k s) expm1(k (t - s)) for an exponential
    schedule's); a polynomial or rational term keeps its factor (t - s); a constant gives nothing; any other term
    stays a difference."""
    out = []
    expanded = sp.expand(N.rewrite(sp.exp), power_base=False, power_exp=True, log=False)
    if expanded.has(sp.I) and not N.has(sp.I):
        # Trigonometric functions in exponentials are complex, which no module prints: their terms as they are.
        expanded = sp.expand(N, power_base=False, power_exp=True, log=False)
    # The terms of each |u(t)| and sign(u(t)) gathered, p(t) |u(t)| (expanded, (t - c) |t - c| is t |t - c| - c |t - c|,
    # whose difference would cancel where t - c is small).
    kinked = sorted((a for a in expanded.atoms(sp.Abs, sp.sign) if a.has(t)), key=sp.default_sort_key)
    if kinked:
        expanded = sp.collect(expanded, kinked)
    for term in sp.Add.make_args(expanded):
        coeff, f = term.as_independent(t, as_Add=False)
        f = sp.powsimp(f, combine="exp")
        if f == 1:
            continue
        kink = absolute_difference(f, t, depth)
        if kink is not None:
            out.append(coeff * kink)
            continue
        exps = [f] if isinstance(f, sp.exp) else [e for e in sp.Mul.make_args(f) if isinstance(e, sp.exp)]
        if len(exps) == 1:
            p = sp.Mul(*(e for e in sp.Mul.make_args(f) if e is not exps[0]))   # f / exp would keep exp(u) exp(-u)
            arg = sp.expand(sp.expand_log(exps[0].args[0], force=True))
            a = arg.coeff(sp.log(t))
            if p == 1 and a != 0 and not (arg - a * sp.log(t)).has(t) and not a.has(t):
                # A power t^a: from t, -t^a expm1(a log1p((s - t) / t)), which is t^a at s = 0 (the first step); from
                # s, s^a expm1(a (log t - log s)) is 0 inf there, and a VP given by logSNR = -k log t + c0 lost its
                # accurate r - 1 to a ratio of square roots minus 1 (1.8e-4 of r - 1 off over a step of 1e-5 of t).
                out.append(-coeff * f * expm1(a * log1p((START - t) / t)))
                continue
            if p.is_polynomial(t) and (arg.is_polynomial(t) or depth == 0):
                # u(t) - u(s) by the same rule, one level down (an exponent that is itself an exponential).
                rise = sp.factor(arg - arg.xreplace({t: START})) if arg.is_polynomial(t) else step_difference(arg, t, 1)
                at_start = sp.exp(arg.xreplace({t: START}))
                out.append(coeff * at_start * (p * expm1(rise) + sp.factor(p - p.xreplace({t: START}))))
                continue
        if f.is_polynomial(t) or f.is_rational_function(t):
            out.append(coeff * sp.factor(sp.together(f - f.xreplace({t: START}))))
            continue
        if isinstance(f, sp.log) and depth == 0:
            # log q(t) - log q(s) = log1p((q(t) - q(s)) / q(s)), the difference of q by the same rule: a softplus-like
            # A = c log(e^(k/2) + e^(k t)) lost ~|A| / (A(t) - A(s)) roundings (2e-5 of a VP's G over steps of 1e-7).
            q = f.args[0]
            rise = step_difference(q, t, 1)
            if rise.has(START) and not rise.has(sp.Integral):
                # q(s) as expm1 where it is e^u - 1, its exponentials combined first (the expansion above splits them):
                # q(eps) = e^(-B(eps)) - 1 as 1 - e^a e^b e^c kept only 1e-10 of itself, a bias of 1.2e-12 in a CDF.
                at_start = use_expm1_log1p(sp.powsimp(q.xreplace({t: START}), combine="exp"))
                out.append(coeff * log1p(rise / at_start))
                continue
        trig = trigonometric_difference(f, t)
        if trig is not None:
            out.append(coeff * trig)
            continue
        if f == sp.sqrt(t):
            # sqrt(t) - sqrt(s) = (t - s) / (sqrt(t) + sqrt(s)), finite at s = 0 (a schedule in sqrt(t): the
            # difference lost ~2 t / (t - s) roundings, G 3.6e-5 off in float32 at the default step).
            out.append(coeff * (t - START) / (sp.sqrt(t) + sp.sqrt(START)))
            continue
        out.append(term - term.xreplace({t: START}))
    return sp.Add(*out)


def absolute_difference(f: sp.Expr, t: sp.Symbol, depth: int = 0) -> sp.Expr | None:
    """f(t) - f(s) for f = p(t) |u(t)| or p(t) sign(u(t)) as p(t) (k(t) - k(s)) + k(s) (p(t) - p(s)), k the kinked
    factor, with

        |u(t)| - |u(s)| = sign(u(t)) (u(t) - u(s)) + (sign(u(t)) - sign(u(s))) u(s),
        sign(u(t)) - sign(u(s)), exactly 0 on a step that does not cross the kink,

    exact on either side of the kink and across it, and u(t) - u(s) and p(t) - p(s) with t - s as a factor (factored
    polynomials, else step differences: |sin(3 t) - h| by the sum-to-product rule). None for any other f, or where
    a difference keeps no factor.

    A logSNR with a kink, lmax - s1 t - s2 (t - c + |t - c|), had its step's |t - c| - |s - c| as a difference:
    G 1.3e-3 off in float64 at t = 1.5e-5 over a step of 1e-5 of t, where the same schedule written without abs
    keeps every digit; a VP with beta = b0 + b1 |t - c| lost 1e-5 of r - 1 just after the kink; a kernel with
    sign(t - c) (t - c)^2 in its exponent 2.2e-7, |sin(3 t) - h| in a logSNR 2.6e-7."""
    kinked = [g for g in sp.Mul.make_args(f) if isinstance(g, (sp.Abs, sp.sign))]
    if len(kinked) != 1 or depth > 1:
        return None
    k, u = kinked[0], kinked[0].args[0]
    # p factored: gathered from expanded terms, (t - c)^2 came as t^2 - 2 c t + c^2, whose rounding at the kink
    # (where the exact value is 0) was 4e-10 of a step's r - 1 there.
    p = sp.factor(sp.Mul(*(g for g in sp.Mul.make_args(f) if g is not k)))
    if any(isinstance(g, (sp.Abs, sp.sign)) for g in sp.preorder_traversal(p)):
        return None

    start = {t: START}

    def rise(q):
        if q.is_polynomial(t):
            return sp.factor(q - q.xreplace(start))
        d = step_difference(q, t, depth + 1)
        return d if d.has(START) and not d.has(sp.Integral) else None

    u_start = u.xreplace(start)
    jump = sp.sign(u) - sp.sign(u_start)
    if isinstance(k, sp.sign):
        k_rise = jump
    else:
        u_rise = rise(u)
        if u_rise is None:
            return None
        k_rise = sp.sign(u) * u_rise + jump * u_start
    if not p.has(t):
        return p * k_rise
    p_rise = rise(p)
    if p_rise is None:
        return None
    return p * k_rise + k.xreplace(start) * p_rise


def trigonometric_difference(f: sp.Expr, t: sp.Symbol) -> sp.Expr | None:
    """f(t) - f(s) for f = sin(u)^n, cos(u)^n or tan(u)^n (n = 1, 2; u a polynomial in t) as a product with
    sin((u(t) - u(s)) / 2) or sin(u(t) - u(s)) as a factor, by the sum-to-product identities; None for any other f.

    A shifted-cosine logSNR has m = r / sqrt(r^2 + tan(pi t / 2)^2): a step's r - 1 through tan^2 - tan^2 as a
    difference lost 2.4e-6 of itself in float64 at r = 4, t = 1.5e-5 over a step of 1e-5; sin(a + b) sin(a - b) /
    (cos(a)^2 cos(b)^2) keeps every digit."""
    base, n = f.as_base_exp()
    if n not in (1, 2) or not isinstance(base, (sp.sin, sp.cos, sp.tan)):
        return None
    u = base.args[0]
    if not u.is_polynomial(t):
        return None
    a, b = u, u.xreplace({t: START})
    rise = sp.factor(a - b)
    half_sum, half_rise = (a + b) / 2, rise / 2
    if n == 1:
        if isinstance(base, sp.sin):
            return 2 * sp.cos(half_sum) * sp.sin(half_rise)
        if isinstance(base, sp.cos):
            return -2 * sp.sin(half_sum) * sp.sin(half_rise)
        return sp.sin(rise) / (sp.cos(a) * sp.cos(b))
    product = sp.sin(a + b) * sp.sin(rise)
    if isinstance(base, sp.sin):
        return product
    if isinstance(base, sp.cos):
        return -product
    return product / (sp.cos(a) ** 2 * sp.cos(b) ** 2)
