"""Definitions: collect the statements, refuse reserved or duplicate names, resolve parameter defaults."""
from __future__ import annotations

import builtins
import difflib
import keyword
import math

import sympy as sp

from .. import syntax as ast
from ...errors import Span
from ..parse import RESERVED_WORDS
from .common import DESCRIBE, MODULE_ATTRIBUTES, PARAM_DEFAULT_HINT, RESERVED


class NamesPass:
    """Collects definitions and SDE lines; resolves parameters (with --param overrides)."""

    def collect(self) -> dict[type, ast.Statement]:
        singles: dict[type, ast.Statement] = {}
        where: dict[str, Span] = {}
        for st in self.module.statements:
            if isinstance(st, (ast.ParamDef, ast.ConstDef, ast.FunctionDef)):
                self._define(st, where)
            elif isinstance(st, (ast.KernelDef, ast.LogSnrDef)):
                if isinstance(st, ast.KernelDef):
                    self._check_state_name(st.var, st.var_span, f"{st.var}(t)")
                if self.kernels or self.sdes:
                    first = self.kernels[0].span if self.kernels else next(iter(self.sdes.values())).span
                    raise self.error(f"the process is already given on line {first.line}", st.span,
                                     "give it once: by its SDE 'dx = ...', its kernel 'x(t) ~ normal(...)' "
                                     "or its logSNR 'logsnr(t) = ...'")
                self.kernels.append(st)
                self.state = st.var if isinstance(st, ast.KernelDef) else "x"
            elif isinstance(st, ast.SdeDef):
                name = self._state_name(st)
                if self.kernels:
                    raise self.error(f"the process is already given on line {self.kernels[0].span.line}",
                                     st.span, "give it once: by its SDE 'dx = ...' or by its kernel")
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
                    raise self.error(f"{DESCRIBE[kind]} is already given on line {first.line}", st.span,
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
        if len(d) < 2 or not d.startswith("d") or d[1:] == "t":
            raise self.error(f"'{d}' is not the differential of a state variable", st.name_span,
                             "write the SDE as 'dx = <drift> dt + <diffusion> dw'")
        state = d[1:]
        self._check_state_name(state, st.name_span, d)
        return state

    def _check_state_name(self, state: str, span: Span, written: str) -> None:
        if state == "w":
            raise self.error(f"a state or component cannot be called 'w': '{written}' reads as the noise dw", span,
                             "w is reserved for the Wiener process; rename the component, e.g. 'w1' or 'u'")
        if state in RESERVED:
            raise self.error(f"the state cannot be called '{state}': it is {RESERVED[state]}", span,
                             "call the state x: 'dx = <drift> dt + <diffusion> dw'")

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
