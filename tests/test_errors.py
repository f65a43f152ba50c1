"""Every bad program in tests/errors/ gives exactly its expected message, status 2, no traceback, no file.

Each case is NAME.sde beside NAME.expected, the exact standard error of

    sdelang compile tests/errors/NAME.sde -o DIR

run from the repository root. A first line ``# args: ...`` adds command-line
arguments. After a deliberate change of wording, rewrite the expected files with

    SDELANG_UPDATE_GOLDEN=1 python -m pytest tests/test_errors.py

and review the diff.
"""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdelang.compiler.check import check
from sdelang.cli import main
from sdelang.errors import SdeError, Source
from sdelang.compiler.parse import parse

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(p.stem for p in (ROOT / "tests" / "errors").glob("*.sde"))
UPDATE = bool(os.environ.get("SDELANG_UPDATE_GOLDEN"))


def _extra_args(text: str) -> list[str]:
    first = text.split("\n", 1)[0]
    return shlex.split(first.removeprefix("# args:")) if first.startswith("# args:") else []


@pytest.mark.parametrize("name", CASES)
def test_bad_program(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    source = Path("tests/errors") / f"{name}.sde"
    out = tmp_path / "out"
    status = main(["compile", source.as_posix(), "-o", str(out), *_extra_args(source.read_text())])
    captured = capsys.readouterr()
    expected = source.with_suffix(".expected")
    if UPDATE:
        expected.write_text(captured.err)
    assert status == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    assert captured.err == expected.read_text()
    assert not out.exists() or not any(out.iterdir()), "a failed compile wrote a file"


def test_corpus_is_complete():
    folder = ROOT / "tests" / "errors"
    assert len(CASES) >= 25
    assert sorted(p.stem for p in folder.glob("*.expected")) == CASES


@pytest.mark.parametrize("name", CASES)
def test_message_has_location_and_hint(name):
    """Each message names the file, and line:col with a caret where there is a place to point at, and
    says what to do."""
    lines = (ROOT / "tests" / "errors" / f"{name}.expected").read_text().splitlines()
    if re.match(rf"tests/errors/{name}\.sde:\d+:\d+: error: ", lines[0]):
        assert re.fullmatch(r" {4,}\^~*", lines[2])
    else:  # no place in the file: a mistake on the command line
        assert lines[0].startswith((f"tests/errors/{name}.sde: error: ", "sdelang: error: --param"))
    assert lines[-1].startswith("  hint: ")


# Words and symbols of the language, a few names and numbers, and some characters it does not have.
TOKENS = ["sde", "param", "steps", "v0", "prior", "weighting", "dt", "dw", "in", "normal", "kernel",
          "likelihood", "score_matching", "uniform", "importance", "t", "x", "dx", "k", "f", "exp", "sqrt",
          "log", "pi", "d/dt", "(", ")", "[", "]", ",", "=", "+", "-", "*", "/", "^", "**", "~", "0", "2",
          "0.5", "1e-5", "1e999", "\n", "\\\n", "# c\n", " ", "\t", "$", ";", "\u2212"]
VALID = "sde a\nparam k = 1\nf(t) = k * t + 1\ndx = -k * x dt + sqrt(f(t)) dw\nt in [1e-5, 1]\n"


@st.composite
def mutated(draw):
    """The valid program with a few tokens inserted, replaced or deleted on one line."""
    lines = VALID.split("\n")
    i = draw(st.integers(0, len(lines) - 1))
    words = lines[i].split(" ")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(words)))
        edit = draw(st.sampled_from(["insert", "replace", "delete"]))
        if edit == "insert" or not words:
            words.insert(at, draw(st.sampled_from(TOKENS)))
        elif edit == "replace":
            words[min(at, len(words) - 1)] = draw(st.sampled_from(TOKENS))
        else:
            del words[min(at, len(words) - 1)]
    lines[i] = " ".join(words)
    return "\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(st.one_of(mutated(), st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)))
def test_any_text_is_a_program_or_a_located_error(text):
    """Parsing and checking never crash: the result is a program or an SdeError with a place and a caret."""
    source = Source(text, "fuzz.sde")
    try:
        check(parse(source), source)
    except SdeError as exc:
        lines = exc.render().splitlines()
        assert re.match(r"fuzz\.sde:\d+:\d+: error: \S", lines[0])
        assert re.fullmatch(r" {4,}\^~*", lines[2])
