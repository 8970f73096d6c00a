"""The job store: idempotent receipt, state machine, atomic claims, retry, restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicom_node.jobs.records import InstanceRecord
from dicom_node.jobs.store import JobState, JobStore


def _inst(sop: str, series: str = "1.2.3.4", study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop,
        "1.2.840.10008.5.1.4.1.1.20",
        study,
        series,
        "NM",
        f"spool/{study}/{series}/{sop}.dcm",
        100,
        "SCU",
        "1.2.840.10008.1.2.1",
        time.time(),
    )


ROUTE = {
    "rule": "r",
    "model_ref": "m@production",
    "destinations": ["pacs"],
    "complete_instances": 1,
    "complete_idle": None,
}


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    s = JobStore.open(tmp_path)
    yield s
    s.close()


class TestReceipt:
    def test_same_instance_twice_is_recorded_once(self, store: JobStore) -> None:
        assert store.record_instance(_inst("1.1")) is True
        assert store.record_instance(_inst("1.1")) is False
        assert store.series_info("1.2.3.4")["n_instances"] == 1
        assert len(store.jobs_in(JobState.RECEIVED)) == 1

    def test_series_gets_one_received_job(self, store: JobStore) -> None:
        for i in range(3):
            store.record_instance(_inst(f"1.{i}"))
        assert store.series_info("1.2.3.4")["n_instances"] == 3
        assert store.counts()["received"] == 1

    def test_late_instance_reopens_finished_job(self, store: JobStore) -> None:
        store.record_instance(_inst("1.1"))
        job = store.jobs_in(JobState.RECEIVED)[0]
        store.route(job["id"], [ROUTE], "v")
        store.queue(job["id"], 1)
        store.claim()
        store.done(job["id"], "sent")
        store.record_instance(_inst("1.2"))
        assert store.get(job["id"])["state"] == "routed"


class TestClaims:
    def _queued(self, store: JobStore, n: int) -> list[int]:
        ids = []
        for i in range(n):
            store.record_instance(_inst(f"1.{i}", series=f"1.2.3.{i}"))
        for job in store.jobs_in(JobState.RECEIVED):
            store.route(job["id"], [ROUTE], "v")
            assert store.queue(job["id"], 1)
            ids.append(job["id"])
        return ids

    def test_concurrent_claims_never_share_a_job(self, store: JobStore) -> None:
        ids = self._queued(store, 40)
        got: list[int] = []
        lock = threading.Lock()

        def claimer() -> None:
            while (job := store.claim()) is not None:
                with lock:
                    got.append(job["id"])

        threads = [threading.Thread(target=claimer) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == sorted(ids)

    def test_export_retry_waits_for_its_time(self, store: JobStore) -> None:
        (job_id,) = self._queued(store, 1)
        store.claim()
        store.exporting(job_id, "results/x.dcm", "1.9")
        store.export_retry(job_id, delay=60, error="down")
        assert store.claim() is None
        store.export_retry(job_id, delay=0, error="down")
        assert store.claim()["export_attempts"] == 2

    def test_restart_requeues_interrupted_jobs(self, store: JobStore) -> None:
        (job_id,) = self._queued(store, 1)
        assert store.claim()["state"] == "running"
        assert store.release_running() == 1
        assert store.get(job_id)["state"] == "queued"


class TestRetry:
    def test_retry_refuses_unknown_and_unfailed_jobs(self, store: JobStore) -> None:
        with pytest.raises(KeyError, match="no job with id 99"):
            store.retry(99)
        store.record_instance(_inst("1.1"))
        job = store.jobs_in(JobState.RECEIVED)[0]
        with pytest.raises(ValueError, match="only failed jobs can be retried"):
            store.retry(job["id"])

    def test_retry_re_exports_when_seg_exists(self, store: JobStore) -> None:
        store.record_instance(_inst("1.1"))
        job = store.jobs_in(JobState.RECEIVED)[0]
        store.route(job["id"], [ROUTE], "v")
        store.queue(job["id"], 1)
        store.claim()
        store.exporting(job["id"], "results/x.dcm", "1.9")
        store.fail(job["id"], "export failed")
        assert store.retry(job["id"])["state"] == "exporting"


class TestReconcile:
    def test_spooled_instance_without_row_is_recovered(self, tmp_path: Path) -> None:
        from dicom_node.jobs.reconcile import reconcile_spool
        from tests.helpers.dicom_factory import make_nm

        ds = make_nm(rows=32, cols=32, seed="reconcile")
        folder = tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        (folder / f".tmp-{ds.SOPInstanceUID}.123").write_bytes(b"half written")
        store = JobStore.open(tmp_path)
        try:
            assert reconcile_spool(store, tmp_path) == 1
            assert reconcile_spool(store, tmp_path) == 0
            (job,) = store.jobs_in(JobState.RECEIVED)
            assert job["series_uid"] == ds.SeriesInstanceUID
            row = store.series_instances(ds.SeriesInstanceUID)[0]
            assert (
                row["path"] == f"spool/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
                f"{ds.SOPInstanceUID}.dcm"
            )
            assert row["modality"] == "NM"
        finally:
            store.close()
