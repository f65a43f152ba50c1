"""The command line: `sdelang compile` and `sdelang show`, their output, exit codes and file handling."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdelang import compiler
from sdelang.cli import main

ROOT = Path(__file__).resolve().parent.parent
OU = "sde ou\nparam theta = 1\ndx = -theta * x dt + sqrt(2) dw\n"
BAD = "sde ou\nparam theta = 1\ndx = -theta * x dt + sqrt(2) dw\nsteps 0\n"


@pytest.fixture
def program(tmp_path):
    def write(text: str, name: str = "ou.sde") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return write


def test_compile_writes_the_module_and_prints_the_mapping(program, tmp_path, capsys):
    source, out = program(OU), tmp_path / "out"
    assert main(["compile", str(source), "-o", str(out)]) == 0
    target = out / "ou.py"
    assert capsys.readouterr().out == f"{source} -> {target}\n"
    assert sorted(p.name for p in out.iterdir()) == ["ou.py"]
    code = target.read_text()
    compile(code, str(target), "exec")  # valid Python
    assert "class OUSDE(torch.nn.Module)" in code
    assert "theta: float = 1.0" in code


def test_compile_is_deterministic(program, tmp_path):
    source = program(OU)
    assert main(["compile", str(source), "-o", str(tmp_path / "a")]) == 0
    assert main(["compile", str(source), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "ou.py").read_bytes() == (tmp_path / "b" / "ou.py").read_bytes()


def test_param_changes_the_default_of_the_constructor(program, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(program(OU)), "-o", str(out), "--param", "theta=30"]) == 0
    code = (out / "ou.py").read_text()
    assert "theta: float = 30.0" in code
    assert "theta: float = 1.0" not in code


def test_compile_several_files(program, tmp_path, capsys):
    first, second = program(OU), program(OU.replace("sde ou", "sde ou_fast") + "steps 10\n", "fast.sde")
    out = tmp_path / "out"
    assert main(["compile", str(first), str(second), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ou.py", "ou_fast.py"]
    assert capsys.readouterr().out.count(" -> ") == 2


def test_show_prints_the_derived_quantities(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["show", "examples/vp.sde"]) == 0
    text = capsys.readouterr().out
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines()[1:]}
    assert text.startswith("sde vp (examples/vp.sde)\n")
    assert "exp" in rows["variance v(t)"] or "expm1" in rows["variance v(t)"]
    assert "sqrt" in rows["diffusion g(t)"]
    assert rows["beta(t) (helper)"].endswith(" beta_min + t*(beta_max - beta_min)")   # as the source names it
    assert rows["g(t)^2"].endswith(" beta(t)")
    assert rows["prior variance"].endswith(" 1")
    assert rows["N (steps)"].endswith(" 1000")


def test_show_latex(program, capsys):
    assert main(["show", str(program(OU)), "--latex"]) == 0
    text = capsys.readouterr().out
    assert "\\theta" in text
    assert "\\sqrt{2}" in text


def test_show_with_param(program, capsys):
    assert main(["show", str(program(OU)), "--param", "theta=3"]) == 0
    assert "theta" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["compile", "show"])
def test_user_error_exits_with_2(program, tmp_path, capsys, command):
    args = [command, str(program(BAD))] + (["-o", str(tmp_path / "out")] if command == "compile" else [])
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "steps must be a positive integer" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("name, message", [("missing.sde", "no such file: "), ("notes.txt", "expected a .sde file")])
def test_bad_path_gives_a_clean_error(tmp_path, capsys, name, message):
    path = tmp_path / name
    if path.suffix != ".sde":
        path.write_text(OU)
    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdelang: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_usage_error_exits_with_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compile"])
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_failed_compile_leaves_an_existing_output_alone(program, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "ou.py"
    old.write_text("# the previous module\n")
    assert main(["compile", str(program(BAD)), "-o", str(out)]) == 2
    assert old.read_text() == "# the previous module\n"
    assert [p.name for p in out.iterdir()] == ["ou.py"]


def test_write_that_fails_midway_leaves_no_trace(program, tmp_path, monkeypatch):
    """If the final rename fails, the old module is intact and no temporary file is left behind."""
    out = tmp_path / "out"
    out.mkdir()
    old = out / "ou.py"
    old.write_text("# the previous module\n")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(compiler.os, "replace", fail)
    assert main(["compile", str(program(OU)), "-o", str(out)]) != 0
    assert old.read_text() == "# the previous module\n"
    assert [p.name for p in out.iterdir()] == ["ou.py"]


def test_the_installed_command_exits_with_2_and_no_traceback(tmp_path):
    """Through a real process: the exit status and stderr that a shell sees."""
    result = subprocess.run(
        [sys.executable, "-m", "sdelang", "compile", "tests/errors/missing_operator.sde", "-o", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "SDELANG_DEBUG": ""})
    assert result.returncode == 2
    assert result.stderr == (ROOT / "tests" / "errors" / "missing_operator.expected").read_text()
    assert not any(tmp_path.iterdir())


def test_show_reads_like_the_math(compiled):
    """eps inside closed forms as a decimal, no importance rows for uniform t, each integral named once."""
    from sdelang.cli.show import show

    text = show(compiled("vp_likelihood").compiled.derivation)
    assert "20000000000" not in text and "9.99995e-06*beta_min" in text and "[1e-05, 1]" in text
    text = show(compiled("vp").compiled.derivation)
    assert "t sampling" in text and "importance" not in text
    rows = show(compiled("numeric").compiled.derivation).splitlines()
    with_integral = [row for row in rows if "Integral(" in row]
    assert len(with_integral) == 1 and with_integral[0].split()[0] == "I(t)"
    assert any(row.split()[:2] == ["variance", "v(t)"] and "I(t)" in row for row in rows)


def test_show_latex_renders_with_mathtext_for_every_example(compiled):
    """Each row of --format latex is parsed by matplotlib's mathtext (which has no \\limits)."""
    from matplotlib.mathtext import MathTextParser

    from sdelang.cli.show import latex_rows

    parser = MathTextParser("path")
    for path in sorted((ROOT / "examples").glob("*.sde")):
        for name, value in latex_rows(compiled(path.stem).compiled.derivation):
            parser.parse(f"${name}$")
            parser.parse(f"${value}$")
            assert "\\limits" not in value


def test_show_formats(compiled):
    from sdelang.cli.show import show

    derivation = compiled("numeric").compiled.derivation
    latex = show(derivation, "latex")
    assert "\\begin{align*}" in latex and latex.rstrip().endswith("\\end{document}")
    assert "\\text{variance v(t)} &= " in latex
    lines = show(derivation, "markdown").splitlines()
    assert lines[2:4] == ["| quantity | value |", "| --- | --- |"]
    assert all(line.count("|") == 3 for line in lines[4:]), "a bar inside a cell would split it"


def test_show_names_the_dimension_beside_a_parameter_called_d(program, capsys):
    """The data dimension prints as d, or as d' where a parameter is called d; the row says which is which."""
    source = "sde bridge\nparam d = 0.5\ndx = -x / (1 + d - t) dt + 1 dw\nt in [1e-3, 1]\n"
    assert main(["show", str(program(source))]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "drift divergence" in line)
    assert "(d': entries of one sample)" in row and "-d'/" in row


def test_a_refusal_names_the_parameter_values_given_with_param(program, capsys):
    """A refusal measured at --param values says which, not "the default parameters" (which they are not)."""
    source = program("sde st\nparam c: real = 1\nparam k = 2\ndx = -k * x^3 dt + sqrt(c^2 + x^2) dw\n"
                     "prior normal(0, 1)\nweighting 1\n", "st.sde")
    assert main(["compile", str(source), "-o", str(source.parent / "out"), "--param", "c=0"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("the diffusion is zero at x = 0, t = 1e-05 (with c = 0 and the other parameters at "
                          "their defaults)"), first
    # Every parameter given: no mention of defaults.
    assert main(["compile", str(source), "-o", str(source.parent / "out"), "--param", "c=0", "--param", "k=3"]) == 2
    assert capsys.readouterr().err.splitlines()[0].endswith("(with c = 0, k = 3)")


def test_show_names_a_tail_integral_and_both_step_variances(program, capsys):
    """A state that grows takes its step noise from a tail integral int_t^T where that cancels less: show names it
    J(t), defined from t up to T, and prints both forms of G^2 with where each applies."""
    source = "sde growing\nparam k = 12\ndx = k * (1 + sin(3 * t)^2) * x dt + dw\n"
    assert main(["show", str(program(source, "growing.sde"))]) == 0
    rows = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["J(t) (numeric)"].endswith("(s, t, 1))") and rows["I(t) (numeric)"].endswith("(s, 0, t))")
    assert "J(s)" in rows["step variance G^2 where m(t)^2 J(s) < v(t)"]
    assert "I(s)" in rows["step variance G^2 elsewhere"]
