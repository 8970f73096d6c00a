"""pynetdicom's acceptor plumbing, tuned for the node's receive path.

pynetdicom 3.0 runs two polling loops per association: the DUL reactor sleeps 1 ms whenever it
finds nothing to do, and the association reactor sleeps 1 ms before every look at its message
queue. On a loaded 2-core VM each such nap lasts 1-2 ms, and a C-STORE crosses both loops several
times (data PDUs in, response out), so polling, not work, dominated the time per instance
(``bench/bench_ingest.py``, RESULTS.md). The classes here keep pynetdicom's state machine, ACSE,
DIMSE and event handlers, and change only how the loops wait:

- :class:`NodeDUL` waits in ``select`` on the socket *and* a wake-up socket pair that
  :meth:`NodeDUL.send_pdu` pokes, so it reacts to incoming bytes and outgoing primitives at once.
- :class:`NodeAssociation` blocks on the DIMSE message queue (``queue.get`` with a short timeout)
  instead of sleeping.
- :class:`NodeAssociationSocket` reads whole PDUs with ``recv_into`` rather than 4 KiB pieces.
- :class:`NodeAssociationServer` sets TCP_NODELAY on the listening and accepted sockets and does the
  TLS handshake in the connection's own thread, so a silent client cannot stall accepting.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import time
from datetime import datetime
from typing import Any, cast

from pynetdicom import _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node import metrics

LOGGER = logging.getLogger(__name__)

IDLE_WAIT = 0.02
"""Seconds the DUL and association loops wait for an event before re-checking timers and flags.

Only latency to *timers* (ARTIM, idle timeout) and to a peer's A-RELEASE depends on it; data and
responses wake the loops at once."""

RECV_CHUNK = 1 << 20
"""Largest single ``recv_into`` while reading a PDU."""

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a TLS handshake may take before the connection is dropped."""

_STANDARD_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)


class NodeAssociationSocket(AssociationSocket):
    """AssociationSocket that reads a PDU with few large ``recv_into`` calls."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only when the peer closed the connection)."""
        sock = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        nr_read = 0
        try:
            while nr_read < nr_bytes:
                got = sock.recv_into(view[nr_read:], min(nr_bytes - nr_read, RECV_CHUNK))
                if not got:  # the peer closed the connection: return what arrived
                    break
                nr_read += got
        finally:
            view.release()
        if nr_read < nr_bytes:
            del buffer[nr_read:]
        return buffer


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_store_rsp(rsp: C_STORE) -> bytes | None:
    """Encode a plain C-STORE-RSP command set (Implicit VR Little Endian) without pydicom.

    Returns None for responses this fast path does not cover (error comment, offending element),
    which then go through pynetdicom's encoder.
    """
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    if rsp.AffectedSOPClassUID is None or rsp.AffectedSOPInstanceUID is None:
        return None
    body = b"".join(
        (
            _implicit(0x00000002, _uid_value(str(rsp.AffectedSOPClassUID))),
            _implicit(0x00000100, struct.pack("<H", 0x8001)),
            _implicit(0x00000120, struct.pack("<H", int(rsp.MessageIDBeingRespondedTo or 0))),
            _implicit(0x00000800, struct.pack("<H", 0x0101)),
            _implicit(0x00000900, struct.pack("<H", int(rsp.Status or 0))),
            _implicit(0x00001000, _uid_value(str(rsp.AffectedSOPInstanceUID))),
        )
    )
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


class NodeDIMSE(DIMSEServiceProvider):
    """DIMSE provider that encodes C-STORE responses directly (the per-instance reply).

    Everything else, and every response when a handler listens to ``EVT_DIMSE_SENT`` (pynetdicom's
    debug logging), goes through pynetdicom's own path.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; C-STORE-RSP in one P-DATA without building a pydicom Dataset."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(primitive)
            max_pdu = self.maximum_pdu_size
            if command is not None and (not max_pdu or len(command) + 7 <= max_pdu):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class NodeDUL(DULServiceProvider):
    """DUL reactor that sleeps in ``select`` on the socket and a wake-up pair, not in ``sleep``."""

    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _kill_flag: bool = False

    def _ensure_wake(self) -> None:
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)

    def _wake(self) -> None:
        self._ensure_wake()
        try:
            cast(socket.socket, self._wake_w).send(b"\x00")
        except (BlockingIOError, OSError):
            pass  # already poked (buffer full) or closing: the loop wakes anyway

    @property  # type: ignore[override]
    def _kill_thread(self) -> bool:
        return self._kill_flag

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._kill_flag = value
        if value:
            self._wake()

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive for the peer and wake the reactor to send it now."""
        super().send_pdu(primitive)
        self._wake()

    def _idle_wait(self) -> None:
        """Block until the socket has data, a primitive was queued, or :data:`IDLE_WAIT`."""
        self._ensure_wake()
        wake_r = cast(socket.socket, self._wake_r)
        transport = self.socket.socket if self.socket is not None else None
        if transport is None or getattr(transport, "_closed", False):
            time.sleep(self._run_loop_delay)
            return
        if isinstance(transport, ssl.SSLSocket) and transport.pending():
            return
        try:
            ready, _, _ = select.select([transport, wake_r], [], [], IDLE_WAIT)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)
            return
        if wake_r in ready:
            try:
                while wake_r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (``DULServiceProvider.run_reactor``) with an event-driven wait."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._idle_wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    LOGGER.error("Exception in the DUL reactor, aborting association")
                    LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()


class NodeAssociation(Association):
    """Acceptor Association whose reactor waits on the DIMSE queue instead of sleeping 1 ms."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = NodeDUL(self)
        self.dimse = NodeDIMSE(self)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop (``Association._run_reactor``) with a blocking wait."""
        self._is_paused = False
        msg_queue = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = msg_queue.get(block=True, timeout=IDLE_WAIT)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                LOGGER.info("Association aborted by the peer")
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class NodeRequestHandler(RequestHandler):
    """Creates :class:`NodeAssociation` acceptors on :class:`NodeAssociationSocket` sockets."""

    def _create_association(self) -> Association:
        """As ``RequestHandler._create_association``, with the node's classes."""
        server = cast(ThreadedAssociationServer, self.server)
        assoc = NodeAssociation(self.ae, "acceptor")
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = NodeAssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # The contexts are never modified by negotiation: share them instead of a deep copy
        assoc.acceptor.supported_contexts = server.contexts
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list, handlers):
                    assoc.bind(event, handler[0], handler[1])
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            for event, handler in _STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        return assoc


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY and the TLS handshake off the accept loop.

    With Nagle on, each small PDU after a data PDU waits for the peer's delayed ACK (~40 ms); see
    DESIGN.md, pitfalls.
    """

    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", NodeRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Bind as pynetdicom does, with TCP_NODELAY set first."""
        assert self.socket is not None
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection, set TCP_NODELAY and wrap it (no handshake yet) for TLS."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
