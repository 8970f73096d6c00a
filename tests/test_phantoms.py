"""Synthetic thyroid studies: determinism, truth, headers, DICOM validity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.demo.phantoms import NM_IMAGE_STORAGE, make_case, plan_cases, write_cases
from tests.helpers.peers import dciodvfy


class TestMakeCase:
    def test_same_seed_gives_same_study(self) -> None:
        a, b = make_case(5, 128), make_case(5, 128)
        assert a.dataset.PixelData == b.dataset.PixelData
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
        for key in ("thyroid", "nodule"):
            np.testing.assert_array_equal(a.truth[key], b.truth[key])

    def test_different_seeds_differ(self) -> None:
        a, b = make_case(5, 128), make_case(6, 128)
        assert a.dataset.PixelData != b.dataset.PixelData
        assert a.dataset.SOPInstanceUID != b.dataset.SOPInstanceUID

    @pytest.mark.parametrize("seed", range(8))
    def test_truth_nodules_lie_inside_the_gland(self, seed: int) -> None:
        case = make_case(seed, 128)
        thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
        assert thyroid.dtype == bool and thyroid.shape == (128, 128)
        assert thyroid.sum() > 100
        assert not (nodule & ~thyroid).any()
        assert bool(nodule.any()) == bool(case.meta["cold_nodules"])

    def test_counts_and_spacing_vary_within_the_documented_ranges(self) -> None:
        cases = [make_case(seed, 256) for seed in range(12)]
        totals = [c.meta["total_counts"] for c in cases]
        spacings = {float(c.dataset.PixelSpacing[0]) for c in cases}
        assert all(4e4 < t < 7e5 for t in totals)
        assert len(spacings) == 12

    def test_headers_are_nm_thyroid_scintigraphy(self) -> None:
        ds = make_case(3, 256).dataset
        assert ds.SOPClassUID == NM_IMAGE_STORAGE
        assert ds.Modality == "NM"
        assert ds.BodyPartExamined == "THYROID"
        assert ds.NumberOfFrames == 1
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (256, 256)
        assert "Tc-99m" in ds.StudyDescription
        window = ds.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
        assert float(window.EnergyWindowLowerLimit) < 140 < float(window.EnergyWindowUpperLimit)
        assert "pertechnetate" in ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical
        assert ds.CountsAccumulated == int(ds.pixel_array.sum())

    def test_small_size_is_refused(self) -> None:
        with pytest.raises(ValueError, match="size must be at least 32"):
            make_case(1, 16)

    @pytest.mark.parametrize("size", [256, 128])
    def test_dciodvfy_finds_no_error(self, tmp_path: Path, size: int) -> None:
        path = tmp_path / "nm.dcm"
        make_case(42, size).dataset.save_as(path, enforce_file_format=True)
        result = dciodvfy(path)
        assert result.errors == [], result.output


class TestWriteCases:
    def test_layout_and_patient_grouping(self, tmp_path: Path) -> None:
        folders = write_cases(tmp_path, 12, seed=4, size=[256, 128])
        assert [f.name for f in folders] == [f"case{i:04d}" for i in range(12)]
        patients, sizes = [], set()
        for folder in folders:
            ds = pydicom.dcmread(folder / "image.dcm")
            with np.load(folder / "truth.npz") as truth:
                assert set(truth.files) == {"thyroid", "nodule"}
                assert truth["thyroid"].shape == (ds.Rows, ds.Columns)
            patients.append(ds.PatientID)
            sizes.add(ds.Rows)
        assert sizes == {256, 128}
        assert len(set(patients)) < len(patients), "some patients must have several studies"

    def test_plan_is_deterministic_and_patients_share_anatomy(self) -> None:
        plan = plan_cases(30, 9)
        assert plan == plan_cases(30, 9)
        by_patient: dict[str, set[int]] = {}
        for item in plan:
            by_patient.setdefault(item["patient_id"], set()).add(item["anatomy_seed"])
        assert all(len(seeds) == 1 for seeds in by_patient.values())

    def test_zero_cases_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="n must be at least 1"):
            write_cases(tmp_path, 0, seed=1)
