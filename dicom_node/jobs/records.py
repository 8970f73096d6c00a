"""The record of one received instance: what the receiver hands the job store after fsync."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceRecord:
    """One instance safely in the spool: what ``on_instance`` receives.

    The callback is also called when the SOP instance was already in the spool (the PACS resent
    it, possibly because the previous attempt got a failure status), so it must be idempotent on
    ``sop_instance_uid``.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    path: str
    """Relative to ``storage`` (``spool/<study>/<series>/<sop>.dcm``)."""
    size: int
    calling_ae: str | None
    transfer_syntax: str | None
    received_at: float
    """``time.time()`` when the C-STORE request was handled."""
