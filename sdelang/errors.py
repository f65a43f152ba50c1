"""Errors: user mistakes (with a source span and a caret), the user's environment, and sdelang's bugs.

The command line's exit status says whose the problem is:

- 0: done;
- 1: a check failed (``sdelang check``) or the ODE solver could not continue (:class:`SolverError`);
- 2: the user's program, command line or environment: an :class:`SdeError` (``file:line:col``, the
  source line and a caret), an :class:`EnvironmentProblem` (a damaged checkpoint, a folder that cannot be
  written, a missing optional package, no CUDA device) or an operating-system error on the user's files;
- 3: a bug in sdelang (:class:`InternalCompilerError` or anything unexpected), never the user's fault.
"""
from __future__ import annotations

from dataclasses import dataclass


_ONE_SPACE = {ord("\t"): " ", ord("\f"): " "}
# Other control characters are shown as one visible character, so that the caret keeps its column and the
# terminal is not driven by them (an escape sequence, a carriage return back to the start of the line).
_ONE_SPACE.update({code: "\ufffd" for code in [*range(0x20), 0x7f] if chr(code) not in "\t\f"})


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


class EnvironmentProblem(Exception):
    """The user's machine or files stop the command: what happened and what to do, in one message."""


class MissingDependency(EnvironmentProblem, ImportError):
    """An optional package a feature needs is not installed (an ImportError too, for callers that expect one)."""

    def __init__(self, feature: str, package: str, extra: str):
        super().__init__(f"{feature} needs the {package} package, which is not installed; "
                         f"install it with: pip install 'sdelang[{extra}]' (or pip install {package})")
        self.feature, self.package, self.extra = feature, package, extra


def describe_os_error(exc: OSError, doing: str = "") -> str:
    """One line for an operating-system error on a user's file: the path, the reason, no errno noise."""
    reason = exc.strerror or str(exc)
    path = exc.filename if exc.filename is not None else ""
    where = f" {path}" if path else ""
    return f"cannot {doing or 'use'}{where}: {reason[0].lower() + reason[1:] if reason else 'failed'}"


class InternalCompilerError(Exception):
    """A bug in sdelang itself, never the user's mistake."""

    def __init__(self, message: str):
        super().__init__(f"internal compiler error (a bug in sdelang, please report it): {message}")


class SolverError(RuntimeError):
    """The runtime's adaptive ODE solver could not continue: the model, not sdelang, is the usual cause."""
