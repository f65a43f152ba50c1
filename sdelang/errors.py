"""Errors: user mistakes (with a source span and a caret) and compiler bugs.

A user mistake is an :class:`SdeError`; the CLI prints it as
``file:line:col: message``, the source line and a caret, and exits with status 2.
Anything else escaping the compiler is a bug in sdelang, raised as
:class:`InternalCompilerError` so that it is never mistaken for the user's fault.
"""
from __future__ import annotations

from dataclasses import dataclass


_ONE_SPACE = {ord("\t"): " ", ord("\f"): " "}


@dataclass(frozen=True)
class Span:
    """A region of a source file: 1-based line and column, end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True)
class Source:
    """The text of a program and the name it is reported under."""

    text: str
    path: str = "<string>"

    def line_text(self, line: int) -> str:
        lines = self.text.split("\n")  # as the parser counts lines: a form feed does not end one
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""


class SdeError(Exception):
    """A mistake in the user's program or command line, reported with its location."""

    def __init__(self, message: str, span: Span | None = None, source: Source | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.source = source
        self.hint = hint

    def with_source(self, source: Source) -> "SdeError":
        if self.source is None:
            self.source = source
        return self

    def render(self) -> str:
        """``file:line:col: message``, then the source line with a caret under the span."""
        path = self.source.path if self.source else "sdelang"
        if self.span is None:
            head = f"{path}: error: {self.message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        span = self.span
        out = [f"{path}:{span.line}:{span.column}: error: {self.message}"]
        if self.source is not None:
            text = self.source.line_text(span.line).translate(_ONE_SPACE)  # keeps the caret's column
            width = (span.end_column - span.column) if span.end_line == span.line else len(text) - span.column + 1
            out.append(f"    {text}")
            out.append("    " + " " * (span.column - 1) + "^" + "~" * max(width - 1, 0))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class InternalCompilerError(Exception):
    """A bug in sdelang itself, never the user's mistake."""

    def __init__(self, message: str):
        super().__init__(f"internal compiler error (a bug in sdelang, please report it): {message}")


class SolverError(RuntimeError):
    """The runtime's adaptive ODE solver could not continue: the model, not sdelang, is the usual cause."""
