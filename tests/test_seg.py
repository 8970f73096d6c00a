"""SEG builder: valid under dciodvfy, round-trips through highdicom, names what made it.

Every SEG is written to BytesIO and read back before asserting, and written to a file for dciodvfy.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_node.seg import (
    CONTENT_LABEL,
    AlgorithmInfo,
    Code,
    SegmentSpec,
    ai_series_description,
    build_seg,
    seg_uids,
)
from dicom_node.seg.grouping import group_sources
from dicom_node.seg.sources import is_image
from tests.helpers.dicom_factory import (
    make_ct_series,
    make_mr_series,
    make_nm,
    make_sc,
)
from tests.helpers.onnx_models import DEFAULT_SEGMENTS
from tests.helpers.peers import dciodvfy

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

MANIFEST_SEGMENTS = DEFAULT_SEGMENTS

ALGORITHM = AlgorithmInfo(
    model="thyroid-seg", version="1", alias="production", sha256="ab" * 32, rule="thyroid"
)

SOURCES: dict[str, Callable[[], list[Dataset]]] = {
    "nm-1-frame": lambda: [make_nm()],
    "nm-3-frames": lambda: [make_nm(frames=3, seed=3)],
    "nm-2-instances": lambda: [make_nm(instance_number=1), make_nm(instance_number=2)],
    "sc": lambda: [make_sc()],
    "sc-2-instances": lambda: [make_sc(instance_number=1), make_sc(instance_number=2)],
    "ct-1-slice": lambda: make_ct_series(1),
    "ct-5-slices": lambda: make_ct_series(5),
    "mr-4-slices": lambda: make_mr_series(4),
}


def _frames(sources: list[Dataset]) -> np.ndarray:
    """Pixel frames of the sources, stacked in order: (total frames, rows, cols)."""
    return np.concatenate([ds.pixel_array.reshape(-1, ds.Rows, ds.Columns) for ds in sources])


def _masks(sources: list[Dataset]) -> dict[str, np.ndarray]:
    """Thyroid: the brightest tenth of each frame; nodule: a small square on the first frame."""
    frames = _frames(sources).astype(np.float64)
    thyroid = np.stack([f > np.percentile(f, 90) for f in frames])
    nodule = np.zeros_like(thyroid)
    nodule[0, 20:26, 22:30] = True
    assert thyroid.any() and nodule.any()
    return {"thyroid": thyroid, "nodule": nodule}


def _round_trip(seg: Dataset, tmp_path: Path) -> tuple[hd.seg.Segmentation, Path]:
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "seg.dcm"
    path.write_bytes(buffer.getvalue())
    buffer.seek(0)
    return hd.seg.Segmentation.from_dataset(pydicom.dcmread(buffer)), path


def _decoded(seg: hd.seg.Segmentation, sources: list[Dataset]) -> np.ndarray:
    """Decoded SEG pixels (total frames, rows, cols, segments) looked up by source reference."""
    if "NumberOfFrames" in sources[0]:
        parts = [
            seg.get_pixels_by_source_frame(
                ds.SOPInstanceUID,
                list(range(1, int(ds.NumberOfFrames) + 1)),
                segment_numbers=[1, 2],
                assert_missing_frames_are_empty=True,
            )
            for ds in sources
        ]
        return np.concatenate(parts).astype(bool)
    return seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    ).astype(bool)


def _referenced_uids(seg: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


def _per_frame_uids(seg: Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for item in seg.PerFrameFunctionalGroupsSequence
        for derivation in item.DerivationImageSequence
        for ref in derivation.SourceImageSequence
    }


class TestBuildSeg:
    @pytest.mark.parametrize("kind", sorted(SOURCES))
    def test_valid_complete_and_faithful(self, kind: str, tmp_path: Path) -> None:
        sources = SOURCES[kind]()
        masks = _masks(sources)
        seg, path = _round_trip(build_seg(sources, masks, MANIFEST_SEGMENTS, ALGORITHM), tmp_path)

        report = dciodvfy(path)
        assert report.errors == [], report.output
        assert report.warnings == [], report.output
        assert seg.SOPClassUID == SEG_STORAGE
        assert seg.Modality == "SEG"
        assert seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
        assert seg.PatientID == sources[0].PatientID
        source_uids = {str(ds.SOPInstanceUID) for ds in sources}
        assert _referenced_uids(seg) == source_uids
        assert _per_frame_uids(seg) == source_uids
        assert seg.SeriesDescription.startswith("AI segmentation (thyroid-seg v1)")
        assert len(seg.SeriesDescription) <= 64
        assert seg.ContentLabel == CONTENT_LABEL

        decoded = _decoded(seg, sources)
        np.testing.assert_array_equal(decoded[..., 0], masks["thyroid"])
        np.testing.assert_array_equal(decoded[..., 1], masks["nodule"])

    def test_segments_carry_labels_snomed_codes_and_algorithm(self, tmp_path: Path) -> None:
        sources = [make_nm()]
        seg, _ = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM), tmp_path
        )
        first, second = seg.SegmentSequence
        assert (first.SegmentNumber, first.SegmentLabel) == (1, "Thyroid")
        assert (second.SegmentNumber, second.SegmentLabel) == (2, "Cold nodule")
        assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == "69748006"
        assert second.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert first.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
        assert {
            s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator
            for s in seg.SegmentSequence
        } == {"SCT"}
        for segment in seg.SegmentSequence:
            assert segment.SegmentAlgorithmType == "AUTOMATIC"
            algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
            assert algorithm.AlgorithmName == "thyroid-seg"
            assert algorithm.AlgorithmVersion == "1"
            assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
            params = dict(p.split("=", 1) for p in algorithm.AlgorithmParameters.split(","))
            assert params == {"alias": "production", "sha256": "ab" * 32, "rule": "thyroid"}

    def test_pinned_version_has_no_alias_parameter(self, tmp_path: Path) -> None:
        sources = [make_sc()]
        pinned = AlgorithmInfo("thyroid-seg", "2", None, "cd" * 32, "thyroid")
        seg, _ = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, pinned), tmp_path
        )
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == "2"
        assert "alias=" not in algorithm.AlgorithmParameters

    @pytest.mark.parametrize("kind", ["nm-1-frame", "nm-3-frames", "sc", "ct-5-slices"])
    def test_all_masks_empty_keeps_every_frame(self, kind: str, tmp_path: Path) -> None:
        sources = SOURCES[kind]()
        empty = {key: np.zeros_like(m) for key, m in _masks(sources).items()}
        seg, path = _round_trip(build_seg(sources, empty, MANIFEST_SEGMENTS, ALGORITHM), tmp_path)

        assert dciodvfy(path).errors == []
        assert int(seg.NumberOfFrames) == 2 * len(empty["thyroid"])
        assert len(seg.SegmentSequence) == 2
        assert not _decoded(seg, sources).any()

    @pytest.mark.parametrize("kind", ["nm-3-frames", "ct-5-slices"])
    def test_empty_segment_is_described_without_frames(self, kind: str, tmp_path: Path) -> None:
        sources = SOURCES[kind]()
        masks = _masks(sources)
        masks["nodule"][:] = False
        seg, path = _round_trip(build_seg(sources, masks, MANIFEST_SEGMENTS, ALGORITHM), tmp_path)

        assert dciodvfy(path).errors == []
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Thyroid", "Cold nodule"]
        numbers = {
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            for item in seg.PerFrameFunctionalGroupsSequence
        }
        assert numbers == {1}
        decoded = _decoded(seg, sources)
        np.testing.assert_array_equal(decoded[..., 0], masks["thyroid"])
        assert not decoded[..., 1].any()

    def test_multi_frame_nm_references_each_frame(self, tmp_path: Path) -> None:
        sources = [make_nm(frames=3, seed=3)]
        seg, _ = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM), tmp_path
        )
        thyroid_frames = [
            int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
            for item in seg.PerFrameFunctionalGroupsSequence
            if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
        ]
        assert thyroid_frames == [1, 2, 3]
        assert "FrameOfReferenceUID" not in seg
        assert "PlanePositionSequence" not in seg.SharedFunctionalGroupsSequence[0]

    def test_nm_with_frame_of_reference_but_no_geometry(self, tmp_path: Path) -> None:
        sources = [make_nm(FrameOfReferenceUID="1.2.826.0.1.3680043.8.498.77")]
        sources[0].PositionReferenceIndicator = ""
        seg, path = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM), tmp_path
        )
        assert dciodvfy(path).errors == []
        assert seg.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.77"

    def test_ct_keeps_geometry(self, tmp_path: Path) -> None:
        sources = make_ct_series(3)
        seg, _ = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM), tmp_path
        )
        assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
        positions = {
            tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
            for item in seg.PerFrameFunctionalGroupsSequence
        }
        assert positions == {tuple(float(v) for v in ds.ImagePositionPatient) for ds in sources}

    def test_sources_are_not_modified(self) -> None:
        sources = [make_nm(frames=2)]
        before = copy.deepcopy(sources[0])
        build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM)
        assert sources[0] == before

    def test_segment_specs_and_pydantic_segments_are_accepted(self) -> None:
        manifest = pytest.importorskip("dicom_node.modelstore.manifest")
        sources = [make_sc()]
        pydantic_segments = [manifest.Segment(**entry) for entry in MANIFEST_SEGMENTS]
        specs = [SegmentSpec.from_manifest(entry) for entry in MANIFEST_SEGMENTS]
        a = build_seg(sources, _masks(sources), pydantic_segments, ALGORITHM)
        b = build_seg(sources, _masks(sources), specs, ALGORITHM)
        assert [s.SegmentLabel for s in a.SegmentSequence] == ["Thyroid", "Cold nodule"]
        assert a.SegmentSequence == b.SegmentSequence


class TestDeterministicUids:
    def test_rebuild_gives_the_same_uids(self) -> None:
        sources = make_ct_series(2)
        first = build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM)
        again = build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM)
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
            again.SeriesInstanceUID,
            again.SOPInstanceUID,
        )
        assert (first.SeriesInstanceUID, first.SOPInstanceUID) == seg_uids(
            sources[0].SeriesInstanceUID, "thyroid", "thyroid-seg", "1"
        )

    def test_version_rule_and_series_each_change_the_uids(self) -> None:
        base = seg_uids("1.2.3", "thyroid", "thyroid-seg", "1")
        others = [
            seg_uids("1.2.3", "thyroid", "thyroid-seg", "2"),
            seg_uids("1.2.3", "thyroid-research", "thyroid-seg", "1"),
            seg_uids("1.2.4", "thyroid", "thyroid-seg", "1"),
            seg_uids("1.2.3", "thyroid", "other-seg", "1"),
        ]
        assert base[0] != base[1]
        for series_uid, sop_uid in others:
            assert series_uid != base[0] and sop_uid != base[1]
        assert all(len(uid) <= 64 and uid.is_valid for uid in base)

    def test_alias_does_not_change_the_uids(self) -> None:
        sources = [make_nm()]
        other_alias = AlgorithmInfo("thyroid-seg", "1", "candidate", "ab" * 32, "thyroid")
        a = build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM)
        b = build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, other_alias)
        assert a.SOPInstanceUID == b.SOPInstanceUID

    def test_empty_part_is_refused(self) -> None:
        with pytest.raises(ValueError, match="version must be a non-empty string"):
            seg_uids("1.2.3", "thyroid", "thyroid-seg", "")


class TestBuildSegErrors:
    def test_missing_mask(self) -> None:
        sources = [make_nm()]
        masks = _masks(sources)
        del masks["nodule"]
        with pytest.raises(ValueError, match="masks has no entry for segment 'nodule'"):
            build_seg(sources, masks, MANIFEST_SEGMENTS, ALGORITHM)

    def test_mask_shape_must_match_frames(self) -> None:
        sources = [make_nm(frames=3)]
        masks = {key: m[:1] for key, m in _masks(sources).items()}
        with pytest.raises(ValueError, match=r"must have shape .* = \(3, 256, 256\)"):
            build_seg(sources, masks, MANIFEST_SEGMENTS, ALGORITHM)

    def test_sources_from_two_series(self) -> None:
        sources = [make_sc(series_number=2), make_sc(series_number=5, instance_number=2)]
        with pytest.raises(ValueError, match="one series"):
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM)

    def test_sources_of_different_size(self) -> None:
        sources = [make_sc(instance_number=1), make_sc(rows=128, cols=128, instance_number=2)]
        masks = {key: np.zeros((2, 256, 256), bool) for key in ("thyroid", "nodule")}
        with pytest.raises(ValueError, match="must share Rows and Columns"):
            build_seg(sources, masks, MANIFEST_SEGMENTS, ALGORITHM)

    def test_no_sources(self) -> None:
        with pytest.raises(TypeError, match="non-empty sequence"):
            build_seg([], {}, MANIFEST_SEGMENTS, ALGORITHM)

    def test_duplicate_segment_keys(self) -> None:
        sources = [make_sc()]
        with pytest.raises(ValueError, match="segment keys must be unique"):
            build_seg(sources, _masks(sources), [MANIFEST_SEGMENTS[0]] * 2, ALGORITHM)


class TestValueObjects:
    def test_segment_spec_from_manifest(self) -> None:
        spec = SegmentSpec.from_manifest(MANIFEST_SEGMENTS[1])
        assert spec == SegmentSpec(
            key="nodule",
            label="Cold nodule",
            category=Code("49755003", "SCT", "Morphologically Altered Structure"),
            type=Code("27925004", "SCT", "Nodule"),
            color=(0, 160, 255),
        )

    def test_segment_spec_missing_type(self) -> None:
        entry = {k: v for k, v in MANIFEST_SEGMENTS[0].items() if k != "type"}
        with pytest.raises(ValueError, match=r"missing \['type'\]"):
            SegmentSpec.from_manifest(entry)

    def test_segment_spec_bad_color(self) -> None:
        with pytest.raises(ValueError, match="color must be three ints 0-255"):
            SegmentSpec("a", "A", Code("1", "SCT", "x"), Code("2", "SCT", "y"), (300, 0, 0))

    def test_algorithm_parameter_separator_refused(self) -> None:
        with pytest.raises(ValueError, match="rule must not contain ',' or '='"):
            AlgorithmInfo("thyroid-seg", "1", None, "ab", "a,b")

    def test_algorithm_sha256_must_be_hex(self) -> None:
        with pytest.raises(ValueError, match="sha256 must be a hex digest"):
            AlgorithmInfo("thyroid-seg", "1", None, "not-hex", "thyroid")

    @pytest.mark.parametrize("model", ["thyroid-seg", "a-very-long-model-name-for-the-thyroid-x"])
    def test_series_description_fits_and_says_ai(self, model: str) -> None:
        text = ai_series_description(model, "12")
        assert len(text) <= 64
        assert text.startswith("AI seg")
        assert "v12" in text


class TestSingleSegment:
    @pytest.mark.parametrize("kind", ["nm-3-frames", "sc-2-instances", "ct-5-slices"])
    def test_one_segment(self, kind: str, tmp_path: Path) -> None:
        sources = SOURCES[kind]()
        masks = {"thyroid": _masks(sources)["thyroid"]}
        seg, path = _round_trip(
            build_seg(sources, masks, MANIFEST_SEGMENTS[:1], ALGORITHM), tmp_path
        )
        assert dciodvfy(path).errors == []
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Thyroid"]
        if "NumberOfFrames" in sources[0]:
            decoded = np.concatenate(
                [
                    seg.get_pixels_by_source_frame(
                        ds.SOPInstanceUID,
                        list(range(1, int(ds.NumberOfFrames) + 1)),
                        assert_missing_frames_are_empty=True,
                    )
                    for ds in sources
                ]
            )
        else:
            decoded = seg.get_pixels_by_source_instance(
                [ds.SOPInstanceUID for ds in sources], assert_missing_frames_are_empty=True
            )
        np.testing.assert_array_equal(decoded[..., 0].astype(bool), masks["thyroid"])


class TestImperfectSources:
    """Headers as real scanners and tools write them (issue 9): build anyway, and validly."""

    def _check(self, sources: list[Dataset], tmp_path: Path) -> hd.seg.Segmentation:
        seg, path = _round_trip(
            build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM), tmp_path
        )
        report = dciodvfy(path)
        assert report.errors == [], report.output
        source_uids = {str(ds.SOPInstanceUID) for ds in sources}
        assert _referenced_uids(seg) == source_uids
        assert _per_frame_uids(seg) == source_uids
        return seg

    @pytest.mark.parametrize("kind", ["nm-1-frame", "sc", "ct-5-slices"])
    def test_absent_type2_attributes_are_copied_empty(self, kind: str, tmp_path: Path) -> None:
        sources = SOURCES[kind]()
        absent = [
            "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
            "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime", "Manufacturer",
        ]  # fmt: skip
        for ds in sources:
            for keyword in absent:
                if keyword in ds:
                    delattr(ds, keyword)
        seg = self._check(sources, tmp_path)
        for keyword in absent[:-1]:
            assert keyword in seg and seg[keyword].is_empty, keyword
        assert "PatientID" not in sources[0]  # the caller's datasets are not changed

    def test_acr_nema_dates_and_invalid_values(self, tmp_path: Path) -> None:
        sources = make_ct_series(2)
        for ds in sources:
            ds.StudyDate, ds.StudyTime, ds.PatientAge, ds.StudyID = (
                "1997.04.24",
                "10:32:15",
                "22Y",
                "x" * 20,
            )
        seg = self._check(sources, tmp_path)
        assert (seg.StudyDate, seg.StudyTime, seg.StudyID) == ("19970424", "103215", "")
        assert "PatientAge" not in seg

    def test_duplicate_positions_give_frame_referenced_seg(self, tmp_path: Path) -> None:
        sources = make_ct_series(3)
        sources[2].ImagePositionPatient = list(sources[1].ImagePositionPatient)
        seg = self._check(sources, tmp_path)
        assert "PlanePositionSequence" not in seg.PerFrameFunctionalGroupsSequence[0]
        assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID

    def test_ct_without_frame_of_reference(self, tmp_path: Path) -> None:
        sources = make_ct_series(2)
        for ds in sources:
            del ds.FrameOfReferenceUID
        seg = self._check(sources, tmp_path)
        assert "FrameOfReferenceUID" not in seg

    def test_frame_of_reference_equal_to_study_uid_is_dropped(self, tmp_path: Path) -> None:
        sources = make_ct_series(2)
        for ds in sources:
            ds.FrameOfReferenceUID = ds.StudyInstanceUID
        seg = self._check(sources, tmp_path)
        assert "FrameOfReferenceUID" not in seg

    def test_ct_without_slice_thickness_uses_the_spacing(self, tmp_path: Path) -> None:
        sources = make_ct_series(3)
        for ds in sources:
            del ds.SliceThickness
        seg = self._check(sources, tmp_path)
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        positions = sorted(float(ds.ImagePositionPatient[2]) for ds in sources)
        assert float(measures.SliceThickness) == pytest.approx(positions[1] - positions[0])

    def test_single_frame_class_with_number_of_frames(self, tmp_path: Path) -> None:
        sources = [make_sc(), make_sc(instance_number=2)]
        for ds in sources:
            ds.NumberOfFrames = 1
        seg = self._check(sources, tmp_path)
        for item in seg.PerFrameFunctionalGroupsSequence:
            reference = item.DerivationImageSequence[0].SourceImageSequence[0]
            assert "ReferencedFrameNumber" not in reference


class TestGroups:
    def test_consistent_series_is_one_group_with_todays_uids(self) -> None:
        sources = make_ct_series(3)
        [group] = group_sources(sources)
        assert (group.index, group.uid_group, group.frame_indices) == (0, None, (0, 1, 2))
        seg = build_seg(
            list(group.sources), _masks(sources), MANIFEST_SEGMENTS, ALGORITHM,
            group=group.uid_group,
        )  # fmt: skip
        assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == seg_uids(
            sources[0].SeriesInstanceUID, "thyroid", "thyroid-seg", "1"
        )

    def test_sizes_and_orientations_split_largest_first(self, tmp_path: Path) -> None:
        sources = make_ct_series(5)
        sources[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal localizer
        small = make_sc(rows=128, cols=128, instance_number=9)
        small.SeriesInstanceUID = sources[0].SeriesInstanceUID
        small.StudyInstanceUID = sources[0].StudyInstanceUID
        groups = group_sources([*sources, small])
        assert [len(g.sources) for g in groups] == [4, 1, 1]
        assert groups[0].frame_indices == (1, 2, 3, 4)
        assert groups[0].key.startswith(f"{sources[0].Rows}x{sources[0].Columns} ori=1,0,0,0,1,0")
        assert groups[2].key == "128x128 ori=none for=none"
        assert groups == group_sources([*sources, small])  # stable

        seen = set()
        for group in groups:
            group_sources_list = list(group.sources)
            masks = {
                key: mask[list(range(len(group.frame_indices)))]
                for key, mask in _masks(group_sources_list).items()
            }
            seg, path = _round_trip(
                build_seg(
                    group_sources_list, masks, MANIFEST_SEGMENTS, ALGORITHM, group=group.uid_group
                ),
                tmp_path,
            )
            assert dciodvfy(path).errors == []
            seen.add((seg.SeriesInstanceUID, seg.SOPInstanceUID))
        assert len(seen) == 3
        assert seg_uids(sources[0].SeriesInstanceUID, "thyroid", "thyroid-seg", "1") in seen

    def test_orientation_within_tolerance_is_one_group(self) -> None:
        sources = make_ct_series(2)
        sources[1].ImageOrientationPatient = [1, 0.0002, 0, 0, 1, 0]
        assert len(group_sources(sources)) == 1

    def test_group_changes_uids(self) -> None:
        base = seg_uids("1.2.3", "thyroid", "thyroid-seg", "1")
        assert seg_uids("1.2.3", "thyroid", "thyroid-seg", "1", None) == base
        other = seg_uids("1.2.3", "thyroid", "thyroid-seg", "1", "128x128 ori=none for=none")
        assert other[0] != base[0] and other[1] != base[1]
        with pytest.raises(ValueError, match="group must be None or a non-empty string"):
            seg_uids("1.2.3", "thyroid", "thyroid-seg", "1", "")


class TestIsImage:
    def test_image(self) -> None:
        assert is_image(make_nm()) == (True, "")

    def test_without_pixel_data(self) -> None:
        ds = make_ct_series(1)[0]
        del ds.PixelData
        assert is_image(ds) == (False, "CT Image Storage has no Pixel Data")

    def test_seg_is_not_a_source(self) -> None:
        sources = [make_sc()]
        ok, reason = is_image(build_seg(sources, _masks(sources), MANIFEST_SEGMENTS, ALGORITHM))
        assert not ok and "Segmentation" in reason
