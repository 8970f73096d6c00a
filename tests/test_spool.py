"""The spool: durable, once-only storage of received bytes under relative paths."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from dicom_node import metrics
from dicom_node.receive.spool import InvalidUID, Spool, validate_uid

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"


class TestValidateUid:
    @pytest.mark.parametrize("uid", ["1", "1.2.3", "1.2.840.10008.5.1.4.1.1.20", "9" * 64])
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
