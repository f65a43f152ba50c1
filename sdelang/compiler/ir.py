"""The intermediate representation: a checked program as SymPy expressions.

Every expression is in the time symbol ``t``, the state symbols and the
parameter symbols; helper functions and constants have been inlined.

Two shapes of program:
- `Program`: one state x per data entry, dx = f(x, t) dt + g(x, t) dw. Its `kind` is "affine"
  (f = a(t) x + b(t), g = g(t): Gaussian kernel) or "general" (anything else: no kernel).
- `CoupledProgram`: several components per data entry (e.g. position x and velocity v) with a drift
  linear in all of them and one noise per line: du = F(t) u dt + G(t) dw, G diagonal.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..errors import Source, Span


@dataclass(frozen=True)
class Parameter:
    name: str
    default: float
    symbol: sp.Symbol
    span: Span


@dataclass(frozen=True)
class Helper:
    """A function of t the program names, 'beta(t) = ...', with its body in the time symbol: inlined in every
    expression above, kept to write derived expressions through it again (codegen/fold.py). `argument` is the
    name the program gave the argument, for display ('U(y) = ...' applied to x is shown as written)."""

    name: str
    body: sp.Expr
    argument: str = "t"


@dataclass(frozen=True)
class GivenKernel:
    """The kernel N(m x0 + c, v) a program states instead of an SDE line ('x(t) ~ normal(...)', or
    'logsnr(t) = ...' for a variance-preserving one); the program's drift and diffusion are derived from it."""

    form: str                 # "kernel" or "logsnr"
    m: sp.Expr
    c: sp.Expr
    v: sp.Expr
    log_snr: sp.Expr | None   # logSNR(t) as written (the logsnr form)
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
    prior_span: Span | None = None   # the 'prior' line, when there is one
    sampling_span: Span | None = None  # the 't ~ ...' line
    weighting_span: Span | None = None
    affine: bool = True   # f = a(t) x + b(t) and g = g(t): the SDE has a Gaussian transition kernel
    given: GivenKernel | None = None  # the kernel the program states, when it has no SDE line
    sampled: tuple[str, ...] = ()  # checks decided on a grid only, not proved (check/sign.py)
    helpers: tuple[Helper, ...] = ()  # the functions of t it names, in the order written

    @property
    def kind(self) -> str:
        return "affine" if self.affine else "general"

    @property
    def defaults(self) -> dict[sp.Symbol, float]:
        return {p.symbol: p.default for p in self.params}


@dataclass(frozen=True)
class Component:
    """One line d<name> = drift dt + diffusion dw of a coupled SDE."""

    name: str
    symbol: sp.Symbol
    drift: sp.Expr                    # linear in the components
    diffusion: sp.Expr                # g_k(t); 0 for a component without noise
    init_mean: sp.Expr | None         # the initial law N(mean, variance) of an auxiliary component;
    init_variance: sp.Expr | None     # None for the data component
    span: Span


@dataclass(frozen=True)
class CoupledProgram:
    name: str
    source: Source
    params: tuple[Parameter, ...]
    t: sp.Symbol
    components: tuple[Component, ...]  # in the order written
    eps: sp.Expr
    T: sp.Expr
    N: int
    weighting: str                     # "likelihood" or "score_matching"
    t_sampling: str                    # "uniform" or "importance"
    sampled: tuple[str, ...] = ()      # checks decided on a grid only, not proved (check/sign.py)
    helpers: tuple[Helper, ...] = ()   # the functions of t it names, in the order written

    kind = "coupled"

    @property
    def data(self) -> int:
        """Index of the data component (the one without an initial law)."""
        return next(i for i, c in enumerate(self.components) if c.init_mean is None)

    @property
    def defaults(self) -> dict[sp.Symbol, float]:
        return {p.symbol: p.default for p in self.params}
