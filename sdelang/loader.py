"""Compile into a cache keyed by the source's hash, import, instantiate."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from . import __version__
from .compiler import compile_source, read_source
from .errors import Source
from .files import write_atomic


def cache_dir() -> Path:
    root = os.environ.get("SDELANG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sdelang")
    return Path(root)


def _source(path_or_source: str | os.PathLike) -> Source:
    """Program text (anything with a line break) or the path of a .sde file."""
    text = str(path_or_source)
    if "\n" in text:
        return Source(text, "<string>")
    return read_source(path_or_source)


# What decides a generated module's text: the compiler package (with its grammar and templates) and
# errors.py; the runtime (training, sampling, likelihood) does not, so editing it leaves cached modules valid.
COMPILER_FILES = ("errors.py", "files.py")
COMPILER_FOLDERS = ("compiler",)


@functools.cache
def compiler_fingerprint() -> str:
    """A hash of the compiler's own files and of SymPy's version: a cached module is rebuilt whenever
    either changes."""
    import sympy

    package = Path(__file__).resolve().parent
    digest = hashlib.sha256(f"{__version__}\0{sympy.__version__}".encode())
    files = [package / name for name in COMPILER_FILES]
    # followlinks: in a development checkout sdelang/compiler/grammar is a link to the top-level grammar/.
    for folder in COMPILER_FOLDERS:
        for where, _, names in os.walk(package / folder, followlinks=True):
            files += [Path(where) / n for n in names if n.endswith((".py", ".j2", ".lark"))]
    for path in sorted(files, key=lambda p: p.relative_to(package).as_posix()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_module(path_or_source: str | os.PathLike):
    """The generated Python module for a .sde file (or program text), compiled once and cached."""
    source = _source(path_or_source)
    name = Path(source.path).name
    key = hashlib.sha256(f"{compiler_fingerprint()}\0{name}\0{source.text}".encode()).hexdigest()[:20]
    target = cache_dir() / f"sde_{key}.py"
    if not target.exists():
        write_atomic(target, compile_source(source).code)
    name = f"sdelang_generated_{key}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def load(path_or_source: str | os.PathLike, **params):
    """An instance of the SDE in a .sde file or program text; keyword arguments override parameters."""
    return load_module(path_or_source).SDE(**params)
