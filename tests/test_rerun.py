"""``dicom-node rerun``: a stored study processed again, through a running node to DCMTK storescp.

Another version gives a second SEG with new UIDs beside the first; the same version gives the
same UIDs again (the PACS replaces the object); the refusals name their reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner
from sqlalchemy import insert, update

from dicom_node.cli import main
from dicom_node.jobs import Job, schema
from dicom_node.jobs.states import JobState, TransitionError
from dicom_node.jobs.store import JobStore
from tests.conftest import config_file, make_config
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import StoreSCP, storescu
from tests.helpers.waiting import wait_until


def _seg(path: Path) -> tuple[str, str, str]:
    """(SeriesInstanceUID, SOPInstanceUID, algorithm version) of a received SEG."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    return str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(algo.AlgorithmVersion)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


class TestRerun:
    def test_other_version_beside_same_version_replaces_and_refusals(
        self, tmp_path: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        models = make_store(tmp_path / "models", versions=["1", "2"], production="1")
        # +uf: unique file names, so a SEG sent again with the same UIDs is a new file here
        with StoreSCP(extra_args=["+uf"]) as pacs:
            config = make_config(tmp_path, models, rules_dir, pacs.port)
            node = node_factory(config)
            conf = str(config_file(config, tmp_path / "node.yaml"))
            files = write_series([make_nm(rows=64, cols=64, seed=41)], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0

            def finished(n_files: int, version: str) -> Job:
                def check() -> Job | None:
                    jobs = node.store.list_jobs()
                    job = jobs[0] if jobs else None
                    if job is None or job.state is not JobState.DONE:
                        return None
                    if job.model_version != version or len(pacs.received()) < n_files:
                        return None
                    return job

                return wait_until(check, what=f"SEG {n_files} from version {version}")

            job = finished(1, "1")
            first = _seg(pacs.received()[0])
            assert first[2] == "1"

            done = _cli("rerun", str(job.id), "--version", "2", "--config", conf)
            assert done.exit_code == 0, done.output
            assert f"job {job.id} queued: re-run with thyroid-seg:2 (was thyroid-seg:1)" in (
                done.output
            )
            finished(2, "2")
            second = [_seg(p) for p in pacs.received() if _seg(p) != first]
            assert len(second) == 1 and second[0][2] == "2"
            assert second[0][0] != first[0] and second[0][1] != first[1]  # beside, not instead

            # the same version again: the same UIDs, so the PACS replaces its object
            done = _cli("rerun", "--series", job.series_uid, "--version", "2", "--config", conf)
            assert done.exit_code == 0, done.output
            finished(3, "2")
            assert sorted(_seg(p) for p in pacs.received()) == sorted([first, *second, *second])

            # no --version: the rule's alias again (production is 1): version 1's UIDs
            done = _cli("rerun", str(job.id), "--config", conf)
            assert done.exit_code == 0, done.output
            finished(4, "1")
            assert sorted(_seg(p) for p in pacs.received()).count(first) == 2
            audit = (config.storage / "audit.log").read_text()
            assert audit.count('"rerun"') == 3

            # refusals, each with its reason; nothing is queued
            bad = _cli("rerun", str(job.id), "--version", "9", "--config", conf)
            assert bad.exit_code == 1
            assert "cannot re-run with thyroid-seg:9" in bad.output
            assert "versions of thyroid-seg: 1, 2" in bad.output
            missing = _cli("rerun", "999", "--config", conf)
            assert missing.exit_code == 1 and "no job with id 999" in missing.output
            both = _cli("rerun", str(job.id), "--series", job.series_uid, "--config", conf)
            assert both.exit_code == 2 and "give a JOB_ID or --series UID" in both.output
            for row in node.store.series_instances(job.series_uid):
                (config.storage / row.path).unlink()
            gone = _cli("rerun", str(job.id), "--config", conf)
            assert gone.exit_code == 1
            assert "the instances of this series are gone (1 of 1 missing" in gone.output
            assert "resend the study from the PACS" in gone.output
            assert node.store.get(job.id).state is JobState.DONE


class TestRerunTransition:
    @pytest.mark.parametrize(
        "state", [s for s in JobState if s not in (JobState.DONE, JobState.FAILED)]
    )
    def test_only_finished_jobs(self, tmp_path: Path, state: JobState) -> None:
        store = JobStore.open(tmp_path)
        try:
            job_id = _seed(store, state)
            with pytest.raises(TransitionError, match=f"job {job_id} is {state.value}: only done"):
                store.rerun(job_id, "m", "2")
            assert store.get(job_id).state is state
        finally:
            store.close()

    def test_failed_job_pinned_then_unpinned(self, tmp_path: Path) -> None:
        store = JobStore.open(tmp_path)
        try:
            job_id = _seed(store, JobState.FAILED, model_name="m", model_version="1", error="x")
            job = store.rerun(job_id, "m", "2")
            assert job.state is JobState.QUEUED and job.model_version == "2" and job.error is None
            assert job.outcome == "re-run with m:2 (was m:1)"
            with store.engine.begin() as conn:  # as if it ran and ended
                conn.execute(
                    update(schema.jobs).where(schema.jobs.c.id == job_id).values(state="done")
                )
            job = store.rerun(job_id, "m", None)
            assert job.model_version is None  # the worker resolves m@production again
            assert job.outcome == "re-run with m@production (re-resolved) (was m:2)"
        finally:
            store.close()


def _seed(store: JobStore, state: JobState, **values: object) -> int:
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
