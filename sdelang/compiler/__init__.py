"""The compiler driver: one call per stage.

    source text --parse--> AST --check--> IR (SymPy) --derive--> Derivation --emit--> Python source

parse:  grammar/sde.lark with lark; syntax errors point at the token.
check:  resolves names, inlines helpers, refuses what is wrong or not supported yet.
derive: classification, kernel, logSNR, reverse/flow drifts, weighting, importance
        sampler, prior, discretisation, divergence (derive/, one module each).
emit:   a standalone torch module from codegen/templates/*.py.j2.
accuracy: a scalar SDE with numeric tables has them measured against an independent solution
        (accuracy.py); the result goes into the module's docstring, a miss into `warnings`.

Nothing here imports torch but accuracy.py, and only for SDEs with numeric tables: the runtime
(sdelang/runtime/) uses what this package writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdeError, Source, Span
from ..files import CannotWrite, write_atomic
from . import accuracy, check, codegen, derive, parse  # the stages, one module (or package) each
from .derive import Derivation
from .syntax import KernelDef, LogSnrDef, SdeDef
from .timelimit import Budget, with_deadline

SYMPY_BUDGET = 20.0  # seconds of bounded SymPy work per compilation
# The hard bound on one compilation (CPU seconds, parse to emitted code): the SymPy budget, the checks'
# own bounded calls and everything unbounded between them. benchmarks/compile_time.py measures the worst
# case over large and pathological programs (docs/benchmarks.md).
COMPILE_SECONDS = 60.0


@dataclass(frozen=True)
class Compiled:
    derivation: Derivation
    code: str
    timeouts: int  # SymPy calls that ran out of time (their numeric fallbacks were used)
    warnings: tuple[str, ...] = ()  # what the user should know about the module (printed by the CLI)

    @property
    def name(self) -> str:
        return self.derivation.program.name


def read_source(path: str | os.PathLike) -> Source:
    if Path(path).suffix != ".sde":
        raise SdeError(f"{path}: expected a .sde file")
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SdeError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise SdeError(f"{path} is a folder, not a .sde file") from None
    except OSError as exc:
        raise SdeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Source(data.decode("utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise _not_utf8(data, exc, str(path)) from None


def _not_utf8(data: bytes, exc: UnicodeDecodeError, path: str) -> SdeError:
    """A file in another encoding: located at the first byte that is not UTF-8, with a caret under it."""
    before = data[:exc.start]
    line = before.count(b"\n") + 1
    line_start = before.rfind(b"\n") + 1
    column = len(data[line_start:exc.start].decode("utf-8", errors="replace")) + 1
    shown = data.decode("utf-8", errors="replace")
    return SdeError(f"byte 0x{data[exc.start]:02x} is not UTF-8: .sde files are read as UTF-8",
                    Span(line, column, line, column + 1), Source(shown, path),
                    hint=f"convert the file, e.g. iconv -f latin1 -t utf-8 {path} > fixed.sde "
                         "(if it is in Latin-1), or remove the character")


def compile_source(source: Source, params: dict[str, float] | None = None) -> Compiled:
    """Run every stage on a program; ``params`` overrides parameter defaults.

    The whole compilation, not only its bounded SymPy calls, ends within COMPILE_SECONDS of CPU time: with a
    module, or with an error located at the SDE line.
    """
    try:
        done, compiled = with_deadline(COMPILE_SECONDS, _stages, source, params or {})
        if not done:
            raise SdeError(f"compiling this program took more than {COMPILE_SECONDS:g} s of CPU time, sdelang's "
                           f"bound for one program, and was stopped", _sde_line(source), source,
                           "simplify the SDE or its helpers (smaller expressions, fewer nested calls); a formula "
                           "that SymPy cannot integrate or simplify quickly is the usual cause")
        return compiled
    except SdeError as exc:
        raise exc.with_source(source) from None


def _stages(source: Source, params: dict[str, float]) -> Compiled:
    program = check.check(parse.parse(source), source, params)
    with Budget(SYMPY_BUDGET) as budget:
        derivation = derive.derive(program)
        code = codegen.emit(derivation)
    warnings = ()
    if isinstance(derivation, Derivation) and derivation.tables:
        report = accuracy.check_tables(derivation, code)
        # The report's place in the docstring comes before the source text, so the first match is it.
        code = code.replace(codegen.UNCHECKED, report.text(), 1)
        warnings = tuple(w for w in [report.warning()] if w)
    return Compiled(derivation, code, budget.exhausted, warnings)


def _sde_line(source: Source) -> Span | None:
    """Where a compilation that ran out of time is reported: the first SDE line, or the kernel or logSNR that
    defines the process (the derivations start there)."""
    try:
        module = parse.parse(source)
    except SdeError:
        return None
    return next((st.span for st in module.statements if isinstance(st, (SdeDef, KernelDef, LogSnrDef))), None)


def compile_file(path: str | os.PathLike, out_dir: str | os.PathLike = "generated",
                 params: dict[str, float] | None = None) -> Path:
    """Compile ``path`` into ``out_dir/<name>.py`` (written atomically) and return that path."""
    return write_module(compile_source(read_source(path), params), out_dir)


def write_module(compiled: Compiled, out_dir: str | os.PathLike = "generated") -> Path:
    """Write ``out_dir/<name>.py`` atomically and return its path."""
    target = Path(out_dir) / f"{compiled.name}.py"
    try:
        write_atomic(target, compiled.code)
    except OSError as exc:  # a CannotWrite already names the target
        raise SdeError(str(exc) if isinstance(exc, CannotWrite) else f"cannot write {target}: {exc.strerror or exc}",
                       hint="choose an output folder you can write with -o DIR") from None
    return target
