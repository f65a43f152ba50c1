"""Atomic writes, shared by the compiler (generated modules) and the runtime (checkpoints, plots, logs)."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike):
    """A binary file that replaces `path` when the block ends without error: written through a temporary
    file in the same folder and renamed, so readers never see half a file. The permissions follow the
    umask, like a plain open() (tempfile.mkstemp would make the file readable by its owner alone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write text (UTF-8, \\n line ends) atomically: see atomic_open."""
    with atomic_open(path) as file:
        file.write(text.encode("utf-8"))
