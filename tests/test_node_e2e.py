"""The whole loop against real peers: DCMTK and Orthanc push, the node routes, infers, sends a SEG.

Orthanc plays the PACS: it receives the SEG, and in one test it is also the sender.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import DICOM_NODE, REPO, THYROID_RULE, make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.metrics import sample, scrape, value
from tests.helpers.peers import Orthanc, dciodvfy, storescu
from tests.helpers.waiting import wait_until

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _segs_in(orthanc: Orthanc) -> list[dict[str, Any]]:
    out = []
    for iid in orthanc.instances():
        tags = orthanc.instance_tags(iid)
        if tags.get("SOPClassUID") == SEG_SOP_CLASS:
            out.append({"id": iid, **tags})
    return out


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DICOM_NODE, *args, "--config", str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestStorescuToOrthanc:
    def test_nm_study_comes_back_as_valid_seg(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules_dir, orthanc.dicom_port)
            node = node_factory(config)
            before = scrape(config.http_port)
            files = write_series([make_nm(seed=1)], tmp_path / "in")
            result = storescu(files, config.port, config.ae_title)
            assert result.returncode == 0, result.stderr

            segs = wait_until(lambda: _segs_in(orthanc), what="a SEG in Orthanc")
            assert len(segs) == 1
            source = pydicom.dcmread(files[0])
            seg_bytes = orthanc.instance_file(segs[0]["id"])
            seg_path = tmp_path / "seg.dcm"
            seg_path.write_bytes(seg_bytes)
            seg = pydicom.dcmread(seg_path)
            assert seg.StudyInstanceUID == source.StudyInstanceUID
            referenced = {
                item.ReferencedSOPInstanceUID
                for s in seg.ReferencedSeriesSequence
                for item in s.ReferencedInstanceSequence
            }
            assert referenced == {source.SOPInstanceUID}
            report = dciodvfy(seg_path)
            assert report.errors == [], report.output
            algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert algo.AlgorithmName == "thyroid-seg"
            assert algo.AlgorithmVersion == "1"

            node.wait_idle(10)
            job = node.store.list_jobs()[0]
            assert job.state == "done", job
            assert job.rule == "thyroid"
            assert job.model_version == "1"

            after = scrape(config.http_port)

            def delta(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert delta("dicom_node_instances_received_total") == 1
            assert delta("dicom_node_series_completed_total") == 1
            model = {"model": "thyroid-seg", "version": "1"}
            assert delta("dicom_node_inference_request_success_total", **model) == 1
            assert delta("dicom_node_inference_duration_seconds_count", **model) == 1
            assert delta("dicom_node_export_success_total", destination="pacs") == 1
            code, body = _http(config.http_port, "/readyz")
            assert code == 200, body
            assert json.loads(body)["ready"] is True

    def test_series_without_matching_rule_is_skipped_and_audited(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        config = make_config(tmp_path, models_dir, rules_dir, pacs_port=9)
        node = node_factory(config)
        files = write_series(make_ct_series(n_slices=2, seed=3), tmp_path / "ct")
        assert storescu(files, config.port, config.ae_title).returncode == 0
        job = wait_until(lambda: node.store.list_jobs(["skipped"]), what="skipped job")[0]
        assert job.outcome == "no rule matched"
        events = [e["event"] for e in node.audit.read()]
        assert "skipped" in events


class TestOrthancPushes:
    def test_orthanc_sends_study_and_gets_seg(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules_dir, orthanc.dicom_port)
            node_factory(config)
            orthanc.set_modality("node", config.ae_title, "127.0.0.1", config.port)
            files = write_series([make_nm(seed=11)], tmp_path / "in")
            uploaded = orthanc.upload(files[0])
            orthanc.send_to_modality("node", [uploaded[0]["ID"]])
            segs = wait_until(lambda: _segs_in(orthanc), what="a SEG in Orthanc")
            assert len(segs) == 1
            assert "AI" in segs[0].get("SeriesDescription", "")


class TestFailuresAndRetry:
    def test_destination_down_then_retry_delivers_exactly_one(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        with Orthanc() as orthanc:
            dead_port = orthanc.dicom_port + 1  # nothing listens there
            config = make_config(tmp_path, models_dir, rules_dir, dead_port)
            node = node_factory(config)
            failures = sample(
                config.http_port, "dicom_node_export_failure_total", destination="pacs"
            )
            files = write_series([make_nm(seed=21)], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            failed = wait_until(
                lambda: node.store.list_jobs(["failed"]),
                timeout=30,
                what="the export to fail for good",
            )[0]
            assert "export failed after 3 attempt(s)" in failed.error
            now = sample(config.http_port, "dicom_node_export_failure_total", destination="pacs")
            assert now - failures == 3
        # the PACS comes back on another port: the operator fixes the config and retries
        with Orthanc() as orthanc:
            node.config = node.worker.config = config.model_copy(
                update={
                    "destinations": {
                        "pacs": config.destinations["pacs"].model_copy(
                            update={"port": orthanc.dicom_port}
                        )
                    }
                }
            )
            node.store.retry(failed.id)
            wait_until(lambda: node.store.get(failed.id).state == "done", what="retry")
            assert len(_segs_in(orthanc)) == 1
            node.store.retry  # noqa: B018 (a second retry of a done job is refused below)
            with pytest.raises(ValueError, match="only failed jobs can be retried"):
                node.store.retry(failed.id)


class TestCrashRecovery:
    def test_kill9_mid_study_and_mid_job_loses_nothing(
        self, tmp_path: Path, models_dir: Path, node_process: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, THYROID_RULE % {"instances": 4})
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules, orthanc.dicom_port)
            study = [make_nm(seed=31, instance_number=i + 1) for i in range(4)]
            files = write_series(study, tmp_path / "in")
            node = node_process(config, tmp_path)
            assert storescu(files[:2], config.port, config.ae_title).returncode == 0
            node.kill9()
            node = node_process(config, tmp_path)
            assert storescu(files[2:], config.port, config.ae_title).returncode == 0
            time.sleep(0.3)  # the job is routed/queued/running now: kill it mid-flight
            node.kill9()
            node = node_process(config, tmp_path)
            segs = wait_until(lambda: _segs_in(orthanc), timeout=60, what="a SEG after restarts")
            time.sleep(1.0)
            assert len(_segs_in(orthanc)) == 1
            seg = pydicom.dcmread(
                pydicom.filebase.DicomBytesIO(orthanc.instance_file(segs[0]["id"]))
            )
            referenced = {
                item.ReferencedSOPInstanceUID
                for s in seg.ReferencedSeriesSequence
                for item in s.ReferencedInstanceSequence
            }
            assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in files}
            jobs = _cli(node.path, "jobs", "--json")
            assert jobs.returncode == 0, jobs.stderr
            rows = [json.loads(line) for line in jobs.stdout.splitlines()]
            assert [r["state"] for r in rows] == ["done"]
            assert node.terminate() == 0
