"""The frame reader of the model contract: DICOM instances -> ordered float frames + geometry.

Everything that feeds a model reads its pixels here: the worker (what the node serves), the
promotion gate, and training's data loading and evaluation. A version is therefore trained,
evaluated and gated on exactly the numbers the node gives it.

What a frame is
    * **Order**: instances sorted along the normal of the image plane when they have
      ImagePositionPatient and ImageOrientationPatient, else by InstanceNumber (ties keep the
      order given); a multi-frame instance contributes its frames in order. Mask stacks
      (``truth.npz`` of training and reference data) follow this order.
    * **Values**: the Modality LUT applied (RescaleSlope/RescaleIntercept, per-frame or shared
      Pixel Value Transformation of enhanced objects, or a Modality LUT Sequence), as float32.
      CT frames are therefore Hounsfield units, which is what a ``fixed`` CT window in a manifest
      means. Images without a Modality LUT (most NM) keep their stored values.
    * **Colour**: a multi-sample frame stays (H, W, S) (RGB as pydicom decodes it); the
      manifest's preprocessing uses it as is when S equals the input channels, else averages it
      to grey.

Decoding
    pydicom's decoder plugins first (pylibjpeg with libjpeg/openjpeg, GDCM, Pillow, pyjpegls:
    whichever are installed), then GDCM's own image reader on the whole file, which also reads
    what pydicom's plugins refuse (12-bit JPEG Extended). A syntax no backend reads fails with
    the syntax's name and the backends tried. Before anything is decoded, the size the header
    declares (Rows x Columns x frames x samples x bytes per sample) is checked against the
    caller's budget (the node's ``max_pixels``), so a pixel bomb fails its job instead of the
    worker.

Errors name instances by position ("instance 3 of 12 (InstanceNumber 7)"), never by UID: they
go to logs and job errors, where patient data must not.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

LOGGER = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
"""Segmentation Storage: told apart from images when a folder is read."""

MASK_SUFFIXES = (".npz", ".nii", ".nii.gz")
"""Files in a case folder that are masks, never images."""


GDCM_READER = "GDCM image reader"
"""Name of the last decoder backend (GDCM reading the whole file) in error messages."""


class SeriesReadError(ValueError):
    """An instance cannot be decoded into frames (a job fails with this message)."""


class PixelBudgetError(SeriesReadError):
    """An instance declares more decoded pixel data than the budget allows (nothing decoded)."""


@dataclass(frozen=True)
class SeriesFrames:
    """A series ready for a 2-D model.

    Attributes
    ----------
    sources:
        The instances, in frame order (see the module docstring).
    frames:
        One float32 array per frame over ``sources`` in order: (H, W), or (H, W, S) for
        multi-sample (colour) images; Modality LUT applied.
    origins:
        Per frame, ``(index into sources, frame number from 1)``: where the frame came from.
    spacing:
        Pixel spacing (row, column) in mm of the first instance: PixelSpacing, else
        ImagerPixelSpacing, else (1, 1).
    """

    sources: list[Dataset]
    frames: list[np.ndarray]
    origins: list[tuple[int, int]]
    spacing: tuple[float, float]

    def stack(self) -> np.ndarray:
        """Return the frames as one float32 array (F, H, W[, S]).

        Raises
        ------
        ValueError
            The frames differ in shape.
        """
        shapes = sorted({f.shape for f in self.frames})
        if len(shapes) > 1:
            raise ValueError(f"frames must all have one shape to be stacked, got {shapes}")
        return np.stack(self.frames).astype(np.float32, copy=False)


def slice_key(ds: Dataset) -> tuple[float, float]:
    """Sort key: position along the image normal when geometry exists, else InstanceNumber."""
    number = float(getattr(ds, "InstanceNumber", 0) or 0)
    ipp = getattr(ds, "ImagePositionPatient", None)
    iop = getattr(ds, "ImageOrientationPatient", None)
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.dot(normal, np.asarray(ipp, float))), number
    return number, 0.0


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (pydicom lists each decoder's complaint on its own line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def _rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) for frame ``frame`` (0-based): per-frame, shared, then top level."""
    groups: list[Any] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        transform = group.get("PixelValueTransformationSequence")
        if transform:
            item = transform[0]
            return float(item.get("RescaleSlope", 1) or 1), float(
                item.get("RescaleIntercept", 0) or 0
            )
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return None


def modality_lut(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """Apply ``ds``'s Modality LUT to its grey stored values (F, H, W); return float32.

    Rescale slope/intercept (per frame when the object has functional groups) or a Modality LUT
    Sequence; without either the stored values are returned as float32.
    """
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    out = np.empty(pixels.shape, dtype=np.float32)
    for index in range(pixels.shape[0]):
        rescale = _rescale(ds, index)
        if rescale is None or rescale == (1.0, 0.0):
            out[index] = pixels[index]
        else:
            slope, intercept = rescale
            out[index] = pixels[index].astype(np.float64) * slope + intercept
    return out


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def decoded_size(ds: Dataset) -> int:
    """Bytes of decoded pixel data the header declares, before anything is decoded.

    Rows x Columns x NumberOfFrames x SamplesPerPixel x ceil(BitsAllocated / 8); absent
    attributes count as 0 (Rows, Columns) or 1.
    """
    bits = _int(ds, "BitsAllocated", 8)
    return (
        _int(ds, "Rows", 0)
        * _int(ds, "Columns", 0)
        * max(_int(ds, "NumberOfFrames", 1), 1)
        * max(_int(ds, "SamplesPerPixel", 1), 1)
        * max((bits + 7) // 8, 1)
    )


def check_budget(ds: Dataset, name: str, max_bytes: int | None) -> None:
    """Refuse an instance whose declared decoded size exceeds ``max_bytes`` (None: no limit).

    Raises
    ------
    PixelBudgetError
        Names the instance, the declared geometry and the budget, and what to do.
    """
    if max_bytes is None:
        return
    size = decoded_size(ds)
    if size > max_bytes:
        raise PixelBudgetError(
            f"{name}: the header declares {size} bytes of decoded pixel data "
            f"({_int(ds, 'Rows', 0)} x {_int(ds, 'Columns', 0)}, "
            f"{_int(ds, 'NumberOfFrames', 1)} frame(s), {_int(ds, 'SamplesPerPixel', 1)} "
            f"sample(s), {_int(ds, 'BitsAllocated', 8)} bits allocated), more than the "
            f"worker's budget max_pixels = {max_bytes} bytes; nothing was decoded. If the image "
            "is genuine, raise max_pixels in the node configuration and retry the job"
        )


def _syntax(ds: Dataset) -> Any:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def decoder_backends(syntax: Any) -> list[str]:
    """The decoder backends installed for ``syntax``, in the order they are tried."""
    from pydicom.pixels.decoders.base import get_decoder

    backends: list[str] = []
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError):
        decoder = None
    if decoder is not None:
        if not syntax.is_compressed:
            backends.append("pydicom (native)")
        else:
            backends += [
                "pydicom (built-in)" if plugin == "pydicom" else f"pydicom/{plugin}"
                for plugin in decoder.available_plugins
            ]
    if syntax.is_compressed and _gdcm() is not None:
        backends.append(GDCM_READER)
    return backends


def _gdcm() -> Any:
    """GDCM's Python module with its console chatter off, or None when it is not installed."""
    try:
        import gdcm
    except ImportError:
        return None
    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    return gdcm


_GDCM_DTYPES = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT16": np.int16,
    "UINT32": np.uint32,
    "INT32": np.int32,
}


def _gdcm_pixels(ds: Dataset) -> np.ndarray:
    """Decode ``ds`` with GDCM's image reader (the whole file), shaped as pydicom shapes it.

    Raises
    ------
    ValueError
        GDCM cannot read it, or what it read does not match the header.
    """
    import tempfile

    gdcm = _gdcm()
    if gdcm is None:
        raise ValueError("GDCM is not installed")
    filename = getattr(ds, "filename", None)
    with tempfile.TemporaryDirectory() as tmp:
        if not isinstance(filename, str) or not Path(filename).is_file():
            filename = str(Path(tmp) / "instance.dcm")
            ds.save_as(filename, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(filename)
        if not reader.Read():
            raise ValueError("GDCM cannot read the file")
        image = reader.GetImage()
        fmt = image.GetPixelFormat()
        dtype = _GDCM_DTYPES.get(fmt.GetScalarTypeAsString())
        if dtype is None:
            raise ValueError(f"GDCM decodes to {fmt.GetScalarTypeAsString()}")
        buffer = image.GetBuffer()
        if buffer is None:
            raise ValueError("GDCM decoded no pixel data")
        raw = buffer.encode("utf-8", "surrogateescape")
        photometric = str(image.GetPhotometricInterpretation()).strip()
        planar = int(image.GetPlanarConfiguration())
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames, samples = max(_int(ds, "NumberOfFrames", 1), 1), int(fmt.GetSamplesPerPixel())
    pixels = np.frombuffer(raw, dtype=dtype)
    if pixels.size != rows * cols * frames * samples:
        raise ValueError(
            f"GDCM decoded {pixels.size} samples, the header declares "
            f"{rows * cols * frames * samples}"
        )
    if samples > 1:
        if planar == 1:
            pixels = pixels.reshape(frames, samples, rows, cols).transpose(0, 2, 3, 1)
        else:
            pixels = pixels.reshape(frames, rows, cols, samples)
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, "YBR_FULL", "RGB")
    else:
        pixels = pixels.reshape(frames, rows, cols)
    return pixels[0] if frames == 1 else pixels


_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins:"


def decode_pixels(ds: Dataset, name: str) -> np.ndarray:
    """Decode an instance's pixel data as pydicom shapes it, trying every backend.

    Parameters
    ----------
    ds:
        The instance with its Pixel Data and File Meta (the transfer syntax).
    name:
        How errors name the instance ("instance 3 of 12 (InstanceNumber 7)").

    Raises
    ------
    SeriesReadError
        No backend decodes it: the message names the instance, the transfer syntax, the
        backends tried and each one's complaint, and what to do.
    """
    syntax = _syntax(ds)
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many types for bad pixel data
        first = exc
    if syntax is None:
        raise SeriesReadError(
            f"{name}: pixel data cannot be decoded: the instance has no Transfer Syntax UID; "
            f"resend it: {_one_line(first)}"
        ) from first
    reasons = [f"pydicom: {_one_line(first).removeprefix(_ALL_PLUGINS_FAILED).strip()}"]
    if syntax.is_compressed and _gdcm() is not None:
        try:
            pixels = _gdcm_pixels(ds)
        except ValueError as exc:  # what _gdcm_pixels itself found wrong
            reasons.append(f"GDCM: {_one_line(exc)}")
        except Exception:  # GDCM's SWIG layer: its own text says nothing to a person
            LOGGER.debug("%s: GDCM failed", name, exc_info=True)
            reasons.append("GDCM: cannot decode it")
        else:
            LOGGER.info("%s: decoded by %s (pydicom's plugins could not)", name, GDCM_READER)
            return pixels
    backends = decoder_backends(syntax)
    tried = ", ".join(backends) if backends else "none installed for this syntax"
    advice = (
        "resend it uncompressed or in another transfer syntax"
        if syntax.is_compressed
        else "the file is damaged; resend it"
    )
    raise SeriesReadError(
        f"{name}: pixel data ({syntax.name}) cannot be decoded: {'; '.join(reasons)} "
        f"(backends tried: {tried}); {advice}"
    ) from first


def instance_frames(ds: Dataset, name: str, max_bytes: int | None = None) -> list[np.ndarray]:
    """Decode one instance into its float32 frames (module docstring).

    Parameters
    ----------
    max_bytes:
        Budget for the decoded pixel data the header declares (:func:`decoded_size`); None:
        no limit.

    Raises
    ------
    PixelBudgetError
        The header declares more than ``max_bytes`` (nothing is decoded).
    SeriesReadError
        The pixel data cannot be decoded (see :func:`decode_pixels`).
    """
    check_budget(ds, name, max_bytes)
    pixels = decode_pixels(ds, name)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if samples > 1:  # colour: (F, H, W, S); the Modality LUT applies to grey images only
        stack = pixels.reshape(-1, *pixels.shape[-3:]).astype(np.float32)
        return list(stack)
    if n_frames > 1 or pixels.ndim == 3:
        stack = pixels.reshape(-1, *pixels.shape[-2:])
    else:
        stack = pixels[None]
    return list(modality_lut(ds, stack))


def _spacing(ds: Dataset) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        spacing = measures[0].get("PixelSpacing") if measures else None
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    except (TypeError, ValueError, IndexError):
        return (1.0, 1.0)


def _label(index: int, total: int, ds: Dataset) -> str:
    # instances are named by position and InstanceNumber: the text goes to logs, UIDs must not
    label = f"instance {index} of {total}"
    number = getattr(ds, "InstanceNumber", None)
    return f"{label} (InstanceNumber {number})" if number is not None else label


def series_frames(
    datasets: Sequence[Dataset],
    names: Sequence[str] | None = None,
    *,
    max_bytes: int | None = None,
) -> SeriesFrames:
    """Order already-read instances and decode their frames.

    Parameters
    ----------
    datasets:
        The instances of one series, in arrival (or file-name) order.
    names:
        How errors name each instance; default "instance i of n (InstanceNumber k)".
    max_bytes:
        Budget per instance for its declared decoded pixel data (see :func:`check_budget`);
        every instance is checked before the first is decoded.

    Raises
    ------
    PixelBudgetError
        An instance declares more than ``max_bytes``.
    SeriesReadError
        No instance, or an instance's pixel data cannot be decoded.
    """
    if not datasets:
        raise SeriesReadError("the series has no image instance")
    labels = (
        list(names)
        if names is not None
        else [_label(i, len(datasets), ds) for i, ds in enumerate(datasets, start=1)]
    )
    for ds, label in zip(datasets, labels, strict=True):
        check_budget(ds, label, max_bytes)
    order = sorted(range(len(datasets)), key=lambda i: slice_key(datasets[i]))
    sources = [datasets[i] for i in order]
    frames: list[np.ndarray] = []
    origins: list[tuple[int, int]] = []
    for position, index in enumerate(order):
        decoded = instance_frames(datasets[index], labels[index], max_bytes)
        frames.extend(decoded)
        origins.extend((position, number) for number in range(1, len(decoded) + 1))
    return SeriesFrames(
        sources=sources, frames=frames, origins=origins, spacing=_spacing(sources[0])
    )


def read_series(paths: Sequence[Path], *, max_bytes: int | None = None) -> SeriesFrames:
    """Read every instance file of a series, order them and decode their frames.

    Raises
    ------
    PixelBudgetError
        An instance declares more decoded pixel data than ``max_bytes``.
    SeriesReadError
        A file cannot be read or its pixel data decoded; the message names the instance by its
        position in arrival order and its InstanceNumber (not by UID), and the transfer syntax.
    """
    datasets, names = read_instances(paths)
    return series_frames(datasets, names, max_bytes=max_bytes)


def read_instances(paths: Sequence[Path]) -> tuple[list[Dataset], list[str]]:
    """Read every instance file of a series (nothing decoded); return them with their names.

    Returns
    -------
    datasets, names:
        In the order of ``paths``; ``names[i]`` is "instance i of n (InstanceNumber k)".

    Raises
    ------
    SeriesReadError
        A file cannot be read as DICOM (named by position).
    """
    datasets: list[Dataset] = []
    names: list[str] = []
    for index, path in enumerate(paths, start=1):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise SeriesReadError(
                f"instance {index} of {len(paths)}: not readable as DICOM: {_one_line(exc)}"
            ) from exc
        datasets.append(ds)
        names.append(_label(index, len(paths), ds))
    return datasets, names


@dataclass(frozen=True)
class CaseImages:
    """The DICOM content of a case folder (training data or a reference set).

    Attributes
    ----------
    series:
        The image instances (SEG excluded) as :class:`SeriesFrames`.
    segs:
        The SEG instances found, in file-name order.
    files:
        Every DICOM file read, in file-name order.
    """

    series: SeriesFrames
    segs: list[Dataset]
    files: list[Path]


def is_seg(ds: Dataset) -> bool:
    """Whether ``ds`` is a Segmentation (by SOP Class, or Modality SEG)."""
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS or ds.get("Modality") == "SEG"


def read_case_folder(folder: str | Path) -> CaseImages:
    """Read a case folder: every DICOM file in it (not in sub-folders; mask files skipped).

    Raises
    ------
    SeriesReadError
        A DICOM file cannot be read, the folder holds no image, or pixel data cannot be
        decoded; the message names the file or instance by its position in file-name order
        (file names exported from a PACS are often UIDs).
    """
    from pydicom.misc import is_dicom

    folder = Path(folder)
    candidates = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith(MASK_SUFFIXES) and is_dicom(p)
    ]
    images: list[Dataset] = []
    segs: list[Dataset] = []
    for index, path in enumerate(candidates, start=1):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise SeriesReadError(
                f"DICOM file {index} of {len(candidates)}: not readable: {_one_line(exc)}"
            ) from exc
        (segs if is_seg(ds) else images).append(ds)
    if not images:
        raise SeriesReadError("no DICOM image in the folder")
    return CaseImages(series=series_frames(images), segs=segs, files=candidates)
