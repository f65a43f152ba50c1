"""Numeric tables for the scalar quantities that have no closed form.

Where SymPy finds no antiderivative a quantity holds an unevaluated Integral. Each such quantity
becomes a column of one table that the generated module builds, in float64, when it is constructed
(so that parameters given at construction are honoured):

    integral column  F(t) = int_L^t f(s) ds, L = 0 or eps; f may use earlier columns at s
    tail column      J(t) = int_t^T f(s) ds, integrated from T down (no cancellation as t -> T)
    value column     q(t) = an expression in t and earlier columns; stored for lookups

All columns share one partition of [0, T] into pieces, with 16 Chebyshev points of the first kind on
each; integrals are spectral (exact for the interpolant of f on a piece) and a piece is halved until
the last two Chebyshev coefficients of every integrand and stored value are below 1e-11 of its size
there (of 1 + its size for logs and CDFs, whose absolute error is what counts), or it is too short
to halve (rounding in a column's own formula is then all that is left). Pieces start graded
geometrically towards t = 0 (log t is what matters near eps) and the halving grades them further
wherever a quantity needs it: a pole just past T or a fast oscillation
gets short pieces, a smooth stretch long ones. A lookup costs a few elementwise torch ops (piece
search, cos(k acos x), a sum), with no loop over pieces and no host-device sync.

A second table, over u in [0, 1], holds log t of the inverse CDF of the training time: the t with
col(t) = col(eps) + u (col(T) - col(eps)) for a stored column col (logSNR, or the CDF itself), found
at its nodes by bisection on the first table.

The compiler checks the emitted tables against an independent solution (compiler/accuracy.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from ...errors import InternalCompilerError
from .symbolic import NUMERIC, Tabulated

BUILD_VARIABLE = sp.Dummy("t", positive=True)  # the nodes' times in the module's table builder


class Column(sp.Function):
    """Column(j, t): column j of the table at the build nodes (only in column definitions)."""

    nargs = 2

    def _eval_is_real(self):
        return True


class Total(sp.Function):
    """Total(j): integral column j at T, i.e. int_L^T of its integrand."""

    nargs = 1

    def _eval_is_real(self):
        return True


@dataclass(frozen=True)
class Spec:
    kind: str              # "integral", "tail" or "value"
    expr: sp.Expr          # integrand or value, in BUILD_VARIABLE and Column/Total of earlier columns
    lower: sp.Expr | None  # an integral's lower limit
    name: str = ""         # a value's meaning, for the module's docstring
    definition: sp.Expr | None = None  # a value's formula as derived (with Integrals)
    absolute: bool = False  # resolved to an absolute tolerance (a log, a CDF), else relative to its size


@dataclass
class Tables:
    """The columns of one module's tables, collected in dependency order while deriving."""

    t: sp.Symbol
    T: sp.Expr
    columns: list[Spec] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)  # Tabulated(k, .) is column stored[k]
    inverse: int | None = None                      # Tabulated index the inverse CDF inverts
    totals: dict[int, sp.Expr] = field(default_factory=dict)  # Total(j) -> its Integral

    def __bool__(self) -> bool:
        return bool(self.columns)

    def tabulate(self, expr: sp.Expr, name: str, absolute: bool) -> sp.Expr:
        """Tabulated(k, t) standing for expr (a function of t, with Integrals or earlier tables).

        ``absolute``: what matters is its absolute error (log m, log v, logSNR: the relative error of
        m, v, SNR; a CDF in [0, 1]), not the error relative to its size (c(t), which may be tiny).
        """
        spec = Spec("value", self._convert(expr, self.t).xreplace({self.t: BUILD_VARIABLE}), None, name, expr,
                    absolute)
        for k, j in enumerate(self.stored):
            if self.columns[j].expr == spec.expr:
                return Tabulated(k, self.t)
        self.columns.append(spec)
        self.stored.append(len(self.columns) - 1)
        return Tabulated(len(self.stored) - 1, self.t)

    def total(self, integrand: sp.Expr, lower: sp.Expr) -> sp.Expr:
        """Total(j): int_lower^T integrand dt, for code that runs after the build."""
        j = self._integral(self._convert(integrand, self.t).xreplace({self.t: BUILD_VARIABLE}), lower)
        s = sp.Dummy("s", positive=True)
        self.totals[j] = sp.Integral(integrand.xreplace({self.t: s}), (s, lower, self.T))
        return Total(j)

    def expand(self, expr: sp.Expr) -> sp.Expr:
        """expr with every table lookup replaced by the formula it stands for (for docstrings), unevaluated:
        evaluating products of nested Integrals makes SymPy's assumptions integrate them numerically."""
        with sp.evaluate(False):
            for _ in range(len(self.columns) + 1):
                if not expr.has(Tabulated, Total):
                    break
                expr = expr.replace(Tabulated, lambda k, x: self.columns[self.stored[int(k)]].definition.xreplace(
                    {self.t: x}))
                expr = expr.replace(Total, lambda j: self.totals[int(j)])
        return expr

    def invert(self, tabulated: sp.Expr) -> None:
        """Tabulate the inverse of a monotone stored column (the training time's inverse CDF)."""
        self.inverse = int(tabulated.args[0])

    @property
    def tails(self) -> tuple[int, ...]:
        return tuple(j for j, spec in enumerate(self.columns) if spec.kind == "tail")

    def _integral(self, integrand: sp.Expr, lower: sp.Expr | None, kind: str = "integral") -> int:
        spec = Spec(kind, integrand, lower)
        if spec in self.columns:
            return self.columns.index(spec)
        self.columns.append(spec)
        return len(self.columns) - 1

    def _convert(self, expr: sp.Expr, var: sp.Symbol) -> sp.Expr:
        """expr with each Integral over [L, var] as a Column, over [L, T] as a Total, and each
        Tabulated as the Column it reads."""
        if isinstance(expr, Tabulated):
            return Column(self.stored[int(expr.args[0])], self._convert(expr.args[1], var))
        if isinstance(expr, sp.Integral):
            (x, lower, upper), = expr.limits
            integrand = self._convert(expr.function, x).xreplace({x: BUILD_VARIABLE})
            if lower == var and upper == self.T:
                return Column(self._integral(integrand, None, "tail"), var)
            j = self._integral(integrand, lower)
            if upper == self.T:
                return Total(j)
            if upper == var:
                return Column(j, var)
            raise InternalCompilerError(f"an integral up to {upper} has no table column")
        if expr.is_Atom:
            return expr
        return expr.func(*(self._convert(a, var) for a in expr.args))


def tabulated(expr: sp.Expr) -> bool:
    """True if expr needs the numeric tables."""
    return expr.has(*NUMERIC, Total)
