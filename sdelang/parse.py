"""Stage 1: source text -> AST (:mod:`sdelang.syntax`), with friendly syntax errors."""
from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import syntax as ast
from .errors import SdeError, Source, Span

GRAMMAR_PATH = Path(__file__).resolve().parent / "grammar" / "sde.lark"


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=False)


def parse(source: Source) -> ast.Module:
    """Parse a program; raise :class:`SdeError` pointing at the first syntax error."""
    try:
        tree = _parser().parse(source.text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    try:
        return _ToAst().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, SdeError):
            raise exc.orig_exc.with_source(source) from None
        raise


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _meta_span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _join(a: Span, b: Span) -> Span:
    return Span(a.line, a.column, b.end_line, b.end_column)


_HUMAN = {"_NL": "end of line", "$END": "end of file", "NAME": "a name", "NUMBER": "a number",
          "D_DT": "d/dt", "SAMPLER": "uniform or importance"}


def _describe(terminal: str) -> str:
    if terminal in _HUMAN:
        return _HUMAN[terminal]
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    return f"'{pattern.value}'" if pattern.type == "str" else terminal


def _syntax_error(exc: UnexpectedInput, source: Source) -> SdeError:
    if isinstance(exc, UnexpectedCharacters):
        char = source.text[exc.pos_in_stream] if exc.pos_in_stream < len(source.text) else "?"
        span = Span(exc.line, exc.column, exc.line, exc.column + 1)
        return SdeError(f"unexpected character {char!r}", span, source,
                        hint="names are letters, digits and '_'; operators are + - * / ^ **")
    if isinstance(exc, UnexpectedEOF):
        lines = source.text.splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        return SdeError("unexpected end of file", span, source)
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    expected = sorted(exc.expected)
    if tok.type == "$END":
        lines = source.text.splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
    elif tok.type == "_NL":
        span = Span(tok.line, tok.column, tok.line, tok.column + 1)
    else:
        span = _token_span(tok)
    message, hint = _explain(tok, expected, exc)
    return SdeError(message, span, source, hint=hint)


def _explain(tok: Token, expected: list[str], exc: UnexpectedToken) -> tuple[str, str | None]:
    """Turn the common mistakes into named errors; otherwise list what was expected."""
    found = "end of line" if tok.type in ("_NL", "$END") else f"'{tok.value}'"
    operators = {"STAR", "PLUS", "MINUS", "SLASH"}
    if tok.type in ("NAME", "NUMBER", "LPAR", "D_DT") and operators & set(expected):
        return (f"missing operator before {found}",
                "multiplication is explicit: write '2 * t', not '2 t'")
    if tok.type in ("DT", "DW") and "NAME" in expected:
        return (f"'{tok.value}' must follow a whole term, not an operator",
                "write the SDE as 'dx = <drift> dt + <diffusion> dw', e.g. 'dx = -x dt + sqrt(2) dw'")
    if tok.type in ("_NL", "$END") and "RPAR" in expected:
        return "unclosed '(' at end of line", "close every '(' before the end of the statement"
    if tok.type in ("_NL", "$END") and "RSQB" in expected:
        return "unclosed '[' at end of line", "the time interval is written 't in [1e-5, 1]'"
    if tok.type == "RPAR" and "RPAR" not in expected:
        return "unmatched ')'", None
    wanted = ", ".join(dict.fromkeys(_describe(e) for e in expected))
    return f"unexpected {found}; expected {wanted}", None


@v_args(meta=True)
class _ToAst(Transformer):
    """Parse tree -> :mod:`sdelang.syntax` nodes."""

    # -- statements
    def start(self, meta, items):
        return ast.Module(tuple(items))

    def header(self, meta, items):
        (name,) = items
        return ast.Header(str(name), _token_span(name), _meta_span(meta))

    def param_def(self, meta, items):
        name, value = items
        return ast.ParamDef(str(name), value, _token_span(name), _meta_span(meta))

    def const_def(self, meta, items):
        name, value = items
        return ast.ConstDef(str(name), value, _token_span(name), _meta_span(meta))

    def function_def(self, meta, items):
        name, *args, body = items
        return ast.FunctionDef(str(name), tuple(str(a) for a in args), tuple(_token_span(a) for a in args),
                               body, _token_span(name), _meta_span(meta))

    def sde_def(self, meta, items):
        name, drift, _dt, diffusion, _dw = items
        return ast.SdeDef(str(name), drift, diffusion, _token_span(name), _meta_span(meta))

    def sde_def_no_drift(self, meta, items):
        name, diffusion, _dw = items
        return ast.SdeDef(str(name), None, diffusion, _token_span(name), _meta_span(meta))

    def sde_def_no_noise(self, meta, items):
        name, drift, _dt = items
        return ast.SdeDef(str(name), drift, None, _token_span(name), _meta_span(meta))

    def time_def(self, meta, items):
        var, eps, T = items
        return ast.TimeDef(str(var), eps, T, _token_span(var), _meta_span(meta))

    def steps_def(self, meta, items):
        return ast.StepsDef(items[0], _meta_span(meta))

    def v0_def(self, meta, items):
        return ast.V0Def(items[0], _meta_span(meta))

    def prior_def(self, meta, items):
        mean, variance = items
        return ast.PriorDef(mean, variance, _meta_span(meta))

    def prior_kernel(self, meta, items):
        return ast.PriorDef(None, None, _meta_span(meta))

    def weighting_likelihood(self, meta, items):
        return ast.WeightingDef("likelihood", None, _meta_span(meta))

    def weighting_score_matching(self, meta, items):
        return ast.WeightingDef("score_matching", None, _meta_span(meta))

    def weighting_custom(self, meta, items):
        return ast.WeightingDef("custom", items[0], _meta_span(meta))

    def sampling_def(self, meta, items):
        var, kind = items
        return ast.SamplingDef(str(var), str(kind), _token_span(var), _meta_span(meta))

    # -- expressions
    def number(self, meta, items):
        (tok,) = items
        return ast.Number(str(tok), _token_span(tok))

    def name(self, meta, items):
        (tok,) = items
        return ast.Name(str(tok), _token_span(tok))

    def call(self, meta, items):
        func, *args = items
        return ast.Call(str(func), tuple(args), _meta_span(meta), _token_span(func))

    def derivative(self, meta, items):
        _op, expr = items
        return ast.Derivative(expr, _meta_span(meta))

    def _binop(op):  # noqa: N805 - a factory for the four binary rules below
        def build(self, meta, items):
            left, right = items
            return ast.BinOp(op, left, right, _join(left.span, right.span))
        return build

    add, sub, mul, div, pow = _binop("+"), _binop("-"), _binop("*"), _binop("/"), _binop("^")

    def neg(self, meta, items):
        return ast.Neg(items[0], _meta_span(meta))
