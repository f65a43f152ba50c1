"""Inputs that must not break a neighbour, crash the compiler or run past its bound (tests/errors/ holds
the exact messages; this file checks what a message cannot show)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import sdelang
import sdelang.compiler as compiler
from sdelang.cli import main
from sdelang.errors import SdeError, Source

ROOT = Path(__file__).resolve().parent.parent
OU = "sde ou_hostile\ndx = -x dt + sqrt(2) dw\n"


def test_every_generated_module_imports_beside_the_others():
    """Run from inside generated/ (so that each module's folder comes first on sys.path, as for a user's
    script there), import every module: none shadows a module another one imports."""
    names = sorted(p.stem for p in (ROOT / "generated").glob("*.py"))
    assert len(names) >= 10
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n"
              "    module = importlib.import_module(name)\n"
              "    assert module.__file__.startswith(sys.path[0]), module.__file__\n"
              "    assert isinstance(module.SDE, type)\n"
              "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "generated", capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr


@pytest.mark.parametrize("text", [
    "sde ou_cr\n# a comment\rwith a carriage return\ndx = -x dt + sqrt(2) dw\n",
    "sde ou_nul\n# a comment \x00 with a NUL\ndx = -x dt + sqrt(2) dw\n",
    "sde ou_crlf\r\n# Windows line ends\r\ndx = -x dt + sqrt(2) dw\r\n",
])
def test_command_line_and_load_read_text_the_same(text, tmp_path, capsys):
    """The same bytes give the same answer from a file on the command line and from sdelang.load(text)."""
    path = tmp_path / "program.sde"
    path.write_bytes(text.encode())
    status = main(["compile", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    try:
        sdelang.load_module(text)
        loaded = None
    except SdeError as exc:
        loaded = exc.render()
    if status == 0:
        assert loaded is None
    else:
        assert status == 2 and loaded is not None
        assert err.replace(str(path), "<string>") == loaded + "\n"


def test_file_name_with_control_characters_gives_a_module_that_imports(tmp_path, capsys):
    """The source's file name is copied into the module's docstring: a CR or an escape in it is escaped."""
    path = tmp_path / "odd\rname\x1b.sde"
    path.write_text(OU)
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 0
    code = (tmp_path / "out" / "ou_hostile.py").read_text()
    assert "\r" not in code and "\x1b" not in code
    namespace: dict = {}
    exec(compile(code, "ou_hostile.py", "exec"), namespace)
    assert "odd\rname\x1b.sde" in namespace["__doc__"]


def test_an_output_folder_that_cannot_be_written_is_a_user_error(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    path = tmp_path / "ou.sde"
    path.write_text(OU)
    assert main(["compile", str(path), "-o", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "hint:" in err and "Traceback" not in err


def test_a_compilation_stops_at_its_deadline_with_an_error_at_the_sde_line(monkeypatch):
    """2,000 helpers in a chain keep the checks (unbounded code, outside any SymPy call with its own limit) busy for
    seconds: with the bound lowered to 1 s the compilation ends in about that much CPU time, located at the SDE line.
    d/dt(abs(t - 0.5)) in the drift was this test's program while its integrals were evaluated numerically to decide
    constancy; it compiles within 10 s now (numeric tables)."""
    monkeypatch.setattr(compiler, "COMPILE_SECONDS", 1.0)
    text = ("sde chain\nsteps 100\nf0(t) = 1 + t\n"
            + "".join(f"f{k}(t) = f{k - 1}(t) + t / {k}\n" for k in range(1, 2000)) + "dx = -x dt + sqrt(f1999(t)) dw\n")
    start = time.process_time()
    with pytest.raises(SdeError) as info:
        compiler.compile_source(Source(text, "chain.sde"))
    assert time.process_time() - start < 10.0
    assert "took more than 1 s of CPU time" in info.value.message
    assert (info.value.span.line, info.value.span.column) == (2003, 1)
    monkeypatch.setattr(compiler, "COMPILE_SECONDS", 10.0)
    sign_drift = "sde sign_drift\nsteps 100\ndx = -(1 + d/dt(abs(t - 0.5))) * x dt + 1 dw\n"
    assert not compiler.compile_source(Source(sign_drift, "sign_drift.sde")).derivation.kernel.closed_form


def test_a_kernel_form_compilation_past_its_deadline_is_located_at_the_kernel(monkeypatch):
    """A process given by its kernel has no SDE line: the deadline's error was reported without a place. It is at
    the kernel statement now (EDM's sigma with rho a parameter, VP-scaled, once took the whole 60 s)."""
    monkeypatch.setattr(compiler, "COMPILE_SECONDS", 0.2)
    text = ("sde karras3\nparam smin = 0.002\nparam smax = 80\nparam rho = 3\n"
            "sigma(t) = (smin^(1/rho) + t * (smax^(1/rho) - smin^(1/rho)))^rho\n"
            "x(t) ~ normal(x(0) / sqrt(1 + sigma(t)^2), sigma(t)^2 / (1 + sigma(t)^2))\n"
            "weighting likelihood\nt ~ importance\n")
    with pytest.raises(SdeError) as info:
        compiler.compile_source(Source(text, "karras3.sde"))
    assert "took more than 0.2 s of CPU time" in info.value.message
    assert (info.value.span.line, info.value.span.column) == (6, 1)


def test_ten_thousand_parameters_compile_well_within_the_bound():
    """Forms tied at the defaults are measured with one parameter at a time moved 100-fold: every parameter of the
    program was, 20,000 copies of 10,000 defaults, past the 60 s bound. Only those the forms use are now (2 s)."""
    text = ("sde params\n" + "".join(f"param p{i} = 1\n" for i in range(10_000))
            + "dx = -p0 * x dt + sqrt(2 * p9999) dw\n")
    compiled = compiler.compile_source(Source(text, "params.sde"))   # an SdeError past the bound
    assert "def __init__(self, p0: float = 1" in compiled.code


def test_positivity_is_proved_not_sampled_for_plain_coefficients():
    """A linear beta(t) under a square root, a custom weighting and a coupled noise are decided exactly: the
    program records no sampled check (an empty root set once sent every program to the grid)."""
    from sdelang.compiler.check import check
    from sdelang.compiler.parse import parse

    text = ("sde vp_exact\nparam beta_max = 20\nbeta(t) = 0.1 + t * (beta_max - 0.1)\n"
            "dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw\nweighting 1 + t^2\n")
    source = Source(text, "vp_exact.sde")
    assert check(parse(source), source).sampled == ()


def test_sign_decision_against_known_roots():
    """decide() finds the zero, the negative piece and the pole, and proves positivity where there is none."""
    import sympy as sp

    from sdelang.compiler.check.sign import decide

    t = sp.Symbol("t", positive=True)
    lo, hi = sp.Rational(1, 100000), sp.Integer(1)
    assert decide(1 + t, t, lo, hi) == (True, None)
    done, failure = decide(sp.Abs(t - sp.Rational(3, 10)), t, lo, hi)
    assert done and (failure.what, failure.t) == ("zero", 0.3)
    done, failure = decide(sp.Abs(t - sp.Rational(3, 10)) - sp.Rational(1, 10000), t, lo, hi)
    assert done and failure.what == "negative" and failure.piece == (0.2999, 0.3001)
    done, failure = decide(1 / (t - sp.Rational(3, 10)) ** 2, t, lo, hi)
    assert done and (failure.what, failure.t) == ("infinite", 0.3)
    done, failure = decide(sp.sqrt(t - sp.Rational(1, 4)), t, lo, hi)
    assert done and failure.what == "not real" and failure.t < 0.25


def test_a_kink_in_the_drift_compiles_to_a_module_that_runs_on_tensors():
    """d/dt(abs(t - 0.5)) is sign(t - 0.5): printed for tensors (torch.sign), not math.copysign, which raised
    'Boolean value of Tensor' inside the compiler's own accuracy check (exit 3, found by compile_bound.py)."""
    import torch

    text = "sde kink\ndx = -(1 + d/dt(abs(t - 0.5))) * x dt + 1 dw\n"
    code = compiler.compile_source(Source(text, "kink.sde")).code
    namespace: dict = {"__name__": "kink"}
    exec(compile(code, "kink.py", "exec"), namespace)
    sde = namespace["SDE"]()
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    x = torch.ones(2, 1, dtype=torch.float64)
    drift, _ = sde.sde(x, t)
    assert torch.allclose(drift[:, 0], torch.tensor([0.0, -2.0], dtype=torch.float64))


@pytest.mark.parametrize("T", ["1e20", "3e38"])
def test_a_horizon_past_2_to_the_64_builds_a_module(T):
    """T up to float32's largest number, which check refuses past (tests/errors/T_past_float32): an integer T
    printed as a Python int past 2^64 stopped torch.clamp in t_icdf ('int too big to convert', an internal
    error). The OU process's std is 1 at T and t_icdf(1) = T, in float32 and float64."""
    import torch

    code = compiler.compile_source(Source(f"{OU}t in [1e-5, {T}]\n", "long.sde")).code
    namespace: dict = {"__name__": "long"}
    exec(compile(code, "long.py", "exec"), namespace)
    for dtype in (torch.float32, torch.float64):
        sde = namespace["SDE"]().to(dtype)
        end = torch.tensor([float(T)], dtype=dtype)
        assert torch.allclose(sde.std(end), torch.ones(1, dtype=dtype))
        assert sde.t_icdf(torch.ones(1, dtype=dtype)).item() == end.item()


def test_a_parameter_at_zero_leaks_no_numpy_warning():
    """dx = -k x dt + dw with k = 0: every candidate form of the kernel is 0/0 at the default, so the compile-time
    reference has no value there (NaN), and numpy's 'All-NaN slice encountered' once reached the terminal."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiler.compile_source(Source("sde still\nparam k = 0\ndx = -k * x dt + dw\n", "still.sde"))
