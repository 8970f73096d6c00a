"""The job store: idempotent receipt, the transition table, atomic claims, retry, restart,
typed records, shadow results, and the spool reconciliation."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert

from dicom_node.jobs import (
    TERMINAL,
    TRANSITIONS,
    InstanceRecord,
    Job,
    JobState,
    JobStore,
    Route,
    ShadowResult,
    TransitionError,
    schema,
    states,
    transitions,
)
from dicom_node.jobs.records import Instance


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


ROUTE = Route(rule="r", model_ref="m@production", destinations=("pacs",), complete_instances=1)


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    """The job store on SQLite, then on PostgreSQL (``store_url`` of tests/conftest.py)."""
    s = JobStore.open(tmp_path, store_url)
    yield s
    s.close()


def _seed(store: JobStore, state: JobState, **values: object) -> int:
    """A job row in ``state`` as a test fixture (the API only reaches states by moving)."""
    now = time.time()
    row = {
        "series_uid": f"1.2.9.{now}",
        "study_uid": "1.2.9",
        "kind": "production",
        "state": state.value,
        "rule": "r",
        "model_ref": "m@production",
        "created_at": now,
        "updated_at": now,
        "next_attempt_at": 0.0,
        "attempts": 0,
        "export_attempts": 0,
        **values,
    }
    with store.engine.begin() as conn:
        return int(conn.execute(insert(schema.jobs).values(**row)).inserted_primary_key[0])


def _running(store: JobStore) -> int:
    store.record_instance(_inst("1.1"))
    (job,) = store.jobs_in(JobState.RECEIVED)
    assert store.route(job.id, [ROUTE], "v")
    assert store.queue(job.id, 1)
    claimed = store.claim()
    assert claimed is not None and claimed.id == job.id
    return job.id


class TestReceipt:
    def test_same_instance_twice_is_recorded_once(self, store: JobStore) -> None:
        assert store.record_instance(_inst("1.1")) is True
        assert store.record_instance(_inst("1.1")) is False
        assert store.series_info("1.2.3.4").n_instances == 1
        assert len(store.jobs_in(JobState.RECEIVED)) == 1

    def test_series_gets_one_received_job(self, store: JobStore) -> None:
        for i in range(3):
            store.record_instance(_inst(f"1.{i}"))
        assert store.series_info("1.2.3.4").n_instances == 3
        assert store.counts()["received"] == 1

    def test_late_instance_reopens_finished_job(self, store: JobStore) -> None:
        job_id = _running(store)
        store.exporting(job_id, "results/x.dcm", "1.9")
        store.done(job_id, "sent")
        store.record_instance(_inst("1.2"))
        job = store.get(job_id)
        assert job is not None and job.state is JobState.ROUTED
        assert (job.seg_path, job.delivered, job.outcome) == (None, None, "re-opened: new instance")

    def test_instances_come_back_as_records(self, store: JobStore) -> None:
        store.record_instance(_inst("1.1"))
        (inst,) = store.series_instances("1.2.3.4")
        assert isinstance(inst, Instance) and inst.path == "spool/1.2.3/1.2.3.4/1.1.dcm"
        assert store.known_instance_uids() == {"1.1"}


class TestTransitionTable:
    PAIRS = list(itertools.product(JobState, JobState))

    def test_the_table_covers_every_state(self) -> None:
        assert set(TRANSITIONS) == set(JobState)
        assert TERMINAL == {JobState.DONE, JobState.FAILED, JobState.SKIPPED}
        assert TRANSITIONS[JobState.SKIPPED] == frozenset()

    @pytest.mark.parametrize(("source", "target"), PAIRS, ids=lambda s: s.value)
    def test_every_edge_works_and_every_other_pair_raises(
        self, store: JobStore, source: JobState, target: JobState
    ) -> None:
        job_id = _seed(store, source)
        if target in TRANSITIONS[source]:
            states.check(source, target)
            transitions.transition(store.engine, job_id, target)
            job = store.get(job_id)
            assert job is not None and job.state is target
            return
        with pytest.raises(TransitionError, match=f"no transition '{source}' -> '{target}'"):
            states.check(source, target)
        if source is not target:  # staying put is a lease renewal, not a transition
            with pytest.raises(TransitionError, match="no transition"):
                transitions.move({source: target})
        if states.sources_of(target):
            match = f"job {job_id} is '{source}': it cannot go to '{target}'"
        else:
            match = f"no state may go to '{target}'"
        with pytest.raises(TransitionError, match=match):
            transitions.transition(store.engine, job_id, target)
        job = store.get(job_id)
        assert job is not None and job.state is source, "a refused move changes nothing"

    def test_a_state_nothing_leads_to_is_refused(self, store: JobStore) -> None:
        job_id = _seed(store, JobState.RUNNING)
        with pytest.raises(TransitionError, match="no state may go to 'received'"):
            transitions.transition(store.engine, job_id, JobState.RECEIVED)

    def test_unknown_job_is_a_key_error(self, store: JobStore) -> None:
        with pytest.raises(KeyError, match="no job with id 99"):
            transitions.transition(store.engine, 99, JobState.QUEUED)

    def test_state_is_not_a_plain_field(self, store: JobStore) -> None:
        job_id = _seed(store, JobState.RUNNING)
        with pytest.raises(TypeError, match="`state` changes only through"):
            transitions.set_fields(store.engine, job_id, state="done")
        with pytest.raises(TypeError, match="must be a JobState"):
            states.check("running", JobState.DONE)  # type: ignore[arg-type]

    def test_api_refuses_moves_from_the_wrong_state(self, store: JobStore) -> None:
        job_id = _seed(store, JobState.DONE)
        with pytest.raises(TransitionError, match="is 'done': it cannot go to 'exporting'"):
            store.exporting(job_id, "results/x.dcm", "1.9")
        with pytest.raises(TransitionError, match="is 'done': it cannot go to 'failed'"):
            store.fail(job_id, "late")
        assert store.queue(job_id, 1) is False  # a lost race, not an error
        assert store.skip(job_id, "x", None, "v") is False
        assert store.route(job_id, [ROUTE], "v") is False
        assert store.release(job_id) is False


class TestClaims:
    def _queued(self, store: JobStore, n: int) -> list[int]:
        ids = []
        for i in range(n):
            store.record_instance(_inst(f"1.{i}", series=f"1.2.3.{i}"))
        for job in store.jobs_in(JobState.RECEIVED):
            assert store.route(job.id, [ROUTE], "v")
            assert store.queue(job.id, 1)
            ids.append(job.id)
        return ids

    def test_concurrent_claims_never_share_a_job(self, store: JobStore) -> None:
        ids = self._queued(store, 40)
        got: list[int] = []
        lock = threading.Lock()

        def claimer() -> None:
            while (job := store.claim()) is not None:
                with lock:
                    got.append(job.id)

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
        claimed = store.claim()
        assert claimed is not None
        assert (claimed.state, claimed.export_attempts) == (JobState.EXPORTING, 2)

    def test_restart_requeues_interrupted_jobs(self, store: JobStore) -> None:
        (job_id,) = self._queued(store, 1)
        claimed = store.claim()
        assert claimed is not None and claimed.state is JobState.RUNNING
        assert store.release_running() == 1
        job = store.get(job_id)
        assert job is not None and (job.state, job.lease_until) == (JobState.QUEUED, None)

    def test_routes_beyond_the_first_get_their_own_jobs(self, store: JobStore) -> None:
        store.record_instance(_inst("1.1"))
        (job,) = store.jobs_in(JobState.RECEIVED)
        other = Route(rule="r2", model_ref="m:2", complete_idle=5.0)
        assert store.route(job.id, [ROUTE, other], "v")
        routed = store.jobs_in(JobState.ROUTED)
        assert [(j.rule, j.destinations, j.complete_idle) for j in routed] == [
            ("r", ("pacs",), None),
            ("r2", (), 5.0),
        ]
        pairs = store.routed_with_series()
        assert [(j.id, s.n_instances) for j, s in pairs] == [(j.id, 1) for j in routed]


class TestRetry:
    def test_retry_refuses_unknown_and_unfailed_jobs(self, store: JobStore) -> None:
        with pytest.raises(KeyError, match="no job with id 99"):
            store.retry(99)
        store.record_instance(_inst("1.1"))
        job = store.jobs_in(JobState.RECEIVED)[0]
        with pytest.raises(ValueError, match="only failed jobs can be retried"):
            store.retry(job.id)

    def test_retry_re_exports_when_seg_exists(self, store: JobStore) -> None:
        job_id = _running(store)
        store.exporting(job_id, "results/x.dcm", "1.9")
        store.fail(job_id, "export failed")
        retried = store.retry(job_id)
        assert retried.state is JobState.EXPORTING
        assert retried.outcome == "retried from failed (export failed)"

    def test_retry_re_runs_without_seg(self, store: JobStore) -> None:
        job_id = _running(store)
        store.fail(job_id, "model broke")
        assert store.retry(job_id).state is JobState.QUEUED


class TestRecords:
    def test_job_to_json_keeps_the_column_names(self, store: JobStore) -> None:
        job_id = _running(store)
        store.exporting(job_id, "results/x.dcm", "1.9", details={"frames": 1})
        job = store.get(job_id)
        assert job is not None
        out = json.loads(job.to_json())
        assert set(out) == {c.name for c in schema.jobs.columns}
        assert (out["state"], out["destinations"], out["details"]) == (
            "exporting",
            ["pacs"],
            {"frames": 1},
        )

    def test_records_are_frozen(self, store: JobStore) -> None:
        job = store.get(_running(store))
        assert job is not None
        with pytest.raises(AttributeError):
            job.state = JobState.DONE  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"id": 0}, ValueError, "`id` must be >= 1, not 0"),
            ({"id": True}, TypeError, "`id` must be an int"),
            ({"state": "done"}, TypeError, "`state` must be a JobState, not 'done'"),
            ({"kind": "shadow"}, ValueError, "`kind` must be one of"),
            ({"attempts": -1}, ValueError, "`attempts` must be >= 0"),
            ({"series_uid": ""}, ValueError, "`series_uid` must be a non-empty str"),
            ({"destinations": ["pacs"]}, TypeError, "`destinations` must be a tuple"),
            ({"created_at": float("nan")}, ValueError, "`created_at` must be a finite number"),
        ],
    )
    def test_job_rejects_invalid_values(
        self, store: JobStore, change: dict[str, object], error: type[Exception], match: str
    ) -> None:
        job = store.get(_running(store))
        assert job is not None
        values = {name: getattr(job, name) for name in Job.__dataclass_fields__}
        with pytest.raises(error, match=match):
            Job(**{**values, **change})  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("change", "error", "match"),
        [
            ({"sop_instance_uid": ""}, ValueError, "`sop_instance_uid` must be a non-empty"),
            ({"series_uid": None}, TypeError, "`series_uid` must be a non-empty str"),
            ({"path": "/abs/x.dcm"}, ValueError, "`path` must be relative to storage"),
            ({"size": -1}, ValueError, "`size` must be >= 0"),
            ({"received_at": "now"}, TypeError, "`received_at` must be a number"),
        ],
    )
    def test_instance_rejects_invalid_values(
        self, change: dict[str, object], error: type[Exception], match: str
    ) -> None:
        values = _inst("1.1").as_row()
        with pytest.raises(error, match=match):
            InstanceRecord(**{**values, **change})  # type: ignore[arg-type]

    def test_route_and_shadow_result_reject_invalid_values(self) -> None:
        with pytest.raises(ValueError, match="`rule` must be a non-empty str"):
            Route(rule="", model_ref="m@production")
        with pytest.raises(ValueError, match="`complete_instances` must be >= 1"):
            Route(rule="r", model_ref="m@production", complete_instances=0)
        with pytest.raises(ValueError, match=r"`agreement\['thyroid'\]` must be a number in"):
            ShadowResult(1, 1, "m", "2", "1", {"thyroid": 1.5}, 0.0)
        with pytest.raises(ValueError, match="`job_id` must be >= 1"):
            ShadowResult(1, 0, "m", "2", "1", {"thyroid": 0.5}, 0.0)


class TestShadowResults:
    def test_shadow_results_are_not_jobs(self, store: JobStore) -> None:
        job_id = _running(store)
        before = (store.counts(), [j.id for j in store.list_jobs()])
        store.add_shadow_result(job_id, "m", "2", {"thyroid": 0.9}, production_version="1")
        assert (store.counts(), [j.id for j in store.list_jobs()]) == before
        (run,) = store.shadow_results()
        assert (run.job_id, run.model, run.version, run.production_version) == (
            job_id,
            "m",
            "2",
            "1",
        )
        assert dict(run.agreement) == {"thyroid": 0.9}

    def test_a_rebuilt_job_replaces_its_shadow_result(self, store: JobStore) -> None:
        job_id = _running(store)
        store.add_shadow_result(job_id, "m", "2", {"thyroid": 0.5})
        store.add_shadow_result(job_id, "m", "3", {"thyroid": 0.7})
        store.add_shadow_result(job_id, "other", "1", {"thyroid": 0.1})
        assert [(r.model, r.version) for r in store.shadow_results(model="m")] == [("m", "3")]
        assert len(store.shadow_results()) == 2

    def test_bad_agreement_is_refused_before_writing(self, store: JobStore) -> None:
        job_id = _running(store)
        with pytest.raises(ValueError, match="must be a number in"):
            store.add_shadow_result(job_id, "m", "2", {"thyroid": -0.1})
        assert store.shadow_results() == []

    # shadow runs of the first release (kind = 'shadow' jobs): tests/test_migrations.py


class TestReconcile:
    def test_spooled_instance_without_row_is_recovered(
        self, tmp_path: Path, store_url: str
    ) -> None:
        from dicom_node.jobs.reconcile import reconcile_spool
        from tests.helpers.dicom_factory import make_nm

        ds = make_nm(rows=32, cols=32, seed="reconcile")
        folder = tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        (folder / f".tmp-{ds.SOPInstanceUID}.123").write_bytes(b"half written")
        store = JobStore.open(tmp_path, store_url)
        try:
            assert reconcile_spool(store, tmp_path, "spool") == 1
            assert reconcile_spool(store, tmp_path, "spool") == 0
            (job,) = store.jobs_in(JobState.RECEIVED)
            assert job.series_uid == ds.SeriesInstanceUID
            row = store.series_instances(ds.SeriesInstanceUID)[0]
            assert (
                row.path == f"spool/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/"
                f"{ds.SOPInstanceUID}.dcm"
            )
            assert row.modality == "NM"
        finally:
            store.close()

    def test_reconcile_uses_only_the_store_api(self, tmp_path: Path) -> None:
        from dicom_node.jobs.reconcile import reconcile_spool
        from tests.helpers.dicom_factory import make_nm

        known, unknown = make_nm(seed="known"), make_nm(seed="unknown")
        for ds in (known, unknown):
            folder = tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)

        class ApiOnly:
            """Only the two methods reconciliation may use: no engine, no tables."""

            def __init__(self) -> None:
                self.recorded: list[InstanceRecord] = []

            def known_instance_uids(self) -> frozenset[str]:
                return frozenset({str(known.SOPInstanceUID)})

            def record_instance(self, inst: InstanceRecord) -> bool:
                self.recorded.append(inst)
                return True

        api = ApiOnly()
        assert reconcile_spool(api, tmp_path, "spool") == 1  # type: ignore[arg-type]
        assert [r.sop_instance_uid for r in api.recorded] == [str(unknown.SOPInstanceUID)]
        assert not hasattr(JobStore, "iter_all")
