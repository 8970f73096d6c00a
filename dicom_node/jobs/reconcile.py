"""Start-up reconciliation: every spooled instance has its row in the job store.

The receiver fsyncs each instance's bytes before it answers Success, and then records the instance
in the job store. The job store runs SQLite with ``synchronous=NORMAL`` (WAL): a committed row
survives a crash of the process but may be lost with the last transactions on a power cut. This
scan closes that gap: files in the spool without a row are read back and recorded, so nothing the
node acknowledged is ever forgotten, and one flush per C-STORE is saved on the hot path.

What is read back from disk is checked as strictly as what came from the network: a file whose
UIDs fail :func:`~dicom_node.jobs.records.validate_uid` (read whole, as encoded), whose place in
the spool does not match its UIDs, or that contradicts the store's identities
(:class:`~dicom_node.jobs.records.IdentityConflict`) is never recorded: it is moved to
``<storage>/quarantine/`` under a generated name, logged with its reason and counted in
``dicom_node_spool_quarantined_total{reason}``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom

from dicom_node import metrics
from dicom_node.jobs.records import IdentityConflict, Instance, dataset_patient_key, validate_uid
from dicom_node.jobs.store import JobStore

LOGGER = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
"""Folder under ``storage`` for spool files that must not be recorded (kept for a person to
look at, never read by the node)."""

_UID_TAGS = (
    ("SOPInstanceUID", 0x00080018),
    ("SOPClassUID", 0x00080016),
    ("StudyInstanceUID", 0x0020000D),
    ("SeriesInstanceUID", 0x0020000E),
)


class _Unusable(Exception):
    """A spool file that must not be recorded; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _uid(ds: Any, keyword: str, tag: int) -> str:
    """A UID as encoded in the file (one trailing pad byte removed), validated whole."""
    if tag not in ds:
        raise _Unusable("invalid_uid", f"{keyword} is missing")
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        if value[-1:] in (b"\x00", b" "):
            value = value[:-1]
        value = value.decode("latin-1")
    elif not isinstance(value, str):  # converted already: several values
        value = "\\".join(str(v) for v in value)
    ok, why = validate_uid(value)
    if not ok:
        raise _Unusable("invalid_uid", f"{keyword}: {why}")
    return str(value)


def _row_for(path: Path, storage: Path, root: Path) -> Instance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop, sop_class, study, series = (_uid(ds, k, t) for k, t in _UID_TAGS)
    if path.relative_to(root).parts != (study, series, f"{sop}.dcm"):
        raise _Unusable("path_mismatch", "the file's place in the spool differs from its UIDs")
    stat = path.stat()
    return Instance(
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        study_uid=study,
        series_uid=series,
        modality=str(ds.get("Modality", "")) or None,
        path=path.relative_to(storage).as_posix(),
        size=stat.st_size,
        calling_ae=None,
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        received_at=stat.st_mtime,
        patient_key=dataset_patient_key(ds, study),
    )


def _quarantine(path: Path, storage: Path, reason: str) -> None:
    metrics.SPOOL_QUARANTINED.labels(reason=reason).inc()
    target = storage / QUARANTINE_DIR / f"{uuid.uuid4().hex}.dcm"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    except OSError as exc:
        LOGGER.error("a spool file could not be quarantined (%s): %s", reason, exc.strerror)
        return
    LOGGER.error("a spool file was not recorded (%s); moved to %s", reason, target)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile (recorded and purged, or quarantined by another process)
        return float("inf")


def reconcile_spool(store: JobStore, storage: Path, spool_dir: str, min_age: float = 0.0) -> int:
    """Record spooled instances the job store does not know; return how many were added.

    Parameters
    ----------
    store:
        The job store; read and written only through its API.
    storage:
        The root that recorded paths are relative to.
    spool_dir:
        The spool's folder under ``storage`` (the receiver's ``SPOOL_DIR``); files are
        ``<spool_dir>/<study>/<series>/<sop>.dcm``, anything else is an interrupted write.
    min_age:
        Seconds: younger files are left alone. A process that shares ``storage`` with other
        receivers (a server database) passes a grace period: a live receiver records each file
        a moment after renaming it into place, and must not find it quarantined or recorded
        under it. Nothing acknowledged is left out by that: the receiver answers Success only
        after the row is committed, and a server database does not lose commits, so a file
        without a row there was never acknowledged (the sender sends it again).

    Notes
    -----
    A file with invalid UIDs, in the wrong place for its UIDs, or contradicting the store's
    identities is moved to :data:`QUARANTINE_DIR` (see the module docstring), never recorded.
    """
    storage = Path(storage)
    root = storage / spool_dir
    if not root.is_dir():
        return 0
    known = store.known_instance_uids()
    added = 0
    newest = time.time() - min_age
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".dcm") or name[:-4] in known:
                continue  # temp files of interrupted writes are not acknowledged instances
            path = Path(folder) / name
            if min_age > 0 and _mtime(path) > newest:
                continue  # maybe a live receiver's, about to be recorded
            try:
                added += store.record_instance(_row_for(path, storage, root))
            except _Unusable as exc:
                _quarantine(path, storage, exc.reason)
                LOGGER.debug("quarantined %r: %s", str(path), exc)  # UIDs: debug only
            except IdentityConflict as exc:
                _quarantine(path, storage, "identity_conflict")
                LOGGER.debug("quarantined %r: %s", str(path), exc)
            except Exception as exc:  # one unreadable file must not stop the start-up
                LOGGER.error("a spool file could not be reconciled: %s", type(exc).__name__)
                LOGGER.debug("unreadable spool file %s: %s", path, exc)  # UIDs: debug only
    if added:
        LOGGER.warning("recovered %d spooled instance(s) missing from the job store", added)
    return added
