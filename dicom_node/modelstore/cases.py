"""Labelled case folders: DICOM images plus masks, read one way for training and the gate.

A case folder holds one series (one or more DICOM files, any names; SEG files are told apart)
and its true masks in one of four formats::

    case0001/
      image.dcm                 # or IM0001, IM0002, ... (a multi-file series)
      truth.npz                 # 1: bool arrays named by segment key, (H, W) or (F, H, W)
      seg.dcm                   # 2: a DICOM SEG referencing the images (segments matched by
                                #    label, key or SNOMED type code)
      liver.nii.gz, lesion.nii  # 3: one NIfTI per segment key
      labels.nii.gz             # 4: a NIfTI label map, decoded with ``nifti_labels``
                                #    (``{liver: [1, 2], lesion: [2]}``)

NIfTI masks must be on the image grid in array order (slices, rows, columns): what
``SimpleITK.GetArrayFromImage`` returns for a file written from the image stack. A mask in
another order (nibabel's ``get_fdata`` gives (columns, rows, slices)) is refused with the file
and both shapes named.

Training (:mod:`training.data`) and the promotion gate (:mod:`dicom_node.modelstore.gate`) both
read cases here, on the node's frame reader
(:func:`~dicom_node.modelstore.frames.read_case_folder`), so a reference set can be any
training case folder.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom

from dicom_node.modelstore.frames import SeriesFrames, SeriesReadError, read_case_folder
from dicom_node.modelstore.scoring import slice_positions

LOGGER = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_MAP_NAMES = ("labels", "mask", "label")
LABELS_FILE = "labels.yaml"
"""In a reference set's root: ``{KEY: [label values]}`` for NIfTI label maps."""

MAX_MASK_BYTES = 2 * 1024**3
"""Largest decoded NIfTI mask accepted (a hostile header cannot make us allocate more)."""


class CaseError(ValueError):
    """A case cannot be used; the message names the case (folder) and the reason."""

    def __init__(self, case: str, reason: str) -> None:
        super().__init__(f"case {case}: {reason}")
        self.case = case
        self.reason = reason


class MaskShapeError(ValueError):
    """A mask file is not on the images' grid (names the file and both shapes)."""


@dataclass(frozen=True)
class SegmentRef:
    """How to find one segment in the mask files: its key, label and SNOMED type code."""

    key: str
    label: str = ""
    type_code: str = ""


@dataclass(frozen=True)
class LabelledCase:
    """One case folder read: frames, geometry and the true masks found.

    Attributes
    ----------
    name:
        Folder name.
    series:
        The images as the node reads them.
    frames:
        float32 (F, H, W).
    masks:
        Segment key -> bool (F, H, W), for the keys the mask files hold.
    missing:
        Requested keys the mask files do not hold.
    mask_format:
        ``npz``, ``seg`` or ``nifti``.
    positions:
        Each frame's position along the slice normal in mm (3-D metrics).
    files:
        The DICOM files read.
    """

    name: str
    series: SeriesFrames
    frames: np.ndarray
    masks: dict[str, np.ndarray]
    missing: tuple[str, ...]
    mask_format: str
    positions: tuple[float, ...]
    files: list[Path] = field(default_factory=list)


def _fit(name: str, array: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``array`` as (F, H, W) on the image grid, or ValueError naming both shapes."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.shape == shape:
        return array
    hint = ""
    if array.ndim == 3 and sorted(array.shape) == sorted(shape):
        hint = (
            "; it holds the same sizes in another order: write masks in array order "
            "(slices, rows, columns), e.g. SimpleITK.GetImageFromArray(mask) - nibabel's "
            "get_fdata() order (columns, rows, slices) needs mask.transpose(2, 1, 0)"
        )
    raise MaskShapeError(
        f"{name} has shape {tuple(array.shape)} but the images are {shape} (slices, rows, "
        f"columns){hint}"
    )


def _from_npz(
    path: Path, keys: Sequence[str], shape: tuple[int, int, int]
) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {
            k: _fit(f"{path.name}[{k!r}]", np.asarray(data[k]), shape).astype(bool)
            for k in keys
            if k in data.files
        }


def _from_seg(
    seg: pydicom.Dataset, series: SeriesFrames, segments: Sequence[SegmentRef]
) -> dict[str, np.ndarray]:
    """Decode a (binary or fractional) SEG into (F, H, W) masks on the images' frames."""
    shape = (len(series.frames), *series.frames[0].shape[:2])
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
    index = {
        (str(series.sources[source].SOPInstanceUID), number): f
        for f, (source, number) in enumerate(series.origins)
    }
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    if (int(seg.Rows), int(seg.Columns)) != shape[1:]:
        raise ValueError(f"SEG frames are {seg.Rows}x{seg.Columns}, the images {shape[1:]}")
    if str(seg.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        pixels = pixels >= float(seg.get("MaximumFractionalValue", 255)) / 2
    out = {key: np.zeros(shape, dtype=bool) for key in number_for}
    key_of = {num: key for key, num in number_for.items()}
    for n, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if number not in key_of:
            continue
        target = _seg_frame_target(item, index)
        if target is None:
            if len(index) != 1:
                raise ValueError(f"SEG frame {n + 1} references no image of the case")
            target = 0
        out[key_of[number]][target] |= pixels[n].astype(bool)
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


NIFTI_DTYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    64: np.float64,
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
}
"""NIfTI-1 datatype codes the numpy reader takes (masks and label maps)."""


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI file's array in (slices, rows, columns) order, as SimpleITK gives it.

    SimpleITK when installed (training); else a small NIfTI-1 reader (the node alone), which
    takes the integer and float types masks use and refuses more than :data:`MAX_MASK_BYTES`.

    Raises
    ------
    ValueError
        Not a NIfTI-1 file, an unsupported datatype, or too large.
    """
    try:
        import SimpleITK as sitk
    except ImportError:
        return _read_nifti1(path)
    return np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))


def _read_nifti1(path: Path) -> np.ndarray:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        header = fh.read(348)
        if len(header) < 348:
            raise ValueError(f"{path.name}: too short for a NIfTI-1 header")
        order: Literal["<", ">"] = "<" if int.from_bytes(header[:4], "little") == 348 else ">"
        if int.from_bytes(header[:4], "little" if order == "<" else "big") != 348:
            raise ValueError(f"{path.name}: not a NIfTI-1 file (sizeof_hdr is not 348)")
        dims = np.frombuffer(header[40:56], dtype=f"{order}i2")
        code = int(np.frombuffer(header[70:72], dtype=f"{order}i2")[0])
        offset = int(np.frombuffer(header[108:112], dtype=f"{order}f4")[0])
        ndim = int(dims[0])
        if code not in NIFTI_DTYPES or not 1 <= ndim <= 7:
            raise ValueError(f"{path.name}: NIfTI datatype {code} / {ndim} dims not supported")
        shape = [max(int(d), 1) for d in dims[1 : ndim + 1]]
        dtype = np.dtype(NIFTI_DTYPES[code]).newbyteorder(order)
        size = int(np.prod(shape)) * dtype.itemsize
        if size > MAX_MASK_BYTES:
            raise ValueError(f"{path.name}: declares {size} bytes of mask data (limit reached)")
        fh.read(max(offset, 348) - 348)
        data = np.frombuffer(fh.read(size), dtype=dtype)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path.name}: truncated ({data.size} of {int(np.prod(shape))} values)")
    # x varies fastest on disk: reversed dims give (z, y, x), i.e. (slices, rows, columns)
    return data.reshape(shape[::-1])


def _nifti_file(folder: Path, stem: str) -> Path | None:
    return next(
        (folder / f"{stem}{s}" for s in NIFTI_SUFFIXES if (folder / f"{stem}{s}").is_file()),
        None,
    )


def _from_nifti(
    folder: Path,
    keys: Sequence[str],
    shape: tuple[int, int, int],
    nifti_labels: Mapping[str, Sequence[int]] | None,
) -> dict[str, np.ndarray]:
    per_key = {}
    for key in keys:
        path = _nifti_file(folder, key)
        if path is not None:
            per_key[key] = _fit(path.name, read_nifti(path), shape) > 0
    if len(per_key) == len(keys):
        return per_key
    label_file = next(
        (p for p in (_nifti_file(folder, n) for n in LABEL_MAP_NAMES) if p is not None), None
    )
    if label_file is None:
        return per_key
    if not nifti_labels:
        raise ValueError(
            f"{label_file.name} is a label map but no nifti_labels are given (the config's "
            f"data.nifti_labels, or {LABELS_FILE} in a reference set: {{KEY: [values]}})"
        )
    values = _fit(label_file.name, read_nifti(label_file), shape)
    for key in keys:
        if key not in per_key and key in nifti_labels:
            per_key[key] = np.isin(values, list(nifti_labels[key]))
    return per_key


def read_labelled_case(
    folder: Path | str,
    segments: Sequence[SegmentRef],
    nifti_labels: Mapping[str, Sequence[int]] | None = None,
) -> LabelledCase:
    """Read one case folder: images by the node's reader, masks in whichever format it has.

    Masks are looked for in this order: ``truth.npz``, a DICOM SEG, NIfTI files.

    Raises
    ------
    CaseError
        No image, no mask file, an unreadable file, a grey-scale problem, or a mask whose shape
        differs from the images' (the file and both shapes named).
    """
    folder = Path(folder)
    name = folder.name
    try:
        read = read_case_folder(folder)
    except SeriesReadError as exc:
        raise CaseError(name, str(exc)) from exc
    except OSError as exc:
        raise CaseError(name, f"unreadable folder ({exc})") from exc
    series = read.series
    if any(f.ndim != 2 for f in series.frames):
        samples = series.sources[0].get("SamplesPerPixel")
        raise CaseError(name, f"only grey images are supported, SamplesPerPixel={samples}")
    try:
        frames = series.stack()
    except ValueError as exc:
        raise CaseError(name, f"cannot stack the frames ({exc})") from exc
    shape = (int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2]))
    keys = [s.key for s in segments]
    has_nifti = any(p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir())
    try:
        if (folder / "truth.npz").is_file():
            fmt, masks = "npz", _from_npz(folder / "truth.npz", keys, shape)
        elif read.segs:
            fmt, masks = "seg", _from_seg(read.segs[0], series, segments)
        elif has_nifti:
            fmt, masks = "nifti", _from_nifti(folder, keys, shape, nifti_labels)
        else:
            raise CaseError(name, "no mask (expected truth.npz, a DICOM SEG or NIfTI files)")
    except CaseError:
        raise
    except MaskShapeError as exc:
        raise CaseError(name, str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any unreadable mask file: say which case
        raise CaseError(name, f"cannot read the mask: {exc}") from exc
    return LabelledCase(
        name=name,
        series=series,
        frames=frames,
        masks=masks,
        missing=tuple(k for k in keys if k not in masks),
        mask_format=fmt,
        positions=tuple(slice_positions(series.sources, shape[0])),
        files=read.files,
    )
