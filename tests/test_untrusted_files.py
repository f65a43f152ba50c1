"""Files that other users can write are never executed or unpickled (issue: parse-table cache).

lark's cache=True stores its LALR tables as a pickle in the shared temporary folder, under a name anyone
can predict; a planted file would run its code inside every user's compiler. The parser must neither
read nor write such a file.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

from sdelang.compiler import parse as parse_module
from sdelang.errors import Source

PROGRAM = "sde ou\nparam theta = 1\ndrift(x, t) = -theta * x\ndiffusion(t) = 1\n"


class _Planted:
    """Unpickling this runs os.system: the marker file appears only if something loads the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_parsing_neither_reads_nor_writes_the_temporary_folder(tmp_path):
    """In a fresh process whose temporary folder holds planted pickles named like lark's cache files,
    parsing works, they stay unread (no marker) and no new file appears there (with cache=True lark
    writes its tables there on the first parse, so this fails if the cache comes back)."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    marker = tmp_path / "planted-code-ran"
    payload = pickle.dumps(_Planted(marker))
    for name in (".lark_cache_x.tmp", "lark_cache.tmp"):
        (shared / name).write_bytes(payload)
    before = sorted(p.name for p in shared.iterdir())
    script = textwrap.dedent(f"""
        from sdelang.compiler.parse import parse
        from sdelang.errors import Source
        parse(Source({PROGRAM!r}, "ou.sde"))
    """)
    env = {"TMPDIR": str(shared), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), "a pickle from the shared temporary folder was loaded"
    assert sorted(p.name for p in shared.iterdir()) == before, "the parser wrote into the temporary folder"


def test_parser_is_built_without_a_cache_file():
    """The Lark object carries no cache option: its tables live in memory only."""
    parse_module._parser.cache_clear()
    parser = parse_module._parser()
    assert not parser.options.cache
    assert parse_module.parse(Source(PROGRAM, "ou.sde")).statements
