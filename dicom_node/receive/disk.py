"""Disk truth: free bytes *and* free inodes under ``storage``, checked against the limits.

The C-STORE handler refuses an instance with 0xA700 when storing it would leave less than
``min_free_disk`` bytes (free space minus the incoming data set) or fewer than
``min_free_inodes`` inodes; ``/readyz`` reports the same numbers as its ``disk`` check. A disk
full of small files runs out of inodes long before bytes, and ``f_bavail`` alone never shows it.

May import: nothing of the node (only :mod:`os`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DiskRoom:
    """What the file system holding a folder has left for this (unprivileged) user."""

    free_bytes: int
    """``f_bavail * f_frsize``."""
    free_inodes: int | None
    """``f_favail``; None where the file system has no fixed inode count (btrfs reports 0)."""


def disk_room(path: str | Path) -> DiskRoom:
    """Return the free bytes and inodes of the file system holding ``path``.

    Raises
    ------
    OSError
        ``path`` does not exist or cannot be examined.
    """
    st = os.statvfs(path)
    inodes = None if st.f_files == 0 else int(st.f_favail)
    return DiskRoom(free_bytes=int(st.f_bavail * st.f_frsize), free_inodes=inodes)


def shortage(
    room: DiskRoom, incoming: int, min_free_bytes: int, min_free_inodes: int
) -> str | None:
    """Why storing ``incoming`` bytes (one file) would break a limit, or None if it would not.

    Parameters
    ----------
    room:
        From :func:`disk_room`.
    incoming:
        Bytes about to be written (0 to check the current state, as ``/readyz`` does).
    min_free_bytes, min_free_inodes:
        The configuration's ``min_free_disk`` and ``min_free_inodes``.
    """
    if room.free_bytes - incoming < min_free_bytes:
        return (
            f"{_size(room.free_bytes)} free, {_size(incoming)} incoming, "
            f"min_free_disk is {_size(min_free_bytes)}"
        )
    if room.free_inodes is not None and room.free_inodes - (1 if incoming else 0) < min_free_inodes:
        return f"{room.free_inodes} inodes free, min_free_inodes is {min_free_inodes}"
    return None


def describe(room: DiskRoom) -> str:
    """``12.3 GB free, 1234567 inodes free`` (for ``/readyz``)."""
    inodes = "no inode limit" if room.free_inodes is None else f"{room.free_inodes} inodes free"
    return f"{_size(room.free_bytes)} free, {inodes}"


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
