"""Synthetic thyroid studies: determinism, truth, headers, DICOM validity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.demo import phantoms_alt, phantoms_c, phantoms_d
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
            write_cases(tmp_path / "z", 1, seed=1, family="Z")


class TestFamilyC:
    """The third independent style (reporting only): same contract, a 3-D projected gland."""

    def test_same_seeds_same_study_and_anatomy_is_shared(self) -> None:
        a, b = phantoms_c.make_case(3, 128), phantoms_c.make_case(3, 128)
        assert a.dataset.PixelData == b.dataset.PixelData and a.meta == b.meta
        for key in ("thyroid", "nodule"):
            np.testing.assert_array_equal(a.truth[key], b.truth[key])
        other_study = phantoms_c.make_case(4, 128, anatomy_seed=3)
        assert other_study.dataset.PixelData != a.dataset.PixelData
        assert other_study.meta["cold_nodules"] == a.meta["cold_nodules"]
        assert other_study.meta["lobes"] == a.meta["lobes"]
        assert phantoms_c.make_case(5, 128).meta["lobes"] != a.meta["lobes"]

    @pytest.mark.parametrize("seed", range(10))
    def test_truth_contract(self, seed: int) -> None:
        case = phantoms_c.make_case(seed, 128)
        assert set(case.truth) == {"thyroid", "nodule"}
        thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
        assert thyroid.dtype == bool and nodule.dtype == bool
        assert thyroid.shape == nodule.shape == (128, 128)
        assert thyroid.sum() > 30
        assert not (nodule & ~thyroid).any()
        assert bool(nodule.any()) == bool(case.meta["cold_nodules"])
        assert case.meta["family"] == "C" and case.meta["size"] == 128

    def test_gland_is_brighter_than_its_surroundings_and_cold_nodules_darker(self) -> None:
        """The truth sits where the image shows the gland; large cold nodules show as defects."""
        inside, ring, gland, cold = [], [], [], []
        for seed in range(24):
            case = phantoms_c.make_case(seed, 128)
            img = case.dataset.pixel_array.astype(float)
            thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
            grown = thyroid.copy()
            for _ in range(4):
                grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
                grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            inside.append(img[thyroid].mean())
            ring.append(img[grown & ~thyroid].mean())
            big = [n for n in case.meta["cold_nodules"] if n["diameter_mm"] > 12]
            if big and nodule.sum() > 15:
                gland.append(img[thyroid & ~nodule].mean())
                cold.append(img[nodule].mean())
        assert np.median(np.array(inside) / np.array(ring)) > 2.0
        assert len(cold) >= 3 and np.median(np.array(cold) / np.array(gland)) < 0.9

    def test_the_generator_covers_the_documented_variety(self) -> None:
        metas = [phantoms_c.make_case(seed, 64).meta for seed in range(60)]
        nodules = [n for m in metas for n in m["cold_nodules"]]
        on_edge = 0
        for seed in range(20):
            truth = phantoms_c.make_case(seed, 64).truth
            on_edge += int((truth["nodule"] & surface(truth["thyroid"])).any())
        assert on_edge >= 3, "some nodules must reach the gland's outline"
        assert {m["geometry"] for m in metas} == {"pinhole", "parallel"}
        assert {n["location"] for n in nodules} == {"inside", "surface", "pole"}
        assert any(n["bulge"] for n in nodules) and any(n["big"] for n in nodules)
        assert min(n["diameter_mm"] for n in nodules) < 7.0
        assert any(m["hot_nodules"] for m in metas) and any(m["single_lobe"] for m in metas)
        assert {m["habitus"] for m in metas} == {"normal", "goitre", "small"}
        assert any(m["salivary_glands"] for m in metas)
        assert len({m["marker_kind"] for m in metas}) >= 5
        fwhm = [m["fwhm_mm"] for m in metas]
        assert 0.8 <= min(fwhm) < 2.0 and 5.0 < max(fwhm) <= 7.5
        totals = [m["total_counts"] for m in metas]
        assert 1.0e4 < min(totals) < 5e4 and 3e5 < max(totals) < 1.1e6

    def test_spacing_follows_the_matrix_and_header_matches_meta(self) -> None:
        small, large = phantoms_c.make_case(7, 128), phantoms_c.make_case(7, 256)
        s128, s256 = (float(c.dataset.PixelSpacing[0]) for c in (small, large))
        assert s128 == pytest.approx(2 * s256, rel=1e-3)
        for case, size in ((small, 128), (large, 256)):
            ds = case.dataset
            assert ds.Rows == ds.Columns == size
            assert ds.pixel_array.shape == (size, size) and ds.pixel_array.dtype == np.uint16
            assert float(ds.PixelSpacing[0]) == pytest.approx(case.meta["pixel_spacing_mm"])
            assert ds.CountsAccumulated == int(ds.pixel_array.sum())
        fovs = [phantoms_c.make_case(s, 64).meta for s in range(30)]
        parallel = [m["fov_mm"] for m in fovs if m["geometry"] == "parallel"]
        pinhole = [m["fov_mm"] for m in fovs if m["geometry"] == "pinhole"]
        assert min(parallel) >= 100 and max(parallel) <= 320 and max(pinhole) <= 200

    def test_header_style_differs_from_families_a_and_b(self) -> None:
        a, b = make_case(4, 256).dataset, phantoms_alt.make_case(4, 256).dataset
        c = phantoms_c.make_case(4, 256).dataset
        assert len({a.Manufacturer, b.Manufacturer, c.Manufacturer}) == 3
        assert c.Manufacturer == "Cygnus Nuclear"
        assert c.SeriesDescription not in (a.SeriesDescription, b.SeriesDescription)
        assert c.Modality == "NM" and c.SOPClassUID == NM_IMAGE_STORAGE
        window = c.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
        assert float(window.EnergyWindowLowerLimit) < 140 < float(window.EnergyWindowUpperLimit)
        headers = [phantoms_c.make_case(s, 64).dataset for s in range(10)]
        assert {"WindowCenter" in ds for ds in headers} == {True, False}

    def test_small_or_odd_size_is_refused(self) -> None:
        for size in (16, 130):
            with pytest.raises(ValueError, match="size must be a multiple of 4"):
                phantoms_c.make_case(1, size)

    @pytest.mark.parametrize(("seed", "size"), [(1, 128), (2, 256), (6, 128), (7, 256)])
    def test_dciodvfy_finds_no_error(self, tmp_path: Path, seed: int, size: int) -> None:
        path = tmp_path / "nm.dcm"
        phantoms_c.make_case(seed, size).dataset.save_as(path, enforce_file_format=True)
        result = dciodvfy(path)
        assert result.errors == [], result.output

    def test_write_cases_family_c(self, tmp_path: Path) -> None:
        folders = write_cases(tmp_path / "c", 4, seed=2, size=[128, 64], family="C")
        assert [f.name for f in folders] == [f"case{i:04d}" for i in range(4)]
        for folder in folders:
            ds = pydicom.dcmread(folder / "image.dcm")
            assert ds.Manufacturer == "Cygnus Nuclear" and ds.PatientID.startswith("CPH")
            with np.load(folder / "truth.npz") as truth:
                assert set(truth.files) == {"thyroid", "nodule"}
                assert truth["thyroid"].shape == (ds.Rows, ds.Columns)
        direct = phantoms_c.write_cases(tmp_path / "d", 4, seed=2, size=[128, 64])
        assert [pydicom.dcmread(f / "image.dcm").PixelData for f in direct] == [
            pydicom.dcmread(f / "image.dcm").PixelData for f in folders
        ]


class TestFamilyD:
    """The fourth independent style (reporting only): same contract, spline lobes, metaballs."""

    def test_same_seeds_same_study_and_anatomy_is_shared(self) -> None:
        a, b = phantoms_d.make_case(3, 128), phantoms_d.make_case(3, 128)
        assert a.dataset.PixelData == b.dataset.PixelData and a.meta == b.meta
        for key in ("thyroid", "nodule"):
            np.testing.assert_array_equal(a.truth[key], b.truth[key])
        other_study = phantoms_d.make_case(4, 128, anatomy_seed=3)
        assert other_study.dataset.PixelData != a.dataset.PixelData
        assert other_study.dataset.StudyInstanceUID != a.dataset.StudyInstanceUID
        assert other_study.dataset.PatientID == a.dataset.PatientID == "DEL-00000003"
        assert other_study.dataset.PatientName == a.dataset.PatientName
        for key in ("cold_nodules", "hot_nodules", "lobe_lengths_mm", "single_lobe", "isthmus"):
            assert other_study.meta[key] == a.meta[key]
        assert phantoms_d.make_case(5, 128).meta["lobe_lengths_mm"] != a.meta["lobe_lengths_mm"]
        ds = a.dataset
        uids = {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
        assert len(uids) == 3 and all(u.startswith("1.2.826.0.1.3680043.8.498.") for u in uids)

    @pytest.mark.parametrize("seed", range(12))
    def test_truth_contract(self, seed: int) -> None:
        case = phantoms_d.make_case(seed, 128)
        assert set(case.truth) == {"thyroid", "nodule"}
        thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
        assert thyroid.dtype == bool and nodule.dtype == bool
        assert thyroid.shape == nodule.shape == (128, 128)
        assert thyroid.sum() > 30
        assert not (nodule & ~thyroid).any()
        assert bool(nodule.any()) == bool(case.meta["cold_nodules"])
        # the gland lies inside the field, never on the frame's edge
        assert not (thyroid[0].any() or thyroid[-1].any() or thyroid[:, 0].any())
        assert not thyroid[:, -1].any()
        assert case.meta["family"] == "D" and case.meta["size"] == 128
        assert json.loads(json.dumps(case.meta)) == case.meta

    def test_gland_is_brighter_than_its_surroundings_and_cold_nodules_darker(self) -> None:
        """The truth sits where the image shows the gland; large cold nodules show as defects."""
        inside, ring, gland, cold = [], [], [], []
        for seed in range(24):
            case = phantoms_d.make_case(seed, 128)
            img = case.dataset.pixel_array.astype(float)
            thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
            grown = thyroid.copy()
            for _ in range(4):
                grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0)
                grown = grown | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
            inside.append(img[thyroid].mean())
            ring.append(img[grown & ~thyroid].mean())
            big = [n for n in case.meta["cold_nodules"] if n["diameter_mm"] > 12]
            if big and nodule.sum() > 15:
                gland.append(img[thyroid & ~nodule].mean())
                cold.append(img[nodule].mean())
        assert np.median(np.array(inside) / np.array(ring)) > 2.0
        assert len(cold) >= 3 and np.median(np.array(cold) / np.array(gland)) < 0.8

    def test_hot_nodules_are_gland_and_never_nodule(self) -> None:
        hot = [s for s in range(60) if phantoms_d.make_case(s, 64).meta["hot_nodules"]]
        assert len(hot) >= 5
        for seed in hot[:4]:
            case = phantoms_d.make_case(seed, 128)
            img = case.dataset.pixel_array.astype(float)
            thyroid, nodule = case.truth["thyroid"], case.truth["nodule"]
            # the hottest pixel of the study is in the gland (an adenoma), not in a cold nodule
            peak = np.unravel_index(np.argmax(img * thyroid), img.shape)
            assert thyroid[peak] and not nodule[peak]

    def test_the_generator_covers_the_documented_variety(self) -> None:
        metas = [phantoms_d.make_case(seed, 64).meta for seed in range(60)]
        nodules = [n for m in metas for n in m["cold_nodules"]]
        on_edge = 0
        for seed in range(20):
            truth = phantoms_d.make_case(seed, 64).truth
            on_edge += int((truth["nodule"] & surface(truth["thyroid"])).any())
        assert on_edge >= 3, "some nodules must reach the gland's outline"
        assert {m["geometry"] for m in metas} == {"pinhole", "parallel"}
        assert {m["nuclide"] for m in metas} == {"Tc-99m", "I-123"}
        assert {n["location"] for n in nodules} == {"inside", "surface", "pole"}
        assert any(n["bulge"] for n in nodules) and not all(n["bulge"] for n in nodules)
        assert min(n["diameter_mm"] for n in nodules) < 6.0
        assert max(n["diameter_mm"] for n in nodules) > 25.0
        residual = [n["residual"] for n in nodules]
        assert 0.0 <= min(residual) < 0.05 and 0.35 < max(residual) <= 0.4
        assert any(m["hot_nodules"] for m in metas) and any(m["single_lobe"] for m in metas)
        assert {m["isthmus"] for m in metas} == {"absent", "thin", "broad"}
        assert any(m["pyramidal_lobe"] for m in metas)
        assert {"normal", "goitre", "small", "slender"} == {m["habitus"] for m in metas}
        assert len({m["marker_kind"] for m in metas}) >= 5
        assert any(m["coarse_zoom"] for m in metas) and any(m["circular_field"] for m in metas)
        assert any(abs(m["tilt_deg"]) > 8 for m in metas)
        fwhm = [m["fwhm_mm"] for m in metas]
        assert 1.2 <= min(fwhm) < 2.0 and 5.5 < max(fwhm) <= 7.5
        totals = [m["total_counts"] for m in metas]
        assert 1.0e4 <= min(totals) < 3e4 and 4e5 < max(totals) < 1.3e6

    def test_spacing_follows_the_matrix_and_header_matches_meta(self) -> None:
        small, large = phantoms_d.make_case(7, 128), phantoms_d.make_case(7, 256)
        s128, s256 = (float(c.dataset.PixelSpacing[0]) for c in (small, large))
        assert s128 == pytest.approx(2 * s256, rel=1e-3)
        for case, size in ((small, 128), (large, 256)):
            ds = case.dataset
            assert ds.Rows == ds.Columns == size
            assert ds.pixel_array.shape == (size, size) and ds.pixel_array.dtype == np.uint16
            assert float(ds.PixelSpacing[0]) == pytest.approx(case.meta["pixel_spacing_mm"])
            assert ds.CountsAccumulated == int(ds.pixel_array.sum()) == case.meta["pixel_sum"]
            assert ds.BitsAllocated == 16 and ds.NumberOfFrames == 1
        metas = [phantoms_d.make_case(s, 64).meta for s in range(30)]
        parallel = [m["fov_mm"] for m in metas if m["geometry"] == "parallel"]
        pinhole = [m["fov_mm"] for m in metas if m["geometry"] == "pinhole"]
        assert min(parallel) >= 200 and max(parallel) <= 320
        assert min(pinhole) >= 80 and max(pinhole) <= 200

    def test_header_style_differs_from_families_a_b_and_c(self) -> None:
        a, b = make_case(4, 256).dataset, phantoms_alt.make_case(4, 256).dataset
        c, d = phantoms_c.make_case(4, 256).dataset, phantoms_d.make_case(4, 256).dataset
        assert len({a.Manufacturer, b.Manufacturer, c.Manufacturer, d.Manufacturer}) == 4
        assert d.Manufacturer == "Delphinus Imaging"
        assert d.SeriesDescription not in (a.SeriesDescription, b.SeriesDescription)
        assert d.SeriesDescription != c.SeriesDescription
        assert d.Modality == "NM" and d.SOPClassUID == NM_IMAGE_STORAGE
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert list(d.ImageType)[2:] == ["STATIC", "EMISSION"]
        for seed in range(12):  # the window holds the photopeak unless it was set wrong
            case = phantoms_d.make_case(seed, 32)
            item = case.dataset.EnergyWindowInformationSequence[0].EnergyWindowRangeSequence[0]
            peak = 140.5 if case.meta["nuclide"] == "Tc-99m" else 159.0
            low, high = float(item.EnergyWindowLowerLimit), float(item.EnergyWindowUpperLimit)
            assert low < peak < high or case.meta["wrong_window"]

    def test_small_or_odd_size_is_refused(self) -> None:
        for size in (16, 28, 130):
            with pytest.raises(ValueError, match="size must be a multiple of 4"):
                phantoms_d.make_case(1, size)
        assert phantoms_d.make_case(1, 32).truth["thyroid"].shape == (32, 32)

    @pytest.mark.parametrize(("seed", "size"), [(1, 128), (2, 256), (6, 128), (9, 256)])
    def test_dciodvfy_finds_no_error(self, tmp_path: Path, seed: int, size: int) -> None:
        path = tmp_path / "nm.dcm"
        phantoms_d.make_case(seed, size).dataset.save_as(path, enforce_file_format=True)
        result = dciodvfy(path)
        assert result.errors == [], result.output

    def test_write_cases_family_d(self, tmp_path: Path) -> None:
        folders = write_cases(tmp_path / "d", 4, seed=2, size=[128, 64], family="D")
        assert [f.name for f in folders] == [f"case{i:04d}" for i in range(4)]
        plan = plan_cases(4, 2)
        for folder, item in zip(folders, plan, strict=True):
            ds = pydicom.dcmread(folder / "image.dcm")
            assert ds.Manufacturer == "Delphinus Imaging"
            assert ds.PatientID == "D" + item["patient_id"]
            assert ds.Rows == [128, 64][item["seed"] % 2]
            with np.load(folder / "truth.npz") as truth:
                assert set(truth.files) == {"thyroid", "nodule"}
                assert truth["thyroid"].shape == (ds.Rows, ds.Columns)
        direct = phantoms_d.write_cases(tmp_path / "e", 4, seed=2, size=[128, 64])
        assert [pydicom.dcmread(f / "image.dcm").PixelData for f in direct] == [
            pydicom.dcmread(f / "image.dcm").PixelData for f in folders
        ]
        with pytest.raises(ValueError, match="n must be at least 1"):
            phantoms_d.write_cases(tmp_path / "f", 0, seed=2)
