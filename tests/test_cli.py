"""The operator's command line: every verb as a subprocess, the way an operator types it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import DICOM_NODE, REPO, config_file, make_config
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.peers import storescu


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DICOM_NODE, *args], cwd=cwd, capture_output=True, text=True, timeout=180
    )


class TestHelp:
    def test_every_fixed_verb_is_there(self) -> None:
        out = run("--help").stdout
        for verb in ("serve", "demo", "jobs", "retry", "status", "rules", "models"):
            assert verb in out
        assert "check" in run("rules", "--help").stdout
        assert "promote" in run("models", "--help").stdout

    def test_bad_config_names_file_and_key(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("port: not-a-number\n")
        result = run("jobs", "--config", str(path))
        assert result.returncode == 1
        assert "node.yaml: port:" in result.stderr


class TestJobsRetryStatus:
    def test_failed_job_listed_and_retried(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: object
    ) -> None:
        config = make_config(tmp_path, models_dir, rules_dir, pacs_port=9, export_retries=0)
        node = node_factory(config)  # type: ignore[operator]
        files = write_series([make_nm(rows=64, cols=64, seed="cli")], tmp_path / "in")
        assert storescu(files, config.port, config.ae_title).returncode == 0
        assert node.wait_idle(30)
        path = config_file(config, tmp_path / "node.yaml")

        listed = run("jobs", "--failed", "--config", str(path))
        assert listed.returncode == 0, listed.stderr
        assert "failed" in listed.stdout and "export failed" in listed.stdout
        (job,) = [
            json.loads(x) for x in run("jobs", "--json", "--config", str(path)).stdout.splitlines()
        ]
        assert job["state"] == "failed"

        status = run("status", "--json", "--config", str(path))
        body = json.loads(status.stdout)
        assert body["jobs"]["failed"] == 1
        assert body["node"]["ready"] is True

        retried = run("retry", str(job["id"]), "--config", str(path))
        assert retried.returncode == 0, retried.stderr
        assert "exporting again" in retried.stdout
        again = run("retry", "12345", "--config", str(path))
        assert again.returncode == 1
        assert "no job with id 12345" in again.stderr

    def test_jobs_without_store_says_so(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("storage: nowhere\n")
        result = run("jobs", "--config", str(path))
        assert result.returncode == 1
        assert "no job store" in result.stderr

    def test_shadow_runs_are_not_listed_as_jobs(self, tmp_path: Path) -> None:
        from dicom_node.jobs import InstanceRecord, JobState, JobStore

        store = JobStore.open(tmp_path / "var")
        try:
            store.record_instance(
                InstanceRecord(
                    sop_instance_uid="1.2.3.4.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                    study_uid="1.2.3",
                    series_uid="1.2.3.4",
                    modality="NM",
                    path="spool/1.2.3/1.2.3.4/1.2.3.4.1.dcm",
                    size=10,
                    calling_ae=None,
                    transfer_syntax=None,
                    received_at=1.0,
                )
            )
            (job,) = store.jobs_in(JobState.RECEIVED)
            store.add_shadow_result(job.id, "thyroid-seg", "2", {"thyroid": 0.95}, "1")
        finally:
            store.close()
        path = tmp_path / "node.yaml"
        path.write_text(f"storage: {tmp_path / 'var'}\n")
        listed = [
            json.loads(x) for x in run("jobs", "--json", "--config", str(path)).stdout.splitlines()
        ]
        assert [(j["id"], j["state"], j["kind"]) for j in listed] == [
            (job.id, "received", "production")
        ]
        with_shadow = run("jobs", "--json", "--shadow", "--config", str(path)).stdout.splitlines()
        shadow = json.loads(with_shadow[-1])
        assert (len(with_shadow), shadow["kind"], shadow["job_id"]) == (2, "shadow", job.id)
        assert shadow["agreement"] == {"thyroid": 0.95}
        table = run("jobs", "--shadow", "--config", str(path))
        assert "thyroid-seg:2" in table.stdout and "thyroid 0.950" in table.stdout
        bad = run("jobs", "--state", "finished", "--config", str(path))
        assert bad.returncode == 2 and "states are: received, routed" in bad.stderr


class TestDemo:
    def test_demo_runs_the_whole_loop(self, tmp_path: Path, models_dir: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text(f"models: {models_dir}\n")
        result = run(
            "demo", "--size", "128", "--out", str(tmp_path / "demo"), "--config", str(path)
        )
        assert result.returncode == 0, result.stderr + result.stdout
        assert "SEG received:" in result.stdout
        assert "Dice thyroid" in result.stdout
        assert list((tmp_path / "demo" / "received").glob("*.dcm"))
