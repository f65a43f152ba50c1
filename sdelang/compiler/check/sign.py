"""The sign of f(t) on [lo, hi], decided exactly where SymPy can, not on a grid.

Every function of the language is continuous where it is defined, except at a few kinds of point: zeros
of a denominator (a negative power), of a radicand (a fractional power), of a logarithm's argument, of the
argument of abs, sign or DiracDelta (what d/dt of abs gives), and zeros of cos(u) for tan(u). Between two
consecutive such points f is continuous and real or not throughout, so if none of its own zeros lies
there either, its sign is constant: one evaluation at the middle of each piece, and one at each point
itself, decides the sign on the whole interval. The points are the real roots SymPy's solveset finds in
[lo, hi]; when it cannot list them all (a ConditionSet, infinitely many roots, out of time) the caller
falls back to sampling and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

TINY = sp.Float("1e-25")  # |f| below this at 30 digits is a zero (exact zeros usually come out as 0)


@dataclass(frozen=True)
class Failure:
    """Where f is not positive: 'zero', 'negative', 'infinite' or 'not real' at t (or on (a, b) around t)."""

    what: str
    t: float
    piece: tuple[float, float] | None = None


def _parts(f: sp.Expr, t: sp.Symbol) -> list[sp.Expr]:
    """f and every argument whose zeros may be a pole, a domain boundary or a jump of f."""
    parts = [f]
    for e in sp.preorder_traversal(f):
        if not e.has(t):
            continue
        if e.is_Pow and not (e.exp.is_integer and e.exp.is_nonnegative):
            parts.append(e.base)
        elif isinstance(e, (sp.log, sp.Abs, sp.sign, sp.Heaviside, sp.DiracDelta)):
            parts.append(e.args[0])
        elif isinstance(e, sp.tan):
            parts.append(sp.cos(e.args[0]))
    return parts


def _roots(part: sp.Expr, t: sp.Symbol, domain: sp.Interval) -> list[sp.Expr] | None:
    """The real roots of part's numerator and denominator in the domain, or None if SymPy cannot list them."""
    roots = []
    # tan(u) as sin(u) / cos(u): SymPy lists the roots of each in an interval, not those of tan.
    part = part.replace(lambda e: isinstance(e, sp.tan), lambda e: sp.sin(e.args[0]) / sp.cos(e.args[0]))
    for side in sp.fraction(sp.together(part)):
        if not side.has(t):
            continue
        found = sp.solveset(side, t, domain)
        if found is sp.S.EmptySet:
            continue
        if not isinstance(found, sp.FiniteSet):
            return None
        roots.extend(found)
    return roots


def _value(f: sp.Expr, t: sp.Symbol, at: sp.Expr) -> str | None:
    """What is wrong with f at t = at ('zero', 'negative', 'infinite', 'not real'), or None if f(at) > 0."""
    exact = f.subs(t, at)
    if exact.has(sp.zoo, sp.oo, -sp.oo, sp.nan, sp.DiracDelta):
        return "infinite"
    number = sp.N(exact, 30)
    if not number.is_number or number.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        return "infinite"
    real, imag = number.as_real_imag()
    if abs(imag) > TINY * (1 + abs(real)):
        return "not real"
    if exact == 0 or (abs(real) <= TINY and exact.is_zero is not False):
        return "zero"
    if abs(real) <= TINY:
        # Proved nonzero but too small to train with (1e-100 is 0 in float32): refused, without calling it zero.
        return "below 1e-25"
    return "negative" if real < 0 else None


def decide(f: sp.Expr, t: sp.Symbol, lo: sp.Expr, hi: sp.Expr) -> tuple[bool, Failure | None]:
    """``(True, None)``: f > 0 on [lo, hi], proved; ``(True, failure)``: where it is not; ``(False, None)``:
    undecided (the caller samples). f must have no free symbol but t."""
    if f.free_symbols - {t}:
        return False, None
    domain = sp.Interval(lo, hi)
    points = {lo, hi}
    for part in _parts(f, t):
        roots = _roots(part, t, domain)
        if roots is None:
            return False, None
        points.update(roots)
    ordered = sorted(points, key=lambda p: float(sp.N(p, 30)))
    tests = [(ordered[0], None)] + [(at, piece) for a, b in zip(ordered, ordered[1:])
                                    for at, piece in (((a + b) / 2, (float(a), float(b))), (b, None))]
    failures: list[Failure] = []
    for at, piece in tests:
        problem = _value(f, t, at)
        if problem is None:
            continue
        failure = Failure(problem, float(sp.N(at, 17)), piece if problem == "negative" else None)
        last = failures[-1] if failures else None
        if last is not None and last.what == "negative" and problem == "negative" and last.piece is not None:
            # Negative pieces that touch (through a negative point between them) are one interval.
            if piece is None or last.piece[1] == piece[0]:
                end = piece[1] if piece is not None else last.piece[1]
                failures[-1] = Failure("negative", last.t, (last.piece[0], end))
                continue
        failures.append(failure)
    # The most telling failure: a pole or a complex value before a sign change, a sign change before a zero
    # (abs(t - 0.3) - 1e-4 is zero at 0.2999 because it is negative just after).
    return True, min(failures, key=lambda fl: (_SEVERITY.index(fl.what), fl.t), default=None)


_SEVERITY = ("infinite", "not real", "negative", "zero", "below 1e-25")
