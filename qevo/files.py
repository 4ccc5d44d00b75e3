"""Atomic file writes, the one mechanism behind every output, checkpoint, cache and archive.

Kept free of jax so that the data-decoding worker processes can use it.  In a run of several
processes only process 0 writes: :func:`qevo.distributed.initialize` calls
:func:`discard_writes` in the others, whose writes then leave no file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

_discard = False


def discard_writes() -> None:
    """From now on :func:`atomic_path` removes what this process writes instead of putting
    it in place (a process of a multi-process run other than process 0)."""
    global _discard
    _discard = True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` to write; when the block ends, the file is
    flushed to disk and renamed onto ``path`` (mode 0644), so readers see the old file or
    the whole new one. If the block raises, the temporary file is removed and ``path`` is
    left as it was; after :func:`discard_writes`, always."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
        if _discard:
            return
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp creates 0600; outputs should read like any file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
