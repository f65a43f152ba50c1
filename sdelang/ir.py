"""The intermediate representation: a checked program as SymPy expressions.

Every expression is in the time symbol ``t``, the state symbol ``x`` and the
parameter symbols; helper functions and constants have been inlined.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .errors import Source, Span


@dataclass(frozen=True)
class Parameter:
    name: str
    default: float
    symbol: sp.Symbol
    span: Span


@dataclass(frozen=True)
class Program:
    name: str
    source: Source
    params: tuple[Parameter, ...]
    t: sp.Symbol
    x: sp.Symbol
    drift: sp.Expr            # f(x, t)
    diffusion: sp.Expr        # g(t)
    eps: sp.Expr              # in the parameters only
    T: sp.Expr
    N: int
    v0: sp.Expr
    prior_mean: sp.Expr | None       # None: derived from the kernel at T
    prior_variance: sp.Expr | None
    weighting: str                   # "likelihood", "score_matching" or "custom"
    weighting_expr: sp.Expr | None   # lambda(t) when custom
    t_sampling: str                  # "uniform" or "importance"
    drift_span: Span
    diffusion_span: Span

    @property
    def defaults(self) -> dict[sp.Symbol, float]:
        return {p.symbol: p.default for p in self.params}
