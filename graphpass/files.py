"""Output files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graphpass.errors import InputError

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, suffixes: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Raises InputError before any work if the folder is missing or the suffix is not allowed, so a
    failed command never leaves a partial file behind.
    """
    target = Path(path)
    if suffixes and target.suffix.lower() not in suffixes:
        raise InputError(f"output {str(target)!r}: suffix must be one of {', '.join(suffixes)}")
    if not target.parent.is_dir():
        raise InputError(f"output {str(target)!r}: folder {str(target.parent)!r} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
