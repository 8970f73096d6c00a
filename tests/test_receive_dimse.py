"""The DIMSE fast path's codec: byte for byte what pynetdicom encodes and decodes."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node.receive.dimse import (
    encode_c_store_rsp,
    parse_c_store_rq,
    split_pdvs,
)

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.123"


def command_set(primitive: C_STORE, message: C_STORE_RQ | C_STORE_RSP) -> bytes:
    message.primitive_to_message(primitive)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def store_rq(**extra: object) -> C_STORE:
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = NuclearMedicineImageStorage
    req.AffectedSOPInstanceUID = SOP_INSTANCE
    req.Priority = 2
    req.DataSet = BytesIO(b"\x08\x00\x18\x00")  # a data set follows
    for keyword, value in extra.items():
        setattr(req, keyword, value)
    return req


class TestFastResponse:
    @pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
    def test_c_store_rsp_bytes_equal_pynetdicom_encoding(self, status: int) -> None:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = NuclearMedicineImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        assert encode_c_store_rsp(rsp) == encode(message.command_set, True, True)

    def test_error_comment_goes_through_pynetdicom(self) -> None:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1
        rsp.AffectedSOPClassUID = NuclearMedicineImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.3"
        rsp.Status = 0xC000
        rsp.ErrorComment = "bad"  # type: ignore[assignment]  # pynetdicom types it as None
        assert encode_c_store_rsp(rsp) is None

    def test_no_uid_goes_through_pynetdicom(self) -> None:
        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1
        rsp.Status = 0x0000
        assert encode_c_store_rsp(rsp) is None


class TestParseCStoreRq:
    def test_reads_what_pynetdicom_encodes(self) -> None:
        command = command_set(store_rq(), C_STORE_RQ())
        fields = parse_c_store_rq(command)
        assert fields is not None
        assert fields["MessageID"] == 7
        assert fields["AffectedSOPClassUID"] == NuclearMedicineImageStorage
        assert fields["AffectedSOPInstanceUID"] == SOP_INSTANCE
        assert fields["Priority"] == 2
        assert fields["CommandField"] == 0x0001
        assert parse_c_store_rq(memoryview(command)) == fields

    def test_move_originator_is_read(self) -> None:
        req = store_rq(MoveOriginatorApplicationEntityTitle="ORTHANC", MoveOriginatorMessageID=3)
        fields = parse_c_store_rq(command_set(req, C_STORE_RQ()))
        assert fields is not None
        assert fields["MoveOriginatorApplicationEntityTitle"] == "ORTHANC"
        assert fields["MoveOriginatorMessageID"] == 3

    def test_other_commands_and_odd_bytes_go_to_pynetdicom(self) -> None:
        rsp = store_rq()
        rsp.MessageIDBeingRespondedTo, rsp.Status = 7, 0
        command = command_set(store_rq(), C_STORE_RQ())
        assert parse_c_store_rq(command_set(rsp, C_STORE_RSP())) is None  # a response
        assert parse_c_store_rq(command[:-3]) is None  # cut inside an element
        assert parse_c_store_rq(command + b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00") is None
        no_data = bytearray(command)
        at = no_data.find(struct.pack("<HHL", 0, 0x0800, 2))
        struct.pack_into("<H", no_data, at + 8, 0x0101)  # "no data set follows"
        assert parse_c_store_rq(bytes(no_data)) is None


class TestPData:
    def test_split_gives_views_of_the_buffer(self) -> None:
        body = bytearray(
            struct.pack(">LBB", 5, 1, 0x03) + b"abc" + struct.pack(">LBB", 4, 3, 0x02) + b"de"
        )
        items = split_pdvs(body)
        assert items is not None
        assert [(cx, bytes(v)) for cx, v in items] == [(1, b"\x03abc"), (3, b"\x02de")]
        assert all(v.obj is body for _, v in items)  # no copy

    @pytest.mark.parametrize(
        "body",
        [b"", struct.pack(">LBB", 1, 1, 3), struct.pack(">LBB", 9, 1, 3) + b"ab", b"\x00\x00"],
    )
    def test_malformed_bodies_go_to_pynetdicom(self, body: bytes) -> None:
        assert split_pdvs(bytearray(body)) is None
