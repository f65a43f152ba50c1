"""Checks of a process given by its kernel, 'x(t) ~ normal(mean, variance)', or by its logSNR,
'logsnr(t) = expr' (derive/from_kernel.py has the formulas).

The stated kernel must be one a diffusion has: on [eps, T] the mean coefficient alpha(t) is finite and
positive (a = alpha'/alpha has a pole where alpha vanishes), the variance positive, and logSNR decreasing,
g^2 = -sigma^2 d/dt logSNR > 0. At t = 0 the kernel gives the initial law x(0) ~ N(alpha(0) x0 + c(0),
sigma(0)^2): v0 is sigma(0)^2 and alpha(0) must be finite and positive.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from . import syntax as ast
from ..errors import SdeError, Span
from .derive.from_kernel import coefficients, from_log_snr
from .ir import GivenKernel
from .timelimit import call_with_time_limit

DATA = sp.Symbol("x0", real=True)  # the data x(0) in a kernel's mean; a Symbol no user name can produce
LIMIT_SECONDS = 5.0
POLE_HINT = "the interval must stop before the pole, e.g. 't in [{eps}, {T}]'"


def given(checker, st: ast.KernelDef | ast.LogSnrDef, time: sp.Symbol, eps: float, T: float) -> tuple[
        GivenKernel, sp.Expr, sp.Expr, sp.Expr]:
    """The kernel a program states, checked, with the SDE derived from it: (kernel, a, b, g^2)."""
    if isinstance(st, ast.LogSnrDef):
        if st.var != "t":
            raise checker.error(f"logsnr is a function of the time t, not of '{st.var}'", st.var_span,
                                "write 'logsnr(t) = expr'")
        lam = checker.lower(st.value, checker.time_scope("logsnr(t)"))
        if not lam.has(time):
            raise checker.error("logsnr(t) does not change with time: no noise is ever added", st.value.span,
                                "logsnr must decrease on [eps, T], e.g. 'logsnr(t) = 10 - 20 * t'")
        m, c, v = from_log_snr(lam)
        kernel = GivenKernel("logsnr", m, c, v, lam, st.span)
        mean_span = variance_span = st.value.span
    else:
        if st.time != "t":
            raise checker.error(f"a kernel is the law of {st.var}(t) at the time t, not at '{st.time}'",
                                st.time_span, f"write '{st.var}(t) ~ normal(mean, variance)'")
        mean = checker.lower(st.mean, checker.time_scope("the kernel's mean", data={st.var: DATA}))
        v = checker.lower(st.variance, checker.time_scope("the kernel's variance"))
        m = sp.diff(mean, DATA)
        if m.has(DATA):
            raise checker.error(f"the kernel's mean is not affine in the data {st.var}(0)", st.mean.span,
                                f"write the mean as alpha(t) * {st.var}(0) + c(t)")
        if m == 0:
            raise checker.error(f"the kernel's mean does not depend on the data {st.var}(0)", st.mean.span,
                                f"the mean is alpha(t) * {st.var}(0) + c(t) with alpha > 0, e.g. "
                                f"'(1 - t) * {st.var}(0)'")
        c = sp.expand(mean - m * DATA) if mean.has(DATA) else mean
        c = sp.simplify(c) if c.has(DATA) else c
        kernel = GivenKernel("kernel", m, c, v, None, st.span)
        mean_span, variance_span = st.mean.span, st.variance.span
    _check_on_interval(checker, kernel, time, eps, T, mean_span, variance_span)
    a, b, g2 = coefficients(kernel.m, kernel.c, kernel.v, time, kernel.log_snr)
    for part, what in ((a, "the drift a(t) = alpha'/alpha"), (b, "the drift's offset b(t) = c' - a c")):
        values = checker._on_grid(part, eps, T)
        if not np.all(np.isfinite(values)):
            bad = checker._grid(eps, T)[~np.isfinite(values)][0]
            raise checker.error(f"{what} of this kernel is not finite at t = {bad:.6g}", mean_span,
                                POLE_HINT.format(eps=f"{eps:g}", T=f"{_before(bad, eps):g}"))
    values = checker._on_grid(g2, eps, T)
    grid = checker._grid(eps, T)
    if not np.all(values > 0):  # NaN included
        i = np.flatnonzero(~(values > 0))[0]
        if kernel.form == "logsnr":
            message = f"logsnr(t) increases at t = {grid[i]:.6g}: no diffusion has this kernel"
            hint = "the noise grows relative to the signal, so logsnr must decrease on [eps, T]"
        else:
            message = (f"the kernel's logSNR = log(alpha^2 / sigma^2) increases at t = {grid[i]:.6g}, where "
                       f"g(t)^2 = (sigma^2)' - 2 a sigma^2 = {values[i]:.3g}: no diffusion has this kernel")
            hint = "sigma(t) / alpha(t) must increase on [eps, T]; choose an interval where it does"
        raise checker.error(message + checker.at_defaults(), variance_span, hint)
    return kernel, a, b, g2


def initial_variance(checker, kernel: GivenKernel, time: sp.Symbol, span: Span) -> sp.Expr:
    """v0 = sigma(0)^2, the kernel's variance at t = 0 (as a limit where it is not defined there), after
    checking that alpha(0) is finite and positive: the SDE starts from x(0) ~ N(alpha(0) x0 + c(0), v0)."""
    values = {}
    for name, expr in (("alpha", kernel.m), ("the variance", kernel.v)):
        at_zero = _at_zero(expr, time)
        number = checker.evaluate(at_zero.subs(checker._defaults())) if at_zero is not None else None
        if number is None or (name == "alpha" and number <= 0) or number < 0:
            raise checker.error(f"the kernel has no finite initial law: {name} at t = 0 is "
                                f"{'not a finite real number' if number is None else f'{number:g}'}", span,
                                "the process starts at t = 0 from N(alpha(0) x(0), sigma(0)^2): alpha(0) must be "
                                "positive and finite, sigma(0) finite")
        values[name] = at_zero
    return sp.simplify(values["the variance"])


def _check_on_interval(checker, kernel, time, eps, T, mean_span, variance_span) -> None:
    grid = checker._grid(eps, T)
    for expr, span, what in ((kernel.m, mean_span, "the mean coefficient alpha(t)"),
                             (kernel.v, variance_span, "the variance sigma(t)^2")):
        values = checker._on_grid(expr, eps, T)
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            i = np.flatnonzero(bad)[0]
            word = ("not a finite real number" if not np.isfinite(values[i]) else
                    "zero" if values[i] == 0 else "negative")
            if what.startswith("the mean") and kernel.form == "kernel":
                hint = ("the drift a = alpha'/alpha has a pole where alpha vanishes; "
                        + POLE_HINT.format(eps=f"{eps:g}", T=f"{_before(grid[i], eps):g}"))
            else:
                hint = "sigma(t) must be positive on [eps, T]: the kernel adds noise at every t > 0"
            raise checker.error(f"{what} is {word} at t = {grid[i]:.6g}{checker.at_defaults()}", span, hint)


def _before(bad: float, eps: float) -> float:
    """A round end point below ``bad``: 0.999 for a pole at 1."""
    return float(f"{bad - max(bad * 1e-3, eps):.3g}")


def _at_zero(expr: sp.Expr, time: sp.Symbol) -> sp.Expr | None:
    value = expr.subs(time, 0)
    if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        done, value = call_with_time_limit(LIMIT_SECONDS, sp.limit, expr, time, 0, "+")
        if not done or value is None or value.has(sp.nan, sp.zoo, sp.oo, -sp.oo, sp.Limit):
            return None
    return value
