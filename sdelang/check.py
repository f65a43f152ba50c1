"""Stage 2: AST -> IR. Resolves names, inlines helpers and checks the program.

Every user mistake found here is an :class:`SdeError` pointing at the offending
expression: undefined or misspelled names, wrong arity, redefinitions, bad
settings (eps >= T, steps not a positive integer), a zero or negative
diffusion, a negative weighting, and the features not supported yet (a drift
that is not affine in x, a diffusion that depends on x).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import syntax as ast
from .errors import SdeError, Source, Span
from .ir import Parameter, Program

DEFAULT_EPS = sp.Rational(1, 100000)
DEFAULT_T = sp.Integer(1)
DEFAULT_N = 1000

TIME = sp.Symbol("t", positive=True)
# The checker names the state after the SDE line (dx -> x); generated code always calls it x.


def _sigmoid(u):
    return 1 / (1 + sp.exp(-u))


BUILTINS = {
    "exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan,
    "tanh": sp.tanh, "sinh": sp.sinh, "cosh": sp.cosh, "atan": sp.atan, "abs": sp.Abs,
    "log1p": lambda u: sp.log(1 + u), "expm1": lambda u: sp.exp(u) - 1,
    "sigmoid": _sigmoid, "softplus": lambda u: sp.log(1 + sp.exp(u)),
}
BUILTIN_CONSTANTS = {"pi": sp.pi}
# Names the checker refuses as user definitions, with the reason.
RESERVED = {"t": "the time variable", **{k: "a builtin function" for k in BUILTINS},
            "pi": "a builtin constant"}
GRID_POINTS = 257  # where positivity of g(t) and lambda(t) is checked on [eps, T]


@dataclass
class _Scope:
    """What an expression may refer to: bound variables and the context's name."""

    bound: dict[str, sp.Expr]
    context: str                    # e.g. "the drift", "function 'beta'"
    allow_t_free: bool = False      # may it use the global t?
    derivative_var: sp.Symbol | None = None
    state: str | None = None


@dataclass
class _Checker:
    source: Source
    module: ast.Module
    params: dict[str, ast.ParamDef] = field(default_factory=dict)
    consts: dict[str, ast.ConstDef] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    param_symbols: dict[str, sp.Symbol] = field(default_factory=dict)
    param_defaults: dict[str, float] = field(default_factory=dict)
    _const_values: dict[str, sp.Expr] = field(default_factory=dict)
    _function_bodies: dict[str, tuple[tuple[sp.Dummy, ...], sp.Expr]] = field(default_factory=dict)
    _in_progress: list[str] = field(default_factory=list)
    overrides: dict[str, float] = field(default_factory=dict)

    def error(self, message: str, span: Span | None, hint: str | None = None) -> SdeError:
        return SdeError(message, span, self.source, hint)

    # -- definitions ---------------------------------------------------------

    def collect(self) -> dict[type, ast.Statement]:
        singles: dict[type, ast.Statement] = {}
        where: dict[str, Span] = {}
        state_name = None
        for st in self.module.statements:
            if isinstance(st, (ast.ParamDef, ast.ConstDef, ast.FunctionDef)):
                self._define(st, where)
            else:
                kind = type(st)
                if kind in singles:
                    first = singles[kind].span
                    raise self.error(f"{_DESCRIBE[kind]} is already given on line {first.line}", st.span,
                                     "give it once")
                singles[kind] = st
                if isinstance(st, ast.SdeDef):
                    state_name = self._state_name(st)
        if state_name is not None and state_name in where:
            raise self.error(f"'{state_name}' is the state variable of the SDE and cannot be redefined",
                             where[state_name])
        return singles

    def _define(self, st, where: dict[str, Span]) -> None:
        name = st.name
        if name in RESERVED:
            raise self.error(f"'{name}' is {RESERVED[name]} and cannot be redefined", st.name_span,
                             "choose another name")
        if name in where:
            raise self.error(f"'{name}' is already defined on line {where[name].line}", st.name_span,
                             "each name is defined once; rename one of them")
        where[name] = st.name_span
        if isinstance(st, ast.ParamDef):
            self.params[name] = st
        elif isinstance(st, ast.ConstDef):
            self.consts[name] = st
        else:
            seen: set[str] = set()
            for arg, span in zip(st.args, st.arg_spans):
                if arg in seen:
                    raise self.error(f"argument '{arg}' appears twice in function '{name}'", span)
                if arg in BUILTINS or arg == "pi":
                    raise self.error(f"'{arg}' is {RESERVED[arg]} and cannot be an argument name", span)
                seen.add(arg)
            self.functions[name] = st

    def _state_name(self, st: ast.SdeDef) -> str:
        d = st.differential
        if len(d) < 2 or not d.startswith("d") or d[1:] in ("t", "w"):
            raise self.error(f"'{d}' is not the differential of a state variable", st.name_span,
                             "write the SDE as 'dx = <drift> dt + <diffusion> dw'")
        state = d[1:]
        if state in RESERVED:
            raise self.error(f"the state cannot be called '{state}': it is {RESERVED[state]}", st.name_span)
        return state

    def resolve_params(self) -> None:
        unknown = sorted(set(self.overrides) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise self.error(f"unknown parameter '{unknown[0]}' (the parameters are: {known})", None)
        for name, st in self.params.items():
            value = self.constant(st.value, f"the default of parameter '{name}'", params_allowed=False)
            if name in self.overrides:
                value = float(self.overrides[name])
                if not math.isfinite(value):
                    raise self.error(f"parameter '{name}' must be finite, got {value}", None)
            self.param_defaults[name] = value
            assumptions = {"positive": True} if value > 0 else {"real": True}
            self.param_symbols[name] = sp.Symbol(name, **assumptions)

    # -- expressions ---------------------------------------------------------

    def lower(self, expr: ast.Expr, scope: _Scope) -> sp.Expr:
        if isinstance(expr, ast.Number):
            return sp.Rational(expr.text)
        if isinstance(expr, ast.Name):
            return self._name(expr, scope)
        if isinstance(expr, ast.Neg):
            return -self.lower(expr.operand, scope)
        if isinstance(expr, ast.BinOp):
            left, right = self.lower(expr.left, scope), self.lower(expr.right, scope)
            if expr.op == "/" and right == 0:
                raise self.error("division by zero", expr.right.span)
            return {"+": sp.Add, "-": lambda a, b: a - b, "*": sp.Mul, "/": lambda a, b: a / b,
                    "^": sp.Pow}[expr.op](left, right)
        if isinstance(expr, ast.Call):
            return self._call(expr, scope)
        if isinstance(expr, ast.Derivative):
            if scope.derivative_var is None:
                raise self.error(f"d/dt needs the time t, which {scope.context} does not have", expr.span,
                                 "take derivatives in the drift, the diffusion, the weighting, or inside "
                                 "a helper function whose argument is named t")
            return sp.diff(self.lower(expr.expr, scope), scope.derivative_var)
        raise AssertionError(f"unknown expression node {expr!r}")

    def _name(self, expr: ast.Name, scope: _Scope) -> sp.Expr:
        name = expr.id
        if name in scope.bound:
            return scope.bound[name]
        if name == "t":
            if scope.allow_t_free:
                return TIME
            raise self.error(f"{scope.context} cannot depend on the time t", expr.span,
                             "only the drift, the diffusion, the weighting and helper functions "
                             "with an argument named t may use t")
        if scope.state is not None and name == scope.state:
            raise self.error(f"{scope.context} cannot depend on the state {name}", expr.span)
        if name in self.param_symbols:
            return self.param_symbols[name]
        if name in self.params:  # a parameter default that refers to a parameter
            raise self.error(f"{scope.context} must be a number; it cannot use parameter '{name}'", expr.span,
                             "parameter defaults are constants; use a constant 'name = expr' for derived values")
        if name in self.consts:
            return self._const(name, expr.span)
        if name in BUILTIN_CONSTANTS:
            return BUILTIN_CONSTANTS[name]
        if name in self.functions or name in BUILTINS:
            raise self.error(f"'{name}' is a function; call it with arguments, e.g. {name}(t)", expr.span)
        raise self._undefined(name, expr.span, scope)

    def _undefined(self, name: str, span: Span, scope: _Scope) -> SdeError:
        known = [*scope.bound, *self.params, *self.consts, *self.functions, *BUILTINS, *BUILTIN_CONSTANTS]
        if scope.allow_t_free:
            known.append("t")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "define it with 'param', 'name = expr' or 'name(t) = expr'"
        return self.error(f"undefined name '{name}'", span, hint)

    def _const(self, name: str, span: Span) -> sp.Expr:
        if name not in self._const_values:
            self._enter(name, span)
            st = self.consts[name]
            self._const_values[name] = self.lower(st.value, _Scope({}, f"constant '{name}'"))
            self._in_progress.pop()
        return self._const_values[name]

    def _enter(self, name: str, span: Span) -> None:
        if name in self._in_progress:
            cycle = " -> ".join(self._in_progress[self._in_progress.index(name):] + [name])
            raise self.error(f"'{name}' is defined in terms of itself ({cycle})", span,
                             "definitions cannot be recursive")
        self._in_progress.append(name)

    def _call(self, expr: ast.Call, scope: _Scope) -> sp.Expr:
        name = expr.func
        args = [self.lower(a, scope) for a in expr.args]
        if name in BUILTINS:
            if len(args) != 1:
                raise self.error(f"'{name}' takes 1 argument, got {len(args)}", expr.span)
            return BUILTINS[name](args[0])
        if name in self.functions:
            formals, body = self._function(name, expr.func_span)
            if len(args) != len(formals):
                st = self.functions[name]
                raise self.error(f"'{name}' takes {len(formals)} argument{'s' * (len(formals) != 1)} "
                                 f"({', '.join(st.args)}), got {len(args)}", expr.span)
            return body.xreplace(dict(zip(formals, args)))
        if name in self.params or name in self.consts or name in BUILTIN_CONSTANTS or name == "t":
            raise self.error(f"'{name}' is not a function", expr.func_span,
                             "multiplication is explicit: write 'a * (b)', not 'a(b)'")
        raise self._undefined(name, expr.func_span, scope)

    def _function(self, name: str, span: Span) -> tuple[tuple[sp.Dummy, ...], sp.Expr]:
        if name not in self._function_bodies:
            self._enter(name, span)
            st = self.functions[name]
            formals = tuple(sp.Dummy(a, real=True) for a in st.args)
            bound = dict(zip(st.args, formals))
            t_var = bound.get("t")
            scope = _Scope(bound, f"function '{name}'", derivative_var=t_var)
            self._function_bodies[name] = (formals, self.lower(st.body, scope))
            self._in_progress.pop()
        return self._function_bodies[name]

    def constant(self, expr: ast.Expr, context: str, params_allowed: bool = True) -> float:
        """Lower a constant expression and evaluate it at the parameters' defaults."""
        value = self.lower(expr, _Scope({}, context))
        if not params_allowed and value.free_symbols:
            raise self.error(f"{context} must be a number", expr.span)
        number = _evaluate(value.subs(self._defaults()))
        if number is None:
            raise self.error(f"{context} is not a finite real number", expr.span)
        return number

    def _defaults(self) -> dict[sp.Symbol, float]:
        return {self.param_symbols[k]: v for k, v in self.param_defaults.items()}

    # -- the program ---------------------------------------------------------

    def program(self) -> Program:
        singles = self.collect()
        header = singles.get(ast.Header)
        if header is None:
            raise self.error("the program has no 'sde NAME' line", Span(1, 1, 1, 2),
                             "start the file with a name, e.g. 'sde my_sde'")
        if not header.name.isidentifier() or header.name.startswith("_"):
            raise self.error(f"'{header.name}' cannot name an SDE", header.name_span)
        sde = singles.get(ast.SdeDef)
        if sde is None:
            raise self.error("the program has no SDE line", header.span,
                             "add the forward SDE, e.g. 'dx = -x dt + sqrt(2) dw'")
        state = self._state_name(sde)
        self.resolve_params()
        x = sp.Symbol(state, real=True)

        eps, T = DEFAULT_EPS, DEFAULT_T
        time = singles.get(ast.TimeDef)
        if time is not None:
            if time.var != "t":
                raise self.error(f"the time variable is t, not '{time.var}'", time.var_span, "write 't in [eps, T]'")
            eps = self.lower(time.eps, _Scope({}, "eps"))
            T = self.lower(time.T, _Scope({}, "T"))
            eps_value, T_value = self.constant(time.eps, "eps"), self.constant(time.T, "T")
            if eps_value <= 0:
                raise self.error(f"eps must be positive, got {eps_value:g}", time.eps.span,
                                 "the kernel is singular at t = 0; a small eps such as 1e-5 is usual")
            if eps_value >= T_value:
                raise self.error(f"eps must be smaller than T, got eps = {eps_value:g} >= T = {T_value:g}",
                                 time.span, "write 't in [eps, T]' with 0 < eps < T")
        eps_value, T_value = _evaluate(eps.subs(self._defaults())), _evaluate(T.subs(self._defaults()))

        N = DEFAULT_N
        steps = singles.get(ast.StepsDef)
        if steps is not None:
            n = self.constant(steps.value, "steps", params_allowed=False)
            if n != int(n) or n < 1:
                raise self.error(f"steps must be a positive integer, got {n:g}", steps.value.span)
            N = int(n)

        v0 = sp.Integer(0)
        v0_def = singles.get(ast.V0Def)
        if v0_def is not None:
            v0 = self.lower(v0_def.value, _Scope({}, "v0"))
            if self.constant(v0_def.value, "v0") < 0:
                raise self.error("v0 is a variance and cannot be negative", v0_def.value.span)

        sde_scope = _Scope({}, "the SDE", allow_t_free=True, derivative_var=TIME)
        sde_scope.bound[state] = x
        if sde.diffusion is None:
            raise self.error("the SDE has no noise term", sde.span,
                             "add a diffusion: 'dx = <drift> dt + <diffusion> dw'")
        drift = self.lower(sde.drift, sde_scope) if sde.drift is not None else sp.Integer(0)
        diffusion = self.lower(sde.diffusion, sde_scope)
        drift_span = sde.drift.span if sde.drift is not None else sde.span
        self._check_sde(drift, diffusion, x, drift_span, sde.diffusion.span, eps_value, T_value)

        prior_mean = prior_variance = None
        prior = singles.get(ast.PriorDef)
        if prior is not None and prior.mean is not None:
            prior_mean = self.lower(prior.mean, _Scope({}, "the prior mean"))
            prior_variance = self.lower(prior.variance, _Scope({}, "the prior variance"))
            self.constant(prior.mean, "the prior mean")
            if self.constant(prior.variance, "the prior variance") <= 0:
                raise self.error("the prior variance must be positive", prior.variance.span,
                                 "the second argument of normal(mean, variance) is a variance")

        weighting, weighting_expr = "likelihood", None
        wdef = singles.get(ast.WeightingDef)
        if wdef is not None:
            weighting = wdef.kind
            if wdef.expr is not None:
                scope = _Scope({}, "the weighting", allow_t_free=True, derivative_var=TIME, state=state)
                weighting_expr = self.lower(wdef.expr, scope)
                self._check_positive(weighting_expr, wdef.expr.span, eps_value, T_value, "the weighting",
                                     "a weighting lambda(t) must be positive on [eps, T]")

        t_sampling = "uniform"
        sdef = singles.get(ast.SamplingDef)
        if sdef is not None:
            if sdef.var != "t":
                raise self.error(f"only the time t can be sampled, not '{sdef.var}'", sdef.var_span,
                                 "write 't ~ uniform' or 't ~ importance'")
            t_sampling = sdef.kind

        params = tuple(Parameter(name, self.param_defaults[name], self.param_symbols[name], st.name_span)
                       for name, st in self.params.items())
        return Program(header.name, self.source, params, TIME, x, drift, diffusion, eps, T, N, v0,
                       prior_mean, prior_variance, weighting, weighting_expr, t_sampling, drift_span,
                       sde.diffusion.span)

    def _check_sde(self, drift, diffusion, x, drift_span, diffusion_span, eps, T) -> None:
        slope = sp.diff(drift, x)
        if slope.has(x) and sp.simplify(slope).has(x):
            raise self.error("the drift is not affine in x: only drifts a(t) * x + b(t) are supported yet",
                             drift_span, "non-linear drifts are planned; write the drift as a(t) * x + b(t)")
        if diffusion.has(x):
            raise self.error("the diffusion depends on x: only a diffusion g(t) is supported yet",
                             diffusion_span, "state-dependent diffusions are planned; write g as a function of t")
        if diffusion == 0:
            raise self.error("the diffusion is zero", diffusion_span,
                             "an SDE needs noise: give a positive g(t) before 'dw'")
        self._check_positive(diffusion, diffusion_span, eps, T, "the diffusion",
                             "g(t) must be positive on [eps, T]; write it as a square root, e.g. sqrt(beta(t))")
        for part, name in ((slope, "the drift"), (drift.subs(x, 0), "the drift")):
            values = self._on_grid(part, eps, T)
            if not np.all(np.isfinite(values)):
                bad = self._grid(eps, T)[~np.isfinite(values)][0]
                raise self.error(f"{name} is not finite at t = {bad:.6g}", drift_span,
                                 "choose [eps, T] inside the drift's domain")

    def _grid(self, eps: float, T: float) -> np.ndarray:
        return np.linspace(eps, T, GRID_POINTS)

    def _on_grid(self, expr: sp.Expr, eps: float, T: float) -> np.ndarray:
        expr = expr.subs(self._defaults())
        fn = sp.lambdify(TIME, expr, modules="numpy")
        with np.errstate(all="ignore"):
            values = np.asarray(fn(self._grid(eps, T)), dtype=complex) * np.ones(GRID_POINTS)
        real = values.real.copy()
        real[np.abs(values.imag) > 1e-12 * (1 + np.abs(values.real))] = np.nan
        return real

    def _check_positive(self, expr, span, eps, T, what, hint) -> None:
        values = self._on_grid(expr, eps, T)
        grid = self._grid(eps, T)
        if not np.all(np.isfinite(values)):
            bad = grid[~np.isfinite(values)][0]
            raise self.error(f"{what} is not a finite real number at t = {bad:.6g}", span, hint)
        if np.any(values <= 0):
            bad = grid[values <= 0][0]
            word = "zero" if np.all(values == 0) else "negative or zero"
            raise self.error(f"{what} is {word} at t = {bad:.6g} (with the default parameters)", span, hint)


_DESCRIBE = {ast.Header: "the 'sde NAME' line", ast.SdeDef: "the SDE", ast.TimeDef: "the time interval",
             ast.StepsDef: "'steps'", ast.V0Def: "'v0'", ast.PriorDef: "the prior",
             ast.WeightingDef: "the weighting", ast.SamplingDef: "the t sampling"}


def _evaluate(expr: sp.Expr) -> float | None:
    """A finite real float, or None."""
    try:
        value = complex(sp.N(expr, 30))
    except (TypeError, ValueError):
        return None
    if abs(value.imag) > 1e-12 * (1 + abs(value.real)) or not math.isfinite(value.real):
        return None
    return value.real


def check(module: ast.Module, source: Source, overrides: dict[str, float] | None = None) -> Program:
    """Resolve and check a parsed program, returning its IR.

    ``overrides`` replaces parameter defaults (``--param k=v``) before any check runs.
    """
    return _Checker(source, module, overrides=dict(overrides or {})).program()
