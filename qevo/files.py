"""Atomic file writes, the one mechanism behind every output, checkpoint, cache and archive,
and the check every command makes of its output paths before any work (:func:`unwritable`).

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


def unwritable(path: str | os.PathLike, flag: str, folder: bool = False) -> str | None:
    """Why this process cannot write the output ``path`` (a folder to make or fill with
    ``folder``, else a file), as the one line a command ends with (``flag`` names the
    argument: ``--workdir``, ``--out``); ``None`` where it can. Checked by writing: an empty
    temporary file is made in, and removed from, the folder that would hold the output, or
    the nearest folder above it that exists (missing folders are made later), so read-only
    file systems, permissions and paths such as ``/proc/x`` all count, for root too."""
    path = pathlib.Path(path)
    reason = _unwritable(path, folder)
    if reason is None:
        return None
    return f"{flag} {path} cannot be written ({reason}); pass a {'folder' if folder else 'file'} path you can write to"


def _unwritable(path: pathlib.Path, folder: bool) -> str | None:
    try:
        if path.exists() and path.is_dir() != folder:
            return "it is a folder, not a file" if path.is_dir() else "it is a file, not a folder"
        where = path if folder else path.parent
        existing = next(p for p in (where, *where.parents) if p.exists())
    except OSError as e:
        return f"{e.filename}: {e.strerror}"
    if not existing.is_dir():
        return f"{existing} is a file"
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".qevo-write-check.")
    except OSError as e:
        return f"no file can be made in {existing}: {e.strerror}"
    os.close(fd)
    os.unlink(name)
    return None
