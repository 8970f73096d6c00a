"""Report outputs: a TID 1500 Measurement Report, valid under dciodvfy, read back with highdicom.

The report is written to BytesIO and read back with highdicom's SR parsing before asserting:
measurements present with UCUM units, and each group's Referenced Segment resolving to a segment
of the SEG it was built from (the segment, not a Referenced Segmentation Frame).
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_node.outputs import build_report, measure
from dicom_node.seg import build_seg, output_uids
from tests.helpers.dicom_factory import make_ct_series, make_nm
from tests.helpers.peers import dciodvfy
from tests.test_outputs_overlay import ALGORITHM, SPECS, frames_of, masks_of

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def build(sources: list[Dataset]) -> tuple[Dataset, Dataset, list]:
    frames = frames_of(sources)
    masks = masks_of(frames)
    seg = build_seg(sources, masks, SPECS, ALGORITHM)
    values = measure(sources, frames, masks, SPECS)
    return build_report(sources, seg, values, ALGORITHM), seg, values


def read_back(ds: Dataset, path: Path) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())))


def by_name(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict:
    return {m.name.meaning: m for m in group.get_measurements()}


class TestBuildReport:
    @pytest.mark.parametrize(
        "make",
        [lambda: [make_nm()], lambda: [make_nm(frames=2, seed=2)], lambda: make_ct_series(3)],
    )
    def test_valid_under_dciodvfy(self, make: object, tmp_path: Path) -> None:
        sources = make()  # type: ignore[operator]
        report, seg, _ = build(sources)
        path = tmp_path / "sr.dcm"
        back = read_back(report, path)
        result = dciodvfy(path)
        assert result.errors == [], result.output
        assert back.SOPClassUID == COMPREHENSIVE_3D_SR
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        assert back.PatientID == seg.PatientID
        assert back.CompletionFlag == "COMPLETE"
        assert "not for diagnosis alone" in back.SeriesDescription

    def test_planar_measurements_units_and_segment_references(self, tmp_path: Path) -> None:
        sources = [make_nm()]
        report, seg, values = build(sources)
        back = read_back(report, tmp_path / "sr.dcm")
        groups = back.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(SPECS)
        numbers = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
        for group, value in zip(groups, values, strict=True):
            ref = group.referenced_segment
            assert isinstance(ref, hd.sr.ReferencedSegment)
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert ref.referenced_sop_class_uid == seg.SOPClassUID
            assert ref.referenced_segment_numbers == [value.number]
            assert value.number in numbers
            label = numbers[value.number].SegmentLabel
            assert label == SPECS[value.number - 1].label
            assert group.finding_type.value == SPECS[value.number - 1].type.value
            measured = by_name(group)
            assert measured["Area"].unit.value == "mm2"
            assert measured["Area"].value == pytest.approx(value.area_mm2)
            assert measured["Total"].unit.value == "{counts}"
            assert measured["Total"].value == pytest.approx(value.intensity_sum)
            assert measured["Mean"].unit.value == "{counts}"
            assert measured["Mean"].value == pytest.approx(value.intensity_mean)
        # area = pixels x pixel spacing, from the SEG's own mask
        spacing = [float(v) for v in sources[0].PixelSpacing]
        thyroid = masks_of(frames_of(sources))["thyroid"]
        area = by_name(groups[0])["Area"].value
        assert area == pytest.approx(thyroid.sum() * spacing[0] * spacing[1])
        evidence = {
            item.ReferencedSOPInstanceUID
            for study in back.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert evidence == {seg.SOPInstanceUID, sources[0].SOPInstanceUID}

    def test_volume_in_ml_for_slices_and_hounsfield(self, tmp_path: Path) -> None:
        sources = make_ct_series(3)
        report, _, values = build(sources)
        back = read_back(report, tmp_path / "sr.dcm")
        group = back.content.get_volumetric_roi_measurement_groups()[0]
        measured = by_name(group)
        assert "Area" not in measured
        assert measured["Volume"].unit.value == "ml"
        assert measured["Volume"].value == pytest.approx(values[0].volume_ml)
        assert measured["Total"].unit.value == "[hnsf'U]"

    def test_empty_segment_has_no_mean(self, tmp_path: Path) -> None:
        sources = [make_nm()]
        frames = frames_of(sources)
        masks = masks_of(frames)
        masks["nodule"] = np.zeros_like(masks["nodule"])
        seg = build_seg(sources, masks, SPECS, ALGORITHM)
        report = build_report(sources, seg, measure(sources, frames, masks, SPECS), ALGORITHM)
        path = tmp_path / "sr.dcm"
        back = read_back(report, path)
        assert dciodvfy(path).errors == []
        nodule = by_name(back.content.get_volumetric_roi_measurement_groups()[1])
        assert nodule["Area"].value == 0 and "Mean" not in nodule

    def test_rerun_gives_same_uids(self) -> None:
        sources = [make_nm()]
        first, _, _ = build(sources)
        again, _, _ = build(sources)
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
            again.SeriesInstanceUID,
            again.SOPInstanceUID,
        )
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == output_uids(
            "report", str(sources[0].SeriesInstanceUID), "thyroid", "thyroid-seg", "1"
        )

    def test_unknown_segment_number_is_refused(self) -> None:
        sources = [make_nm()]
        _, seg, values = build(sources)
        bad = [*values, values[0].__class__(**{**values[0].__dict__, "number": 9})]
        with pytest.raises(ValueError, match=r"segment number\(s\) \[9\]"):
            build_report(sources, seg, bad, ALGORITHM)
