"""The audit log: one JSON line per decision the node takes (routing, discard, delivery, failure).

It lives at ``<storage>/audit.log``. Records carry rule names, model versions, destinations and
job ids; UIDs only as the job store has them, never patient names or IDs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

LOGGER = logging.getLogger(__name__)


class AuditLog:
    """Append-only JSON-lines file; each record is flushed before :meth:`write` returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one small lock: lines must not interleave

    def write(self, event: str, **fields: Any) -> None:
        """Append ``{"time": ..., "event": event, **fields}``."""
        record = {"time": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(record, default=str, sort_keys=True)
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record, oldest first (for tests and ``dicom-node status``)."""
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
