"""Atomic file writes: a temporary file next to the target, fsynced, renamed over it.

A reader, or a run killed mid-write, never sees a half-written file. The temporary file is created
the way ``open(path, "w")`` creates a file (mode ``0666``, less the umask, which the kernel applies),
or given the mode of the file it replaces. ``tempfile.mkstemp`` is not used: it creates files
readable by the owner alone (0600), a rename keeps that, and analysis files came out private, unlike
any other file the user writes (a lab sharing ``runs/`` could not read them).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Any, Callable


def temp_file_beside(path: Path) -> tuple[int, Path]:
    """An open (write-only) descriptor and the name of a new file ``.NAME.<random>.tmp`` in ``path``'s
    directory, created as ``open()`` would create ``path``, or with the mode of the existing ``path``.
    Creates the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        keep = None
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            if keep is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, keep)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: Path, write: Callable[[Any], Any], *, fsync: bool = True) -> None:
    """Call ``write(fileobj)`` on a temp file next to ``path``, fsync, and rename it over ``path``.

    ``fsync=False`` for files a reader validates anyway (a journal entry): the rename still means a killed
    process leaves the old file or the whole new one; only a machine crash can leave a truncated one."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))
