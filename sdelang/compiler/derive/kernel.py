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

from dataclasses import dataclass

import sympy as sp

from .symbolic import Accuracy, integrate_from, is_closed, rewrites, simplest
from .tables import Tables

# The largest float32 relative error on [eps, T] accepted from a closed-form variance: the issue's
# bound on sigma in float32 is 1e-5 relative, and sigma's error is half of v's.
CLOSED_FORM_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Kernel:
    m: sp.Expr      # mean coefficient
    c: sp.Expr      # mean offset
    v: sp.Expr      # variance
    std: sp.Expr    # sqrt(v)

    @property
    def closed_form(self) -> bool:
        return all(is_closed(e) for e in (self.m, self.c, self.v))


def kernel(a: sp.Expr, b: sp.Expr, g2: sp.Expr, v0: sp.Expr, t: sp.Symbol, accuracy: Accuracy) -> Kernel:
    """Of the equivalent forms found for v and sigma, keep the one most accurate in float32."""
    zero = sp.Integer(0)
    A = integrate_from(a, t, zero, t)
    m = sp.exp(simplest(A))
    if b == 0:
        c = zero
    else:
        c = simplest(m * integrate_from(b / m, t, zero, t))
    integrand = simplest(g2 / m**2)
    noise = integrate_from(integrand, t, zero, t)
    vs = rewrites(m**2 * (v0 + noise))
    v = accuracy.best(vs, t)
    if accuracy.float32_error(v, t) > CLOSED_FORM_TOLERANCE:
        # Every closed form found cancels near t = eps (e.g. e^x - 1 - x when g(0) = 0 and a != 0):
        # quadrature of the integral itself cannot, so it replaces them.
        vs = [m**2 * (v0 + integrate_from(integrand, t, zero, t, closed=False))]
        v = vs[0]
    stds = [sp.sqrt(u) for u in vs] + [simplest(sp.sqrt(v))]
    return Kernel(m, c, v, accuracy.best(stds, t))


def tabulate_kernel(k: Kernel, t: sp.Symbol, tables: Tables) -> Kernel:
    """The kernel with each quantity that has no closed form read from a table: log m, c and log v
    (logs: m and v are positive and span many orders of magnitude; a log keeps their relative error)."""
    m, c, v, std = k.m, k.c, k.v, k.std
    if not is_closed(m):
        m = sp.exp(tables.tabulate(sp.expand_log(sp.log(m), force=True), "log m(t)", absolute=True))
    if not is_closed(c):
        c = tables.tabulate(c, "c(t)", absolute=False)
    if not is_closed(v):
        log_v = tables.tabulate(sp.expand_log(sp.log(v), force=True), "log v(t)", absolute=True)
        v, std = sp.exp(log_v), sp.exp(log_v / 2)
    return Kernel(m, c, v, std)
