"""The Python API: sdelang.load (paths, program text, parameter overrides, the module cache),
sdelang.compile_file, the errors both raise, and the command's --help and --version.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import math
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import sdelang
from sdelang import loader
from sdelang.compiler import read_source

ROOT = Path(__file__).resolve().parents[1]
VP = ROOT / "examples" / "vp.sde"
# Quick to compile (a fraction of a second each), with closed forms to check against.
BM = "sde bm_api\nparam sigma = 2\ndx = sigma dw\n"                            # v(t) = sigma^2 t
OU = "sde ou_api\nparam theta = 1\ndx = -theta * x dt + sqrt(2) dw\n"           # v(t) = (1 - e^-2 theta t) / theta
SHIFT = "sde shift_api\nparam mu = -1\ndx = -(x - mu) dt + 1 dw\n"             # c(t) = mu (1 - e^-t)
BAD_DRIFT = "sde log_drift\ndx = -log(x) dt + sqrt(2) dw\nprior normal(0, 1)\n"  # log(x) is undefined for x <= 0
F64 = torch.float64
# Closed forms against the generated code in float64: the same few operations in another order,
# a few ulp apart; 1e-12 relative leaves a thousandfold margin and catches any wrong formula.
RTOL = 1e-12


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache and forgets the modules it loaded, as a new process would."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDELANG_CACHE", str(cache))
    before = set(sys.modules)
    yield cache
    for name in set(sys.modules) - before:
        if name.startswith("sdelang_generated_"):
            del sys.modules[name]


@pytest.fixture
def compiles(monkeypatch):
    """The calls load() makes to the compiler, counted."""
    calls = []
    real = loader.compile_source

    def counting(source, *args, **kwargs):
        calls.append(source.text)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(loader, "compile_source", counting)
    return calls


def cached_files(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def times(sde):
    return torch.tensor([sde.eps, 0.01, 0.3, sde.T], dtype=F64)


def import_code(code: str) -> types.ModuleType:
    module = types.ModuleType("sdelang_api_test")
    exec(compile(code, "<generated>", "exec"), module.__dict__)
    return module


# --- load ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [VP, str(VP)], ids=["Path", "str"])
def test_load_a_path_with_a_parameter_overridden(path):
    """load(path, beta_max=30) is the VP SDE with beta_max = 30: the attribute and every formula follow."""
    sde = sdelang.load(path, beta_max=30.0).double()
    assert isinstance(sde, torch.nn.Module)
    assert (sde.beta_min, sde.beta_max) == (0.1, 30.0)
    t = times(sde)
    B = 0.1 * t + (30.0 - 0.1) * t**2 / 2  # int_0^t beta
    torch.testing.assert_close(sde.std(t), torch.sqrt(-torch.expm1(-B)), rtol=RTOL, atol=0)
    torch.testing.assert_close(sde.mean_coeff(t), torch.exp(-B / 2), rtol=RTOL, atol=0)
    default = sdelang.load(path).double()
    assert default.beta_max == 20.0
    assert not torch.allclose(default.std(t[1:]), sde.std(t[1:]), rtol=1e-3)


def test_load_program_text():
    """Text with a line break is a program: load(text, theta=2) is that OU process with theta = 2."""
    sde = sdelang.load(OU, theta=2.0).double()
    t = times(sde)
    torch.testing.assert_close(sde.std(t) ** 2, -torch.expm1(-4.0 * t) / 2.0, rtol=RTOL, atol=0)
    torch.testing.assert_close(sde.mean_coeff(t), torch.exp(-2.0 * t), rtol=RTOL, atol=0)
    assert type(sde).__module__.startswith("sdelang_generated_")


def test_text_without_a_line_break_is_taken_for_a_path():
    """One line of program text is read as a file name, and refused as one."""
    with pytest.raises(sdelang.SdeError, match="expected a .sde file"):
        sdelang.load("sde bm dx = 1 dw")


def test_a_parameter_of_any_sign_accepts_any_sign():
    """A parameter with a negative default is only assumed real: a positive override is accepted and used."""
    sde = sdelang.load(SHIFT, mu=2.0).double()
    t = times(sde)
    torch.testing.assert_close(sde.mean_offset(t), -2.0 * torch.expm1(-t), rtol=RTOL, atol=0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_parameter_of_any_sign_must_be_finite(value):
    """Any sign, but a number: NaN or infinity would make every output NaN."""
    with pytest.raises(ValueError, match=r"^mu must be finite, got"):
        sdelang.load(SHIFT, mu=value)
    with pytest.raises(ValueError, match=r"^mu must be finite, got"):
        sdelang.load(ROOT / "examples" / "ou.sde", mu=value)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_override_against_a_positivity_assumption_raises_ValueError(value):
    """beta_min's default is positive, so the derivation assumed beta_min > 0: the constructor refuses others."""
    with pytest.raises(ValueError) as info:
        sdelang.load(VP, beta_min=value)
    message = str(info.value)
    assert message.startswith("beta_min must be positive")
    assert message.endswith(f"got {value!r}")


def test_unknown_parameter_is_refused():
    """Only declared parameters can be overridden: anything else is a TypeError naming it."""
    with pytest.raises(TypeError, match="beta"):
        sdelang.load(VP, beta=1.0)


# --- the cache -----------------------------------------------------------------------------------

def test_second_load_does_not_recompile(isolated_cache, compiles):
    """The first load compiles into the cache; later ones, in this process or a new one, do not compile."""
    first = sdelang.load(BM)
    assert len(compiles) == 1
    [cached] = cached_files(isolated_cache)
    assert re.fullmatch(r"sde_[0-9a-f]{20}\.py", cached.name)
    assert type(sdelang.load(BM, sigma=3.0)) is type(first)
    for name in [n for n in sys.modules if n.startswith("sdelang_generated_")]:
        del sys.modules[name]  # as in a new process: only the file remains
    again = sdelang.load(BM, sigma=3.0)
    assert len(compiles) == 1
    assert cached_files(isolated_cache) == [cached]
    t = times(again.double())
    torch.testing.assert_close(again.std(t), 3.0 * torch.sqrt(t), rtol=RTOL, atol=0)


def test_different_text_gives_a_different_cache_file(isolated_cache, compiles):
    """Any change to the text, even a comment, is a new cache entry: the cache never serves stale code."""
    sdelang.load(BM)
    sdelang.load(BM + "# a comment\n")
    assert len(compiles) == 2
    assert len(cached_files(isolated_cache)) == 2


def test_changed_compiler_fingerprint_gives_a_different_cache_file(isolated_cache, compiles, monkeypatch):
    """The same text compiled by a changed compiler is a new cache entry, not the old compiler's module."""
    sdelang.load(BM)
    monkeypatch.setattr(loader, "compiler_fingerprint", lambda: "0" * 64)
    sdelang.load(BM)
    assert len(compiles) == 2
    assert len(cached_files(isolated_cache)) == 2


PACKAGE = Path(loader.__file__).resolve().parent
# In a checkout sdelang/compiler/grammar is a symlink to ../../grammar, and Path.rglob does not descend into it.


def fingerprint() -> str:
    return loader.compiler_fingerprint.__wrapped__()  # uncached: computed from the files now


@pytest.fixture
def compiler_copy(tmp_path, monkeypatch):
    """A copy of the compiler laid out as the original (symlinks kept, their targets copied beside it).

    The loader is pointed at the copy, so that fingerprint() hashes the copy's files.
    """
    copy = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for link in [p for p in copy.rglob("*") if p.is_symlink()]:
        target = (PACKAGE / link.relative_to(copy)).resolve()
        dest = tmp_path / target.relative_to(PACKAGE.parent)
        if target.is_dir():
            shutil.copytree(target, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(target, dest)
    monkeypatch.setattr(loader, "__file__", str(copy / "loader.py"))
    return copy


def test_fingerprint_of_a_faithful_copy_is_the_same(compiler_copy, monkeypatch):
    """The fingerprint depends on the compiler's files only: a copy elsewhere, plus a stray file, has it too."""
    (compiler_copy / "NOTES.txt").write_text("not part of the compiler\n")
    copied = fingerprint()
    monkeypatch.setattr(loader, "__file__", str(PACKAGE / "loader.py"))
    assert fingerprint() == copied


@pytest.mark.parametrize("edited", [
    "compiler/codegen/templates/module.py.j2",
    "compiler/derive/kernel.py",
    "compiler/grammar/sde.lark",
    "compiler/check/positivity.py",
    "errors.py",
])
def test_fingerprint_changes_with_each_compiler_file(compiler_copy, edited):
    """Editing any compiler source (Python, template, grammar) changes the fingerprint, so the cache rebuilds."""
    path = compiler_copy / edited
    original = fingerprint()
    path.write_bytes(path.read_bytes() + b"\n")
    assert fingerprint() != original, f"editing {edited} leaves the fingerprint unchanged"


@pytest.mark.parametrize("edited", ["runtime/training.py", "runtime/sampling/dpmpp.py", "runtime/likelihood.py",
                                    "cli/commands.py"])
def test_fingerprint_ignores_the_runtime(compiler_copy, edited):
    """The runtime does not shape a generated module: editing it keeps cached modules valid."""
    path = compiler_copy / edited
    original = fingerprint()
    path.write_bytes(path.read_bytes() + b"\n")
    assert fingerprint() == original


def test_cache_honours_SDELANG_CACHE(tmp_path, monkeypatch, compiles):
    """The module is written under $SDELANG_CACHE, created if missing, and is the compiled code itself."""
    cache = tmp_path / "elsewhere" / "cache"
    monkeypatch.setenv("SDELANG_CACHE", str(cache))
    assert loader.cache_dir() == cache
    sdelang.load(BM)
    [cached] = cached_files(cache)
    assert cached.read_text(encoding="utf-8") == sdelang.compile_source(sdelang.Source(BM)).code


def test_cache_falls_back_to_XDG_CACHE_HOME(tmp_path, monkeypatch):
    """Without $SDELANG_CACHE (unset or empty) the cache is $XDG_CACHE_HOME/sdelang."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SDELANG_CACHE", "")
    assert loader.cache_dir() == tmp_path / "xdg" / "sdelang"
    monkeypatch.delenv("SDELANG_CACHE")
    assert loader.cache_dir() == tmp_path / "xdg" / "sdelang"


# --- compile_file --------------------------------------------------------------------------------

@pytest.fixture
def ou_file(tmp_path):
    path = tmp_path / "src" / "model.sde"  # the file's name differs from the SDE's
    path.parent.mkdir()
    path.write_text(OU)
    return path


def test_compile_file_writes_name_py_and_returns_its_path(ou_file, tmp_path):
    """compile_file(path, out_dir) writes out_dir/<sde name>.py (folders created) and returns that path."""
    out = tmp_path / "out" / "nested"
    target = sdelang.compile_file(ou_file, out)
    assert target == out / "ou_api.py"
    assert [p.name for p in out.iterdir()] == ["ou_api.py"]  # no temporary file left behind
    assert target.read_text(encoding="utf-8") == sdelang.compile_source(read_source(ou_file)).code
    sde = import_code(target.read_text(encoding="utf-8")).SDE(theta=2.0).double()
    t = times(sde)
    torch.testing.assert_close(sde.mean_coeff(t), torch.exp(-2.0 * t), rtol=RTOL, atol=0)


def test_compile_file_replaces_atomically(ou_file, tmp_path, monkeypatch):
    """The new module is written in full to a temporary file beside the old one, then renamed over it.

    Until the rename a reader sees the whole old module, afterwards the whole new one; never a part.
    """
    out = tmp_path / "out"
    out.mkdir()
    (out / "ou_api.py").write_text("# the previous module\n")
    code = sdelang.compile_source(read_source(ou_file)).code
    real_replace = sdelang.compiler.os.replace
    renames = []

    def replace(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent, "the temporary file is not in the target folder"
        assert dst.read_text() == "# the previous module\n"
        assert src.read_text(encoding="utf-8") == code
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(sdelang.compiler.os, "replace", replace)
    sdelang.compile_file(ou_file, out)
    assert renames == [out / "ou_api.py"]
    assert (out / "ou_api.py").read_text(encoding="utf-8") == code
    assert [p.name for p in out.iterdir()] == ["ou_api.py"]


def test_compile_file_defaults(ou_file, tmp_path, monkeypatch):
    """Without out_dir it writes generated/<name>.py under the current folder; params set the defaults."""
    monkeypatch.chdir(tmp_path)
    target = sdelang.compile_file(ou_file, params={"theta": 3.0})
    assert target == Path("generated") / "ou_api.py"
    signature = inspect.signature(import_code((tmp_path / target).read_text(encoding="utf-8")).SDE)
    assert signature.parameters["theta"].default == 3.0


# --- errors --------------------------------------------------------------------------------------

def assert_located(exc: sdelang.SdeError, path: str):
    """Rendered as path:line:col: error: ..., with the line and a caret under the drift."""
    assert exc.span is not None and exc.span.line == 2
    assert BAD_DRIFT.splitlines()[1][exc.span.column - 1:].startswith("-log(x)")
    lines = str(exc).splitlines()
    assert lines[0] == f"{path}:2:{exc.span.column}: error: {exc.message}"
    assert "not a finite real number" in exc.message
    assert lines[1].strip() == BAD_DRIFT.splitlines()[1]
    assert lines[2].index("^") == lines[1].index("-log(x)")


def test_bad_program_text_raises_a_located_error_and_caches_nothing(isolated_cache):
    """load() of a wrong program raises SdeError at the offending expression; the cache stays empty."""
    with pytest.raises(sdelang.SdeError) as info:
        sdelang.load(BAD_DRIFT)
    assert_located(info.value, "<string>")
    assert cached_files(isolated_cache) == []


def test_bad_program_file_raises_a_located_error_and_writes_nothing(isolated_cache, tmp_path):
    """load() and compile_file() of a wrong file name the file; neither the cache nor out_dir is written."""
    path = tmp_path / "log_drift.sde"
    path.write_text(BAD_DRIFT)
    out = tmp_path / "out"
    with pytest.raises(sdelang.SdeError) as info:
        sdelang.load(path)
    assert_located(info.value, str(path))
    with pytest.raises(sdelang.SdeError) as info:
        sdelang.compile_file(path, out)
    assert_located(info.value, str(path))
    assert cached_files(isolated_cache) == []
    assert not out.exists()


def test_compile_file_refuses_a_bad_override_and_writes_nothing(ou_file, tmp_path):
    """A compile-time override against the sign of the default is an SdeError at the parameter; no file."""
    out = tmp_path / "out"
    with pytest.raises(sdelang.SdeError, match="theta") as info:
        sdelang.compile_file(ou_file, out, params={"theta": -1.0})
    assert info.value.span is not None and info.value.span.line == 2
    assert not out.exists()


def test_public_api():
    """Everything in sdelang.__all__ exists; user mistakes and compiler bugs are different exceptions."""
    missing = [name for name in sdelang.__all__ if not hasattr(sdelang, name)]
    assert not missing
    assert not issubclass(sdelang.InternalCompilerError, sdelang.SdeError)
    assert not issubclass(sdelang.SdeError, sdelang.InternalCompilerError)


# --- the command ---------------------------------------------------------------------------------

def test_python_m_sdelang_help():
    """`python -m sdelang --help` prints the usage with both subcommands and exits with 0."""
    result = subprocess.run([sys.executable, "-m", "sdelang", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: sdelang")
    assert "compile" in result.stdout and "show" in result.stdout
    assert result.stderr == ""


def test_sdelang_version():
    """The installed `sdelang --version` prints the package version, which is the distribution's."""
    assert importlib.metadata.version("sdelang") == sdelang.__version__
    script = Path(sys.executable).with_name("sdelang")
    if not script.exists():
        script = shutil.which("sdelang")
    if script is None:
        pytest.skip("the sdelang script is not installed beside this interpreter or on PATH")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"sdelang {sdelang.__version__}\n"


def test_load_names_an_unknown_parameter():
    """A misspelt keyword is a TypeError that suggests the declared name and lists them all."""
    text = "sde ou\nparam theta = 1\ndx = -theta * x dt + sqrt(2 * theta) dw\n"
    with pytest.raises(TypeError, match=r"unknown parameter 'thet' \(did you mean 'theta'\?\); this SDE takes: theta, N"):
        sdelang.load(text, thet=2)
    assert sdelang.load(text, theta=2).theta == 2
