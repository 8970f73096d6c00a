"""The last export step in one transaction (issue 15): ``done`` records the deliveries with it.

On SQLite and on PostgreSQL (``store_url``). What the separate writes recorded must still be
recorded when the job is no longer this process's (its lease ran out): the next owner then
does not send again what already arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.jobs import JobState, JobStore, Route, TransitionError, transitions
from dicom_node.jobs.records import InstanceRecord, SegResult

ROUTE = Route(rule="r", model_ref="m@production", destinations=("pacs", "archive"))


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    s = JobStore.open(tmp_path, store_url)
    s.owner = "node-a"
    yield s
    s.close()


def _exporting(store: JobStore, results: int = 2) -> int:
    """A job of this store's process with ``results`` SEGs on disk, due for export."""
    store.record_instance(
        InstanceRecord(
            "1.1",
            "1.2.840.10008.5.1.4.1.1.20",
            "1.2.3",
            "1.2.3.4",
            "NM",
            "spool/1.2.3/1.2.3.4/1.1.dcm",
            100,
            "SCU",
            "1.2.840.10008.1.2.1",
            time.time(),
        )
    )
    (job,) = store.jobs_in(JobState.RECEIVED)
    assert store.route(job.id, [ROUTE], "v")
    assert store.queue(job.id, 1)
    claimed = store.claim()
    assert claimed is not None and claimed.owner == "node-a"
    segs = [SegResult(n, f"results/{n}.dcm", f"1.9.{n}") for n in range(results)]
    store.exporting(job.id, segs[0].path, segs[0].sop_uid, results=segs)
    return job.id


def test_done_records_the_last_deliveries_with_the_state(store: JobStore) -> None:
    job_id = _exporting(store)
    state = store.done(
        job_id,
        "2 SEGs sent",
        delivered=["pacs", "archive"],
        result_delivered={0: ["pacs", "archive"], 1: ["pacs", "archive"]},
    )
    job = store.get(job_id)
    assert state is JobState.DONE and job is not None and job.state is JobState.DONE
    assert job.delivered == ("pacs", "archive")
    assert [list(r.delivered) for r in store.results(job_id)] == [["pacs", "archive"]] * 2


def test_deliveries_are_kept_when_the_job_was_taken_back(store: JobStore) -> None:
    job_id = _exporting(store)
    transitions.set_fields(store.engine, job_id, owner="node-b")  # its lease ran out meanwhile
    with pytest.raises(TransitionError, match="no longer held by this process"):
        store.done(job_id, "sent", delivered=["pacs"], result_delivered={1: ["pacs"]})
    job = store.get(job_id)
    assert job is not None and job.state is JobState.EXPORTING  # node-b's to finish
    assert job.delivered == ("pacs",)
    assert [list(r.delivered) for r in store.results(job_id)] == [[], ["pacs"]]


def test_done_without_deliveries_is_unchanged(store: JobStore) -> None:
    job_id = _exporting(store, results=1)
    assert store.done(job_id, "sent") is JobState.DONE
    job = store.get(job_id)
    assert job is not None and job.delivered is None
    with pytest.raises(TransitionError, match="cannot go to 'done'"):
        store.done(job_id, "sent again", delivered=["pacs"])
