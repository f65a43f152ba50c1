"""Importance sampling of t: q(t) = lambda(t) / (Z v(t)) on [eps, T], Z = int_eps^T lambda / v.

With t ~ q the weighted loss lambda |s + z/sigma|^2 / 2 becomes Z/2 |sigma s + z|^2,
whose weight is constant.

- likelihood weighting (lambda = g^2): g^2 / v = -d/dt logSNR, so q is uniform
  in logSNR:  Q(t) = (logSNR(eps) - logSNR(t)) / Z,  Z = logSNR(eps) - logSNR(T),
  and Q^-1(u) = logSNR^-1(logSNR(eps) - u Z), written as a function of the drop u Z of logSNR
  below its value at eps: forming y = logSNR(eps) - u Z first rounds y by |logSNR(eps)| 2^-24,
  which moves t by that over |logSNR'(t)|; where logSNR' stays bounded at eps (a logSNR given
  linear in t, a variance v0 > 0 at t = 0) that is a large relative error of t near eps.
- score_matching weighting (lambda = v): q is uniform on [eps, T].
- any other weighting: Z and Q by integration (closed form, or a column of the
  module's numeric tables).

The inverse is symbolic when SymPy solves the equation in time and the root
checks out numerically; otherwise the generated module tabulates it
(derive/tables.py: the CDF, or logSNR, is monotone).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .discretize import START, step_difference
from .symbolic import (NUMERIC, SIMPLIFY_LIMIT, SOLVE_LIMIT, TIME_LIMIT, accurate_constant, bounded, factor_exponentials,
                       finite_in_float64, integrate_from, log_exp_differences, log_ratios, most_accurate,
                       powers_minus_one, printable, rationalize_roots, real_logs, simplest, softplus, softplus_forms,
                       values_in_float64)
from .tables import Tables

# Dummies, so that a user's parameter named u, drop or w never collides with them.
U = sp.Dummy("u", positive=True)  # a uniform draw in (0, 1)
DROP = sp.Dummy("drop", nonnegative=True)  # logSNR(eps) - logSNR(t), in [0, Z]
W = sp.Dummy("w", positive=True)   # a noise-to-signal ratio v/m^2 = exp(-logSNR)


@dataclass(frozen=True)
class Importance:
    density: sp.Expr           # q(t)
    cdf: sp.Expr               # Q(t)
    inverse: sp.Expr | None    # Q^-1(u), or None: invert numerically
    by_log_snr: bool           # True: Q^-1 goes through logSNR^-1 (inverse is in DROP = u Z)


def importance(kind: str, lam: sp.Expr, v: sp.Expr, lsnr: sp.Expr, t: sp.Symbol, eps: sp.Expr,
               T: sp.Expr, defaults: dict, tables: Tables | None, invert: bool = True) -> Importance:
    """q, Q and (when ``invert``; only importance sampling needs it) Q^-1; a Q^-1 with no closed form
    is added to ``tables``. Without ``tables`` (the module samples t uniformly and computes none of them), a Q
    with no closed form stays a ratio of Integrals, for `sdelang show`."""
    if kind == "likelihood":
        lo, hi = lsnr.xreplace({t: eps}), lsnr.xreplace({t: T})
        Z = lo - hi
        density = lam / (v * Z)  # = -logSNR'(t) / Z, in a form that cannot overflow
        cdf = (lo - lsnr) / Z
        inverse = None
        if invert and not lsnr.has(*NUMERIC):
            # Solving v/m^2 = W is easier for SymPy than logSNR = y (no log of a ratio).
            nsr = simplest(sp.exp(-lsnr))
            inverse = _solve(sp.Eq(nsr, W), t, W, nsr, defaults, eps, T)
        if inverse is not None:
            # W = exp(-y) = exp(-logSNR(eps)) exp(drop): the noise-to-signal ratio at eps, grown by exp(drop).
            nsr_eps = accurate_constant(nsr.xreplace({t: eps}), defaults)
            inverse = _accurate_inverse(inverse.xreplace({W: nsr_eps * sp.exp(DROP)}), lsnr, t, defaults, eps, T)
        if invert and inverse is None:
            tables.invert(tables.tabulate(lsnr, "logSNR(t)", absolute=True))
        return Importance(density, cdf, inverse, True)
    if kind == "score_matching":
        return Importance(1 / (T - eps), (t - eps) / (T - eps), eps + U * (T - eps), False)
    ratio = simplest(lam / v)
    lo, hi = float(eps.subs(defaults)), float(T.subs(defaults))
    # The shortest form of lambda / v is the one to integrate, but it may undo v's accurate form: VE's
    # smin^2 expm1(2 k t) becomes smin^2 ((smax/smin)^(2t) - 1), which cancels near eps (q 2e-4 off in float32
    # at t = 2e-5). The density keeps whichever is more accurate.
    q_ratio = ratio if ratio.has(*NUMERIC) else most_accurate([lam / v, ratio], t, defaults, np.geomspace(lo, hi, 25))
    Z = integrate_from(ratio, t, eps, T) if not ratio.has(*NUMERIC) else None
    partial = integrate_from(ratio, t, eps, t) if Z is not None and not Z.has(*NUMERIC) else None
    if partial is not None and not partial.has(*NUMERIC):
        # An antiderivative may hold log(u) with u < 0 (beta / (1 - e^-B) integrates to log(expm1(-B))): real as
        # a difference, but not term by term in the module.
        Z, partial = real_logs(Z, t, defaults, lo, hi), real_logs(partial, t, defaults, lo, hi)
        # log(exp(u1) - exp(u2)) cancels where u1 ~ u2 (near eps, and in the constant F(eps)).
        Z, partial = (log_exp_differences(e, t, defaults, lo, hi) or e for e in (Z, partial))
    if partial is None or partial.has(*NUMERIC):
        # No closed form: the CDF is a column of the module's tables, normalised by its value at T.
        s = sp.Dummy("s", positive=True)
        integrand = ratio.xreplace({t: s})
        cdf = sp.Integral(integrand, (s, eps, t)) / sp.Integral(integrand, (s, eps, T))
        if tables is None:  # training times are uniform: q and Q are only shown (`sdelang show`), never computed
            return Importance(q_ratio / sp.Integral(integrand, (s, eps, T)), cdf, None, False)
        cdf = tables.tabulate(cdf, "CDF Q(t)", absolute=True)
        density = q_ratio / tables.total(ratio, eps)
        if invert:
            tables.invert(cdf)
        return Importance(density, cdf, None, False)
    cdf = _accurate_cdf(partial, Z, t, defaults, eps, T)
    inverse = _solve(sp.Eq(cdf, U), t, U, cdf, defaults, eps, T) if invert else None
    if inverse is not None and not finite_in_float64(inverse, U, defaults, np.linspace(0.0, 1.0, 101)):
        inverse = None   # overflows somewhere in [0, 1]: tabulated instead
    if invert and inverse is None:
        tables.invert(tables.tabulate(cdf, "CDF Q(t)", absolute=True))
    return Importance(q_ratio / Z, cdf, inverse, False)


def _accurate_cdf(partial, Z, t, defaults, eps, T) -> sp.Expr:
    """Q = int_eps^t q as F(t) - F(eps) (SymPy's antiderivative at the limits), or written termwise in t - eps
    (step_difference), whichever is more accurate in float32: F(t) - F(eps) cancels near eps (VE with v0 > 0 and
    lambda = 1 + t: (1 + t) exp(-k t) against (1 + eps) exp(-k eps))."""
    expanded = bounded(sp.expand, partial, seconds=SIMPLIFY_LIMIT)
    forms = [partial / Z]
    if expanded is not None:
        # The terms in t are F(t); the others are -F(eps), since the integral vanishes at t = eps.
        # Each term factored, its powers combined: smin^(2t) / (4 smax^(2t) L^2 - ...) becomes c exp(-k t).
        F = sp.Add(*[sp.powsimp(sp.factor(a), combine="exp") for a in sp.Add.make_args(expanded) if a.has(t)])
        termwise = bounded(lambda: step_difference(F, t).xreplace({START: eps}), seconds=SIMPLIFY_LIMIT)
        if termwise is not None and printable(termwise):
            forms.append(termwise / Z)
    lo, hi = float(eps.subs(defaults)), float(T.subs(defaults))
    # Q is held to 1e-5 relative or 1e-7 absolute, so errors count relative to max(|Q|, 1e-2). Where q is steep
    # at eps (1/t^2 of an interpolant: Q(2 eps) ~ 1/2) the cancellation of F(t) - F(eps) shows only within a few
    # thousandths of eps, so the grid has points there too.
    grid = np.concatenate([lo * (1 + np.geomspace(1e-6, 0.5, 100)), np.geomspace(lo, hi, 25)])
    return most_accurate(forms, t, defaults, grid, floor=1e-2)


def _accurate_inverse(inverse, lsnr, t, defaults, eps, T) -> sp.Expr | None:
    """Of the equivalent forms of t = logSNR^-1(logSNR(eps) - drop), the one most accurate in float32 for
    drop in [0, Z]; None if even that one is not finite in float64 (the module's precision) for every drop in
    [0, Z] at the defaults, which leaves the inverse to a table."""
    forms = [inverse, sp.expand_log(inverse, force=True), rationalize_roots(inverse)]
    forms += [rationalize_roots(sp.expand_log(inverse, force=True))]
    # (W - W^(1/2)) / (W - 1), W = exp(-y), a 0/0 where logSNR = 0, factors into W^(1/2) / (W^(1/2) + 1).
    forms += [f for f in (bounded(factor_exponentials, inverse, seconds=SIMPLIFY_LIMIT),) if f is not None and printable(f)]
    grown = bounded(_grown_from_eps, inverse, eps, seconds=SIMPLIFY_LIMIT)
    forms += [grown] if grown is not None and printable(grown) else []
    forms += [f for f in (bounded(powers_minus_one, form, seconds=SIMPLIFY_LIMIT) for form in list(forms))
              if f is not None and printable(f)]
    # log(b0 + k L) - log(b0) as log1p(k L / b0), for each form that has such a pair.
    forms += [f for f in (bounded(log_ratios, form, seconds=SIMPLIFY_LIMIT) for form in list(forms))
              if f is not None and printable(f)]
    # log1p(K exp(drop)) as softplus(drop + log K), for each form that has one. Where there is one it is the only
    # kind of form considered: exp(drop) overflows float64 once Z > 709, which a parameter given to the module can
    # bring about after the forms were chosen at the defaults (an OU process compiled with rate 20 and built with
    # rate 500 returned t = T for every u above 0.8); softplus is log1p(exp) without the overflow, as accurate.
    soft = [f for f in (bounded(softplus_forms, form, DROP, seconds=SIMPLIFY_LIMIT) for form in forms)
            if f is not None and f.has(softplus) and printable(f)]
    lsnr_at = sp.lambdify(t, lsnr.subs(defaults), modules="mpmath")
    lo, hi = float(eps.subs(defaults)), float(T.subs(defaults))
    with mpmath.workdps(30):
        top = lsnr_at(lo)
        grid = np.array([float(top - lsnr_at(s)) for s in np.geomspace(lo, hi, 25)])
    candidates = list(soft or forms)
    # A quadratic's root (A - sqrt(D)) / B whose B divides A^2 - D is 0/0 where B = 0 (rectified flow with
    # sigma^2 = smin^2 + t^2 at logSNR = 0: t_icdf 1e-4 off there, a window of 1e-13 in u that no grid meets): the
    # root rationalized and B cancelled has no such point, and forms that divide by 0 in the range are left out.
    candidates += [c for c in (bounded(_roots_cancelled, f, seconds=SIMPLIFY_LIMIT) for f in list(candidates))
                   if c is not None and printable(c) and c not in candidates]
    fine = np.linspace(grid.min(), grid.max(), 4001)
    candidates = [f for f in candidates
                  if not bounded(_divides_by_zero, f, DROP, defaults, fine, seconds=SIMPLIFY_LIMIT)] or candidates
    chosen = most_accurate(candidates, DROP, defaults, grid)
    return chosen if finite_in_float64(chosen, DROP, defaults, grid) else None


def _roots_cancelled(form: sp.Expr) -> sp.Expr | None:
    """form with its square roots rationalized (rationalize_roots) and the common factors of the result cancelled,
    each square root kept as one symbol meanwhile; None if nothing cancels."""
    rationalized = rationalize_roots(form)
    roots = sorted((p for p in rationalized.atoms(sp.Pow) if p.exp == sp.Rational(1, 2)), key=sp.default_sort_key)
    if not roots:
        return None
    symbols = {root: sp.Dummy("root") for root in roots}
    cancelled = sp.factor(sp.cancel(rationalized.xreplace(symbols))).xreplace({v: k for k, v in symbols.items()})
    return cancelled if sp.count_ops(cancelled) < sp.count_ops(rationalized) else None


def _divides_by_zero(form: sp.Expr, var: sp.Symbol, defaults: dict, points: np.ndarray) -> bool:
    """True if a denominator of form (at the defaults) is 0 or changes sign between two of the points."""
    denominator = sp.fraction(sp.together(form))[1]
    values = values_in_float64(denominator, var, defaults, points) if denominator.has(var) else None
    if values is None:
        return False
    finite = values[np.isfinite(values)]
    return bool((finite == 0).any() or (np.sign(finite[:-1]) * np.sign(finite[1:]) < 0).any())


def _grown_from_eps(inverse: sp.Expr, eps: sp.Expr) -> sp.Expr | None:
    """eps + t(drop) - t(0) for an inverse linear in logarithms log(c + k exp(drop)): each grows from drop = 0 by
    log1p(k expm1(drop) / (c + k)), times the inverse's slope in it. With v0 > 0 (VE, OU) the inverse is
    (log(c + k exp(drop)) - log(c + k)) / rate + eps, whose float32 value near drop = 0 is a difference of
    logarithms of about 2 log(sigma) that leaves ~1e-3 of t = eps; grown from eps it keeps every digit.
    None when the inverse has no such logarithm or is not linear in them."""
    growth = sp.exp(DROP)
    excess = {}

    def split(e):
        terms = sp.collect(sp.expand(e.args[0], deep=False), growth, evaluate=False)
        k, c = terms.get(growth, 0), terms.get(sp.S.One, 0)
        if set(terms) - {growth, sp.S.One} or k == 0 or k.has(DROP) or c.has(DROP):
            return e
        x = sp.Dummy("x")
        excess[x] = log1p(k * expm1(DROP) / (c + k))
        return sp.log(c + k) + x

    grown = inverse.replace(lambda e: isinstance(e, sp.log) and e.has(DROP), split)
    if not excess or grown.has(DROP):
        return None
    slopes = {x: sp.diff(grown, x) for x in excess}
    if any(slope.has(*excess) for slope in slopes.values()):
        return None
    return eps + sp.Add(*(slope * excess[x] for x, slope in slopes.items()))


def _solve(equation, t, target, forward, defaults, eps, T) -> sp.Expr | None:
    """A root t(target) of the equation that inverts ``forward`` on [eps, T] at the defaults.

    Solved in tau = k t, k the greatest common divisor of the rational rates of its exponentials exp(r t + ...):
    SymPy reads exp(600 t) - 1 = w as a polynomial of degree 600 in exp(t) and looks for its 600 roots (40 for a
    rate of 40, which it found in 0.2 s; at 600 it ran out of time and the inverse went to a table); in tau it is
    exp(tau) - 1 = w."""
    rates = set()
    for e in equation.atoms(sp.exp):
        rate = sp.diff(e.args[0], t)
        if rate != 0:
            rates.add(rate)
    k = functools.reduce(sp.gcd, rates) if rates and all(r.is_Rational for r in rates) else sp.S.One
    if k.is_Rational and k > 1:
        tau = sp.Dummy("tau", positive=True)
        scaled = bounded(sp.solve, equation.xreplace({t: tau / k}), tau, check=False, simplify=False,
                         seconds=SOLVE_LIMIT)
        roots = None if scaled is None else [root / k for root in scaled]
    else:
        roots = bounded(sp.solve, equation, t, check=False, simplify=False, seconds=SOLVE_LIMIT)
    if not roots:
        return None
    subs = {k: v for k, v in defaults.items()}
    lo, hi = float(eps.subs(subs)), float(T.subs(subs))
    # Log-spaced and uniform: a root on the wrong branch for the upper half of the interval (atan(b / (y - mu)) / pi
    # for a logSNR mu + b cot(pi t), wrong once t > 1/2) inverts every log-spaced probe of [1e-3, 0.999]. The uniform
    # ones off the interval's round fractions, where a right root may be 0/0 (rectified flow's at t = 1/2).
    probes = np.concatenate([np.exp(np.linspace(np.log(lo), np.log(hi), 7))[1:-1],
                             lo + (hi - lo) * (np.arange(1, 6) + 0.1) / 6])
    for root in roots:
        # expand_log(force) turns log((1 + e^-y)^k) into k log(1 + e^-y), which cannot overflow.
        root = sp.expand_log(simplest(root), force=True)
        # evalf can run long on a root with special functions: bounded, like every SymPy call.
        if printable(root) and bounded(_inverts, root, forward, t, target, subs, probes, seconds=TIME_LIMIT):
            return root
    return None


def _inverts(root, forward, t, target, subs, probes) -> bool:
    """root(forward(probe)) = probe at each probe, to 30 digits. forward's value goes into the root as a complex
    number (a real root then stays on its principal branch), or as the SymPy number itself where that overflows:
    e^(6000 t) at t = 0.15 did (inf, or an OverflowError), and an OU process with rate 3000 lost its closed-form
    inverse CDF to a table."""
    for probe in probes:
        try:
            value = forward.subs(subs).subs(t, probe).evalf(30)
            try:
                as_complex = complex(value)
            except OverflowError:
                as_complex = complex(math.inf)
            if math.isfinite(abs(as_complex)):
                value = as_complex
            back = complex(root.subs(subs).subs(target, value).evalf(30))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return False
        if not abs(back.real - probe) <= 1e-8 * max(1.0, probe) or not abs(back.imag) <= 1e-9:
            return False  # written so that NaN fails
    return True
