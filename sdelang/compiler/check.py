"""Stage 2: AST -> IR. Resolves names, inlines helpers and checks the program.

Every user mistake found here is an :class:`SdeError` pointing at the offending
expression: undefined or misspelled names, wrong arity, redefinitions, bad
settings (eps >= T, steps not a positive integer), a zero or negative
diffusion, a negative weighting, and what a kind of SDE cannot have: a general
SDE (drift not affine in x, or a diffusion g(x, t)) has no kernel, so no
importance sampling, no sigma^2 weighting and no derived prior; a coupled SDE
(several 'd<name> = ...' lines) must be linear with one time profile.
"""
from __future__ import annotations

import decimal
import difflib
import builtins
import keyword
import math
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import syntax as ast
from ..errors import SdeError, Source, Span
from .ir import Component, CoupledProgram, Parameter, Program
from .parse import RESERVED_WORDS
from .timelimit import call_with_time_limit

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
            "pi": "a builtin constant", **{k: "a reserved word of the language" for k in RESERVED_WORDS}}
# A parameter becomes an argument and an attribute of the generated torch module, so it cannot be
# a Python keyword or one of the module's own attributes.
MODULE_ATTRIBUTES = frozenset({
    "self", "T", "N", "eps", "kernel_path", "inverse_cdf_path", "t_sampling", "diffusion",
    "marginal_prob", "mean_coeff", "mean_offset", "std", "log_snr", "prior_sampling", "prior_logp",
    "discretize", "reverse", "weight", "t_density", "t_cdf", "t_icdf", "sample_t", "drift_divergence",
    "training", "forward", "sde", "v0", "weighting", "SDE", "math", "torch", "kind", "unavailable",
    # general and coupled modules
    "noise_gradient", "components", "data_index", "noisy", "split", "join", "data", "profile", "time_change",
    "transition", "kernel", "perturb", "noise_to_score", "init_sampling", "init_logp", "F0", "D0", "mean0",
    "Sigma0",
    # torch.nn.Module's public attributes (tests/test_programs.py checks this list against torch).
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children",
    "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "get_buffer",
    "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules",
    "mtia", "named_buffers", "named_children", "named_modules", "named_parameters", "parameters",
    "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter",
    "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
    "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "type", "xpu", "zero_grad",
}) | frozenset(dir(builtins))
PARAM_DEFAULT_HINT = "parameter defaults are numbers; use a constant 'name = expr' for derived values"
GRID_POINTS = 257  # where positivity of g(t) and lambda(t) is checked on [eps, T]
MAX_DIGITS = 308   # exact numbers beyond float64's range are refused before SymPy expands them
STATE_RANGE = 4.0  # where a state-dependent drift or diffusion is checked, x in [-4, 4]
EVALUATE_SECONDS = 5.0  # sp.N on a constant such as exp(exp(exp(100))) would otherwise never end


@dataclass
class _Scope:
    """What an expression may refer to: bound variables and the context's name."""

    bound: dict[str, sp.Expr]
    context: str                    # e.g. "the drift", "function 'beta'"
    allow_t_free: bool = False      # may it use the global t?
    derivative_var: sp.Symbol | None = None
    t_hint: str = ("only the drift, the diffusion, the weighting and helper functions "
                   "with an argument named t may use t")


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
    state: str | None = None        # the x of the first 'dx = ...' line
    sdes: dict[str, ast.SdeDef] = field(default_factory=dict)   # state name -> its SDE line
    inits: dict[str, ast.InitDef] = field(default_factory=dict)  # component name -> 'v(0) ~ ...'
    _resolving: str | None = None   # the parameter whose default is being evaluated

    def error(self, message: str, span: Span | None, hint: str | None = None) -> SdeError:
        return SdeError(message, span, self.source, hint)

    # -- definitions ---------------------------------------------------------

    def collect(self) -> dict[type, ast.Statement]:
        singles: dict[type, ast.Statement] = {}
        where: dict[str, Span] = {}
        for st in self.module.statements:
            if isinstance(st, (ast.ParamDef, ast.ConstDef, ast.FunctionDef)):
                self._define(st, where)
            elif isinstance(st, ast.SdeDef):
                name = self._state_name(st)
                if name in self.sdes:
                    raise self.error(f"'d{name}' is already given on line {self.sdes[name].span.line}", st.name_span,
                                     "each component has one SDE line; remove one of them")
                self.sdes[name] = st
                self.state = self.state or name
            elif isinstance(st, ast.InitDef):
                if st.var in self.inits:
                    raise self.error(f"the initial law of '{st.var}' is already given on line "
                                     f"{self.inits[st.var].span.line}", st.var_span, "remove one of them")
                self.inits[st.var] = st
            else:
                kind = type(st)
                if kind in singles:
                    first = singles[kind].span
                    raise self.error(f"{_DESCRIBE[kind]} is already given on line {first.line}", st.span,
                                     "each setting is given at most once; remove one of them")
                singles[kind] = st
        for name in self.sdes:
            if name in where:
                raise self.error(f"'{name}' is a state variable of the SDE and cannot be redefined",
                                 where[name], "choose another name")
        for name, st in self.inits.items():
            if name not in self.sdes:
                raise self.error(f"'{name}' is not a component of the SDE", st.var_span,
                                 f"an initial law belongs to a component with its own line 'd{name} = ...'")
            if sp.Rational(st.time) != 0:
                raise self.error(f"an initial law is given at time 0, not {st.time}", st.time_span,
                                 f"write '{name}(0) ~ normal(mean, variance)'")
        return singles

    def _refuse_reserved_word(self, name: str, span: Span) -> None:
        if name in RESERVED_WORDS:
            raise self.error(f"'{name}' is a reserved word and cannot be used as a name", span,
                             f"choose another name, e.g. '{name}_'")

    def _define(self, st, where: dict[str, Span]) -> None:
        name = st.name
        self._refuse_reserved_word(name, st.name_span)
        if name in RESERVED:
            raise self.error(f"'{name}' is {RESERVED[name]} and cannot be redefined", st.name_span,
                             "choose another name")
        if name in where:
            raise self.error(f"'{name}' is already defined on line {where[name].line}", st.name_span,
                             "each name is defined once; rename one of them")
        where[name] = st.name_span
        if isinstance(st, ast.ParamDef):
            self._check_param_name(st)
            self.params[name] = st
        elif isinstance(st, ast.ConstDef):
            self.consts[name] = st
        else:
            seen: set[str] = set()
            for arg, span in zip(st.args, st.arg_spans):
                if arg in seen:
                    raise self.error(f"argument '{arg}' appears twice in function '{name}'", span,
                                     "give each argument its own name")
                self._refuse_reserved_word(arg, span)
                if arg in RESERVED and arg != "t":
                    raise self.error(f"'{arg}' is {RESERVED[arg]} and cannot be an argument name", span,
                                     "choose another name")
                seen.add(arg)
            self.functions[name] = st

    def _check_param_name(self, st: ast.ParamDef) -> None:
        name = st.name
        if keyword.iskeyword(name) or name in MODULE_ATTRIBUTES or name.startswith("_"):
            why = ("a Python keyword" if keyword.iskeyword(name) else
                   "a Python builtin" if name in dir(builtins) else
                   "taken by the generated module" if name in MODULE_ATTRIBUTES else "private in Python")
            raise self.error(f"'{name}' cannot name a parameter: it is {why}", st.name_span,
                             f"a parameter becomes an argument of the generated module; "
                             f"choose another name, e.g. '{name.strip('_')}_param'")

    def _state_name(self, st: ast.SdeDef) -> str:
        d = st.differential
        if len(d) < 2 or not d.startswith("d") or d[1:] in ("t", "w"):
            raise self.error(f"'{d}' is not the differential of a state variable", st.name_span,
                             "write the SDE as 'dx = <drift> dt + <diffusion> dw'")
        state = d[1:]
        if state in RESERVED:
            raise self.error(f"the state cannot be called '{state}': it is {RESERVED[state]}", st.name_span,
                             "call the state x: 'dx = <drift> dt + <diffusion> dw'")
        return state

    def resolve_params(self) -> None:
        unknown = sorted(set(self.overrides) - set(self.params))
        if unknown:
            name = unknown[0]
            if not self.params:
                raise self.error(f"unknown parameter '{name}': the program declares no parameters", None,
                                 "only names declared with 'param' can be overridden")
            close = difflib.get_close_matches(name, list(self.params), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise self.error(f"unknown parameter '{name}'", None,
                             f"{hint}the parameters are: {', '.join(self.params)}")
        for name, st in self.params.items():
            self._resolving = name
            value = self.constant(st.value, f"the default of parameter '{name}'", fixed=PARAM_DEFAULT_HINT)
            # The file's default fixes the sign the derivation assumes, unless the parameter is
            # declared real; an override must keep it.
            positive = value > 0 and not st.real
            assumptions = {"positive": True} if positive else {"real": True}
            if name in self.overrides:
                override = float(self.overrides[name])
                if not math.isfinite(override):
                    raise self.error(f"parameter '{name}' must be finite, got {override}", None)
                if positive and override <= 0:
                    raise self.error(f"--param {name}={override:g}: parameter '{name}' has a positive default, "
                                     f"so it must stay positive", st.value.span,
                                     f"the derivation assumes the sign of the default; give a positive value, "
                                     f"or declare it 'param {name}: real = ...' in the file")
                value = override
            self.param_defaults[name] = value
            self.param_symbols[name] = sp.Symbol(name, **assumptions)

    # -- expressions ---------------------------------------------------------

    def lower(self, expr: ast.Expr, scope: _Scope) -> sp.Expr:
        if isinstance(expr, ast.Number):
            return self._number(expr)
        if isinstance(expr, ast.Name):
            return self._name(expr, scope)
        if isinstance(expr, ast.Neg):
            return -self.lower(expr.operand, scope)
        if isinstance(expr, ast.BinOp):
            left, right = self.lower(expr.left, scope), self.lower(expr.right, scope)
            if expr.op == "/" and right == 0:
                raise self.error("division by zero", expr.right.span, "the divisor is zero everywhere")
            if expr.op == "^":
                self._check_power(left, right, expr)
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

    def _number(self, expr: ast.Number) -> sp.Rational:
        value = decimal.Decimal(expr.text)  # SymPy would spend forever writing out 1e99999999
        if not value.is_zero() and abs(value.adjusted()) > MAX_DIGITS:
            raise self.error(f"the number {expr.text} is out of range", expr.span,
                             "numbers must lie within float64's range, about 1e-308 to 1e308")
        return sp.Rational(expr.text)

    def _check_power(self, base: sp.Expr, exponent: sp.Expr, expr: ast.BinOp) -> None:
        """Refuse a power whose exact value SymPy would expand into an enormous number, e.g. 10^10^10."""
        if not exponent.is_Number:
            return
        digits = sum(math.log10(abs(n.p)) + math.log10(n.q) for n in base.atoms(sp.Rational) if n != 0)
        if digits and abs(exponent) * sp.Float(digits) > MAX_DIGITS:
            raise self.error("this power is too large to compute exactly", expr.span,
                             "numbers must lie within float64's range, about 1e-308 to 1e308")

    def _name(self, expr: ast.Name, scope: _Scope) -> sp.Expr:
        name = expr.id
        if name in scope.bound:
            return scope.bound[name]
        if name == "t":
            if scope.allow_t_free:
                return TIME
            raise self.error(f"{scope.context} cannot depend on the time t", expr.span, scope.t_hint)
        if name in self.sdes:
            hint = ("a weighting lambda(t) is a function of time only" if scope.context == "the weighting" else
                    "only the SDE may use the state; pass it to a helper as an argument, e.g. 'f(x, t)'")
            raise self.error(f"{scope.context} cannot depend on the state {name}", expr.span, hint)
        if name in self.param_symbols:
            return self.param_symbols[name]
        if name in self.params:  # met while the parameter defaults are being resolved
            raise self.error(f"the default of parameter '{self._resolving}' must be a number; "
                             f"it cannot use parameter '{name}'", expr.span, PARAM_DEFAULT_HINT)
        if name in self.consts:
            return self._const(name, expr.span)
        if name in BUILTIN_CONSTANTS:
            return BUILTIN_CONSTANTS[name]
        if name in self.functions or name in BUILTINS:
            raise self.error(f"'{name}' is a function, not a value", expr.span,
                             f"call it with its arguments, e.g. '{name}(t)'")
        raise self._undefined(name, expr.span, scope)

    def _undefined(self, name: str, span: Span, scope: _Scope) -> SdeError:
        if name in ("dt", "dw"):
            return self.error(f"'{name}' is not a value: it marks the end of the "
                              f"{'drift' if name == 'dt' else 'diffusion'}", span,
                              "write the SDE as 'dx = <drift> dt + <diffusion> dw', with no '*' before "
                              "'dt' or 'dw'")
        if name in RESERVED_WORDS:
            return self.error(f"'{name}' is a reserved word, not a value", span,
                              f"'{name}' can only appear in its own statement; see 'Reserved words' "
                              "in docs/language.md")
        if name == "d":
            return self.error("undefined name 'd'", span, "a derivative is written 'd/dt(expr)', without spaces")
        known = [*scope.bound, *self.params, *self.consts, *self.functions, *BUILTINS, *BUILTIN_CONSTANTS]
        if scope.allow_t_free:
            known.append("t")
        close = difflib.get_close_matches(name, known, n=1)
        hint = (f"did you mean '{close[0]}'?" if close else
                "define it with 'param name = value', 'name = expr' or 'name(t) = expr'")
        return self.error(f"undefined name '{name}'", span, hint)

    def _const(self, name: str, span: Span) -> sp.Expr:
        if name not in self._const_values:
            self._enter(name, span)
            st = self.consts[name]
            scope = _Scope({}, f"constant '{name}'", t_hint=f"a constant does not change with time; make it "
                           f"a helper, '{name}(t) = ...', and call it as {name}(t)")
            self._const_values[name] = self.lower(st.value, scope)
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
                raise self.error(f"'{name}' takes 1 argument, got {len(args)}", expr.span,
                                 f"builtin functions take exactly one argument, e.g. '{name}(t)'")
            return BUILTINS[name](args[0])
        if name in self.functions:
            formals, body = self._function(name, expr.func_span)
            if len(args) != len(formals):
                st = self.functions[name]
                raise self.error(f"'{name}' takes {len(formals)} argument{'s' * (len(formals) != 1)}, "
                                 f"got {len(args)}", expr.span,
                                 f"'{name}' is defined on line {st.span.line} as {name}({', '.join(st.args)})")
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
            scope = _Scope(bound, f"function '{name}'", derivative_var=t_var,
                           t_hint=f"a helper sees only its arguments: name one of them t, e.g. '{name}(t) = ...'")
            self._function_bodies[name] = (formals, self.lower(st.body, scope))
            self._in_progress.pop()
        return self._function_bodies[name]

    def constant(self, expr: ast.Expr, context: str, fixed: str | None = None) -> float:
        """Lower a constant expression and evaluate it at the parameters' defaults.

        ``fixed``, when given, refuses parameters, with that as the hint.
        """
        value = self.lower(expr, self._constant_scope(context))
        if fixed is not None and value.free_symbols:
            used = min(str(s) for s in value.free_symbols)
            raise self.error(f"{context} must be a number; it cannot use parameter '{used}'", expr.span, fixed)
        number = _evaluate(value.subs(self._defaults()))
        if number is None:
            raise self.error(f"{context} is not a finite real number", expr.span,
                             "check for a logarithm or square root of a negative number, a division by zero "
                             "or an overflow")
        return number

    @staticmethod
    def _constant_scope(context: str) -> _Scope:
        return _Scope({}, context, t_hint=f"{context} is a constant; it cannot change with time")

    def _defaults(self) -> dict[sp.Symbol, float]:
        return {self.param_symbols[k]: v for k, v in self.param_defaults.items()}

    # -- the program ---------------------------------------------------------

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
        if not self.sdes:
            for st in self.module.statements:
                if isinstance(st, ast.ConstDef) and st.name.startswith("d") and {"dt", "dw"} & _names(st.value):
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
        eps_value, T_value = _evaluate(eps.subs(self._defaults())), _evaluate(T.subs(self._defaults()))

        N = DEFAULT_N
        steps = singles.get(ast.StepsDef)
        if steps is not None:
            n = self.constant(steps.value, "steps", fixed="steps is fixed by the file; write a number, e.g. 'steps 1000'")
            if n != int(n) or n < 1:
                raise self.error(f"steps must be a positive integer, got {n:g}", steps.value.span,
                                 "write a whole number of steps, e.g. 'steps 1000'")
            N = int(n)

        weighting, weighting_expr = "likelihood", None
        wdef = singles.get(ast.WeightingDef)
        if wdef is not None:
            weighting = wdef.kind
            if wdef.expr is not None:
                self._check_weighting_word(wdef.expr)
                scope = _Scope({}, "the weighting", allow_t_free=True, derivative_var=TIME)
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
        sde_scope = _Scope(symbols, "the SDE", allow_t_free=True, derivative_var=TIME)
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
            return CoupledProgram(header.name, self.source, params, TIME, components, eps, T, N, weighting, t_sampling)

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

        prior_mean = prior_variance = None
        prior = singles.get(ast.PriorDef)
        if prior is not None and prior.mean is not None:
            prior_mean = self.lower(prior.mean, self._constant_scope("the prior mean"))
            prior_variance = self.lower(prior.variance, self._constant_scope("the prior variance"))
            self.constant(prior.mean, "the prior mean")
            value = self.constant(prior.variance, "the prior variance")
            if value <= 0:
                raise self.error(f"the prior variance must be positive, got {value:g}", prior.variance.span,
                                 "the second argument of normal(mean, variance) is a variance, e.g. normal(0, 1)")
        if not affine:
            self._check_general(sde, diffusion, x, prior, wdef, weighting, sdef, t_sampling)
        return Program(header.name, self.source, params, TIME, x, drift, diffusion, eps, T, N, v0,
                       prior_mean, prior_variance, weighting, weighting_expr, t_sampling, drift_span,
                       sde.diffusion.span, affine=affine)

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

    def _components(self, symbols, scope, eps, T) -> tuple[Component, ...]:
        """The lines of a coupled SDE: drifts linear in the components, noise g_k(t) >= 0, initial laws."""
        components = []
        for name, st in self.sdes.items():
            drift = self.lower(st.drift, scope) if st.drift is not None else sp.Integer(0)
            span = st.drift.span if st.drift is not None else st.span
            for u in symbols.values():
                if sp.diff(drift, u, 2) != 0 or any(sp.diff(drift, u).has(w) for w in symbols.values()):
                    raise self.error(f"the drift of d{name} is not linear in the components", span,
                                     "a coupled SDE has the drift F(t) u: a sum of terms c(t) * component")
            if drift.subs({u: 0 for u in symbols.values()}) != 0:
                raise self.error(f"the drift of d{name} has a term without a component", span,
                                 "a coupled SDE has the drift F(t) u, with no constant term b(t)")
            diffusion = sp.Integer(0)
            if st.diffusion is not None:
                diffusion = self.lower(st.diffusion, scope)
                if any(diffusion.has(u) for u in symbols.values()):
                    raise self.error(f"the diffusion of d{name} depends on the state", st.diffusion.span,
                                     "a coupled SDE has diffusions g(t) of time only")
                if diffusion != 0:
                    self._check_positive(diffusion, st.diffusion.span, eps, T, f"the diffusion of d{name}",
                                         "g(t) must be positive on [eps, T]; leave out '... dw' for no noise")
            for part in (*(sp.diff(drift, u) for u in symbols.values()),):
                values = self._on_grid(part, eps, T)
                if not np.all(np.isfinite(values)):
                    bad = self._grid(eps, T)[~np.isfinite(values)][0]
                    raise self.error(f"the drift of d{name} is not finite at t = {bad:.6g}", span,
                                     "choose [eps, T] inside the drift's domain")
            init = self.inits.get(name)
            mean = variance = None
            if init is not None:
                mean = self.lower(init.mean, self._constant_scope("an initial mean"))
                variance = self.lower(init.variance, self._constant_scope("an initial variance"))
                self.constant(init.mean, "the initial mean")
                if self.constant(init.variance, "the initial variance") < 0:
                    raise self.error("the initial variance cannot be negative", init.variance.span,
                                     "the second argument of normal(mean, variance) is a variance")
            components.append(Component(name, symbols[name], drift, diffusion, mean, variance, st.span))
        data = [c for c in components if c.init_mean is None]
        if not data:
            raise self.error("every component has an initial law, so none is the data", self.inits[components[0].name].span,
                             f"leave out the initial law of the data component, e.g. of '{components[0].name}'")
        if len(data) > 1:
            raise self.error(f"component '{data[1].name}' has no initial law; only the data component may lack one",
                             data[1].span, f"add '{data[1].name}(0) ~ normal(mean, variance)', or make "
                             f"'{data[1].name}' the data and give '{data[0].name}' an initial law")
        if all(c.diffusion == 0 for c in components):
            raise self.error("no component has noise: a coupled SDE needs at least one '... dw'",
                             components[0].span, "add a diffusion to one line, e.g. 'dv = ... dt + sqrt(2) dw'")
        self._check_time_profile(components)
        return tuple(components)

    def _check_time_profile(self, components) -> None:
        """F(t) = phi(t) F0 and G(t)^2 = phi(t) D0 with one phi: then the kernel depends on t only through
        B(t) = int_0^t phi, a matrix exponential of constant matrices (derive/coupled.py)."""
        entries = [(sp.diff(c.drift, d.symbol), c) for c in components for d in components]
        entries += [(c.diffusion**2, c) for c in components]
        nonzero = [(e, c) for e, c in entries if e != 0]
        phi, first = nonzero[0]
        for e, c in nonzero:
            done, ratio = call_with_time_limit(EVALUATE_SECONDS, sp.simplify, e / phi)
            if not done or ratio.has(TIME):
                raise self.error(f"the coefficients of d{c.name} and d{first.name} change with time differently",
                                 c.span, "a coupled SDE's drift matrix F(t) and noise G(t)^2 share one time profile: "
                                 "write every coefficient as a constant times the same phi(t), e.g. beta(t) * (...)")

    def _check_weighting_word(self, expr: ast.Expr) -> None:
        """``weighting likelyhood``: a misspelled kind, not an undefined name in an expression."""
        if not isinstance(expr, ast.Name) or expr.id in (*self.params, *self.consts, *BUILTIN_CONSTANTS, "t"):
            return
        close = difflib.get_close_matches(expr.id, ["likelihood", "score_matching"], n=1)
        if close:
            raise self.error(f"unknown weighting '{expr.id}'", expr.span, f"did you mean '{close[0]}'?")

    def _check_sde(self, drift, diffusion, x, drift_span, diffusion_span, eps, T) -> bool:
        """Refuse a diffusion that vanishes or a drift that is not finite; return whether the SDE is affine."""
        slope = sp.diff(drift, x)
        affine = not slope.has(x)
        if not affine:
            # Only a slope that simplifies to a function of t is affine; out of time counts as general.
            done, simple = call_with_time_limit(EVALUATE_SECONDS, sp.simplify, slope)
            affine = done and not simple.has(x)
        if diffusion == 0:
            raise self.error("the diffusion is zero: an SDE without noise is not supported", diffusion_span,
                             "give a positive g(t) before 'dw', e.g. 'sqrt(2) dw'")
        if diffusion.has(x):
            self._check_on_states(diffusion**2, x, diffusion_span, eps, T, "the diffusion", positive=True)
            affine = False
        else:
            self._check_positive(diffusion, diffusion_span, eps, T, "the diffusion",
                                 "g(t) must be positive on [eps, T]; write it as a square root, e.g. sqrt(beta(t))")
        if not affine:
            self._check_on_states(drift, x, drift_span, eps, T, "the drift", positive=False)
            return False
        for part, name in ((slope, "the drift"), (drift.subs(x, 0), "the drift")):
            values = self._on_grid(part, eps, T)
            if not np.all(np.isfinite(values)):
                bad = self._grid(eps, T)[~np.isfinite(values)][0]
                raise self.error(f"{name} is not finite at t = {bad:.6g}", drift_span,
                                 "choose [eps, T] inside the drift's domain")
        return True

    def _check_on_states(self, expr, x, span, eps, T, what, positive) -> None:
        """expr(x, t) finite (and positive) on a grid of x in [-STATE_RANGE, STATE_RANGE] and t in [eps, T]."""
        fn = sp.lambdify((x, TIME), expr.subs(self._defaults()), modules="numpy")
        xs, ts = np.meshgrid(np.linspace(-STATE_RANGE, STATE_RANGE, 41), self._grid(eps, T))
        with np.errstate(all="ignore"):
            values = np.asarray(fn(xs, ts), dtype=complex) * np.ones(xs.shape)
        bad = ~np.isfinite(values) | (np.abs(values.imag) > 1e-12 * (1 + np.abs(values.real)))
        if positive:
            bad |= values.real <= 0
        if bad.any():
            i = np.flatnonzero(bad.ravel())[0]
            problem = "zero" if positive and np.isfinite(values.ravel()[i]) and values.ravel()[i].real == 0 else (
                "not positive" if positive and np.isfinite(values.ravel()[i]) else "not a finite real number")
            raise self.error(f"{what} is {problem} at {x} = {xs.ravel()[i]:.6g}, t = {ts.ravel()[i]:.6g}", span,
                             f"sdelang checks {x} in [-{STATE_RANGE:g}, {STATE_RANGE:g}]; "
                             + ("the noise must not vanish, e.g. sqrt(1 + x^2)" if positive else
                                "choose a drift defined for every state"))

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
            first = np.flatnonzero(values <= 0)[0]
            word = "negative" if values[first] < 0 else "zero"
            where = " (with the default parameters)" if self.params else ""
            raise self.error(f"{what} is {word} at t = {grid[first]:.6g}{where}", span, hint)


_DESCRIBE = {ast.Header: "the 'sde NAME' line", ast.SdeDef: "the SDE", ast.TimeDef: "the time interval",
             ast.StepsDef: "'steps'", ast.V0Def: "'v0'", ast.PriorDef: "the prior",
             ast.WeightingDef: "the weighting", ast.SamplingDef: "the t sampling"}


def _names(expr: ast.Expr) -> set[str]:
    """The names an expression mentions, called functions included."""
    if isinstance(expr, ast.Name):
        return {expr.id}
    if isinstance(expr, ast.Call):
        return {expr.func}.union(*map(_names, expr.args))
    if isinstance(expr, ast.BinOp):
        return _names(expr.left) | _names(expr.right)
    if isinstance(expr, ast.Neg):
        return _names(expr.operand)
    if isinstance(expr, ast.Derivative):
        return _names(expr.expr)
    return set()


def _evaluate(expr: sp.Expr) -> float | None:
    """A finite real float, or None (also when the evaluation takes too long)."""
    number = call_with_time_limit(EVALUATE_SECONDS, sp.N, expr, 30)[1]  # None when out of time
    try:
        value = complex(number)
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
