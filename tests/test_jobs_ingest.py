"""The C-STORE hot path of the job store (jobs/ingest.py): identity checks (issue 10 item 1).

A series is (StudyInstanceUID, SeriesInstanceUID), a study has one patient, an instance one
series: anything that contradicts what the store holds raises IdentityConflict, writes nothing.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from dicom_node.jobs import IdentityConflict, Instance, JobStore
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
def store(tmp_path: Path) -> JobStore:
    s = JobStore.open(tmp_path)
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
        raw = (tmp_path / "jobs.db").read_bytes() + (tmp_path / "jobs.db-wal").read_bytes()
        for value in (b"DOE^ANNA", b"19700101"):
            assert value not in raw


class TestCompatibility:
    def test_a_store_without_the_studies_table_opens_and_gains_it(self, tmp_path: Path) -> None:
        store = JobStore.open(tmp_path)
        store.record_instance(inst("1.1"))
        store.close()
        with sqlite3.connect(tmp_path / "jobs.db") as db:  # as written before identities
            db.execute("DROP TABLE studies")
        store = JobStore.open(tmp_path)
        try:
            assert store.record_instance(inst("1.2"))
            with pytest.raises(IdentityConflict, match="study_of_other_patient"):
                store.record_instance(inst("1.3", patient=("B", "ROE^BEN", None)))
        finally:
            store.close()


class TestHotPathCost:
    def test_record_instance_stays_fast(self, store: JobStore) -> None:
        """Known series, new instances: the plain-SQL path (see bench/RESULTS.md for figures)."""
        store.record_instance(inst("1.0"))
        n = 500
        start = time.perf_counter()
        for k in range(1, n + 1):
            store.record_instance(inst(f"1.{k}"))
        per_instance = (time.perf_counter() - start) / n
        assert per_instance < 0.005, f"{per_instance * 1e3:.2f} ms per instance"
