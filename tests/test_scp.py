"""The C-ECHO/C-STORE SCP against real DCMTK peers, and pynetdicom SCUs for crafted bad input."""

from __future__ import annotations

import errno
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.receive.scp import (
    STATUS_BAD_GEOMETRY,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISSING_UID,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    STATUS_TRUNCATED_PIXEL_DATA,
    InstanceRecord,
    StorageSCP,
    encode_file_meta,
    parse_header,
)
from dicom_node.receive.spool import Spool
from dicom_node.receive.transport import encode_c_store_rsp
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.peers import Orthanc, echoscu, storescu

NODE_AE = "DICOMNODE"


class Recorder:
    """The ``on_instance`` callback: records, or raises ``error`` when set."""

    def __init__(self) -> None:
        self.records: list[InstanceRecord] = []
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def __call__(self, record: InstanceRecord) -> None:
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
        ds.file_meta.TransferSyntaxUID = transfer_syntax
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
        node = start_node(max_associations=16)
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


class TestParseHeader:
    def test_encapsulated_pixel_data_is_not_measured(self, tmp_path: Path) -> None:
        ds = make_nm(rows=16, cols=16, seed="jpeg")
        frame = b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"
        ds.PixelData = pydicom.encaps.encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        path = tmp_path / "jpeg.dcm"
        ds.save_as(path, enforce_file_format=True)
        header = parse_header(dataset_bytes(path), JPEGBaseline8Bit)
        assert header.pixel_data_length == -1
        assert (header.rows, header.columns, header.modality) == (16, 16, "NM")

    def test_deflated_bytes_that_do_not_inflate(self) -> None:
        with pytest.raises(ValueError, match="does not inflate"):
            parse_header(b"not deflate at all", DeflatedExplicitVRLittleEndian)
        good = zlib.compressobj(wbits=-15)
        assert good  # the happy path is covered end to end above

    def test_file_meta_is_readable_by_pydicom(self, tmp_path: Path) -> None:
        meta = encode_file_meta(
            "1.2.840.10008.5.1.4.1.1.20", "1.2.3", ExplicitVRLittleEndian, "AE1"
        )
        path = tmp_path / "meta.dcm"
        path.write_bytes(meta)
        read = pydicom.filereader.read_file_meta_info(path)
        assert read.MediaStorageSOPInstanceUID == "1.2.3"
        assert read.TransferSyntaxUID == ExplicitVRLittleEndian
        assert read.SourceApplicationEntityTitle == "AE1"


class TestFastResponse:
    @pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC210])
    def test_c_store_rsp_bytes_equal_pynetdicom_encoding(self, status: int) -> None:
        from pynetdicom.dimse_messages import C_STORE_RSP
        from pynetdicom.dimse_primitives import C_STORE
        from pynetdicom.dsutils import encode

        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 7
        rsp.AffectedSOPClassUID = NuclearMedicineImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"
        rsp.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(rsp)
        assert encode_c_store_rsp(rsp) == encode(message.command_set, True, True)

    def test_error_comment_goes_through_pynetdicom(self) -> None:
        from pynetdicom.dimse_primitives import C_STORE

        rsp = C_STORE()
        rsp.MessageIDBeingRespondedTo = 1
        rsp.AffectedSOPClassUID = NuclearMedicineImageStorage
        rsp.AffectedSOPInstanceUID = "1.2.3"
        rsp.Status = 0xC000
        rsp.ErrorComment = "bad"
        assert encode_c_store_rsp(rsp) is None


class TestHeaderWalker:
    """The fast top-level walker reads what pydicom's reader reads."""

    @pytest.mark.parametrize(
        "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    )
    @pytest.mark.parametrize("kind", ["nm", "nm3", "ct"])
    def test_fast_and_pydicom_paths_agree(
        self, tmp_path: Path, transfer_syntax: str, kind: str
    ) -> None:
        from dicom_node.receive.header import _parse_header_fast, _parse_header_pydicom

        if kind == "ct":
            ds = make_ct_series(n_slices=1, rows=32, cols=32, seed="walker")[0]
        else:
            ds = make_nm(rows=32, cols=32, frames=3 if kind == "nm3" else 1, seed="walker")
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        path = tmp_path / "ds.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = dataset_bytes(path)
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        fast = _parse_header_fast(data, implicit, little)
        assert fast == _parse_header_pydicom(data, implicit, little)
        assert fast.study_uid == ds.StudyInstanceUID
        assert (fast.rows, fast.columns, fast.bits_allocated) == (32, 32, 16)
        assert fast.pixel_data_length == len(ds.PixelData)
        assert parse_header(data, transfer_syntax) == fast


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
