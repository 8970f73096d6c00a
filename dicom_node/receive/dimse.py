"""The DIMSE fast path's codec: C-STORE-RQ command sets in, C-STORE-RSP out, PDVs split.

Owns the byte-level encoding the receive fast path uses instead of pydicom for the per-instance
traffic: reading a C-STORE-RQ command set (:func:`parse_c_store_rq`), encoding a plain C-STORE-RSP
(:func:`encode_c_store_rsp`) and splitting a P-DATA-TF body into its PDVs as views of the receive
buffer (:func:`split_pdvs`). Everything here is pure: bytes in, values out; anything it does not
cover returns ``None`` so that the caller hands the message to pynetdicom unchanged.

Wiring these into pynetdicom's DUL and DIMSE providers is
:mod:`dicom_node.receive._pynetdicom_tuned`'s business.

May import: the standard library and pynetdicom's public ``dimse_primitives`` (the
:class:`~pynetdicom.dimse_primitives.C_STORE` primitive). Nothing from ``dicom_node``.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom.dimse_primitives import C_STORE

__all__ = [
    "C_STORE_RQ",
    "C_STORE_RSP",
    "NO_DATA_SET",
    "encode_c_store_rsp",
    "encode_store_response",
    "parse_c_store_rq",
    "split_pdvs",
]

C_STORE_RQ = 0x0001
"""Command Field of a C-STORE-RQ (PS3.7 E.1)."""
C_STORE_RSP = 0x8001
"""Command Field of a C-STORE-RSP."""
NO_DATA_SET = 0x0101
"""Command Data Set Type meaning "no data set follows"."""


_CMD_US = {
    0x0100: "CommandField",
    0x0110: "MessageID",
    0x0700: "Priority",
    0x0800: "CommandDataSetType",
    0x1031: "MoveOriginatorMessageID",
}
_CMD_UI = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_store_rsp(rsp: C_STORE) -> bytes | None:
    """Encode a plain C-STORE-RSP command set (Implicit VR Little Endian) without pydicom.

    Parameters
    ----------
    rsp:
        The response primitive pynetdicom's storage service built from the handler's status.

    Returns
    -------
    bytes or None
        The command set, byte for byte what pynetdicom's encoder produces; ``None`` for responses
        this fast path does not cover (an error comment, an offending element, a missing UID),
        which then go through pynetdicom's encoder.
    """
    if rsp.ErrorComment is not None or rsp.OffendingElement is not None:
        return None
    if rsp.AffectedSOPClassUID is None or rsp.AffectedSOPInstanceUID is None:
        return None
    return encode_store_response(
        str(rsp.AffectedSOPClassUID),
        str(rsp.AffectedSOPInstanceUID),
        int(rsp.MessageIDBeingRespondedTo or 0),
        int(rsp.Status or 0),
    )


def encode_store_response(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    """The command set of a plain C-STORE-RSP (no comment, no offending element) from its values:
    byte for byte what pynetdicom encodes for the same response."""
    body = b"".join(
        (
            _implicit(0x00000002, _uid_value(sop_class)),
            _implicit(0x00000100, struct.pack("<H", C_STORE_RSP)),
            _implicit(0x00000120, struct.pack("<H", message_id & 0xFFFF)),
            _implicit(0x00000800, struct.pack("<H", NO_DATA_SET)),
            _implicit(0x00000900, struct.pack("<H", status & 0xFFFF)),
            _implicit(0x00001000, _uid_value(sop_instance)),
        )
    )
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def parse_c_store_rq(command: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """Read a C-STORE-RQ command set (Implicit VR Little Endian) without pydicom.

    Parameters
    ----------
    command:
        The whole command set (all its fragments joined).

    Returns
    -------
    dict or None
        The primitive's parameters by keyword (plus ``CommandField`` and ``CommandDataSetType``),
        or ``None`` for anything this fast path does not cover: another command, a request
        without a data set, an element it does not know, a malformed length, a UID or AE title
        that is not ASCII. Never raises (fuzzed in ``tests/test_receive_fuzz.py``). pynetdicom then
        decodes the command itself, so odd requests behave exactly as they do there.
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
        value = bytes(command[offset : offset + length])
        offset += length
        if element == 0x0000:  # CommandGroupLength
            if length != 4:
                return None
        elif element in _CMD_US:
            if length != 2:
                return None
            fields[_CMD_US[element]] = value[0] | (value[1] << 8)
        elif element in _CMD_UI or element == 0x1030:
            if not value.isascii():  # pynetdicom's decoder gives its own answer to that
                return None
            if element == 0x1030:
                fields["MoveOriginatorApplicationEntityTitle"] = value.decode("ascii").strip()
            else:
                fields[_CMD_UI[element]] = value.rstrip(b"\x00 ").decode("ascii")
        else:
            return None
    if fields.get("CommandField") != C_STORE_RQ:
        return None
    if fields.get("CommandDataSetType", NO_DATA_SET) == NO_DATA_SET:
        return None
    if not all(k in fields for k in ("MessageID", *_CMD_UI.values())):
        return None
    return fields


def split_pdvs(body: bytearray | bytes) -> list[tuple[int, memoryview]] | None:
    """Split a P-DATA-TF body (after the 6-byte PDU header) into ``(context_id, value)`` PDVs.

    Each value is a view of ``body`` starting at the Message Control Header, so no PDV is
    copied. ``None`` when the body is empty or malformed (an item shorter than its header, an
    item length past the end); pynetdicom's decoder then deals with it and answers as it does.
    """
    view = memoryview(body)
    items: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (item_length,) = struct.unpack_from(">L", body, offset)
        if item_length < 2 or offset + 4 + item_length > end:
            return None
        items.append((body[offset + 4], view[offset + 5 : offset + 4 + item_length]))
        offset += 4 + item_length
    return items or None
