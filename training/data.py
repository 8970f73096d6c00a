"""Training data: case folders of DICOM images plus masks, patient-level splits.

Folder layout (one folder per case; any folder names)::

    DATA/
      case0001/
        image.dcm            # one or more DICOM images (any file name; SEG files are told apart)
        truth.npz            # mask option 1: bool arrays named by segment key, (H, W) or (F, H, W)
      case0002/
        IM0001, IM0002 ...   # a multi-file series, in the node's frame order (below)
        seg.dcm              # mask option 2: DICOM SEG referencing the images
      case0003/
        image.dcm
        thyroid.nii.gz       # mask option 3: one NIfTI per segment key ...
        nodule.nii.gz
        # ... or labels.nii.gz, a label map decoded with the config's ``nifti_labels``

NIfTI masks must be on the image's pixel grid in array order (slices, rows, columns), i.e. what
``SimpleITK.GetArrayFromImage`` returns for a file written from the image stack; a mask in another
order is refused naming the file and both shapes. The readers are the model store's
(:mod:`dicom_node.modelstore.cases`), so a promotion-gate reference set can be any case folder.

**A multi-slice series is one case**: ``Case.frames`` is the whole (F, H, W) stack with each
slice's position (``Case.positions``), so evaluation reports 3-D figures per series.

**Frames are read by the node's own reader**
(:func:`dicom_node.modelstore.frames.read_case_folder`): the same frame order (along the slice
normal when the images have geometry, else by InstanceNumber; mask stacks follow it), the same
Modality LUT (CT in Hounsfield units) and the same float32 values the worker hands the model. A
model is trained on what the node will serve it.

**The leakage pitfall.** Several studies of one patient look alike (same gland, same nodules).
If one study lands in training and another in validation, the validation score measures memory,
not generalisation, and early stopping picks the wrong epoch. :func:`patient_split` therefore
splits by ``PatientID`` (the folder name when a case has none): a patient is in exactly one split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.modelstore.cases import CaseError, SegmentRef, read_labelled_case

__all__ = [
    "Case",
    "DataError",
    "FrameDataset",
    "SegmentRef",
    "dataset_hash",
    "find_cases",
    "load_case",
    "load_dataset",
    "patient_split",
]

LOGGER = logging.getLogger(__name__)

DataError = CaseError
"""A case cannot be used; the message names the case and the reason (``.case``, ``.reason``)."""


@dataclass
class Case:
    """One case: image frames, masks per segment key and where they came from.

    Attributes
    ----------
    name : str
        Folder name.
    patient_id : str
        PatientID from the DICOM header (folder name if absent): the unit of splitting.
    frames : numpy.ndarray
        float32 (F, H, W), exactly as the node reads them (Modality LUT applied: CT in HU).
    masks : numpy.ndarray
        bool (K, F, H, W) in the order of the requested segment keys.
    spacing : (float, float)
        Pixel spacing (row, column) in mm; (1, 1) when the header has none.
    mask_format : str
        ``npz``, ``seg`` or ``nifti``.
    files : list of Path
        The image files read.
    modality : str
        Modality of the first image (``""`` when absent): evaluation windows overlays by it.
    positions : tuple of float
        Each frame's position along the slice normal in mm, from the series geometry (3-D
        metrics of a multi-slice series; :func:`dicom_node.modelstore.scoring.slice_positions`).
    """

    name: str
    patient_id: str
    frames: np.ndarray
    masks: np.ndarray
    spacing: tuple[float, float]
    mask_format: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""
    positions: tuple[float, ...] = ()


def find_cases(root: Path | str) -> list[Path]:
    """Case folders under ``root`` (its sub-folders, sorted), or ``root`` itself if it has files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subs:
        return subs
    return [root] if any(root.iterdir()) else []


def load_case(
    folder: Path | str,
    segments: Sequence[SegmentRef],
    nifti_labels: Mapping[str, Sequence[int]] | None = None,
) -> Case:
    """Read one case folder.

    Parameters
    ----------
    folder : path
        The case folder (layout in the module docstring).
    segments : sequence of SegmentRef
        Segments to load, in output-channel order.
    nifti_labels : dict, optional
        For a NIfTI label map: segment key -> label values (``{thyroid: [1, 2], nodule: [2]}``).

    Returns
    -------
    Case

    Raises
    ------
    DataError
        No image, no mask, unreadable file, missing segment or a mask whose shape differs from
        the image's; the message names the case.
    """
    read = read_labelled_case(folder, segments, nifti_labels)
    if read.missing:
        found = sorted(read.masks) or "none"
        raise DataError(
            read.name,
            f"the {read.mask_format} mask has no segment {list(read.missing)} (found: {found})",
        )
    series = read.series
    patient = str(series.sources[0].get("PatientID", "") or "") or read.name
    return Case(
        name=read.name,
        patient_id=patient,
        frames=read.frames,
        masks=np.stack([read.masks[s.key] for s in segments]),
        spacing=series.spacing,
        mask_format=read.mask_format,
        files=read.files,
        modality=str(series.sources[0].get("Modality", "") or "").upper(),
        positions=read.positions,
    )


def load_dataset(
    root: Path | str,
    segments: Sequence[SegmentRef],
    *,
    skip_bad: bool = False,
    nifti_labels: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[int], None] | None = None,
    folders: Sequence[Path] | None = None,
) -> tuple[list[Case], list[DataError]]:
    """Load every case folder under ``root`` (or only ``folders``: no other file is opened).

    Returns
    -------
    (cases, skipped)
        ``skipped`` lists the bad cases (only when ``skip_bad``).

    Raises
    ------
    DataError
        The first bad case, unless ``skip_bad``.
    FileNotFoundError
        ``root`` does not exist.
    ValueError
        ``root`` holds no usable case.
    """
    cases: list[Case] = []
    skipped: list[DataError] = []
    folders = list(folders) if folders is not None else find_cases(root)
    for i, folder in enumerate(folders):
        try:
            cases.append(load_case(folder, segments, nifti_labels))
        except DataError as exc:
            if not skip_bad:
                raise
            LOGGER.warning("skipping %s", exc)
            skipped.append(exc)
        if progress is not None:
            progress(i + 1)
    if not cases:
        raise ValueError(f"data folder {str(root)!r} holds no usable case")
    return cases, skipped


def patient_split(
    cases: Sequence[Case], val_fraction: float, seed: int
) -> tuple[list[Case], list[Case]]:
    """Split cases into (train, validation) by patient: no patient is in both.

    Patients are shuffled with ``seed`` and taken into validation until it holds about
    ``val_fraction`` of the cases (at least one patient when there are two or more).

    Raises
    ------
    ValueError
        ``val_fraction`` is not in [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    patients = sorted({c.patient_id for c in cases})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    target = val_fraction * len(cases)
    val_patients: set[str] = set()
    n_val = 0
    for patient in patients:
        if n_val >= target or len(val_patients) >= len(patients) - 1:
            break
        val_patients.add(patient)
        n_val += sum(1 for c in cases if c.patient_id == patient)
    if val_fraction > 0 and not val_patients and len(patients) > 1:
        val_patients.add(patients[0])
    train = [c for c in cases if c.patient_id not in val_patients]
    val = [c for c in cases if c.patient_id in val_patients]
    return train, val


def dataset_hash(cases: Iterable[Case]) -> str:
    """sha256 over the cases' pixel data and masks (order-independent, by case name)."""
    digest = hashlib.sha256()
    for case in sorted(cases, key=lambda c: c.name):
        digest.update(case.name.encode())
        digest.update(np.ascontiguousarray(case.frames).tobytes())
        digest.update(np.packbits(case.masks).tobytes())
    return digest.hexdigest()


class FrameDataset:
    """Indexable (image, masks) pairs over every frame of every case, through ``transform``.

    ``dataset[i]`` returns the transformed sample dict; ``image`` is float32 (C, h, w) and
    ``masks`` float32 (K, h, w) after :class:`~training.transforms.ToNetworkInput`.
    """

    def __init__(self, cases: Sequence[Case], transform: Callable[[dict[str, Any]], Any]) -> None:
        self.cases = list(cases)
        self.index = [(ci, f) for ci, c in enumerate(self.cases) for f in range(c.frames.shape[0])]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, f = self.index[i]
        case = self.cases[ci]
        sample = {"image": case.frames[f], "masks": case.masks[:, f], "case": case.name}
        return self.transform(sample)
