"""Send results to a DICOM peer: C-STORE SCU that reports every outcome and never raises for it.

:func:`send_dataset` opens one association per call with TCP_NODELAY on its socket (with Nagle on,
each small PDU after a data PDU waits for the peer's delayed ACK; DESIGN.md, pitfalls), proposes the
dataset's SOP class with Explicit and Implicit VR Little Endian, sends, and returns an
:class:`ExportResult`. Network trouble (refused, timed out, rejected, aborted, no response) becomes
``ok=False`` with a reason a person can act on; retries and backoff belong to the caller.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket

from dicom_node.config import Destination, TLSConfig
from dicom_node.send.result import ExportResult

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
"""C-STORE status: stored."""

NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""Transfer syntaxes proposed for an uncompressed dataset, preferred first."""

DEFAULT_TIMEOUT = 30.0
"""Seconds for connecting, association negotiation and the C-STORE response, each."""


class _NoDelayAE(AE):
    """An AE whose requestor sockets have TCP_NODELAY set before they connect."""

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        sock = super()._create_socket(assoc, address, tls_args)
        if sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def client_tls_context(tls: TLSConfig, *, check_hostname: bool = True) -> ssl.SSLContext:
    """Return an SSL context for sending to destinations with ``tls: true``.

    Parameters
    ----------
    tls
        The node's TLS settings: ``ca`` verifies the peer (system CAs when None), ``cert`` and
        ``key`` identify the node to peers that require client certificates.
    check_hostname
        Verify that the peer's certificate names the destination's host.

    Returns
    -------
    ssl.SSLContext
        Client-side context, TLS 1.2 or newer, peer certificate required.

    Raises
    ------
    OSError, ssl.SSLError
        If a certificate, key or CA file cannot be read.
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    return context


def _status_result(status: int, comment: str | None) -> ExportResult:
    category = code_to_category(status)
    extra = f": {comment}" if comment else ""
    if status == STATUS_SUCCESS:
        return ExportResult(True, status, "stored")
    if category == "Warning":
        return ExportResult(True, status, f"warning 0x{status:04X}{extra}")
    return ExportResult(False, status, f"{category.lower()} 0x{status:04X}{extra}")


def _refusal_reason(
    assoc: Association, destination: Destination, connected: bool, tls: bool
) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if not connected:
        causes = "refused, unreachable, timed out" + (" or TLS handshake failed" if tls else "")
        return f"cannot connect to {where} ({causes})"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        detail = ""
        if primitive is not None:
            try:
                detail = f": {primitive.reason_str} ({primitive.result_str})"
            except (AttributeError, KeyError, ValueError):
                detail = ""
        return f"association rejected by {where}{detail}"
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        syntaxes = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        return f"{where} accepted no presentation context for {', '.join(sorted(syntaxes))}"
    if assoc.is_aborted:
        return f"association aborted by {where} during negotiation"
    return f"association with {where} not established (no answer to the request)"


def _contexts_for(ds: Dataset) -> list[Any]:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntaxes: list[str | UID]
    if syntax is not None and UID(syntax) not in NATIVE_SYNTAXES:
        syntaxes = [UID(syntax)]  # compressed: the peer must accept it as it is
    else:
        syntaxes = list(NATIVE_SYNTAXES)
    return [build_context(ds.SOPClassUID, syntaxes)]


def send_dataset(
    ds: Dataset,
    destination: Destination,
    *,
    calling_ae: str = "DICOMNODE",
    timeout: float = DEFAULT_TIMEOUT,
    tls_context: ssl.SSLContext | None = None,
) -> ExportResult:
    """C-STORE one dataset to ``destination`` over a new association.

    Parameters
    ----------
    ds
        The instance to send; SOPClassUID and SOPInstanceUID are required.
    destination
        Peer AE title, host, port and whether it speaks TLS.
    calling_ae
        Our AE title.
    timeout
        Seconds allowed for the TCP connect, the association negotiation and the C-STORE
        response, each.
    tls_context
        Client SSL context (see :func:`client_tls_context`); required when ``destination.tls``.

    Returns
    -------
    ExportResult
        ``ok=True`` with status 0x0000 (``stored``) or a warning status. ``ok=False`` with
        ``status=None`` when the peer cannot be reached, refuses or rejects the association,
        aborts, accepts no presentation context for the SOP class, or sends no response before
        ``timeout`` (``reason`` starts with ``no response``); ``ok=False`` with the status for
        a failure or cancel status (``failure 0xA700: ...``).

    Raises
    ------
    TypeError
        If ``ds`` is not a pydicom Dataset (a programming error, not a network problem).
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    if destination.tls and tls_context is None:
        return ExportResult(False, None, "destination requires TLS but no TLS context was given")
    ae = _NoDelayAE(ae_title=calling_ae)
    ae.requested_contexts = _contexts_for(ds)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    tls_args = (tls_context, destination.host) if tls_context is not None else None
    connected: list[bool] = []
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, lambda event: connected.append(True))]
    assoc: Association | None = None
    try:
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=tls_args,
            evt_handlers=handlers,
        )
        if not assoc.is_established:
            reason = _refusal_reason(assoc, destination, bool(connected), tls_args is not None)
            LOGGER.warning("export to %s failed: %s", destination.ae_title, reason)
            return ExportResult(False, None, reason)
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID]
        if not accepted:
            reason = f"{destination.ae_title} accepted no presentation context for {ds.SOPClassUID}"
            LOGGER.warning("export failed: %s", reason)
            return ExportResult(False, None, reason)
        response = assoc.send_c_store(ds)
        if not response or "Status" not in response:
            # timeout or abort: pynetdicom returns an empty Dataset instead of raising
            reason = "no response (C-STORE timed out or the association was aborted)"
            LOGGER.warning("export to %s failed: %s", destination.ae_title, reason)
            return ExportResult(False, None, reason)
        result = _status_result(int(response.Status), response.get("ErrorComment"))
        log = LOGGER.info if result.ok else LOGGER.warning
        log("export to %s: %s", destination.ae_title, result.reason)
        return result
    except Exception as exc:  # never raise for network problems: turn them into an outcome
        LOGGER.exception("export to %s failed", destination.ae_title)
        return ExportResult(False, None, f"{type(exc).__name__}: {exc}")
    finally:
        if assoc is not None:
            if assoc.is_established:
                assoc.release()
            elif assoc.is_alive():
                assoc.abort()
        ae.shutdown()


def send_file(
    path: str | Path,
    destination: Destination,
    *,
    calling_ae: str = "DICOMNODE",
    timeout: float = DEFAULT_TIMEOUT,
    tls_context: ssl.SSLContext | None = None,
) -> ExportResult:
    """Read a DICOM file and :func:`send_dataset` it.

    Returns
    -------
    ExportResult
        As :func:`send_dataset`; ``ok=False``, ``status=None`` and a ``cannot read`` reason when
        the file is missing or not DICOM.
    """
    try:
        ds = dcmread(path)
    except Exception as exc:
        LOGGER.warning("export: cannot read %s: %s", path, exc)
        return ExportResult(False, None, f"cannot read {Path(path).name}: {exc}")
    return send_dataset(
        ds, destination, calling_ae=calling_ae, timeout=timeout, tls_context=tls_context
    )
