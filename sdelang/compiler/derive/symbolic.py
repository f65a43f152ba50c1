"""Bounded SymPy helpers shared by the derivations.

Every call that can run long (integrate, simplify, solve) goes through
:func:`bounded`, which returns None when SymPy runs out of time; the caller
then takes its numeric path.
"""
from __future__ import annotations

import keyword
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import mpmath
import numpy as np
import sympy as sp
from sympy.core import evalf as _evalf
from sympy.codegen.cfunctions import expm1, log1p
from sympy.integrals.risch import NonElementaryIntegral, risch_integrate
from sympy.printing.numpy import NumPyPrinter

from ..timelimit import call_with_time_limit
from .kinks import kink_integral
from .signs import kinks

TIME_LIMIT = 4.0      # seconds per SymPy call
SIMPLIFY_LIMIT = 1.0  # seconds per rewrite tried by simplest()
SOLVE_LIMIT = 1.5     # seconds for solving CDF(t) = u
MAX_REWRITE_SIZE = 80  # larger expressions are kept as they are: simplify is slow and rarely helps


# Functions code generation prints for tensors (torch) and for constants (math). A closed form with
# any other (LambertW, erfi, Ei, ...) is not used: the numeric path takes its place.
class softplus(sp.Function):
    """log(1 + exp(u)), which does not overflow: code generation prints torch.nn.functional.softplus (exp(u)
    overflows from u = 89 in float32, 710 in float64); forms are measured with numpy's logaddexp(0, u)."""
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / (1 + sp.exp(-self.args[0]))

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_evalf(self, prec):
        u = self.args[0]._eval_evalf(prec)
        if u is None or not u.is_number:
            return None
        # log(1 + e^u) = max(u, 0) + log(1 + e^-|u|): no overflow for a large u.
        return (sp.Max(u, 0) + sp.log(1 + sp.exp(-sp.Abs(u))))._eval_evalf(prec)


def _mpmath_evaluator(fn, real_only: bool = False):
    """An entry of SymPy's table of numeric evaluators for a function of one argument computed by mpmath: the argument
    evaluated as SymPy does (substitutions included), fn with 20 guard bits. Functions outside that table (softplus,
    and SymPy's own expm1 and log1p) are evaluated by substituting into the expression and rebuilding it each time:
    one quadrature of softplus or log1p (a docstring's integral up to T) took 1-2 s that way, 0.01 s for exp."""
    def evaluate(expr, prec, options):
        re, im, _, _ = _evalf.evalf(expr.args[0], prec + 20, options)
        if im and real_only:
            raise NotImplementedError
        with mpmath.workprec(prec + 20):
            value = fn(mpmath.mpc(re or mpmath.mpf(0)._mpf_, im or mpmath.mpf(0)._mpf_) if im else
                       mpmath.mpf(re) if re else mpmath.mpf(0))
        if isinstance(value, mpmath.mpc):
            return (value.real._mpf_ if value.real else None, value.imag._mpf_ if value.imag else None,
                    prec if value.real else None, prec if value.imag else None)
        return (value._mpf_, None, prec, None) if value else (None, None, None, None)
    return evaluate


sp.Integer(0).evalf()  # SymPy fills its table of evaluators on first use (importing SymPy does, as of 1.14)
_evalf.evalf_table.update({
    # log(1 + e^u) = max(u, 0) + log(1 + e^-|u|): no overflow for a large u.
    softplus: _mpmath_evaluator(lambda u: max(u, 0) + mpmath.log1p(mpmath.exp(-abs(u))), real_only=True),
    expm1: _mpmath_evaluator(mpmath.expm1),
    log1p: _mpmath_evaluator(mpmath.log1p),
})


PRINTABLE = (sp.exp, sp.log, sp.sin, sp.cos, sp.tan, sp.tanh, sp.sinh, sp.cosh, sp.atan, sp.asin, sp.acos,
             sp.asinh, sp.acosh, sp.atanh, sp.Abs, sp.sign, sp.erf, expm1, log1p, softplus)


class Tabulated(sp.Function):
    """Tabulated(k, x): column k of the generated module's numeric table (derive/tables.py) at x.

    A real function SymPy knows nothing else about: derivations carry it through unchanged (it
    cancels in log(exp(...)) and in differences), and code generation prints a table lookup.
    """

    nargs = 2

    def _eval_is_real(self):
        return True

    def _eval_is_finite(self):
        return True


NUMERIC = (sp.Integral, Tabulated)  # nodes that stand for a quantity with no closed form


def log_growth(a: sp.Expr, t: sp.Symbol, defaults: dict, T: float, points: int = 4001) -> np.ndarray | None:
    """A(t) = int_0^t a at the default parameters on a uniform grid of [0, T] (trapezoids: for decisions about
    forms, not for values), or None where a is not finite there."""
    ts = np.linspace(0.0, T, points)
    with np.errstate(all="ignore"):
        try:
            values = np.broadcast_to(sp.lambdify(t, a.xreplace(defaults), modules="numpy")(ts), ts.shape)
        except (TypeError, ValueError, ArithmeticError):
            return None
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    return np.concatenate([[0.0], np.cumsum((values[1:] + values[:-1]) / 2 * np.diff(ts))])


class Smaller(sp.Function):
    """Smaller(p, q, x, y): x where p < q, else y (code generation prints a torch.where).

    Picks between two forms of one quantity by which of two sizes is smaller: discretize's step noise from
    the tables is a difference of values of size p in one form and of size q in the other, and the one of
    smaller size cancels less."""

    nargs = 4

    def _eval_is_real(self):
        return self.args[2].is_real and self.args[3].is_real


def printable(expr: sp.Expr) -> bool:
    """True if every function in expr is one code generation can print (Integral aside)."""
    return all(isinstance(f, PRINTABLE + (Tabulated, Smaller)) for f in expr.atoms(sp.Function)) and not expr.has(
        sp.zoo, sp.nan, sp.oo, -sp.oo, sp.Piecewise, sp.I)


def bounded(fn, *args, seconds: float = TIME_LIMIT, **kwargs):
    """fn(*args, **kwargs), or None if it runs out of time or SymPy gives up with an error."""
    def attempt():
        try:
            return fn(*args, **kwargs)
        except Exception:  # SymPy signals "cannot do this" with many exception types
            return None
    ok, value = call_with_time_limit(seconds, attempt)
    return value if ok else None


def integrate_from(integrand: sp.Expr, var: sp.Symbol, lower: sp.Expr, upper: sp.Expr,
                   closed: bool = True, defaults: dict | None = None) -> sp.Expr:
    """int_lower^upper integrand d(var): closed form if SymPy finds one in time, else an Integral.

    The unevaluated Integral is kept as a node; a scalar kernel turns it into a column of
    its numeric tables (derive/tables.py), a coupled one into Gauss-Legendre quadrature.
    ``closed=False`` asks for that Integral directly. ``defaults``, the parameters' values, choose where a
    schedule with a kink is written without cancellation (derive/kinks.py).
    """
    dummy = sp.Dummy("s", positive=True)
    body = integrand.xreplace({var: dummy})
    if not body.has(dummy):
        return body * (upper - lower)
    if not closed:
        return sp.Integral(body, (dummy, lower, upper))
    # A kink, |s - c|: SymPy's integrator answers with Piecewise or not in time; the polynomial pieces need neither.
    kinked = bounded(kink_integral, body, dummy, lower, upper, defaults, seconds=SIMPLIFY_LIMIT)
    if kinked is not None and printable(kinked):
        return kinked
    # First by inspection (cheap): terms that are constants times d/ds exp(E(s)), the integrands of a VP-like
    # variance whatever beta is (beta e^B with B' = beta), which SymPy's integrator may not find in time.
    expanded = bounded(lambda e: sp.powsimp(sp.expand(e)), body, seconds=SIMPLIFY_LIMIT)
    # Sub-VP's beta (1 - e^-2B) e^B arrives as (1 + 199 s) sinh(B) / 5: in exponentials, with the terms of each
    # exponential gathered (s e^B and e^B are one term beta e^B), it is beta e^B - beta e^-B.
    gathered = bounded(_by_exponential, body, seconds=SIMPLIFY_LIMIT)
    # A VE written sigma = smin^(1 - s^rho) smax^(s^rho) has powers of constants with exponents in s^rho, which
    # rewrite(exp) above turns into exp(rho log s) as well: as one exponential each, and s^rho left alone.
    powers = bounded(_powers_as_exponentials, body, dummy, seconds=SIMPLIFY_LIMIT)
    for form in (body, expanded, gathered, powers):
        inspected = bounded(_exponential_antiderivative, form, dummy, seconds=SIMPLIFY_LIMIT) if form is not None else None
        if inspected is not None:
            result = inspected.xreplace({dummy: upper}) - inspected.xreplace({dummy: lower})
            if printable(result):
                return result
    if bounded(non_elementary, body, dummy, seconds=SIMPLIFY_LIMIT):
        return sp.Integral(body, (dummy, lower, upper))
    # An antiderivative evaluated at the limits is much faster than SymPy's
    # definite integration. The expanded, power-simplified form goes first: it
    # is the fast one for sums of exponentials and for tan-like integrands.
    for form in ((expanded, body) if expanded is not None else (body,)):
        result = bounded(_definite, form, dummy, lower, upper, seconds=TIME_LIMIT / 2)
        if result is not None and not result.has(sp.Integral) and printable(result):
            return result
    return sp.Integral(body, (dummy, lower, upper))


def non_elementary(body: sp.Expr, var: sp.Symbol) -> bool:
    """True if the Risch algorithm proves that body has no elementary antiderivative in var and no term of body is
    an exponential of a quadratic (whose antiderivative SymPy writes with erf, which code generation prints).

    SymPy's integrator would then spend its whole time limit, twice, before the numeric path takes over (a VP with
    beta = log(1 + e^(10 t - 5)): 3.8 s), or answer with functions code generation cannot print (Ei, polylog).
    Integrands outside what SymPy's Risch implementation handles (trigonometric, algebraic, Abs) are not proved."""
    if any(sp.degree(e.args[0], var) == 2 for e in body.atoms(sp.exp) if e.args[0].is_polynomial(var)):
        return False
    try:
        result = risch_integrate(body, var)
    except NotImplementedError:
        return False
    return result.has(NonElementaryIntegral)


def _definite(body, var, lower, upper):
    antiderivative = sp.integrate(body, var, conds="none")
    if antiderivative.has(sp.Integral):
        return None
    result = antiderivative.xreplace({var: upper}) - antiderivative.xreplace({var: lower})
    negative = any(L.has(var) and L.args[0].xreplace({var: lower}).is_negative for L in antiderivative.atoms(sp.log))
    if result.has(sp.I) or negative:
        # log(s - 1) from 0 to t < 1 gives log(t - 1) - log(-1), complex; as log(u(s) / u(lower)) the same
        # antiderivative gives the real log(1 - t). With a parameter, log(s - d - 1) gives log(t - d - 1) -
        # log(-d - 1): no I appears, but the module would take the log of a negative number.
        real = _real_logs(antiderivative, var, lower)
        if real is not None:
            return real.xreplace({var: upper}) - real.xreplace({var: lower})
    return result


def _real_logs(F, var, lower):
    """F with each log(u(s)) written log(u(s) / u(lower)), when F is linear in those logs with constant
    coefficients (so that the change is a constant): real on an interval where u keeps its sign."""
    logs = [L for L in F.atoms(sp.log) if L.has(var)]
    if not logs:
        return None
    zs = [sp.Dummy() for _ in logs]
    linear = F.xreplace(dict(zip(logs, zs)))
    for z in zs:
        coefficient = sp.diff(linear, z)
        if coefficient.has(var) or any(coefficient.has(w) for w in zs):
            return None
    replacements = {}
    for L in logs:
        start = L.args[0].xreplace({var: lower})
        if start == 0 or start.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
            return None
        replacements[L] = sp.log(sp.cancel(L.args[0] / start))
    return F.xreplace(replacements)


def real_logs(expr: sp.Expr, t: sp.Symbol, defaults: dict, lo: float, hi: float) -> sp.Expr:
    """expr with each log(u) whose argument is negative on [lo, hi] at the default parameters written log(-u),
    where that leaves expr's value unchanged: the antiderivative of an integrand such as beta / (1 - e^-B)
    is log(expm1(-B)), whose iπ terms cancel between F(t) and F(eps) but whose module would take the log of a
    negative number. The change is kept only if its value at 5 points is real and the original's (_same_real_values)."""
    logs = [L for L in expr.atoms(sp.log) if _negative_on(L.args[0], t, defaults, lo, hi)]
    if not logs:
        return expr
    rewritten = expr.xreplace({L: sp.log(-L.args[0]) for L in logs})
    return rewritten if _same_real_values(expr, rewritten, t, defaults, lo, hi) else expr


def _same_real_values(old: sp.Expr, new: sp.Expr, t: sp.Symbol, defaults: dict, lo: float, hi: float) -> bool:
    """new is real and equals old (to 1e-12 of max(1, |old|)) at 5 points of [lo, hi], parameters at their defaults,
    evaluated at 30 digits (old may be complex term by term: its iπ's must cancel)."""
    at = {k: exact_value(v) for k, v in defaults.items()}
    for point in np.geomspace(lo, hi, 5):
        x = {t: sp.Float(point, 30)}
        try:
            a, b = (complex(e.xreplace(at).xreplace(x).evalf(30)) for e in (old, new))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return False
        if not (abs(a - b) <= 1e-12 * max(1.0, abs(a)) and b.imag == 0):
            return False
    return True


def log_exp_differences(expr: sp.Expr, t: sp.Symbol, defaults: dict, lo: float, hi: float) -> sp.Expr | None:
    """expr with each log(c1 exp(u1) + c2 exp(u2)), one term dominating the other on [lo, hi] at the defaults,
    written log(c1) + u1 + log(-expm1(d)), d = u2 - u1 + log(-c2 / c1) < 0: the antiderivative of beta / (1 - e^-B)
    is log(exp(b1 t^2 / 2) - exp(-b0 t)), a difference of two values near 1 at small t that loses log2(1 / B(t))
    bits (every float32 digit near eps, and in the float64 constant F(eps)); log(-expm1(-B)) keeps them. None if no
    log has that shape; a rewrite is kept only if its value agrees with the log's at 5 points (to 1e-12)."""
    def exponential_term(term):
        # c exp(u_1) exp(u_2) ... as (c, u_1 + u_2 + ...), c free of t; a constant term is c exp(0).
        factors = sp.Mul.make_args(term)
        coefficient = sp.Mul(*(f for f in factors if not isinstance(f, sp.exp)))
        exponent = sp.Add(*(f.args[0] for f in factors if isinstance(f, sp.exp)))
        return None if coefficient.has(t) else (coefficient, exponent)

    found = {}
    for L in expr.atoms(sp.log):
        X = bounded(lambda e: sp.powsimp(sp.expand(e), combine="exp"), L.args[0], seconds=SIMPLIFY_LIMIT)
        terms = sp.Add.make_args(X) if X is not None else ()
        parts = [exponential_term(term) for term in terms]
        if len(parts) != 2 or None in parts:
            continue
        for (c1, u1), (c2, u2) in (parts, parts[::-1]):
            d = sp.expand(u2 - u1) + sp.log(-c2 / c1)
            rewritten = sp.log(c1) + u1 + sp.log(-expm1(d))
            if printable(rewritten) and _same_real_values(L, rewritten, t, defaults, lo, hi):
                found[L] = rewritten
                break
    return expr.xreplace(found) if found else None


def powers_minus_one(expr: sp.Expr) -> sp.Expr | None:
    """(1 + X)^p - 1 (p not an integer) as expm1(p log1p(X)): the inverse of an OU process with rate 1 / (1 + t),
    t = (1 + c e^drop)^(1/3) - 1, lost ~u / t relative near eps that way (6e-4 at t = 1e-4 in float32). None if
    there is no such sum."""
    def rewrite(add):
        terms = list(add.args)
        if -1 not in terms:
            return add
        for i, term in enumerate(terms):
            if isinstance(term, sp.Pow) and not term.exp.is_integer and term.base.is_Add and 1 in term.base.args:
                X = term.base - 1
                rest = [u for k, u in enumerate(terms) if k != i and u != -1]
                return sp.Add(expm1(term.exp * log1p(X)), *rest)
        return add

    rewritten = expr.replace(lambda e: e.is_Add and e.has(sp.Pow), rewrite)
    return rewritten if rewritten != expr else None


def log_ratios(expr: sp.Expr) -> sp.Expr | None:
    """expr with each c log(P) - c log(Q) in a sum whose P - Q is shorter than P written c log1p((P - Q) / Q): the
    inverse of an exponential schedule, (log(b0 + k L(drop)) - log(b0)) / k with L(0) ~ eps, is a difference of
    nearly equal logarithms near drop = 0 that leaves ~1e-3 of t in float32; log1p(k L / b0) / k keeps its digits.
    None if no pair has that shape."""
    def pair_up(add):
        terms = list(add.args)
        logs = []
        for i, term in enumerate(terms):
            c, rest = term.as_coeff_Mul()
            if isinstance(rest, sp.log):
                logs.append((i, c, rest.args[0]))
        for i, c, P in logs:
            for j, d, Q in logs:
                if i != j and d == -c:
                    difference = P - Q  # like terms cancel; expanding would grow the rest
                    if difference != 0 and size(difference) < size(P):
                        rest = [u for k, u in enumerate(terms) if k not in (i, j)]
                        return sp.Add(c * log1p(difference / Q), *rest)
        return add

    rewritten = expr.replace(lambda e: e.is_Add and e.has(sp.log), pair_up)
    return rewritten if rewritten != expr else None


def _negative_on(u: sp.Expr, t: sp.Symbol, defaults: dict, lo: float, hi: float) -> bool:
    at = u.xreplace({k: exact_value(v) for k, v in defaults.items()})
    try:
        values = [complex(at.xreplace({t: sp.Float(point, 30)}).evalf(30)) for point in np.geomspace(lo, hi, 9)]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return False
    return all(v.real < 0 and v.imag == 0 for v in values)


def _by_exponential(body: sp.Expr) -> sp.Expr:
    """body in exponentials, expanded, with the terms of each distinct exponential summed: p(s) e^E(s) + ..."""
    terms = sp.Add.make_args(sp.expand(body.rewrite(sp.exp)))
    groups: dict[sp.Expr, sp.Expr] = {}
    for term in terms:
        # Factored first: a term over a sum of exponentials, e^(c s) / ((c - k)^2 e^(2 c s) e^(2 k s)), is then one
        # exponential e^(-(c + k) s) / (c - k)^2.
        term = sp.powsimp(sp.factor(term), combine="exp")
        exps = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.exp)]
        key = exps[0] if len(exps) == 1 else sp.Integer(1)
        groups[key] = groups.get(key, sp.Integer(0)) + term / key
    return sp.Add(*(sp.factor(coefficient) * key for key, coefficient in groups.items()))


def _powers_as_exponentials(body: sp.Expr, var: sp.Symbol) -> sp.Expr | None:
    """body with each power b^E(s) of a base free of s written exp(E log b), the exponentials of each term combined
    into one; None if body has no such power."""
    def is_power(e):
        return e.is_Pow and not e.base.has(var) and e.exp.has(var)
    if not body.has(var) or not any(is_power(e) for e in sp.preorder_traversal(body)):
        return None
    rewritten = body.replace(is_power, lambda e: sp.exp(e.exp * sp.log(e.base)))
    return sp.Add(*(sp.powsimp(term, combine="exp") for term in sp.Add.make_args(sp.expand(rewritten))))


def _exponential_antiderivative(body, var):
    """sum_k c_k exp(E_k(s)) when every term of body is a constant c_k times E_k'(s) exp(E_k(s)), else None.

    That a ratio is constant is tested numerically (exact identities hold at random points), and the result's
    derivative is checked against body the same way."""
    pieces = []
    for term in sp.Add.make_args(body):
        for e in sorted(term.atoms(sp.exp), key=sp.default_sort_key):
            if not e.has(var):
                continue
            ratio = term / (sp.diff(e.args[0], var) * e)
            if is_constant_in(ratio, var):
                constant = sp.powsimp(ratio.xreplace({var: sp.Integer(0)}))
                if constant.has(sp.nan, sp.zoo, sp.oo, -sp.oo):   # s^(rho - 1) / s^rho at 0: read it at s = 1
                    constant = sp.powsimp(ratio.xreplace({var: sp.Integer(1)}))
                pieces.append(constant * e)
                break
        else:
            return None
    antiderivative = sp.Add(*pieces)
    derivative = sp.diff(antiderivative, var)
    return antiderivative if is_constant_in(derivative - body, var, zero=True, size_of=derivative) else None


def derivative_multiple(body: sp.Expr, F: sp.Expr, var: sp.Symbol) -> sp.Expr | None:
    """The constant k with body = k F'(var), or None: that the ratio is constant, and then that k F' - body
    vanishes, are tested numerically (exact identities hold at random points)."""
    dF = sp.diff(F, var)
    if dF == 0 or not is_constant_in(body / dF, var):
        return None
    # A small rational first (1 for every VP): SymPy's simplify may not see that a trigonometric ratio is 1.
    k = _small_rational(body / dF, var)
    if k is None:
        k = sp.simplify(body / dF)
    if k.has(var):  # constant, but not in a form SymPy sees as one: its value at a point of (0, 1)
        k = sp.simplify((body / dF).xreplace({var: sp.Rational(1, 2)}))
    if k.has(var) or k.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        return None
    return k if is_constant_in(k * dF - body, var, zero=True, size_of=k * dF) else None


def _small_rational(expr: sp.Expr, var: sp.Symbol) -> sp.Rational | None:
    """p/q (|p|, q <= 1000) if expr, at var = 0.37 and each set of parameter values, is that number to 25 digits."""
    expr, varying = _integrals_as_symbols(expr, var)
    others = sorted(expr.free_symbols - {var} - set(varying), key=sp.default_sort_key)
    found = set()
    for p_value in _PARAMETER_SETS:
        point = {o: sp.Float(p_value * (1 + i / 7), 30) for i, o in enumerate(others)}
        point.update(_integral_values(varying, 0.37))
        value = expr.xreplace({**point, var: sp.Float(0.37, 30)}).evalf(30)
        if not (value.is_number and value.is_real and value.is_finite):
            return None
        q = sp.Rational(float(value)).limit_denominator(1000)
        if abs(q.p) > 1000 or abs(value - q) > 1e-25 * max(1, abs(q)):
            return None
        found.add(q)
    return found.pop() if len(found) == 1 else None


_PROBES = (0.11, 0.37, 0.53)     # values of s where identities are tested
_PARAMETER_SETS = (0.71, 1.37)   # parameters at these (times 1 + i / 7 for the i-th), one set at a time


def is_constant_in(expr, var, zero=False, size_of=None) -> bool:
    """expr takes one value in var (0 when ``zero``) at a few points s in (0, 1), at each of two sets of positive
    parameter values in turn. The value may differ between the sets: a constant c_k such as -2 k / ((c - k)(c + k))
    is constant in s, not in the parameters. With ``zero``, 0 means below 1e-20 of max(1, |size_of|) at the same
    point: expr is a difference of terms of that size, evaluated to 30 digits (a sub-VP integrand with beta_max =
    200 has terms near e^28, whose difference at 30 digits is 1e-15, not 0).
    An unevaluated integral over [L, var] counts as one more variable, given values of its own at the points
    (_integrals_as_symbols): expr must be constant in it too, which an identity that holds whatever the integral's
    value is (exp(-2 B) / exp(-2 B) with B = int beta) is, without integrating to 30 digits at each point (a VP
    whose beta has no elementary antiderivative spent seconds in mpmath's quadrature here)."""
    if size_of is not None:
        (expr, size_of), varying = _integrals_as_symbols(sp.Tuple(expr, size_of), var)
    else:
        expr, varying = _integrals_as_symbols(expr, var)
    others = sorted((expr.free_symbols | (size_of.free_symbols if size_of is not None else set())) - {var}
                    - set(varying), key=sp.default_sort_key)
    kinked = [sp.Abs(f.args[0]) for f in expr.atoms(sp.Abs, sp.sign) if f.args[0].has(var)]
    for p_value in _PARAMETER_SETS:
        parameters = {o: sp.Float(p_value * (1 + i / 7), 30) for i, o in enumerate(others)}
        values, sizes = [], []
        # Either side of each kink too: with sign(t - c) at c = 0.71 every probe of (0, 1) saw one side, and
        # 1 / (2 k sign(t - c)) passed for a constant (an OU process whose drift changes sign, its v then wrong past c).
        across = [r * (1 + d) for r in (kinks(kinked, var, 1e-3, 10.0, parameters) if kinked else ())
                  for d in (-1e-3, 1e-3)]
        for s_value in _PROBES + tuple(across):
            point = {**parameters, **_integral_values(varying, s_value), var: sp.Float(s_value, 30)}
            try:
                value = complex(expr.xreplace(point).evalf(30))
                sizes.append(abs(complex(size_of.xreplace(point).evalf(30))) if size_of is not None else 0.0)
            except (TypeError, ValueError, ZeroDivisionError):
                return False
            if value != value or abs(value) == float("inf"):
                return False
            values.append(value)
        if zero:
            scale = max(1.0, max(abs(v) for v in values), max(sizes))
            if not all(abs(v) <= 1e-20 * scale for v in values):
                return False
        elif not all(abs(v - values[0]) <= 1e-20 * max(abs(values[0]), 1e-300) for v in values):
            return False
    return True


def _integrals_as_symbols(expr: sp.Basic, var: sp.Symbol) -> tuple[sp.Basic, list[sp.Dummy]]:
    """expr with each outermost Integral written as a sum of constants times Integrals of single terms
    (_linear_parts), and each of those Integrals as a Dummy: those that depend on var (returned, in a fixed order)
    take values that change with var (_integral_values); the others are constants, as the parameters are.

    Written so, int -5/2 e^sin(3s) ds and 5 int e^sin(3s) ds (simplify takes the constant out) are one variable,
    whatever their integration variables are called."""
    outer = {}

    def visit(e):
        if isinstance(e, sp.Integral):
            outer[e] = None
        else:
            for a in e.args:
                visit(a)
    visit(expr)
    if not outer:
        return expr, []
    symbols: dict[sp.Integral, sp.Dummy] = {}
    for e in outer:
        parts = []
        for coefficient, integral in _linear_parts(e):
            if integral == 1:
                parts.append(coefficient)
                continue
            if integral not in symbols:
                symbols[integral] = sp.Dummy("I", real=True)
            parts.append(coefficient * symbols[integral])
        outer[e] = sp.Add(*parts)
    ordered = sorted(symbols, key=sp.default_sort_key)
    return expr.xreplace(outer), [symbols[e] for e in ordered if var in e.free_symbols]


_VARIABLE = sp.Dummy("s")  # one integration variable for the Integrals of _linear_parts, so equal ones compare equal


def _linear_parts(integral: sp.Integral) -> list[tuple[sp.Expr, sp.Expr]]:
    """int_L^U sum_k c_k f_k(s) ds as [(c_k, int_L^U f_k(s) ds)], c_k free of s (a term free of s is (c (U - L), 1)),
    the integrals over _VARIABLE. Nothing is integrated or expanded: the terms are those of the integrand's sum."""
    if len(integral.limits) != 1 or len(integral.limits[0]) != 3:
        return [(sp.Integer(1), integral)]
    (x, lower, upper), = integral.limits
    parts = []
    for term in sp.Add.make_args(integral.function.xreplace({x: _VARIABLE})):
        coefficient, rest = term.as_independent(_VARIABLE, as_Add=False)
        if rest == 1:
            parts.append((coefficient * (upper - lower), sp.Integer(1)))
        else:
            parts.append((coefficient, sp.Integral(rest, (_VARIABLE, lower, upper))))
    return parts


def _integral_values(symbols: list[sp.Dummy], s_value: float) -> dict:
    """Values for the integrals of _integrals_as_symbols at var = s_value: they change with s_value, each its own way,
    in no relation that an identity could rely on."""
    return {z: sp.Float(0.29 + 1.7 * s_value ** (1 + i / 3) + 0.07 * i, 30) for i, z in enumerate(symbols)}


def simplest(expr: sp.Expr, seconds: float = SIMPLIFY_LIMIT) -> sp.Expr:
    """The form with the fewest operations among a few bounded rewrites, each under ``seconds``."""
    return min(rewrites(expr, seconds), key=lambda e: (size(e), sp.default_sort_key(e)))


def size(expr: sp.Expr) -> int:
    """The number of nodes in the expression tree: a cheap stand-in for count_ops."""
    return sum(1 for _ in sp.preorder_traversal(expr))


def rewrites(expr: sp.Expr, seconds: float = SIMPLIFY_LIMIT) -> list[sp.Expr]:
    """expr and the forms a few bounded SymPy rewrites give it, each rewrite under ``seconds``."""
    if expr.has(*NUMERIC):
        # powsimp alone is cheap and cancels exp(-A) exp(A) around numeric integrals.
        return [expr, sp.powsimp(expr)]
    candidates = [expr]
    if size(expr) > MAX_REWRITE_SIZE:
        # Too large for simplify; one fraction, factored, is cheap and often collapses what
        # integration expanded (VE's variance: 60 nodes of logs and powers -> sigma_min^2 (sigma_max/sigma_min)^2t).
        short = bounded(lambda e: sp.factor(sp.together(e)), expr, seconds=seconds)
        if short is None or not printable(short) or size(short) > MAX_REWRITE_SIZE:
            return _with_exponentials([expr, sp.powsimp(expr)])
        candidates.append(short)
        expr = short
    for rewrite in (sp.simplify, sp.factor, sp.powsimp, sp.expand_log, factor_exponentials, common_exponential):
        if rewrite is sp.factor and _high_exponential_powers(expr):
            continue
        value = bounded(rewrite, expr, seconds=seconds)
        if value is not None and printable(value):
            candidates.append(value)
    # A common factor taken out turns mu - mu exp(u) into mu (1 - exp(u)), which prints as -mu expm1(u).
    candidates += [sp.factor_terms(c) for c in candidates]
    if expr.has(sp.cos):
        candidates += [sum_to_product(c) for c in candidates]
    return _with_exponentials(candidates)


def _high_exponential_powers(expr: sp.Expr, limit: int = 24) -> bool:
    """True if an exponential's exponent has a number with a numerator or denominator above ``limit``: sp.factor
    writes exp(199 t^2 / 20) as exp(t^2 / 20)^199 and factors a polynomial of that degree, which takes its whole
    time limit (a VP written with numbers, beta = 1/10 + 199/10 t, spent 8 of its 12 s of compile there)."""
    for e in expr.atoms(sp.exp):
        for term in sp.Add.make_args(sp.expand(e.args[0])):
            number = term.as_coeff_Mul()[0]
            if number.is_Rational and (abs(number.p) > limit or number.q > limit):
                return True
    return False


def _with_exponentials(candidates: list[sp.Expr]) -> list[sp.Expr]:
    """The candidates and, where they have powers b^u(t), the same written with exponentials: r^t - 1 as
    exp(t log r) - 1, which prints as expm1 (a geometric schedule's integrals near t = 0)."""
    candidates = candidates + [e for c in candidates if (e := powers_as_exponentials(c)) is not None]
    return list(dict.fromkeys(candidates))


def powers_as_exponentials(expr: sp.Expr) -> sp.Expr | None:
    """Every power b^u whose exponent has a free symbol as exp(u log b), the exponentials of a product
    merged: beta_max^t / beta_min^t - 1 becomes exp(t (log beta_max - log beta_min)) - 1. None if none."""
    powers = [p for p in expr.atoms(sp.Pow) if p.exp.free_symbols and not p.base.is_Number or
              (p.exp.free_symbols and p.base.is_Number and p.base > 0)]
    if not powers:
        return None
    rewritten = expr.xreplace({p: sp.exp(sp.expand(p.exp * sp.expand_log(sp.log(p.base), force=True)))
                               for p in powers})
    merged = bounded(lambda e: sp.powsimp(e, deep=True, combine="exp"), rewritten, seconds=SIMPLIFY_LIMIT)
    return merged if merged is not None and printable(merged) else None


def is_closed(expr: sp.Expr) -> bool:
    return not expr.has(*NUMERIC)


def factor_exponentials(expr: sp.Expr) -> sp.Expr:
    """Factor expr as a rational function of E = exp(u) when every exponential is exp(k u), k rational.

    This finds, e.g., e^B - 2 + e^-B = (e^B - 1)^2 / e^B, which code generation
    then prints as expm1(B)^2 * exp(-B): no cancellation near B = 0.
    """
    powers = exponential_powers(expr.atoms(sp.exp))
    if powers is None:
        return expr
    base, exponents = powers
    E = sp.Dummy("E", positive=True)
    factored = sp.factor(expr.xreplace({e: E**n for e, n in exponents.items()}))
    return sp.powsimp(factored.xreplace({E: sp.exp(base)}))


def exponential_powers(exps) -> tuple[sp.Expr, dict[sp.Expr, sp.Integer]] | None:
    """(u, {e: n}) with each exponential e = exp(u)^n, n an integer, when the exponents are rational multiples of one
    another (u is the first's divided by their common denominator: e^-y and e^-y/2 are E^2 and E for E = e^(-y/2));
    None when there is none or they are not."""
    exps = sorted(exps, key=sp.default_sort_key)
    if not exps:
        return None
    base = sp.expand(exps[0].args[0])
    ks = {e: sp.cancel(sp.expand(e.args[0]) / base) for e in exps}
    if not all(k.is_Rational for k in ks.values()):
        return None
    q = sp.ilcm(*(k.q for k in ks.values()))
    return base / q, {e: k * q for e, k in ks.items()}


def common_exponential(expr: sp.Expr) -> sp.Expr:
    """c1 exp(E1) + c2 exp(E2) as exp(E1) (c1 + c2 exp(E2 - E1)), in every such sum of two terms.

    exp(g0 + r t) - exp(g0), a sigmoid schedule's variance near t = 0, becomes exp(g0) (exp(r t) - 1), which
    prints as exp(g0) expm1(r t): no cancellation.
    """
    def split(term):
        factors = sp.Mul.make_args(term)
        exps = [f for f in factors if isinstance(f, sp.exp)]
        if len(exps) != 1:
            return None
        return sp.Mul(*(f for f in factors if f is not exps[0])), exps[0].args[0]

    def rewrite(e):
        if e.is_Atom:
            return e
        e = e.func(*(rewrite(a) for a in e.args))
        parts = [split(a) for a in e.args] if e.is_Add and len(e.args) == 2 else [None]
        if None in parts:
            return e
        (c1, E1), (c2, E2) = parts
        return sp.exp(E1) * (c1 + c2 * sp.exp(sp.expand(E2 - E1)))

    return rewrite(expr)


def exponential_differences(expr: sp.Expr, t: sp.Symbol) -> list[sp.Expr]:
    """expr, and the base of each square root in it, with exponential_difference applied where it applies."""
    forms = [f for f in [bounded(exponential_difference, expr, t, seconds=SIMPLIFY_LIMIT)] if f is not None]
    roots = {p: f for p in expr.atoms(sp.Pow) if p.exp == sp.Rational(1, 2) and p.base.has(t)
             if (f := bounded(exponential_difference, p.base, t, seconds=SIMPLIFY_LIMIT)) is not None}
    if roots:
        forms.append(expr.xreplace({p: sp.sqrt(f) for p, f in roots.items()}))
    return [f for f in forms if printable(f)]


def exponential_difference(expr: sp.Expr, t: sp.Symbol) -> sp.Expr | None:
    """expr as -Q (exp(u(t) - w) - 1) / D when, over one denominator D, its numerator is P exp(u(t)) + Q with P, Q
    free of t and -Q / P = exp(w); else None.

    A difference of sigmoids, sigmoid(z(t)) - sigmoid(z0) (Chen's sigmoid schedule: v = 1 - gamma near t = 0, gamma
    near T), has such a numerator; written with expm1(u - w), u - w factored (k (t - 1) rather than k t - k), it
    keeps its float32 digits where the two sigmoids nearly agree."""
    n, d = sp.fraction(sp.together(expr))
    n = sp.powsimp(sp.expand(n), combine="exp")
    P, Q, key = sp.Integer(0), sp.Integer(0), None
    for term in sp.Add.make_args(n):
        if not term.has(t):
            Q += term
            continue
        factors = sp.Mul.make_args(term)
        exps = [f for f in factors if isinstance(f, sp.exp) and f.has(t)]
        rest = sp.Mul(*(f for f in factors if not (isinstance(f, sp.exp) and f.has(t))))
        if len(exps) != 1 or rest.has(t):
            return None
        free, dependent = sp.expand(exps[0].args[0]).as_independent(t, as_Add=True)
        if key is not None and sp.expand(dependent - key) != 0:
            return None
        key = dependent
        P += rest * sp.exp(free)
    if key is None or Q == 0:
        return None
    w = sp.simplify(sp.expand_log(sp.log(sp.simplify(sp.powsimp(-Q / P))), force=True))
    if w.has(sp.I, sp.zoo, sp.nan) or w.has(t):
        return None
    return -Q * (sp.exp(sp.factor(key - w)) - 1) / d


def sum_to_product(expr: sp.Expr) -> sp.Expr:
    """Rewrite cos(a) - cos(b) as 2 sin((a + b)/2) sin((b - a)/2), and 1 - cos(u) as 2 sin(u/2)^2.

    A cosine schedule's variance is a difference of nearly equal cosines near
    t = 0; the product of sines keeps every float32 digit there.
    """
    def half(u):
        return sp.factor(sp.cancel(u / 2))

    def rewrite(e):
        terms = list(e.args)
        for i, first in enumerate(terms):
            c1, f1 = first.as_coeff_Mul()
            if not isinstance(f1, sp.cos):
                continue
            for j, second in enumerate(terms):
                c2, f2 = second.as_coeff_Mul()
                partner = None
                if j != i and isinstance(f2, sp.cos) and c2 == -c1:
                    partner = 2 * c1 * sp.sin(half(f1.args[0] + f2.args[0])) * sp.sin(half(f2.args[0] - f1.args[0]))
                elif j != i and second.is_Number and second == -c1:
                    partner = -2 * c1 * sp.sin(half(f1.args[0])) ** 2
                if partner is not None:
                    rest = [u for k, u in enumerate(terms) if k not in (i, j)]
                    return sp.Add(partner, *rest)
        return e

    return expr.replace(lambda e: e.is_Add and e.has(sp.cos), rewrite)


@dataclass(frozen=True)
class Accuracy:
    """Where candidate forms are compared: default parameters and the interval [eps, T]."""

    defaults: dict
    eps: float
    T: float

    @property
    def grid(self) -> np.ndarray:
        return np.geomspace(self.eps, self.T, 25)

    def best(self, candidates: list[sp.Expr], t: sp.Symbol) -> sp.Expr:
        return most_accurate(candidates, t, self.defaults, self.grid)

    def float32_error(self, expr: sp.Expr, t: sp.Symbol) -> float:
        """The largest relative error of expr evaluated in float32 on the grid, against 30 digits."""
        at = _at_defaults(expr, self.defaults)
        if at.has(*NUMERIC) or at.free_symbols - {t}:
            return 0.0  # tables: no cancellation to measure
        # At float32 inputs, as most_accurate judges forms: t(1 - t) near t = 0.9999 is not less accurate than any
        # other form because float32's t is 6e-8 from 0.9999 (the bridge's variance went to the tables for that).
        columns = (self.grid.astype(np.float32).astype(np.float64),)
        reference = _exact((at,), (t,), columns)
        if reference is None or not np.isfinite(reference).all():
            return np.inf
        err = _float32_error(at, (t,), columns, reference)
        return np.inf if err is None else err

    def best_over_steps(self, candidates: list[sp.Expr], t: sp.Symbol, s: sp.Symbol, step: float) -> sp.Expr:
        """The most accurate form of a function of a step [s, t]: steps of the given length (from s = 0
        near eps), half of t, a thousandth and a ten-thousandth of t (10^4 steps), for t across [eps, T].
        Forms tied there are told apart in float64, the precision a step runs in, over steps of 1e-6 of t
        (float32's rounding of the inputs hides a difference of two logs of size 30 that cancels to 1e-8)."""
        ts = self.grid
        starts = (np.maximum(ts - step, 0.0), ts / 2, ts * 0.999, ts * 0.9999)
        return most_accurate(candidates, (t, s), self.defaults, (np.tile(ts, 4), np.concatenate(starts)),
                             fine=(ts, ts * (1 - 1e-6)))


# Errors below this (about 8 units of float32 rounding) are the rounding of a few operations, which the numpy
# measurement and torch's kernels need not share: forms that reach it are tied, and the shorter one is kept.
ROUNDING_TIE = 5e-7


def most_accurate(candidates: list[sp.Expr], t: sp.Symbol | tuple[sp.Symbol, ...], defaults: dict,
                  grid: np.ndarray | tuple[np.ndarray, ...], floor: float = 0.0, fine=None) -> sp.Expr:
    """The candidate whose float32 evaluation on the grid is closest to a 30-digit reference.

    Errors are relative to max(|reference|, floor): a floor suits a quantity held to an absolute bound where it
    is small (a CDF near 0), whose relative error there says nothing about the form.

    Errors are measured at the default parameters; ties (within a factor of two in error, or both below
    ROUNDING_TIE) are measured again with each parameter moved 100-fold, and ties that remain go to the form with
    fewer operations, and between forms as short, to the smaller error. On a log-spaced grid of
    [eps, T], forms that lose digits near t = eps (1 - exp(-B) against
    -expm1(-B)) lose. With several variables, ``t`` and ``grid`` are tuples:
    the symbols and the columns of their values at the same points.
    """
    variables = t if isinstance(t, tuple) else (t,)
    # The points as float32 numbers, for the reference too: a form is judged by its error at the inputs a float32
    # caller gives it. Otherwise rounding t and s = 0.999 t apart moves t - s by ~6e-5 of itself, a floor that
    # hid the difference between (t - s) (b0 + ...) and B(t) - B(s) and let the shorter, cancelling form win.
    columns = tuple(np.asarray(c, dtype=np.float32).astype(np.float64)
                    for c in (grid if isinstance(grid, tuple) else (grid,)))
    # Bounded: with the values in, SymPy's automatic evaluation of a large form may not end (EDM's sigma with a
    # parameter rho, (smin^(1/rho) + t (...))^rho at rho = 3, under square roots: the compile's whole 60 s). A form
    # that cannot be put at the defaults in time is not measured.
    forms = [(e, at) for e in dict.fromkeys(candidates)
             if (at := bounded(_at_defaults, e, defaults, seconds=SIMPLIFY_LIMIT)) is not None]
    if not forms or any(at.has(*NUMERIC) or at.free_symbols - set(variables) for _, at in forms):
        return min(candidates, key=lambda e: (size(e), sp.default_sort_key(e)))  # no reference: the shortest
    reference = _reference([at for _, at in forms], variables, columns)
    if reference is None:
        return candidates[0]
    scored = [(err, size(expr), sp.default_sort_key(expr), expr) for expr, at in forms
              if (err := _float32_error(at, variables, columns, reference, floor)) is not None]
    if not scored:
        return candidates[0]
    tied = _tied(scored)
    if fine is not None and len(tied) > 1:
        tied = _tied_in_float64(tied, forms, variables, fine)
    if len(tied) > 1 and defaults:
        # Tied at the defaults: by the worst error with one parameter at a time moved 100-fold, where forms part that
        # agree at the defaults (log(c (e^u - 1)) overflows float32 once u > 88; log(c) + u + log(-expm1(-u)) does
        # not). A parameter set where the reference is not finite, or a form cannot be evaluated, is left out.
        worst = {id(s[3]): s[0] for s in tied}
        # Only the parameters the forms use (a program with 10,000 parameters made 20,000 copies of all of them).
        used = set().union(*(s[3].free_symbols for s in tied))
        for stressed in _stressed({k: v for k, v in defaults.items() if k in used}):
            errors = _stressed_errors([s[3] for s in tied], variables, columns, stressed, floor)
            if errors is None:
                continue
            for s, e in zip(tied, errors):
                worst[id(s[3])] = max(worst[id(s[3])], e)
        tied = _tied([(worst[id(s[3])], *s[1:]) for s in tied])
    return min(tied, key=lambda s: (s[1], s[0], s[2]))[3]


def _stressed_errors(exprs, variables, columns, values: dict, floor: float) -> list[float] | None:
    """The float32 error of each form at the parameter values, or None where a form cannot be evaluated there or
    the reference is not finite.

    Where numpy's long double is wider than float64, each form is evaluated as the module evaluates it, its
    constant subexpressions (parameters included) computed once with 30 digits and the rest in float32 (and in
    long double for the reference), without putting the values into the SymPy form: that makes SymPy evaluate
    the whole form again for every parameter set, which took 2.5-11 s of a compile with seven parameters."""
    if np.finfo(np.longdouble).eps >= 1e-18:
        ats = [bounded(_at_defaults, e, values, seconds=SIMPLIFY_LIMIT) for e in exprs]
        if any(at is None for at in ats):
            return None
        reference = _reference(ats, variables, columns)
        if reference is None or not np.isfinite(reference).all():
            return None
        errors = [_float32_error(at, variables, columns, reference, floor) for at in ats]
        return None if any(e is None for e in errors) else errors
    exact = {k: exact_value(v) for k, v in values.items()}
    evaluated = []
    for expr in exprs:
        try:
            fn, constants = _with_constants(expr, tuple(variables))
            with mpmath.workdps(30):
                consts = constants(exact)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError, KeyError):
            return None
        if not all(isinstance(c, mpmath.mpf) and mpmath.isfinite(c) for c in consts):
            return None
        try:
            with np.errstate(all="ignore"):
                low = np.asarray(fn(*(c.astype(np.float32) for c in columns), *map(float, consts)), np.float32)
                high = np.asarray(fn(*(c.astype(np.longdouble) for c in columns),
                                     *(np.longdouble(mpmath.nstr(c, 25)) for c in consts)), np.longdouble)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return None
        ones = np.ones(len(columns[0]))   # a form constant in the variables gives one number
        evaluated.append((low * ones.astype(np.float32), high * ones.astype(np.longdouble)))
    reference = _median([high for _, high in evaluated])
    if not np.isfinite(reference).all():
        return None
    return [_relative_error(low.astype(np.float64), reference, floor) for low, _ in evaluated]


@lru_cache(maxsize=256)
def _with_constants(expr: sp.Expr, variables: tuple[sp.Symbol, ...]):
    """(fn, constants): expr (expm1 and log1p written as code generation writes them) as a numpy function of the
    variables and of its constant subexpressions, each largest subexpression free of the variables (a parameter,
    exp(k/2), sqrt(2)) an argument; and a function of the parameters' exact values giving the constants' values in
    mpmath. Printed, not rebuilt: SymPy's constructors with a symbol in each constant's place were as slow as
    putting the values in."""
    body = use_expm1_log1p(expr)
    dependent = set(variables)
    for node in sp.postorder_traversal(body):
        if any(a in dependent for a in node.args):
            dependent.add(node)
    constants: dict[sp.Expr, str] = {}

    class Hoisting(_NumPyText):
        def _print(self, e, **kwargs):
            if isinstance(e, sp.Expr) and not e.is_Number and e not in dependent:
                return constants.setdefault(e, f"_c{len(constants)}")
            return super()._print(e, **kwargs)

    printer = Hoisting({"inline": True, "allow_unknown_functions": True})
    text = printer.doprint(body)
    names = [printer.doprint(v) for v in variables] + list(constants.values())
    if any(not n.isidentifier() or keyword.iskeyword(n) or n in _NUMPY_NAMES for n in names):
        raise ValueError("a variable's printed name is not an identifier")
    fn = eval(f"lambda {', '.join(names)}: ({text})", dict(_NUMPY_NAMES))  # noqa: S307
    params = sorted(set().union(*(c.free_symbols for c in constants)), key=sp.default_sort_key)
    values = sp.lambdify(params, list(constants), modules=[{"softplus": lambda u: mpmath.log1p(mpmath.exp(u))},
                                                           "mpmath"])

    def at(exact):
        return [mpmath.mpmathify(v) for v in values(*(mpmath.mpf(exact[p].p) / exact[p].q if exact[p].is_Rational
                                                      else mpmath.mpf(float(exact[p])) for p in params))]
    return fn, at


def _tied_in_float64(tied, forms, variables, columns):
    """Of the tied forms, those whose float64 error on the points (float64 inputs) is within a factor of ten of
    the best or below 1e-13; all of them where no reference can be formed there."""
    at_of = {id(expr): at for expr, at in forms}
    ats = [at_of[id(s[3])] for s in tied]
    reference = _reference(ats, variables, columns)
    if reference is None:
        return tied
    finite = np.isfinite(reference)
    errors = []
    for at in ats:
        values = _evaluate(at, variables, columns, np.float64)
        if values is None:
            errors.append(np.inf)
            continue
        with np.errstate(all="ignore"):
            rel = np.abs(values - reference) / np.maximum(np.abs(reference), 1e-300)
        errors.append(float(np.max(rel[finite])) if finite.any() and not np.isnan(values[finite]).any() else np.inf)
    best_err = min(errors)
    if not np.isfinite(best_err):
        return tied
    return [s for s, e in zip(tied, errors) if e <= max(10 * best_err, 1e-13)]


def _tied(scored):
    """The scored forms within a factor of two of the best error, or below ROUNDING_TIE."""
    best_err = min(s[0] for s in scored)
    return [s for s in scored if s[0] <= max(2 * best_err, ROUNDING_TIE)]


def _stressed(defaults: dict) -> list[dict]:
    """The defaults with one nonzero parameter at a time multiplied by 1/100 and by 100."""
    out = []
    for key, value in defaults.items():
        exact = exact_value(value)
        if exact.is_number and exact.is_finite and exact != 0:
            out += [{**defaults, key: exact * factor} for factor in (sp.Rational(1, 100), sp.Integer(100))]
    return out


def _at_defaults(expr: sp.Expr, defaults: dict) -> sp.Expr:
    # expm1 and log1p first, as code generation writes them: with float parameters SymPy distributes a
    # numeric factor over exp(u) - 1 (c exp(u) - c), which no longer reads as expm1 and cancels.
    # Exact values, not Floats: with Float parameters SymPy evaluates and regroups the expression (exp(3 - 6 t) became
    # 20.09 exp(-6 t)), so the form measured was not the form the module computes. Constant subtrees become numbers
    # only when evaluated (_constants_folded), as the module's constants do.
    return use_expm1_log1p(expr).xreplace({k: exact_value(v) for k, v in defaults.items()})  # xreplace: subs is slow


def exact_value(value) -> sp.Expr:
    """A parameter's value as the exact rational of its shortest decimal form (0.1 -> 1/10)."""
    value = float(value)
    return sp.Rational(repr(value)) if math.isfinite(value) else sp.Float(value)


def _evaluate(at: sp.Expr, variables, columns, dtype) -> np.ndarray | None:
    """at (parameters substituted) on the points, in numpy with the given dtype; None if it cannot.

    Constant subexpressions are folded to numbers first, as the module folds them into Python floats:
    numpy would evaluate expm1(0.2) as a float64 scalar, which promotes a float32 array to float64 and
    hides the float32 error being measured (a Python float does not promote)."""
    try:
        at = _constants_folded(at)
        fn = _numpy_function(tuple(variables), at)
        with np.errstate(all="ignore"):
            value = np.asarray(fn(*(c.astype(dtype) for c in columns)), dtype=dtype)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return value * np.ones(len(columns[0]), dtype=dtype)


def _constants_folded(at: sp.Expr) -> sp.Expr:
    """at with each subexpression free of symbols (expm1(2/5), sqrt(2) pi, ...) as a 30-digit Float."""
    return at.replace(lambda e: isinstance(e, sp.Expr) and not e.is_Atom and not e.free_symbols,
                      lambda e: sp.Float(e.evalf(30), 30))


@lru_cache(maxsize=256)
def _numpy_function(variables: tuple[sp.Symbol, ...], at: sp.Expr):
    """at as a numpy function, made once: each form is evaluated in float32 and in long double."""
    return numpy_function(variables, at)


class _NumPyText(NumPyPrinter):
    """NumPy's printer with softplus known (as numpy's logaddexp(0, u))."""

    def _print_softplus(self, e):
        return f"numpy.logaddexp(0, {self._print(e.args[0])})"


_NUMPY_TEXT = _NumPyText({"inline": True, "allow_unknown_functions": True})
_NUMPY_NAMES = {"numpy": np, "math": math}


def numpy_function(variables: tuple[sp.Symbol, ...] | sp.Symbol, expr: sp.Expr):
    """expr as a numpy function of the variables: what sp.lambdify(variables, expr, "numpy") makes, printed
    by the same printer, without lambdify's per-call setup (a namespace copied from numpy, argument
    inspection, a linecache entry), which was a sixth of a VP compile's time."""
    variables = (variables,) if isinstance(variables, sp.Symbol) else tuple(variables)
    names = [_NUMPY_TEXT.doprint(v) for v in variables]  # a Dummy prints as name_index
    if any(not n.isidentifier() or keyword.iskeyword(n) or n in _NUMPY_NAMES for n in names):
        return sp.lambdify(variables, expr, modules=[{"softplus": lambda u: np.logaddexp(0, u)}, "numpy"])
    return eval(f"lambda {', '.join(names)}: ({_NUMPY_TEXT.doprint(expr)})", dict(_NUMPY_NAMES))  # noqa: S307


def _float32_error(at: sp.Expr, variables, columns, reference: np.ndarray, floor: float = 0.0) -> float | None:
    """The largest error of ``at`` in float32 relative to max(|reference|, floor) where the reference is finite;
    inf if it gives NaN anywhere; None if it cannot be evaluated."""
    values = _evaluate(at, variables, columns, np.float32)
    if values is None:
        return None
    return _relative_error(values.astype(np.float64), reference, floor)


def _relative_error(values: np.ndarray, reference: np.ndarray, floor: float) -> float:
    """The largest |values - reference| / max(|reference|, floor) where the reference is finite; inf if a value is
    NaN or the error is not finite."""
    finite = np.isfinite(reference)
    with np.errstate(all="ignore"):
        rel = np.abs(values - reference) / np.maximum(np.abs(reference), max(floor, 1e-300))
    err = np.max(rel[finite]) if finite.any() else 0.0
    return float(err) if np.isfinite(err) and not np.isnan(values).any() else np.inf


def _exact(ats, variables, columns) -> np.ndarray | None:
    """The first of ``ats`` that mpmath can evaluate, with 30 digits, on the points."""
    for at in ats:
        try:
            exact = sp.lambdify(variables, at, modules=[{"softplus": lambda u: mpmath.log1p(mpmath.exp(u))}, "mpmath"])
            with mpmath.workdps(30):
                return np.array([float(exact(*map(mpmath.mpf, point))) for point in zip(*columns)])
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
    return None


def _reference(ats, variables, columns) -> np.ndarray | None:
    """Accurate values of the (equal) candidate functions at the points.

    Where numpy's long double has 64 bits of mantissa (x86), the elementwise median of the candidates
    evaluated in it: fast, vectorised and some twelve digits beyond float32 even for a form that loses
    a few to cancellation. Elsewhere, one candidate evaluated by mpmath with 30 digits.
    """
    if np.finfo(np.longdouble).eps < 1e-18:
        values = [v for at in ats if (v := _evaluate(at, variables, columns, np.longdouble)) is not None]
        if values:
            return _median(values)
    return _exact(ats, variables, columns)


def _median(values: list[np.ndarray]) -> np.ndarray:
    """The elementwise median of equal-length value arrays, in float64; NaN where all are NaN (a point where every
    candidate is NaN has no reference), without numpy's warning of it."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
        return np.nanmedian(np.array(values), axis=0).astype(np.float64)


def rationalize_roots(expr: sp.Expr) -> sp.Expr:
    """Rewrite k sqrt(P) + r (k a number) as (k^2 P - r^2) / (k sqrt(P) - r), which does not cancel when
    k sqrt(P) ~ -r.

    The root of a quadratic, (-b + sqrt(b^2 + 4ac)) / 2a (or (b - sqrt(b^2 + 4ac)) / -2a), loses most of
    its digits in float32 when 4ac is small; this form keeps them.
    """
    def rewrite(e):
        if e.is_Add and len(e.args) == 2:
            roots = [(k, root) for k, root in (a.as_coeff_Mul() for a in e.args)
                     if root.is_Pow and root.exp == sp.Rational(1, 2)]
            if len(roots) == 1:
                k, root = roots[0]
                r = e - k * root
                # Not deep: expanding inside functions would turn log((e^u - 1) c + 1) into one that no
                # longer prints as log1p(expm1(u) c).
                return sp.expand(k**2 * root.base - r**2, deep=False) / (k * root - r)
        return e
    return expr.replace(lambda e: e.is_Add, rewrite)


def use_expm1_log1p(expr: sp.Expr) -> sp.Expr:
    """Rewrite c exp(u) - c as c expm1(u) and log(1 + u) as log1p(u), literally and nothing more.

    These keep float32 digits near t = 0. (SymPy's own optimizer factors and
    may trade log(1 + exp(-y)) for -y + log1p(exp(y)), which cancels.) A term d = r c with r a number within
    1/2 of -1 is split the same way, c exp(u) + d = c expm1(u) + (1 + r) c: SymPy merges a variance v0 = 1/10000
    into e^u - 1 as e^u - 9999/10000, which cancels near u = 0 where expm1(u) + 1/10000 does not.
    """
    def rewrite_add(e):
        # c exp(u) beside -c, for any factor c (1, -1, sigma^2, ...): c expm1(u).
        args = list(e.args)
        for i, a in enumerate(args):
            factors = sp.Mul.make_args(a)
            growths = [f for f in factors if isinstance(f, sp.exp)]
            if len(growths) != 1:
                continue
            c = sp.Mul(*[f for f in factors if f is not growths[0]])
            # b = r c with r = -1 first (c expm1(u), nothing left over), then r within 1/2 of -1.
            partners = sorted(((j, b / c) for j, b in enumerate(args) if j != i), key=lambda p: p[1] != -1)
            for j, r in partners:
                if r.is_Rational and abs(1 + r) <= sp.Rational(1, 2):
                    rest = [x for k, x in enumerate(args) if k not in (i, j)]
                    left = [(1 + r) * c] if r != -1 else []
                    return sp.Add(c * expm1(growths[0].args[0]), *left, *rest, evaluate=False)
            # With parameters: (v0 + eps^2) e^u - v0 is (v0 + eps^2) expm1(u) + eps^2, whose v0 cancels in the
            # algebra instead of in float64 (t_icdf of a VE with v0 = 1e4 and eps = 1e-3 lost 7 digits at u = 0).
            for j, b in enumerate(args):
                if j == i or (b / c).is_Rational or size(c) + size(b) > 40:  # large: expand could take long
                    continue
                left = sp.expand(c + b, deep=False)
                if left.free_symbols < (c.free_symbols | b.free_symbols):
                    rest = [x for k, x in enumerate(args) if k not in (i, j)]
                    return sp.Add(c * expm1(growths[0].args[0]), *([left] if left != 0 else []), *rest,
                                  evaluate=False)
        return e

    def rewrite_log(e):
        arg = e.args[0]
        if arg.is_Add and 1 in arg.args:
            return log1p(sp.Add(*[a for a in arg.args if a != 1]))
        return e

    expr = expr.replace(lambda e: e.is_Add, rewrite_add)
    return expr.replace(lambda e: isinstance(e, sp.log), rewrite_log)


def softplus_forms(expr: sp.Expr, x: sp.Symbol) -> sp.Expr:
    """log(1 + K exp(X)) and log1p(K exp(X)), X in x and K > 0 free of it, as softplus(X + log K),
    which does not overflow: an OU process with rate 500 has t = log1p(K exp(drop)) / 1000 with drop up to
    1000, where exp overflows even float64 (the inverse CDF would be inf, clamped to T, for every u past 0.7)."""
    def rewrite(e):
        arg = e.args[0] if isinstance(e, log1p) else e.args[0] - 1
        exps = [f for f in sp.Mul.make_args(arg) if isinstance(f, sp.exp) and f.has(x)]
        if len(exps) != 1:
            return e
        K = arg / exps[0]
        if K.has(x) or not _surely_positive(K):
            return e
        return softplus(exps[0].args[0] + sp.log(K))

    return expr.replace(lambda e: isinstance(e, log1p) or (isinstance(e, sp.log) and e.args[0].is_Add
                                                             and 1 in e.args[0].args), rewrite)


def values_in_float64(expr: sp.Expr, t: sp.Symbol, defaults: dict, grid: np.ndarray) -> np.ndarray | None:
    """expr at the defaults on the grid, in float64 as the module computes it; None if it cannot be evaluated."""
    return _evaluate(_at_defaults(expr, defaults), (t,), (np.asarray(grid, dtype=np.float64),), np.float64)


def constant_error(form: sp.Expr, defaults: dict) -> float:
    """The relative error of a constant (a form free of t) evaluated in float64 from the parameters' default values,
    as the module computes its constants when constructed, against its 30-digit value; inf where it cannot be
    evaluated or is 0."""
    form = use_expm1_log1p(form)
    variables = tuple(sorted(form.free_symbols, key=sp.default_sort_key))
    if set(variables) - set(defaults):
        return math.inf
    if not variables:
        return 0.0   # folded to a number, as the module's printer writes it
    got = _evaluate(form, variables, tuple(np.array([float(defaults[v])]) for v in variables), np.float64)
    exact = sp.N(form.xreplace({k: exact_value(v) for k, v in defaults.items()}), 30)
    if got is None or not exact.is_real or exact == 0 or not np.isfinite(got).all():
        return math.inf
    return abs(float(got[0]) / float(exact) - 1)


def accurate_constant(form: sp.Expr, defaults: dict) -> sp.Expr:
    """A constant (free of t) as it is where float64 keeps it within 1e-12 at the defaults (constant_error), else the
    more accurate of it and its simplest form. simplify of a constant with numbers in every exponent (a kernel-form
    schedule's v(T), or exp(-logSNR) at eps) ran to its 1 s limit, or 3.6 s, and gave the same form."""
    error = constant_error(form, defaults)
    if error <= 1e-12:
        return form
    simpler = simplest(form)
    return simpler if constant_error(simpler, defaults) < error else form


def finite_in_float64(expr: sp.Expr, t: sp.Symbol, defaults: dict, grid: np.ndarray) -> bool:
    """True if expr, at the defaults, is finite in float64 at every point of the grid (as the module computes it)."""
    values = values_in_float64(expr, t, defaults, grid)
    return values is not None and bool(np.isfinite(values).all())


def _surely_positive(K: sp.Expr) -> bool:
    """K > 0 for every value of its symbols: the product of its factors' signs, each known to SymPy's assumptions
    or, for expm1(u) and log1p(u) (which SymPy knows nothing about), the sign of u; a number by its value."""
    if not K.free_symbols:
        value = K.evalf(30)
        return value.is_real is True and bool(value > 0)
    return _sign(K) == 1


def _sign(e: sp.Expr) -> int | None:
    """+1 or -1 if e has that sign for every value of its symbols, else None."""
    if e.is_positive:
        return 1
    if e.is_negative:
        return -1
    if isinstance(e, (expm1, log1p)):
        return _sign(e.args[0])
    if e.is_Mul:
        signs = [_sign(f) for f in e.args]
        return None if None in signs else math.prod(signs)
    if e.is_Pow and e.exp.is_Integer:
        base = _sign(e.base)
        return None if base is None else base ** int(e.exp)
    return None
