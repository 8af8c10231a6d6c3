"""Atomic file writes: a reader sees the old file or the new one, never a mix.

Each write goes to a temporary file in the target's directory, is flushed and
fsync'ed, then ``os.replace``-d over the target; finally the directory itself is
fsync'ed so the rename survives a power cut. A process killed at any moment
leaves the previous file intact (at worst a stray ``.*.tmp`` file remains).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir"]


def fsync_dir(directory: str | Path) -> None:
    """fsync a directory so that renames inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _chmod_like_open(fd: int) -> None:
    """Give a mkstemp file (mode 0600) the mode ``open()`` would: 0666 minus the umask."""
    if not hasattr(os, "fchmod"):  # pragma: no cover - Windows
        return
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def atomic_write_bytes(path: str | Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename).

    Args:
        path: destination file; its directory must exist.
        data: the complete new contents.
        sync_dir: fsync the directory after the rename (set False when the caller
            fsyncs it once after several writes).

    Raises:
        OSError: the write failed; ``path`` is unchanged and the temp file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _chmod_like_open(fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(
    path: str | Path, text: str, *, encoding: str = "utf-8", sync_dir: bool = True
) -> None:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode(encoding), sync_dir=sync_dir)
