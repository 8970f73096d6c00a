"""Synthetic abdominal CT for the worked example: a liver with a lesion, multi-slice, NIfTI masks.

``python -m training.examples.ct_liver OUT --n 8`` writes one folder per patient::

    OUT/ctliver001/
      CT0001.dcm ... CT0012.dcm   # one axial CT series (CT Image Storage), HU via rescale
      labels.nii.gz               # label map on the image grid: 1 liver, 2 lesion

The label map follows the common liver-tumour convention (LiTS): the lesion is inside the liver
and carries label 2, so the liver *organ* is labels {1, 2} and the lesion {2}; the example
config decodes it with ``data.nifti_labels: {liver: [1, 2], lesion: [2]}``.

Geometry is real: ImagePositionPatient steps along +z by the slice thickness, one
FrameOfReferenceUID per series, pixel spacing in mm, so 3-D metrics (HD95 in mm) use it.
Intensities: air -1000 HU, soft tissue ~40, liver ~60 and a hypodense lesion ~-20 (the lesion
shows in a soft-tissue window), Gaussian noise of 10 HU. The liver sits on the image's left
(the patient's right): one-sided, so the example config does not flip left-right.

Everything derives from ``--seed``: the same arguments write the same pixels and UIDs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

LOGGER = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
LIVER, LESION = 1, 2


def _uid(seed: int, *parts: object) -> UID:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["ct-liver", str(seed), *map(str, parts)])


def phantom_volume(
    rng: np.random.Generator, size: int, slices: int
) -> tuple[np.ndarray, np.ndarray]:
    """One patient's volume: (HU float32 (F, H, W), labels uint8 (F, H, W))."""
    zz, yy, xx = np.mgrid[0:slices, 0:size, 0:size].astype(np.float64)
    hu = np.full((slices, size, size), -1000.0)
    body = ((yy - size * 0.5) / (size * 0.36)) ** 2 + ((xx - size * 0.5) / (size * 0.44)) ** 2
    hu[body <= 1.0] = 40.0
    cz = slices * rng.uniform(0.45, 0.55)
    cy, cx = size * rng.uniform(0.42, 0.5), size * rng.uniform(0.3, 0.36)
    rz, ry, rx = (
        slices * rng.uniform(0.32, 0.4),
        size * rng.uniform(0.2, 0.24),
        size * rng.uniform(0.14, 0.18),
    )
    liver = ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    hu[liver] = rng.uniform(55.0, 65.0)
    # the lesion: a sphere well inside the liver (centre within half its semi-axes)
    lr = size * rng.uniform(0.08, 0.11)
    lz = cz + rng.uniform(-0.3, 0.3) * rz
    ly = cy + rng.uniform(-0.35, 0.35) * ry
    lx = cx + rng.uniform(-0.35, 0.35) * rx
    lesion = (((zz - lz) * 2.0) ** 2 + (yy - ly) ** 2 + (xx - lx) ** 2 <= lr**2) & liver
    hu[lesion] = rng.uniform(-25.0, -15.0)
    hu += rng.normal(0.0, 10.0, hu.shape)
    labels = np.zeros(hu.shape, np.uint8)
    labels[liver] = LIVER
    labels[lesion] = LESION
    return hu.astype(np.float32), labels


def _slice(
    seed: int,
    case: int,
    index: int,
    hu: np.ndarray,
    spacing: float,
    thickness: float,
) -> Dataset:
    patient = f"CTLIVER{case:03d}"
    sop = _uid(seed, case, "sop", index)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20261124"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = f"CTL{case:05d}"
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-node ct example"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT abdomen"
    ds.SeriesDescription = f"Abdomen axial {thickness:g}mm"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientName = f"Phantom^Liver{case:03d}"
    ds.PatientID = patient
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(seed, case, "study")
    ds.SeriesInstanceUID = _uid(seed, case, "series")
    ds.FrameOfReferenceUID = _uid(seed, case, "for")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.InstanceNumber = index + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientOrientation = ""
    ds.PatientPosition = "FFS"
    size = hu.shape[0]
    ds.ImagePositionPatient = [-0.5 * size * spacing, -0.5 * size * spacing, index * thickness]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = thickness
    ds.SliceLocation = index * thickness
    ds.PixelSpacing = [spacing, spacing]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    stored = np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    return ds


def write_dataset(
    out: Path | str,
    n: int = 8,
    *,
    seed: int = 0,
    size: int = 64,
    slices: int = 12,
    spacing: float | None = None,
    thickness: float = 5.0,
) -> list[Path]:
    """Write ``n`` patients (one CT series + ``labels.nii.gz`` each); return the folders.

    ``spacing`` (mm) defaults to a 384 mm field of view over ``size`` pixels.
    """
    import SimpleITK as sitk

    out = Path(out)
    spacing = spacing if spacing is not None else 384.0 / size
    folders = []
    for case in range(1, n + 1):
        rng = np.random.default_rng([seed, case])
        hu, labels = phantom_volume(rng, size, slices)
        folder = out / f"ctliver{case:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(slices):
            ds = _slice(seed, case, index, hu[index], spacing, thickness)
            ds.save_as(folder / f"CT{index + 1:04d}.dcm", enforce_file_format=True)
        image = sitk.GetImageFromArray(labels)  # array order (slices, rows, columns)
        image.SetSpacing((spacing, spacing, thickness))
        sitk.WriteImage(image, str(folder / "labels.nii.gz"))
        folders.append(folder)
    return folders


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", type=click.IntRange(min=1), default=8, show_default=True, help="Patients.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=click.IntRange(min=32), default=64, show_default=True)
@click.option("--slices", type=click.IntRange(min=2), default=12, show_default=True)
def main(out: Path, n: int, seed: int, size: int, slices: int) -> None:
    """Write N synthetic abdominal CT patients (liver + lesion, NIfTI label maps) to OUT."""
    folders = write_dataset(out, n, seed=seed, size=size, slices=slices)
    click.echo(f"wrote {len(folders)} CT cases ({slices} slices of {size}x{size}) to {out}")


if __name__ == "__main__":
    main()
