"""Helpers folded back in: a derived expression written through the functions of t the user named.

The checker inlines helpers (the derivations need the expressions they stand for), so the drift of VP,
written `-1/2 * beta(t) * x`, comes out of the derivation as x (-beta_min/2 - t (beta_max - beta_min)/2).
For reading, `sdelang show` and the generated module's `sde` and `diffusion` write it through the helper
again: every subexpression that is a multiple of a helper's body, by a factor free of t, becomes that
multiple of the helper's call. The factor is SymPy's exact quotient, so the folded expression is the same
function; only its form changes.
"""
from __future__ import annotations

import builtins
import keyword
import re

import sympy as sp

from ..ir import Helper
from ..derive.symbolic import bounded, size

MAX_FOLD_SIZE = 400      # larger expressions are shown as derived (the quotient per node would be slow)
MAX_FOLD_HELPERS = 32    # a program with more (machine-written, as a rule) is shown as derived
QUOTIENT_SECONDS = 1.0   # per quotient, under the compiler's time limit
SCREEN_TIMES = (sp.Float("0.3183098861837907", 20), sp.Float("0.7071067811865476", 20))


def calls(helpers: tuple[Helper, ...], t: sp.Symbol) -> dict[str, sp.Expr]:
    """Each helper's call at t, beta(t), as an undefined SymPy function (it prints as written)."""
    return {h.name: sp.Function(h.name, real=True)(t) for h in helpers}


def fold(expr: sp.Expr, helpers: tuple[Helper, ...], t: sp.Symbol) -> sp.Expr:
    """expr with its multiples of the helpers' bodies written as multiples of their calls.

    The largest helper is tried first (a helper built from another contains it), and a subexpression is
    folded as a whole before its parts, so sqrt(beta_min + t (beta_max - beta_min)) becomes sqrt(beta(t)).
    """
    if not helpers or len(helpers) > MAX_FOLD_HELPERS or not isinstance(expr, sp.Basic) or size(expr) > MAX_FOLD_SIZE:
        return expr
    ordered = sorted(helpers, key=lambda h: -size(h.body))
    called = calls(helpers, t)
    cache: dict[tuple[sp.Expr, sp.Expr], sp.Expr | None] = {}

    def multiple(e: sp.Expr, body: sp.Expr) -> sp.Expr | None:
        key = (e, body)
        if key not in cache and not _may_be_multiple(e, body, t):
            cache[key] = None
        if key not in cache:
            quotient = bounded(lambda q: sp.cancel(sp.powsimp(q)), e / body, seconds=QUOTIENT_SECONDS)
            ok = (quotient is not None and quotient != 0 and t not in quotient.free_symbols
                  and not quotient.has(sp.zoo, sp.oo, sp.nan))
            cache[key] = quotient if ok else None
        return cache[key]

    def walk(e: sp.Expr) -> sp.Expr:
        if e.is_Atom or t not in e.free_symbols or not isinstance(e, sp.Expr):
            return e
        for h in ordered:
            k = multiple(e, h.body)
            if k is not None:
                return k * called[h.name]
        return e.func(*(walk(a) for a in e.args))

    return walk(expr)


def _may_be_multiple(e: sp.Expr, body: sp.Expr, t: sp.Symbol) -> bool:
    """False when e / body is seen to change between two times (the other symbols at fixed generic values),
    which rules out a multiple cheaply; True when it is the same or cannot be told (then SymPy decides)."""
    if not body.free_symbols <= e.free_symbols:
        return False
    if e.has(sp.Integral) and not body.has(sp.Integral):
        # An unevaluated integral of t (a numeric-path kernel) does not cancel against a helper's body, and
        # evaluating it at the screen times costs seconds of quadrature per subexpression.
        return False
    others = sorted(e.free_symbols - {t}, key=sp.default_sort_key)
    values = {s: sp.Float(0.6180339887 + 0.1 * i, 20) for i, s in enumerate(others)}
    try:
        ratios = [complex((e / body).xreplace({**values, t: time}).evalf(20)) for time in SCREEN_TIMES]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return True
    if not all(map(_finite, ratios)):
        return True
    return abs(ratios[0] - ratios[1]) <= 1e-9 * max(abs(ratios[0]), abs(ratios[1]), 1e-300)


def _finite(z: complex) -> bool:
    return z.real == z.real and z.imag == z.imag and abs(z) != float("inf")


def as_locals(exprs: list[sp.Expr], helpers: tuple[Helper, ...], t: sp.Symbol,
              taken: frozenset[str]) -> tuple[list[sp.Expr], tuple[tuple[sp.Symbol, sp.Expr], ...]]:
    """exprs folded, with each helper's call as a local of the same name, and the (local, body) pairs for
    printer.generate. A helper whose name the method already uses (``taken``: its arguments, its own
    locals, ``torch``, Python's builtins and keywords, CSE's w0, w1, ...) stays inlined."""
    usable = tuple(h for h in helpers if _free_name(h.name, taken))
    if not usable or len(usable) > MAX_FOLD_HELPERS:
        return list(exprs), ()
    called = calls(usable, t)
    symbols = {called[h.name]: sp.Symbol(h.name, real=True) for h in usable}
    folded = [fold(e, usable, t).xreplace(symbols) for e in exprs]
    return folded, tuple((symbols[called[h.name]], h.body) for h in usable)


def _free_name(name: str, taken: frozenset[str]) -> bool:
    return (name.isidentifier() and not keyword.iskeyword(name) and name not in taken
            and not hasattr(builtins, name) and re.fullmatch(r"(w|q|tab)\d+", name) is None)
