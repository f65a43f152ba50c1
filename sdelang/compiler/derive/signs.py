"""Schedules written with abs and sign: their derivatives, and the points where they could jump.

A schedule that changes its formula at a time c is written with |u| and sign(u), u(t) zero at c: the Laplace
logSNR of Hang et al. (2024) is mu - b sign(1/2 - t) log(1 - 2 |t - 1/2|). SymPy differentiates them as
distributions: d/dt |u| = sign(u) u', d/dt sign(u) = 2 delta(u) u'. What an SDE needs is the derivative of a
continuous function, defined everywhere on [eps, T], so three things are done here:

- sign(u) is written with the argument SymPy orders first, sign(-u) = -sign(u), u / |u| = sign(u) and
  sign(u) u = |u|, so that sign(u)^2 = 1 can be seen (as written, sign(1/2 - t) sign(t - 1/2) / (1 - 2 |t - 1/2|)
  is 0 at t = 1/2 instead of its limit, -1);
- an even power of sign(u) is 1 and an odd one sign(u): equal away from u = 0, and at u = 0 equal to the
  limit from both sides, which is the value a continuous function takes there;
- a delta term c(t) delta(u) is dropped where c vanishes at every root of u (the Laplace logSNR's
  log(1 - 2 |t - 1/2|) is 0 at t = 1/2), and otherwise the function jumps there: `jumps` lists the times, for
  the checker's located error.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..timelimit import call_with_time_limit

ROOT_SECONDS = 5.0  # solveset on one argument of sign (jumps); past it, the points are not known (and said so)


def canonical(expr: sp.Expr) -> sp.Expr:
    """expr with u / |u| and |u| / u as sign(u), each sign(u) with SymPy's first-ordered argument of u and -u,
    and powers of signs reduced: sign(u)^(2k) = 1, sign(u)^(2k + 1) = sign(u). Equal to expr wherever no
    argument of abs or sign is 0, and at those points equal to the two-sided limit where it exists."""
    if not expr.has(sp.Abs, sp.sign):
        return expr
    expr = expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.Abs), _unit_ratios)
    expr = expr.replace(lambda e: isinstance(e, sp.sign) and e.args[0].could_extract_minus_sign(),
                        lambda e: -sp.sign(-e.args[0]))
    expr = expr.replace(lambda e: e.is_Pow and isinstance(e.base, sp.sign) and e.exp.is_Integer,
                        lambda e: sp.Integer(1) if e.exp % 2 == 0 else e.base)
    return expr.replace(lambda e: isinstance(e, sp.Mul) and e.has(sp.sign), _signed_magnitudes)


def _signed_magnitudes(product: sp.Mul) -> sp.Expr:
    """sign(u) * k u within one product as k |u| (what d/dt of |u| u gives: sign(u) u + |u| = 2 |u|), exact at u = 0
    too, and in the form derive/kinks.py integrates."""
    if not isinstance(product, sp.Mul):   # what is left of a product may be one factor, a sum say: no factors
        return product
    for f in product.args:
        if isinstance(f, sp.sign):
            u = f.args[0]
            found = _multiple_of(product, f, u, lambda h: not isinstance(h, sp.sign), 1)
            if found is not None:
                ratio, rest = found
                return _signed_magnitudes(rest) * ratio * sp.Abs(u)
    return product


def _unit_ratios(product: sp.Mul) -> sp.Expr:
    """u^k |u|^-k and |u|^k u^-k within one product, as sign(u)^k."""
    if not isinstance(product, sp.Mul):
        return product
    for f in product.args:
        base, power = f.as_base_exp()
        if isinstance(base, sp.Abs) and power.is_Integer:
            u = base.args[0]
            found = _multiple_of(product, f, u, lambda h: not isinstance(h.as_base_exp()[0], sp.Abs), -power)
            if found is not None:
                ratio, rest = found
                return _unit_ratios(rest) * ratio ** -power * sp.sign(u) ** (power if power < 0 else -power)
    return product


def _multiple_of(product: sp.Mul, f: sp.Expr, u: sp.Expr, allowed, power) -> tuple[sp.Expr, sp.Expr] | None:
    """(c, the product without f and h) for the first other factor h = (c u)^power of the product, c a nonzero
    number and h one that ``allowed`` accepts; None if there is none."""
    factors = list(product.args)
    i = factors.index(f)
    for j, h in enumerate(factors):
        other, q = h.as_base_exp()
        if j == i or q != power or not allowed(h) or not other.has(*u.free_symbols):
            continue
        ratio = sp.cancel(other / u)
        if ratio.is_number and ratio != 0:
            return ratio, sp.Mul(*[e for k, e in enumerate(factors) if k not in (i, j)])
    return None


def derivative(expr: sp.Expr, t: sp.Symbol) -> sp.Expr:
    """d/dt expr with delta terms dropped and signs canonical (see the module's docstring); where expr jumps the
    dropped terms were not zero, which `jumps` finds."""
    d = sp.diff(canonical(expr), t)
    if d.has(sp.DiracDelta):
        d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    return canonical(d)


def jumps(expr: sp.Expr, t: sp.Symbol, lo: float, hi: float, values: dict) -> list[float] | None:
    """The times in [lo, hi] where expr (at the parameter ``values``) jumps: roots of an argument of sign at which
    expr with that sign set to +1 and to -1 differ. None if the roots are not found within ROOT_SECONDS."""
    expr = canonical(expr).xreplace(values)
    found = []
    for s in sorted(expr.atoms(sp.sign), key=sp.default_sort_key):
        u = s.args[0]
        if not u.has(t):
            continue
        done, roots = call_with_time_limit(ROOT_SECONDS, sp.solveset, u, t, sp.Interval(lo, hi))
        if not done or not isinstance(roots, (sp.FiniteSet, type(sp.S.EmptySet))):
            return None
        for r in roots:
            left, right = (sp.N(expr.xreplace({s: side}).xreplace({t: r}), 30) for side in (-1, 1))
            if not (left.is_finite and right.is_finite) or abs(left - right) > 1e-12 * (1 + abs(left)):
                found.append(float(r))
    return sorted(found)


def kinks(exprs: list[sp.Expr], t: sp.Symbol, lo: float, hi: float, values: dict) -> list[float]:
    """The times strictly inside (lo, hi) where an argument of abs or sign in ``exprs`` (at ``values``) changes sign:
    where a solver should stop and start again. Found numerically (a sign change on 4,000 times, half of them
    log-spaced, then Brent's method to rounding): solveset on cos((t + s) pi / (2 + 2 s)) took a second, and a zero
    the argument only touches is no kink of |u|."""
    from scipy.optimize import brentq

    grid = np.unique(np.concatenate([np.linspace(lo, hi, 2001), np.geomspace(lo, hi, 2001)]))[1:-1]
    found = set()
    for e in exprs:
        for f in e.xreplace(values).atoms(sp.Abs, sp.sign):
            u = f.args[0]
            if u.free_symbols != {t}:
                continue
            fn = sp.lambdify(t, u, "numpy")
            with np.errstate(all="ignore"):
                at = np.real_if_close(np.asarray(fn(grid), dtype=complex) * np.ones(len(grid)))
            if np.iscomplexobj(at):
                continue
            for i in np.flatnonzero(np.isfinite(at[:-1]) & np.isfinite(at[1:]) & (np.sign(at[:-1]) * np.sign(at[1:]) < 0)):
                found.add(float(brentq(lambda x: float(fn(x)), grid[i], grid[i + 1], xtol=1e-15, rtol=1e-15)))
            found |= {float(x) for x in grid[at == 0]}
    return sorted(found)
