"""A process given by its kernel, 'x(t) ~ normal(mean, variance)', or by its logSNR, 'logsnr(t) = expr'
(derive/from_kernel.py has the formulas).

The stated kernel must be one a diffusion has: on [eps, T] the mean coefficient alpha(t) finite and
positive (a = alpha'/alpha has a pole where alpha vanishes), the variance positive, and logSNR decreasing,
g^2 = -sigma^2 d/dt logSNR > 0. At t = 0 the kernel gives the initial law x(0) ~ N(alpha(0) x0 + c(0),
sigma(0)^2): v0 is sigma(0)^2, and alpha(0) must be finite and positive.
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from .. import syntax as ast
from ..derive.from_kernel import coefficients, from_log_snr
from ..derive.signs import jumps
from ..ir import GivenKernel, Program
from ..timelimit import call_with_time_limit
from .common import EVALUATE_SECONDS, TIME, evaluate
from .positivity import pole_hint

DATA = sp.Symbol("x(0)", real=True)  # the data in a kernel's mean; no name the user writes can produce it
_FLOAT64_WORDS = {"not a finite real number": "NaN or inf", "zero": "0", "negative": "a negative number"}


class GivenPass:
    """Checks a stated kernel or logSNR and builds the Program of the SDE derived from it."""

    def _given_program(self, header, singles, params, eps, T, eps_value, T_value, N, weighting, weighting_expr,
                       t_sampling) -> Program:
        st = self.kernels[0]
        if ast.V0Def in singles:
            raise self.error("a process given by its kernel takes no 'v0': v0 is the kernel's variance at t = 0",
                             singles[ast.V0Def].span, "leave the 'v0' line out")
        if isinstance(st, ast.LogSnrDef):
            given, mean_span, variance_span = self._log_snr_kernel(st), st.value.span, st.value.span
        else:
            given, mean_span, variance_span = self._stated_kernel(st), st.mean.span, st.variance.span
        self._check_kernel(given, eps_value, T_value, mean_span, variance_span)
        self._check_continuous(given, eps_value, T_value, mean_span, variance_span)
        a, b, g2 = coefficients(given.m, given.c, given.v, TIME, given.log_snr)
        self._check_coefficients(given, a, b, g2, eps_value, T_value, mean_span, variance_span)
        v0 = self._initial_variance(given, st.span)
        x = sp.Symbol(self.state, real=True)
        prior_mean, prior_variance = self._stated_prior(singles.get(ast.PriorDef))
        return Program(header.name, self.source, params, TIME, x, a * x + b, sp.sqrt(g2), eps, T, N, v0,
                       prior_mean, prior_variance, weighting, weighting_expr, t_sampling, mean_span, variance_span,
                       given=given, helpers=self.helpers())

    def _log_snr_kernel(self, st: ast.LogSnrDef) -> GivenKernel:
        if st.var != "t":
            raise self.error(f"logsnr is a function of the time t, not of '{st.var}'", st.var_span,
                             "write 'logsnr(t) = expr'")
        lam = self.lower(st.value, self.time_scope("logsnr(t)"))
        if not lam.has(TIME):
            raise self.error("logsnr(t) does not change with time, so no noise is ever added", st.value.span,
                             "logsnr must decrease on [eps, T], e.g. 'logsnr(t) = 10 - 20 * t'")
        m, c, v = from_log_snr(lam)
        return GivenKernel("logsnr", m, c, v, lam, st.span)

    def _stated_kernel(self, st: ast.KernelDef) -> GivenKernel:
        if st.time != "t":
            raise self.error(f"a kernel is the law of {st.var}(t) at the time t, not at '{st.time}'", st.time_span,
                             f"write '{st.var}(t) ~ normal(mean, variance)'")
        mean = self.lower(st.mean, self.time_scope("the kernel's mean", data={st.var: DATA}))
        v = self.lower(st.variance, self.time_scope("the kernel's variance"))
        m = sp.diff(mean, DATA)
        if m.has(DATA):
            raise self.error(f"the kernel's mean is not affine in the data {st.var}(0)", st.mean.span,
                             f"write the mean as alpha(t) * {st.var}(0) + c(t)")
        if m == 0:
            raise self.error(f"the kernel's mean does not depend on the data {st.var}(0)", st.mean.span,
                             f"write the mean as alpha(t) * {st.var}(0) + c(t) with alpha > 0, e.g. "
                             f"'(1 - t) * {st.var}(0)'")
        return GivenKernel("kernel", m, sp.expand(mean - m * DATA).xreplace({DATA: 0}), v, None, st.span)

    def _check_kernel(self, given: GivenKernel, eps: float, T: float, mean_span, variance_span) -> None:
        """alpha and sigma^2 finite and positive on [eps, T]."""
        grid = self._grid(eps, T)
        for expr, span, what in ((given.m, mean_span, "the mean coefficient alpha(t)"),
                                 (given.v, variance_span, "the variance sigma(t)^2")):
            values = self._on_grid(expr, eps, T)
            # At the ends, exactly as well: cos(pi t / 2) is 6e-17 at T = 1 in float64, 0 in fact (a pole of the
            # drift at T, and a module whose logSNR is -inf there).
            for i in (0, len(grid) - 1):
                exact = self._exactly_at(expr, grid[i])
                if exact is not None and exact <= 0:
                    values[i] = exact
            bad = ~(np.isfinite(values) & (values > 0))
            if bad.any():
                i = np.flatnonzero(bad)[0]
                word = ("not a finite real number" if not np.isfinite(values[i]) else
                        "zero" if values[i] == 0 else "negative")
                exact = self._exactly_at(expr, grid[i])
                if exact is not None and exact > 0:
                    # Positive in exact arithmetic: the formula as written loses every digit in float64 there (Chen's
                    # sigmoid schedule at tau = 0.1 has alpha^2 = (sigmoid(30) - sigmoid(29.94)) / ... = 5.8e-15 at
                    # t = 0.999, a difference of two numbers within 1e-13 of 1). Not a pole, as the hint said.
                    raise self.error(f"{what} is {exact:.3g} at t = {grid[i]:.6g}{self.at_defaults()}, but this "
                                     f"formula gives {_FLOAT64_WORDS[word]} in float64 there: it cancels (a "
                                     f"difference of nearly equal numbers)", span,
                                     "write it in a form that keeps its digits (e.g. 1 - sigmoid(u) as sigmoid(-u)), "
                                     "or choose parameters or an interval where it is not so small")
                if what.startswith("the mean"):
                    hint = "the drift a = alpha'/alpha has a pole where alpha vanishes; " + pole_hint(eps, grid[i])
                else:
                    hint = "sigma(t) must be positive on [eps, T]: the kernel adds noise at every t > 0"
                raise self.error(f"{what} is {word} at t = {grid[i]:.6g}{self.at_defaults()}", span, hint)

    def _check_continuous(self, given: GivenKernel, eps: float, T: float, mean_span, variance_span) -> None:
        """No jump of a sign(u) in alpha, sigma^2 or logSNR: a diffusion's kernel is continuous in t."""
        parts = ((given.log_snr, mean_span, "logsnr(t)"),) if given.form == "logsnr" else (
            (given.m, mean_span, "the mean coefficient alpha(t)"), (given.c, mean_span, "the kernel's mean"),
            (given.v, variance_span, "the variance sigma(t)^2"))
        for expr, span, what in parts:
            if not expr.has(sp.sign):
                continue
            where = jumps(expr, TIME, eps, T, self._defaults())
            if where is None:
                self.sampled.append(f"{what} was not checked for jumps: SymPy could not list the zeros of the "
                                    f"arguments of sign in [eps, T]")
            elif where:
                raise self.error(f"{what} jumps at t = {where[0]:.6g}{self.at_defaults()}: no diffusion has this "
                                 f"kernel", span, "a kernel changes continuously with t; where the formula changes "
                                 "at sign(u) = 0, make both sides agree there (e.g. sign(u) * log(1 + |u|))")

    def _exactly_at(self, expr: sp.Expr, t: float) -> float | None:
        """expr at the defaults (as the exact decimals they are written as) and t, to 30 digits; None if that is not
        a finite real number or takes too long."""
        exact = {self.param_symbols[k]: sp.Rational(repr(float(v))) for k, v in self.param_defaults.items()
                 if k in self.param_symbols}
        return evaluate(expr.xreplace(exact).xreplace({TIME: sp.Rational(repr(float(t)))}))

    def _check_coefficients(self, given, a, b, g2, eps, T, mean_span, variance_span) -> None:
        """The derived drift finite and g^2 > 0 (logSNR decreasing) on [eps, T]."""
        grid = self._grid(eps, T)
        for part, what in ((a, "the drift a(t) = alpha'/alpha"), (b, "the drift's offset b(t) = c' - a c")):
            values = self._on_grid(part, eps, T)
            if not np.all(np.isfinite(values)):
                bad = grid[~np.isfinite(values)][0]
                raise self.error(f"{what} of this kernel is not finite at t = {bad:.6g}", mean_span,
                                 pole_hint(eps, bad))
        values = self._on_grid(g2, eps, T)
        if not np.all(values > 0):  # NaN included
            i = np.flatnonzero(~(values > 0))[0]
            if given.form == "logsnr":
                change = ("increases" if values[i] < 0 else "stops decreasing (its derivative is 0)" if values[i] == 0
                          else "has no finite derivative")
                message = f"logsnr(t) {change} at t = {grid[i]:.6g}: no diffusion has this kernel"
                hint = ("the noise grows relative to the signal, so logsnr must decrease on [eps, T]" if values[i] != 0
                        else f"g(t)^2 = -sigma^2 logsnr' is 0 there; logsnr must decrease strictly on [eps, T]: "
                             f"{pole_hint(eps, grid[i]).replace('the pole', 'that time')}")
            else:
                message = (f"the kernel's logSNR = log(alpha^2 / sigma^2) does not decrease at t = {grid[i]:.6g} "
                           f"(g(t)^2 = (sigma^2)' - 2 a sigma^2 = {values[i]:.3g}): no diffusion has this kernel")
                hint = "sigma(t) / alpha(t) must increase on [eps, T]; choose an interval where it does"
            raise self.error(message + self.at_defaults(), variance_span, hint)

    def _initial_variance(self, given: GivenKernel, span) -> sp.Expr:
        """v0 = sigma(0)^2 (a limit where the formula is not defined at 0), once alpha(0) is finite and positive."""
        values = {}
        for name, expr in (("alpha", given.m), ("the variance", given.v)):
            at_zero = _at_zero(expr)
            number = evaluate(at_zero.subs(self._defaults())) if at_zero is not None else None
            if number is None or number < 0 or (name == "alpha" and number == 0):
                value = "not a finite real number" if number is None else f"{number:g}"
                raise self.error(f"the kernel has no initial law: {name} at t = 0 is {value}", span,
                                 "the process starts at t = 0 from N(alpha(0) x(0), sigma(0)^2): alpha(0) must be "
                                 "positive and finite, sigma(0) finite")
            values[name] = at_zero
        return values["the variance"]


def _at_zero(expr: sp.Expr) -> sp.Expr | None:
    value = expr.xreplace({TIME: sp.Integer(0)})
    if value.has(sp.nan, sp.zoo, sp.oo, -sp.oo):
        done, value = call_with_time_limit(EVALUATE_SECONDS, sp.limit, expr, TIME, 0, "+")
        if not done or value is None or value.has(sp.nan, sp.zoo, sp.oo, -sp.oo, sp.Limit):
            return None
    return value
