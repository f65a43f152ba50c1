"""The command line: ``sdelang compile``, ``show``, and the runtime's ``train``, ``sample`` and ``nll``."""
from __future__ import annotations

import argparse
import math
import os
import sys

import sympy as sp

from . import __version__, commands
from .compiler import compile_file, compile_source, read_source
from .derive import Derivation
from .codegen.emit import plain_names
from .codegen.printer import stable
from .derive.reverse import SCORE
from .errors import InternalCompilerError, SdeError, SolverError


def _param(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not name.strip().isidentifier() or not math.isfinite(number):
        raise SdeError(f"--param expects NAME=NUMBER, got {text!r}", hint="for example --param beta_max=30")
    return name.strip(), number


def _params(items: list[str]) -> dict[str, float]:
    return dict(_param(item) for item in items)


def _rows(d: Derivation) -> list[tuple[str, sp.Expr | str]]:
    p, k, imp = d.program, d.kernel, d.importance
    score = sp.Symbol("s(x,t)")
    return [
        ("drift f(x, t)", p.drift),
        ("a(t) (f = a x + b)", d.a),
        ("b(t)", d.b),
        ("diffusion g(t)", p.diffusion),
        ("g(t)^2", d.g2),
        ("kernel", d.kernel_path),
        ("mean coefficient m(t)", k.m),
        ("mean offset c(t)", k.c),
        ("variance v(t)", k.v),
        ("std sigma(t)", k.std),
        ("logSNR(t) = log(m^2/v)", d.log_snr),
        ("reverse drift f - g^2 s", d.reverse_drift.xreplace({SCORE: score})),
        ("flow drift f - g^2 s / 2", d.flow_drift.xreplace({SCORE: score})),
        (f"weighting lambda(t) ({p.weighting})", d.weight),
        ("t sampling", p.t_sampling),
        ("importance density q(t)", imp.density),
        ("importance CDF Q(t)", imp.cdf),
        *_inverse_rows(d),
        ("prior mean", d.prior_mean),
        ("prior variance", d.prior_variance),
        ("step ratio m(t)/m(s)", d.step.ratio),
        ("step variance G^2", d.step.variance),
        ("drift divergence", d.divergence),
        ("[eps, T]", f"[{sp.sstr(p.eps)}, {sp.sstr(p.T)}]"),
        ("N (steps)", str(p.N)),
        ("v0", p.v0),
    ]


def _inverse_rows(d: Derivation) -> list[tuple[str, sp.Expr | str]]:
    imp = d.importance
    if imp.inverse is None:
        return [("importance inverse CDF", d.inverse_cdf_path)]
    if imp.by_log_snr:
        return [("importance inverse CDF t(y)", imp.inverse),
                ("  at", "y = logSNR(eps) - u (logSNR(eps) - logSNR(T)), u ~ uniform(0, 1)")]
    return [("importance inverse CDF t(u)", imp.inverse)]


def show(d: Derivation, latex: bool = False) -> str:
    rows = _rows(d)
    width = max(len(name) for name, _ in rows)
    out = [f"sde {d.program.name} ({d.program.source.path})"]
    for name, value in rows:
        if isinstance(value, str):
            text = value
        else:
            value = plain_names(value)
            text = sp.latex(value) if latex else sp.sstr(stable(value))
        out.append(f"  {name.ljust(width)}  {text}")
    return "\n".join(out)


def _compile(args) -> int:
    params = _params(args.param)
    for path in args.files:
        target = compile_file(path, args.output, params)
        print(f"{path} -> {target}")
    return 0


def _show(args) -> int:
    compiled = compile_source(read_source(args.file), _params(args.param))
    print(show(compiled.derivation, latex=args.latex))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdelang", description="Compile forward SDEs into PyTorch modules.")
    parser.add_argument("--version", action="version", version=f"sdelang {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile .sde files into generated/<name>.py")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-o", "--output", default="generated", metavar="DIR", help="output folder (default: generated)")
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter default")
    c.set_defaults(run=_compile)
    s = sub.add_parser("show", help="print every derived quantity")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--latex", action="store_true", help="print LaTeX instead of plain text")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter default")
    s.set_defaults(run=_show)
    commands.add_train(sub, _params)
    commands.add_sample(sub)
    commands.add_nll(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SdeError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except InternalCompilerError as exc:
        print(f"sdelang: {exc}", file=sys.stderr)
        return 3
    except SolverError as exc:
        print(f"sdelang {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        if args.command in ("compile", "show"):  # the compiler reports user mistakes as SdeError
            return _bug(exc)
        print(f"sdelang {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _bug(exc)


def _bug(exc: Exception) -> int:
    """A bug: say so plainly; the traceback with SDELANG_DEBUG=1."""
    if os.environ.get("SDELANG_DEBUG"):
        raise exc
    print(f"sdelang: internal error (a bug in sdelang, please report it): "
          f"{type(exc).__name__}: {exc}\n  rerun with SDELANG_DEBUG=1 for the traceback", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
