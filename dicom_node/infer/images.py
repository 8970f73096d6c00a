"""Reading a spooled series back: source datasets in a stable order and their 2-D frames."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

LOGGER = logging.getLogger(__name__)


class SeriesReadError(ValueError):
    """A spooled instance cannot be decoded into frames (the job fails with this message)."""


@dataclass(frozen=True)
class SeriesFrames:
    """A series ready for a 2-D model.

    Attributes
    ----------
    sources:
        The instances, sorted along the slice direction (or by InstanceNumber).
    frames:
        One 2-D array per frame, over ``sources`` in order (a multi-frame instance gives several).
    """

    sources: list[Dataset]
    frames: list[np.ndarray]


def _slice_key(ds: Dataset) -> tuple[float, float]:
    """Sort along the normal of the image plane when geometry exists, else by InstanceNumber."""
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


def _frames_of(ds: Dataset, name: str) -> list[np.ndarray]:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        how = f" ({syntax.name})" if syntax is not None else ""
        raise SeriesReadError(
            f"{name}: pixel data{how} cannot be decoded: {_one_line(exc)}"
        ) from exc
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if samples > 1:  # colour: the models take one channel, so use luminance-like mean
        pixels = pixels.mean(axis=-1)
    if n_frames > 1 or pixels.ndim == 3:
        return [np.asarray(f) for f in pixels.reshape(-1, *pixels.shape[-2:])]
    return [np.asarray(pixels)]


def read_series(paths: list[Path]) -> SeriesFrames:
    """Read every instance of a series, sort them and return their frames.

    Raises
    ------
    SeriesReadError
        A file cannot be read or its pixel data decoded; the message names the instance by its
        position in arrival order and its InstanceNumber (not by UID), and the transfer syntax.
    """
    read: list[tuple[Dataset, str]] = []
    for index, path in enumerate(paths, start=1):
        # name instances by position and InstanceNumber: the error goes to logs, UIDs must not
        label = f"instance {index} of {len(paths)}"
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise SeriesReadError(f"{label}: not readable as DICOM: {_one_line(exc)}") from exc
        number = getattr(ds, "InstanceNumber", None)
        read.append((ds, f"{label} (InstanceNumber {number})" if number is not None else label))
    read.sort(key=lambda pair: _slice_key(pair[0]))
    frames: list[np.ndarray] = []
    for source, name in read:
        frames.extend(_frames_of(source, name))
    return SeriesFrames(sources=[ds for ds, _ in read], frames=frames)
