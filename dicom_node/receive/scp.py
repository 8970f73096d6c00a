"""The node's DICOM listener: C-ECHO and C-STORE SCP writing raw bytes into the spool.

The C-STORE handler never decodes and re-encodes a data set: it reads the few header elements it
needs to validate and file the instance, writes the bytes as they came (behind a File Meta built
from the request) into the :class:`~dicom_node.receive.spool.Spool`, fsyncs, hands an
:class:`InstanceRecord` to the injected ``on_instance`` callback (the job store) and only then
answers Success. Every failure has its own status code (module constants ``STATUS_*``) and a
``reason`` label on ``dicom_node_instances_rejected_total``; the handler never raises.

Example
-------
>>> scp = StorageSCP(config, Spool(config.storage), on_instance=records.append)
>>> scp.start(); print(scp.port); ...; scp.stop()
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import NodeConfig, TLSConfig
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive.header import Header, encode_file_meta, parse_header
from dicom_node.receive.spool import InvalidUID, Spool, validate_uid
from dicom_node.receive.transport import NodeAssociationServer

__all__ = [
    "CallerPolicy",
    "Header",
    "InstanceRecord",
    "Refused",
    "StorageSCP",
    "build_ssl_context",
    "check_header",
    "encode_file_meta",
    "handle_store",
    "parse_header",
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
"""Study, Series or SOP Instance UID missing or not a valid UID."""
STATUS_BAD_GEOMETRY = 0xA902
"""Rows or Columns 0 or above :data:`MAX_DIMENSION`, or NumberOfFrames below 1."""
STATUS_TRUNCATED_PIXEL_DATA = 0xA903
"""Uncompressed Pixel Data shorter than Rows x Columns x Samples x Bits/8 x Frames."""
STATUS_PROCESSING_FAILURE = 0xC001
"""The instance is on disk but the job store (``on_instance``) failed; the PACS should retry."""
STATUS_CANNOT_UNDERSTAND = 0xC210
"""The data set could not be decoded."""

MAX_DIMENSION = 16384
"""Largest Rows/Columns accepted; larger values are refused as absurd."""

ECHO_SUCCESS = 0x0000

_OUT_OF_RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE})


class Refused(Exception):
    """A C-STORE the handler refuses; carries the status and the metric reason."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} (0x{status:04X}){': ' + detail if detail else ''}")
        self.status = status
        self.reason = reason
        self.detail = detail


def check_header(header: Header, sop_class_uid: str, sop_instance_uid: str) -> None:
    """Refuse a data set whose header the node cannot keep or process.

    Parameters
    ----------
    header:
        From :func:`parse_header`.
    sop_class_uid, sop_instance_uid:
        Affected SOP Class/Instance UID of the C-STORE request.

    Raises
    ------
    Refused
        With :data:`STATUS_MISSING_UID`, :data:`STATUS_DATASET_MISMATCH`,
        :data:`STATUS_BAD_GEOMETRY` or :data:`STATUS_TRUNCATED_PIXEL_DATA`.
    """
    for name, uid in (
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
    min_free_disk: int


def _refuse(status: int, reason: str, calling_ae: str | None, detail: str = "") -> int:
    metrics.INSTANCES_REJECTED.labels(reason=reason).inc()
    LOGGER.warning("C-STORE from %s refused: %s (0x%04X)", calling_ae, reason, status)
    if detail:
        LOGGER.debug("refusal detail: %s", detail)
    return status


def _is_out_of_resources(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCE_ERRNOS
    )


def _dataset_bytes(event: evt.Event) -> bytes:
    """The encoded data set of a C-STORE request, also when pynetdicom spooled it to a file
    (``_config.STORE_RECV_CHUNKED_DATASET`` set elsewhere in the process)."""
    path = getattr(event.request, "_dataset_path", None)
    if path is None:
        return bytes(event.request.DataSet.getvalue())
    raw = event.dataset_path.read_bytes()
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
        :data:`STATUS_BAD_GEOMETRY`, :data:`STATUS_TRUNCATED_PIXEL_DATA` or
        :data:`STATUS_PROCESSING_FAILURE` (callback failed). Never raises.
    """
    calling_ae: str | None = None
    try:
        received_at = time.time()
        calling_ae = event.assoc.requestor.ae_title
        if ctx.spool.free_bytes() < ctx.min_free_disk:
            return _refuse(STATUS_OUT_OF_RESOURCES, "disk_full", calling_ae)
        request = event.request
        data = _dataset_bytes(event)
        transfer_syntax = str(event.context.transfer_syntax)
        sop_class = str(request.AffectedSOPClassUID or "")
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        try:
            header = parse_header(data, transfer_syntax)
        except ValueError as exc:
            return _refuse(STATUS_CANNOT_UNDERSTAND, "undecodable", calling_ae, str(exc))
        try:
            check_header(header, sop_class, sop_instance)
        except Refused as refusal:
            return _refuse(refusal.status, refusal.reason, calling_ae, refusal.detail)
        study, series = header.study_uid or "", header.series_uid or ""
        meta = encode_file_meta(sop_class, sop_instance, transfer_syntax, calling_ae)
        try:
            stored = ctx.spool.store(study, series, sop_instance, (meta, data))
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
        )
        try:
            ctx.on_instance(record)
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


@dataclass(frozen=True)
class CallerPolicy:
    """The calling-AE allow-list: entries ``AE`` (any host) or ``AE@host``."""

    any_host: frozenset[str]
    with_host: frozenset[tuple[str, str]]

    @classmethod
    def from_entries(cls, entries: list[str]) -> CallerPolicy | None:
        """Build the policy from ``allowed_callers``; ``None`` (allow all) for an empty list.

        Host names are resolved once, here; an entry whose host does not resolve matches only
        that literal text.
        """
        if not entries:
            return None
        any_host: set[str] = set()
        with_host: set[tuple[str, str]] = set()
        for entry in entries:
            ae, sep, host = entry.partition("@")
            ae = ae.strip()
            if not sep:
                any_host.add(ae)
                continue
            host = host.strip()
            with_host.add((ae, host))
            for address in _resolve(host):
                with_host.add((ae, address))
        return cls(frozenset(any_host), frozenset(with_host))

    def allows(self, calling_ae: str, address: str) -> bool:
        """Return True when ``calling_ae`` from ``address`` may associate."""
        ae = calling_ae.strip()
        if ae in self.any_host:
            return True
        return (ae, address) in self.with_host


def _resolve(host: str) -> set[str]:
    try:
        ipaddress.ip_address(host)
        return {host}
    except ValueError:
        pass
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError:
        LOGGER.warning("allowed_callers: host %r does not resolve; matching it literally", host)
        return set()


def handle_requested(event: evt.Event, policy: CallerPolicy | None) -> None:
    """Reject an association whose calling AE (and host) is not on the allow-list."""
    if policy is None:
        return
    assoc = event.assoc
    calling_ae = str(assoc.requestor.primitive.calling_ae_title)
    address = str(assoc.requestor.address)
    if policy.allows(calling_ae, address):
        return
    LOGGER.warning(
        "association from %s at %s rejected: calling AE not allowed", calling_ae, address
    )
    metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
    # rejected-permanent, service-user, calling-AE-title-not-recognized
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()


def handle_accepted(event: evt.Event) -> None:
    """Count an accepted association."""
    metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
    LOGGER.info("association accepted from %s", event.assoc.requestor.ae_title)


def handle_rejected(event: evt.Event) -> None:
    """Count an association pynetdicom rejected itself (e.g. too many associations)."""
    metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
    LOGGER.warning("association rejected (limit or negotiation)")


def build_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Return the server-side TLS context for ``tls``.

    Client certificates are verified against ``tls.ca`` when one is given: required when
    ``require_client_cert``, else optional.

    Raises
    ------
    ValueError
        ``require_client_cert`` without ``ca``.
    OSError, ssl.SSLError
        Unreadable or invalid certificate, key or CA file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("tls.require_client_cert needs tls.ca to verify client certificates")
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _end_negotiation(assoc: Any) -> None:
    """End an acceptor still waiting for A-ASSOCIATE-RQ, as its ACSE timeout would.

    pynetdicom's acceptor blocks on the DUL's queue for up to ``acse_timeout``; ``abort()`` does
    not wake it. A ``None`` on that queue is exactly what the timeout delivers.
    """
    assoc.dul.to_user_queue.put(None)


NEGOTIATION_GRACE = 1.0
"""Seconds a connection that has not finished association negotiation may hold up ``stop()``."""


class StorageSCP:
    """The node's listener: C-ECHO and C-STORE (every storage SOP class and transfer syntax).

    Parameters
    ----------
    config:
        ``ae_title``, ``host``, ``port`` (0: ephemeral), ``allowed_callers``, ``max_associations``,
        ``max_pdu``, ``min_free_disk`` and ``tls`` are used.
    spool:
        Where received instances go.
    on_instance:
        Called after an instance is fsynced (also for duplicates; must be idempotent). If it
        raises, the C-STORE gets a failure status so that the PACS retries.
    """

    def __init__(
        self,
        config: NodeConfig,
        spool: Spool,
        on_instance: Callable[[InstanceRecord], None],
    ) -> None:
        self.config = config
        self.spool = spool
        spool.prepare_ahead = True  # temp files created off the C-STORE path (spool.py)
        self.on_instance = on_instance
        self._server: NodeAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=False, scp_role=True
            )
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES[:4])
        return ae

    def start(self) -> None:
        """Bind and start serving in a background thread; return at once.

        Raises
        ------
        OSError
            The address is in use or cannot be bound.
        RuntimeError
            Already started.
        """
        if self._server is not None:
            raise RuntimeError("StorageSCP is already started")
        ae = self._make_ae()
        ctx = StoreContext(self.spool, self.on_instance, self.config.min_free_disk)
        policy = CallerPolicy.from_entries(list(self.config.allowed_callers))
        ssl_context = build_ssl_context(self.config.tls) if self.config.tls else None
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [ctx]),
            (evt.EVT_REQUESTED, handle_requested, [policy]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected),
        ]
        server = ae.make_server(
            (self.config.host, self.config.port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=NodeAssociationServer,
        )
        ae._servers.append(server)  # so that server.shutdown() finds itself there
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"dicom-node-scp:{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        self._ae, self._server, self._thread = ae, server, thread
        LOGGER.info(
            "listening as %s on %s:%d%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if ssl_context else "",
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish (abort them after ``timeout`` s)."""
        server, thread, ae = self._server, self._thread, self._ae
        if server is None or ae is None:
            return
        server.shutdown()
        if thread is not None:
            thread.join(timeout=5)
        start = time.monotonic()
        deadline = start + timeout
        while ae.active_associations and time.monotonic() < deadline:
            if time.monotonic() - start > NEGOTIATION_GRACE:
                # a bare TCP probe (health check, port scan) never sends A-ASSOCIATE-RQ and would
                # hold the stop for the whole timeout: only established associations may finish
                for assoc in ae.active_associations:
                    if not assoc.is_established:
                        _end_negotiation(assoc)
            time.sleep(0.05)
        for assoc in ae.active_associations:
            LOGGER.warning("aborting an association still running at shutdown")
            assoc.abort()
        self._server = self._thread = self._ae = None
        LOGGER.info("stopped listening")

    @property
    def port(self) -> int:
        """The bound port (the real one when the configuration said 0); 0 when not started."""
        if self._server is None:
            return 0
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        """True while the server thread accepts associations."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
