"""The C-STORE hot path of the job store (jobs/ingest.py): identity checks (issue 10 item 1).

A series is (StudyInstanceUID, SeriesInstanceUID), a study has one patient, an instance one
series: anything that contradicts what the store holds raises IdentityConflict, writes nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, insert, select

from dicom_node.jobs import IdentityConflict, Instance, JobStore, schema
from dicom_node.jobs.records import patient_key

STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.20"
SERIES_X = "1.2.826.0.1.3680043.8.498.11"


def inst(
    sop: str,
    study: str = STUDY_A,
    series: str = SERIES_X,
    patient: tuple[str | None, str | None, str | None] = ("A", "DOE^ANNA", "19700101"),
) -> Instance:
    return Instance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
        study_uid=study,
        series_uid=series,
        modality="NM",
        path=f"spool/{study}/{series}/{sop}.dcm",
        size=10,
        calling_ae="PACS",
        transfer_syntax="1.2.840.10008.1.2.1",
        received_at=time.time(),
        patient_key=patient_key(study, *patient),
    )


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    """The job store on SQLite, then on PostgreSQL (``store_url`` of tests/conftest.py)."""
    s = JobStore.open(tmp_path, store_url)
    yield s
    s.close()


class TestIdentity:
    def test_same_series_uid_under_another_study_is_refused(self, store: JobStore) -> None:
        assert store.record_instance(inst("1.1", patient=("A", "DOE^ANNA", None)))
        with pytest.raises(IdentityConflict, match="series_in_other_study"):
            store.record_instance(inst("1.2", study=STUDY_B, patient=("B", "ROE^BEN", None)))
        assert [i.sop_instance_uid for i in store.series_instances(SERIES_X)] == ["1.1"]
        assert len(store.list_jobs()) == 1

    @pytest.mark.parametrize(
        ("patient", "field"),
        [
            (("B", "DOE^ANNA", "19700101"), "PatientID"),
            (("A", "ROE^BEN", "19700101"), "PatientName"),
            (("A", "DOE^ANNA", "19800101"), "PatientBirthDate"),
        ],
    )
    def test_same_study_uid_with_another_patient_is_refused(
        self, store: JobStore, patient: tuple[str, str, str], field: str
    ) -> None:
        store.record_instance(inst("1.1"))
        store.record_instance(inst("1.2"))  # the fast path holds the study now
        with pytest.raises(IdentityConflict, match=f"study_of_other_patient.*{field}"):
            store.record_instance(inst("1.3", patient=patient))
        other_series = "1.2.826.0.1.3680043.8.498.12"
        with pytest.raises(IdentityConflict, match="study_of_other_patient"):
            store.record_instance(inst("1.4", series=other_series, patient=patient))
        assert store.series_info(SERIES_X).n_instances == 2
        assert store.series_info(other_series) is None

    def test_same_sop_uid_resent_under_another_patient_or_series(self, store: JobStore) -> None:
        store.record_instance(inst("1.1"))
        assert store.record_instance(inst("1.1")) is False  # a plain resend: a duplicate
        with pytest.raises(IdentityConflict, match="study_of_other_patient"):
            store.record_instance(inst("1.1", patient=("B", "ROE^BEN", "19800101")))
        with pytest.raises(IdentityConflict, match="instance_in_other_series"):
            store.record_instance(
                inst("1.1", study=STUDY_B, series="1.9", patient=("B", "ROE^BEN", None))
            )

    def test_absent_attributes_are_no_contradiction_and_fill_in(self, store: JobStore) -> None:
        store.record_instance(inst("1.1", patient=("A", None, None)))
        # same patient, more attributes, name spelled with trailing components and lower case
        assert store.record_instance(inst("1.2", patient=("A", "doe^anna^^", "19700101")))
        assert store.record_instance(inst("1.3", patient=(None, None, None)))
        with pytest.raises(IdentityConflict, match="PatientBirthDate"):
            store.record_instance(inst("1.4", patient=("A", None, "19990101")))

    def test_no_patient_data_in_the_database(self, store: JobStore, tmp_path: Path) -> None:
        store.record_instance(inst("1.1"))
        with store.engine.connect() as conn:  # every value of every table, on either database
            rows = [conn.execute(select(t)).all() for t in schema.metadata.sorted_tables]
        raw = repr(rows).encode()
        if store.engine.dialect.name == "sqlite":  # and the file's bytes, free pages included
            raw += (tmp_path / "jobs.db").read_bytes() + (tmp_path / "jobs.db-wal").read_bytes()
        assert b"1.2.826.0.1.3680043.8.498.10" in raw  # the dump holds the rows
        for value in (b"DOE^ANNA", b"19700101"):
            assert value not in raw


class TestCompatibility:
    def test_a_store_of_the_first_release_gains_patient_identities(
        self, tmp_path: Path, store_url: str
    ) -> None:
        """A store written before ``studies`` existed: its studies get their patient from their
        next instance, and a contradicting one is refused from then on."""
        from tests.helpers import schema_v1

        engine = create_engine(store_url)
        schema_v1.metadata.create_all(engine)  # as the first release wrote it
        with engine.begin() as conn:
            row = inst("1.1").as_row()
            conn.execute(insert(schema_v1.instances).values(row))
            conn.execute(
                insert(schema_v1.series).values(
                    series_uid=SERIES_X,
                    study_uid=STUDY_A,
                    n_instances=1,
                    first_received=row["received_at"],
                    last_received=row["received_at"],
                )
            )
        engine.dispose()
        store = JobStore.open(tmp_path, store_url)
        try:
            assert store.record_instance(inst("1.2"))
            with pytest.raises(IdentityConflict, match="study_of_other_patient"):
                store.record_instance(inst("1.3", patient=("B", "ROE^BEN", None)))
            assert store.series_info(SERIES_X).n_instances == 2
        finally:
            store.close()


class TestConcurrency:
    def test_racing_associations_of_one_new_study_all_succeed_once(self, store: JobStore) -> None:
        """Threads (associations, or receivers on PostgreSQL) recording the first instances of
        one new study and series at once, each instance twice: every instance is recorded once,
        the series has one job, nobody gets an error."""
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []
        recorded: list[bool] = []

        def send(k: int) -> None:
            barrier.wait()
            try:
                for sop in (f"2.{k}", f"2.{(k + 1) % 8}"):
                    recorded.append(store.record_instance(inst(sop)))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert sorted(recorded) == [False] * 8 + [True] * 8
        assert store.series_info(SERIES_X).n_instances == 8
        assert len(store.list_jobs()) == 1


class TestHotPathCost:
    def test_record_instance_stays_fast(self, tmp_path: Path) -> None:
        """Known series, new instances: SQLite's plain-SQL path (bench/RESULTS.md has figures)."""
        store = JobStore.open(tmp_path)
        store.record_instance(inst("1.0"))
        n = 500
        start = time.perf_counter()
        for k in range(1, n + 1):
            store.record_instance(inst(f"1.{k}"))
        per_instance = (time.perf_counter() - start) / n
        store.close()
        assert per_instance < 0.005, f"{per_instance * 1e3:.2f} ms per instance"
