"""Small file helpers shared by checkpoints, exports, verification results and reports.

Every file another process may read while we write it (a checkpoint a resumed run loads, a
verification summary a shard merge reads) is written atomically: to a temporary file beside the
target, flushed to disk, then moved over the target with ``os.replace``. An interrupted write
leaves the previous file intact and no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_text", "file_sha256"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a binary temporary file beside ``path``, then replace ``path`` by it.

    An ``OSError`` of the write (a full disk) names ``path``. The file ends up world-readable
    (0644), as a plainly written file would, rather than with ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # a failed write (a full disk) names no file: name the target, not the temporary
        unnamed = isinstance(err, OSError) and err.filename is None and err.errno is not None
        if unnamed and type(err).__module__ == "builtins":  # not a library's own OSError subclass
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
