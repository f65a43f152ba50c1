"""Atomic writes, shared by the compiler (generated modules) and the runtime (checkpoints, plots, logs)."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from .errors import EnvironmentProblem, describe_os_error


class CannotWrite(EnvironmentProblem, OSError):
    """A file could not be written (a read-only folder, a full disk, a path that is a file): the message
    names the target, not the temporary file, and nothing partial is left behind."""

    def __init__(self, message: str, errno: int | None):
        super().__init__(errno, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """A binary file that replaces `path` when the block ends without error: written through a temporary
    file in the same folder and renamed, so readers never see half a file. The permissions follow the
    umask, like a plain open() (tempfile.mkstemp would make the file readable by its owner alone)."""
    path = Path(path)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, CannotWrite):
            raise _cannot_write(path, exc) from exc
        raise


def _cannot_write(path: Path, exc: OSError) -> CannotWrite:
    blocker = next((p for p in [path.parent, *path.parent.parents] if p.is_file()), None)
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and blocker is not None:
        return CannotWrite(f"cannot write {path}: {blocker} is a file, not a folder", exc.errno)
    return CannotWrite(describe_os_error(OSError(exc.errno, exc.strerror or str(exc), str(path)), "write"),
                       exc.errno)


def write_atomic(path: Path, text: str) -> None:
    """Write text (UTF-8, \\n line ends) atomically: see atomic_open."""
    with atomic_open(path) as file:
        file.write(text.encode("utf-8"))
