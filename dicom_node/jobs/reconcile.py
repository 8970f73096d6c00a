"""Start-up reconciliation: every spooled instance has its row in the job store.

The receiver fsyncs each instance's bytes before it answers Success, and then records the instance
in the job store. The job store runs SQLite with ``synchronous=NORMAL`` (WAL): a committed row
survives a crash of the process but may be lost with the last transactions on a power cut. This
scan closes that gap: files in the spool without a row are read back and recorded, so nothing the
node acknowledged is ever forgotten, and one flush per C-STORE is saved on the hot path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pydicom

from dicom_node.jobs.records import Instance
from dicom_node.jobs.store import JobStore

LOGGER = logging.getLogger(__name__)


def _row_for(path: Path, storage: Path) -> Instance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    stat = path.stat()
    return Instance(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")) or None,
        path=path.relative_to(storage).as_posix(),
        size=stat.st_size,
        calling_ae=None,
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) or None,
        received_at=stat.st_mtime,
    )


def reconcile_spool(store: JobStore, storage: Path, spool_dir: str) -> int:
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
    """
    root = Path(storage) / spool_dir
    if not root.is_dir():
        return 0
    known = store.known_instance_uids()
    added = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".dcm") or name[:-4] in known:
                continue  # temp files of interrupted writes are not acknowledged instances
            path = Path(folder) / name
            try:
                added += store.record_instance(_row_for(path, Path(storage)))
            except Exception as exc:  # one unreadable file must not stop the start-up
                LOGGER.error("a spool file could not be reconciled: %s", type(exc).__name__)
                LOGGER.debug("unreadable spool file %s: %s", path, exc)  # UIDs: debug only
    if added:
        LOGGER.warning("recovered %d spooled instance(s) missing from the job store", added)
    return added
