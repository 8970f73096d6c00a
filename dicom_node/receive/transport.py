"""pynetdicom's acceptor plumbing, tuned for the node's receive path.

pynetdicom 3.0 runs two polling loops per association: the DUL reactor sleeps 1 ms whenever it
finds nothing to do, and the association reactor sleeps 1 ms before every look at its message
queue. On a loaded 2-core VM each such nap lasts 1-2 ms, and a C-STORE crosses both loops several
times (data PDUs in, response out), so polling, not work, dominated the time per instance
(``bench/bench_ingest.py``, RESULTS.md). The classes here keep pynetdicom's state machine, ACSE,
DIMSE and event handlers, change how the loops wait, and take a short cut for the per-instance
traffic (C-STORE-RQ in, C-STORE-RSP out) wherever pynetdicom's long way would do the same:

- :class:`NodeDUL` waits in ``select`` on the socket *and* a wake-up socket pair that
  :meth:`NodeDUL.send_pdu` pokes, so it reacts to incoming bytes and outgoing primitives at once.
  A P-DATA-TF received in Sta6 goes straight to DIMSE with its PDVs as views of the receive
  buffer (:meth:`NodeDUL._read_pdu_data`), which is all that the state machine's DT-2 does.
- :class:`NodeAssociation` blocks on the DIMSE message queue (``queue.get`` with a short timeout)
  instead of sleeping.
- :class:`NodeAssociationSocket` reads whole PDUs with ``recv_into`` rather than 4 KiB pieces.
- :class:`NodeDIMSE` assembles C-STORE requests itself: the command set is read with ``struct``
  (:func:`parse_c_store_rq`) and the data set fragments are joined once, instead of decoding the
  command through pydicom and copying each fragment into a ``BytesIO``. It encodes the C-STORE
  response with ``struct`` and sends it from the association thread (no hand-off to the DUL
  thread) on plain TCP. Anything else, and everything while pynetdicom's debug logging or
  another handler watches PDUs, DIMSE messages or state transitions, goes pynetdicom's way.
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
import threading
import time
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pynetdicom import _config, _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
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
    """AssociationSocket that reads a PDU with few large ``recv_into`` calls.

    Sends are serialised by a lock: the association thread sends C-STORE responses itself
    (:meth:`NodeDIMSE.send_msg`) while the DUL thread may send other PDUs.
    """

    _send_lock = threading.Lock()  # replaced per instance in __init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._send_lock = threading.Lock()

    def send(self, bytestream: bytes) -> None:
        """Send ``bytestream`` whole (pynetdicom's ``send``, one sender at a time)."""
        with self._send_lock:
            super().send(bytestream)

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


_CMD_US = {
    0x0100: "CommandField",
    0x0110: "MessageID",
    0x0700: "Priority",
    0x0800: "CommandDataSetType",
    0x1031: "MoveOriginatorMessageID",
}
_CMD_UI = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101


def parse_c_store_rq(command: bytes) -> dict[str, Any] | None:
    """Read a C-STORE-RQ command set (Implicit VR Little Endian) without pydicom.

    Returns the primitive's parameters by keyword (plus ``CommandField`` and
    ``CommandDataSetType``), or None for anything this fast path does not cover: another
    command, a request without a data set, an element it does not know, a malformed length.
    pynetdicom then decodes the command itself, so odd requests behave exactly as before.
    """
    fields: dict[str, Any] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if group != 0 or offset + length > end:
            return None
        value = command[offset : offset + length]
        offset += length
        if element == 0x0000:  # CommandGroupLength
            if length != 4:
                return None
        elif element in _CMD_US:
            if length != 2:
                return None
            fields[_CMD_US[element]] = value[0] | (value[1] << 8)
        elif element in _CMD_UI:
            fields[_CMD_UI[element]] = value.rstrip(b"\x00 ").decode("ascii")
        elif element == 0x1030:
            fields["MoveOriginatorApplicationEntityTitle"] = value.decode("ascii").strip()
        else:
            return None
    if fields.get("CommandField") != _C_STORE_RQ:
        return None
    if fields.get("CommandDataSetType", _NO_DATA_SET) == _NO_DATA_SET:
        return None
    if not all(k in fields for k in ("MessageID", *_CMD_UI.values())):
        return None
    return fields


def _c_store_request(fields: dict[str, Any], context_id: int) -> C_STORE:
    """The C-STORE primitive pynetdicom would build from ``fields`` (its setters validate)."""
    req = C_STORE()
    for keyword, value in fields.items():
        if keyword not in ("CommandField", "CommandDataSetType"):
            setattr(req, keyword, value)
    req._context_id = context_id
    req._dataset_path = None
    req._dataset_file = None
    return req


class NodeDIMSE(DIMSEServiceProvider):
    """DIMSE provider with a fast path for the per-instance traffic: C-STORE-RQ in, RSP out.

    Incoming: a C-STORE-RQ is assembled here (:meth:`receive_primitive`). Outgoing: a plain
    C-STORE-RSP is encoded with ``struct`` (:meth:`send_msg`). Everything else, and everything
    while a handler listens to ``EVT_DIMSE_RECV`` / ``EVT_DIMSE_SENT`` (pynetdicom's debug
    logging) or ``STORE_RECV_CHUNKED_DATASET`` is set, goes through pynetdicom's own path.
    """

    _fast_command: list[bytes] | None = None
    """Command fragments received so far (fast path), None between messages."""
    _fast_request: C_STORE | None = None
    """The C-STORE-RQ whose data set is being received (fast path)."""
    _fast_data: list[Any] | None = None
    _fast_raw_command: bytes = b""

    def _send_now(self, command: bytes, context_id: int) -> bool:
        """Send a one-PDV P-DATA-TF (a C-STORE-RSP) from this thread; False: use the DUL.

        Saves the hand-off to the DUL thread (queue, wake-up, ``select``) per instance. Only in
        state Sta6 with nothing else queued for the peer (then the DUL would do exactly this:
        DT-1 sends the PDU and stays in Sta6), on a plain TCP socket (an SSL object must not be
        written and read by two threads at once) and when no handler watches sent PDUs.
        """
        dul = self.dul
        sock = dul.socket
        if (
            not isinstance(sock, NodeAssociationSocket)
            or isinstance(sock.socket, ssl.SSLSocket)
            or dul.state_machine.current_state != "Sta6"
            or not dul.to_provider_queue.empty()
            or self.assoc.get_handlers(evt.EVT_PDU_SENT)
            or self.assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        ):
            return False
        pdv_length = len(command) + 2
        sock.send(
            struct.pack(">BBLLBB", 0x04, 0x00, pdv_length + 4, pdv_length, context_id, 0x03)
            + command
        )
        return True

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Process a P-DATA primitive: C-STORE-RQ fragments here, the rest by pynetdicom."""
        if primitive.__class__ is not P_DATA:
            self._fast_abandon()
            super().receive_primitive(primitive)
            return
        self.receive_pdvs(primitive.presentation_data_value_list)

    def receive_pdvs(self, pdvs: list[tuple[int, Any]]) -> None:
        """Process the PDVs of one P-DATA (values: ``bytes`` or views of the receive buffer)."""
        if _config.STORE_RECV_CHUNKED_DATASET or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            self._fast_abandon()
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[cx, bytes(data)] for cx, data in pdvs]
            super().receive_primitive(primitive)
            return
        for context_id, data in pdvs:
            if self.message is not None:  # pynetdicom is assembling this message
                self._to_pynetdicom(context_id, data)
            else:
                self._fast_pdv(context_id, data)

    def _to_pynetdicom(self, context_id: int, data: Any) -> None:
        single = P_DATA()
        single.presentation_data_value_list.append((context_id, bytes(data)))
        super().receive_primitive(single)

    def _fast_abandon(self) -> None:
        """Give a message assembled so far on the fast path to pynetdicom."""
        if self._fast_request is not None:
            context_id = cast(int, self._fast_request._context_id)
            chunks, self._fast_request, self._fast_data = self._fast_data or [], None, None
            self._to_pynetdicom(context_id, b"\x03" + self._fast_raw_command)
            for chunk in chunks:
                self._to_pynetdicom(context_id, b"\x00" + bytes(chunk))
        elif self._fast_command:
            # a command whose last fragment has not arrived: keep it, without its final bit
            command, self._fast_command = b"".join(self._fast_command), None
            if self.message is None:
                self.message = DIMSEMessage()
            self.message.encoded_command_set.write(command)
        self._fast_command = None

    def _fast_pdv(self, context_id: int, data: bytes) -> None:
        header = data[0]
        request = self._fast_request
        if request is None:
            if not header & 1:  # data before the command ended: pynetdicom's business
                self._fast_abandon()
                self._to_pynetdicom(context_id, data)
                return
            if self._fast_command is None:
                self._fast_command = []
            self._fast_command.append(data[1:])
            if not header & 2:
                return
            command, self._fast_command = b"".join(self._fast_command), None
            fields = parse_c_store_rq(command)
            try:
                request = _c_store_request(fields, context_id) if fields else None
            except Exception:  # an invalid value: pynetdicom reports it as it always did
                request = None
            if request is None:
                self._to_pynetdicom(context_id, b"\x03" + command)
                return
            self._fast_request, self._fast_data, self._fast_raw_command = request, [], command
            return
        if header & 1:  # a new command before the data set ended: as pynetdicom would see it
            self._fast_abandon()
            self._to_pynetdicom(context_id, data)
            return
        chunks = cast(list, self._fast_data)
        chunks.append(memoryview(data)[1:])
        if header & 2:
            request.DataSet = BytesIO(b"".join(chunks))
            self._fast_request = self._fast_data = None
            self._fast_raw_command = b""
            self.msg_queue.put((cast(int, request._context_id), request))

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
                if self._send_now(command, context_id):
                    return
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

    def _read_pdu_data(self) -> None:
        """Read one PDU; a P-DATA-TF in Sta6 goes straight to DIMSE.

        pynetdicom copies each PDU three times (``bytearray`` +=, ``bytes()``, one slice per
        PDV) and passes it through the event queue and the state machine, whose action for
        Sta6 + Evt10 (DT-2) only hands the P-DATA to DIMSE and stays in Sta6. That is what this
        does, with PDV values as views of the received buffer, when nothing else is queued and
        no handler watches received data, PDUs or transitions. Everything else (other PDUs,
        other states, malformed P-DATA) takes pynetdicom's path from the bytes read.
        """
        sock = cast(AssociationSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            LOGGER.error("Connection closed before the entire PDU was received")
            LOGGER.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            LOGGER.error(
                f"The received PDU is shorter than expected ({len(body) + 6} of "
                f"{6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return
        if pdu_type == 0x04 and self._fast_p_data(body):
            return
        try:
            pdu, event = self._decode_pdu(header + body)
            self.event_queue.put(event)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _fast_p_data(self, body: bytearray) -> bool:
        """Hand a P-DATA-TF body to DIMSE as DT-2 would; False when it must go the long way."""
        assoc = self.assoc
        if (
            self.state_machine.current_state != "Sta6"
            or not self.event_queue.empty()
            or assoc.get_handlers(evt.EVT_DATA_RECV)
            or assoc.get_handlers(evt.EVT_PDU_RECV)
            or assoc.get_handlers(evt.EVT_FSM_TRANSITION)
        ):
            return False
        view = memoryview(body)
        items: list[tuple[int, Any]] = []
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                return False
            (item_length,) = struct.unpack_from(">L", body, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                return False
            items.append((body[offset + 4], view[offset + 5 : offset + 4 + item_length]))
            offset += 4 + item_length
        if not items:
            return False
        dimse = assoc.dimse
        if isinstance(dimse, NodeDIMSE):
            dimse.receive_pdvs(items)
        else:
            primitive = P_DATA()
            primitive.presentation_data_value_list = [[cx, bytes(data)] for cx, data in items]
            dimse.receive_primitive(primitive)
        return True

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
