"""Valid programs, mutated (tokens deleted, duplicated, swapped, random unicode inserted), through the whole
command line: each gives a module that imports, or exit 2 with file:line:col and no file written; never
exit 3, a traceback, a hang (the compile bound is lowered to 30 s of CPU time here) or a partial file.

The default run draws a few programs (seconds); `-m slow` draws hundreds.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdelang.compiler as compiler
from sdelang.cli import main

PROGRAMS = [
    "sde ou\nparam theta = 1\ndx = -theta * x dt + sqrt(2) dw\nt in [1e-3, 1]\nsteps 100\n",
    "sde ve\nparam sigma_max = 10\nsigma(t) = sigma_max^t\ndx = sqrt(d/dt(sigma(t)^2)) dw\nprior normal(0, sigma_max^2)\n"
    "weighting score_matching\n",
    "sde vp\nparam beta_max = 20\nbeta(t) = 0.1 + t * (beta_max - 0.1)\ndx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw\n"
    "t ~ importance\n",
]
TOKEN = re.compile(r"\s+|d/dt|\*\*|[A-Za-z_][A-Za-z0-9_]*|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|.", re.S)
LOCATED = re.compile(r"[^\n]*\.sde:\d+:\d+: error: \S")


@st.composite
def mutated(draw) -> str:
    tokens = TOKEN.findall(draw(st.sampled_from(PROGRAMS)))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tokens) - 1))
        edit = draw(st.sampled_from(["delete", "duplicate", "swap", "unicode"]))
        if edit == "delete" and len(tokens) > 1:
            del tokens[i]
        elif edit == "duplicate":
            tokens.insert(i, tokens[i])
        elif edit == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            tokens.insert(i, draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=3)))
    return "".join(tokens)


def _compile_and_judge(text: str, tmp_path, capsys) -> None:
    folder = tmp_path / str(abs(hash(text)))
    folder.mkdir()
    path = folder / "fuzz.sde"
    path.write_bytes(text.encode("utf-8"))
    out = folder / "out"
    status = main(["compile", str(path), "-o", str(out)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert status in (0, 2), captured.err
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if status == 2:
        assert LOCATED.match(captured.err), captured.err
        assert written == [], "a failed compile wrote a file"
        return
    [name] = written
    assert name.endswith(".py") and not name.startswith(".")
    code = (out / name).read_text(encoding="utf-8")
    namespace: dict = {"__name__": "fuzzed"}
    exec(compile(code, name, "exec"), namespace)  # imports: a module that a compile wrote must load
    assert isinstance(namespace["SDE"], type)


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def bounded(monkeypatch):
    monkeypatch.setattr(compiler, "COMPILE_SECONDS", 30.0)


@settings(max_examples=6, derandomize=True, **FUZZ)
@given(text=mutated())
def test_mutated_programs_compile_or_fail_located(text, tmp_path, capsys, bounded):
    _compile_and_judge(text, tmp_path, capsys)


@pytest.mark.slow
@settings(max_examples=300, **FUZZ)
@given(text=mutated())
def test_mutated_programs_compile_or_fail_located_many(text, tmp_path, capsys, bounded):
    _compile_and_judge(text, tmp_path, capsys)
