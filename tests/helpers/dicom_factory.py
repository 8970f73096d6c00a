"""Synthetic but realistic DICOM sources for the tests: NM thyroid scintigraphy, SC, CT and MR.

Every factory returns a :class:`pydicom.Dataset` with ``file_meta`` (Explicit VR Little Endian),
ready for ``ds.save_as(path, enforce_file_format=True)`` or
``dcmwrite(..., enforce_file_format=True)``.
UIDs are deterministic: they derive from ``seed`` (and the role of the UID) through
``pydicom.uid.generate_uid(entropy_srcs=...)``, so two calls with the same arguments give the same
datasets byte for byte. Pass ``study_uid`` / ``series_uid`` to put several series in one study.

``**overrides`` set any top-level attribute by keyword after the dataset is built
(``make_nm(Modality="OT", StudyDescription=None)``; ``None`` deletes the attribute), which is how
tests craft sources a rule should or should not pick.

Every factory's output is clean under ``dciodvfy`` (no errors, no warnings); see ``DCIODVFY_NOTES``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "NM_IMAGE_STORAGE",
    "SC_IMAGE_STORAGE",
    "hash_seed",
    "make_ct_series",
    "make_mr_series",
    "make_nm",
    "make_sc",
    "thyroid_blob",
    "write_series",
]

NM_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.20")
SC_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")

DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's root; every generated UID lives under it."""

STUDY_DATE = "20261124"
STUDY_TIME = "081500"

DCIODVFY_NOTES = """
dciodvfy (dicom3tools) reports neither errors nor warnings for make_nm (1 or more frames), make_sc,
make_ct_series and make_mr_series with their defaults. Codes are SNOMED CT (SCT), not the deprecated
SRT/99SDM designators, and the NM Detector item carries ImagePositionPatient/ImageOrientationPatient
empty (type 2: a planar static view has no patient geometry).
"""


def _uid(seed: int | str, role: str, uid_root: str = DEFAULT_UID_ROOT) -> UID:
    """Deterministic UID for ``role`` (``"study"``, ``"series"``, ``"sop-3"``) under ``seed``."""
    return generate_uid(prefix=uid_root, entropy_srcs=["dicom-node-tests", str(seed), role])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def hash_seed(seed: int | str) -> int:
    """Stable (process-independent) integer from a seed for numpy generators."""
    if isinstance(seed, int):
        return abs(seed)
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "little")


def thyroid_blob(rows: int, cols: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Return a planar thyroid scintigram: two bright elliptic lobes on a low background.

    Parameters
    ----------
    rows, cols
        Image size in pixels.
    rng
        Random generator (or seed) for lobe jitter and Poisson noise; ``None`` means seed 0.

    Returns
    -------
    numpy.ndarray
        ``uint16`` counts, shape ``(rows, cols)``; lobes peak at 400-600 counts, background ~10.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(0 if rng is None else rng)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy = rows * (0.5 + rng.uniform(-0.04, 0.04))
    cx = cols * (0.5 + rng.uniform(-0.04, 0.04))
    lam = np.full((rows, cols), 10.0)
    for side in (-1.0, 1.0):
        ly = cy + rows * rng.uniform(-0.02, 0.02)
        lx = cx + side * cols * rng.uniform(0.10, 0.13)
        ry = rows * rng.uniform(0.16, 0.20)
        rx = cols * rng.uniform(0.06, 0.08)
        inside = ((yy - ly) / ry) ** 2 + ((xx - lx) / rx) ** 2
        lam += np.where(inside <= 1.0, rng.uniform(400, 600) * (1.0 - 0.5 * inside), 0.0)
    # a cold nodule in the right lobe
    ny, nx = cy + rows * 0.05, cx + cols * 0.11
    nodule = ((yy - ny) / (rows * 0.04)) ** 2 + ((xx - nx) / (cols * 0.03)) ** 2 <= 1.0
    lam[nodule] = np.minimum(lam[nodule], 30.0)
    return rng.poisson(lam).clip(0, 65535).astype(np.uint16)


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOMNODE_TEST"
    return meta


def _base(
    sop_class: UID,
    modality: str,
    *,
    seed: int | str,
    uid_root: str,
    study_uid: str | None,
    series_uid: str | None,
    instance_number: int,
    series_number: int,
    study_description: str,
    series_description: str,
    body_part: str | None,
) -> Dataset:
    """Patient, General Study, General Series, General Equipment, General Image, SOP Common."""
    sop_uid = _uid(seed, f"sop-{modality}-{series_number}-{instance_number}", uid_root)
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = STUDY_DATE
    ds.SeriesDate = STUDY_DATE
    ds.ContentDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.SeriesTime = STUDY_TIME
    ds.ContentTime = STUDY_TIME
    ds.AccessionNumber = "ACC000001"
    ds.Modality = modality
    ds.Manufacturer = "dicom-node test factory"
    ds.InstitutionName = "Synthetic Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH01"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    ds.PatientName = "Phantom^Thyroid"
    ds.PatientID = f"PHANTOM{str(seed)[:8]}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "056Y"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid or _uid(seed, "study", uid_root)
    ds.SeriesInstanceUID = series_uid or _uid(seed, f"series-{modality}-{series_number}", uid_root)
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    return ds


def _apply_overrides(ds: Dataset, overrides: dict[str, Any]) -> Dataset:
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _mono_pixels(ds: Dataset, pixels: np.ndarray, *, signed: bool = False) -> None:
    """Image Pixel module for MONOCHROME2 16-bit data (frames first when 3-D)."""
    arr = np.ascontiguousarray(pixels)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(arr.shape[-2])
    ds.Columns = int(arr.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = arr.astype(np.int16 if signed else np.uint16).tobytes()


def make_nm(
    rows: int = 256,
    cols: int = 256,
    frames: int = 1,
    study_uid: str | None = None,
    series_uid: str | None = None,
    pixels: np.ndarray | None = None,
    *,
    seed: int | str = 0,
    uid_root: str = DEFAULT_UID_ROOT,
    instance_number: int = 1,
    series_number: int = 1,
    **overrides: Any,
) -> Dataset:
    """Return an NM Image Storage instance: a static planar Tc-99m thyroid scintigram.

    Parameters
    ----------
    rows, cols
        Matrix size.
    frames
        NumberOfFrames (one energy window, one detector per frame; static acquisition).
    study_uid, series_uid
        UIDs to use; derived from ``seed`` when ``None``.
    pixels
        ``(frames, rows, cols)`` or ``(rows, cols)`` counts; :func:`thyroid_blob` when ``None``.
    seed
        Seeds the UIDs and the synthetic pixels.
    uid_root
        Prefix of generated UIDs.
    instance_number, series_number
        InstanceNumber and SeriesNumber (also feed the SOP Instance UID).
    **overrides
        Top-level attributes by keyword set last; ``None`` deletes.

    Returns
    -------
    pydicom.Dataset
        With ``file_meta``; PixelData uint16.
    """
    if pixels is None:
        rng = np.random.default_rng([hash_seed(seed), instance_number])
        pixels = np.stack([thyroid_blob(rows, cols, rng) for _ in range(frames)])
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape != (frames, rows, cols):
        raise ValueError(f"pixels must have shape {(frames, rows, cols)}, got {pixels.shape}")
    ds = _base(
        NM_IMAGE_STORAGE,
        "NM",
        seed=seed,
        uid_root=uid_root,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=instance_number,
        series_number=series_number,
        study_description="Thyroid scintigraphy",
        series_description="Thyroid Tc-99m anterior",
        body_part="THYROID",
    )
    # General Image / NM Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "STATIC", "EMISSION"]
    ds.AcquisitionDate = STUDY_DATE
    ds.AcquisitionTime = STUDY_TIME
    ds.LossyImageCompression = "00"
    ds.CountsAccumulated = int(pixels.sum(dtype=np.uint64) // frames)
    ds.ActualFrameDuration = 300000
    # NM/PET Patient Orientation
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = DicomSequence(
        [_code("40199007", "SCT", "supine")]
    )
    ds.PatientOrientationCodeSequence = DicomSequence([orient])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence(
        [_code("102540008", "SCT", "headfirst")]
    )
    # Acquisition Context
    ds.AcquisitionContextSequence = DicomSequence()
    # Image Pixel / NM Image Pixel
    _mono_pixels(ds, pixels)
    ds.PixelSpacing = [2.2, 2.2]
    ds.SmallestImagePixelValue = int(pixels.min())
    ds.LargestImagePixelValue = int(pixels.max())
    # Multi-frame / NM Multi-frame (static: energy window and detector vectors)
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1] * frames
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [1] * frames
    ds.NumberOfDetectors = 1
    # NM Isotope
    window = Dataset()
    window.EnergyWindowRangeSequence = DicomSequence([Dataset()])
    window.EnergyWindowRangeSequence[0].EnergyWindowLowerLimit = 126.0
    window.EnergyWindowRangeSequence[0].EnergyWindowUpperLimit = 154.0
    window.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = DicomSequence([window])
    radio = Dataset()
    radio.RadionuclideCodeSequence = DicomSequence([_code("72454006", "SCT", "^99m^Technetium")])
    radio.RadiopharmaceuticalRoute = "Intravenous"
    radio.RadiopharmaceuticalVolume = 1.0
    radio.RadiopharmaceuticalStartTime = "080000"
    radio.RadionuclideTotalDose = 74.0
    radio.Radiopharmaceutical = "Pertechnetate"
    radio.RadiopharmaceuticalCodeSequence = DicomSequence(
        [_code("19495007", "SCT", "Sodium pertechnetate Tc^99m^")]
    )
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([radio])
    # NM Detector
    detector = Dataset()
    detector.CollimatorGridName = "LEHR"
    detector.CollimatorType = "PARA"
    detector.FieldOfViewShape = "RECTANGLE"
    detector.FieldOfViewDimensions = [540, 400]
    detector.ZoomFactor = [1.0, 1.0]
    detector.ImagePositionPatient = None  # type 2: the planar view has no patient position
    detector.ImageOrientationPatient = None
    detector.ViewCodeSequence = DicomSequence([_code("399321004", "SCT", "Anterior projection")])
    ds.DetectorInformationSequence = DicomSequence([detector])
    return _apply_overrides(ds, overrides)


def make_sc(
    rows: int = 256,
    cols: int = 256,
    study_uid: str | None = None,
    series_uid: str | None = None,
    pixels: np.ndarray | None = None,
    *,
    seed: int | str = 0,
    uid_root: str = DEFAULT_UID_ROOT,
    instance_number: int = 1,
    series_number: int = 2,
    **overrides: Any,
) -> Dataset:
    """Return a single-frame Secondary Capture Image (MONOCHROME2, 16 bit, no frame of reference).

    Parameters are those of :func:`make_nm` (no ``frames``); pixels are a thyroid blob by default.
    """
    if pixels is None:
        pixels = thyroid_blob(rows, cols, np.random.default_rng([hash_seed(seed), 7]))
    pixels = np.asarray(pixels)
    if pixels.shape != (rows, cols):
        raise ValueError(f"pixels must have shape {(rows, cols)}, got {pixels.shape}")
    ds = _base(
        SC_IMAGE_STORAGE,
        "OT",
        seed=seed,
        uid_root=uid_root,
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=instance_number,
        series_number=series_number,
        study_description="Thyroid scintigraphy",
        series_description="Thyroid screenshot",
        body_part="THYROID",
    )
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DateOfSecondaryCapture = STUDY_DATE
    ds.TimeOfSecondaryCapture = STUDY_TIME
    _mono_pixels(ds, pixels)
    ds.PixelSpacing = [2.2, 2.2]
    return _apply_overrides(ds, overrides)


def _slice_series(
    sop_class: UID,
    modality: str,
    n_slices: int,
    rows: int,
    cols: int,
    study_uid: str | None,
    series_uid: str | None,
    seed: int | str,
    uid_root: str,
    series_number: int,
    study_description: str,
    series_description: str,
    body_part: str,
) -> tuple[list[Dataset], list[np.ndarray]]:
    rng = np.random.default_rng([hash_seed(seed), series_number])
    study_uid = study_uid or _uid(seed, "study", uid_root)
    series_uid = series_uid or _uid(seed, f"series-{modality}-{series_number}", uid_root)
    frame_of_reference = _uid(seed, f"for-{modality}-{series_number}", uid_root)
    thickness = 2.5
    datasets: list[Dataset] = []
    blobs: list[np.ndarray] = []
    for index in range(n_slices):
        ds = _base(
            sop_class,
            modality,
            seed=seed,
            uid_root=uid_root,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=index + 1,
            series_number=series_number,
            study_description=study_description,
            series_description=series_description,
            body_part=body_part,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-0.5 * cols * 0.8, -0.5 * rows * 0.8, -50.0 + index * thickness]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SliceThickness = thickness
        ds.SliceLocation = -50.0 + index * thickness
        ds.PixelSpacing = [0.8, 0.8]
        datasets.append(ds)
        blobs.append(thyroid_blob(rows, cols, rng).astype(np.int32))
    return datasets, blobs


def make_ct_series(
    n_slices: int = 5,
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    seed: int | str = 0,
    uid_root: str = DEFAULT_UID_ROOT,
    series_number: int = 3,
    **overrides: Any,
) -> list[Dataset]:
    """Return an axial CT Image Storage series (signed 16 bit, rescale -1024, 2.5 mm slices).

    Parameters
    ----------
    n_slices, rows, cols
        Series geometry; slices are stacked along +z with one FrameOfReferenceUID.
    study_uid, series_uid, seed, uid_root, series_number
        As for :func:`make_nm`.
    **overrides
        Applied to every slice.

    Returns
    -------
    list of pydicom.Dataset
        Ordered by InstanceNumber (and z).
    """
    datasets, blobs = _slice_series(
        CT_IMAGE_STORAGE,
        "CT",
        n_slices,
        rows,
        cols,
        study_uid,
        series_uid,
        seed,
        uid_root,
        series_number,
        "CT neck",
        "Neck axial 2.5mm",
        "NECK",
    )
    for ds, blob in zip(datasets, blobs, strict=True):
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        _mono_pixels(ds, (blob + 900).astype(np.int16), signed=True)
        _apply_overrides(ds, overrides)
    return datasets


def make_mr_series(
    n_slices: int = 5,
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    seed: int | str = 0,
    uid_root: str = DEFAULT_UID_ROOT,
    series_number: int = 4,
    **overrides: Any,
) -> list[Dataset]:
    """Return an axial T1 MR Image Storage series (unsigned 16 bit); see :func:`make_ct_series`."""
    datasets, blobs = _slice_series(
        MR_IMAGE_STORAGE,
        "MR",
        n_slices,
        rows,
        cols,
        study_uid,
        series_uid,
        seed,
        uid_root,
        series_number,
        "MR neck",
        "T1 axial",
        "NECK",
    )
    for ds, blob in zip(datasets, blobs, strict=True):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.ImagedNucleus = "1H"
        _mono_pixels(ds, blob.astype(np.uint16))
        _apply_overrides(ds, overrides)
    return datasets


def write_series(datasets: Sequence[Dataset], folder: str | Path) -> list[Path]:
    """Write each dataset as ``<folder>/<SOPInstanceUID>.dcm`` (File Format); return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
