"""Every program in the documentation compiles: the ```sde blocks of docs/language.md and README.md.

A block that shows a mistake on purpose is fenced ```sde-error instead; it must fail, and the
indented error message printed after it in the docs must be exactly the compiler's.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import sdelang
from sdelang.compiler.check import check
from sdelang.compiler.parse import parse

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["docs/language.md", "README.md"]
FENCE = re.compile(r"^```(sde|sde-error)\n(.*?)^```\n", re.S | re.M)
# The indented block after an sde-error fence: the message, as the docs show it.
SHOWN = re.compile(r"\n*((?:    .*\n|\n(?=    ))+)")


def blocks(kind):
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == kind:
                line = text.count("\n", 0, match.start()) + 1
                shown = SHOWN.match(text, match.end())
                message = None if shown is None else "\n".join(
                    row[4:] for row in shown.group(1).rstrip("\n").split("\n"))
                found.append(pytest.param(match.group(2), message, id=f"{doc}:{line}"))
    return found


@pytest.mark.parametrize("text, _", blocks("sde"))
def test_documented_program_compiles(text, _):
    source = sdelang.Source(text, "doc.sde")
    program = check(parse(source), source)
    compiled = sdelang.compile_source(source)
    assert compiled.name == program.name
    namespace: dict = {}
    exec(compile(compiled.code, "<doc>", "exec"), namespace)
    assert namespace["SDE"]().T == float(program.T)


@pytest.mark.parametrize("text, message", blocks("sde-error"))
def test_documented_mistake_is_refused(text, message):
    name = re.match(r"sde (\w+)", text).group(1)
    with pytest.raises(sdelang.SdeError) as info:
        sdelang.compile_source(sdelang.Source(text, f"{name}.sde"))
    assert message is not None, "show the error message, indented, after the block"
    assert info.value.render() == message


def test_the_docs_have_programs():
    assert len(blocks("sde")) >= 20
