"""The audit log: one JSON line per decision the node takes (routing, discard, delivery, failure).

It lives at ``<storage>/audit.log``. Records carry rule names, model versions, destinations and
job ids; UIDs only as the job store has them, never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


class AuditLog:
    """Append-only JSON-lines file; each record is written before :meth:`write` returns.

    Several processes (receivers and workers on one shared ``storage``) append to the same file:
    each record is one ``write(2)`` on an ``O_APPEND`` descriptor, so lines never interleave.

    Parameters
    ----------
    path:
        The file.
    process:
        The writing process's id (:mod:`dicom_node.jobs.processes`), added to every record as
        ``process``; None leaves it out (the CLI).
    """

    def __init__(self, path: Path, process: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.process = process
        self._lock = threading.Lock()  # one small lock: lines must not interleave

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"time": ..., "event": event, "process": ..., **fields}``."""
        record = {"time": round(time.time(), 3), "event": event, **fields}
        if self.process is not None:
            record.setdefault("process", self.process)
        line = (json.dumps(record, default=str, sort_keys=True) + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first (for tests and ``dicom-node status``)."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
