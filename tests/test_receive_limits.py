"""Peer-supplied values the receiver refuses (issue 10 items 1, 4 and 5, receive side): UIDs that
are not UIDs, pixel and decompression bombs, and instances that contradict the store's
identities, each sent by pynetdicom to a running StorageSCP recording into a real JobStore.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node import metrics
from dicom_node.config import NodeConfig
from dicom_node.jobs import JobStore
from dicom_node.jobs.reconcile import QUARANTINE_DIR, reconcile_spool
from dicom_node.receive.handler import (
    STATUS_IDENTITY_CONFLICT,
    STATUS_MISSING_UID,
    STATUS_PIXEL_BUDGET,
    STATUS_SUCCESS,
)
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from tests.helpers.dicom_factory import make_nm

NODE_AE = "DICOMNODE"


class Node:
    def __init__(self, scp: StorageSCP, store: JobStore, storage: Path) -> None:
        self.scp, self.store, self.storage = scp, store, storage

    def spool_entries(self) -> list[Path]:
        return sorted(p for p in (self.storage / "spool").rglob("*") if ".incoming" not in p.parts)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

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
        store = JobStore.open(config.storage)
        scp = StorageSCP(config, Spool(config.storage), store.record_instance)
        scp.start()
        node = Node(scp, store, config.storage)
        started.append(node)
        return node

    yield start
    for node in started:
        node.scp.stop()
        node.store.close()


def send(port: int, items: list[Any], ts: str = ExplicitVRLittleEndian) -> list[int]:
    """Send data sets or files over one association; return each status (-1: none)."""
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(NuclearMedicineImageStorage, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    out = []
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            out.append(int(rsp.Status) if rsp else -1)
    finally:
        assoc.release()
    return out


def rejected(reason: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "dicom_node_instances_rejected_total", {"reason": reason}
    )
    return sample or 0.0


PLACEHOLDER = "1.2.826.0.1.3680043.8.498.5999"  # 30 characters: no pad byte


class TestUidsThatAreNotUids:
    @pytest.mark.parametrize(
        "bad",
        [
            b"1.2\\../../../x.0.0.0.0.0.0.0.0",
            b"1.2.826.0.1.3680043.8.498.599\n",
            b"1.2.826.0.1.3680043.8.498.0599",
            b"1.2.826.0.1.3680043.8.498.5\x00\x00\x00",
        ],
        ids=["two-values", "newline", "leading-zero", "extra-padding"],
    )
    def test_refused_with_a901_and_no_folder(
        self, start_node: Callable[..., Node], bad: bytes
    ) -> None:
        assert len(bad) == len(PLACEHOLDER)
        node = start_node()
        ds = make_nm(rows=32, cols=32, seed=f"bad-uid-{bad!r}", study_uid=PLACEHOLDER)
        body = _explicit_le(ds).replace(PLACEHOLDER.encode(), bad)  # bytes pydicom won't write
        before = rejected("missing_uid")
        assert send_raw(node.scp.port, ds, body, ExplicitVRLittleEndian) == [STATUS_MISSING_UID]
        assert rejected("missing_uid") == before + 1
        good = make_nm(rows=32, cols=32, seed="good-after-bad-uid")
        assert send(node.scp.port, [good]) == [STATUS_SUCCESS]
        folders = {p.name for p in (node.storage / "spool").iterdir()} - {".incoming"}
        assert folders == {str(good.StudyInstanceUID)}
        assert node.store.known_instance_uids() == {str(good.SOPInstanceUID)}

    def test_a_spool_file_with_a_bad_uid_is_quarantined_at_start_up(self, tmp_path: Path) -> None:
        storage = tmp_path / "var"
        bad = b"1.2.826.0.1.3680043.8.498.599\n"
        ds = make_nm(rows=16, cols=16, seed="bad-on-disk", study_uid=PLACEHOLDER)
        folder = storage / "spool" / bad.decode() / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True)
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        path.write_bytes(path.read_bytes().replace(PLACEHOLDER.encode(), bad))
        good = make_nm(rows=16, cols=16, seed="good-on-disk")
        gfolder = storage / "spool" / str(good.StudyInstanceUID) / str(good.SeriesInstanceUID)
        gfolder.mkdir(parents=True)
        good.save_as(gfolder / f"{good.SOPInstanceUID}.dcm", enforce_file_format=True)
        store = JobStore.open(storage)
        try:
            before = (
                metrics.REGISTRY.get_sample_value(
                    "dicom_node_spool_quarantined_total", {"reason": "invalid_uid"}
                )
                or 0.0
            )
            assert reconcile_spool(store, storage, "spool") == 1
            assert store.known_instance_uids() == {str(good.SOPInstanceUID)}
            assert len(list((storage / QUARANTINE_DIR).iterdir())) == 1
            after = metrics.REGISTRY.get_sample_value(
                "dicom_node_spool_quarantined_total", {"reason": "invalid_uid"}
            )
            assert after == before + 1
        finally:
            store.close()


def _rle_bomb(seed: str) -> Dataset:
    """An RLE instance declaring 40 frames of 16384x16384 16-bit (21 GB decoded), a few bytes."""
    ds = make_nm(rows=16, cols=16, seed=seed)
    ds.Rows = ds.Columns = 16384
    ds.NumberOfFrames = 40
    ds.PixelData = encapsulate([b"\x00" * 64] * 40)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


class TestPixelBombs:
    def test_rle_declaring_40_frames_of_16384_squared_is_refused_before_writing(
        self, start_node: Callable[..., Node]
    ) -> None:
        node = start_node()
        before = rejected("pixel_budget")
        assert send(node.scp.port, [_rle_bomb("rle-bomb")], RLELossless) == [STATUS_PIXEL_BUDGET]
        assert rejected("pixel_budget") == before + 1
        assert node.spool_entries() == [] and node.store.known_instance_uids() == frozenset()

    def test_uncompressed_geometry_over_max_pixels_is_refused(
        self, start_node: Callable[..., Node]
    ) -> None:
        node = start_node(max_pixels="1MiB")
        ds = make_nm(rows=512, cols=512, seed="over-budget")  # 512 KiB per frame, 16-bit
        ds.NumberOfFrames = 4
        ds.PixelData = ds.PixelData * 4
        ok = make_nm(rows=256, cols=256, seed="in-budget")
        assert send(node.scp.port, [ds, ok]) == [STATUS_PIXEL_BUDGET, STATUS_SUCCESS]

    def test_deflate_bomb_is_refused(self, start_node: Callable[..., Node]) -> None:
        node = start_node(max_pixels="1MiB")
        ds = make_nm(rows=16, cols=16, seed="deflate-bomb")
        # the header says 512 bytes of pixels; the value inflates to 200 MB of zeros
        body = _explicit_le(ds, without_pixels=True) + _ob_element(0x7FE00010, 200_000_000)
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = packer.compress(body) + packer.flush()
        assert len(deflated) < 1_000_000
        before = rejected("inflate_limit")
        statuses = send_raw(node.scp.port, ds, deflated, DeflatedExplicitVRLittleEndian)
        assert statuses == [STATUS_PIXEL_BUDGET]
        assert rejected("inflate_limit") == before + 1
        assert node.spool_entries() == []


def _explicit_le(ds: Dataset, without_pixels: bool = False) -> bytes:
    copy = Dataset()
    for elem in ds:
        if not (without_pixels and elem.tag == 0x7FE00010):
            copy.add(elem)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, copy)
    return fp.getvalue()


def _ob_element(tag: int, length: int) -> bytes:
    return struct.pack("<HH2s2xL", tag >> 16, tag & 0xFFFF, b"OB", length) + b"\x00" * length


def send_raw(port: int, ds: Dataset, body: bytes, ts: str) -> list[int]:
    """Send ``body``, already encoded in ``ts``, as the data set of ``ds``'s C-STORE."""
    with tempfile.TemporaryDirectory() as folder:
        head = Path(folder) / "head.dcm"
        meta_only = Dataset()
        meta_only.file_meta = ds.file_meta
        meta_only.file_meta.TransferSyntaxUID = UID(ts)
        meta_only.save_as(head, enforce_file_format=True)
        raw = head.read_bytes()
        (length,) = struct.unpack_from("<L", raw, 140)
        path = Path(folder) / "raw.dcm"
        path.write_bytes(raw[: 144 + length] + body)
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            return send(port, [path], ts)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous


class TestIdentityConflicts:
    def test_series_uid_of_another_study_and_sop_uid_of_another_patient(
        self, start_node: Callable[..., Node]
    ) -> None:
        node = start_node()
        a = make_nm(rows=32, cols=32, seed="patient-a", PatientID="A", PatientName="DOE^ANNA")
        b = make_nm(
            rows=32,
            cols=32,
            seed="patient-b",
            series_uid=str(a.SeriesInstanceUID),  # the collision
            PatientID="B",
            PatientName="ROE^BEN",
        )
        resend = make_nm(rows=32, cols=32, seed="patient-a", PatientID="B", PatientName="ROE^BEN")
        assert resend.SOPInstanceUID == a.SOPInstanceUID
        before = rejected("identity_conflict")
        assert send(node.scp.port, [a, b, resend]) == [
            STATUS_SUCCESS,
            STATUS_IDENTITY_CONFLICT,
            STATUS_IDENTITY_CONFLICT,
        ]
        assert rejected("identity_conflict") == before + 2
        assert node.store.known_instance_uids() == {str(a.SOPInstanceUID)}
        files = [p for p in node.spool_entries() if p.suffix == ".dcm"]
        assert [p.parent.parent.name for p in files] == [str(a.StudyInstanceUID)], "B's removed"
