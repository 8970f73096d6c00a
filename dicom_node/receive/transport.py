"""Transport of the listener: the listening socket, TCP_NODELAY, TLS and the association server.

Owns the sockets the node accepts associations on: TCP_NODELAY on the listening and on every
accepted socket (with Nagle on, each small PDU after a data PDU waits for the peer's delayed
ACK, ~40 ms; DESIGN.md, pitfalls), a send deadline on every accepted socket, the per-host
connection limit, the server-side TLS context (:func:`build_ssl_context`) and the TLS
handshake, done in the connection's own thread with a deadline so that a silent client cannot
stall accepting. The acceptor associations themselves come from
:class:`~dicom_node.receive._pynetdicom_tuned.NodeRequestHandler`, whose reader enforces the
PDU length limits and read deadlines; peers it drops are counted and logged here
(:meth:`NodeAssociationServer.on_drop`).

May import: ``dicom_node.config``, ``dicom_node.metrics``,
:mod:`dicom_node.receive._pynetdicom_tuned`, pynetdicom's public ``transport``.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import metrics
from dicom_node.config import TLSConfig
from dicom_node.receive._pynetdicom_tuned import NodeRequestHandler

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "REFUSE_LINGER",
    "SEND_TIMEOUT",
    "NodeAssociationServer",
    "build_ssl_context",
    "set_nodelay",
    "set_send_timeout",
]

LOGGER = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a TLS handshake may take before the connection is dropped (``acse_timeout``)."""

SEND_TIMEOUT = 60.0
"""Seconds one ``send`` on an accepted socket may wait for a peer that does not read
(``network_timeout``); then the send fails and the association ends."""

REFUSE_LINGER = 1.0
"""Seconds a refused connection is drained after its A-ASSOCIATE-RJ, so that the peer reads
the rejection instead of a reset."""

_RJ_LOCAL_LIMIT = bytes((0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x02, 0x03, 0x02))
"""A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded."""


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on ``sock`` (TCP_NODELAY)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Make a blocking ``send`` on ``sock`` give up after ``seconds`` (SO_SNDTIMEO).

    The socket stays in blocking mode (reads use their own deadlines), so a peer that stops
    reading fails the send instead of blocking the association's thread for ever.
    """
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, micro))


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


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY, deadlines, a per-host limit and TLS.

    Passed as ``server_class`` to ``AE.make_server``; its connections are served by
    :class:`~dicom_node.receive._pynetdicom_tuned.NodeRequestHandler` unless a
    ``request_handler`` is given. Set :attr:`max_per_host`, :attr:`handshake_timeout` and
    :attr:`send_timeout` before serving.

    A connection from a host that already holds :attr:`max_per_host` connections (associations
    and connections still in their TLS handshake) is refused before any of its bytes are read:
    an A-ASSOCIATE-RJ (transient, local limit exceeded) on plain TCP, a close on TLS; counted as
    ``dicom_node_associations_total{outcome="host_limit"}``.
    """

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_per_host: int | None = None
    """Connections one host may hold at once; None: no per-host limit."""
    inline_store: bool = False
    """Serve C-STOREs on each association's reader thread (``NodeDIMSE.inline_store``): only for
    a handler that returns an int status and never raises (the node's ``handle_store``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        self._admit_lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """Nothing: pynetdicom's ``service_actions`` runs a full ``gc.collect()`` every 60 polls
        of ``serve_forever`` (every 12 s here), which holds the GIL for 40-110 ms with the
        node's imports loaded (measured on this 2-core machine) and stalls every association
        and worker at once. Python's own generational collector frees finished associations'
        reference cycles as it goes."""

    def server_bind(self) -> None:
        """Bind as pynetdicom does, with TCP_NODELAY set first."""
        assert self.socket is not None  # socketserver creates it before binding
        set_nodelay(self.socket)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, set TCP_NODELAY and the send deadline, wrap it for TLS."""
        assert self.socket is not None  # bound and listening
        client, address = self.socket.accept()
        set_nodelay(client)
        set_send_timeout(client, self.send_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def on_drop(self, outcome: str, detail: str) -> None:
        """Count and log a peer dropped for a limit or a deadline (no patient data)."""
        metrics.ASSOCIATIONS.labels(outcome=outcome).inc()
        LOGGER.warning("%s", detail)

    def connections_from(self, host: str) -> int:
        """Associations from ``host`` running now, plus its connections not yet admitted."""
        running = sum(
            1 for assoc in self.active_associations if str(assoc.requestor.address) == host
        )
        return running + self._pending[host]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Apply the per-host limit, finish the TLS handshake (if any), serve the association."""
        host = str(client_address[0])
        with self._admit_lock:
            held = self.connections_from(host)
            admit = self.max_per_host is None or held < self.max_per_host
            if admit:
                self._pending[host] += 1
        if not admit:
            self.on_drop(
                "host_limit",
                f"refused a connection from {host}: it holds {held} connections, "
                f"max_associations_per_host is {self.max_per_host}",
            )
            self._refuse(request)
            return
        admitted = False
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request, host):
                return
            with self._admit_lock:  # the association thread starts counted, never twice
                self._release(host)
                admitted = True
                super().process_request_thread(request, client_address)
        finally:
            if not admitted:
                with self._admit_lock:
                    self._release(host)

    def _release(self, host: str) -> None:
        self._pending[host] -= 1
        if self._pending[host] <= 0:
            del self._pending[host]

    def _handshake(self, request: ssl.SSLSocket, host: str) -> bool:
        previous = request.gettimeout()
        request.settimeout(self.handshake_timeout)
        try:
            request.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            LOGGER.warning("TLS handshake with %s failed: %s", host, exc)
            metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
            self.shutdown_request(request)
            return False
        request.settimeout(previous)
        return True

    def _refuse(self, request: Any) -> None:
        """Answer A-ASSOCIATE-RJ (plain TCP) and close after a short drain; TLS: close."""
        try:
            if not isinstance(request, ssl.SSLSocket):
                request.settimeout(REFUSE_LINGER)
                request.sendall(_RJ_LOCAL_LIMIT)
                request.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + REFUSE_LINGER
                drained = 0
                while drained < 1 << 20 and (left := deadline - time.monotonic()) > 0:
                    ready, _, _ = select.select([request], [], [], left)
                    if not ready:
                        break
                    chunk = request.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
        except OSError:
            pass
        finally:
            request.close()
