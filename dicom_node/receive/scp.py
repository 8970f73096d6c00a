"""The node's listener: :class:`StorageSCP`, the association policy, and the wiring of the layers.

Owns what ``node.py`` uses, ``StorageSCP(config, spool, on_instance)`` with ``.start()``,
``.stop()``, ``.port`` and ``.listening``, and the association-level policy: the calling-AE
allow-list (:class:`CallerPolicy`), the presentation contexts offered, and the counting of
accepted and rejected associations. It binds the handlers of :mod:`dicom_node.receive.handler`
as data to a :class:`~dicom_node.receive.transport.NodeAssociationServer`.

May import: ``dicom_node.config``, ``dicom_node.metrics``, ``dicom_node.jobs.records`` and the
other ``dicom_node.receive`` modules; pynetdicom's public API (private names only through
:mod:`dicom_node.receive._pynetdicom_tuned`).

Example
-------
>>> scp = StorageSCP(config, Spool(config.storage), on_instance=records.append)
>>> scp.start(); print(scp.port); ...; scp.stop()
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import UID_dictionary
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
    register_uid,
    sop_class,
)
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import CallerEntry, NodeConfig
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive._pynetdicom_tuned import (
    end_negotiation,
    register_server,
    set_unrestricted_storage,
)
from dicom_node.receive.handler import StoreContext, handle_echo, handle_store
from dicom_node.receive.spool import Spool
from dicom_node.receive.transport import NodeAssociationServer, build_ssl_context

__all__ = [
    "NEGOTIATION_GRACE",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "CallerPolicy",
    "InstanceRecord",
    "StorageSCP",
]

LOGGER = logging.getLogger(__name__)


def _storage_sop_classes() -> tuple[str, ...]:
    """Every storage SOP class pydicom's UID dictionary names (``... Storage``, ``... Storage -
    For Presentation``, trial and retired ones included), plus any pynetdicom lists."""
    found = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind != "SOP Class" or name.startswith(("Storage Commitment", "Media Storage")):
            continue
        if re.search(r"Storage( - .+)?$", name):
            found.add(uid)
    return tuple(sorted(found))


STORAGE_SOP_CLASSES: tuple[str, ...] = _storage_sop_classes()
"""The storage SOP classes registered, retired ones included (pynetdicom's
``AllStoragePresentationContexts`` lacks NM 1.2.840.10008.5.1.4.1.1.5, US ...1.1.6 and others)."""


def _register_with_storage_service() -> None:
    """Tell pynetdicom that the storage classes it does not list belong to the storage service.

    Negotiating a context is not enough: pynetdicom picks the service for each C-STORE from the
    SOP class, and answers a retired class it does not know with an error instead of calling
    the handler (with ``accept_unknown_sop_classes`` on, its unrestricted mode covers them).
    """
    listed = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    for uid in STORAGE_SOP_CLASSES:
        if uid in listed or sop_class.uid_to_service_class(uid) is StorageServiceClass:
            continue
        keyword = UID_dictionary.get(uid, ("", "", "", "", ""))[4]
        if not keyword or hasattr(sop_class, keyword):
            keyword = "NodeStorage_" + uid.replace(".", "_")
        register_uid(uid, keyword, StorageServiceClass)


_register_with_storage_service()

TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *ALL_TRANSFER_SYNTAXES,
            *(u for u, v in UID_dictionary.items() if v[1] == "Transfer Syntax"),
        ]
    )
)
"""Every transfer syntax pynetdicom or pydicom knows; the spool keeps the bytes as sent."""


@dataclass(frozen=True)
class _Caller:
    """One allow-list entry: an AE title, the addresses it may call from (``None``: any) and
    the certificate subject parts it must present (``None``: no certificate check)."""

    ae_title: str
    addresses: frozenset[str] | None
    subject: tuple[tuple[str, str], ...] | None


Subject = tuple[tuple[str, str], ...]
"""A certificate subject flattened: ``(("commonName", "ct1"), ("organizationName", "H"))``."""


@dataclass(frozen=True)
class CallerPolicy:
    """The calling-AE allow-list (``allowed_callers``): entries ``AE`` (any host), ``AE@host``
    or :class:`~dicom_node.config.CallerEntry` mappings that may also pin a TLS client
    certificate subject. A caller is allowed when any one entry matches all it names."""

    callers: tuple[_Caller, ...]

    @classmethod
    def from_entries(cls, entries: Sequence[str | CallerEntry]) -> CallerPolicy | None:
        """Build the policy from ``allowed_callers``; ``None`` (allow all) for an empty list.

        Host names are resolved once, here; an entry whose host does not resolve matches only
        that literal text.

        Raises
        ------
        ValueError
            An entry that is not valid (the configuration validates them first).
        """
        if not entries:
            return None
        callers = []
        for entry in entries:
            parsed = CallerEntry.from_text(entry) if isinstance(entry, str) else entry
            addresses = None
            if parsed.host is not None:
                addresses = frozenset({parsed.host, *_resolve(parsed.host)})
            callers.append(_Caller(parsed.ae_title, addresses, parsed.subject))
        return cls(tuple(callers))

    def check(self, calling_ae: str, address: str, subject: Subject | None = None) -> str | None:
        """Return ``None`` when ``calling_ae`` from ``address`` (with a client certificate of
        ``subject``, if any) may associate, else why not (for the log)."""
        ae = calling_ae.strip()
        named = [c for c in self.callers if c.ae_title == ae]
        if not named:
            return "calling AE not in allowed_callers"
        from_here = [c for c in named if c.addresses is None or address in c.addresses]
        if not from_here:
            return "calling AE not allowed from this host"
        presented = set(subject or ())
        for caller in from_here:
            if caller.subject is None or set(caller.subject) <= presented:
                return None
        if subject is None:
            return "no client certificate; allowed_callers requires one for this AE"
        return "client certificate subject does not match allowed_callers"

    def allows(self, calling_ae: str, address: str, subject: Subject | None = None) -> bool:
        """Return True when ``calling_ae`` from ``address`` (certificate ``subject``) may
        associate."""
        return self.check(calling_ae, address, subject) is None


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


def peer_subject(assoc: Any) -> Subject | None:
    """The verified client certificate subject of an association's TLS socket, else ``None``.

    Python's ``ssl`` returns a subject only for a certificate it verified against ``tls.ca``.
    """
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):  # not connected any more, or handshake not done
        return None
    if not cert:
        return None
    rdns = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
    return tuple((str(k), str(v)) for rdn in rdns for k, v in rdn)


def handle_requested(event: evt.Event, policy: CallerPolicy | None) -> None:
    """Reject an association whose calling AE, host or client certificate is not allowed."""
    if policy is None:
        return
    assoc = event.assoc
    primitive = assoc.requestor.primitive  # the A-ASSOCIATE-RQ being answered
    calling_ae = str(primitive.calling_ae_title) if primitive is not None else ""
    address = str(assoc.requestor.address)
    reason = policy.check(calling_ae, address, peer_subject(assoc))
    if reason is None:
        return
    LOGGER.warning("association from %s at %s rejected: %s", calling_ae, address, reason)
    metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
    # rejected-permanent, service-user, calling-AE-title-not-recognized (for host and
    # certificate mismatches too: the PACS side reads it as "check the allow-list")
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


NEGOTIATION_GRACE = 1.0
"""Seconds a connection that has not finished association negotiation may hold up ``stop()``."""


class StorageSCP:
    """The node's listener: C-ECHO and C-STORE (every storage SOP class and transfer syntax).

    Parameters
    ----------
    config:
        ``ae_title``, ``host``, ``port`` (0: ephemeral), ``allowed_callers``, ``max_associations``,
        ``max_associations_per_host``, ``max_pdu``, ``acse_timeout``, ``dimse_timeout``,
        ``network_timeout``, ``min_free_disk`` and ``tls`` are used.
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
        self._unrestricted_before = False

    def _make_ae(self) -> AE:
        """The AE with every storage SOP class (retired included) and transfer syntax.

        No ``scu_role``/``scp_role`` on storage contexts: in pynetdicom those answer the
        caller's proposed roles, so setting them rejects the contexts of callers that send
        SCP/SCU Role Selection (DESIGN.md pitfalls). ``accept_unknown_sop_classes`` switches
        pynetdicom's unrestricted storage mode on or off (process-wide, see
        :func:`~dicom_node.receive._pynetdicom_tuned.set_unrestricted_storage`).
        """
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES[:4])
        self._unrestricted_before = set_unrestricted_storage(self.config.accept_unknown_sop_classes)
        return ae

    def _apply_limits(self, ae: AE, server: NodeAssociationServer) -> None:
        """Network limits and deadlines (README "Network limits"), set before serving.

        The AE's timeouts reach every association (pynetdicom copies them at creation): ACSE
        (the A-ASSOCIATE-RQ must be complete within it), DIMSE (silence inside a started PDU or
        message) and network (idle between messages); the server gets the per-host limit, the
        TLS handshake deadline and the send deadline.
        """
        config = self.config
        ae.acse_timeout = config.acse_timeout
        ae.dimse_timeout = config.dimse_timeout
        ae.network_timeout = config.network_timeout
        server.max_per_host = min(config.max_associations_per_host, config.max_associations)
        server.handshake_timeout = config.acse_timeout
        server.send_timeout = config.network_timeout

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
        ctx = StoreContext(
            self.spool,
            self.on_instance,
            self.config.min_free_disk,
            min_free_inodes=self.config.min_free_inodes,
            max_pixels=self.config.max_pixels,
        )
        policy = CallerPolicy.from_entries(self.config.allowed_callers)
        ssl_context = build_ssl_context(self.config.tls) if self.config.tls else None
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [ctx]),
            (evt.EVT_REQUESTED, handle_requested, [policy]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected),
        ]
        server = cast(
            NodeAssociationServer,
            ae.make_server(
                (self.config.host, self.config.port),
                ssl_context=ssl_context,
                evt_handlers=handlers,
                server_class=NodeAssociationServer,
            ),
        )
        self._apply_limits(ae, server)
        server.inline_store = True  # handle_store answers an int status and never raises
        register_server(ae, server)  # so that server.shutdown() finds itself there
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
                        end_negotiation(assoc)
            time.sleep(0.05)
        for assoc in ae.active_associations:
            LOGGER.warning("aborting an association still running at shutdown")
            assoc.abort()
        self._server = self._thread = self._ae = None
        self.spool.close()  # no association is left to store: drop the prepared files
        set_unrestricted_storage(self._unrestricted_before)  # the flag is process-wide
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
