"""The spool: durable, once-only storage of received bytes under relative paths."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from dicom_node import metrics
from dicom_node.receive.spool import (
    INCOMING_DIR,
    PREPARED_TARGET,
    InvalidUID,
    Spool,
    validate_uid,
)
from tests.helpers.waiting import wait_until

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"


class TestValidateUid:
    @pytest.mark.parametrize(
        "uid", ["1", "1.2.3", "1.2.840.10008.5.1.4.1.1.20", "9" * 64, "0.1.0.3", "2.25.0"]
    )
    def test_accepts_uids(self, uid: str) -> None:
        assert validate_uid(uid) == (True, "")

    @pytest.mark.parametrize(
        ("uid", "reason"),
        [
            ("", "empty"),
            ("1." + "2" * 63, "at most 64"),
            ("../../etc/passwd", "digits separated"),
            ("1.2/3", "digits separated"),
            ("1..2", "digits separated"),
            (".1.2", "digits separated"),
            ("1.2.", "digits separated"),
            ("1.2a", "digits separated"),
            ("1.2.3\n", "digits separated"),
            ("1.2.3 ", "digits separated"),
            ("1.2\\../../../x", "one value"),
            ("1.02.3", "leading zero"),
            ("01.2", "leading zero"),
            (None, "must be a str"),
        ],
    )
    def test_refuses_unsafe_or_malformed(self, uid: object, reason: str) -> None:
        ok, why = validate_uid(uid)
        assert not ok
        assert reason in why


class TestSpool:
    def test_store_writes_bytes_under_relative_path(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        stored = spool.store(STUDY, SERIES, SOP, [b"abc", bytearray(b"def"), memoryview(b"g")])
        assert stored.path == f"spool/{STUDY}/{SERIES}/{SOP}.dcm"
        assert stored.created
        assert stored.size == 7
        assert (tmp_path / stored.path).read_bytes() == b"abcdefg"
        assert spool.absolute(stored.path) == tmp_path / stored.path
        assert spool.exists(STUDY, SERIES, SOP)
        assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))

    def test_duplicate_is_stored_once_and_first_bytes_kept(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        first = spool.store(STUDY, SERIES, SOP, [b"first"])
        again = spool.store(STUDY, SERIES, SOP, [b"second version"])
        assert first.created and not again.created
        assert again.path == first.path and again.size == 5
        assert (tmp_path / first.path).read_bytes() == b"first"
        assert spool.bytes_used() == 5

    def test_one_flush_mode_stores_and_repairs_a_short_copy(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path, fsync_directory=False)
        first = spool.store(STUDY, SERIES, SOP, [b"complete file"])
        assert first.created
        (tmp_path / first.path).write_bytes(b"compl")  # what a crash before fsync can leave
        again = spool.store(STUDY, SERIES, SOP, [b"complete file"])
        assert not again.created and again.size == 13
        assert (tmp_path / first.path).read_bytes() == b"complete file"
        same = spool.store(STUDY, SERIES, SOP, [b"complete file"])
        assert not same.created

    def test_concurrent_stores_of_one_instance_create_it_once(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        results = []
        barrier = threading.Barrier(8)

        def worker(i: int) -> None:
            barrier.wait()
            results.append(spool.store(STUDY, SERIES, SOP, [f"copy {i}".encode()]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(r.created for r in results) == 1
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1
        assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))

    @pytest.mark.parametrize(
        ("study", "series", "sop", "match"),
        [
            ("../x", SERIES, SOP, "StudyInstanceUID '../x' is not usable"),
            (STUDY, "1.2/3", SOP, "SeriesInstanceUID '1.2/3' is not usable"),
            (STUDY, SERIES, "", "SOPInstanceUID '' is not usable: UID is empty"),
        ],
    )
    def test_invalid_uid_never_becomes_a_path(
        self, tmp_path: Path, study: str, series: str, sop: str, match: str
    ) -> None:
        spool = Spool(tmp_path)
        with pytest.raises(InvalidUID, match=match):
            spool.store(study, series, sop, [b"x"])
        assert list((tmp_path / "spool").iterdir()) == []

    def test_bytes_used_survives_restart_and_leftover_temp_files_go(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        spool.store(STUDY, SERIES, SOP, [b"12345"])
        spool.store(STUDY, SERIES, "1.2.3.4", [b"123"])
        leftover = tmp_path / "spool" / STUDY / SERIES / ".tmp-9.9.123"
        leftover.write_bytes(b"half written")
        restarted = Spool(tmp_path)
        assert restarted.bytes_used() == 8
        assert not leftover.exists()
        assert metrics.REGISTRY.get_sample_value("dicom_node_spool_bytes") == 8

    def test_remove_forgets_bytes(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        stored = spool.store(STUDY, SERIES, SOP, [b"12345"])
        spool.remove(stored.path)
        spool.remove(stored.path)  # already gone: fine
        assert spool.bytes_used() == 0
        assert not (tmp_path / stored.path).exists()

    def test_store_after_series_folder_was_cleaned_up(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path)
        spool.store(STUDY, SERIES, SOP, [b"a"])
        shutil.rmtree(tmp_path / "spool" / STUDY)
        stored = spool.store(STUDY, SERIES, "1.2.3.4", [b"b"])
        assert (tmp_path / stored.path).read_bytes() == b"b"

    def test_free_bytes_reports_the_file_system(self, tmp_path: Path) -> None:
        free = Spool(tmp_path).free_bytes()
        assert abs(free - shutil.disk_usage(tmp_path).free) < 2**30


class TestPreparedFiles:
    """``prepare_ahead``: temporary files created off the C-STORE path, in ``spool/.incoming``."""

    @staticmethod
    def incoming(root: Path) -> list[Path]:
        folder = root / "spool" / INCOMING_DIR
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def ready(self, root: Path, spool: Spool | None = None) -> list[Path]:
        wait_until(
            lambda: (
                len(self.incoming(root)) >= PREPARED_TARGET
                and (spool is None or spool.prepared_files() >= PREPARED_TARGET)
            ),
            timeout=10,
            what=f"{PREPARED_TARGET} prepared files",
        )
        return self.incoming(root)

    def test_a_store_takes_a_prepared_file_and_its_bytes_are_identical(
        self, tmp_path: Path
    ) -> None:
        spool = Spool(tmp_path, prepare_ahead=True)
        first = spool.store(STUDY, SERIES, SOP, [b"first ", b"instance"])  # none prepared yet
        prepared = {p.stat().st_ino for p in self.ready(tmp_path, spool)}
        assert all(p.name.startswith(".tmp-") for p in self.incoming(tmp_path))
        payload = [b"\x00" * 128, b"DICM", bytes(range(256)) * 40]
        second = spool.store(STUDY, SERIES, "1.2.3.4", payload)
        final = tmp_path / second.path
        assert second.created and second.size == sum(len(p) for p in payload)
        assert final.read_bytes() == b"".join(payload)
        assert final.stat().st_ino in prepared  # written into a file created ahead of time
        assert (tmp_path / first.path).read_bytes() == b"first instance"
        assert spool.bytes_used() == first.size + second.size
        # the staging name goes away on the background thread, the instance stays
        spool.store(STUDY, SERIES, "1.2.3.5", [b"third"])
        wait_until(lambda: final.stat().st_nlink == 1, timeout=10, what="staging name removed")
        assert final.read_bytes() == b"".join(payload)
        assert sorted(p.name for p in (tmp_path / "spool").rglob("*.dcm")) == [
            "1.2.3.4.dcm",
            "1.2.3.5.dcm",
            f"{SOP}.dcm",
        ]

    def test_prepared_files_reserve_the_last_size_and_a_smaller_store_gives_it_back(
        self, tmp_path: Path
    ) -> None:
        """Blocks for the next instance are reserved off the C-STORE path (its flush then
        allocates nothing); an instance smaller than the reservation keeps only its own."""
        spool = Spool(tmp_path, prepare_ahead=True)
        if not spool.preallocate:
            pytest.skip("no fallocate on this platform")
        big = 512 * 1024
        spool.store(STUDY, SERIES, SOP, [b"\x01" * big])  # none prepared yet: sets the size
        spool.prepare()
        wait_until(
            lambda: any(p.stat().st_blocks * 512 >= big for p in self.incoming(tmp_path)),
            timeout=10,
            what="a prepared file with the last instance's blocks reserved",
        )
        assert all(p.stat().st_size == 0 for p in self.incoming(tmp_path))  # size unchanged
        small = spool.store(STUDY, SERIES, "1.2.3.4", [b"\x02" * 4096])
        final = tmp_path / small.path
        assert final.read_bytes() == b"\x02" * 4096
        assert final.stat().st_blocks * 512 < big  # the unused reservation was given back
        spool.close()

    def test_unused_prepared_files_are_removed_at_start_up_and_never_counted(
        self, tmp_path: Path
    ) -> None:
        spool = Spool(tmp_path, prepare_ahead=True)
        spool.store(STUDY, SERIES, SOP, [b"12345"])
        self.ready(tmp_path)
        restarted = Spool(tmp_path)
        assert self.incoming(tmp_path) == []
        assert restarted.bytes_used() == 5

    def test_prepared_file_removed_under_it_falls_back_to_its_own_temp_file(
        self, tmp_path: Path
    ) -> None:
        """Another Spool on the same storage starting up removes this one's prepared files."""
        spool = Spool(tmp_path, prepare_ahead=True)
        spool.store(STUDY, SERIES, SOP, [b"a"])
        self.ready(tmp_path)
        Spool(tmp_path)  # its start-up scan removes every .tmp-* file
        stored = spool.store(STUDY, SERIES, "1.2.3.4", [b"after ", b"the clean-up"])
        assert stored.created
        assert (tmp_path / stored.path).read_bytes() == b"after the clean-up"
        assert not list((tmp_path / "spool" / STUDY).rglob(".tmp-*"))


def _instance_bytes(sop: str, series: str = SERIES) -> list[bytes]:
    """File Meta + an Explicit VR Little Endian data set, as the C-STORE handler spools them."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from dicom_node.receive.header import encode_file_meta

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.Modality = "NM"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    meta = encode_file_meta(ds.SOPClassUID, sop, "1.2.840.10008.1.2.1", "PACS")
    return [meta, buf.getvalue()]


class TestOneFlushRecovery:
    """One flush per instance: until the background thread has flushed the final folder, the
    staged file (durable name, checksum attribute) is the record a restart publishes from."""

    @staticmethod
    def unsettled_store(tmp_path: Path, sop: str) -> tuple[Spool, Path, Path, bytes]:
        """Store one instance through a prepared file and stop before the folder flush: the
        state a power cut right after Success leaves (the final name perhaps not on disk)."""
        spool = Spool(tmp_path, prepare_ahead=True)
        spool.store(STUDY, SERIES, SOP, [b"first"])  # starts the preparer
        TestPreparedFiles().ready(tmp_path, spool)
        spool._settle = lambda: None  # type: ignore[method-assign]  # the flush never comes
        payload = _instance_bytes(sop)
        stored = spool.store(STUDY, SERIES, sop, payload)
        final = tmp_path / stored.path
        staged = [
            p
            for p in (tmp_path / "spool" / INCOMING_DIR).iterdir()
            if p.stat().st_ino == final.stat().st_ino
        ]
        assert stored.created and len(staged) == 1
        return spool, final, staged[0], b"".join(payload)

    def test_lost_final_name_is_recovered_from_the_staged_file(self, tmp_path: Path) -> None:
        _spool, final, _staged, data = self.unsettled_store(tmp_path, "1.2.3.10")
        final.unlink()  # the folder's new entry never reached the disk
        restarted = Spool(tmp_path)
        assert final.read_bytes() == data
        assert not list((tmp_path / "spool").rglob(".tmp-*"))
        assert restarted.bytes_used() == len(data) + len(b"first")

    def test_published_staged_file_is_removed_and_the_instance_kept(self, tmp_path: Path) -> None:
        """kill -9 after Success: the final name is there, the staging name is just removed."""
        _spool, final, staged, data = self.unsettled_store(tmp_path, "1.2.3.11")
        Spool(tmp_path)
        assert final.read_bytes() == data and final.stat().st_nlink == 1
        assert not staged.exists()

    def test_torn_staged_file_is_never_published(self, tmp_path: Path) -> None:
        """A crash before the fsync returned (never acknowledged) can leave bytes that do not
        match the checksum: the restart removes them instead of taking them for the instance."""
        _spool, final, staged, data = self.unsettled_store(tmp_path, "1.2.3.12")
        final.unlink()
        with staged.open("r+b") as fh:
            fh.seek(len(data) - 3)
            fh.write(b"\x00\x00\x00")
        Spool(tmp_path)
        assert not final.exists()
        assert not staged.exists()

    def test_young_staged_files_of_another_receiver_are_left_alone(self, tmp_path: Path) -> None:
        _spool, final, staged, _data = self.unsettled_store(tmp_path, "1.2.3.13")
        final.unlink()
        Spool(tmp_path, recover_min_age=120.0)  # a second receiver starting on shared storage
        assert staged.exists() and not final.exists()

    def test_settled_store_leaves_no_staging_name(self, tmp_path: Path) -> None:
        spool = Spool(tmp_path, prepare_ahead=True)
        spool.store(STUDY, SERIES, SOP, [b"first"])
        TestPreparedFiles().ready(tmp_path, spool)
        stored = spool.store(STUDY, "1.2.3.99", "1.2.3.14", _instance_bytes("1.2.3.14", "1.2.3.99"))
        final = tmp_path / stored.path
        spool.prepare()
        wait_until(lambda: final.stat().st_nlink == 1, timeout=10, what="staging name removed")
        assert spool._unsynced_dirs == set()


def test_close_gives_back_every_prepared_descriptor(tmp_path: Path) -> None:
    """A stopped receiver keeps no prepared file open: a process that starts and stops many
    receivers (a test run, a reloading node) must not run out of file descriptors."""
    import os
    import time

    before = len(os.listdir("/proc/self/fd"))
    for i in range(5):
        spool = Spool(tmp_path / f"s{i}", prepare_ahead=True)
        spool.prepare()
        deadline = time.monotonic() + 10
        while spool.prepared_files() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert spool.prepared_files() > 0
        spool.close()
        assert spool.prepared_files() == 0
        assert not any((tmp_path / f"s{i}" / "spool" / ".incoming").iterdir())
    assert len(os.listdir("/proc/self/fd")) <= before + 2
