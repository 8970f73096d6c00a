"""The C-ECHO/C-STORE SCP against real DCMTK peers, and pynetdicom SCUs for crafted bad input."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive.handler import (
    STATUS_BAD_GEOMETRY,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISSING_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STATUS_TRUNCATED_PIXEL_DATA,
)
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.peers import Orthanc, echoscu, storescu
from tests.helpers.waiting import wait_until

NODE_AE = "DICOMNODE"


class Recorder:
    """The ``on_instance`` callback: records, or raises ``error`` when set."""

    def __init__(self) -> None:
        self.records: list[InstanceRecord] = []
        self.threads: list[str] = []
        """The name of the thread of each call."""
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def __call__(self, record: InstanceRecord) -> None:
        with self._lock:
            self.threads.append(threading.current_thread().name)
        if self.error is not None:
            raise self.error
        with self._lock:
            self.records.append(record)


class Node:
    """A running StorageSCP with its spool folder and recorder."""

    def __init__(self, scp: StorageSCP, recorder: Recorder, storage: Path) -> None:
        self.scp = scp
        self.recorder = recorder
        self.storage = storage

    @property
    def port(self) -> int:
        return self.scp.port

    def spooled(self) -> list[Path]:
        return sorted((self.storage / "spool").rglob("*.dcm"))


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start StorageSCPs on ephemeral loopback ports; all are stopped at teardown."""
    started: list[StorageSCP] = []

    def start(**overrides: Any) -> Node:
        values: dict[str, Any] = {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": 0,
            "storage": tmp_path / f"var{len(started)}",
            "min_free_disk": 0,
        }
        values.update(overrides)
        config = NodeConfig(**values)
        recorder = Recorder()
        scp = StorageSCP(config, Spool(config.storage), recorder)
        started.append(scp)
        scp.start()
        return Node(scp, recorder, config.storage)

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """Let pynetdicom send a file's data set bytes as they are on disk (for crafted bytes)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a DICOM file (after preamble and File Meta)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    group, element, vr, _, length = struct.unpack_from("<HH2sHL", raw, 132)
    assert (group, element, vr) == (2, 0, b"UL")
    return raw[144 + length :]


def pynetdicom_store(
    port: int,
    items: list[Dataset | Path],
    transfer_syntax: str = ExplicitVRLittleEndian,
    calling_ae: str = "PYSCU",
) -> list[int | None]:
    """Send datasets or files over one association; return each status (None: no response)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(NuclearMedicineImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "association was not established"
    statuses: list[int | None] = []
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            statuses.append(int(rsp.Status) if rsp else None)
    finally:
        assoc.release()
    return statuses


def rejected(reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value("dicom_node_instances_rejected_total", {"reason": reason})
        or 0.0
    )


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or None) or 0.0


class TestEcho:
    def test_echoscu_is_answered(self, start_node: Callable[..., Node]) -> None:
        node = start_node()
        result = echoscu(node.port, NODE_AE)
        assert result.returncode == 0, result.stderr
        assert node.scp.listening

    def test_stop_closes_the_port(self, start_node: Callable[..., Node]) -> None:
        node = start_node()
        port = node.port
        node.scp.stop()
        assert not node.scp.listening
        assert echoscu(port, NODE_AE).returncode != 0


class TestListener:
    def test_listening_socket_has_tcp_nodelay(self, start_node: Callable[..., Node]) -> None:
        import socket

        node = start_node()
        server = node.scp._server
        assert server is not None and server.socket is not None
        assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert node.port == server.server_address[1] != 0

    def test_serving_never_runs_a_full_garbage_collection(
        self, start_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """pynetdicom's server collects every 60 polls (40-110 ms holding the GIL with the
        node loaded); the node's server leaves it to Python's generational collector."""
        import gc

        node = start_node()
        calls: list[object] = []
        monkeypatch.setattr(gc, "collect", lambda *a, **k: calls.append(a) or 0)
        server = node.scp._server
        assert server is not None
        for _ in range(200):
            server.service_actions()
        assert calls == []

    def test_port_in_use_raises(self, start_node: Callable[..., Node], tmp_path: Path) -> None:
        node = start_node()
        config = NodeConfig(
            ae_title=NODE_AE,
            host="127.0.0.1",
            port=node.port,
            storage=tmp_path / "other",
            min_free_disk=0,
        )
        other = StorageSCP(config, Spool(config.storage), Recorder())
        with pytest.raises(OSError, match="Address already in use"):
            other.start()
        assert not other.listening and other.port == 0
        assert echoscu(node.port, NODE_AE).returncode == 0

    def test_stop_aborts_an_association_that_does_not_end(
        self, start_node: Callable[..., Node]
    ) -> None:
        node = start_node()
        ae = AE(ae_title="LINGER")
        ae.add_requested_context(NuclearMedicineImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        node.scp.stop(timeout=0.5)
        assoc.dul.join(timeout=10)  # the peer sees the abort and its DUL ends
        assert assoc.is_aborted
        assert not node.scp.listening

    def test_small_max_pdu_is_honoured(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node(max_pdu=4096)
        files = write_series([make_nm(rows=64, cols=64, seed="pdu")], tmp_path / "in")
        result = storescu(files, node.port, NODE_AE, extra_args=["-v"])
        assert result.returncode == 0, result.stderr
        assert "Max Send PDV: 4084" in result.stdout + result.stderr
        (spooled,) = node.spooled()
        assert dataset_bytes(spooled) == dataset_bytes(files[0])


class TestStore:
    def test_nm_files_are_spooled_byte_identical(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node()
        before = counter("dicom_node_instances_received_total")
        files = write_series([make_nm(seed=i, frames=1 + i % 2) for i in range(4)], tmp_path / "in")
        result = storescu(tmp_path / "in", node.port, NODE_AE)
        assert result.returncode == 0, result.stderr
        records = {r.sop_instance_uid: r for r in node.recorder.records}
        assert len(records) == 4
        assert counter("dicom_node_instances_received_total") == before + 4
        for path in files:
            src = pydicom.dcmread(path)
            record = records[src.SOPInstanceUID]
            assert record.path == (
                f"spool/{src.StudyInstanceUID}/{src.SeriesInstanceUID}/{src.SOPInstanceUID}.dcm"
            )
            assert (record.study_uid, record.series_uid) == (
                src.StudyInstanceUID,
                src.SeriesInstanceUID,
            )
            assert record.modality == "NM"
            assert record.sop_class_uid == NuclearMedicineImageStorage
            assert record.calling_ae == "STORESCU"
            assert record.transfer_syntax == ExplicitVRLittleEndian
            spooled = node.storage / record.path
            assert record.size == spooled.stat().st_size
            assert dataset_bytes(spooled) == dataset_bytes(path)
            copy = pydicom.dcmread(spooled)
            assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert copy.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
            assert copy.file_meta.SourceApplicationEntityTitle == "STORESCU"
            assert copy.pixel_array.shape == src.pixel_array.shape

    def test_one_flush_checksum_computed_while_receiving_matches_the_file(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        """The CRC-32 the DUL thread computes fragment by fragment (small PDUs: many fragments)
        is the one the spool records for a staged instance: recovery would accept the file."""
        from dicom_node.receive.spool import STAGED_XATTR, _matches_mark

        node = start_node(max_pdu=16384)
        files = write_series([make_nm(seed=i) for i in range(30)], tmp_path / "in")
        first = storescu(files[0], node.port, NODE_AE)
        assert first.returncode == 0, first.stderr
        time.sleep(0.5)  # the spool's background thread prepares its staged files
        result = storescu(tmp_path / "in", node.port, NODE_AE)
        assert result.returncode == 0, result.stderr
        marked = 0
        for spooled in node.spooled():
            try:
                mark = os.getxattr(spooled, STAGED_XATTR).decode()
            except OSError:
                continue  # stored the strict way (no prepared file was ready)
            assert _matches_mark(spooled.read_bytes(), mark), spooled.name
            assert mark.count(",") == 1  # File Meta and data set, each with its CRC
            marked += 1
        assert marked >= 20

    def test_pynetdicom_chunked_receive_mode_is_handled(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        """Another part of the process may switch pynetdicom to spooling data sets to files."""
        node = start_node()
        (path,) = write_series([make_nm(rows=32, cols=32, seed="chunked")], tmp_path / "in")
        previous = _config.STORE_RECV_CHUNKED_DATASET
        _config.STORE_RECV_CHUNKED_DATASET = True
        try:
            result = storescu([path], node.port, NODE_AE)
        finally:
            _config.STORE_RECV_CHUNKED_DATASET = previous
        assert result.returncode == 0, result.stderr
        (spooled,) = node.spooled()
        assert dataset_bytes(spooled) == dataset_bytes(path)

    def test_ct_series_in_implicit_vr(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node()
        write_series(make_ct_series(n_slices=3, rows=128, cols=128), tmp_path / "ct")
        result = storescu(tmp_path / "ct", node.port, NODE_AE, extra_args=["-xi"])
        assert result.returncode == 0, result.stderr
        assert {r.modality for r in node.recorder.records} == {"CT"}
        assert {r.transfer_syntax for r in node.recorder.records} == {ImplicitVRLittleEndian}
        assert len(node.spooled()) == 3

    @pytest.mark.parametrize(
        "transfer_syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    )
    def test_deflate_and_big_endian_are_kept_as_sent(
        self, start_node: Callable[..., Node], transfer_syntax: str
    ) -> None:
        node = start_node()
        ds = make_nm(rows=64, cols=64, seed=str(transfer_syntax))
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        assert pynetdicom_store(node.port, [ds], transfer_syntax) == [STATUS_SUCCESS]
        (spooled,) = node.spooled()
        copy = pydicom.dcmread(spooled)
        assert copy.file_meta.TransferSyntaxUID == transfer_syntax
        assert copy.SOPInstanceUID == ds.SOPInstanceUID
        assert (copy.pixel_array == ds.pixel_array).all()

    def test_duplicate_is_stored_once(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node()
        (path,) = write_series([make_nm(seed="dup")], tmp_path / "in")
        before = counter("dicom_node_instances_duplicate_total")
        for _ in range(2):
            result = storescu([path], node.port, NODE_AE)
            assert result.returncode == 0, result.stderr
        assert len(node.spooled()) == 1
        assert counter("dicom_node_instances_duplicate_total") == before + 1
        # the callback hears the resend too (idempotent job store heals a lost job row)
        assert {r.path for r in node.recorder.records} == {node.recorder.records[0].path}

    def test_sixteen_concurrent_senders(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        # all 16 come from 127.0.0.1: lift the per-host limit (tests/test_receive_hostile.py)
        node = start_node(max_associations=16, max_associations_per_host=16)
        folders = []
        for sender in range(16):
            datasets = [
                make_nm(rows=64, cols=64, seed=f"s{sender}", instance_number=i + 1)
                for i in range(4)
            ]
            write_series(datasets, tmp_path / f"sender{sender}")
            folders.append(tmp_path / f"sender{sender}")
        results: dict[int, Any] = {}

        def send(i: int) -> None:
            results[i] = storescu(folders[i], node.port, NODE_AE, calling_ae=f"SENDER{i}")

        threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failures = {i: r.stderr for i, r in results.items() if r.returncode != 0}
        assert failures == {}
        uids = [r.sop_instance_uid for r in node.recorder.records]
        assert len(uids) == 64 and len(set(uids)) == 64
        assert len(node.spooled()) == 64


class TestBadInput:
    """Each bad instance gets its own failure status; the node keeps serving."""

    def assert_still_serving(self, node: Node, tmp_path: Path) -> None:
        (good,) = write_series([make_nm(rows=32, cols=32, seed="good")], tmp_path / "good")
        result = storescu([good], node.port, NODE_AE)
        assert result.returncode == 0, result.stderr

    def test_bytes_that_are_not_dicom(
        self, start_node: Callable[..., Node], tmp_path: Path, chunked_send: None
    ) -> None:
        node = start_node()
        ds = make_nm(rows=32, cols=32, seed="garbage")
        path = tmp_path / "garbage.dcm"
        ds.save_as(path, enforce_file_format=True)
        raw = path.read_bytes()
        header_end = len(raw) - len(dataset_bytes(path))
        path.write_bytes(raw[:header_end] + b"\xff\xff\x10\x00this is not a DICOM data set" * 7)
        before = rejected("undecodable")
        assert pynetdicom_store(node.port, [path]) == [STATUS_CANNOT_UNDERSTAND]
        assert rejected("undecodable") == before + 1
        assert node.spooled() == [] and node.recorder.records == []
        self.assert_still_serving(node, tmp_path)

    def test_truncated_pixel_data(self, start_node: Callable[..., Node], tmp_path: Path) -> None:
        node = start_node()
        ds = make_nm(rows=64, cols=64, seed="short")
        ds.PixelData = ds.PixelData[: 64 * 64]  # half of what 16-bit 64x64 needs
        before = rejected("truncated_pixel_data")
        assert pynetdicom_store(node.port, [ds]) == [STATUS_TRUNCATED_PIXEL_DATA]
        assert rejected("truncated_pixel_data") == before + 1
        assert node.spooled() == []
        self.assert_still_serving(node, tmp_path)

    def test_stream_cut_inside_pixel_data(
        self, start_node: Callable[..., Node], tmp_path: Path, chunked_send: None
    ) -> None:
        node = start_node()
        path = tmp_path / "cut.dcm"
        make_nm(rows=64, cols=64, seed="cut").save_as(path, enforce_file_format=True)
        path.write_bytes(path.read_bytes()[:-1000])
        assert pynetdicom_store(node.port, [path]) == [STATUS_TRUNCATED_PIXEL_DATA]
        self.assert_still_serving(node, tmp_path)

    @pytest.mark.parametrize(("rows", "cols"), [(0, 64), (64, 20000), (65535, 65535)])
    def test_absurd_rows_columns(
        self, start_node: Callable[..., Node], tmp_path: Path, rows: int, cols: int
    ) -> None:
        node = start_node()
        ds = make_nm(rows=64, cols=64, seed=f"absurd{rows}")
        ds.Rows, ds.Columns = rows, cols
        assert pynetdicom_store(node.port, [ds]) == [STATUS_BAD_GEOMETRY]
        assert node.spooled() == []
        self.assert_still_serving(node, tmp_path)

    @pytest.mark.parametrize(
        ("keyword", "value"),
        [("StudyInstanceUID", None), ("SeriesInstanceUID", None), ("StudyInstanceUID", "1.2.x")],
    )
    def test_missing_or_bad_uids(
        self, start_node: Callable[..., Node], tmp_path: Path, keyword: str, value: str | None
    ) -> None:
        node = start_node()
        ds = make_nm(rows=32, cols=32, seed=f"nouid{keyword}{value}")
        if value is None:
            delattr(ds, keyword)
        else:
            with pytest.warns(UserWarning, match="Invalid value for VR UI"):
                setattr(ds, keyword, value)
        before = rejected("missing_uid")
        # the good one on the same association is still served
        good = make_nm(rows=32, cols=32, seed="after-bad")
        assert pynetdicom_store(node.port, [ds, good]) == [STATUS_MISSING_UID, STATUS_SUCCESS]
        assert rejected("missing_uid") == before + 1
        assert [r.sop_instance_uid for r in node.recorder.records] == [good.SOPInstanceUID]

    def test_unknown_calling_ae_is_rejected(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node(allowed_callers=["ORTHANC", "STORESCU@127.0.0.1", "ECHOSCU@10.9.9.9"])
        before = counter("dicom_node_associations_total", outcome="rejected")
        refused = echoscu(node.port, NODE_AE, calling_ae="INTRUDER")
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
        wrong_host = echoscu(node.port, NODE_AE, calling_ae="ECHOSCU")
        assert wrong_host.returncode != 0
        assert counter("dicom_node_associations_total", outcome="rejected") == before + 2
        assert echoscu(node.port, NODE_AE, calling_ae="ORTHANC").returncode == 0
        self.assert_still_serving(node, tmp_path)  # STORESCU from 127.0.0.1

    def test_disk_guard_refuses_with_out_of_resources(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        node = start_node(min_free_disk="1000TB")
        before = rejected("disk_full")
        ds = make_nm(rows=32, cols=32, seed="full")
        assert pynetdicom_store(node.port, [ds]) == [STATUS_OUT_OF_RESOURCES]
        assert rejected("disk_full") == before + 1
        assert node.spooled() == [] and node.recorder.records == []

    @pytest.mark.parametrize(
        ("error", "status"),
        [
            (RuntimeError("job store down"), STATUS_PROCESSING_FAILURE),
            (OSError(errno.ENOSPC, "No space left on device"), STATUS_OUT_OF_RESOURCES),
        ],
    )
    def test_callback_failure_is_not_success_and_resend_heals(
        self, start_node: Callable[..., Node], error: BaseException, status: int
    ) -> None:
        node = start_node()
        node.recorder.error = error
        ds = make_nm(rows=32, cols=32, seed=f"cb{status}")
        assert pynetdicom_store(node.port, [ds]) == [status]
        node.recorder.error = None
        assert pynetdicom_store(node.port, [ds]) == [STATUS_SUCCESS]
        assert [r.sop_instance_uid for r in node.recorder.records] == [ds.SOPInstanceUID]
        assert len(node.spooled()) == 1

    def test_c_stores_are_answered_on_the_reader_thread(
        self, start_node: Callable[..., Node], tmp_path: Path
    ) -> None:
        """The per-instance path hands nothing to the association thread (issue 15): each
        C-STORE is recorded on the DUL reader thread, and storescu hears every status."""
        node = start_node()
        datasets = [make_nm(rows=32, cols=32, seed=f"inline{i}") for i in range(3)]
        result = storescu(write_series(datasets, tmp_path / "in"), node.port, NODE_AE)
        assert result.returncode == 0, result.stderr
        assert len(node.recorder.records) == 3
        assert all("run_reactor" in name for name in node.recorder.threads), node.recorder.threads

    def test_a_dimse_watcher_gets_pynetdicoms_way(self, start_node: Callable[..., Node]) -> None:
        """A handler bound to EVT_DIMSE_SENT (pynetdicom's own debugging aid) sees every
        C-STORE-RSP: the association then goes pynetdicom's way, with the same statuses."""
        node = start_node()
        server = node.scp._server
        assert server is not None
        sent: list[str] = []
        server.bind(evt.EVT_DIMSE_SENT, lambda event: sent.append(type(event.message).__name__))
        good = make_nm(rows=32, cols=32, seed="watched")
        bad = make_nm(rows=32, cols=32, seed="watched-bad")
        del bad.SeriesInstanceUID
        assert pynetdicom_store(node.port, [good, bad]) == [STATUS_SUCCESS, STATUS_MISSING_UID]
        assert sent == ["C_STORE_RSP", "C_STORE_RSP"]
        assert not any("run_reactor" in name for name in node.recorder.threads)

    def test_association_limit(self, start_node: Callable[..., Node]) -> None:
        node = start_node(max_associations=1)
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(NuclearMedicineImageStorage)
        held = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        try:
            assert held.is_established
            result = echoscu(node.port, NODE_AE)
            assert result.returncode != 0
        finally:
            held.release()
        assert echoscu(node.port, NODE_AE).returncode == 0


def _pdv(context_id: int, control: int, data: bytes) -> bytes:
    """One Presentation Data Value item (PS3.8 9.3.5.1)."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def _p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU holding ``pdvs``."""
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


def _c_store_command(ds: Dataset, message_id: int) -> bytes:
    """The C-STORE-RQ command set pynetdicom would send for ``ds``."""
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(b"")  # only marks "a data set follows"
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    command = encode(message.command_set, True, True)
    assert command is not None
    return command


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _command_pdvs(cx: int, command: bytes, pieces: int) -> list[bytes]:
    parts = _chunks(command, -(-len(command) // pieces))
    return [_pdv(cx, 0x03 if i == len(parts) - 1 else 0x01, p) for i, p in enumerate(parts)]


def _data_pdvs(cx: int, data: bytes, size: int) -> list[bytes]:
    parts = _chunks(data, size)
    return [_pdv(cx, 0x02 if i == len(parts) - 1 else 0x00, p) for i, p in enumerate(parts)]


class TestFastPathOnTheWire:
    """Crafted P-DATA layouts a PACS may send: what it hears back and what lands on disk.

    The node's DUL hands DIMSE views of its receive buffer and DIMSE assembles the C-STORE
    itself; each layout must give Success and a spooled data set identical to the bytes sent,
    on the fast path and, with a handler watching PDUs, on pynetdicom's own path.
    """

    @pytest.fixture(params=["fast", "pynetdicom"])
    def path(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    def send_raw(self, node: Node, pdus: list[bytes], path: str, expected: int) -> list[int]:
        """Associate, write ``pdus`` as they are, return the statuses of ``expected`` answers."""
        if path == "pynetdicom":
            server = node.scp._server
            assert server is not None
            for event in (evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT):
                server.bind(event, lambda event: None)
        ae = AE(ae_title="RAWSCU")
        ae.dimse_timeout = 10
        ae.add_requested_context(NuclearMedicineImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AE)
        assert assoc.is_established
        # pause the requestor's reactor as send_c_store() does, so that we read the responses
        assoc._reactor_checkpoint.clear()
        wait_until(lambda: assoc._is_paused, timeout=10, what="the SCU reactor to pause")
        try:
            (context,) = assoc.accepted_contexts
            assert context.context_id == 1
            sock = assoc.dul.socket
            assert sock is not None and sock.socket is not None
            for pdu in pdus:
                sock.socket.sendall(pdu)
            statuses = []
            for _ in range(expected):
                _, rsp = assoc.dimse.get_msg(block=True)
                assert rsp is not None, "no C-STORE-RSP within the DIMSE timeout"
                assert rsp.Status is not None
                statuses.append(int(rsp.Status))
        finally:
            assoc._reactor_checkpoint.set()
            assoc.release()
        return statuses

    def instance(self, tmp_path: Path, seed: str) -> tuple[Dataset, bytes]:
        ds = make_nm(rows=64, cols=64, seed=seed)
        (path,) = write_series([ds], tmp_path / seed)
        return ds, dataset_bytes(path)

    def assert_spooled(self, node: Node, sent: dict[str, bytes]) -> None:
        by_uid = {p.stem: p for p in node.spooled()}
        assert set(by_uid) == set(sent)
        for uid, data in sent.items():
            assert dataset_bytes(by_uid[uid]) == data
        assert sorted(r.sop_instance_uid for r in node.recorder.records) == sorted(sent)

    def test_command_and_data_set_in_one_pdu(
        self, start_node: Callable[..., Node], tmp_path: Path, path: str
    ) -> None:
        node = start_node()
        ds, data = self.instance(tmp_path, "one-pdu")
        pdu = _p_data(_pdv(1, 0x03, _c_store_command(ds, 1)), _pdv(1, 0x02, data))
        assert self.send_raw(node, [pdu], path, 1) == [STATUS_SUCCESS]
        self.assert_spooled(node, {ds.SOPInstanceUID: data})

    def test_fragmented_command_and_data_set_over_many_pdus(
        self, start_node: Callable[..., Node], tmp_path: Path, path: str
    ) -> None:
        node = start_node()
        ds, data = self.instance(tmp_path, "fragmented")
        command = _c_store_command(ds, 1)
        pdus = [_p_data(p) for p in _command_pdvs(1, command, 3)]
        pdus += [_p_data(p) for p in _data_pdvs(1, data, 1000)]  # odd size: splits elements
        assert len(pdus) > 8
        assert self.send_raw(node, pdus, path, 1) == [STATUS_SUCCESS]
        self.assert_spooled(node, {ds.SOPInstanceUID: data})

    def test_data_set_split_across_many_pdvs_of_one_pdu(
        self, start_node: Callable[..., Node], tmp_path: Path, path: str
    ) -> None:
        node = start_node()
        ds, data = self.instance(tmp_path, "many-pdvs")
        pdvs = [_pdv(1, 0x03, _c_store_command(ds, 1)), *_data_pdvs(1, data, 333)]
        assert len(pdvs) > 20
        assert self.send_raw(node, [_p_data(*pdvs)], path, 1) == [STATUS_SUCCESS]
        self.assert_spooled(node, {ds.SOPInstanceUID: data})

    def test_two_requests_in_one_pdu_and_one_across_the_boundary(
        self, start_node: Callable[..., Node], tmp_path: Path, path: str
    ) -> None:
        if path == "pynetdicom":
            pytest.skip(
                "pynetdicom 3.0's DIMSEMessage.decode_msg stops at the first complete message "
                "and drops the rest of the P-DATA-TF; only the fast path serves this layout"
            )
        node = start_node()
        sent = [self.instance(tmp_path, f"pair{i}") for i in range(3)]
        (ds0, d0), (ds1, d1), (ds2, d2) = sent
        third = _data_pdvs(1, d2, len(d2) // 2 + 1)
        first_pdu = _p_data(
            _pdv(1, 0x03, _c_store_command(ds0, 1)),
            *_data_pdvs(1, d0, 4096),
            _pdv(1, 0x03, _c_store_command(ds1, 2)),
            _pdv(1, 0x02, d1),
            _pdv(1, 0x03, _c_store_command(ds2, 3)),
            third[0],
        )
        statuses = self.send_raw(node, [first_pdu, _p_data(third[1])], path, 3)
        assert statuses == [STATUS_SUCCESS] * 3
        self.assert_spooled(node, {ds.SOPInstanceUID: d for ds, d in sent})

    def test_bad_instance_in_a_fragmented_stream_gets_its_status(
        self, start_node: Callable[..., Node], tmp_path: Path, path: str
    ) -> None:
        node = start_node()
        bad = make_nm(rows=64, cols=64, seed="bad-in-stream")
        bad.Rows = 0
        (bad_path,) = write_series([bad], tmp_path / "bad")
        good, good_data = self.instance(tmp_path, "good-in-stream")
        pdus = [_p_data(p) for p in _command_pdvs(1, _c_store_command(bad, 1), 2)]
        pdus += [_p_data(p) for p in _data_pdvs(1, dataset_bytes(bad_path), 777)]
        pdus.append(
            _p_data(_pdv(1, 0x03, _c_store_command(good, 2)), *_data_pdvs(1, good_data, 5000))
        )
        statuses = self.send_raw(node, pdus, path, 2)
        assert statuses == [STATUS_BAD_GEOMETRY, STATUS_SUCCESS]
        self.assert_spooled(node, {good.SOPInstanceUID: good_data})


class TestOrthancInterop:
    def test_orthanc_pushes_a_study(self, start_node: Callable[..., Node], tmp_path: Path) -> None:
        node = start_node(allowed_callers=["ORTHANC"])
        study = make_nm(rows=64, cols=64, seed="orthanc").StudyInstanceUID
        datasets = [make_nm(rows=64, cols=64, seed="orthanc", instance_number=i) for i in (1, 2)]
        datasets += make_ct_series(n_slices=2, rows=32, cols=32, study_uid=study, seed="orthanc")
        write_series(datasets, tmp_path / "study")
        with Orthanc(modalities={"node": (NODE_AE, "127.0.0.1", node.port)}) as pacs:
            pacs.upload(tmp_path / "study")
            (study_id,) = pacs.rest_get("/studies")
            answer = pacs.send_to_modality("node", [study_id])
        assert answer["FailedInstancesCount"] == 0
        assert {r.sop_instance_uid for r in node.recorder.records} == {
            ds.SOPInstanceUID for ds in datasets
        }
        assert {r.calling_ae for r in node.recorder.records} == {"ORTHANC"}
        for record in node.recorder.records:
            original = tmp_path / "study" / f"{record.sop_instance_uid}.dcm"
            assert pydicom.dcmread(node.storage / record.path).PixelData == (
                pydicom.dcmread(original).PixelData
            )
