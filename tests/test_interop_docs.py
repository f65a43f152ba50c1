"""The ```python snippets of docs/interop.md run as written, in order, in one namespace per test.

The first snippet (shared definitions) runs before each later one; a snippet whose library is not
installed is skipped (its import raises ImportError, or k_diffusion_sampling() does).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "interop.md"
OPTIONAL = {"diffusers", "k_diffusion", "torchsde"}  # the interop extra's libraries
FENCE = re.compile(r"^```python\n(.*?)^```\n", re.S | re.M)


def snippets():
    text = DOC.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


@pytest.mark.parametrize("line, code", snippets()[1:], ids=[f"interop.md:{n}" for n, _ in snippets()[1:]])
def test_snippet_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SDELANG_INTEROP_DOC_TMP", str(tmp_path))
    namespace = {"__name__": "interop_doc"}
    exec(compile(snippets()[0][1], f"{DOC}:{snippets()[0][0]}", "exec"), namespace)
    try:
        exec(compile(code, f"{DOC}:{line}", "exec"), namespace)
    except ImportError as error:
        missing = (getattr(error, "name", None) or "").split(".")[0]
        if missing in OPTIONAL or "k-diffusion" in str(error):  # k_diffusion_sampling()'s messages
            pytest.skip(f"library not installed: {error}")
        raise


def test_the_doc_has_snippets():
    assert len(snippets()) >= 2 and os.path.exists(DOC)
