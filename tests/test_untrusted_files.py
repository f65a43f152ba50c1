"""Files that other users can write are never executed or unpickled.

lark's cache=True stores its LALR tables as a pickle in the shared temporary folder, under a name anyone
can predict; a planted file would run its code inside every user's compiler. The parser must neither
read nor write such a file. The same holds for the compile cache that sdelang.load imports modules from
($SDELANG_CACHE, else $XDG_CACHE_HOME/sdelang): only a folder and files that this user alone can write.
"""
from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap

import pytest

import sdelang
from sdelang import loader
from sdelang.compiler import parse as parse_module
from sdelang.errors import SdeError, Source

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


# --- the compile cache that sdelang.load imports from --------------------------------------------------

OU = "sde ou_cache\ndx = -x dt + sqrt(2) dw\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own, and the name load() gives OU's module in it."""
    folder = tmp_path / "cache"
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("SDELANG_CACHE", str(scratch))
    loader.load_module(OU)
    [name] = [p.name for p in scratch.iterdir()]
    _forget_generated()
    monkeypatch.setenv("SDELANG_CACHE", str(folder))
    return folder, name


def _forget_generated():
    for name in [n for n in sys.modules if n.startswith("sdelang_generated_")]:
        del sys.modules[name]


def _plant(path, marker):
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass SDE:\n    planted = True\n")


def _load_fresh():
    _forget_generated()
    try:
        return loader.load_module(OU)
    finally:
        _forget_generated()


def test_new_cache_folder_and_files_are_private(cache):
    folder, name = cache
    _load_fresh()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert not list(folder.glob("__pycache__")), "bytecode written beside the cache"


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664])
def test_cached_file_writable_by_others_is_rebuilt_not_run(cache, tmp_path, mode):
    """A module file that another user could have written is compiled again, never executed."""
    folder, name = cache
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    _plant(folder / name, marker)
    os.chmod(folder / name, mode)
    module = _load_fresh()
    assert not marker.exists(), "a cached file writable by others was executed"
    assert not hasattr(module.SDE, "planted")
    assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert (folder / name).read_text() == sdelang.compile_source(Source(OU)).code


def test_cached_link_is_not_followed(cache, tmp_path):
    """A link planted under the module's name is not followed, even to a file owned by this user."""
    folder, name = cache
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    elsewhere = tmp_path / "planted.py"
    _plant(elsewhere, marker)
    os.chmod(elsewhere, 0o600)
    (folder / name).symlink_to(elsewhere)
    module = _load_fresh()
    assert not marker.exists()
    assert not hasattr(module.SDE, "planted")
    assert not (folder / name).is_symlink()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_cache_folder_writable_by_others_is_refused(cache, tmp_path, mode):
    """A shared cache folder (even one with the sticky bit, like /tmp) is refused with a message and a hint;
    the file found there is not executed and nothing is compiled into it."""
    folder, name = cache
    folder.mkdir()
    os.chmod(folder, mode)
    marker = tmp_path / "planted-code-ran"
    _plant(folder / name, marker)
    os.chmod(folder / name, 0o600)
    with pytest.raises(SdeError) as info:
        _load_fresh()
    assert "no one else can write" in info.value.message and "SDELANG_CACHE" in info.value.hint
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give files away")
def test_files_owned_by_another_user_are_not_run(cache, tmp_path):
    """A private-looking folder or file owned by another user (here uid 65534, 'nobody') is not trusted."""
    folder, name = cache
    folder.mkdir(mode=0o700)
    marker = tmp_path / "planted-code-ran"
    _plant(folder / name, marker)
    os.chmod(folder / name, 0o600)
    os.chown(folder / name, 65534, 65534)
    module = _load_fresh()
    assert not marker.exists() and not hasattr(module.SDE, "planted")
    assert (folder / name).stat().st_uid == os.geteuid()
    _plant(folder / name, marker)
    os.chown(folder, 65534, 65534)
    with pytest.raises(SdeError, match="owned by another user"):
        _load_fresh()
    assert not marker.exists()
