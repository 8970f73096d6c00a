"""Transport of the listener: the listening socket, TCP_NODELAY, TLS and the association server.

Owns the sockets the node accepts associations on: TCP_NODELAY on the listening and on every
accepted socket (with Nagle on, each small PDU after a data PDU waits for the peer's delayed
ACK, ~40 ms; DESIGN.md, pitfalls), the server-side TLS context (:func:`build_ssl_context`) and
the TLS handshake, done in the connection's own thread with a deadline so that a silent client
cannot stall accepting. The acceptor associations themselves come from
:class:`~dicom_node.receive._pynetdicom_tuned.NodeRequestHandler`.

May import: ``dicom_node.config``, ``dicom_node.metrics``,
:mod:`dicom_node.receive._pynetdicom_tuned`, pynetdicom's public ``transport``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import metrics
from dicom_node.config import TLSConfig
from dicom_node.receive._pynetdicom_tuned import NodeRequestHandler

__all__ = ["HANDSHAKE_TIMEOUT", "NodeAssociationServer", "build_ssl_context", "set_nodelay"]

LOGGER = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a TLS handshake may take before the connection is dropped."""


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on ``sock`` (TCP_NODELAY)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    """pynetdicom's threaded server with TCP_NODELAY and the TLS handshake off the accept loop.

    Passed as ``server_class`` to ``AE.make_server``; its connections are served by
    :class:`~dicom_node.receive._pynetdicom_tuned.NodeRequestHandler` unless a
    ``request_handler`` is given.
    """

    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind as pynetdicom does, with TCP_NODELAY set first."""
        assert self.socket is not None  # socketserver creates it before binding
        set_nodelay(self.socket)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection, set TCP_NODELAY and wrap it (no handshake yet) for TLS."""
        assert self.socket is not None  # bound and listening
        client, address = self.socket.accept()
        set_nodelay(client)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Finish the TLS handshake (if any), then serve the association."""
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            request.settimeout(self.handshake_timeout)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                LOGGER.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
                self.shutdown_request(request)
                return
            request.settimeout(previous)
        super().process_request_thread(request, client_address)
