"""Raw DICOM Upper Layer bytes for hostile-peer tests: PDUs built by hand, read off a socket.

pynetdicom's public PDU classes encode the A-ASSOCIATE-RQ, so tests can open an association on a
plain socket and then send whatever bytes they like, as an attacker or a broken stack would.
"""

from __future__ import annotations

import select
import socket
import struct
import time

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
RELEASE_RQ = bytes((0x05, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00))


def associate_rq(called_ae: str = "DICOMNODE", calling_ae: str = "RAWPEER") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification (id 1) and NM Image Storage (id 3)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    contexts = []
    for context_id, uid in ((1, VERIFICATION), (3, NM_STORAGE)):
        cx = build_context(uid, [EXPLICIT_LE])
        cx.context_id = context_id
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def pdu_header(pdu_type: int, length: int) -> bytes:
    """The 6-byte PDU header declaring ``length`` bytes of body."""
    return struct.pack(">BBL", pdu_type, 0, length)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One Presentation Data Value item (PS3.8 9.3.5.1)."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU holding ``pdvs``."""
    body = b"".join(pdvs)
    return pdu_header(0x04, len(body)) + body


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """Read one PDU as ``(type, body)``; None on EOF, reset or timeout."""
    header = read_exactly(sock, 6, timeout)
    if header is None:
        return None
    body = read_exactly(sock, int.from_bytes(header[2:6], "big"), timeout)
    return (header[0], body) if body is not None else None


def read_exactly(sock: socket.socket, size: int, timeout: float) -> bytes | None:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        try:
            chunk = sock.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data


def closed_by_peer(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the node closes ``sock``: (closed within ``timeout``, bytes received)."""
    received = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        try:
            chunk = sock.recv(65536)
        except OSError:  # reset: closed too
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def open_association(
    port: int, called_ae: str = "DICOMNODE", source: str = "127.0.0.1"
) -> socket.socket:
    """A socket with an established association (the A-ASSOCIATE-AC read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(associate_rq(called_ae))
    answer = read_pdu(sock)
    if answer is None or answer[0] != 0x02:
        sock.close()
        raise AssertionError(f"the node did not accept the association: {answer!r}")
    return sock


def command_status(command: bytes) -> int | None:
    """The Status (0000,0900) of an Implicit VR Little Endian command set, if present."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if group == 0 and element == 0x0900 and length == 2:
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return None


__all__ = [
    "EXPLICIT_LE",
    "NM_STORAGE",
    "RELEASE_RQ",
    "VERIFICATION",
    "associate_rq",
    "closed_by_peer",
    "command_status",
    "open_association",
    "p_data",
    "pdu_header",
    "pdv",
    "read_exactly",
    "read_pdu",
]
