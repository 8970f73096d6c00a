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

NIfTI masks must be on the image's pixel grid in array order (rows, columns), i.e. what
``SimpleITK.GetArrayFromImage`` returns for a file written from the image's pixel array.

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
import pydicom

from dicom_node.modelstore.frames import SeriesFrames, SeriesReadError, read_case_folder

LOGGER = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_MAP_NAMES = ("labels", "mask", "label")


class DataError(ValueError):
    """A case cannot be used; the message names the case and the reason."""

    def __init__(self, case: str, reason: str) -> None:
        super().__init__(f"case {case}: {reason}")
        self.case = case
        self.reason = reason


@dataclass(frozen=True)
class SegmentRef:
    """How to find one segment in the mask files: its key, label and SNOMED type code."""

    key: str
    label: str = ""
    type_code: str = ""


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
    """

    name: str
    patient_id: str
    frames: np.ndarray
    masks: np.ndarray
    spacing: tuple[float, float]
    mask_format: str
    files: list[Path] = field(default_factory=list)
    modality: str = ""


def find_cases(root: Path | str) -> list[Path]:
    """Case folders under ``root`` (its sub-folders, sorted), or ``root`` itself if it has files."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subs:
        return subs
    return [root] if any(root.iterdir()) else []


def _masks_from_npz(path: Path, keys: Sequence[str], shape: tuple[int, int, int]) -> np.ndarray:
    with np.load(path) as data:
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{path.name} has no array for {missing} (has {sorted(data.files)})")
        arrays = [np.asarray(data[k]).astype(bool) for k in keys]
    return np.stack([a.reshape((1, *a.shape)) if a.ndim == 2 else a for a in arrays])


def _masks_from_seg(
    seg: pydicom.Dataset,
    series: SeriesFrames,
    segments: Sequence[SegmentRef],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Decode a (binary or fractional) SEG into (K, F, H, W) on the images' frames."""
    number_for: dict[str, int] = {}
    for item in seg.SegmentSequence:
        label = str(item.get("SegmentLabel", "")).lower()
        code = ""
        if "SegmentedPropertyTypeCodeSequence" in item:
            code = str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue)
        for ref in segments:
            if ref.key in number_for:
                continue
            if label in (ref.key.lower(), ref.label.lower()) or (
                ref.type_code and code == ref.type_code
            ):
                number_for[ref.key] = int(item.SegmentNumber)
                break
    missing = [ref.key for ref in segments if ref.key not in number_for]
    if missing:
        labels = [str(i.get("SegmentLabel", "")) for i in seg.SegmentSequence]
        raise ValueError(f"SEG has no segment for {missing} (segments: {labels})")
    # frame index of each source (SOP instance UID, frame number)
    index = {
        (str(series.sources[source].SOPInstanceUID), number): f
        for f, (source, number) in enumerate(series.origins)
    }
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        pixels = pixels >= float(seg.get("MaximumFractionalValue", 255)) / 2
    out = np.zeros((len(segments), *shape), dtype=bool)
    per_frame = seg.PerFrameFunctionalGroupsSequence
    key_of = {num: i for i, num in enumerate(number_for[ref.key] for ref in segments)}
    for n, item in enumerate(per_frame):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in key_of:
            continue
        target = _seg_frame_target(item, index)
        if target is None:
            if len(index) == 1:
                target = 0
            else:
                raise ValueError(f"SEG frame {n + 1} references no known source frame")
        out[key_of[number], target] |= pixels[n].astype(bool)
    return out


def _seg_frame_target(item: pydicom.Dataset, index: dict[tuple[str, int], int]) -> int | None:
    for deriv in item.get("DerivationImageSequence", []):
        for src in deriv.get("SourceImageSequence", []):
            uid = str(src.ReferencedSOPInstanceUID)
            frames = src.get("ReferencedFrameNumber", 1)
            frame = int(frames[0] if isinstance(frames, Sequence) else frames)
            if (uid, frame) in index:
                return index[(uid, frame)]
            if (uid, 1) in index:
                return index[(uid, 1)]
    return None


def _read_nifti(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _masks_from_nifti(
    folder: Path,
    keys: Sequence[str],
    shape: tuple[int, int, int],
    nifti_labels: Mapping[str, Sequence[int]] | None,
) -> np.ndarray:
    per_key = {}
    for key in keys:
        for suffix in NIFTI_SUFFIXES:
            if (folder / f"{key}{suffix}").exists():
                per_key[key] = _read_nifti(folder / f"{key}{suffix}") > 0
    if len(per_key) == len(keys):
        arrays = [per_key[k] for k in keys]
    else:
        label_file = next(
            (
                folder / f"{n}{s}"
                for n in LABEL_MAP_NAMES
                for s in NIFTI_SUFFIXES
                if (folder / f"{n}{s}").exists()
            ),
            None,
        )
        if label_file is None:
            missing = [k for k in keys if k not in per_key]
            raise ValueError(f"no NIfTI mask for {missing} and no labels.nii.gz label map")
        if not nifti_labels:
            raise ValueError(f"{label_file.name} is a label map but the config has no nifti_labels")
        labels = _read_nifti(label_file)
        arrays = [np.isin(labels, list(nifti_labels.get(k, []))) for k in keys]
    return np.stack([a.reshape((1, *a.shape)) if a.ndim == 2 else a for a in arrays])


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
    folder = Path(folder)
    name = folder.name
    keys = [s.key for s in segments]
    try:
        read = read_case_folder(folder)
    except SeriesReadError as exc:
        raise DataError(name, str(exc)) from exc
    except OSError as exc:
        raise DataError(name, f"unreadable folder ({exc})") from exc
    series, segs, files = read.series, read.segs, read.files
    if any(f.ndim != 2 for f in series.frames):
        samples = series.sources[0].get("SamplesPerPixel")
        raise DataError(name, f"only grey images are supported, SamplesPerPixel={samples}")
    try:
        frames = series.stack()
    except ValueError as exc:
        raise DataError(name, f"cannot stack the frames ({exc})") from exc
    shape = frames.shape
    has_nifti = any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir())
    try:
        if (folder / "truth.npz").exists():
            fmt, masks = "npz", _masks_from_npz(folder / "truth.npz", keys, shape)
        elif segs:
            fmt, masks = "seg", _masks_from_seg(segs[0], series, segments, shape)
        elif has_nifti:
            fmt, masks = "nifti", _masks_from_nifti(folder, keys, shape, nifti_labels)
        else:
            raise DataError(name, "no mask (expected truth.npz, a DICOM SEG or NIfTI files)")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(name, f"cannot read the mask ({exc})") from exc
    if masks.shape[1:] != shape:
        raise DataError(
            name, f"mask shape {tuple(masks.shape[1:])} does not match image shape {shape}"
        )
    patient = str(series.sources[0].get("PatientID", "") or "") or name
    return Case(
        name=name,
        patient_id=patient,
        frames=frames,
        masks=masks,
        spacing=series.spacing,
        mask_format=fmt,
        files=files,
        modality=str(series.sources[0].get("Modality", "") or "").upper(),
    )


def load_dataset(
    root: Path | str,
    segments: Sequence[SegmentRef],
    *,
    skip_bad: bool = False,
    nifti_labels: Mapping[str, Sequence[int]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Case], list[DataError]]:
    """Load every case folder under ``root``.

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
    folders = find_cases(root)
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
