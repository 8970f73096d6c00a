"""pynetdicom 3.0 internals, tuned for the receive path: the ONLY module using private names.

Owns every use of pynetdicom's private API in the node: ``_config``, ``_handlers``, the DUL
reactor and its queues, the association reactor, ``DIMSEServiceProvider`` message assembly,
``RequestHandler._create_association``, ``C_STORE._context_id`` and ``AE._servers``. Each one is
pinned by ``tests/test_receive_contract.py``, which names the private thing that changed when
an upgrade breaks it; pyproject pins pynetdicom to ``>=3.0.4,<3.1`` for the same reason.

May import: pynetdicom (private names included), :mod:`dicom_node.receive.dimse`. Nothing else
from ``dicom_node``.

Why it exists
-------------
pynetdicom 3.0 runs two polling loops per association: the DUL reactor sleeps 1 ms whenever it
finds nothing to do, and the association reactor sleeps 1 ms before every look at its message
queue. On a loaded 2-core VM each such nap lasts 1-2 ms, and a C-STORE crosses both loops several
times, so polling, not work, dominated the time per instance. The classes here keep pynetdicom's
state machine, ACSE, DIMSE and event handlers, change how the loops wait, and take a short cut for
the per-instance traffic (C-STORE-RQ in, C-STORE-RSP out) wherever pynetdicom's long way would do
the same. Anything else, and everything while pynetdicom's debug logging or another handler
watches PDUs, DIMSE messages or state transitions, goes pynetdicom's way.

The shortest cut (issue 15): a C-STORE-RQ assembled on the DUL thread is served there
(``NodeDIMSE._serve_inline``): the node's handler runs, and the C-STORE-RSP is queued for the same
loop iteration, instead of the request crossing to the association thread and the response crossing
back. A sender waits for each response before it sends the next request (the node negotiates no
asynchronous operations), so the reader has nothing to read meanwhile. On a 2-core machine each
crossing is a thread wake-up that competes with the sender and the workers for a core.

Limits and deadlines (hostile peers, issue 10)
----------------------------------------------
pynetdicom reads a PDU with a blocking ``recv`` of the length the peer declares: a peer that
declares 2 GiB and sends nothing holds the reader for ever (and an earlier version of this module
allocated the declared length up front: 4 such peers took the node from 163 MB to 1.9 GB), and
``Association.kill()`` then waits for a state the blocked reader never reaches, so the slot is
never freed. :class:`NodeDUL` checks the declared length first (:data:`MAX_ASSOCIATION_PDU`; for
P-DATA the Maximum Length we advertised, :data:`MAX_P_DATA_PDU` when ``max_pdu`` is 0), reads
the body as it arrives without ever blocking in ``recv`` (``MSG_DONTWAIT`` plus ``select``), and
drops a peer (A-ABORT, then Evt17, which the state machine turns into a closed socket and an
ended association) that declares too much or stops half-way: during negotiation the whole
A-ASSOCIATE-RQ must arrive within ``acse_timeout``, after it no PDU may stall longer than
``dimse_timeout``. :class:`NodeAssociation` drops a peer silent for ``dimse_timeout`` in the
middle of a DIMSE message and one idle for ``network_timeout``; P-DATA that is not a DIMSE
message aborts as a protocol error instead of escaping into the reactor. Each drop is reported
through ``on_drop`` (counted and logged by :mod:`dicom_node.receive.transport`).

What each override buys (measured, see below)
---------------------------------------------
Measured on this 2-core VM (DCMTK 3.6.7 ``storescu`` with ``TCP_NODELAY=1``, one association of
300 NM 256x256 16-bit instances; node ``StorageSCP`` with the spool's fsync off so that only the
receive path is timed; a fresh spool per run, outputs kept until the end; every variant in every
round, in shuffled order; medians of 15-30 rounds; wall time and CPU time of the receiving
process). Other test suites shared the machine, so differences under ~10% are noise. "vs" is the
variant's time over the tuned module's (above 1: the override pays).

::

    variant (one override reverted)                    wall vs tuned   CPU vs tuned
    stock pynetdicom 3.0.4 (+ TCP_NODELAY)             2.67x           2.46x
    standard log handlers left bound                   1.72x           1.95x
    no C-STORE-RSP encoder (NodeDIMSE.send_msg)        1.45x           1.57x
    no blocking association reactor                    1.28x           0.97x
    no NodeDUL (select wait, PDV views)                1.21x / 1.28x   1.04x / 1.08x
    no C-STORE-RQ assembly (NodeDIMSE.receive_pdvs)    1.01x / 1.10x   1.13x / 1.11x
    contexts deep-copied per association               1.00x / 1.11x   1.02x / 1.15x
    no reader-thread C-STORE (_serve_inline; node,
      fsync on, issue 15 second pass)                  1.49x           -
    dropped: recv_into PDU reads (1 MiB)               0.94x - 0.98x   0.89x - 1.01x
    dropped: RSP sent from the association thread     0.90x - 1.12x   0.97x - 1.12x

With 100 CT 512x512 slices (10 rounds) the picture is the same: without :class:`NodeDUL` 1.24x
wall, without the C-STORE-RQ assembly 1.06x wall / 1.11x CPU, ``recv_into`` 0.98x. Sharing the
presentation contexts saves a ``deepcopy`` of 170 contexts per *association* (50-95 ms here),
which this one-association workload hides and a PACS that opens one association per study or
per instance does not.

Dropped, because they did not measurably help: reading each PDU with ``recv_into`` in 1 MiB
pieces (pynetdicom's 4 KiB ``recv`` loop is as fast at 16 KiB PDUs) and sending the C-STORE-RSP
from the association thread instead of handing it to the DUL thread (which the select-based
:class:`NodeDUL` wakes at once). The latter also removes a second writer on the socket and the
lock it needed.

To repeat it: subclass the classes here with one override reverted at a time, pass the request
handler to :class:`~dicom_node.receive.transport.NodeAssociationServer`, serve with ``StorageSCP``
and time ``storescu`` into a fresh spool per run (nothing is a duplicate), as
``bench/bench_ingest.py`` does for the whole node.
The limits and deadlines (above) cost nothing measurable: ``bench/bench_ingest.py --rounds 3
--variants node-nofsync --keep-outputs`` (600 NM + 200 CT, one association), before and after,
interleaved twice on a machine shared with other test runs: best node time 1.22 / 0.89 s before,
1.00 / 1.29 s after (best ratio to DCMTK storescp 0.58 / 0.75 before, 0.89 / 0.83 after), all
within that machine's noise. A plain socket is still read with one ``recv`` per piece
(``MSG_DONTWAIT``); ``select`` runs only when the peer is slower than the reader.
Re-measure whenever pynetdicom moves (``tests/test_receive_contract.py`` says when).
"""

from __future__ import annotations

import functools
import logging
import queue
import select
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import _config, _handlers, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.receive.dimse import (
    encode_c_store_rsp,
    encode_store_response,
    parse_c_store_rq,
    split_pdvs,
)

if TYPE_CHECKING:
    from pynetdicom import AE

__all__ = [
    "IDLE_WAIT",
    "MAX_ASSOCIATION_PDU",
    "MAX_P_DATA_PDU",
    "DropReport",
    "NodeAssociation",
    "NodeDIMSE",
    "NodeDUL",
    "NodeRequestHandler",
    "dataset_crc32",
    "end_negotiation",
    "register_server",
    "set_unrestricted_storage",
]

LOGGER = logging.getLogger(__name__)

IDLE_WAIT = 0.02
"""Seconds the DUL and association loops wait for an event before re-checking timers and flags.

Only latency to *timers* (ARTIM, idle timeout) and to a peer's A-RELEASE depends on it; data and
responses wake the loops at once."""

MAX_ASSOCIATION_PDU = 256 * 1024
"""Largest body (after the 6-byte header) accepted for any PDU other than P-DATA-TF.

An A-ASSOCIATE-RQ of 128 presentation contexts with a dozen transfer syntaxes each, plus a
User Identity item (at most 64 KiB by its 2-byte length), stays below this; A-RELEASE,
A-ABORT and A-ASSOCIATE-RJ bodies are 4 bytes. A peer that declares more is aborted before
anything is read or allocated."""

MAX_P_DATA_PDU = 64 * 2**20
"""Largest P-DATA-TF body when ``max_pdu`` is 0 ("unlimited"): advertised as our Maximum Length
Received instead of 0, so that a conforming peer never exceeds it. Otherwise the limit is the
``max_pdu`` we advertised."""

RECV_CHUNK = 256 * 1024
"""Largest single ``recv`` while reading a PDU: memory grows with the bytes that arrive, never
with the length a peer declares."""

STALL_SLICE = 0.5
"""Longest single wait inside a PDU read, so that a killed reactor notices within this."""

DropReport = Callable[[str, str], None]
"""``(outcome, detail)``: told when a peer is dropped; ``outcome`` is a metrics label
(``pdu_too_large``, ``timed_out``), ``detail`` a log line with the peer's address and no patient
data."""

_ABORT_INVALID_PARAMETER = 0x06
"""A-ABORT reason (source: service provider): invalid PDU parameter value (PS3.8 9.3.8)."""
_ABORT_NOT_SPECIFIED = 0x00
_LOCAL_EVENTS = frozenset({"Evt1", "Evt2", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
"""State machine events caused by the local user's primitives (taken from the provider queue)."""
_NEGOTIATION_STATES = frozenset({"Sta2", "Sta3"})
"""States in which the A-ASSOCIATE-RQ is awaited or being answered: reads are bounded by the
ACSE deadline from the connection's start, not by the DIMSE gap."""


class _Dropped(Exception):
    """A PDU read ended: the peer closed (``outcome`` None), stalled or overstepped a limit."""

    def __init__(self, outcome: str | None, detail: str = "", reason: int = 0) -> None:
        super().__init__(detail)
        self.outcome, self.detail, self.reason = outcome, detail, reason


STANDARD_LOG_HANDLERS: tuple[tuple[evt.NotificationEvent, Callable[[evt.Event], Any]], ...] = (
    (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
)
"""pynetdicom's debug-logging handlers, bound to every association by default. While bound they
watch PDUs and DIMSE messages, which turns every fast path here off; they are unbound unless the
``pynetdicom`` logger is at DEBUG."""


# -- small helpers for the modules above --------------------------------------------------------


def register_server(ae: AE, server: ThreadedAssociationServer) -> None:
    """Put ``server`` in ``ae._servers``, where ``server.shutdown()`` removes itself from.

    ``AE.make_server`` (public) does not register the server; ``AE.start_server`` does, but it
    cannot take a server class.
    """
    ae._servers.append(server)


def set_unrestricted_storage(enabled: bool) -> bool:
    """Accept any private or unknown abstract syntax as storage (``UNRESTRICTED_STORAGE_SERVICE``).

    pynetdicom's acceptor then negotiates such contexts with ``negotiate_unrestricted`` (first
    proposed transfer syntax, role selection answered) and serves their C-STOREs with the
    storage service. A process-wide flag: it covers every acceptor of this process (the node
    runs one ``StorageSCP``, which restores the previous value when it stops); contexts of other
    services still need registering. Returns the previous value.
    """
    previous = bool(_config.UNRESTRICTED_STORAGE_SERVICE)
    _config.UNRESTRICTED_STORAGE_SERVICE = bool(enabled)
    return previous


def end_negotiation(assoc: Association) -> None:
    """End an acceptor still waiting for A-ASSOCIATE-RQ, as its ACSE timeout would.

    pynetdicom's acceptor blocks on the DUL's queue for up to ``acse_timeout``; ``abort()`` does
    not wake it. A ``None`` on that queue is exactly what the timeout delivers.
    """
    # pynetdicom types the queue as primitives only, yet its own ACSE timeout yields None here
    assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


# -- DIMSE -----------------------------------------------------------------------------------

_STATUS_HANDLER_FAILED = 0xC211
"""What pynetdicom answers when the C-STORE handler raises (processing failure)."""

_CRC_ATTRIBUTE = "_dicom_node_crc32"
"""Attribute of a fast-path C-STORE request: CRC-32 of its data set, computed as it arrived."""


def dataset_crc32(request: Any) -> int | None:
    """CRC-32 of a C-STORE request's data set bytes (``event.encoded_dataset(False)``) when the
    fast path assembled it, else None.

    Computed fragment by fragment on the DUL thread while the rest of the data set is still on
    the wire (zlib releases the GIL), so that the spool's checksum costs the C-STORE path
    nothing (:mod:`dicom_node.receive.spool`, one flush per instance).
    """
    crc = getattr(request, _CRC_ATTRIBUTE, None)
    return crc if isinstance(crc, int) else None


@functools.lru_cache(maxsize=512)  # bounded: a peer may send any number of distinct UIDs
def _is_storage(sop_class: str) -> bool:
    """Whether pynetdicom serves a C-STORE of ``sop_class`` with its storage service."""
    return uid_to_service_class(sop_class) is StorageServiceClass


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


def _pdv_list(pdvs: Sequence[tuple[int, bytes | memoryview]]) -> list[tuple[int, bytes]]:
    """PDVs as ``P_DATA.presentation_data_value_list`` accepts them: a list of *lists*.

    pynetdicom annotates the items as tuples, but its setter raises TypeError unless each one is
    a ``[context_id, bytes]`` list.
    """
    return [[cx, bytes(data)] for cx, data in pdvs]  # type: ignore[misc]


class NodeDIMSE(DIMSEServiceProvider):
    """DIMSE provider with a fast path for the per-instance traffic: C-STORE-RQ in, RSP out.

    Incoming: a C-STORE-RQ is assembled here (:meth:`receive_pdvs`): the command set is read with
    :func:`~dicom_node.receive.dimse.parse_c_store_rq` and the data set fragments, views of the
    receive buffer, are joined once. Outgoing: a plain C-STORE-RSP is encoded with
    :func:`~dicom_node.receive.dimse.encode_c_store_rsp` (:meth:`send_msg`). Everything else, and
    everything while a handler listens to ``EVT_DIMSE_RECV`` / ``EVT_DIMSE_SENT`` or
    ``STORE_RECV_CHUNKED_DATASET`` is set, goes through pynetdicom's own path.
    """

    _fast_command: list[bytes] | None = None
    """Command fragments received so far (fast path), None between messages."""
    _fast_request: C_STORE | None = None
    """The C-STORE-RQ whose data set is being received (fast path)."""
    _fast_data: list[memoryview] | None = None
    """Data set fragments (without their Message Control Header) of ``_fast_request``."""
    _fast_raw_command: bytes = b""
    """The encoded command set of ``_fast_request`` (to hand back to pynetdicom if need be)."""
    _fast_crc: int = 0
    """CRC-32 of the data set fragments of ``_fast_request`` so far."""
    inline_store: bool = False
    """Serve a fast-path C-STORE-RQ on the DUL thread that assembled it (:meth:`_serve_inline`)
    instead of handing it to the association thread. Set only when the bound ``EVT_C_STORE``
    handler returns an ``int`` status, never raises and never aborts the association (the node's
    own handler, :func:`dicom_node.receive.handler.handle_store`)."""

    @property
    def receiving(self) -> bool:
        """True while a DIMSE message has been started by the peer but not completed."""
        return (
            self._fast_command is not None
            or self._fast_request is not None
            or self.message is not None
        )

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Process a P-DATA primitive: C-STORE-RQ fragments here, the rest by pynetdicom."""
        if primitive.__class__ is not P_DATA:
            try:
                self._fast_abandon()
                super().receive_primitive(primitive)
            except Exception as exc:
                self._malformed(exc)
            return
        self.receive_pdvs(primitive.presentation_data_value_list)

    def receive_pdvs(self, pdvs: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Process the PDVs of one P-DATA (values: ``bytes`` or views of the receive buffer).

        PDVs that pynetdicom's message assembly cannot take (data before any command, a command
        set it cannot decode) abort the association as a protocol error, counted and logged
        as ``malformed``, instead of escaping into the DUL reactor.
        """
        try:
            self._receive_pdvs(pdvs)
        except Exception as exc:
            self._malformed(exc)

    def _malformed(self, exc: Exception) -> None:
        self._fast_command = self._fast_request = self._fast_data = None
        self._fast_raw_command = b""
        self.message = None
        dul = self.dul
        if not isinstance(dul, NodeDUL):
            raise exc
        detail = (
            f"peer {dul._peer()} sent P-DATA that is not a valid DIMSE message "
            f"({type(exc).__name__}); aborted"
        )
        dul._drop("malformed", detail, _ABORT_NOT_SPECIFIED)

    def _receive_pdvs(self, pdvs: Sequence[tuple[int, bytes | memoryview]]) -> None:
        if _config.STORE_RECV_CHUNKED_DATASET or self.assoc.get_handlers(evt.EVT_DIMSE_RECV):
            self._fast_abandon()
            primitive = P_DATA()
            primitive.presentation_data_value_list = _pdv_list(pdvs)
            super().receive_primitive(primitive)
            return
        for context_id, data in pdvs:
            if self.message is not None:  # pynetdicom is assembling this message
                self._to_pynetdicom(context_id, data)
            else:
                self._fast_pdv(context_id, data)

    def _to_pynetdicom(self, context_id: int, data: bytes | memoryview) -> None:
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

    def _fast_pdv(self, context_id: int, data: bytes | memoryview) -> None:
        header = data[0]
        request = self._fast_request
        if request is None:
            if not header & 1:  # data before the command ended: pynetdicom's business
                self._fast_abandon()
                self._to_pynetdicom(context_id, data)
                return
            if self._fast_command is None:
                self._fast_command = []
            self._fast_command.append(bytes(data[1:]))
            if not header & 2:  # more command fragments to come
                return
            command, self._fast_command = b"".join(self._fast_command), None
            fields = parse_c_store_rq(command)
            request = _c_store_request(fields, context_id) if fields is not None else None
            if request is None:
                self._to_pynetdicom(context_id, b"\x03" + command)
                return
            self._fast_request, self._fast_data, self._fast_raw_command = request, [], command
            self._fast_crc = 0
            return
        if header & 1:  # a new command before the data set ended: as pynetdicom would see it
            self._fast_abandon()
            self._to_pynetdicom(context_id, data)
            return
        chunks = cast(list[memoryview], self._fast_data)
        fragment = memoryview(data)[1:]
        chunks.append(fragment)
        self._fast_crc = zlib.crc32(fragment, self._fast_crc)
        if header & 2:
            request.DataSet = BytesIO(b"".join(chunks))
            setattr(request, _CRC_ATTRIBUTE, self._fast_crc)
            self._fast_request = self._fast_data = None
            self._fast_raw_command = b""
            context_id = cast(int, request._context_id)
            if not (self.inline_store and self._serve_inline(request, context_id)):
                self.msg_queue.put((context_id, request))

    def _serve_inline(self, request: C_STORE, context_id: int) -> bool:
        """Run the C-STORE handler here and queue its C-STORE-RSP; False: pynetdicom's way.

        What pynetdicom's association thread would do for this message (``_serve_request``,
        ``StorageServiceClass.SCP``), minus two thread hand-offs (DIMSE queue in, wake-up pair
        out) and the response primitive: the peer is waiting for this response before it sends
        anything else (no asynchronous operations are negotiated), so the reader has nothing to
        read while the handler runs, and the response leaves in the same loop iteration.
        """
        assoc = self.assoc
        if not assoc.is_established or assoc._sent_release:
            return False
        sop_class = str(request.AffectedSOPClassUID)
        if sop_class in assoc.acceptor.accepted_common_extended or not (
            _config.UNRESTRICTED_STORAGE_SERVICE or _is_storage(sop_class)
        ):
            return False  # pynetdicom picks another service class for it: its way
        context = assoc._accepted_cx.get(context_id)
        # an intervention event's handlers: one (callable, args) pair, (None, None) when unbound
        bound = cast(
            "tuple[Callable[..., Any] | None, list[Any] | None]",
            assoc.get_handlers(evt.EVT_C_STORE),
        )
        handler, args = bound
        if context is None or handler is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            return False
        event = evt.Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        try:
            status = handler(event, *args) if args else handler(event)
            if not isinstance(status, int):  # a handler this path was not meant for
                raise TypeError(f"C-STORE handler returned {type(status).__name__}, not an int")
        except Exception:  # as pynetdicom answers a handler's exception
            LOGGER.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            status = _STATUS_HANDLER_FAILED
        command = encode_store_response(
            sop_class,
            str(request.AffectedSOPInstanceUID),
            int(request.MessageID or 0),
            status,
        )
        if not self._send_command(command, context_id):  # a peer with a tiny PDU
            rsp = C_STORE()
            rsp.MessageID = request.MessageID
            rsp.MessageIDBeingRespondedTo = request.MessageID
            rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
            rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
            rsp.Status = status
            DIMSEServiceProvider.send_msg(self, rsp, context_id)  # pynetdicom splits it
        return True

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; C-STORE-RSP in one P-DATA without building a pydicom Dataset."""
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_c_store_rsp(primitive)
            if command is not None and self._send_command(command, context_id):
                return
        super().send_msg(primitive, context_id)

    def _send_command(self, command: bytes, context_id: int) -> bool:
        """Send an encoded command set (no data set follows) as one P-DATA; False, with nothing
        sent, when it does not fit the peer's Maximum Length (pynetdicom's encoder splits it)."""
        max_pdu = self.maximum_pdu_size
        if max_pdu and len(command) + 7 > max_pdu:
            return False
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)
        return True


# -- DUL ---------------------------------------------------------------------------------------


class NodeDUL(DULServiceProvider):
    """DUL reactor that sleeps in ``select`` on the socket and a wake-up pair, not in ``sleep``.

    :meth:`send_pdu` pokes the wake-up pair, so the loop reacts to incoming bytes and outgoing
    primitives at once. A P-DATA-TF received in Sta6 goes straight to DIMSE with its PDVs as views
    of the receive buffer (:meth:`_read_pdu_data`), which is all that the state machine's DT-2
    does.
    """

    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _kill_flag: bool = False
    _negotiation_deadline: float = float("inf")
    """Monotonic time by which the A-ASSOCIATE-RQ must have arrived (``acse_timeout``)."""
    _last_rx: float = 0.0
    """Monotonic time the last complete PDU arrived."""
    _artim_reported: bool = False

    def _ensure_wake(self) -> None:
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)

    def _wake(self) -> None:
        self._ensure_wake()
        try:
            cast(socket.socket, self._wake_w).send(b"\x00")
        except OSError:
            pass  # already poked (buffer full) or closing: the loop wakes anyway

    # pynetdicom declares a plain attribute; a property makes ``kill()`` wake the loop
    @property
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
            except OSError:
                pass

    def _report(self, outcome: str, detail: str) -> None:
        report = cast("DropReport | None", getattr(self.assoc, "on_drop", None))
        if report is not None:
            report(outcome, detail)
        else:
            LOGGER.warning("%s", detail)

    def _peer(self) -> str:
        address = self.assoc.requestor.address_info
        return str(address.address) if address is not None else "?"

    def _pdu_limit(self, pdu_type: int) -> int:
        """The largest body a PDU of ``pdu_type`` may declare (see the module constants)."""
        if pdu_type != 0x04:
            return MAX_ASSOCIATION_PDU
        return self.assoc.acceptor.maximum_length or MAX_P_DATA_PDU

    def _read_deadlines(self) -> tuple[float, float | None]:
        """(absolute deadline, longest silence) for the PDU about to be read."""
        if self.state_machine.current_state in _NEGOTIATION_STATES:
            return self._negotiation_deadline, None
        gap = self.assoc.dimse_timeout
        return float("inf"), float(gap) if gap else None

    def _recv_exact(self, raw: socket.socket, size: int, plain: bool) -> bytes | bytearray:
        """Read exactly ``size`` bytes as they arrive, within the read deadlines.

        Never blocks in ``recv``: a plain socket is read with ``MSG_DONTWAIT`` (a TLS socket is
        non-blocking while :meth:`_read_pdu_data` runs) and waits in ``select`` for at most
        :data:`STALL_SLICE`, checking the deadlines and the kill flag in between.

        Raises
        ------
        _Dropped
            The peer closed the connection or stayed silent past a deadline.
        """
        buffer: bytearray | None = None
        got = 0
        blocked_since: float | None = None
        while got < size:
            try:
                if plain:
                    chunk = raw.recv(min(size - got, RECV_CHUNK), socket.MSG_DONTWAIT)
                else:
                    chunk = raw.recv(min(size - got, RECV_CHUNK))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                now = time.monotonic()
                if blocked_since is None:
                    blocked_since = now
                absolute, gap = self._read_deadlines()
                deadline = min(absolute, blocked_since + gap) if gap else absolute
                if now >= deadline:
                    raise _Dropped(
                        "timed_out",
                        f"peer {self._peer()} stopped sending in the middle of a PDU "
                        f"({got} of {size} bytes after {now - blocked_since:.1f} s); dropped",
                    ) from None
                if self._kill_flag:
                    raise _Dropped(None) from None
                try:
                    select.select([raw], [], [], min(deadline - now, STALL_SLICE))
                except (OSError, ValueError):
                    raise _Dropped(None) from None
                continue
            except (OSError, ValueError):  # reset, closed under us
                raise _Dropped(None) from None
            if not chunk:
                raise _Dropped(None)
            blocked_since = None
            if buffer is None:
                if len(chunk) == size:
                    return chunk
                buffer = bytearray(chunk)
            else:
                buffer.extend(chunk)
            got += len(chunk)
        return cast(bytearray, buffer)

    def _drop(self, outcome: str | None, detail: str, reason: int) -> None:
        """End the connection: count and log, A-ABORT (unless closing already), then Evt17.

        The state machine's answer to Evt17 (AA-4/AA-5/AR-5) shuts the socket down and tells
        the association; an acceptor still waiting for its A-ASSOCIATE-RQ is woken as its ACSE
        timeout would (a ``None`` on its queue), so that its slot is free at once.
        """
        state = self.state_machine.current_state
        if outcome is not None:
            self._report(outcome, detail)
        sock = self.socket
        raw = sock.socket if sock is not None else None
        if outcome is not None and raw is not None and state not in ("Sta1", "Sta13"):
            abort_pdu = A_ABORT_RQ()
            abort_pdu.source = 0x02
            abort_pdu.reason_diagnostic = reason
            try:
                raw.settimeout(0.0)
                raw.send(abort_pdu.encode())
            except (OSError, ValueError):
                pass  # the peer does not read: closing is all that is left
        if state == "Sta1":
            return
        self.event_queue.put("Evt17")
        if state == "Sta2":
            end_negotiation(self.assoc)

    def _discard_local(self, event: str) -> None:
        """Drop an event the state machine cannot take in its state (a race), not the loop.

        A peer that sends an A-ASSOCIATE-RQ and then garbage is aborted (Sta13) while the
        association thread is still answering it; pynetdicom's loop dies of InvalidEventError on
        that A-ASSOCIATE-AC (Evt7). The primitive is taken off the queue, so that the loop goes
        on closing the connection. PS3.8 defines every peer event in every state but Sta1, where
        a late "connection closed" (Evt17) has nothing left to act on either.
        """
        if event in _LOCAL_EVENTS:
            try:
                self.to_provider_queue.get(block=False)
            except queue.Empty:
                pass
        LOGGER.debug("discarded %s in %s", event, self.state_machine.current_state)

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data, except in Sta1 (no connection to read yet)."""
        if self.state_machine.current_state == "Sta1":
            return False
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """Read one PDU within its length limit and deadlines; a P-DATA-TF in Sta6 goes to DIMSE.

        The declared length is checked against :meth:`_pdu_limit` before anything is read or
        allocated, and the body is read as it arrives (:meth:`_recv_exact`): a peer that declares
        too much, or stops sending in the middle of a PDU for longer than the ACSE deadline
        (during negotiation) or ``dimse_timeout`` (after), is aborted and its connection closed.

        pynetdicom copies each PDU three times (``bytearray`` +=, ``bytes()``, one slice per
        PDV) and passes it through the event queue and the state machine, whose action for
        Sta6 + Evt10 (DT-2) only hands the P-DATA to DIMSE and stays in Sta6. That is what this
        does, with PDV values as views of the received buffer, when nothing else is queued and
        no handler watches received data, PDUs or transitions. Everything else (other PDUs,
        other states, malformed P-DATA) takes pynetdicom's path from the bytes read.
        """
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket
        if raw is None:
            self.event_queue.put("Evt17")
            return
        plain = not isinstance(raw, ssl.SSLSocket)
        if not plain:
            raw.settimeout(0.0)
        try:
            header = self._recv_exact(raw, 6, plain)
            pdu_type, pdu_length = header[0], int.from_bytes(header[2:6], "big")
            if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
                self.event_queue.put("Evt19")
                return
            limit = self._pdu_limit(pdu_type)
            if pdu_length > limit:
                raise _Dropped(
                    "pdu_too_large",
                    f"peer {self._peer()} declared a PDU of type 0x{pdu_type:02X} of "
                    f"{pdu_length} bytes, over the limit of {limit}; aborted",
                    _ABORT_INVALID_PARAMETER,
                )
            body = self._recv_exact(raw, pdu_length, plain) if pdu_length else b""
        except _Dropped as drop:
            self._drop(drop.outcome, drop.detail, drop.reason)
            return
        finally:
            if not plain and raw.fileno() >= 0:
                raw.settimeout(None)
        self._last_rx = time.monotonic()
        if pdu_type == 0x04 and self._fast_p_data(body):
            return
        try:
            pdu, event = self._decode_pdu(bytearray(header) + body)
            self.event_queue.put(event)
        except Exception as exc:
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def silent_for(self) -> float:
        """Seconds since the last complete PDU arrived (or the reactor started)."""
        return time.monotonic() - self._last_rx

    def _fast_p_data(self, body: bytes | bytearray) -> bool:
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
        items = split_pdvs(body)
        if items is None:
            return False
        dimse = assoc.dimse
        if isinstance(dimse, NodeDIMSE):
            dimse.receive_pdvs(items)
        else:
            primitive = P_DATA()
            primitive.presentation_data_value_list = _pdv_list(items)
            dimse.receive_primitive(primitive)
        return True

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop (``DULServiceProvider.run_reactor``) with an event-driven wait.

        Also starts the ACSE deadline and reports a peer that sent nothing before the ARTIM
        timer (``acse_timeout``) expired."""
        self._idle_timer.start()
        self._last_rx = time.monotonic()
        acse_timeout = self.assoc.acse_timeout
        if acse_timeout:
            self._negotiation_deadline = self._last_rx + float(acse_timeout)
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
                    if self.state_machine.current_state == "Sta2" and not self._artim_reported:
                        self._artim_reported = True
                        self._report(
                            "timed_out",
                            f"peer {self._peer()} sent no A-ASSOCIATE-RQ within "
                            f"acse_timeout ({self.assoc.acse_timeout} s); closed",
                        )
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
                try:
                    self.state_machine.do_action(event)
                except InvalidEventError:
                    self._discard_local(event)
                sleep = False
        finally:
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()


# -- association -------------------------------------------------------------------------------


class NodeAssociation(Association):
    """Acceptor Association whose reactor waits on the DIMSE queue instead of sleeping 1 ms.

    Its reactor also drops a peer that started a DIMSE message and then stayed silent for
    ``dimse_timeout`` (pynetdicom's idle timer, ``network_timeout``, covers silence between
    messages), and reports both through :attr:`on_drop`.
    """

    on_drop: DropReport | None = None
    """Told when the peer is dropped for a limit or a deadline (set by the request handler)."""

    def __init__(self, ae: AE, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = NodeDUL(self)
        self.dimse = NodeDIMSE(self)
        # the setters put these on the DUL's ARTIM and idle timers: the new DUL needs them too
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def _peer(self) -> str:
        address = self.requestor.address_info
        return str(address.address) if address is not None else "?"

    def _drop_silent(self, outcome: str, detail: str) -> None:
        if self.on_drop is not None:
            self.on_drop(outcome, detail)
        else:
            LOGGER.warning("%s", detail)
        self.abort()
        self.kill()

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
            dimse_timeout = self.dimse_timeout
            if (
                dimse_timeout
                and cast(NodeDIMSE, self.dimse).receiving
                and cast(NodeDUL, self.dul).silent_for() > dimse_timeout
            ):
                self._drop_silent(
                    "timed_out",
                    f"peer {self._peer()} started a DIMSE message and sent nothing for "
                    f"dimse_timeout ({dimse_timeout} s); aborted",
                )
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response != "A-RELEASE":
                    self._drop_silent(
                        "timed_out",
                        f"peer {self._peer()} was idle for network_timeout "
                        f"({self.network_timeout} s); aborted",
                    )
                    return
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
    """Creates :class:`NodeAssociation` acceptors (pynetdicom's own socket wrapper).

    A server with an ``on_drop`` attribute (a :data:`DropReport`) is told of every peer its
    associations drop. ``max_pdu`` 0 is advertised as :data:`MAX_P_DATA_PDU`, the limit the
    reader enforces.
    """

    def _create_association(self) -> Association:
        """As ``RequestHandler._create_association``, with the node's classes."""
        server = cast(ThreadedAssociationServer, self.server)
        assoc = NodeAssociation(self.ae, "acceptor")
        assoc.on_drop = getattr(server, "on_drop", None)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size or MAX_P_DATA_PDU
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        # The contexts are never modified by negotiation: share them instead of a deep copy
        assoc.acceptor.supported_contexts = server.contexts
        cast(NodeDIMSE, assoc.dimse).inline_store = bool(getattr(server, "inline_store", False))
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list, handlers):
                    assoc.bind(event, handler[0], handler[1])
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            for event, handler in STANDARD_LOG_HANDLERS:
                assoc.unbind(event, handler)
        return assoc
