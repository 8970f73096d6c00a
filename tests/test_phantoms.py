"""Synthetic thyroid studies: determinism, truth, headers, DICOM validity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.demo import phantoms_alt
from dicom_node.demo.phantoms import NM_IMAGE_STORAGE, make_case, plan_cases, write_cases
from dicom_node.modelstore.scoring import surface
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
        assert all(1.5e4 < t < 1.2e6 for t in totals)  # total counts 2e4-1e6, log-uniform
        assert len(spacings) == 12

    def test_the_generator_covers_the_documented_variety(self) -> None:
        """Edge, pole and lobe-filling nodules, both collimators, blur up to 7 mm, one lobe."""
        metas, on_edge, big = [], 0, 0
        for seed in range(60):
            case = make_case(seed, 128)
            metas.append(case.meta)
            thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
            on_edge += int((nodule & surface(thyroid)).any())
            big += int(any(n["lobe_fill"] > 0.8 for n in case.meta["cold_nodules"]))
        locations = {n["location"] for m in metas for n in m["cold_nodules"]}
        assert locations == {"inside", "edge", "pole"}
        assert any(n["bulge"] for m in metas for n in m["cold_nodules"])
        assert on_edge >= 10, "nodules must reach the gland's outline"
        assert big >= 3, "some nodules fill most of a lobe"
        assert {m["geometry"] for m in metas} == {"pinhole", "parallel"}
        fwhm = [m["fwhm_mm"] for m in metas]
        assert 0.5 <= min(fwhm) < 2.0 and 5.5 < max(fwhm) <= 7.0
        assert any(m["hot_nodules"] for m in metas)
        assert any(m["salivary_glands"] for m in metas) and any(m["marker_mm"] for m in metas)
        assert any(make_case(s, 64).meta["single_lobe"] for s in range(200))

    def test_hot_nodules_are_gland_and_never_nodule(self) -> None:
        seed = next(s for s in range(100) if make_case(s, 64).meta["hot_nodules"])
        case = make_case(seed, 128)
        assert (
            case.truth["thyroid"].any()
            and not (case.truth["nodule"] & ~case.truth["thyroid"]).any()
        )

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


class TestFamilyB:
    """The independent held-out style: same contract, other models and header."""

    def test_same_seed_same_study_and_truth_contract(self) -> None:
        a, b = phantoms_alt.make_case(3, 128), phantoms_alt.make_case(3, 128)
        assert a.dataset.PixelData == b.dataset.PixelData
        for seed in range(10):
            case = phantoms_alt.make_case(seed, 128)
            thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
            assert thyroid.shape == (128, 128) and thyroid.sum() > 30
            assert not (nodule & ~thyroid).any()

    def test_header_style_differs_from_family_a(self) -> None:
        a, b = make_case(4, 256).dataset, phantoms_alt.make_case(4, 256).dataset
        assert a.Manufacturer != b.Manufacturer and a.SeriesDescription != b.SeriesDescription
        assert b.Modality == "NM" and b.SOPClassUID == NM_IMAGE_STORAGE
        assert {phantoms_alt.make_case(s, 64).dataset.BitsAllocated for s in range(12)} == {8, 16}

    @pytest.mark.parametrize("seed", [1, 6])
    def test_dciodvfy_finds_no_error(self, tmp_path: Path, seed: int) -> None:
        path = tmp_path / "nm.dcm"
        phantoms_alt.make_case(seed, 128).dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy(path).errors == []

    def test_classic_family_reproduces_version_1s_generator(self, tmp_path: Path) -> None:
        from dicom_node.demo import phantoms_classic

        (folder,) = write_cases(tmp_path / "c", 1, seed=9000, size=64, family="classic")
        item = phantoms_classic.plan_cases(1, 9000)[0]
        expected = phantoms_classic.make_case(
            item["seed"], 64, patient_id=item["patient_id"], anatomy_seed=item["anatomy_seed"]
        )
        assert pydicom.dcmread(folder / "image.dcm").PixelData == expected.dataset.PixelData

    def test_write_cases_family_b_and_unknown_family(self, tmp_path: Path) -> None:
        folders = write_cases(tmp_path / "b", 3, seed=2, size=64, family="B")
        assert pydicom.dcmread(folders[0] / "image.dcm").Manufacturer == "AltGamma Medical"
        with pytest.raises(ValueError, match="family must be"):
            write_cases(tmp_path / "c", 1, seed=1, family="C")
