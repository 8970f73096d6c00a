"""Volumes as data: 3-D scores from the series geometry; gate reference sets of any format."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_node.modelstore import ModelRunner, ModelStore
from dicom_node.modelstore.cases import SegmentRef, _read_nifti1, read_labelled_case
from dicom_node.modelstore.gate import GateError, load_reference_cases, run_gate
from dicom_node.modelstore.scoring import hd95, slice_positions, surface, volume_scores
from tests.helpers.onnx_models import make_store
from training.data import DataError, load_case
from training.examples.ct_liver import write_dataset

REFS = [SegmentRef("liver"), SegmentRef("lesion")]
LABELS = {"liver": [1, 2], "lesion": [2]}


class TestVolumeScores:
    def test_hd95_uses_slice_positions_between_slices(self) -> None:
        truth = np.zeros((3, 4, 4), bool)
        pred = np.zeros((3, 4, 4), bool)
        truth[0, 1, 1] = True
        pred[2, 1, 1] = True
        # two slices apart: 2 mm with 1 mm slices, 10 mm with 5 mm slices, in-plane spacing moot
        assert hd95(pred, truth, (0.7, 0.7)) == pytest.approx(2.0)
        assert hd95(pred, truth, (0.7, 0.7), [0.0, 5.0, 10.0]) == pytest.approx(10.0)
        # diagonal: in-plane and through-plane distances combine
        pred[:] = False
        pred[1, 1, 3] = True
        assert hd95(pred, truth, (1.0, 1.5), [0.0, 4.0, 8.0]) == pytest.approx(5.0)

    @pytest.mark.parametrize("seed", range(5))
    def test_pruned_search_equals_brute_force(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        pred = rng.random((6, 12, 10)) > 0.85
        truth = rng.random((6, 12, 10)) > 0.9
        positions = np.cumsum(rng.uniform(0.5, 4.0, 6))  # uneven slice gaps
        spacing = (0.7, 1.3)

        def points(mask: np.ndarray) -> np.ndarray:
            idx = np.argwhere(surface(mask)).astype(float)
            return np.column_stack([positions[idx[:, 0].astype(int)], idx[:, 1:] * spacing])

        p, t = points(pred), points(truth)
        d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
        expected = np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
        assert hd95(pred, truth, spacing, positions) == pytest.approx(expected)

    def test_volume_scores_pool_voxels_over_slices(self) -> None:
        truth = np.zeros((2, 4, 4), bool)
        truth[:, 1:3, 1:3] = True  # 8 voxels
        pred = truth.copy()
        pred[1] = False  # 4 voxels, all inside
        scores = volume_scores(pred, truth, (1.0, 1.0), [0.0, 3.0])
        assert scores["dice"] == pytest.approx(2 * 4 / 12)
        assert scores["iou"] == pytest.approx(0.5)
        assert math.isnan(volume_scores(pred, np.zeros_like(truth))["hd95_mm"])

    def test_slice_positions_from_the_headers(self, tmp_path: Path) -> None:
        write_dataset(tmp_path, 1, seed=1, size=32, slices=4)
        case = read_labelled_case(tmp_path / "ctliver001", REFS, LABELS)
        assert case.positions == (0.0, 5.0, 10.0, 15.0)
        sources = list(case.series.sources)
        for ds in sources:
            del ds.ImagePositionPatient
            ds.SpacingBetweenSlices = 2.5
        assert slice_positions(sources, 4) == [0.0, 2.5, 5.0, 7.5]


class TestMaskFiles:
    def test_transposed_nifti_names_file_and_both_shapes(self, tmp_path: Path) -> None:
        write_dataset(tmp_path, 1, seed=2, size=32, slices=4)
        folder = tmp_path / "ctliver001"
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labels.nii.gz")))
        # what nibabel's get_fdata() order (columns, rows, slices) looks like
        sitk.WriteImage(
            sitk.GetImageFromArray(labels.transpose(2, 1, 0)), str(folder / "labels.nii.gz")
        )
        with pytest.raises(DataError) as err:
            load_case(folder, REFS, LABELS)
        message = str(err.value)
        assert "case ctliver001: labels.nii.gz has shape (32, 32, 4)" in message
        assert "the images are (4, 32, 32) (slices, rows, columns)" in message
        assert "mask.transpose(2, 1, 0)" in message

    def test_node_only_nifti_reader_matches_simpleitk(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 3, size=(3, 5, 7)).astype(np.uint8)
        path = tmp_path / "labels.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
        np.testing.assert_array_equal(_read_nifti1(path), labels)
        (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"\0" * 400))
        with pytest.raises(ValueError, match="not a NIfTI-1 file"):
            _read_nifti1(tmp_path / "bad.nii.gz")


class TestReferenceSets:
    def test_multi_file_series_with_a_nifti_label_map(self, tmp_path: Path) -> None:
        reference = tmp_path / "reference"
        write_dataset(reference, 2, seed=3, size=64, slices=3)
        # the store's tiny model has segments thyroid and nodule: map the label map onto them
        (reference / "labels.yaml").write_text("thyroid: [1, 2]\nnodule: [2]\n")
        store = ModelStore(make_store(tmp_path / "m", versions=["1"], production=None))
        manifest = store.resolve("thyroid-seg:1").manifest
        cases = load_reference_cases(reference, manifest.segments)
        assert [len(c.frames) for c in cases] == [3, 3]
        assert cases[0].positions == (0.0, 5.0, 10.0) and cases[0].spacing == (6.0, 6.0)
        assert set(cases[0].truth) == {"thyroid", "nodule"}

        runner = ModelRunner(threads=1)
        result = run_gate(store, "thyroid-seg", "1", data=reference, runner=runner)
        assert result.cases == 2
        resolved = store.resolve("thyroid-seg:1")
        expected = []
        for case in cases:
            outputs = runner.run(resolved, case.frames)
            pred = np.stack([o["thyroid"] for o in outputs])
            expected.append(
                volume_scores(pred, case.truth["thyroid"], case.spacing, case.positions)
            )
        measured = result.candidate_metrics["thyroid"]
        assert measured["dice"] == pytest.approx(np.mean([e["dice"] for e in expected]))
        assert measured["iou"] == pytest.approx(np.mean([e["iou"] for e in expected]))
        assert result.candidate["thyroid"] == pytest.approx(measured["dice"])
        line = next(x for x in result.report() if x.startswith("thyroid:"))
        assert "over 2 case(s)" in line and "3-D IoU" in line
        assert result.to_dict()["candidate_metrics"]["thyroid"]["n"] == 2

    def test_label_map_without_labels_yaml_is_refused(self, tmp_path: Path) -> None:
        reference = tmp_path / "reference"
        write_dataset(reference, 1, seed=4, size=64, slices=2)
        store = ModelStore(make_store(tmp_path / "m", versions=["1"], production=None))
        segments = store.resolve("thyroid-seg:1").manifest.segments
        with pytest.raises(GateError, match="labels.nii.gz is a label map but no nifti_labels"):
            load_reference_cases(reference, segments)
