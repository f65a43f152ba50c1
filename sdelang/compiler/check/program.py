"""The program: settings (time interval, steps, v0, weighting, t sampling, prior), the SDE line(s), and what a
kind of SDE cannot have; returns the IR."""
from __future__ import annotations

import difflib
import keyword

import sympy as sp

from .. import syntax as ast
from ...errors import Span
from ..ir import CoupledProgram, Parameter, Program
from ..parse import RESERVED_WORDS
from .common import (BUILTIN_CONSTANTS, DEFAULT_EPS, DEFAULT_N, DEFAULT_T, FLOAT32_MAX, MAX_NAME_LENGTH, MAX_STEPS,
                     SHADOWED_MODULES, TIME, Scope, evaluate, names_in)


class ProgramPass:
    """Checks the settings and the SDE, builds the Program (or CoupledProgram)."""

    def program(self) -> Program:
        if not self.module.statements:
            raise self.error("the file is empty", Span(1, 1, 1, 2),
                             "a program needs at least 'sde NAME' and an SDE line, e.g. 'sde ou' and "
                             "'dx = -x dt + sqrt(2) dw'")
        singles = self.collect()
        header = singles.get(ast.Header)
        if header is None:
            raise self.error("the program has no 'sde NAME' line", Span(1, 1, 1, 2),
                             "start the file with a name, e.g. 'sde my_sde'")
        name = header.name
        if name.startswith("_") or keyword.iskeyword(name) or name in RESERVED_WORDS:
            why = "a Python keyword" if keyword.iskeyword(name) else (
                "a reserved word" if name in RESERVED_WORDS else "private in Python")
            raise self.error(f"'{name}' cannot name an SDE: it is {why}", header.name_span,
                             "the name becomes a Python module; choose another, e.g. 'sde my_sde'")
        if len(name) > MAX_NAME_LENGTH:
            raise self.error(f"the SDE's name is {len(name)} characters long, more than {MAX_NAME_LENGTH}",
                             header.name_span, f"the name becomes the file name <name>.py; shorten it to at most "
                             f"{MAX_NAME_LENGTH} characters")
        if name.lower() in SHADOWED_MODULES:
            raise self.error(f"'{name}' cannot name an SDE: {name}.py would shadow the module '{name.lower()}' for "
                             f"every program run beside it", header.name_span,
                             f"choose another name, e.g. 'sde {name}_sde'")
        if not self.sdes and not self.kernels:
            for st in self.module.statements:
                if isinstance(st, ast.ConstDef) and st.name.startswith("d") and {"dt", "dw"} & names_in(st.value):
                    raise self.error(f"'{st.name} = ...' is not a valid SDE line", st.span,
                                     "write the SDE as 'dx = <drift> dt + <diffusion> dw', with no operator "
                                     "before 'dt' or 'dw'")
            raise self.error("the program has no SDE line", header.span,
                             "add the forward SDE, e.g. 'dx = -x dt + sqrt(2) dw'")
        self.resolve_params()
        self._resolving = None
        # Lower every constant and helper once, in the order written, so that a mistake in one
        # is reported even if nothing uses it.
        for st in self.module.statements:
            if isinstance(st, ast.ConstDef):
                self._const(st.name, st.name_span)
            elif isinstance(st, ast.FunctionDef):
                self._function(st.name, st.name_span)
        symbols = {name: sp.Symbol(name, real=True) for name in self.sdes}

        eps, T = DEFAULT_EPS, DEFAULT_T
        time = singles.get(ast.TimeDef)
        if time is not None:
            if time.var != "t":
                raise self.error(f"the time variable is t, not '{time.var}'", time.var_span, "write 't in [eps, T]'")
            eps = self.lower(time.eps, self._constant_scope("eps"))
            T = self.lower(time.T, self._constant_scope("T"))
            eps_value, T_value = self.constant(time.eps, "eps"), self.constant(time.T, "T")
            if eps_value <= 0:
                raise self.error(f"eps must be positive, got {eps_value:g}", time.eps.span,
                                 "the kernel is singular at t = 0; a small eps such as 1e-5 is usual")
            if eps_value >= T_value:
                raise self.error(f"eps must be smaller than T, got eps = {eps_value:g} >= T = {T_value:g}",
                                 time.span, "write 't in [eps, T]' with 0 < eps < T")
            if T_value > FLOAT32_MAX:
                raise self.error(f"T = {T_value:g} is past float32's range, in which the generated modules compute",
                                 time.T.span, f"write T <= {FLOAT32_MAX:.2g}; a process over a longer time can be "
                                 "written in a time rescaled by a constant factor")
        eps_value, T_value = evaluate(self.with_defaults(eps)), evaluate(self.with_defaults(T))
        self.interval = (eps_value, T_value)  # for d/dt's check of jumps (check/expressions.py)

        N = DEFAULT_N
        steps = singles.get(ast.StepsDef)
        if steps is not None:
            n = self.constant(steps.value, "steps", fixed="steps is fixed by the file; write a number, e.g. 'steps 1000'")
            if n != int(n) or n < 1:
                raise self.error(f"steps must be a positive integer, got {n:g}", steps.value.span,
                                 "write a whole number of steps, e.g. 'steps 1000'")
            if n > MAX_STEPS:
                raise self.error(f"steps must be at most {MAX_STEPS:,}, got {n:,.0f}", steps.value.span,
                                 "samplers allocate per-step tensors; 1000 steps is usual, a few hundred "
                                 "thousand the most that is useful")
            N = int(n)

        weighting, weighting_expr = "likelihood", None
        wdef = singles.get(ast.WeightingDef)
        if wdef is not None:
            weighting = wdef.kind
            if wdef.expr is not None:
                self._check_weighting_word(wdef.expr)
                scope = Scope({}, "the weighting", allow_t_free=True, derivative_var=TIME)
                weighting_expr = self.lower(wdef.expr, scope)
                self._check_positive(weighting_expr, wdef.expr.span, eps_value, T_value, "the weighting",
                                     "lambda(t) must be positive on [eps, T]; or choose 'weighting likelihood' "
                                     "or 'weighting score_matching'")

        t_sampling = "uniform"
        sdef = singles.get(ast.SamplingDef)
        if sdef is not None:
            if sdef.var != "t":
                raise self.error(f"only the time t can be sampled, not '{sdef.var}'", sdef.var_span,
                                 "write 't ~ uniform' or 't ~ importance'")
            t_sampling = sdef.kind

        params = tuple(Parameter(name, self.param_defaults[name], self.param_symbols[name], st.name_span)
                       for name, st in self.params.items())
        sde_scope = Scope(symbols, "the SDE", allow_t_free=True, derivative_var=TIME)
        if len(self.sdes) > 1 or self.inits:
            prior = singles.get(ast.PriorDef)
            if prior is not None and prior.mean is not None:
                raise self.error("a coupled SDE takes no 'prior normal(...)': its prior is the kernel at T", prior.span,
                                 "write 'prior kernel' or leave the line out")
            if ast.V0Def in singles:
                raise self.error("a coupled SDE takes no 'v0'", singles[ast.V0Def].span,
                                 "give the auxiliary components initial laws instead, e.g. 'v(0) ~ normal(0, 1)'")
            if weighting == "custom":
                raise self.error("a coupled SDE takes 'weighting likelihood' or 'weighting score_matching'",
                                 wdef.span, "a custom lambda(t) is supported for one-component SDEs only")
            components = self._components(symbols, sde_scope, eps_value, T_value)
            return CoupledProgram(header.name, self.source, params, TIME, components, eps, T, N, weighting, t_sampling,
                                  sampled=tuple(self.sampled), helpers=self.helpers())

        if self.kernels:
            return self._given_program(header, singles, params, eps, T, eps_value, T_value, N, weighting,
                                       weighting_expr, t_sampling)
        x = symbols[self.state]
        sde = self.sdes[self.state]
        v0 = sp.Integer(0)
        v0_def = singles.get(ast.V0Def)
        if v0_def is not None:
            v0 = self.lower(v0_def.value, self._constant_scope("v0"))
            value = self.constant(v0_def.value, "v0")
            if value < 0:
                raise self.error(f"v0 is a variance and cannot be negative, got {value:g}", v0_def.value.span,
                                 "v0 is the variance of the noise in x(0); leave it out for v0 = 0")

        if sde.diffusion is None:
            raise self.error("an SDE without noise is not supported: the diffusion must be positive", sde.span,
                             "add a diffusion term: 'dx = <drift> dt + <diffusion> dw'")
        drift = self.lower(sde.drift, sde_scope) if sde.drift is not None else sp.Integer(0)
        diffusion = self.lower(sde.diffusion, sde_scope)
        drift_span = sde.drift.span if sde.drift is not None else sde.span
        affine = self._check_sde(drift, diffusion, x, drift_span, sde.diffusion.span, eps_value, T_value)

        prior = singles.get(ast.PriorDef)
        prior_mean, prior_variance = self._stated_prior(prior)
        if not affine:
            self._check_general(sde, diffusion, x, prior, wdef, weighting, sdef, t_sampling)
        return Program(header.name, self.source, params, TIME, x, drift, diffusion, eps, T, N, v0,
                       prior_mean, prior_variance, weighting, weighting_expr, t_sampling, drift_span,
                       sde.diffusion.span, affine=affine, sampled=tuple(self.sampled), helpers=self.helpers())

    def _stated_prior(self, prior: ast.PriorDef | None) -> tuple[sp.Expr | None, sp.Expr | None]:
        """The mean and variance of 'prior normal(mean, variance)'; (None, None) for the kernel's prior."""
        if prior is None or prior.mean is None:
            return None, None
        mean = self.lower(prior.mean, self._constant_scope("the prior mean"))
        variance = self.lower(prior.variance, self._constant_scope("the prior variance"))
        self.constant(prior.mean, "the prior mean")
        value = self.constant(prior.variance, "the prior variance")
        if value <= 0:
            raise self.error(f"the prior variance must be positive, got {value:g}", prior.variance.span,
                             "the second argument of normal(mean, variance) is a variance, e.g. normal(0, 1)")
        return mean, variance

    def _check_general(self, sde, diffusion, x, prior, wdef, weighting, sdef, t_sampling) -> None:
        """What an SDE without a Gaussian kernel cannot have, each refused where it is written."""
        why = ("the drift is not affine in x" if diffusion.free_symbols.isdisjoint({x}) else
               f"the diffusion depends on {x}")
        if prior is None or prior.mean is None:
            raise self.error(f"this SDE needs a stated prior: {why}, so there is no Gaussian kernel to derive "
                             f"it from", prior.span if prior is not None else sde.span,
                             "state the law at T, e.g. 'prior normal(0, 1)' (check it with 'sdelang check')")
        if t_sampling == "importance":
            raise self.error(f"importance sampling of t needs the kernel's variance v(t), and this SDE has no "
                             f"Gaussian kernel ({why})", sdef.span, "write 't ~ uniform' or leave the line out")
        if weighting == "score_matching":
            raise self.error(f"'weighting score_matching' is lambda = v(t), the kernel's variance, and this SDE "
                             f"has no Gaussian kernel ({why})", wdef.span,
                             "write 'weighting likelihood' (lambda = g^2) or a lambda(t) such as 'weighting 1'")
        if weighting == "likelihood" and diffusion.has(x):
            raise self.error(f"the likelihood weighting lambda = g^2 is a function of time only, but g depends "
                             f"on {x}", wdef.span if wdef is not None else sde.diffusion.span,
                             "give the weighting as a function of t, e.g. 'weighting 1'")

    def _check_weighting_word(self, expr: ast.Expr) -> None:
        """``weighting likelyhood``: a misspelled kind, not an undefined name in an expression."""
        if not isinstance(expr, ast.Name) or expr.id in (*self.params, *self.consts, *BUILTIN_CONSTANTS, "t"):
            return
        close = difflib.get_close_matches(expr.id, ["likelihood", "score_matching"], n=1)
        if close:
            raise self.error(f"unknown weighting '{expr.id}'", expr.span, f"did you mean '{close[0]}'?")
