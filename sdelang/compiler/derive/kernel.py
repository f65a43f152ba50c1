"""The Gaussian transition kernel of an affine SDE.

For dx = (a(t) x + b(t)) dt + g(t) dw with x(0) ~ data + N(0, v0):

    m(t) = exp( int_0^t a(s) ds )
    c(t) = m(t) int_0^t b(s) / m(s) ds
    v(t) = m(t)^2 ( v0 + int_0^t g(s)^2 / m(s)^2 ds )

(the solutions of m' = a m, c' = a c + b, v' = 2 a v + g^2 with m(0) = 1,
c(0) = 0, v(0) = v0). An integral SymPy cannot do in time stays an unevaluated
Integral; :func:`tabulate_kernel` then makes log m, c and log v columns of the generated
module's numeric tables (derive/tables.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1

from .symbolic import (SIMPLIFY_LIMIT, Accuracy, bounded, derivative_multiple, integrate_from, is_closed, log_growth,
                       rewrites, simplest, use_expm1_log1p)
from .tables import Tables

# For the calls whose answers decide closed form or tables, not rewrites to skip: the VP-like test of the noise
# integrand (and of the offset's), 0.4 s on iDDPM's cosine schedule written as an SDE on a slow machine, and past
# SIMPLIFY_LIMIT's 1 s under load, when the kernel went to the numeric path (a CI failure of
# test_closed_form_kernel[cosine_sde]); the rewrites of A and of the VP-like v, likewise.
MULTIPLE_LIMIT = 4.0

# The largest float32 relative error on [eps, T] accepted from a closed-form variance: the issue's
# bound on sigma in float32 is 1e-5 relative, and sigma's error is half of v's.
CLOSED_FORM_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Kernel:
    m: sp.Expr      # mean coefficient
    c: sp.Expr      # mean offset
    v: sp.Expr      # variance
    std: sp.Expr    # sqrt(v)
    # k where the noise is VP-like, g^2 / m^2 = k d/dt(1 / m^2): then v = v0 m^2 - k expm1(2 A) and a step's
    # G^2 = -k (r^2 - 1), whatever v0 and however v is written (derive/discretize.py)
    vp_multiple: sp.Expr | None = None

    @property
    def closed_form(self) -> bool:
        return all(is_closed(e) for e in (self.m, self.c, self.v))


def kernel(a: sp.Expr, b: sp.Expr, g2: sp.Expr, v0: sp.Expr, t: sp.Symbol, accuracy: Accuracy) -> Kernel:
    """Of the equivalent forms found for v and sigma, keep the one most accurate in float32."""
    zero = sp.Integer(0)
    A = integrate_from(a, t, zero, t, defaults=accuracy.defaults)
    # A kink's integral comes without cancellation near t = 0 (derive/kinks.py), which the shortest rewrite undoes
    # (-5 c^2 / 2 + 5 (c - t) |c - t| / 2 - t / 2): among its rewrites the most accurate in float32 is kept.
    # Under MULTIPLE_LIMIT, not SIMPLIFY_LIMIT, as the rewrites of v below: the forms found here decide closed form
    # against tables, and that must not change with the machine's load (SymPy's simplify of iDDPM's cosine schedule
    # written as an SDE takes 0.5-0.6 s of CPU; under a parallel test run it passed 1 s and the kernel went numeric).
    A = accuracy.best(rewrites(A, MULTIPLE_LIMIT), t) if A.has(sp.Abs) else simplest(A, MULTIPLE_LIMIT)
    m = sp.exp(A)
    # log(1 + u) in A as log1p(u) inside expm1(A) below: SymPy would fold exp(c log(1 + u)) out of expm1 again. Not
    # inside an Integral, which would then be a table column of its own beside m's.
    A_in_expm1 = use_expm1_log1p(A) if is_closed(A) else A
    if b == 0:
        c = zero
    else:
        offset = integrate_from(b / m, t, zero, t)
        # b = -k a, a fixed target k approached at a rate a(t) SymPy cannot integrate against: c = k (1 - m) =
        # -k expm1(A), as v below. (Where SymPy can, its form is kept: discretize simplifies c(t) - r c(s) better.)
        k = None
        if offset.has(sp.Integral):
            k = bounded(derivative_multiple, b / m, sp.exp(-A), t, seconds=MULTIPLE_LIMIT)
        c = -k * expm1(A_in_expm1) if k is not None else simplest(m * offset)
    # Simplified only where integrated (below): for the VP-like test the numbers are what count.
    raw_integrand = g2 / m**2
    # Variance preserving in its noise, g^2 = k d/dt(1/m^2) (VP with any beta): the integral is k (1/m^2 - 1), and
    # v = v0 m^2 - k expm1(2 A), which keeps its digits near t = 0 however SymPy writes m (it turns exp(A) with
    # A = -t + log(1 + tanh(4 t)) / 8 into a product of powers, whose 1 - m^2 cancels in float32). Where none of
    # these forms is accurate enough, SymPy's integral may give one that is (VDM's sigmoid schedule).
    vs = []
    k = bounded(derivative_multiple, raw_integrand, sp.exp(-2 * A), t, seconds=MULTIPLE_LIMIT)
    if k is not None:
        vs = [v0 * m**2 - k * expm1(2 * A_in_expm1)] + rewrites(m**2 * (v0 + k * (sp.exp(-2 * A) - 1)),
                                                                 seconds=MULTIPLE_LIMIT)
        v = accuracy.best(vs, t)
    error = accuracy.float32_error(v, t) if k is not None else math.inf
    if error > CLOSED_FORM_TOLERANCE and k is not None and _factor_overflows(a, t, accuracy):
        # VP-like, but no closed form of A is accurate and e^{-2A} leaves float64's range on [0, T] (a sigmoid
        # beta rising to 2000: e^{B} = e^{1000}), so that int_0^t g^2 / m^2 cannot be tabulated (nor would SymPy's
        # antiderivative of it be finite): v = v0 e^{2A} - k expm1(2A) with A = int_0^t a from a table, bounded.
        A_table = integrate_from(a, t, zero, t, closed=False)
        v = v0 * sp.exp(2 * A_table) - k * expm1(2 * A_table)
        return Kernel(m, c, v, sp.sqrt(v), k)
    integrand = simplest(raw_integrand) if error > CLOSED_FORM_TOLERANCE else raw_integrand
    if error > CLOSED_FORM_TOLERANCE:
        vs = rewrites(m**2 * (v0 + integrate_from(integrand, t, zero, t))) + vs
        v = accuracy.best(vs, t)
        error = accuracy.float32_error(v, t)
    if error > CLOSED_FORM_TOLERANCE:
        # Every closed form found cancels near t = eps (e.g. e^x - 1 - x when g(0) = 0 and a != 0):
        # quadrature of the integral itself cannot, so it replaces them.
        vs = [m**2 * (v0 + integrate_from(integrand, t, zero, t, closed=False))]
        v = vs[0]
    stds = [sp.sqrt(u) for u in vs] + [simplest(sp.sqrt(v))]
    return Kernel(m, c, v, accuracy.best(stds, t), k)


def _factor_overflows(a: sp.Expr, t: sp.Symbol, accuracy: Accuracy) -> bool:
    """True if e^{-2A}, A = int_0^t a, passes e^600 somewhere in [0, T] at the default parameters."""
    A = log_growth(a, t, accuracy.defaults, accuracy.T)
    return A is not None and bool(np.max(-2 * A) > 600)


def tabulate_kernel(k: Kernel, t: sp.Symbol, tables: Tables) -> Kernel:
    """The kernel with each quantity that has no closed form read from a table: log m, c and log v
    (logs: m and v are positive and span many orders of magnitude; a log keeps their relative error)."""
    m, c, v, std = k.m, k.c, k.v, k.std
    if not is_closed(m):
        m = sp.exp(tables.tabulate(log_of_positive(m), "log m(t)", absolute=True))
    if not is_closed(c):
        c = tables.tabulate(c, "c(t)", absolute=False)
    if not is_closed(v):
        log_v = tables.tabulate(log_of_positive(v), "log v(t)", absolute=True)
        v, std = sp.exp(log_v), sp.exp(log_v / 2)
    return Kernel(m, c, v, std, k.vp_multiple)


def log_of_positive(q: sp.Expr) -> sp.Expr:
    """log q of a positive q, real: the exponent of each exponential factor, plus log of each factor SymPy knows
    to be positive, expanded, plus one log of the remaining factors together (their product is positive).

    Taken out of the log, exp(2 A) cannot underflow where A is merely large. Expanding every factor instead
    (expand_log with force) splits v = -expm1(2 A) into log(-1) + log(expm1(2 A)) = I pi + ..., a complex column."""
    terms, rest = [], []
    for f in sp.Mul.make_args(q):
        if isinstance(f, sp.exp):
            terms.append(f.args[0])
        elif f.is_positive and not (expanded := sp.expand_log(sp.log(f), force=True)).has(sp.I):
            terms.append(expanded)
        else:
            rest.append(f)
    return sp.Add(*terms) + sp.log(sp.Mul(*rest))
