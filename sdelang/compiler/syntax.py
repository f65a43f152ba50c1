"""The abstract syntax tree: frozen dataclasses, each node carrying its source span."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..errors import Span


# -- expressions -------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    text: str
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    span: Span
    func_span: Span


@dataclass(frozen=True)
class Derivative:
    """``d/dt(expr)``."""

    expr: "Expr"
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / ^
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


Expr = Union[Number, Name, Call, Derivative, BinOp, Neg]


# -- statements --------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    name: str
    name_span: Span
    span: Span


@dataclass(frozen=True)
class ParamDef:
    name: str
    value: Expr
    name_span: Span
    span: Span
    real: bool = False  # 'param mu: real = 0.5': any sign; otherwise the default's sign is assumed


@dataclass(frozen=True)
class ConstDef:
    name: str
    value: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class FunctionDef:
    name: str
    args: tuple[str, ...]
    arg_spans: tuple[Span, ...]
    body: Expr
    name_span: Span
    span: Span


@dataclass(frozen=True)
class SdeDef:
    """``dx = drift dt + diffusion dw``; a missing term is None."""

    differential: str  # as written, e.g. "dx"
    drift: Expr | None
    diffusion: Expr | None
    name_span: Span
    span: Span


@dataclass(frozen=True)
class TimeDef:
    var: str
    eps: Expr
    T: Expr
    var_span: Span
    span: Span


@dataclass(frozen=True)
class StepsDef:
    value: Expr
    span: Span


@dataclass(frozen=True)
class V0Def:
    value: Expr
    span: Span


@dataclass(frozen=True)
class PriorDef:
    """``prior normal(mean, variance)``, or ``prior kernel`` (both None)."""

    mean: Expr | None
    variance: Expr | None
    span: Span


@dataclass(frozen=True)
class WeightingDef:
    kind: str  # "likelihood", "score_matching" or "custom"
    expr: Expr | None
    span: Span


@dataclass(frozen=True)
class SamplingDef:
    var: str
    kind: str  # "uniform" or "importance"
    var_span: Span
    span: Span


@dataclass(frozen=True)
class InitDef:
    """``v(0) ~ normal(mean, variance)``: the initial law of an auxiliary component."""

    var: str
    time: str        # as written; must be 0
    mean: Expr
    variance: Expr
    var_span: Span
    time_span: Span
    span: Span


@dataclass(frozen=True)
class KernelDef:
    """``x(t) ~ normal(mean, variance)``: the process given by its transition kernel from the data x(0)."""

    var: str          # the state, e.g. "x"
    time: str         # as written; must be t
    mean: Expr        # affine in the data x(0): alpha(t) x(0) + c(t)
    variance: Expr    # sigma(t)^2
    var_span: Span
    time_span: Span
    span: Span


@dataclass(frozen=True)
class LogSnrDef:
    """``logsnr(t) = expr``: a variance-preserving process given by its log signal-to-noise ratio."""

    var: str          # as written; must be t
    value: Expr
    var_span: Span
    span: Span


Statement = Union[Header, ParamDef, ConstDef, FunctionDef, SdeDef, TimeDef, StepsDef, V0Def,
                  PriorDef, WeightingDef, SamplingDef, InitDef, KernelDef, LogSnrDef]


@dataclass(frozen=True)
class Module:
    statements: tuple[Statement, ...]
