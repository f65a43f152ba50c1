"""Stage 1: source text -> AST (:mod:`sdelang.syntax`), with friendly syntax errors."""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from . import syntax as ast
from ..errors import SdeError, Source, Span

GRAMMAR_PATH = Path(__file__).resolve().parent / "grammar" / "sde.lark"


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    # No cache=True: lark would unpickle its tables from a file in the shared temporary folder, which
    # another user can plant (code execution). Building them takes about 30 ms, once per process.
    return Lark(GRAMMAR_PATH.read_text(encoding="utf-8"), parser="lalr", propagate_positions=True,
                maybe_placeholders=False)


# Expressions nest at most this deep (parentheses, operators, unary minus signs, calls, each one level):
# every later stage walks expressions recursively, and this keeps them far from Python's recursion limit.
MAX_DEPTH = 100
# Characters that are not text: control characters other than tab, form feed and line ends, lone
# surrogates, and a carriage return that does not end a line. Python itself reads a lone CR as a line
# end, so one inside a comment copied into a generated module would start a line of code there.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ud800-\udfff]|\r(?!\n)")


def parse(source: Source) -> ast.Module:
    """Parse a program; raise :class:`SdeError` pointing at the first syntax error.

    Every entry point (the command line, sdelang.load of a path or of text) reaches this with the text as
    written, line ends included, so they accept and refuse the same programs.
    """
    _check_characters(source)
    try:
        tree = _parser().parse(source.text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    _check_depth(tree, source)
    try:
        return _ToAst().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, SdeError):
            raise exc.orig_exc.with_source(source) from None
        raise


def _check_characters(source: Source) -> None:
    bad = _NOT_TEXT.search(source.text)
    if bad is None:
        return
    line = source.text.count("\n", 0, bad.start()) + 1
    column = bad.start() - (source.text.rfind("\n", 0, bad.start()) + 1) + 1
    char = bad.group()
    what = "a carriage return that does not end a line" if char == "\r" else f"the character {char!r}"
    hint = ("end lines with \\n or \\r\\n; a lone \\r is read as a line end by some tools and not by others"
            if char == "\r" else "a program is plain text; delete the character (it may be invisible in an editor)")
    raise SdeError(f"{what} (U+{ord(char):04X}) cannot appear in a program", Span(line, column, line, column + 1),
                   source, hint)


_SPLIT = "give parts of it names, e.g. 'a = ...' or 'a(t) = ...', and combine those"
_TOO_DEEP = {
    "add": ("this sum has too many terms", _SPLIT), "sub": ("this sum has too many terms", _SPLIT),
    "mul": ("this product has too many factors", _SPLIT), "div": ("this product has too many factors", _SPLIT),
    "neg": ("too many minus signs in a row", "two minus signs cancel: write one or none"),
    "paren": ("this expression is nested too deeply", _SPLIT),
}


def _check_depth(tree: Tree, source: Source) -> None:
    """Refuse an expression nested deeper than MAX_DEPTH, at the leftmost node beyond it (walked without recursion)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            what, hint = _TOO_DEEP.get(node.data, _TOO_DEEP["paren"])
            raise SdeError(f"{what} (more than {MAX_DEPTH} levels)", _meta_span(node.meta), source,
                           f"{hint}; parentheses, operators, minus signs and calls each count as a level")
        stack.extend((child, depth + 1) for child in reversed(node.children) if isinstance(child, Tree))


def _token_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


def _meta_span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _join(a: Span, b: Span) -> Span:
    return Span(a.line, a.column, b.end_line, b.end_column)


# The words of the language; none of them can name a parameter, constant, function or state.
RESERVED_WORDS = ("sde", "param", "steps", "v0", "prior", "weighting", "logsnr", "dt", "dw", "in",
                  "normal", "kernel", "likelihood", "score_matching", "uniform", "importance")
STATEMENT_HINT = ("each line is one statement, e.g. 'name = expr', 'name(t) = expr', 'param name = expr', "
                  "'dx = <drift> dt + <diffusion> dw', 't in [eps, T]' or 'steps 1000'")
FUNCTION_ARGUMENT_HINT = "define a helper as 'name(t) = expr'; multiplication is explicit: 'a * (b)'"
SDE_HINT = "write the SDE as 'dx = <drift> dt + <diffusion> dw', with no '*' before 'dt' or 'dw'"

_HUMAN = {"_NL": "end of line", "$END": "end of file", "NAME": "a name", "NUMBER": "a number",
          "D_DT": "d/dt", "SAMPLER": "uniform or importance"}
_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "CIRCUMFLEX", "__ANON_0"}
_ENDS = {"_NL", "$END"}
# A keyword at the start of a line followed by '=' or '(...) =': the keyword used as a name.
_KEYWORD_AS_NAME = re.compile(r"\s*(sde|param|steps|v0|prior|weighting|logsnr)\s*(\(.*?\)\s*)?=")
# Characters that look like an operator but are not ASCII, with the one to write instead.
_LOOKALIKES = {"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u2215": "/"}


def _describe(terminal: str) -> str:
    if terminal in _HUMAN:
        return _HUMAN[terminal]
    pattern = _parser().get_terminal(terminal).pattern
    return f"'{pattern.value}'" if pattern.type == "str" else terminal


def _syntax_error(exc: UnexpectedInput, source: Source) -> SdeError:
    if isinstance(exc, UnexpectedCharacters):
        char = source.text[exc.pos_in_stream]
        span = Span(exc.line, exc.column, exc.line, exc.column + 1)
        return SdeError(f"unexpected character {char!r}", span, source, hint=_character_hint(char))
    assert isinstance(exc, UnexpectedToken)  # the LALR parser reports the end of input as a $END token
    tok = exc.token
    if tok.type == "$END":
        lines = source.text.split("\n")
        span = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
    elif tok.type == "_NL":
        span = Span(tok.line, tok.column, tok.line, tok.column + 1)
    else:
        span = _token_span(tok)
    previous = exc.token_history[-1] if exc.token_history else None
    message, hint, span = _explain(tok, previous, set(exc.expected), span, source)
    return SdeError(message, span, source, hint=hint)


def _character_hint(char: str) -> str:
    if char in _LOOKALIKES:
        return f"write the ASCII '{_LOOKALIKES[char]}' instead"
    if char == ";":
        return "there is no ';': put each statement on its own line"
    if char == "\\":
        return "a backslash continues a statement only as the last character of a line"
    if char.isalpha():
        return "names are ASCII letters, digits and '_': spell Greek letters out, e.g. 'beta'"
    return "names are letters, digits and '_'; operators are + - * / ^ **"


def _explain(tok: Token, previous: Token | None, expected: set[str], span: Span,
             source: Source) -> tuple[str, str | None, Span]:
    """Turn the common mistakes into named errors; otherwise list what was expected."""
    found = "end of line" if tok.type in _ENDS else f"'{tok.value}'"
    line = source.line_text(span.line)
    prev = previous.type if previous is not None else None
    keyword = _KEYWORD_AS_NAME.match(line)
    if keyword and not (keyword.group(1) == "v0" and keyword.group(2) is None):
        word = keyword.group(1)
        column = keyword.start(1) + 1
        return (f"'{word}' is a reserved word and cannot be used as a name",
                "choose another name, e.g. '" + word + "_'", Span(span.line, column, span.line, column + len(word)))
    if prev == "SDE":
        return f"expected the SDE's name after 'sde', got {found}", "name the SDE, e.g. 'sde my_sde'", span
    if prev == "PARAM":
        return (f"expected the parameter's name after 'param', got {found}",
                "declare a parameter as 'param name = value', e.g. 'param beta_max = 20'", span)
    if prev == "PRIOR":
        return f"unknown prior {found}", "write 'prior normal(mean, variance)' or 'prior kernel'", span
    if "SAMPLER" in expected:
        return f"unknown distribution for t: {found}", "write 't ~ uniform' or 't ~ importance'", span
    if prev == "DT" and "PLUS" in expected:
        return f"expected '+' after 'dt', got {found}", SDE_HINT, span
    if prev == "D_DT":
        return f"expected '(' after d/dt, got {found}", "d/dt is the derivative operator: write 'd/dt(expr)'", span
    if tok.type == "DT" and (first := re.search(r"\bdt\b", line[:span.column - 1])) is not None:
        return "a second 'dt' in the SDE line", _one_drift_hint(line, first, span.column), span
    if tok.type in ("NAME", "NUMBER", "LPAR", "D_DT") and _OPERATORS & expected:
        hint = "multiplication is explicit: write '2 * t', not '2 t'"
        column = _unclosed(line, "(", span.column)
        if column is not None and re.search(r"\w\s*$", line[:column - 1]):
            hint = "separate arguments with ','; " + hint
        return f"missing operator before {found}", hint, span
    if tok.type in _ENDS and "DW" in expected:
        return "the SDE line must end with 'dw'", SDE_HINT, span
    if tok.type in _ENDS and {"NAME", "NUMBER"} <= expected:
        return (f"incomplete expression before {found}",
                "complete it, or end the line with a backslash '\\' to continue on the next one", span)
    for opening, closing, name in (("(", "RPAR", "'('"), ("[", "RSQB", "'['")):
        if closing in expected and tok.type != closing:
            column = _unclosed(line, opening, span.column)
            if column is None:
                return f"expected {_describe(closing)} before {found}", None, span
            return (f"{name} is never closed", f"add {_describe(closing)} before {found}",
                    Span(span.line, column, span.line, column + 1))
    if tok.type == "RPAR":
        return "unmatched ')'", "remove it, or add the '(' that it closes", span
    if prev in (None, "_NL"):
        hint = STATEMENT_HINT
        if tok.type in _OPERATORS:
            hint = "to continue the previous line, end it with a backslash '\\'"
        return f"a statement cannot start with {found}", hint, span
    if prev == "NAME" and expected <= {"EQUAL", "IN", "LPAR", "TILDE"}:
        return f"unexpected {found} after '{previous.value}'", STATEMENT_HINT, span
    if expected == {"TILDE"} and tok.type == "EQUAL":  # 'f(2) = ...' read as the start of 'v(0) ~ ...'
        opening = re.match(r"\s*\w+\s*\(\s*", line)
        number = re.match(r"[^)\s]*", line[opening.end():]).group(0)
        column = opening.end() + 1
        return (f"the arguments of a function definition are names, not '{number}'", FUNCTION_ARGUMENT_HINT,
                Span(span.line, column, span.line, column + max(len(number), 1)))
    if prev in ("LPAR", "COMMA") and expected == {"NAME"}:
        return f"the arguments of a function definition are names, not {found}", FUNCTION_ARGUMENT_HINT, span
    if expected <= _ENDS:
        if prev == "DW":
            return f"unexpected {found} after 'dw'", "'dw' ends the SDE line; " + SDE_HINT, span
        return f"unexpected {found} after the end of the statement", "one statement per line", span
    wanted = ", ".join(sorted(dict.fromkeys(_describe(e) for e in expected)))
    return f"unexpected {found}; expected {wanted}", None, span


def _one_drift_hint(line: str, first: re.Match, second: int) -> str:
    """'dx = -x dt + 1 dt + ...' -> a hint that writes the drift as one expression, '(-x + 1) dt'."""
    start = line.find("=", 0, first.start()) + 1  # 0 on a continued line, which has no 'dx ='
    terms = f"{line[start:first.start()].strip()} {line[first.end():second - 1].strip()}"
    written = " ".join(part for part in (line[:start].strip(), f"({terms}) dt + ...") if part)
    return f"the drift is one expression before a single 'dt': write {written}"


def _unclosed(line: str, opening: str, before: int) -> int | None:
    """The 1-based column of the last bracket left open in ``line`` before column ``before``."""
    closing = {"(": ")", "[": "]"}[opening]
    stack = []
    for i, char in enumerate(line[:before - 1]):
        if char == opening:
            stack.append(i + 1)
        elif char == closing and stack:
            stack.pop()
    return stack[-1] if stack else None


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
        if len(items) == 3:
            name, kind, value = items
            if str(kind) != "real":
                raise SdeError(f"unknown parameter kind '{kind}'", _token_span(kind),
                               hint="the only kind is 'real', for a parameter of any sign: 'param mu: real = 0.5'")
            return ast.ParamDef(str(name), value, _token_span(name), _meta_span(meta), real=True)
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

    def sde_def_unit_noise(self, meta, items):
        name, drift, _dt, dw = items
        return ast.SdeDef(str(name), drift, ast.Number("1", _token_span(dw)), _token_span(name), _meta_span(meta))

    def sde_def_brownian(self, meta, items):
        name, dw = items
        return ast.SdeDef(str(name), None, ast.Number("1", _token_span(dw)), _token_span(name), _meta_span(meta))

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

    def law_def(self, meta, items):
        """``v(0) ~ normal(...)`` (a number in the brackets): an initial law; ``x(t) ~ normal(...)``: a kernel."""
        var, time, mean, variance = items
        if time.type == "NUMBER":
            return ast.InitDef(str(var), str(time), mean, variance, _token_span(var), _token_span(time),
                               _meta_span(meta))
        return ast.KernelDef(str(var), str(time), mean, variance, _token_span(var), _token_span(time),
                             _meta_span(meta))

    def logsnr_def(self, meta, items):
        var, value = items
        return ast.LogSnrDef(str(var), value, _token_span(var), _meta_span(meta))

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

    def paren(self, meta, items):
        """``(a)`` is ``a`` with the parentheses in its span, so that a caret covers them."""
        return dataclasses.replace(items[0], span=_meta_span(meta))

    def neg(self, meta, items):
        return ast.Neg(items[0], _meta_span(meta))
