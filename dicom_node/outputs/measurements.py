"""Per-segment measurements of one result: what the overlay legend and the SR report.

One :class:`SegmentMeasurement` per segment over the frames of one SEG (one source group):
pixel count, area in mm² (planar sources: summed over frames) or volume in ml (a volumetric
group: several slices with a slice spacing), and the sum and mean of the source pixel values
inside the mask (Modality LUT applied: counts for NM, HU for CT). The values are computed once
here, so the overlay and the report always show the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from dicom_node.seg import SegmentSpec

LOGGER = logging.getLogger(__name__)

INTENSITY_UNITS: dict[str, tuple[str, str]] = {
    "NM": ("{counts}", "counts"),
    "PT": ("{counts}", "counts"),
    "CT": ("[hnsf'U]", "Hounsfield unit"),
}
"""UCUM code and meaning of source pixel values by Modality; anything else is ``1`` (no unit)."""


@dataclass(frozen=True)
class SegmentMeasurement:
    """The measurements of one segment of one SEG.

    Attributes
    ----------
    number
        Segment Number in the SEG (1-based, the order of the manifest's segments).
    key, label
        The manifest segment's key and label.
    pixels
        Pixels inside the mask over every frame.
    area_mm2
        ``pixels`` times the pixel area (planar sources), else ``None``.
    volume_ml
        ``pixels`` times the voxel volume / 1000 (volumetric sources), else ``None``.
    intensity_sum, intensity_mean
        Sum and mean of the source pixel values inside the mask (mean ``None`` when empty).
    spacing_known
        False when the sources have no PixelSpacing and 1 mm was assumed.
    """

    number: int
    key: str
    label: str
    pixels: int
    area_mm2: float | None
    volume_ml: float | None
    intensity_sum: float
    intensity_mean: float | None
    spacing_known: bool = True

    def summary(self) -> str:
        """One legend line, e.g. ``Thyroid: 1234.5 mm2 (255 px)``.

        ``mm2`` is the UCUM spelling; Pillow's default font has no superscript two.
        """
        size = (
            f"{self.volume_ml:.2f} ml"
            if self.volume_ml is not None
            else f"{self.area_mm2:.1f} mm2"
            if self.area_mm2 is not None
            else "-"
        )
        if not self.spacing_known:
            size += " (spacing unknown)"
        return f"{self.label}: {size} ({self.pixels} px)"


def intensity_unit(modality: str | None) -> tuple[str, str]:
    """UCUM ``(code, meaning)`` of a modality's pixel values (:data:`INTENSITY_UNITS`)."""
    return INTENSITY_UNITS.get((modality or "").upper(), ("1", "no units"))


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def slice_spacing(sources: Sequence[Dataset]) -> float | None:
    """Distance between slices of a volumetric group in mm, or ``None`` for planar sources.

    Several single-frame instances with one orientation and distinct positions along its normal
    are a volume; anything else (one instance, NM frames, no geometry) is planar.
    """
    if len(sources) < 2:
        return None
    orientation = sources[0].get("ImageOrientationPatient")
    positions = [ds.get("ImagePositionPatient") for ds in sources]
    if (
        orientation is None
        or len(orientation) != 6
        or any(p is None or len(p) != 3 for p in positions)
    ):
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    offsets = np.unique(np.round(np.asarray(positions, float) @ normal, 4))
    if len(offsets) != len(sources):
        return None
    steps = np.diff(offsets)
    return float(np.median(steps)) if steps.size and steps.min() > 0 else None


def measure(
    sources: Sequence[Dataset],
    frames: Sequence[np.ndarray],
    masks: Mapping[str, np.ndarray],
    segments: Sequence[SegmentSpec],
) -> list[SegmentMeasurement]:
    """Measure every segment over the frames of one SEG.

    Parameters
    ----------
    sources
        The SEG's source instances (spacing and geometry are read from them).
    frames
        The source frames in mask order, Modality LUT applied, (rows, cols) or (rows, cols, S).
    masks
        ``{key: bool (frames, rows, cols)}`` as given to :func:`dicom_node.seg.build_seg`.
    segments
        The SEG's segments, in Segment Number order.

    Returns
    -------
    list of SegmentMeasurement
        One per segment, in order.

    Raises
    ------
    ValueError
        A mask is missing or its shape differs from the frames'.
    """
    stack = np.stack([f.mean(axis=-1) if f.ndim == 3 else f for f in frames]).astype(np.float64)
    spacing = _spacing(sources[0])
    row_mm, col_mm = spacing or (1.0, 1.0)
    depth = slice_spacing(sources)
    results = []
    for number, spec in enumerate(segments, 1):
        if spec.key not in masks:
            raise ValueError(f"masks has no entry for segment {spec.key!r}; keys: {sorted(masks)}")
        mask = np.asarray(masks[spec.key], dtype=bool)
        if mask.shape != stack.shape:
            raise ValueError(
                f"masks[{spec.key!r}] must have the frames' shape {stack.shape}, got {mask.shape}"
            )
        pixels = int(mask.sum())
        inside = stack[mask]
        results.append(
            SegmentMeasurement(
                number=number,
                key=spec.key,
                label=spec.label,
                pixels=pixels,
                area_mm2=None if depth else pixels * row_mm * col_mm,
                volume_ml=pixels * row_mm * col_mm * depth / 1000.0 if depth else None,
                intensity_sum=float(inside.sum()),
                intensity_mean=float(inside.mean()) if pixels else None,
                spacing_known=spacing is not None,
            )
        )
    return results
