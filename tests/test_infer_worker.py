"""The worker on a running node: every series ends with a result or a sentence a person can use.

Non-image objects are skipped with their reason, a series of mixed matrix sizes gets one SEG per
group (or fails for a volume model), a pixel bomb fails its job before anything is decoded and
the worker goes on, failures name instances by position, and ``internal error`` means a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from ruamel.yaml import YAML

from dicom_node.jobs import JobState
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.onnx_models import write_model_version, write_yaml
from tests.helpers.peers import StoreSCP, dciodvfy, storescu
from tests.helpers.waiting import wait_until

CATCH_ALL = """\
rules:
  - name: everything
    when:
      Modality: {exists: true}
    complete: {idle_seconds: 0.5}
    model: generic@production
    send_to: [pacs]
"""

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def generic_store(root: Path, volume: bool = False) -> Path:
    """A store with ``generic`` v1: one model for any modality (optionally a volume model)."""
    folder = write_model_version(root / "generic", name="generic", version="1", modalities=())
    if volume:
        data = YAML(typ="safe").load((folder / "manifest.yaml").read_text())
        data["input"]["volume"] = True
        write_yaml(folder / "manifest.yaml", data)
    write_yaml(root / "generic" / "aliases.yaml", {"production": "1"})
    return root


def make_sr(like: Dataset, number: int = 99) -> Dataset:
    """A Basic Text SR in the series (and for the patient) of ``like``: not an image."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(like.SOPInstanceUID), "sr", str(number)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName"):
        setattr(ds, keyword, like.get(keyword))
    ds.PatientBirthDate = like.get("PatientBirthDate", "")
    ds.Modality = "SR"
    ds.InstanceNumber = number
    ds.ValueType = "CONTAINER"
    return ds


@pytest.fixture
def pacs() -> Any:
    with StoreSCP() as scp:
        yield scp


def _node(tmp_path: Path, node_factory: Any, pacs: StoreSCP, volume: bool = False) -> Any:
    models = generic_store(tmp_path / "models", volume=volume)
    rules = tmp_path / "rules"
    write_rules(rules, CATCH_ALL)
    return node_factory(make_config(tmp_path, models, rules, pacs.port))


def _finished(node: Any, n: int = 1) -> list[Any]:
    finals = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)
    return wait_until(
        lambda: (
            (jobs := [j for j in node.store.list_jobs() if j.state in finals])
            and len(jobs) >= n
            and jobs
        ),
        timeout=60,
        what=f"{n} finished job(s)",
    )


class TestNonImages:
    def test_sr_routed_to_a_model_is_skipped_with_its_reason(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs)
        sr = make_sr(make_nm(rows=32, cols=32, seed="sr-only"))
        assert (
            storescu(write_series([sr], tmp_path / "in"), node.config.port, "DICOMNODE").returncode
            == 0
        )
        (job,) = _finished(node)
        assert job.state is JobState.SKIPPED, job
        assert job.outcome == (
            "not an image, nothing to segment: "
            "instance 1 of 1 (InstanceNumber 99): Basic Text SR Storage has no Pixel Data"
        )
        assert str(sr.SOPInstanceUID) not in job.outcome
        assert pacs.received() == []

    def test_series_with_images_and_an_sr_uses_the_images(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs)
        nm = make_nm(rows=32, cols=32, seed="sr-mixed")
        files = write_series([nm, make_sr(nm)], tmp_path / "in")
        assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
        (job,) = _finished(node)
        assert job.state is JobState.DONE, job
        assert job.outcome == "SEG sent to pacs; 1 non-image instance(s) left out"
        (seg_path,) = pacs.received()
        seg = pydicom.dcmread(seg_path)
        referenced = {
            str(i.ReferencedSOPInstanceUID)
            for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence
        }
        assert referenced == {str(nm.SOPInstanceUID)}


def _mixed_sizes(seed: str) -> list[Dataset]:
    big = make_ct_series(3, 32, 32, seed=seed)
    small = make_ct_series(
        1,
        16,
        16,
        study_uid=big[0].StudyInstanceUID,
        series_uid=big[0].SeriesInstanceUID,
        seed=seed + "-re-sent",
        PatientID=big[0].PatientID,
        FrameOfReferenceUID=big[0].FrameOfReferenceUID,
    )
    small[0].InstanceNumber = 4
    return [*big, *small]


class TestMixedSeries:
    def test_two_matrix_sizes_give_two_valid_segs(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs)
        series = _mixed_sizes("mixed-sizes")
        assert (
            storescu(
                write_series(series, tmp_path / "in"), node.config.port, "DICOMNODE"
            ).returncode
            == 0
        )
        (job,) = _finished(node)
        assert job.state is JobState.DONE, job
        assert job.outcome == "2 SEGs (one per group) sent to pacs"
        results = node.store.results(job.id)
        assert [(r.position, r.n_frames, r.delivered) for r in results] == [
            (0, 3, ("pacs",)),
            (1, 1, ("pacs",)),
        ]
        assert results[0].path == job.seg_path
        wait_until(lambda: len(pacs.received()) == 2, what="two SEGs at the PACS")
        segs = [pydicom.dcmread(p) for p in pacs.received()]
        assert sorted(int(s.Rows) for s in segs) == [16, 32]
        assert len({str(s.SOPInstanceUID) for s in segs}) == 2
        assert len({str(s.SeriesInstanceUID) for s in segs}) == 2
        assert {str(s.SOPInstanceUID) for s in segs} == {r.sop_uid for r in results}
        for path in pacs.received():
            report = dciodvfy(path)
            assert report.errors == [], report.output

    def test_volume_model_fails_a_mixed_series_precisely(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs, volume=True)
        series = _mixed_sizes("mixed-volume")
        assert (
            storescu(
                write_series(series, tmp_path / "in"), node.config.port, "DICOMNODE"
            ).returncode
            == 0
        )
        (job,) = _finished(node)
        assert job.state is JobState.FAILED, job
        assert job.error.startswith(
            "model generic:1 needs one volume (manifest input.volume), but the series splits "
            "into 2 groups of different matrix size, orientation or Frame of Reference: "
            "group 1 (32x32 "
        ), job.error
        assert "group 2 (16x16 " in job.error and "instance 4 of 4" in job.error
        assert "resend only the instances of one group" in job.error
        assert not any(str(ds.SOPInstanceUID) in job.error for ds in series)


def _rle_garbage(seed: str) -> Dataset:
    ds = make_nm(rows=32, cols=32, seed=seed)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x00garbage, not an RLE header" * 4])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


class TestFailuresSayWhatAndWhere:
    def test_undecodable_syntax_names_syntax_and_backends(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs)
        files = write_series([_rle_garbage("rle-worker")], tmp_path / "in")
        assert storescu(files, node.config.port, "DICOMNODE", extra_args=["-xr"]).returncode == 0
        (job,) = _finished(node)
        assert job.state is JobState.FAILED, job
        assert job.error.startswith(
            "instance 1 of 1 (InstanceNumber 1): pixel data (RLE Lossless) cannot be decoded: "
        ), job.error
        assert "(backends tried: pydicom (built-in), GDCM image reader)" in job.error
        assert job.error.endswith("resend it uncompressed or in another transfer syntax")

    def test_pixel_budget_fails_the_job_and_the_worker_goes_on(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP
    ) -> None:
        node = _node(tmp_path, node_factory, pacs)
        # the receiver's check uses the same key: lower it for the worker only
        node.worker.config = node.config.model_copy(update={"max_pixels": 1000})
        big = write_series([make_nm(rows=64, cols=64, seed="budget")], tmp_path / "big")
        assert storescu(big, node.config.port, "DICOMNODE").returncode == 0
        (job,) = _finished(node)
        assert job.state is JobState.FAILED, job
        assert job.error.startswith(
            "instance 1 of 1 (InstanceNumber 1): the header declares 8192 bytes of decoded pixel "
            "data (64 x 64, 1 frame(s), 1 sample(s), 16 bits allocated), more than the worker's "
            "budget max_pixels = 1000 bytes; nothing was decoded."
        ), job.error
        node.worker.config = node.config
        small = write_series([make_nm(rows=32, cols=32, seed="after-budget")], tmp_path / "ok")
        assert storescu(small, node.config.port, "DICOMNODE").returncode == 0
        jobs = _finished(node, 2)
        assert sorted(j.state.value for j in jobs) == ["done", "failed"]

    def test_a_refused_seg_is_a_job_error_not_an_internal_error(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP, monkeypatch: Any
    ) -> None:
        import dicom_node.infer.worker as worker

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ValueError("sources must share Rows and Columns, got [(16, 16), (32, 32)]")

        monkeypatch.setattr(worker, "build_seg", refuse)
        node = _node(tmp_path, node_factory, pacs)
        files = write_series([make_nm(rows=32, cols=32, seed="refused")], tmp_path / "in")
        assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
        (job,) = _finished(node)
        assert job.error == (
            "the SEG of the series cannot be built: sources must share Rows and Columns, got "
            "[(16, 16), (32, 32)]; correct the sources' headers and resend the series"
        )

    def test_internal_error_is_kept_for_bugs(
        self, tmp_path: Path, node_factory: Any, pacs: StoreSCP, monkeypatch: Any
    ) -> None:
        import dicom_node.infer.worker as worker

        def bug(*args: Any, **kwargs: Any) -> Any:
            raise KeyError("a bug")

        monkeypatch.setattr(worker, "build_seg", bug)
        node = _node(tmp_path, node_factory, pacs)
        files = write_series([make_nm(rows=32, cols=32, seed="bug")], tmp_path / "in")
        assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
        (job,) = _finished(node)
        assert job.error == "internal error: KeyError: 'a bug'"
