"""File helpers of the model store: content digests and crash-safe replacement.

:func:`sha256_file` is the digest the manifest records and the store, the runner's callers,
training's export and evaluation check. :func:`atomic_write` is the one way the store, training
and the worker replace a file: write a temporary file in the same folder, fsync it, rename it over
the target, fsync the folder. A reader sees the old file or the new one, never a torn one, and a
crash after the call returns cannot lose the new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

LOGGER = logging.getLogger(__name__)

FILE_MODE = 0o644
"""Permissions of a file written by :func:`atomic_write` (``mkstemp`` would leave 0600, which
another user of a shared store, e.g. the node's service account, could not read)."""

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of ``data`` (for bytes already read, e.g. weights to be loaded)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks.

    Raises
    ------
    OSError
        The file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Replace ``path`` atomically and durably with ``content``.

    Parameters
    ----------
    path:
        The target; its folder must exist.
    content:
        ``bytes``, ``str`` (written as UTF-8), or a callable that writes into the binary file
        object it is given (e.g. ``lambda fh: ds.save_as(fh)`` or ``lambda fh: torch.save(x, fh)``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        ``content`` is none of the three.
    OSError
        Writing, fsync or rename failed; the temporary file is removed and ``path`` is unchanged.
    """
    if not isinstance(content, bytes | str) and not callable(content):
        raise TypeError(f"content must be bytes, str or a writer callable, got {type(content)}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode("utf-8"))
            elif isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path
