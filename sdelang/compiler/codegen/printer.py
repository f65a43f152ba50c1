"""SymPy expressions -> straight-line torch code.

Three passes turn the expressions of one method into readable, fast code:

1. rewrite ``exp(u) - 1`` as ``expm1(u)`` and ``log(1 + u)`` as ``log1p(u)``,
   which keep their digits near t = 0 in float32, and ``expm1(u) - u - ... - u^k/k!``
   (an OU mean with a time-varying target, c ~ theta t^2 / 2) as its Taylor series
   where |u| is small (``ExpTail``); and ``cos`` / ``tan`` of a t + b whose zero or pole sits at a
   rational t0 (the cosine schedule's t = 1) measured from it, sin(a (t0 - t)), exact in float32 near t0;
2. hoist every subexpression in the parameters alone into a constant that the
   module computes once, in float64 with :mod:`math`, when it is built;
3. eliminate common subexpressions (``cse(order='canonical')``, deterministic).

A scalar kernel's numeric quantities print as lookups in the module's tables
(derive/tables.py): ``tab0 = self._tables(t)`` once per method and time, then
``tab0[k]``; the columns' own definitions print with ``c[j]`` for the columns
before them. An unevaluated ``Integral`` (a coupled kernel's numeric path) prints
as a call of the module's Gauss-Legendre quadrature ``self._quad(lambda s: ..., lo, hi)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from ..derive.symbolic import PRINTABLE, Tabulated, bounded, softplus, use_expm1_log1p
from ..derive.tables import BUILD_VARIABLE, Column, Total
from ...errors import InternalCompilerError

REWRITE_LIMIT = 2.0  # seconds for the expm1/log1p rewrites of one expression



def stable(expr: sp.Expr) -> sp.Expr:
    """expm1/log1p rewrites, which keep float32 precision near t = 0, cos and tan measured from their
    zero or pole (trig_from_quarter_turn), and the forms of softplus and sigmoid that do not overflow
    (no_overflow) (unchanged if they run out of time)."""
    rewritten = bounded(lambda e: no_overflow(trig_from_quarter_turn(use_expm1_log1p(e))), expr,
                        seconds=REWRITE_LIMIT)
    return expr if rewritten is None else rewritten


def no_overflow(expr: sp.Expr) -> sp.Expr:
    """log1p(exp(u)) as softplus(u) (a state-dependent noise sqrt(1 + softplus(x)) was inf at x = 100 in float32),
    and exp(u) / (exp(u) + 1)^n (SymPy's derivatives of softplus and sigmoid)
    as 1 / ((1 + exp(-u)) (exp(u) + 1)^(n - 1)): inf / inf is NaN for large u; this is 1, or 0, there."""
    def sigmoid(e):
        factors = list(e.args)
        for i, f in enumerate(factors):
            if f.is_Pow and f.exp.is_Integer and f.exp < 0 and f.base.is_Add and len(f.base.args) == 2 \
                    and 1 in f.base.args:
                (E,) = [a for a in f.base.args if a != 1]
                if isinstance(E, sp.exp) and E in factors:
                    rest = [g for j, g in enumerate(factors) if j != i and j != factors.index(E)]
                    return sp.Mul(*rest) * f.base**(f.exp + 1) / (1 + sp.exp(-E.args[0]))
        return e

    expr = expr.replace(lambda e: isinstance(e, log1p) and isinstance(e.args[0], sp.exp),
                        lambda e: softplus(e.args[0].args[0]))
    return expr.replace(lambda e: e.is_Mul, sigmoid)


def trig_from_quarter_turn(expr: sp.Expr) -> sp.Expr:
    """cos(a t + b) as sin(a (t0 - t)) and tan(a t + b) as sin(a t + b) / sin(a (t0 - t)), where a t0 + b = pi/2
    and t0 is a rational number (the cosine schedule's t0 = 1). Near t0, a t + b in float32 carries an absolute
    rounding error of about 6e-8 pi/2, which cos turns into a relative error of 6e-8 / (t0 - t), 6e-5 at
    t = 0.999; t0 - t is exact there (Sterbenz), and sin of a small argument keeps its relative precision.
    tan keeps sin(a t + b) above: where a t + b passes 0 (tan(pi/2 t) near t = 0) it is what keeps tan's
    relative precision, which 1 / tan(a (t0 - t)) loses to the rounding of t0 - t (1e-3 at t = 3e-5)."""
    times = [symbol for symbol in expr.free_symbols if symbol.name == "t" and not isinstance(symbol, sp.Dummy)]
    if len(times) != 1:
        return expr
    t = times[0]

    def from_t0(argument):
        slope = sp.diff(argument, t)
        if slope == 0 or slope.has(t):
            return None
        t0 = sp.simplify((sp.pi / 2 - (argument - slope * t)) / slope)
        if not (t0.is_Rational and t0 > 0):
            return None
        return sp.Mul(slope, sp.Add(t0, -t, evaluate=False), evaluate=False)

    def rewrite(e):
        shifted = from_t0(e.args[0])
        if shifted is None:
            return e
        if isinstance(e, sp.cos):
            return sp.sin(shifted, evaluate=False)
        return sp.sin(e.args[0]) / sp.sin(shifted, evaluate=False)

    return expr.replace(lambda e: isinstance(e, (sp.cos, sp.tan)) and e.args[0].has(t), rewrite)


class ExpTail(sp.Function):
    """ExpTail(u, k) = exp(u) - sum_{n <= k} u^n / n!, printed as its Taylor series where |u| < ExpTail.bound(k)
    and directly elsewhere: the direct form cancels like u^(k+1) / (k+1)! against expm1(u) ~ u near u = 0."""

    nargs = 2

    @staticmethod
    def bound(k: int) -> float:
        """Where the direct form loses at most 16 ulps to cancellation: |u| = ((k+1)! / 16)^(1/k), at most 1."""
        return min(1.0, (math.factorial(k + 1) / 16) ** (1 / k))

    @staticmethod
    def coefficients(k: int) -> list[float]:
        """1/(k+1)!, 1/(k+2)!, ...: enough terms that the first left out is below 2^-56 of the first at the bound."""
        x, out = ExpTail.bound(k), []
        while not out or x ** len(out) * math.factorial(k + 1) / math.factorial(k + 1 + len(out)) > 2.0**-56:
            out.append(1 / math.factorial(k + 1 + len(out)))
        return out

    def direct(self) -> sp.Expr:
        u, k = self.args
        return sp.exp(u) - sum(u**n / sp.factorial(n) for n in range(int(k) + 1))


def expm1_tails(expr: sp.Expr) -> sp.Expr:
    """c expm1(u) - c u - ... - c u^k / k! (k >= 1) -> c ExpTail(u, k), inside any Add."""
    def rewrite(e):
        terms = list(e.args)
        for i, term in enumerate(terms):
            c, f = term.as_independent(expm1, as_Add=False)
            if not isinstance(f, expm1):
                continue
            u, rest, k = f.args[0], terms[:i] + terms[i + 1:], 0
            while True:
                want = sp.expand(-c * u ** (k + 1) / sp.factorial(k + 1))
                parts = sp.Add.make_args(want)
                if all(p in rest for p in parts):
                    for p in parts:
                        rest.remove(p)
                    k += 1
                else:
                    break
            if k:
                return sp.Add(c * ExpTail(u, k), *rest)
        return e
    return expr.replace(lambda e: e.is_Add and e.has(expm1), rewrite)


class _PowMixin:
    """Powers as ``**``, square roots as sqrt, reciprocals as division."""

    _sqrt = "torch.sqrt"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp == sp.Rational(1, 2):
            return f"{self._sqrt}({self._print(base)})"
        if exp == -1:
            return f"1 / {self.parenthesize(base, PRECEDENCE['Pow'])}"
        if exp == sp.Rational(-1, 2):
            return f"1 / {self._sqrt}({self._print(base)})"
        if exp.is_Integer and exp < 0:
            return f"1 / {self.parenthesize(base, PRECEDENCE['Pow'])}**{-exp}"
        return f"{self.parenthesize(base, PRECEDENCE['Pow'])}**{self.parenthesize(exp, PRECEDENCE['Pow'])}"

    def _print_Rational(self, expr):
        return f"{expr.p}/{expr.q}" if expr.q != 1 else self._print_Integer(expr)

    def _print_Integer(self, expr):
        # Past 2^53, as a float: torch takes no Python int past 2^64 (T = 1e20), and float64 holds it to rounding.
        return repr(float(expr.p)) if abs(expr.p) > 2**53 else str(expr.p)

    def _print_Float(self, expr):
        return repr(float(expr))


# The elementwise torch functions printed for tensors: derive.symbolic.PRINTABLE's, by name
# (torch.exp, torch.expm1, ...); Abs has its own printer method.
TORCH_FUNCTIONS = tuple(f.__name__ for f in PRINTABLE if f is not sp.Abs)


class TensorPrinter(_PowMixin, PythonCodePrinter):
    """Prints for tensors; names map to locals or ``self.<attribute>``.

    (SymPy's own torch printer imports torch, a second of start-up the compiler does not need.)
    """

    def __init__(self, names: dict[sp.Symbol, str], floats: frozenset = frozenset()):
        super().__init__({"fully_qualified_modules": True, "strict": True})
        self.known_functions = {name: f"torch.{name}" for name in TORCH_FUNCTIONS}
        self.names = names
        self.floats = floats  # the symbols whose values are Python floats (parameters, hoisted constants)
        self.table_calls: dict[str, str] = {}  # printed time -> the local holding the table's columns there

    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise InternalCompilerError(f"no name for symbol {expr} in generated code")

    def _print(self, expr, **kwargs):
        # A function of Python floats only, which SymPy can make after the pool has hoisted the constants
        # (rebuilding sqrt(2 u) gives sqrt(2) sqrt(u); exp(k - log(u) / 2) gives exp(k) / sqrt(u)), is printed
        # with math: torch.sqrt(2) and torch.exp(self._k3) fail on a Python number.
        if (isinstance(expr, (sp.Function, sp.Pow)) and not (expr.free_symbols - self.floats)
                and not (isinstance(expr, sp.Pow) and expr.exp.is_Integer)
                and not expr.has(Tabulated, Column, Total, sp.Integral)):  # tables: their own printers
            return ScalarPrinter(self.names)._print(expr, **kwargs)
        return super()._print(expr, **kwargs)

    def _print_Tabulated(self, expr):
        k, x = expr.args
        if not isinstance(x, sp.Symbol):
            raise InternalCompilerError(f"a table lookup at {x}: only at a time variable")
        at = self._print(x)
        local = self.table_calls.setdefault(at, f"tab{len(self.table_calls)}")
        return f"{local}[{k}]"

    def _print_Column(self, expr):
        j, x = expr.args
        if x != BUILD_VARIABLE:
            raise InternalCompilerError(f"column {j} read at {x}, not at the table's nodes")
        return f"c[{j}]"

    def _print_Total(self, expr):
        return f"self._totals[{expr.args[0]}]"

    _print_Dummy = _print_Symbol

    def _print_Add(self, expr, order=None):
        """A sum of a number n, a time term c t (or of the step start s) and terms in the parameters alone is
        printed (n + c t) + the rest, so that Python adds those first: 1 + d - t (a pole a parameter past T)
        reads (1 - t) + d, where 1 - t is exact in float32 near t = 1 and d is added to the small result;
        (d - t) + 1 rounds at the scale of 1 and kept 1e-5 of (1 + d - t) / (1 + d) at t = 1, d = 0.001."""
        number = [a for a in expr.args if a.is_Number]
        times = [a for a in expr.args if self._is_time_term(a)]
        rest = [a for a in expr.args if not a.is_Number and not self._is_time_term(a)]
        if len(number) != 1 or len(times) != 1 or not rest or any(self._has_time(a) for a in rest):
            return super()._print_Add(expr, order)
        first = super()._print_Add(sp.Add(number[0], times[0]), order)
        others = super()._print_Add(sp.Add(*rest), order) if len(rest) > 1 else self._print(rest[0])
        return f"({first}) - {others[1:]}" if others.startswith("-") else f"({first}) + {others}"

    def _has_time(self, term) -> bool:
        return any(self.names.get(symbol) in ("t", "s") for symbol in term.free_symbols)

    def _is_time_term(self, term) -> bool:
        coefficient, symbol = term.as_coeff_Mul()
        return (isinstance(symbol, sp.Symbol) and self.names.get(symbol) in ("t", "s")
                and coefficient.is_Number)

    def _print_expm1(self, expr):
        return f"torch.expm1({self._print(expr.args[0])})"

    def _print_softplus(self, expr):
        # Above its threshold softplus returns u itself, off by log1p(exp(-u)): at the default 20 that is 1e-10 of
        # the value, above float64's rounding; at 40 it is 1e-19, and exp(40) is still finite in float32.
        return f"torch.nn.functional.softplus({self._print(expr.args[0])}, threshold=40)"

    def _print_log1p(self, expr):
        return f"torch.log1p({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"torch.abs({self._print(expr.args[0])})"

    def _print_sign(self, expr):  # d/dt(abs(u)); SymPy's default, math.copysign, takes no tensor
        return f"torch.sign({self._print(expr.args[0])})"

    def _print_Integral(self, expr):
        (var, lo, hi), = expr.limits
        inner = dict(self.names)
        arg = f"s{sum(1 for v in self.names.values() if v.startswith('s') and v[1:].isdigit())}"
        inner[var] = arg
        body = TensorPrinter(inner).doprint(expr.function)
        return f"self._quad(lambda {arg}: {body}, {self._print(lo)}, {self._print(hi)})"

    _where = "torch.where({cond}, {a}, {b})"
    _abs = "torch.abs"

    def _print_Smaller(self, expr):
        p, q, x, y = (self._print(a) for a in expr.args)
        return self._where.format(cond=f"{p} < {q}", a=x, b=y)

    def _print_ExpTail(self, expr):
        """Horner's rule for u^(k+1) (1/(k+1)! + u (1/(k+2)! + ...)) where |u| < ExpTail.bound(k), else the direct form."""
        arg, k = expr.args[0], int(expr.args[1])
        u = self._print(arg)
        series = ""
        for c in reversed(ExpTail.coefficients(k)):
            series = f"{c!r} + ({u}) * ({series})" if series else repr(c)
        direct = self._print(expm1(arg) - sum(arg**n / sp.factorial(n) for n in range(1, k + 1)))
        return self._where.format(cond=f"{self._abs}({u}) < {ExpTail.bound(k)!r}",
                                  a=f"({u})**{k + 1} * ({series})", b=direct)


class ScalarPrinter(_PowMixin, PythonCodePrinter):
    """Prints parameter-only constants with :mod:`math` (Python floats, float64)."""

    _sqrt = "math.sqrt"

    def __init__(self, names: dict[sp.Symbol, str]):
        super().__init__({"fully_qualified_modules": True, "strict": True})
        self.names = names

    def _print_Symbol(self, expr):
        if expr in self.names:
            return self.names[expr]
        raise InternalCompilerError(f"no name for symbol {expr} in a constant")

    _print_ExpTail = TensorPrinter._print_ExpTail
    _print_Smaller = TensorPrinter._print_Smaller
    _where = "({a} if {cond} else {b})"
    _abs = "abs"

    def _print_expm1(self, expr):
        return f"math.expm1({self._print(expr.args[0])})"

    def _print_log(self, expr):
        # log(1 + 1/100000), which SymPy keeps as log(100001/100000): math.log of the rounded ratio holds 1e-11 of
        # the value (a CDF 4e-13 below 0 at eps = 1e-5 for a rate th0 / (1 + t)); log1p of 1/100000 holds it all.
        arg = expr.args[0]
        if arg.is_Rational and arg != 1 and abs(arg - 1) < sp.Rational(1, 2):
            return f"math.log1p({self._print(arg - 1)})"
        return super()._print_log(expr)

    def _print_softplus(self, expr):
        u = self._print(expr.args[0])
        return f"(max({u}, 0.0) + math.log1p(math.exp(-abs({u}))))"

    def _print_Tabulated(self, expr):
        return f"self._table_at({expr.args[0]}, {self._print(expr.args[1])})"


@dataclass
class ConstantPool:
    """Parameter-only subexpressions, named ``_k0, _k1, ...`` in order of first use."""

    params: frozenset
    entries: dict[sp.Expr, sp.Symbol] = field(default_factory=dict)
    # Parameter-only factors of denominators that the parameters' assumptions do not keep from 0: theta - 1 in
    # c(t) = mu theta e^(-theta t) expm1((theta - 1) t) / (theta - 1), a closed form SymPy found for theta != 1.
    denominators: dict[sp.Expr, None] = field(default_factory=dict)

    def is_constant(self, expr: sp.Expr) -> bool:
        # A Total is known only once the tables are built: it stays in the method's code.
        return expr.free_symbols <= self.params and not expr.has(sp.Integral, Column, Total)

    def _note_denominators(self, expr: sp.Expr) -> None:
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Pow) and node.exp.is_negative:
                for factor in sp.Mul.make_args(node.base):
                    # Parameters only: a table's value (read after the constructor builds the tables) is not one.
                    if (factor.free_symbols and self.is_constant(factor) and not factor.has(Tabulated)
                            and factor.is_zero is not False):
                        self.denominators.setdefault(factor)

    def hoist(self, expr: sp.Expr) -> sp.Expr:
        if expr.is_Atom and not isinstance(expr, sp.NumberSymbol):
            return expr
        if self.is_constant(expr):
            self._note_denominators(expr)
            if expr.is_Rational or (expr.is_Mul and len(expr.args) == 2 and expr.args[0] == -1
                                    and expr.args[1].is_Symbol):
                return expr
            if expr not in self.entries:
                self.entries[expr] = sp.Symbol(f"_k{len(self.entries)}")
            return self.entries[expr]
        if isinstance(expr, sp.Pow) and expr.exp.is_negative:
            self._note_denominators(sp.Pow(expr.base, -1, evaluate=False))
        if isinstance(expr, sp.Integral):
            (var, lo, hi), = expr.limits
            return sp.Integral(self.hoist(expr.function), (var, self.hoist(lo), self.hoist(hi)))
        return expr.func(*(self.hoist(a) for a in expr.args))

    def lines(self, names: dict[sp.Symbol, str], tables: bool = False) -> list[str]:
        """The constants' assignments: those that read the numeric tables (tables=True), which the
        module computes after building them, or the others."""
        printer = ScalarPrinter(names)
        return [f"self.{sym.name} = {printer.doprint(expr)}" for expr, sym in self.entries.items()
                if expr.has(Tabulated) == tables]


@dataclass(frozen=True)
class Code:
    """Straight-line statements and the expressions they return."""

    lines: tuple[str, ...]
    results: tuple[str, ...]
    constant: tuple[bool, ...]  # result is a Python float (no tensor input)


def generate(exprs: list[sp.Expr], pool: ConstantPool, names: dict[sp.Symbol, str],
             helpers: tuple[tuple[sp.Symbol, sp.Expr], ...] = ()) -> Code:
    """Code for exprs after the stable rewrites, constant hoisting and CSE.

    ``helpers``: (local, body) pairs, a local standing in exprs for a helper the program names
    (codegen/fold.py); each is assigned first, ``beta = ...``, under the local's own name.
    """
    if not helpers:
        return _generate(exprs, pool, names)
    used = [(local, body) for local, body in helpers if any(e.has(local) for e in exprs)]
    first = _generate([body for _, body in used], pool, names)
    names = dict(names)
    names.update({local: local.name for local, _ in used})
    rest = _generate(exprs, pool, names, start=_locals(first))
    assignments = tuple(f"{local.name} = {value}" for (local, _), value in zip(used, first.results))
    return Code(first.lines + assignments + rest.lines, rest.results, rest.constant)


def _locals(code: Code) -> int:
    """How many CSE locals (w0, w1, ...) code assigns: the next method part numbers its own after them."""
    return sum(1 for line in code.lines if line.split(" = ", 1)[0].lstrip("w").isdigit())


# Stands for the step t - s in a method over a step [s, t] (discretize): printed as (t - s), computed before
# any coefficient multiplies it.
STEP = sp.Dummy("step")


def steps_grouped(expr: sp.Expr, names: dict[sp.Symbol, str]) -> sp.Expr:
    """expr with each c t - c s (c a number) in a sum written c (t - s): SymPy distributes a number over a sum, so
    the factor t - s that derivations find comes back as 6 t - 6 s, whose two float32 roundings are 6e-8 of 6 t each
    and, over a step of 1e-5, 6e-3 of the difference; t - s is exact in float32 for s in [t / 2, t]."""
    t = next((k for k, v in names.items() if v == "t"), None)
    s = next((k for k, v in names.items() if v == "s"), None)
    if t is None or s is None or not (expr.has(t) and expr.has(s)):
        return expr

    def group(add):
        ct, cs = add.coeff(t), add.coeff(s)
        if ct != 0 and ct.is_Number and ct == -cs:
            return ct * STEP + (add - ct * t - cs * s)
        return add

    return expr.replace(lambda e: e.is_Add, group)


def _generate(exprs: list[sp.Expr], pool: ConstantPool, names: dict[sp.Symbol, str], start: int = 0) -> Code:
    rewritten = [steps_grouped(expm1_tails(stable(e)), names) for e in exprs]
    if any(e.has(STEP) for e in rewritten):
        names = {**names, STEP: "(t - s)"}
    hoisted = [pool.hoist(e) for e in rewritten]
    # Integrals hold a bound variable: hide them from CSE, which would lift
    # pieces of the integrand out of the integral.
    integrals: dict[sp.Integral, sp.Symbol] = {}

    def hide(e):
        if isinstance(e, sp.Integral):
            if e not in integrals:
                integrals[e] = sp.Symbol(f"_q{len(integrals)}")
            return integrals[e]
        if e.is_Atom:
            return e
        return e.func(*(hide(a) for a in e.args))

    hidden = [hide(e) for e in hoisted]
    replacements, reduced = sp.cse(hidden, symbols=sp.numbered_symbols("_w", start=start), order="canonical")
    local = dict(names)
    local.update({sym: f"self.{sym.name}" for sym in pool.entries.values()})
    # Which values are Python floats, not tensors: parameters, hoisted constants and CSE locals made of them.
    varying = (set(names) - pool.params) | set(integrals.values())
    for sym, value in replacements:
        if value.free_symbols & varying:
            varying.add(sym)
    floats = frozenset(pool.params | set(pool.entries.values()) | {sym for sym, _ in replacements if sym not in varying})
    printer = TensorPrinter(local, floats)
    lines = []
    for integral, sym in integrals.items():
        local[sym] = sym.name.lstrip("_")
        lines.append(f"{local[sym]} = {printer.doprint(integral)}")
    for sym, value in replacements:
        local[sym] = sym.name.lstrip("_")
        lines.append(f"{local[sym]} = {printer.doprint(value)}")
    results = tuple(printer.doprint(r) for r in reduced)
    # A result is a Python float when it uses no tensor input, which CSE can reveal: the time cancels from
    # (1 + exp(-u)) / (exp(-u) + 1) only once both exponentials are one subexpression.
    constant = tuple(not r.free_symbols & varying for r in reduced)
    # One lookup per time serves every column the method reads there.
    lookups = [f"{local} = self._tables({at})" for at, local in printer.table_calls.items()]
    return Code(tuple(lookups + lines), results, constant)


__all__ = ["Code", "ConstantPool", "ScalarPrinter", "TensorPrinter", "generate", "stable", "expm1", "log1p"]
