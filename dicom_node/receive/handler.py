"""The C-STORE and C-ECHO handlers and the C-STORE status table: what the PACS hears.

Owns the statuses the node answers (module constants ``STATUS_*``, documented in README "What the
PACS sees"), the header checks behind them (:func:`check_header`) and the handlers bound to
pynetdicom's ``EVT_C_STORE`` / ``EVT_C_ECHO`` as data (:class:`StoreContext` in the handler's args
list).

The C-STORE handler never decodes and re-encodes a data set: it reads the few header elements it
needs to validate and file the instance, writes the bytes as they came (behind a File Meta built
from the request) into the :class:`~dicom_node.receive.spool.Spool`, fsyncs, hands an
:class:`~dicom_node.jobs.records.InstanceRecord` to the injected ``on_instance`` callback (the job
store) and only then answers Success. Every failure has its own status code and a ``reason``
label on ``dicom_node_instances_rejected_total``; the handler never raises (pynetdicom would turn
an exception into a mute 0xC211).

May import: :mod:`dicom_node.receive.header`, :mod:`dicom_node.receive.spool`,
:func:`dicom_node.receive._pynetdicom_tuned.dataset_crc32` (the data set's checksum, computed
while it arrived), ``dicom_node.jobs.records``, ``dicom_node.metrics``, pynetdicom's public
``events``.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from dicom_node import metrics
from dicom_node.jobs.records import IdentityConflict, InstanceRecord, patient_key, validate_uid
from dicom_node.receive import disk
from dicom_node.receive._pynetdicom_tuned import dataset_crc32
from dicom_node.receive.header import Header, TooLarge, encode_file_meta, parse_header
from dicom_node.receive.spool import InvalidUID, Spool

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ECHO_SUCCESS",
    "INFLATE_HEADROOM",
    "MAX_DIMENSION",
    "STATUS_BAD_GEOMETRY",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_IDENTITY_CONFLICT",
    "STATUS_MISSING_UID",
    "STATUS_PIXEL_BUDGET",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "STATUS_TRUNCATED_PIXEL_DATA",
    "Refused",
    "StoreContext",
    "check_header",
    "handle_echo",
    "handle_store",
]

LOGGER = logging.getLogger(__name__)

# -- statuses (PS3.4 B.2.3: A7xx out of resources, A9xx data set does not match SOP class,
#    Cxxx cannot understand; the low byte is ours and names the reason) --------------------------
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
"""Refused: free disk under ``min_free_disk``, the spool could not be written, or the job store
failed for lack of resources. The PACS should retry later."""
STATUS_DATASET_MISMATCH = 0xA900
"""SOP Class or SOP Instance UID in the data set differs from the C-STORE request."""
STATUS_MISSING_UID = 0xA901
"""Study, Series or SOP Instance UID missing or not a valid UID (one value, digits and single
dots, at most 64 characters, no leading zeros, nothing after it but the one pad byte)."""
STATUS_BAD_GEOMETRY = 0xA902
"""Rows or Columns 0 or above :data:`MAX_DIMENSION`, or NumberOfFrames below 1."""
STATUS_TRUNCATED_PIXEL_DATA = 0xA903
"""Uncompressed Pixel Data shorter than Rows x Columns x Samples x Bits/8 x Frames."""
STATUS_IDENTITY_CONFLICT = 0xA904
"""The instance contradicts what the node holds: its SeriesInstanceUID belongs to another study,
its StudyInstanceUID to another patient (PatientID, PatientName or PatientBirthDate differ where
both are present), or its SOPInstanceUID to another series or study. Never merged; resending
will not help, the sender's UIDs or patient data need fixing."""
STATUS_PIXEL_BUDGET = 0xA905
"""The declared pixel data (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8,
any transfer syntax) exceeds ``max_pixels``, or a deflated data set inflates past
``max_pixels`` + :data:`INFLATE_HEADROOM`."""
STATUS_PROCESSING_FAILURE = 0xC001
"""The instance is on disk but the job store (``on_instance``) failed; the PACS should retry."""
STATUS_CANNOT_UNDERSTAND = 0xC210
"""The data set could not be decoded."""

MAX_DIMENSION = 16384
"""Largest Rows/Columns accepted; larger values are refused as absurd."""

DEFAULT_MAX_PIXELS = 2**31
"""Default decoded-pixel budget per instance in bytes (2 GiB: 1,000 CT slices of 1024x1024
16-bit fit; 40 frames of 16384x16384 16-bit, 21 GB, do not). The config key ``max_pixels``."""

INFLATE_HEADROOM = 64 * 2**20
"""Bytes beyond ``max_pixels`` a deflated data set may inflate to (its non-pixel elements)."""

ECHO_SUCCESS = 0x0000

_OUT_OF_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE})
_SQLITE_FULL = 13  # sqlite3.SQLITE_FULL: "database or disk is full"
_PG_DISK_FULL = "53100"  # PostgreSQL SQLSTATE disk_full


class Refused(Exception):
    """A C-STORE the handler refuses; carries the status and the metric reason."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} (0x{status:04X}){': ' + detail if detail else ''}")
        self.status = status
        self.reason = reason
        self.detail = detail


def check_header(
    header: Header,
    sop_class_uid: str,
    sop_instance_uid: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Refuse a data set whose header the node cannot keep or process.

    Parameters
    ----------
    header:
        From :func:`parse_header`.
    sop_class_uid, sop_instance_uid:
        Affected SOP Class/Instance UID of the C-STORE request.
    max_pixels:
        Budget in bytes for the decoded pixel data the header declares (``max_pixels``).

    Raises
    ------
    Refused
        With :data:`STATUS_MISSING_UID`, :data:`STATUS_DATASET_MISMATCH`,
        :data:`STATUS_BAD_GEOMETRY`, :data:`STATUS_PIXEL_BUDGET` or
        :data:`STATUS_TRUNCATED_PIXEL_DATA`.
    """
    for name, uid in (
        ("Affected SOP Class UID", sop_class_uid),
        ("StudyInstanceUID", header.study_uid),
        ("SeriesInstanceUID", header.series_uid),
        ("SOPInstanceUID", header.sop_instance_uid),
    ):
        if uid is None:
            raise Refused(STATUS_MISSING_UID, "missing_uid", f"{name} is missing")
        ok, why = validate_uid(uid)
        if not ok:
            raise Refused(STATUS_MISSING_UID, "missing_uid", f"{name} is not valid: {why}")
    if header.sop_instance_uid != sop_instance_uid:
        raise Refused(
            STATUS_DATASET_MISMATCH,
            "sop_mismatch",
            "SOPInstanceUID differs from the request's Affected SOP Instance UID",
        )
    if header.sop_class_uid is not None and header.sop_class_uid != sop_class_uid:
        raise Refused(
            STATUS_DATASET_MISMATCH,
            "sop_mismatch",
            "SOPClassUID differs from the request's Affected SOP Class UID",
        )
    for name, value in (("Rows", header.rows), ("Columns", header.columns)):
        if value is not None and not 0 < value <= MAX_DIMENSION:
            raise Refused(
                STATUS_BAD_GEOMETRY,
                "bad_geometry",
                f"{name} must be 1-{MAX_DIMENSION}, got {value}",
            )
    frames = 1 if header.number_of_frames is None else header.number_of_frames
    if frames < 1:
        raise Refused(STATUS_BAD_GEOMETRY, "bad_geometry", f"NumberOfFrames is {frames}")
    if header.rows is not None and header.columns is not None:
        # every transfer syntax: what decoding would allocate, before anything is written
        samples = header.samples_per_pixel or 1
        bytes_per_sample = max(1, ((header.bits_allocated or 8) + 7) // 8)
        declared = header.rows * header.columns * frames * samples * bytes_per_sample
        if declared > max_pixels:
            raise Refused(
                STATUS_PIXEL_BUDGET,
                "pixel_budget",
                f"the header declares {declared} bytes of pixel data, max_pixels is {max_pixels}",
            )
    length = header.pixel_data_length
    if length is None or length < 0:
        return
    available = header.pixel_data_available or 0
    if length > available:
        raise Refused(
            STATUS_TRUNCATED_PIXEL_DATA,
            "truncated_pixel_data",
            f"Pixel Data declares {length} bytes, only {available} arrived",
        )
    if header.rows is None or header.columns is None or header.bits_allocated is None:
        return
    samples = header.samples_per_pixel or 1
    bits = header.rows * header.columns * samples * frames * header.bits_allocated
    if samples == 3:
        # the shortest native colour encoding is YBR_FULL_422: two samples per pixel on average
        # (PS3.3 C.7.6.3.1.2); the header parser does not read PhotometricInterpretation, so
        # every 3-sample image is held to that floor
        bits = bits * 2 // 3
    expected = (bits + 7) // 8
    if length < expected:
        raise Refused(
            STATUS_TRUNCATED_PIXEL_DATA,
            "truncated_pixel_data",
            f"Pixel Data has {length} bytes, the header needs {expected}",
        )


@dataclass
class StoreContext:
    """What the C-STORE handler needs, bound to it as data (``evt_handlers`` args)."""

    spool: Spool
    on_instance: Callable[[InstanceRecord], None]
    """Records the instance; raises :class:`~dicom_node.jobs.records.IdentityConflict` for an
    instance that contradicts the store (answered :data:`STATUS_IDENTITY_CONFLICT`)."""
    min_free_disk: int
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_free_inodes: int = 0
    """With ``min_free_disk``: the disk guard (:func:`dicom_node.receive.disk.shortage`)."""


def _refuse(status: int, reason: str, calling_ae: str | None, detail: str = "") -> int:
    metrics.INSTANCES_REJECTED.labels(reason=reason).inc()
    LOGGER.warning("C-STORE from %s refused: %s (0x%04X)", calling_ae, reason, status)
    if detail:
        LOGGER.debug("refusal detail: %s", detail)
    return status


def _is_out_of_resources(exc: BaseException) -> bool:
    """Out of memory, disk, quota or files, also when the job store wrapped the cause
    (SQLAlchemy's ``OperationalError`` around sqlite3's SQLITE_FULL "database or disk is full",
    PostgreSQL's ``disk_full`` 53100): followed through ``__cause__``/``__context__``/``orig``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, MemoryError):
            return True
        if isinstance(err, OSError) and err.errno in _OUT_OF_RESOURCE_ERRNOS:
            return True
        if isinstance(err, sqlite3.Error) and (
            getattr(err, "sqlite_errorcode", None) == _SQLITE_FULL
            or "database or disk is full" in str(err)
        ):
            return True
        if getattr(err, "sqlstate", None) == _PG_DISK_FULL:  # psycopg 3
            return True
        orig = getattr(err, "orig", None)
        todo += [err.__cause__, err.__context__, orig if isinstance(orig, BaseException) else None]
    return False


def _dataset_bytes(event: evt.Event) -> bytes:
    """The encoded data set of a C-STORE request, also when pynetdicom spooled it to a file
    (``STORE_RECV_CHUNKED_DATASET`` set elsewhere in the process); public ``Event`` API only."""
    path = event.dataset_path  # None unless pynetdicom spooled the data set
    if path is None:
        return event.encoded_dataset(include_meta=False)
    raw = path.read_bytes()
    group, element, vr, _, length = struct.unpack_from("<HH2sHL", raw, 132)
    if raw[128:132] != b"DICM" or (group, element, vr) != (2, 0, b"UL"):
        raise ValueError("pynetdicom's spooled data set has no readable File Meta")
    return raw[144 + length :]


def handle_store(event: evt.Event, ctx: StoreContext) -> int:
    """Handle one C-STORE request: validate, spool durably, record, answer.

    Parameters
    ----------
    event:
        pynetdicom's ``EVT_C_STORE`` event.
    ctx:
        The spool, the ``on_instance`` callback and the disk guard threshold.

    Returns
    -------
    int
        :data:`STATUS_SUCCESS` once the bytes are fsynced and ``on_instance`` returned (also for an
        instance already in the spool); otherwise :data:`STATUS_OUT_OF_RESOURCES` (disk guard,
        spool write failed, callback out of resources), :data:`STATUS_CANNOT_UNDERSTAND`
        (undecodable), :data:`STATUS_MISSING_UID`, :data:`STATUS_DATASET_MISMATCH`,
        :data:`STATUS_BAD_GEOMETRY`, :data:`STATUS_PIXEL_BUDGET` (declared pixels or inflated
        size over budget), :data:`STATUS_TRUNCATED_PIXEL_DATA`,
        :data:`STATUS_IDENTITY_CONFLICT` (the store refused the instance's UIDs or patient; a
        file this call created is removed again) or :data:`STATUS_PROCESSING_FAILURE`
        (callback failed). Never raises.
    """
    calling_ae: str | None = None
    try:
        received_at = time.time()
        calling_ae = event.assoc.requestor.ae_title
        request = cast(C_STORE, event.request)  # EVT_C_STORE's request is a C-STORE
        data = _dataset_bytes(event)
        room = disk.disk_room(ctx.spool.root)  # bytes less this data set, and inodes
        short = disk.shortage(room, len(data), ctx.min_free_disk, ctx.min_free_inodes)
        if short is not None:
            return _refuse(STATUS_OUT_OF_RESOURCES, "disk_full", calling_ae, short)
        transfer_syntax = str(event.context.transfer_syntax)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        try:
            header = parse_header(data, transfer_syntax, ctx.max_pixels + INFLATE_HEADROOM)
        except TooLarge as exc:
            return _refuse(STATUS_PIXEL_BUDGET, "inflate_limit", calling_ae, str(exc))
        except ValueError as exc:
            return _refuse(STATUS_CANNOT_UNDERSTAND, "undecodable", calling_ae, str(exc))
        try:
            check_header(header, sop_class, sop_instance, ctx.max_pixels)
        except Refused as refusal:
            return _refuse(refusal.status, refusal.reason, calling_ae, refusal.detail)
        study, series = header.study_uid or "", header.series_uid or ""
        meta = encode_file_meta(sop_class, sop_instance, transfer_syntax, calling_ae)
        try:
            # the data set's CRC-32 as the fast path computed it while receiving (None: the
            # spool computes it): the checksum behind the one-flush durability (spool.py)
            crc = dataset_crc32(request) if event.dataset_path is None else None
            stored = ctx.spool.store(study, series, sop_instance, (meta, data), crcs=(None, crc))
        except InvalidUID as exc:
            return _refuse(STATUS_MISSING_UID, "missing_uid", calling_ae, str(exc))
        except OSError as exc:
            LOGGER.error("spool write failed: %s", exc.strerror or exc)
            return _refuse(STATUS_OUT_OF_RESOURCES, "spool_error", calling_ae)
        record = InstanceRecord(
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_uid=study,
            series_uid=series,
            modality=header.modality,
            path=stored.path,
            size=stored.size,
            calling_ae=calling_ae,
            transfer_syntax=transfer_syntax,
            received_at=received_at,
            patient_key=patient_key(
                study, header.patient_id, header.patient_name, header.patient_birth_date
            ),
        )
        try:
            ctx.on_instance(record)
        except IdentityConflict as conflict:
            if stored.created:  # never keep what was refused (a resend's file is the original)
                ctx.spool.remove(stored.path)
            return _refuse(STATUS_IDENTITY_CONFLICT, "identity_conflict", calling_ae, str(conflict))
        except Exception as exc:
            LOGGER.exception("recording a received instance failed")
            if _is_out_of_resources(exc):
                return _refuse(STATUS_OUT_OF_RESOURCES, "callback_out_of_resources", calling_ae)
            return _refuse(STATUS_PROCESSING_FAILURE, "callback_failed", calling_ae)
        if stored.created:
            metrics.INSTANCES_RECEIVED.inc()
        else:
            metrics.INSTANCES_DUPLICATE.inc()
        if LOGGER.isEnabledFor(logging.DEBUG):
            LOGGER.debug(
                "stored %s (%s) in %s, %d bytes, created=%s",
                sop_instance,
                header.modality,
                stored.path,
                stored.size,
                stored.created,
            )
        return STATUS_SUCCESS
    except Exception:  # the handler never raises: pynetdicom would answer a mute 0xC211
        LOGGER.exception("C-STORE handler failed unexpectedly")
        return _refuse(STATUS_PROCESSING_FAILURE, "internal", calling_ae)


def handle_echo(event: evt.Event) -> int:
    """Answer C-ECHO with Success."""
    return ECHO_SUCCESS
