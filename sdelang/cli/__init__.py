"""The command line: ``sdelang compile``, ``show``, and the runtime's ``train``, ``sample`` and ``nll``."""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys

from .. import __version__
from . import commands
from .dequantize import add_dequantize
from ..compiler import compile_source, read_source, write_module
from ..compiler.derive import CoupledDerivation, GeneralDerivation
from ..compiler.derive.general import reason
from .show import FORMATS, show
from ..errors import EnvironmentProblem, InternalCompilerError, SdeError, SolverError, describe_os_error


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


def _compile(args) -> int:
    params = _params(args.param)
    for path in args.files:
        compiled = compile_source(read_source(path), params)
        target = write_module(compiled, args.output)
        print(f"{path} -> {target}")
        for line in compiled.warnings:
            print(f"  warning: {line}", file=sys.stderr)
        for line in notes(compiled.derivation):
            print(f"  note: {line}")
    return 0


def notes(d) -> list[str]:
    """What the compiled module cannot do, and why (nothing for an affine SDE); checks that were only sampled."""
    sampled = [f"sampled check: {line}" for line in getattr(d.program, "sampled", ())]
    if isinstance(d, GeneralDerivation):
        return [f"no Gaussian kernel: {reason(d.program)}; training uses sliced score matching on simulated x_t",
                "unavailable: " + ", ".join(sorted(d.unavailable)) + " (see the module's `unavailable`)", *sampled]
    if isinstance(d, CoupledDerivation):
        return [f"coupled SDE ({', '.join(c.name for c in d.program.components)}); kernel: {d.kernel_path}",
                "unavailable: discretize, the scalar-kernel samplers (reverse_diffusion, ancestral, ald, ddim, "
                "dpm2 and the multistep dpmpp, unipc, deis and lms solvers) and the ScoreFlow bound; use em, pc, ode, "
                "heun, splitting or exponential", *sampled]
    return sampled


def _show(args) -> int:
    compiled = compile_source(read_source(args.file), _params(args.param))
    print(show(compiled.derivation, "latex" if args.latex else args.format))
    return 0


def _check(args) -> int:
    from .. import verify  # imports torch: only this command pays for it

    commands._set_threads(args)
    sde = verify.build(args.file, _params(args.param))
    results = verify.run_checks(sde, paths=args.paths, steps=args.steps, seed=args.seed, data_std=args.data_std)
    print(verify.to_json(results) if args.json else verify.format_table(results))
    return 0 if verify.passed(results) else 1


def add_check(sub) -> None:
    k = sub.add_parser("check", help="verify a compiled SDE numerically (exit status 1 when a check fails)",
                       description="Euler-Maruyama simulation against the kernel, the moment ODEs, the prior "
                                   "and KL(p_T || prior), the training-time sampler and float32 precision, "
                                   "in float64 on the CPU; see docs/check.md.")
    k.add_argument("file", metavar="FILE")
    k.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    k.add_argument("--paths", type=int, default=32768, help="Monte Carlo paths per starting point (default 32768)")
    k.add_argument("--steps", type=int, default=1000, help="Euler-Maruyama steps (default 1000)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--data-std", type=float, default=1.0,
                   help="standard deviation of the N(0, s^2) data used for KL(p_T || prior) (default 1)")
    k.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    # One thread by default: the checks run thousands of small tensor operations, which a second OpenMP
    # thread slows down (7x measured on a busy 2-core machine) rather than speeds up.
    k.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    k.set_defaults(run=_check)


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
    s.add_argument("--format", choices=FORMATS, default="text",
                   help="text (default), latex (a standalone document with one align* block: pdflatex or "
                        "matplotlib's mathtext render each row) or markdown (a table with $...$ math, for notes)")
    s.add_argument("--latex", action="store_true", help="the same as --format latex")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter default")
    s.set_defaults(run=_show)
    commands.add_train(sub, _params)
    commands.add_sample(sub)
    commands.add_nll(sub)
    add_dequantize(sub)
    add_check(sub)
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
    except (SolverError, FloatingPointError) as exc:   # the ODE solver or the training loss gave up
        print(f"sdelang {args.command}: {exc}", file=sys.stderr)
        return 1
    except EnvironmentProblem as exc:
        print(f"sdelang {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        if args.command in ("compile", "show"):  # the compiler reports user mistakes as SdeError
            return _bug(exc)
        text = describe_os_error(exc) if isinstance(exc, FileNotFoundError) else str(exc)
        print(f"sdelang {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `sdelang show FILE | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            return _bug(exc)
        print(f"sdelang {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _bug(exc)


# Operating-system errors that are about the user's files, disk or permissions, never sdelang's code.
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.EEXIST,
                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO, errno.EMFILE, errno.ELOOP}


def _bug(exc: Exception) -> int:
    """A bug: say so plainly; the traceback with SDELANG_DEBUG=1."""
    if os.environ.get("SDELANG_DEBUG"):
        raise exc
    print(f"sdelang: internal error (a bug in sdelang, please report it): "
          f"{type(exc).__name__}: {exc}\n  rerun with SDELANG_DEBUG=1 for the traceback", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
