"""Disk truth (receive/disk.py): bytes less the incoming data set, inodes, and the job store's own
"disk full" all answer 0xA700; ``/readyz`` reports low disk as its ``disk`` check."""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError

from dicom_node import metrics
from dicom_node.jobs import ingest
from dicom_node.receive import disk
from dicom_node.receive.handler import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    _is_out_of_resources,
)
from tests.conftest import make_config
from tests.helpers.dicom_factory import make_nm

GB = 1_000_000_000


class FakeStatvfs:
    """What ``os.statvfs`` returns, with the free bytes and inodes a test wants."""

    def __init__(self, free_bytes: int, free_inodes: int, total_inodes: int = 10**7) -> None:
        self.f_frsize = 4096
        self.f_bavail = free_bytes // 4096
        self.f_favail = free_inodes
        self.f_files = total_inodes


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set the file system's free space: ``statvfs(free_bytes, free_inodes)``."""

    def set_room(free_bytes: int, free_inodes: int = 10**6, total_inodes: int = 10**7) -> None:
        fake = FakeStatvfs(free_bytes, free_inodes, total_inodes)
        monkeypatch.setattr(disk.os, "statvfs", lambda _path: fake)

    return set_room


class TestShortage:
    def test_room_reads_bytes_and_inodes(self, statvfs: Any) -> None:
        statvfs(8 * 4096, 77)
        assert disk.disk_room("/") == disk.DiskRoom(free_bytes=8 * 4096, free_inodes=77)

    def test_a_file_system_without_an_inode_count_is_not_checked(self, statvfs: Any) -> None:
        statvfs(GB, 0, total_inodes=0)  # btrfs
        room = disk.disk_room("/")
        assert room.free_inodes is None
        assert disk.shortage(room, 1000, 0, 10_000) is None

    def test_the_incoming_data_set_counts(self) -> None:
        room = disk.DiskRoom(free_bytes=5_000_100, free_inodes=10**6)
        assert disk.shortage(room, 100, 5_000_000, 0) is None
        why = disk.shortage(room, 101, 5_000_000, 0)
        assert why == "5.0 MB free, 101 B incoming, min_free_disk is 5.0 MB"

    def test_inodes(self) -> None:
        room = disk.DiskRoom(free_bytes=GB, free_inodes=10_000)
        assert disk.shortage(room, 0, 0, 10_000) is None  # readiness: at the limit is fine
        assert disk.shortage(room, 10, 0, 10_000) == ("10000 inodes free, min_free_inodes is 10000")

    def test_real_file_system(self, tmp_path: Path) -> None:
        room = disk.disk_room(tmp_path)
        st = os.statvfs(tmp_path)
        assert room.free_bytes == st.f_bavail * st.f_frsize


def _full_sqlite_error(tmp_path: Path) -> OperationalError:
    """A real SQLITE_FULL, raised through SQLAlchemy as the job store would raise it."""
    engine = create_engine(f"sqlite:///{tmp_path / 'full.db'}")

    @event.listens_for(engine, "connect")
    def _tiny(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA max_page_count = 2")

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    try:
        with engine.begin() as conn:
            for _ in range(100):
                conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": "y" * 4000})
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the tiny database did not fill up")


class TestOutOfResources:
    def test_sqlite_full_through_sqlalchemy(self, tmp_path: Path) -> None:
        exc = _full_sqlite_error(tmp_path)
        assert isinstance(exc.orig, sqlite3.OperationalError)
        assert _is_out_of_resources(exc)

    def test_other_database_errors_are_not(self) -> None:
        exc = OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
        assert not _is_out_of_resources(exc)
        assert not _is_out_of_resources(RuntimeError("job store down"))


def _store(port: int, ds: Dataset) -> int | None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(NuclearMedicineImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if rsp else None
    finally:
        assoc.release()


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _rejected(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "dicom_node_instances_rejected_total", {"reason": reason}
    )
    return value or 0.0


class TestOnARunningNode:
    @pytest.fixture
    def node(self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any) -> Any:
        config = make_config(
            tmp_path, models_dir, rules_dir, pacs_port=9, min_free_disk=GB, min_free_inodes=1000
        )
        node = node_factory(config)
        code, body = _readyz(config.http_port)
        assert code == 200, body
        assert body["checks"]["disk"]["ok"] is True
        return node

    def test_low_free_bytes_refuse_and_make_the_node_unready(self, node: Any, statvfs: Any) -> None:
        before = _rejected("disk_full")
        statvfs(GB // 2)
        assert _store(node.dicom_port, make_nm(rows=32, cols=32, seed="low")) == (
            STATUS_OUT_OF_RESOURCES
        )
        assert _rejected("disk_full") == before + 1
        assert node.store.list_jobs() == []
        code, body = _readyz(node.http_port)
        assert code == 503
        assert body["checks"]["disk"]["ok"] is False
        assert "low disk" in body["checks"]["disk"]["detail"]
        assert "min_free_disk is 1.0 GB" in body["checks"]["disk"]["detail"]
        statvfs(10 * GB)  # the operator freed space: the PACS's retry succeeds
        assert _store(node.dicom_port, make_nm(rows=32, cols=32, seed="low")) == STATUS_SUCCESS
        assert _readyz(node.http_port)[0] == 200

    def test_the_incoming_data_set_is_counted(self, node: Any, statvfs: Any) -> None:
        ds = make_nm(rows=64, cols=64, seed="incoming")  # ~8 kB of pixels
        statvfs(GB + 4096)  # above the limit now, below it with this data set
        assert _store(node.dicom_port, ds) == STATUS_OUT_OF_RESOURCES
        assert _readyz(node.http_port)[0] == 200  # nothing incoming: still ready
        statvfs(GB + 1_000_000)
        assert _store(node.dicom_port, ds) == STATUS_SUCCESS

    def test_low_inodes_refuse(self, node: Any, statvfs: Any) -> None:
        statvfs(10 * GB, free_inodes=500)
        assert _store(node.dicom_port, make_nm(rows=32, cols=32, seed="inodes")) == (
            STATUS_OUT_OF_RESOURCES
        )
        code, body = _readyz(node.http_port)
        assert code == 503 and "500 inodes free" in body["checks"]["disk"]["detail"]

    def test_job_store_full_answers_out_of_resources(
        self, node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        full = _full_sqlite_error(tmp_path)

        def disk_full(*_args: Any) -> bool:
            raise full

        ds = make_nm(rows=32, cols=32, seed="dbfull")
        before = _rejected("callback_out_of_resources")
        monkeypatch.setattr(ingest, "record_instance", disk_full)
        assert _store(node.dicom_port, ds) == STATUS_OUT_OF_RESOURCES  # not 0xC001
        assert _rejected("callback_out_of_resources") == before + 1
        monkeypatch.undo()
        assert _store(node.dicom_port, ds) == STATUS_SUCCESS
        assert [j.state for j in node.store.list_jobs()] != []

    def test_other_job_store_failures_stay_processing_failures(
        self, node: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(*_args: Any) -> bool:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))

        monkeypatch.setattr(ingest, "record_instance", broken)
        ds = make_nm(rows=32, cols=32, seed="dbbroken")
        assert _store(node.dicom_port, ds) == STATUS_PROCESSING_FAILURE
