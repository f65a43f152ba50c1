"""Expressions: lower the AST to SymPy, resolving names, inlining helpers, taking d/dt, and refusing
undefined names, wrong arity, recursion and numbers beyond float64's range."""
from __future__ import annotations

import decimal
import difflib
import math

import sympy as sp

from .. import syntax as ast
from ...errors import SdeError, Span
from ..parse import RESERVED_WORDS
from ..derive.signs import canonical, derivative, jumps
from .common import (BUILTIN_CONSTANTS, BUILTINS, MAX_DIGITS, PARAM_DEFAULT_HINT, TIME, Scope, evaluate)


# Inlined helpers that call each other twice double at each level (f2(t) = f1(t) * f1(t + 1)): 30 levels
# would be a billion terms. Every later stage walks expressions term by term.
MAX_NODES = 20_000


def _larger_than(expr: sp.Expr, limit: int) -> bool:
    """Whether expr, as a tree, has more than limit nodes; stops counting there (no recursion)."""
    stack, count = [expr], 0
    while stack:
        count += 1
        if count > limit:
            return True
        stack.extend(stack.pop().args)
    return False


class ExpressionsPass:
    """AST expression -> SymPy expression in a scope; constants evaluated at the parameters' defaults."""

    def lower(self, expr: ast.Expr, scope: Scope) -> sp.Expr:
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
            # u / |u| as sign(u) (derive/signs.py): 0 where u is, rather than 0/0
            return canonical({"+": sp.Add, "-": lambda a, b: a - b, "*": sp.Mul, "/": lambda a, b: a / b,
                              "^": sp.Pow}[expr.op](left, right))
        if isinstance(expr, ast.Call):
            return self._call(expr, scope)
        if isinstance(expr, ast.Derivative):
            if scope.derivative_var is None:
                raise self.error(f"d/dt needs the time t, which {scope.context} does not have", expr.span,
                                 "take derivatives in the drift, the diffusion, the weighting, or inside "
                                 "a helper function whose argument is named t")
            inner = self.lower(expr.expr, scope)
            states = [name for name in self.sdes if name in scope.bound and inner.has(scope.bound[name])]
            if states:
                # d/dt would hold the state fixed (d/dt(x^2 t) = x^2): a partial derivative the user rarely means.
                raise self.error(f"d/dt of an expression in the state '{states[0]}'", expr.span,
                                 "d/dt takes derivatives of functions of time only; write the derivative of "
                                 "the time-dependent part, e.g. x^2 * d/dt(beta(t))")
            return self._derivative(inner, scope.derivative_var, expr)
        raise AssertionError(f"unknown expression node {expr!r}")

    def _derivative(self, inner: sp.Expr, t: sp.Symbol, expr: ast.Derivative) -> sp.Expr:
        """d/dt inner, a continuous function: where it jumps (a sign(u) whose root is not cancelled) there is no
        derivative, and the SDE would need a delta."""
        interval = getattr(self, "interval", None)
        if interval is not None and inner.has(sp.sign):
            where = jumps(inner, t, *interval, self._defaults())
            if where:
                raise self.error(f"d/dt of a function that jumps at t = {where[0]:.6g}{self.at_defaults()}",
                                 expr.span, "d/dt needs a continuous function; a jump of sign(u) at u = 0 has no "
                                 "derivative there (multiply it by a factor that vanishes there, as in "
                                 "sign(u) * log(1 + |u|))")
        return derivative(inner, t)

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

    def _name(self, expr: ast.Name, scope: Scope) -> sp.Expr:
        name = expr.id
        if name in scope.bound:
            return scope.bound[name]
        if name == "t":
            if scope.allow_t_free:
                return TIME
            raise self.error(f"{scope.context} cannot depend on the time t", expr.span, scope.t_hint)
        if self.kernels and name == self.state:
            raise self.error(f"{scope.context} cannot depend on the state {name}", expr.span,
                             f"a kernel is the law of {name}(t) given the data: write {name}(0) in its mean")
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

    def _undefined(self, name: str, span: Span, scope: Scope) -> SdeError:
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
            scope = Scope({}, f"constant '{name}'", t_hint=f"a constant does not change with time; make it "
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

    def _is_zero(self, arg) -> bool:
        """arg is a constant equal to 0 (x(0)); x(t) or any other argument is not (and raises nothing here: the
        caller's message, that the state appears only as the data, is the one that fits)."""
        try:
            return self.lower(arg, self._constant_scope("the time")) == 0
        except SdeError:
            return False

    def _call(self, expr: ast.Call, scope: Scope) -> sp.Expr:
        name = expr.func
        if self.kernels and name == self.state:
            if name not in scope.data:
                raise self.error(f"{scope.context} cannot depend on the data {name}(0)", expr.span,
                                 f"the data appears only in the kernel's mean, alpha(t) * {name}(0) + c(t)")
            if len(expr.args) != 1 or not self._is_zero(expr.args[0]):
                raise self.error(f"in a kernel, '{name}' appears only as the data {name}(0)", expr.span,
                                 f"write the mean as alpha(t) * {name}(0) + c(t)")
            return scope.data[name]
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
            result = body.xreplace(dict(zip(formals, args)))
            if _larger_than(result, MAX_NODES):
                raise self.error(f"calling '{name}' here gives an expression of more than {MAX_NODES:,} terms",
                                 expr.span, "helpers that call each other twice double in size at each level; "
                                 "compute the value once and reuse it, or simplify the helpers")
            return result
        if name in self.params or name in self.consts or name in BUILTIN_CONSTANTS or name == "t":
            raise self.error(f"'{name}' is not a function", expr.func_span,
                             "multiplication is explicit: write 'a * (b)', not 'a(b)'")
        if name in scope.bound and name in self.sdes:
            raise self.error(f"'{name}' is a state variable, not a function of time", expr.func_span,
                             f"write '{name}' alone, e.g. 'd{name} = -{name} dt + 1 dw'")
        raise self._undefined(name, expr.func_span, scope)

    def _function(self, name: str, span: Span) -> tuple[tuple[sp.Dummy, ...], sp.Expr]:
        if name not in self._function_bodies:
            self._enter(name, span)
            st = self.functions[name]
            formals = tuple(sp.Dummy(a, real=True) for a in st.args)
            bound = dict(zip(st.args, formals))
            t_var = bound.get("t")
            scope = Scope(bound, f"function '{name}'", derivative_var=t_var,
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
        number = evaluate(self.with_defaults(value))
        if number is None:
            raise self.error(f"{context} is not a finite real number", expr.span,
                             "check for a logarithm or square root of a negative number, a division by zero "
                             "or an overflow")
        return number

    @staticmethod
    def time_scope(context: str, data: dict[str, sp.Symbol] | None = None) -> Scope:
        """The scope of a function of t; ``data`` names the data in a kernel's mean ('x' -> x(0))."""
        return Scope({}, context, allow_t_free=True, derivative_var=TIME, data=data or {})

    @staticmethod
    def _constant_scope(context: str) -> Scope:
        return Scope({}, context, t_hint=f"{context} is a constant; it cannot change with time")
