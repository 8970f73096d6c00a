"""What a serious user hits in the pipeline: concurrency, studies vs associations, late instances,
fan-out to several rules and destinations, undecodable pixels, gauges and readiness.

Real peers throughout: DCMTK ``storescu`` sends, DCMTK ``storescp`` or Orthanc plays the PACS.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from dicom_node.config import Destination
from dicom_node.jobs import InstanceRecord, JobState, JobStore, Route
from dicom_node.modelstore import ModelStore
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.metrics import value
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import Orthanc, StoreSCP, storescu
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

IDLE_RULE = """\
rules:
  - name: thyroid
    when: {Modality: NM}
    complete: %(complete)s
    model: thyroid-seg@production
    send_to: [pacs]
    stop: true
"""


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _referenced(seg: pydicom.Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for item in s.ReferencedInstanceSequence
    }


def _segs(pacs: StoreSCP) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]


def _series(seed: str, n: int, **kwargs: Any) -> list[pydicom.Dataset]:
    """``n`` single-frame 64x64 NM instances of one series (UIDs derived from ``seed``)."""
    return [make_nm(rows=64, cols=64, seed=seed, instance_number=i + 1, **kwargs) for i in range(n)]


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


class SilentPeer:
    """A TCP port that completes the handshake (kernel backlog) but never speaks DICOM.

    A PACS that hangs: an export to it waits for ``export_timeout``.
    """

    def __init__(self, port: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port or 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])

    def __enter__(self) -> SilentPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()


class OverwritingOrthanc(Orthanc):
    """Orthanc configured like a PACS that replaces an instance resent with the same UID."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["OverwriteInstances"] = True
        return config


class TestConcurrentSenders:
    def test_16_dcmtk_senders_each_series_routed_once(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, IDLE_RULE % {"complete": "{idle_seconds: 1}"})
        senders = 16
        folders = [
            write_series(_series(f"conc-{i}", 3), tmp_path / f"in{i}") for i in range(senders)
        ]
        with StoreSCP() as pacs:
            # all senders are 127.0.0.1: lift the per-host limit (test_receive_hostile.py)
            config = make_config(
                tmp_path,
                models_dir,
                rules,
                pacs.port,
                max_associations=32,
                max_associations_per_host=senders,
            )
            node = node_factory(config)
            results: list[Any] = [None] * senders

            def send(i: int) -> None:
                results[i] = storescu(folders[i], config.port, config.ae_title, f"SENDER{i}")

            threads = [threading.Thread(target=send, args=(i,)) for i in range(senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            failed = [
                (i, r.returncode, r.stderr[-500:]) for i, r in enumerate(results) if r.returncode
            ]
            assert failed == [], "every C-STORE must succeed"

            wait_until(lambda: len(pacs.received()) >= senders, timeout=60, what="16 SEGs")
            assert node.wait_idle(30)
            jobs = node.store.list_jobs(limit=100)
            assert len(jobs) == senders, "one job per series, no double routing"
            assert {j.state for j in jobs} == {"done"}
            assert {j.n_instances for j in jobs} == {3}
            time.sleep(0.3)  # nothing more may arrive
            segs = _segs(pacs)
            assert len(segs) == senders
            by_source = {s.ReferencedSeriesSequence[0].SeriesInstanceUID: s for s in segs}
            assert len(by_source) == senders, "exactly one SEG per series"
            for i, files in enumerate(folders):
                source = pydicom.dcmread(files[0], stop_before_pixels=True)
                assert _referenced(by_source[source.SeriesInstanceUID]) == _uids(files), i


class TestStudiesVersusAssociations:
    """pynetdicom #855: association release is not study completion, in either direction."""

    @pytest.mark.parametrize("complete", ["{instances: 2}", "{idle_seconds: 1}"])
    def test_one_study_many_associations_and_many_studies_one_association(
        self, tmp_path: Path, models_dir: Path, node_factory: Any, complete: str
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, IDLE_RULE % {"complete": complete})
        # study A: two series, their instances interleaved over four associations
        study_a = "1.2.826.0.1.3680043.8.498.777001"
        # one study, one patient (the factory derives PatientID from the seed)
        same = {"study_uid": study_a, "PatientID": "PHANTOMA"}
        a1 = write_series(_series("a1", 2, **same), tmp_path / "a1")
        a2 = write_series(_series("a2", 2, series_number=2, **same), tmp_path / "a2")
        # studies B, C, D (two instances each) on one association
        bcd = {s: write_series(_series(s, 2), tmp_path / s) for s in ("b", "c", "d")}
        with StoreSCP() as pacs:
            config = make_config(tmp_path, models_dir, rules, pacs.port)
            node = node_factory(config)
            for f in (a1[0], a2[0], a1[1], a2[1]):
                assert storescu([f], config.port, config.ae_title).returncode == 0
            one = [f for files in bcd.values() for f in files]
            assert storescu(one, config.port, config.ae_title).returncode == 0

            wait_until(lambda: len(pacs.received()) >= 5, timeout=30, what="five SEGs")
            assert node.wait_idle(20)
            jobs = node.store.list_jobs(limit=50)
            assert len(jobs) == 5
            assert [(j.state, j.n_instances) for j in jobs] == [("done", 2)] * 5
            assert len({j.study_uid for j in jobs}) == 4
            refs = sorted(sorted(_referenced(s)) for s in _segs(pacs))
            expected = sorted(sorted(_uids(f)) for f in (a1, a2, *bcd.values()))
            assert refs == expected, "each SEG references exactly its series' instances"


class TestLateInstance:
    def test_late_instance_replaces_the_seg_at_the_pacs(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, IDLE_RULE % {"complete": "{instances: 2}"})
        files = write_series(_series("late", 3), tmp_path / "in")
        with OverwritingOrthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules, orthanc.dicom_port)
            node = node_factory(config)
            assert storescu(files[:2], config.port, config.ae_title).returncode == 0
            first = wait_until(lambda: node.store.list_jobs(["done"]), what="the first SEG")[0]

            assert storescu(files[2:], config.port, config.ae_title).returncode == 0
            job = wait_until(
                lambda: (
                    (j := node.store.get(first.id)).state == "done" and j.n_instances == 3 and j
                ),
                what="the job to re-run with the late instance",
            )
            assert job.seg_sop_uid == first.seg_sop_uid, "same UID: a replacement"
            assert len(node.store.list_jobs()) == 1

            def pacs_segs() -> list[pydicom.Dataset]:
                out = []
                for iid in orthanc.instances():
                    if orthanc.instance_tags(iid).get("SOPClassUID") == SEG_SOP_CLASS:
                        raw = orthanc.instance_file(iid)
                        out.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)))
                return out

            segs = wait_until(
                lambda: [s for s in pacs_segs() if len(_referenced(s)) == 3],
                what="the PACS to hold the rebuilt SEG",
            )
            assert len(pacs_segs()) == 1, "replaced, not duplicated"
            assert _referenced(segs[0]) == _uids(files)
            assert str(segs[0].SOPInstanceUID) == first.seg_sop_uid

    def test_instance_arriving_while_the_job_runs_reopens_it(self, tmp_path: Path) -> None:
        store = JobStore.open(tmp_path)

        def arrive(n: int) -> None:
            store.record_instance(
                InstanceRecord(
                    sop_instance_uid=f"1.2.3.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                    study_uid="1.2.3",
                    series_uid="1.2.3.0",
                    modality="NM",
                    path=f"spool/{n}.dcm",
                    size=1,
                    calling_ae="PACS",
                    transfer_syntax="1.2.840.10008.1.2.1",
                    received_at=time.time(),
                )
            )

        arrive(1)
        (job,) = store.jobs_in(JobState.RECEIVED)
        store.route(job.id, [Route(rule="r", model_ref="m@production")], "v1")
        assert store.queue(job.id, 1)
        arrive(2)  # a queued job waits for its completion rule again
        assert store.get(job.id).state == "routed"
        assert store.queue(job.id, 2)
        claimed = store.claim()
        assert claimed is not None and claimed.state == "running"
        store.used_instances(job.id, 2)
        arrive(3)  # recorded while the worker builds the SEG from two instances
        store.exporting(job.id, "results/x.dcm", "1.9")
        assert store.done(job.id, "SEG sent to pacs") is JobState.ROUTED
        assert store.get(job.id).state == "routed"
        assert store.queue(job.id, 3)
        store.claim()
        store.used_instances(job.id, 3)
        store.exporting(job.id, "results/x.dcm", "1.9")
        assert store.done(job.id, "SEG sent to pacs") is JobState.DONE
        store.close()


FANOUT_RULES = """\
rules:
  - name: thyroid-a
    priority: 100
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
  - name: thyroid-b
    priority: 90
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
  - name: no-test-patients
    priority: 50
    when: {SeriesDescription: {contains: test only}}
    discard: true
"""


class TestFanOut:
    def test_two_rules_two_segs_and_a_discard_rule_is_audited(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, FANOUT_RULES)
        kept = write_series(_series("fan", 1), tmp_path / "kept")
        dropped = write_series(
            _series("drop", 1, SeriesDescription="thyroid test only"), tmp_path / "drop"
        )
        with StoreSCP() as pacs:
            config = make_config(tmp_path, models_dir, rules, pacs.port)
            node = node_factory(config)
            assert storescu(kept + dropped, config.port, config.ae_title).returncode == 0
            wait_until(lambda: len(pacs.received()) >= 2, what="two SEGs")
            assert node.wait_idle(20)
            jobs = {j.rule: j for j in node.store.list_jobs()}
            assert {r: j.state for r, j in jobs.items()} == {
                "thyroid-a": "done",
                "thyroid-b": "done",
                "no-test-patients": "skipped",
            }
            assert jobs["no-test-patients"].outcome == "discarded by rule no-test-patients"
            time.sleep(0.3)
            segs = _segs(pacs)
            assert len(segs) == 2
            assert len({s.SOPInstanceUID for s in segs}) == 2
            assert len({s.SeriesInstanceUID for s in segs}) == 2
            assert {jobs["thyroid-a"].seg_sop_uid, jobs["thyroid-b"].seg_sop_uid} == {
                str(s.SOPInstanceUID) for s in segs
            }
            skipped = [e for e in node.audit.read() if e["event"] == "skipped"]
            assert [(e["rule"], e["outcome"]) for e in skipped] == [
                ("no-test-patients", "discarded by rule no-test-patients")
            ]

    def test_one_destination_down_retry_sends_only_to_the_missing_one(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(
            rules,
            (IDLE_RULE % {"complete": "{instances: 1}"}).replace(
                "send_to: [pacs]", "send_to: [pacs, backup]"
            ),
        )
        files = write_series(_series("two-dest", 1), tmp_path / "in")
        backup_port = free_port()  # nothing listens there yet
        with StoreSCP() as pacs:
            config = make_config(tmp_path, models_dir, rules, pacs.port)
            config = config.model_copy(
                update={
                    "destinations": {
                        **config.destinations,
                        "backup": Destination(
                            ae_title="BACKUP", host="127.0.0.1", port=backup_port
                        ),
                    }
                }
            )
            node = node_factory(config)
            assert storescu(files, config.port, config.ae_title).returncode == 0
            failed = wait_until(lambda: node.store.list_jobs(["failed"]), what="a failed export")[0]
            assert failed.error.startswith("export failed after 3 attempt(s): backup: ")
            assert failed.delivered == ("pacs",)
            assert len(pacs.received()) == 1, "the reachable PACS got it once, not per attempt"
            _, body = _get(config.http_port, "/metrics")
            assert value(body, "dicom_node_export_failure_total", destination="backup") == 3.0

            backup = StoreSCP(aet="BACKUP")
            backup.port = backup_port
            with backup:
                node.store.retry(failed.id)
                wait_until(lambda: node.store.get(failed.id).state == "done", what="the retry")
                assert node.store.get(failed.id).delivered == ("pacs", "backup")
                assert len(backup.received()) == 1
                assert len(pacs.received()) == 1, "retry resends only to the missing destination"


def _rle_garbage(seed: str) -> pydicom.Dataset:
    """A valid NM header whose RLE Lossless pixel data is garbage (decodes to nothing)."""
    ds = make_nm(rows=64, cols=64, seed=seed)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00garbage, not an RLE header" * 4])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


class TestBadPixelData:
    def test_undecodable_pixels_fail_precisely_and_the_next_series_is_served(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        bad = write_series([_rle_garbage("rle-bad")], tmp_path / "bad")
        good = write_series(_series("after-bad", 1), tmp_path / "good")
        with StoreSCP() as pacs:
            config = make_config(tmp_path, models_dir, rules_dir, pacs.port)
            node = node_factory(config)
            sent = storescu(bad, config.port, config.ae_title, extra_args=["-xr"])
            assert sent.returncode == 0, "the header is valid: the SCP keeps it " + sent.stderr
            failed = wait_until(lambda: node.store.list_jobs(["failed"]), what="a failed job")[0]
            assert failed.error.startswith(
                "instance 1 of 1 (InstanceNumber 1): pixel data (RLE Lossless) cannot be decoded: "
            ), failed.error
            assert "invalid number of segments" in failed.error
            assert "\n" not in failed.error
            assert pydicom.dcmread(bad[0]).SOPInstanceUID not in failed.error

            assert storescu(good, config.port, config.ae_title).returncode == 0
            wait_until(lambda: len(pacs.received()) == 1, what="the next series' SEG")
            assert node.wait_idle(10)
            states = sorted(j.state for j in node.store.list_jobs())
            assert states == ["done", "failed"]


class TestGaugesAndReadiness:
    def test_job_gauges_and_queue_depth_follow_the_store(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        files = [write_series(_series(f"g{i}", 1), tmp_path / f"g{i}")[0] for i in range(3)]
        with SilentPeer() as hanging_pacs:  # the first export hangs: the others stay queued
            config = make_config(
                tmp_path, models_dir, rules_dir, hanging_pacs.port, workers=1, export_timeout=6.0
            )
            node = node_factory(config)
            assert storescu(files, config.port, config.ae_title).returncode == 0

            def gauges() -> str:
                return _get(config.http_port, "/metrics")[1]

            wait_until(
                lambda: (c := node.store.counts())["exporting"] == 1 and c["queued"] == 2,
                what="one export in flight, two jobs queued behind it",
            )
            body = wait_until(
                lambda: (
                    (b := gauges())
                    and value(b, "dicom_node_jobs", state="queued") == 2.0
                    and value(b, "dicom_node_jobs", state="exporting") == 1.0
                    and b
                ),
                timeout=5,
                what="the gauges to show the store",
            )
            assert value(body, "dicom_node_queue_depth") == 2.0
            assert value(body, "dicom_node_jobs", state="done") == 0.0
            assert 'node="' in body, "every sample names the process that serves it"

    def test_readyz_is_503_with_a_reason_until_the_production_model_exists(
        self, tmp_path: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        models = make_store(tmp_path / "models", versions=["1"], production=None)
        config = make_config(tmp_path, models, rules_dir, pacs_port=9)
        node_factory(config)
        code, body = wait_until(
            lambda: (r := _get(config.http_port, "/readyz"))[0] == 503 and r,
            timeout=5,
            what="/readyz to answer 503",
        )
        checks = json.loads(body)["checks"]
        assert checks["scp"]["ok"]
        failing = {name: c["detail"] for name, c in checks.items() if not c["ok"]}
        assert failing, checks
        assert all("alias 'production' is not set" in d for d in failing.values()), failing
        assert all("thyroid-seg" in d for d in failing.values()), failing

        ModelStore(models).set_alias("thyroid-seg", "production", "1", reason="test")
        wait_until(
            lambda: _get(config.http_port, "/readyz")[0] == 200,
            timeout=5,
            what="/readyz to turn 200 once production is set",
        )
