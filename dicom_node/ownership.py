"""One owner per storage folder: an exclusive lock taken before anything in it is read.

Two ``dicom-node serve`` processes on the same ``storage`` with the embedded SQLite job store would
both reset "running" jobs at start and both process and export the same work. That is an accident
(a second unit file, a container started twice), not a deployment, so the second process refuses
to start and names the first. The lock is ``fcntl.flock`` on ``<storage>/node.lock``: the kernel
drops it when the owner dies, even by kill -9, so a stale file never blocks a restart. The file's
content (pid, host, start time) is only there to name the owner in the error.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILE = "node.lock"
"""Name of the lock file inside ``storage``."""


class StorageInUse(RuntimeError):
    """Another live process owns the storage folder."""


class StorageLock:
    """An exclusive, process-lifetime lock on a storage folder.

    Parameters
    ----------
    storage:
        The node's storage folder (created if missing).

    Raises
    ------
    StorageInUse
        From :meth:`acquire`, when another process holds the lock; the message names it.
    """

    def __init__(self, storage: Path) -> None:
        self.path = Path(storage) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StorageInUse` at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = _describe(handle.read())
            handle.close()
            raise StorageInUse(
                f"storage {self.path.parent} is already used by {owner}; one storage folder has "
                "one owner: stop that node, or give this one its own 'storage'"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock (the kernel also drops it when the process ends)."""
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def _describe(content: str) -> str:
    try:
        info = json.loads(content)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"process {int(info['pid'])} on {info['host']} (since {since})"
    except (ValueError, KeyError, TypeError):
        return "another process"
