"""One owner per storage folder on SQLite, shared by design on a server database.

The rule (README "Scaling out"):

* **Embedded SQLite job store** (``database: null`` or an ``sqlite://`` URL): one process per
  storage folder, any role. It takes an *exclusive* lock. Two processes on one SQLite store are
  an accident (a second unit file, a container started twice), and SQLite on a shared volume is
  not safe across hosts anyway, so the second process refuses to start and names the first.
  Holding the exclusive lock also tells the process that it is alone on its job store: at start
  it takes back every interrupted job at once, without waiting for a lease.
* **Server database** (PostgreSQL): any number of processes share ``storage`` (one shared
  volume for receivers and workers); each takes a *shared* lock. Coordination is the job store's
  (claims, heartbeats, leases: :mod:`dicom_node.jobs.processes`); the shared lock only keeps an
  SQLite node from starting on a storage folder that server-database processes use, and the
  other way round.

The lock is ``fcntl.flock`` on ``<storage>/node.lock``: the kernel drops it when the owner dies,
even by kill -9, so a stale file never blocks a restart. The file's content (pid, host, start
time) names the exclusive owner in the error; shared holders leave it alone.
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
    """A process-lifetime lock on a storage folder: exclusive (SQLite) or shared (server DB).

    Parameters
    ----------
    storage:
        The node's storage folder (created if missing).
    shared:
        Take a shared lock (processes on a server database); default exclusive.

    Raises
    ------
    StorageInUse
        From :meth:`acquire`, when another process holds the lock in the other mode (or, for
        an exclusive lock, at all); the message names it.
    """

    def __init__(self, storage: Path, shared: bool = False) -> None:
        self.path = Path(storage) / LOCK_FILE
        self.shared = shared
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StorageInUse` at once (never waits)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process)
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = _describe(handle.read())
            handle.close()
            if self.shared:
                raise StorageInUse(
                    f"storage {self.path.parent} is used by {owner} with the embedded SQLite "
                    "job store; processes on a server database cannot share it: stop that node "
                    "or give it the same 'database'"
                ) from None
            raise StorageInUse(
                f"storage {self.path.parent} is already used by {owner}; with the embedded "
                "SQLite job store one storage folder has one process: stop that node, give "
                "this one its own 'storage', or run several processes on a server database "
                "('database: postgresql+psycopg://...', README \"Scaling out\")"
            ) from None
        self._file = handle
        if self.shared:  # no exclusive owner now: whatever the file names is gone
            handle.truncate(0)
            return
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        handle.flush()

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
        return "other processes"
