"""Property-based fuzzing of the receive path's parsers (issue 10): any bytes, a clear answer.

The pure parsers (:mod:`dicom_node.receive.dimse`, :mod:`dicom_node.receive.header`) must return a
value or their documented "not mine" answer, never raise anything else, with bounded memory. The
PDU reader of :mod:`dicom_node.receive._pynetdicom_tuned` is fed through a real socket into a
running listener: whatever arrives, the peer gets an answer (A-ASSOCIATE-AC/RJ, A-ABORT, a
C-STORE-RSP with a failure status) or a closed connection, no thread dies of an exception, and the
listener keeps answering C-ECHO.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicom_node.config import NodeConfig
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive.dimse import parse_c_store_rq, split_pdvs
from dicom_node.receive.header import Header, parse_header
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from tests.helpers.raw_dicom import (
    RELEASE_RQ,
    associate_rq,
    closed_by_peer,
    command_status,
    open_association,
    p_data,
    pdu_header,
    pdv,
)
from tests.test_receive_hostile import echo, rss_bytes

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.70",  # JPEG lossless (encapsulated)
    "1.2.3.4",  # unknown to pydicom
]
STORE_FAILURE = range(0xA000, 0x10000)
GENERIC_HANDLER_ERROR = 0xC211
"""What pynetdicom answers when a handler raises: must never come back from the node."""
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FUZZ_WIRE = settings(FUZZ, max_examples=30)
"""Examples that each open a connection (some wait out a deadline): fewer of them."""


def element(tag: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element (command sets are always implicit VR LE)."""
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


command_elements = st.one_of(
    st.builds(
        element, st.sampled_from([0x0100, 0x0110, 0x0700, 0x0800, 0x1031]), st.binary(max_size=4)
    ),
    st.builds(element, st.sampled_from([0x0002, 0x1000, 0x1030]), st.binary(max_size=70)),
    st.builds(element, st.integers(0, 0xFFFF), st.binary(max_size=8)),
    st.binary(max_size=12),
)
commands = st.lists(command_elements, max_size=10).map(b"".join)


class TestDimseCodec:
    @FUZZ
    @given(st.one_of(st.binary(max_size=512), commands))
    def test_parse_c_store_rq_returns_fields_or_none(self, command: bytes) -> None:
        fields = parse_c_store_rq(command)
        assert fields is None or fields["CommandField"] == 0x0001

    @FUZZ
    @given(st.binary(max_size=512))
    def test_split_pdvs_returns_views_inside_the_body_or_none(self, body: bytes) -> None:
        items = split_pdvs(body)
        if items is not None:
            assert sum(len(value) + 5 for _, value in items) == len(body)


class TestHeader:
    @FUZZ
    @given(
        st.one_of(
            st.binary(max_size=2048),
            # plausible element streams: tags near the ones read, any lengths
            st.lists(
                st.builds(
                    lambda tag, vr, value: (
                        struct.pack("<HH", tag >> 16, tag & 0xFFFF)
                        + vr
                        + struct.pack("<H", len(value) & 0xFFFF)
                        + value
                    ),
                    st.sampled_from([0x00080016, 0x00080018, 0x0020000D, 0x00280010, 0x7FE00010]),
                    st.sampled_from([b"UI", b"US", b"OB", b"SQ", b"UN", b"\x00\x00"]),
                    st.binary(max_size=64),
                ),
                max_size=8,
            ).map(b"".join),
        ),
        st.sampled_from(TRANSFER_SYNTAXES),
    )
    def test_parse_header_returns_a_header_or_value_error(self, data: bytes, ts: str) -> None:
        tracemalloc.start()
        try:
            try:
                header = parse_header(data, ts)
            except ValueError:
                return
            assert isinstance(header, Header)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20, f"parsing {len(data)} bytes peaked at {peak} bytes"


# -- the PDU reader, through a socket into a running listener -------------------------------


class ThreadErrors:
    """Exceptions that escaped any thread (``threading.excepthook``) while installed."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def hook(self, args: threading.ExceptHookArgs) -> None:
        self.errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")


class ReactorErrors(logging.Handler):
    """Log records saying a reactor turned an unexpected exception into an abort."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Exception in the DUL reactor" in message or "handler failed unexpectedly" in message:
            self.records.append(message)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageSCP]:
    """One StorageSCP for all examples, short deadlines so that stalls end quickly."""
    storage: Path = tmp_path_factory.mktemp("fuzz-var")
    config = NodeConfig(
        ae_title="DICOMNODE",
        host="127.0.0.1",
        port=0,
        storage=storage,
        min_free_disk=0,
        max_pdu=16384,
        acse_timeout=0.5,
        dimse_timeout=0.5,
        network_timeout=3,
    )
    received: list[InstanceRecord] = []
    scp = StorageSCP(config, Spool(storage), received.append)
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def watched() -> Iterator[tuple[ThreadErrors, ReactorErrors]]:
    errors, reactor = ThreadErrors(), ReactorErrors()
    previous = threading.excepthook
    threading.excepthook = errors.hook
    logging.getLogger().addHandler(reactor)
    yield errors, reactor
    logging.getLogger().removeHandler(reactor)
    threading.excepthook = previous


def pdu_shaped() -> st.SearchStrategy[bytes]:
    """A PDU header of any type and declared length, then some (or none) of a body."""
    return st.builds(
        lambda pdu_type, length, body: pdu_header(pdu_type, length) + body,
        st.integers(0, 8),
        st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
        st.binary(max_size=300),
    )


def associate_then(tail: bytes) -> bytes:
    """A valid A-ASSOCIATE-RQ cut or followed by ``tail``."""
    return associate_rq() + tail


class TestPduReader:
    @FUZZ_WIRE
    @given(
        st.one_of(
            st.binary(min_size=1, max_size=400),
            pdu_shaped(),
            st.builds(associate_then, st.binary(max_size=200)),
            st.builds(lambda n: associate_rq()[:n], st.integers(1, 200)),
        )
    )
    def test_any_bytes_before_association_end_in_an_answer_or_a_close(
        self, listener: StorageSCP, watched: tuple[ThreadErrors, ReactorErrors], data: bytes
    ) -> None:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            sock.sendall(data)
            closed, received = closed_by_peer(sock, timeout=6)
            if not closed:  # a valid A-ASSOCIATE-RQ was accepted: the node waits for more
                assert received[:1] == b"\x02"
                sock.sendall(RELEASE_RQ)
                closed, _ = closed_by_peer(sock, timeout=6)
        assert closed
        if received:
            assert received[0] in (0x02, 0x03, 0x06, 0x07), received[:10]
        errors, reactor = watched
        assert errors.errors == [] and reactor.records == []

    @FUZZ_WIRE
    @given(
        st.lists(
            st.builds(
                pdv,
                st.sampled_from([1, 3, 5, 0, 255]),
                st.integers(0, 3),
                st.one_of(commands, st.binary(max_size=300)),
            ),
            min_size=1,
            max_size=4,
        ),
        st.one_of(st.just(b""), st.binary(max_size=64)),
    )
    def test_any_p_data_gets_a_failure_status_or_an_abort(
        self,
        listener: StorageSCP,
        watched: tuple[ThreadErrors, ReactorErrors],
        pdvs: list[bytes],
        trailer: bytes,
    ) -> None:
        sock = open_association(listener.port)
        with sock:
            sock.sendall(p_data(*pdvs) + trailer + RELEASE_RQ)
            closed, received = closed_by_peer(sock, timeout=8)
        assert closed, "the node neither answered the release nor dropped the peer"
        offset = 0
        while offset + 6 <= len(received):  # every C-STORE-RSP carries a failure status
            pdu_type, length = received[offset], int.from_bytes(received[offset + 2 : offset + 6])
            body = received[offset + 6 : offset + 6 + length]
            if pdu_type == 0x04 and len(body) > 6:
                status = command_status(body[6:])
                assert status != GENERIC_HANDLER_ERROR
            offset += 6 + length
        errors, reactor = watched
        assert errors.errors == [] and reactor.records == []

    def test_listener_still_answers_with_bounded_memory(
        self, listener: StorageSCP, watched: tuple[ThreadErrors, ReactorErrors]
    ) -> None:
        before = rss_bytes()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
                sock.sendall(pdu_header(0x01, 2**32 - 1) + b"\x00" * 100)
                assert closed_by_peer(sock, timeout=5)[0]
        assert rss_bytes() - before < 100 * 2**20
        assert echo(listener.port)[0]
        errors, reactor = watched
        assert errors.errors == [] and reactor.records == []
