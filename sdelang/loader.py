"""Compile into a cache keyed by the source's hash, import, instantiate.

The cache holds Python code that load() executes, so it must be a folder that no other user can write:
it is created private (0700), and a folder or file owned by someone else, or writable by group or others,
is refused (the folder) or rebuilt (a file). Files are opened relative to the checked folder's descriptor
and never through a link, and the code executed is the bytes that were checked, so the folder cannot be
swapped between the check and the import; no bytecode is written or read beside the cache.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import inspect
import os
import stat
import sys
import types
import uuid
import warnings
from pathlib import Path

from . import __version__
from .compiler import compile_source, read_source
from .errors import SdeError, Source


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


def load_module(path_or_source: str | os.PathLike, defaults: dict[str, float] | None = None):
    """The generated Python module for a .sde file (or program text), compiled once and cached; ``defaults``
    replaces parameter defaults before compiling (as `sdelang compile --param` does)."""
    source = _source(path_or_source)
    name = Path(source.path).name
    chosen = "".join(f"\0{k}={float(v)!r}" for k, v in sorted((defaults or {}).items()))
    key = hashlib.sha256(f"{compiler_fingerprint()}\0{name}\0{source.text}{chosen}".encode()).hexdigest()[:20]
    module_name = f"sdelang_generated_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    folder = cache_dir()
    file_name = f"sde_{key}.py"
    with _private_folder(folder) as fd:
        code = _read_own_file(_At(folder, fd), file_name)
        if code is None:
            compiled = compile_source(source, defaults)
            for text in compiled.warnings:  # a numeric table that missed its bound, say (the CLI prints them)
                warnings.warn(f"{name}: {text}", stacklevel=2)
            code = compiled.code
            _write_in(_At(folder, fd), file_name, code)
    module = types.ModuleType(module_name)
    module.__file__ = str(folder / file_name)
    sys.modules[module_name] = module
    try:
        exec(compile(code, module.__file__, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _untrusted(st: os.stat_result) -> str | None:
    """Why a folder or file with this status could hold code written by someone else (None if it cannot)."""
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


@contextlib.contextmanager
def _private_folder(folder: Path):
    """A descriptor of the cache folder, created private if missing, refused unless only this user can write it."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise SdeError(f"cannot use the module cache {folder}: {exc.strerror}",
                       hint="set SDELANG_CACHE to a folder of your own") from None
    try:
        st = os.fstat(fd)
        why = "not a folder" if not stat.S_ISDIR(st.st_mode) else _untrusted(st)
        if why is not None:
            raise SdeError(f"the module cache {folder} is {why}: sdelang runs the code it finds there, so it "
                           f"uses only a folder that no one else can write",
                           hint=f"set SDELANG_CACHE to a folder of your own, or run 'chmod 700 {folder}' if it is "
                                f"yours")
        yield fd
    finally:
        os.close(fd)


def _read_own_file(at: "_At", name: str) -> str | None:
    """The cached module's text, or None when it is missing, a link, or could have been written by another user."""
    try:
        handle = os.open(at.path(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=at.fd)
    except OSError:
        return None
    with os.fdopen(handle, "rb") as file:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode) or _untrusted(st) is not None:
            return None  # rebuilt and replaced by _write_in
        try:
            return file.read().decode("utf-8")
        except UnicodeDecodeError:
            return None


def _write_in(at: "_At", name: str, text: str) -> None:
    """Write text as `name` in the folder, atomically (a private temporary file renamed over it)."""
    temporary = f".{name}.{uuid.uuid4().hex}.tmp"
    handle = os.open(at.path(temporary), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600, dir_fd=at.fd)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(text.encode("utf-8"))
        os.replace(at.path(temporary), at.path(name), src_dir_fd=at.fd, dst_dir_fd=at.fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(at.path(temporary), dir_fd=at.fd)
        raise


class _At:
    """Names in the checked folder: relative to its descriptor where the platform allows (POSIX)."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self.fd = fd if {os.open, os.rename, os.unlink} <= os.supports_dir_fd else None

    def path(self, name: str) -> str:
        return name if self.fd is not None else str(self.folder / name)


def check_values(path_or_source: str | os.PathLike | Source, values: dict[str, float]) -> None:
    """The parameter values through the program's checks, as `sdelang compile --param` takes them: an SdeError for
    a name the program does not declare (N too: the step count is the program's `steps`) or for values at which
    the program is invalid (a diffusion that turns negative), located in the source."""
    from .compiler import check, parse

    source = path_or_source if isinstance(path_or_source, Source) else _source(path_or_source)
    check.check(parse.parse(source), source, values)


def load(path_or_source: str | os.PathLike, **params):
    """An instance of the SDE in a .sde file or program text; keyword arguments override parameters (a name the
    program does not declare is a TypeError that lists the ones it does).

    The module's forms were chosen at the program's defaults. Where the module refuses the values given because
    a form fails that far from them (its construction check), the program is compiled again with those values as
    its defaults, so that the compiler picks forms (or tables) that hold there, and that module is used."""
    module = load_module(path_or_source)
    known = [name for name in inspect.signature(module.SDE).parameters]
    unknown = sorted(set(params) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise TypeError(f"unknown parameter {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; this SDE takes: {', '.join(known)}")
    values = {k: v for k, v in params.items() if k != "N"}
    if values and getattr(module.SDE, "kind", "affine") == "general":
        # A general module cannot check its g(x, t) when built (a sign over states is decided by the compiler's
        # check): values that make it negative somewhere gave NaN noise. Refused here as `compile --param` does.
        check_values(path_or_source, values)
    try:
        return module.SDE(**params)
    except ValueError as exc:
        far = getattr(module.SDE, "_FAR_FROM_DEFAULTS", None)
        if far is None or not str(exc).endswith(far) or not values:
            raise
    try:
        return load_module(path_or_source, values).SDE(**params)   # the values as the program's defaults
    except ValueError as exc:
        if not str(exc).endswith(far):
            raise
        what = str(exc)[:-len(far)].rstrip(": ")
        raise ValueError(f"{what}, also compiled with these values as the program's defaults: choose other "
                         f"values") from None
