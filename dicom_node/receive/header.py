"""Reading the few header values the receive path needs from an encoded data set, undecoded.

The C-STORE handler must validate and file every instance without decoding and re-encoding it.
:func:`parse_header` walks the top-level elements of the bytes as received (any uncompressed or
encapsulated transfer syntax, deflate, big endian), skips sequences without decoding them, and
reads StudyInstanceUID, SeriesInstanceUID, SOP UIDs, Modality, the patient identity (PatientID,
PatientName, PatientBirthDate, kept as the raw bytes), Rows, Columns, SamplesPerPixel,
BitsAllocated, NumberOfFrames and the Pixel Data length. Anything unusual goes to pydicom's reader.
:func:`encode_file_meta` builds the File Meta the spooled file starts with.

UIDs are kept whole, as sent (only the one trailing pad byte a UI value may carry is removed):
a second value, a newline or extra padding stays in the string for the validator to refuse,
never silently dropped. A deflated data set is inflated in pieces against a limit
(:class:`TooLarge` beyond it), and only its first :data:`INFLATE_KEEP` bytes are kept.

May import: pydicom, pynetdicom's public names. Nothing from ``dicom_node``.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

__all__ = [
    "INFLATE_CHUNK",
    "INFLATE_KEEP",
    "Header",
    "TooLarge",
    "encode_file_meta",
    "parse_header",
]

INFLATE_CHUNK = 16 * 2**20
"""Bytes inflated per step of a deflated data set (the most one step allocates)."""

INFLATE_KEEP = 64 * 2**20
"""Bytes of an inflated data set kept for reading its header; the rest is only counted (its
length is what the truncation check needs). Elements before the Pixel Data must fit here."""

# Tags of the header elements read on the hot path
_TAG_SOP_CLASS = 0x00080016
_TAG_SOP_INSTANCE = 0x00080018
_TAG_MODALITY = 0x00080060
_TAG_STUDY = 0x0020000D
_TAG_SERIES = 0x0020000E
_TAG_PATIENT_NAME = 0x00100010
_TAG_PATIENT_ID = 0x00100020
_TAG_BIRTH_DATE = 0x00100030
_TAG_SAMPLES = 0x00280002
_TAG_FRAMES = 0x00280008
_TAG_ROWS = 0x00280010
_TAG_COLUMNS = 0x00280011
_TAG_BITS_ALLOCATED = 0x00280100
_TAG_PIXEL_DATA = 0x7FE00010
_HEADER_TAGS: list[BaseTag | int] = [
    BaseTag(t)
    for t in (
        _TAG_SOP_CLASS,
        _TAG_SOP_INSTANCE,
        _TAG_MODALITY,
        _TAG_STUDY,
        _TAG_SERIES,
        _TAG_PATIENT_NAME,
        _TAG_PATIENT_ID,
        _TAG_BIRTH_DATE,
        _TAG_SAMPLES,
        _TAG_FRAMES,
        _TAG_ROWS,
        _TAG_COLUMNS,
        _TAG_BITS_ALLOCATED,
    )
]
_EXPLICIT_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


@dataclass
class Header:
    """The few header values the receive path needs."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    patient_id: bytes | None = field(default=None, repr=False)
    """PatientID as encoded (padding included); None when absent. Never logged."""
    patient_name: bytes | None = field(default=None, repr=False)
    """PatientName as encoded; None when absent. Never logged."""
    patient_birth_date: bytes | None = field(default=None, repr=False)
    """PatientBirthDate as encoded; None when absent. Never logged."""
    rows: int | None = None
    columns: int | None = None
    samples_per_pixel: int | None = None
    bits_allocated: int | None = None
    number_of_frames: int | None = None
    pixel_data_length: int | None = None
    """Declared length of (7FE0,0010); ``None`` when absent, -1 when encapsulated."""
    pixel_data_available: int | None = None
    """Bytes actually present after the Pixel Data element header."""


def _first(ds: Any, tag: int) -> Any:
    elem = ds.get(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, list | MultiValue):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else value


def _str_value(ds: Any, tag: int) -> str | None:
    value = _first(ds, tag)
    return None if value is None else str(value).strip("\x00 ") or None


def _int_value(ds: Any, tag: int) -> int | None:
    value = _first(ds, tag)
    return None if value is None else int(value)


@dataclass
class _Walk:
    last_tag: int = -1
    count: int = 0
    stopped: bool = False


class _NotSimple(Exception):
    """The fast walker met something it leaves to pydicom."""


class TooLarge(ValueError):
    """The data set inflates to more than the limit it was given (a decompression bomb)."""


_UID_TAGS = {
    _TAG_SOP_CLASS: "sop_class_uid",
    _TAG_SOP_INSTANCE: "sop_instance_uid",
    _TAG_STUDY: "study_uid",
    _TAG_SERIES: "series_uid",
}
_STRING_TAGS = {_TAG_MODALITY: "modality"}
_RAW_TAGS = {
    _TAG_PATIENT_ID: "patient_id",
    _TAG_PATIENT_NAME: "patient_name",
    _TAG_BIRTH_DATE: "patient_birth_date",
}


def _uid_text(raw: bytes) -> str | None:
    """A UI value as sent, minus the one pad byte (NUL or space) an even length may need.

    Decoded as Latin-1 so that any byte survives to be refused by the validator.
    """
    if raw[-1:] in (b"\x00", b" "):
        raw = raw[:-1]
    return raw.decode("latin-1") if raw else None


def _raw_value(ds: Any, tag: int) -> bytes | None:
    """The encoded bytes of an element read by pydicom (raw unless something converted it)."""
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    value = elem.value
    if isinstance(value, bytes):
        return value or None
    if value is None or value == "":
        return None
    if isinstance(value, list | MultiValue):
        return "\\".join(str(v) for v in value).encode("latin-1", "replace")
    original = getattr(value, "original_string", None)  # PersonName
    if isinstance(original, bytes):
        return original
    return str(value).encode("latin-1", "replace")


def _uid_value(ds: Any, tag: int) -> str | None:
    raw = _raw_value(ds, tag)
    return _uid_text(raw) if raw else None


_US_TAGS = {
    _TAG_ROWS: "rows",
    _TAG_COLUMNS: "columns",
    _TAG_SAMPLES: "samples_per_pixel",
    _TAG_BITS_ALLOCATED: "bits_allocated",
}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def parse_header(data: bytes, transfer_syntax: str, max_inflated: int | None = None) -> Header:
    """Read the handful of elements the receive path needs from an encoded data set.

    A small walker over the top-level elements does the work; anything it does not handle with
    certainty (odd VRs with undefined length, malformed values) goes to pydicom's reader.

    Parameters
    ----------
    data:
        The data set as received (no preamble or File Meta).
    transfer_syntax:
        The presentation context's transfer syntax UID.
    max_inflated:
        For a deflated transfer syntax: the most bytes the data set may inflate to (None: no
        limit). Inflating stops as soon as it is passed.

    Returns
    -------
    Header
        The values found; absent elements are None.

    Raises
    ------
    TooLarge
        A deflated data set inflates to more than ``max_inflated`` bytes.
    ValueError
        The bytes cannot be decoded as a data set in that transfer syntax (the message says why).
    """
    ts = UID(transfer_syntax)
    if ts.is_transfer_syntax:
        implicit, little, deflated = ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated
    else:  # a transfer syntax pydicom does not know: encapsulated explicit VR little endian
        implicit, little, deflated = False, True, False
    beyond = 0  # inflated bytes counted but not kept
    if deflated:
        data, total = _inflate(data, max_inflated)
        beyond = total - len(data)
    if not data:
        raise ValueError("the data set is empty")
    try:
        header = _parse_header_fast(data, implicit, little)
    except (_NotSimple, struct.error, UnicodeDecodeError, ValueError):
        header = _parse_header_pydicom(data, implicit, little)
    if beyond and header.pixel_data_available is None:
        raise ValueError(
            f"the deflated data set has more than {INFLATE_KEEP} bytes before its Pixel Data"
        )
    if beyond and header.pixel_data_available is not None:
        header.pixel_data_available += beyond
    return header


def _inflate(data: bytes, limit: int | None) -> tuple[bytes, int]:
    """Inflate a deflated data set in :data:`INFLATE_CHUNK` steps; return (kept, total).

    Keeps the first :data:`INFLATE_KEEP` bytes, counts the rest, and stops with
    :class:`TooLarge` as soon as the total passes ``limit``.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    pending = data
    try:
        while True:
            out = inflater.decompress(pending, INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if not pending:
                out += inflater.flush()
            total += len(out)
            if len(kept) < INFLATE_KEEP:
                kept += out[: INFLATE_KEEP - len(kept)]
            if limit is not None and total > limit:
                raise TooLarge(f"the deflated data set inflates to more than {limit} bytes")
            if not pending:
                return bytes(kept), total
    except zlib.error as exc:
        raise ValueError(f"deflated data set does not inflate: {exc}") from exc


def _element_header(
    data: bytes, pos: int, implicit: bool, endian: str
) -> tuple[int, bytes | None, int, int]:
    """Return (tag, VR or None, length, value offset) of the element at ``pos``."""
    group, element = struct.unpack_from(endian + "HH", data, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from(endian + "L", data, pos + 4)
        return tag, None, length, pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _EXPLICIT_LONG_VRS:
        (length,) = struct.unpack_from(endian + "L", data, pos + 8)
        return tag, vr, length, pos + 12
    if not (b"AA" <= vr <= b"ZZ"):
        raise _NotSimple(f"unexpected VR bytes {vr!r}")
    (length,) = struct.unpack_from(endian + "H", data, pos + 6)
    return tag, vr, length, pos + 8


def _skip_undefined(data: bytes, pos: int, implicit: bool, endian: str, depth: int = 0) -> int:
    """Return the offset after a sequence of undefined length whose items start at ``pos``."""
    if depth > 32:
        raise _NotSimple("sequences nested too deep")
    end = len(data)
    while pos + 8 <= end:
        tag, _, length, pos = _element_header(data, pos, True, endian)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _NotSimple(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
        if length != 0xFFFFFFFF:
            pos += length
            continue
        while True:  # item of undefined length: its elements up to the item delimiter
            if pos + 8 > end:
                raise ValueError("a sequence item runs past the end")
            tag, vr, length, value = _element_header(data, pos, implicit, endian)
            if tag == _ITEM_END:
                pos = value
                break
            if length == 0xFFFFFFFF:
                if vr not in (None, b"SQ", b"UN"):
                    raise _NotSimple("undefined length on a non-sequence element")
                pos = _skip_undefined(data, value, implicit, endian, depth + 1)
            else:
                pos = value + length
    raise ValueError("a sequence of undefined length has no end")


def _parse_header_fast(data: bytes, implicit: bool, little: bool) -> Header:
    endian = "<" if little else ">"
    header = Header()
    end = len(data)
    pos, last_tag, count = 0, -1, 0
    while pos < end:
        if pos + 8 > end:
            raise ValueError("the data set ends inside an element header")
        tag, vr, length, value = _element_header(data, pos, implicit, endian)
        if tag <= last_tag:
            raise ValueError(f"element tags out of order at offset {pos}")
        last_tag = tag
        if tag >= 0x7FE00008:
            if tag == _TAG_PIXEL_DATA:
                header.pixel_data_length = -1 if length == 0xFFFFFFFF else length
                header.pixel_data_available = end - value
            break
        count += 1
        if length == 0xFFFFFFFF:
            if vr not in (None, b"SQ", b"UN"):
                raise _NotSimple("undefined length on a non-sequence element")
            pos = _skip_undefined(data, value, implicit, endian)
            continue
        if value + length > end:
            raise ValueError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
        if tag in _UID_TAGS:
            if length:
                setattr(header, _UID_TAGS[tag], _uid_text(data[value : value + length]))
        elif tag in _RAW_TAGS:
            setattr(header, _RAW_TAGS[tag], data[value : value + length] or None)
        elif tag in _STRING_TAGS:
            text = data[value : value + length].decode("ascii").strip("\x00 ")
            setattr(header, _STRING_TAGS[tag], text.split("\\")[0] or None)
        elif tag in _US_TAGS:
            if length < 2:
                raise _NotSimple("short US value")
            setattr(header, _US_TAGS[tag], struct.unpack_from(endian + "H", data, value)[0])
        elif tag == _TAG_FRAMES and length:
            text = data[value : value + length].decode("ascii").strip("\x00 ")
            header.number_of_frames = int(text.split("\\")[0]) if text else None
        pos = value + length
    if count == 0:
        raise ValueError("no data element before the pixel data")
    return header


def _parse_header_pydicom(data: bytes, implicit: bool, little: bool) -> Header:
    """pydicom's reader over the top-level elements: the slow, general path."""
    if not data:
        raise ValueError("the data set is empty")
    fp = io.BytesIO(data)
    end = len(data)
    walk = _Walk()

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        # Called for every top-level element with fp at the start of its value: the cheapest
        # place to notice bytes that only look like elements.
        if tag <= walk.last_tag:
            raise ValueError(f"element tags out of order at offset {fp.tell()}")
        walk.last_tag = tag
        if tag >= 0x7FE00008:
            walk.stopped = True
            return True
        walk.count += 1
        if length != 0xFFFFFFFF and fp.tell() + length > end:
            raise ValueError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
        return False

    try:
        ds = read_dataset(fp, implicit, little, stop_when=stop, specific_tags=_HEADER_TAGS)
        if walk.count == 0:
            raise ValueError("no data element before the pixel data")
        if not walk.stopped and fp.tell() != end:
            raise ValueError("the data set does not end where its elements end")
        header = Header(
            sop_class_uid=_uid_value(ds, _TAG_SOP_CLASS),
            sop_instance_uid=_uid_value(ds, _TAG_SOP_INSTANCE),
            study_uid=_uid_value(ds, _TAG_STUDY),
            series_uid=_uid_value(ds, _TAG_SERIES),
            modality=_str_value(ds, _TAG_MODALITY),
            patient_id=_raw_value(ds, _TAG_PATIENT_ID),
            patient_name=_raw_value(ds, _TAG_PATIENT_NAME),
            patient_birth_date=_raw_value(ds, _TAG_BIRTH_DATE),
            rows=_int_value(ds, _TAG_ROWS),
            columns=_int_value(ds, _TAG_COLUMNS),
            samples_per_pixel=_int_value(ds, _TAG_SAMPLES),
            bits_allocated=_int_value(ds, _TAG_BITS_ALLOCATED),
            number_of_frames=_int_value(ds, _TAG_FRAMES),
        )
    except Exception as exc:  # pydicom raises many types for bad bytes; all mean "undecodable"
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    pos = fp.tell()
    endian = "<" if little else ">"
    if len(data) - pos >= 8:
        group, element = struct.unpack_from(f"{endian}HH", data, pos)
        if (group << 16 | element) == _TAG_PIXEL_DATA:
            if implicit:
                (length,) = struct.unpack_from(f"{endian}L", data, pos + 4)
                value_start = pos + 8
            else:
                vr = data[pos + 4 : pos + 6]
                if vr in _EXPLICIT_LONG_VRS:
                    if len(data) - pos < 12:
                        raise ValueError("Pixel Data element header is cut short")
                    (length,) = struct.unpack_from(f"{endian}L", data, pos + 8)
                    value_start = pos + 12
                else:
                    (length,) = struct.unpack_from(f"{endian}H", data, pos + 6)
                    value_start = pos + 8
            header.pixel_data_length = -1 if length == 0xFFFFFFFF else length
            header.pixel_data_available = len(data) - value_start
    return header


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr == b"UI" else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2s2xL", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str | None
) -> bytes:
    """Return preamble, ``DICM`` and the File Meta group for a received data set.

    Encoded directly (Explicit VR Little Endian, group length included) instead of through pydicom,
    because it runs on every C-STORE.
    """
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x00020003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x00020010, b"UI", transfer_syntax.encode("ascii")),
            _element(0x00020012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
            _element(0x00020013, b"SH", b"DICOM_NODE"),
            *(
                [_element(0x00020016, b"AE", source_ae.strip().encode("ascii", "replace"))]
                if source_ae and source_ae.strip()
                else []
            ),
        )
    )
    group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def read_file_meta(raw: bytes) -> tuple[str, str, int]:
    """Read a spooled file's File Meta: ``(transfer syntax, SOP Instance UID, data set offset)``.

    The counterpart of :func:`encode_file_meta` (any Explicit VR Little Endian File Meta with a
    group length, as the spool writes), for the start-up recovery of staged files
    (:mod:`dicom_node.receive.spool`).

    Raises
    ------
    ValueError
        Not a file with a readable File Meta, or one without a transfer syntax or SOP Instance UID.
    """
    if raw[128:132] != b"DICM" or len(raw) < 144:
        raise ValueError("no DICM prefix")
    group, element, vr, _, length = struct.unpack_from("<HH2sHL", raw, 132)
    if (group, element, vr) != (2, 0, b"UL") or 144 + length > len(raw):
        raise ValueError("no File Meta group length")
    end = 144 + length
    pos, found = 144, {}
    while pos + 8 <= end:
        group, element, vr = struct.unpack_from("<HH2s", raw, pos)
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (size,) = struct.unpack_from("<L", raw, pos + 8)
            start = pos + 12
        else:
            (size,) = struct.unpack_from("<H", raw, pos + 6)
            start = pos + 8
        if group == 2 and element in (0x0003, 0x0010):
            found[element] = raw[start : start + size].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + size
    if 0x0003 not in found or 0x0010 not in found:
        raise ValueError("File Meta without SOP Instance UID or transfer syntax")
    return found[0x0010], found[0x0003], end
