"""Data loading (npz, DICOM SEG, NIfTI), bad data, patient split, transforms."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_node.demo.phantoms import make_case, write_case, write_cases
from dicom_node.modelstore.manifest import InputSpec
from dicom_node.modelstore.processing import Preprocess
from tests.helpers.dicom_factory import make_ct_series
from training.data import Case, DataError, SegmentRef, load_case, load_dataset, patient_split
from training.transforms import (
    Compose,
    RandAffine,
    RandCountScale,
    RandCrop,
    RandFlipLR,
    ToNetworkInput,
    build_augmentation,
)

REFS = [
    SegmentRef("thyroid", "Thyroid", "69748006"),
    SegmentRef("nodule", "Cold nodule", "27925004"),
]
SPEC = InputSpec(
    name="image",
    size=(64, 64),
    channels=1,
    normalization={"method": "percentile", "lower": 0.0, "upper": 99.5},
)


def _phantom_folder(tmp_path: Path, seed: int = 1, size: int = 64) -> tuple[Path, dict]:
    case = make_case(seed, size)
    folder = write_case(case, tmp_path / f"case{seed}")
    return folder, case.truth


class TestMaskFormats:
    def test_npz(self, tmp_path: Path) -> None:
        folder, truth = _phantom_folder(tmp_path)
        case = load_case(folder, REFS)
        assert case.mask_format == "npz"
        assert case.frames.shape == (1, 64, 64)
        np.testing.assert_array_equal(case.masks[0, 0], truth["thyroid"])
        np.testing.assert_array_equal(case.masks[1, 0], truth["nodule"])
        assert case.patient_id.startswith("PHANTOM-")
        assert case.spacing[0] > 0.1

    def test_dicom_seg_built_with_highdicom(self, tmp_path: Path) -> None:
        series = make_ct_series(n_slices=2, rows=32, cols=32, seed=3)
        thyroid = np.zeros((2, 32, 32), bool)
        thyroid[:, 8:24, 6:26] = True
        nodule = np.zeros((2, 32, 32), bool)
        nodule[1, 12:16, 10:14] = True
        descriptions = [
            hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=label,
                segmented_property_category=hd.sr.CodedConcept(
                    "123037004", "SCT", "Anatomical Structure"
                ),
                segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
            for i, (label, code, meaning) in enumerate(
                [
                    ("Thyroid", "69748006", "Thyroid structure"),
                    ("Cold nodule", "27925004", "Nodule"),
                ]
            )
        ]
        seg = hd.seg.Segmentation(
            source_images=series,
            pixel_array=np.stack([thyroid, nodule], axis=-1).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=99,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="test",
            manufacturer_model_name="test",
            software_versions="1",
            device_serial_number="1",
        )
        folder = tmp_path / "ct"
        folder.mkdir()
        for i, ds in enumerate(reversed(series)):  # file order must not matter
            ds.save_as(folder / f"IM{i}", enforce_file_format=True)
        seg.save_as(folder / "seg.dcm")
        case = load_case(folder, REFS)
        assert case.mask_format == "seg"
        assert case.frames.shape == (2, 32, 32)
        # in slice order (the contract's frame order), Modality LUT applied (HU)
        np.testing.assert_array_equal(
            case.frames[0], series[0].pixel_array.astype(np.float32) - 1024
        )
        np.testing.assert_array_equal(case.masks[0], thyroid)
        np.testing.assert_array_equal(case.masks[1], nodule)

    def test_nifti_per_segment_files(self, tmp_path: Path) -> None:
        import SimpleITK as sitk

        folder, truth = _phantom_folder(tmp_path, seed=2)
        (folder / "truth.npz").unlink()
        for key in ("thyroid", "nodule"):
            sitk.WriteImage(
                sitk.GetImageFromArray(truth[key].astype(np.uint8)), str(folder / f"{key}.nii.gz")
            )
        case = load_case(folder, REFS)
        assert case.mask_format == "nifti"
        np.testing.assert_array_equal(case.masks[1, 0], truth["nodule"])

    def test_nifti_label_map(self, tmp_path: Path) -> None:
        import SimpleITK as sitk

        folder, truth = _phantom_folder(tmp_path, seed=3)
        (folder / "truth.npz").unlink()
        labels = truth["thyroid"].astype(np.uint8) + truth["nodule"].astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labels.nii.gz"))
        case = load_case(folder, REFS, nifti_labels={"thyroid": [1, 2], "nodule": [2]})
        np.testing.assert_array_equal(case.masks[0, 0], truth["thyroid"])
        np.testing.assert_array_equal(case.masks[1, 0], truth["nodule"])
        with pytest.raises(DataError, match="case3: .*no nifti_labels"):
            load_case(folder, REFS)


class TestBadData:
    def test_missing_mask_names_the_case(self, tmp_path: Path) -> None:
        folder, _ = _phantom_folder(tmp_path, seed=4)
        (folder / "truth.npz").unlink()
        with pytest.raises(DataError, match="case case4: no mask"):
            load_case(folder, REFS)

    def test_shape_mismatch_names_the_case(self, tmp_path: Path) -> None:
        folder, _ = _phantom_folder(tmp_path, seed=5)
        np.savez(
            folder / "truth.npz", thyroid=np.zeros((32, 32), bool), nodule=np.zeros((32, 32), bool)
        )
        expected = r"case case5: truth.npz\['thyroid'\] has shape \(1, 32, 32\) but the images"
        with pytest.raises(DataError, match=expected + r" are \(1, 64, 64\)"):
            load_case(folder, REFS)

    def test_unreadable_dicom_names_the_case(self, tmp_path: Path) -> None:
        folder, _ = _phantom_folder(tmp_path, seed=6)
        data = (folder / "image.dcm").read_bytes()
        (folder / "image.dcm").write_bytes(data[:400])  # truncated inside the header
        with pytest.raises(DataError, match="case case6: "):
            load_case(folder, REFS)

    def test_skip_bad_lists_and_continues(self, tmp_path: Path) -> None:
        for seed in (7, 8):
            _phantom_folder(tmp_path, seed=seed)
        (tmp_path / "case8" / "truth.npz").unlink()
        with pytest.raises(DataError, match="case8"):
            load_dataset(tmp_path, REFS)
        cases, skipped = load_dataset(tmp_path, REFS, skip_bad=True)
        assert [c.name for c in cases] == ["case7"]
        assert [e.case for e in skipped] == ["case8"]


def _fake_case(name: str, patient: str) -> Case:
    return Case(
        name,
        patient,
        np.zeros((1, 4, 4), np.float32),
        np.zeros((2, 1, 4, 4), bool),
        (1.0, 1.0),
        "npz",
    )


class TestPatientSplit:
    def test_phantom_patients_with_several_studies_stay_together(self, tmp_path: Path) -> None:
        write_cases(tmp_path, 16, seed=12, size=32)
        cases, _ = load_dataset(tmp_path, REFS)
        train, val = patient_split(cases, 0.3, seed=1)
        assert val and train
        assert not {c.patient_id for c in train} & {c.patient_id for c in val}
        assert len(train) + len(val) == 16

    @settings(max_examples=40, deadline=None)
    @given(
        patients=st.lists(st.integers(0, 12), min_size=2, max_size=40),
        fraction=st.floats(0.05, 0.9),
        seed=st.integers(0, 1000),
    )
    def test_no_patient_in_two_splits(
        self, patients: list[int], fraction: float, seed: int
    ) -> None:
        cases = [_fake_case(f"c{i}", f"P{p}") for i, p in enumerate(patients)]
        train, val = patient_split(cases, fraction, seed)
        assert not {c.patient_id for c in train} & {c.patient_id for c in val}
        assert sorted(c.name for c in train + val) == sorted(c.name for c in cases)
        if len(set(patients)) > 1:
            assert train and val

    def test_bad_fraction_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            patient_split([], 1.0, 0)


class TestTransforms:
    def _sample(self) -> dict:
        case = make_case(9, 64)
        masks = np.stack([case.truth["thyroid"], case.truth["nodule"]])
        return {"image": case.dataset.pixel_array.astype(np.float32), "masks": masks, "case": "c"}

    def test_flip_is_left_right_only(self) -> None:
        sample = self._sample()
        out = RandFlipLR(prob=1.0)(sample)
        np.testing.assert_array_equal(out["image"], sample["image"][:, ::-1])
        np.testing.assert_array_equal(out["masks"], sample["masks"][..., ::-1])

    def test_count_thinning_keeps_integer_counts_and_lowers_the_total(self) -> None:
        sample = self._sample()
        out = RandCountScale(prob=1.0, low=0.3, high=0.3).set_random_state(1)(sample)
        total, thinned = sample["image"].sum(), out["image"].sum()
        assert thinned == pytest.approx(0.3 * total, rel=0.05)
        assert np.all(out["image"] <= sample["image"])
        np.testing.assert_array_equal(out["image"], np.rint(out["image"]))

    def test_affine_keeps_masks_binary_and_aligned_with_the_image(self) -> None:
        sample = self._sample()
        out = RandAffine(prob=1.0, rotate_deg=10, scale=(1.1, 1.1)).set_random_state(3)(sample)
        assert out["masks"].dtype == bool and out["masks"].shape == sample["masks"].shape
        inside = out["image"][out["masks"][0]].mean()
        outside = out["image"][~out["masks"][0]].mean()
        assert inside > 3 * outside

    def test_network_input_is_the_node_preprocessing(self) -> None:
        sample = self._sample()
        out = ToNetworkInput(SPEC.model_copy(update={"size": (96, 96)}))(sample)
        expected = Preprocess(SPEC.model_copy(update={"size": (96, 96)}))(sample["image"])
        np.testing.assert_array_equal(out["image"], expected)
        assert out["masks"].shape == (2, 96, 96)

    def test_seeded_pipeline_is_reproducible(self) -> None:
        config = {"counts": {"prob": 0.5}, "flip_lr": 0.5, "affine": {"prob": 0.5}}
        runs = []
        for _ in range(2):
            pipeline = Compose(
                [*build_augmentation(config), ToNetworkInput(SPEC)]
            ).set_random_state(5)
            runs.append([pipeline(self._sample())["image"] for _ in range(3)])
        for a, b in zip(*runs, strict=True):
            np.testing.assert_array_equal(a, b)

    def test_crop_keeps_image_and_masks_aligned(self) -> None:
        sample = ToNetworkInput(SPEC)(self._sample())
        out = RandCrop(32, foreground_prob=1.0).set_random_state(2)(sample)
        assert out["image"].shape == (1, 32, 32) and out["masks"].shape == (2, 32, 32)
        assert out["masks"][0].sum() > 0
        with pytest.raises(ValueError, match="crop size must be at least 8"):
            RandCrop(4)

    def test_failure_names_the_transform_and_case(self) -> None:
        bad = {"image": np.zeros((4, 4)), "masks": None, "case": "case42"}
        with pytest.raises(RuntimeError, match="applying transform RandFlipLR to case case42"):
            Compose([RandFlipLR(prob=1.0)])(bad)

    def test_unknown_augmentation_key_is_refused(self) -> None:
        with pytest.raises(
            ValueError, match="augment has unknown key 'flip_ud'; did you mean 'flip_lr'"
        ):
            build_augmentation({"flip_ud": 0.5})
