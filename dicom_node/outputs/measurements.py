"""Per-segment measurements of one result: what the overlay legend and the SR report.

One :class:`SegmentMeasurement` per segment over the frames of one SEG (one source group):
pixel count, area in mm² (planar sources: summed over frames) or volume in ml (a volumetric
group: several slices with a slice spacing), and the sum and mean of the source pixel values
inside the mask (Modality LUT applied: counts for NM, HU for CT). The values are computed once
here, so the overlay and the report always show the same numbers.

Which measurements a segment gets is the manifest's ``measurements:`` block
(:class:`dicom_node.modelstore.measureplan.SegmentMeasurements`): by default size, sum and mean;
on request per connected component (count, size, equivalent diameter, counts) and, for a paired
organ, the left / right split of its counts by the patient orientation of the source
(:func:`patient_left_side`). Nothing here is specific to an organ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom import Dataset

from dicom_node.modelstore.measureplan import SegmentMeasurements, measurements_for
from dicom_node.modelstore.morphology import label
from dicom_node.seg import SegmentSpec

LOGGER = logging.getLogger(__name__)

INTENSITY_UNITS: dict[str, tuple[str, str]] = {
    "NM": ("{counts}", "counts"),
    "PT": ("{counts}", "counts"),
    "CT": ("[hnsf'U]", "Hounsfield unit"),
}
"""UCUM code and meaning of source pixel values by Modality; anything else is ``1`` (no unit)."""

COUNT_MODALITIES = frozenset({"NM", "PT"})
"""Modalities whose pixel values are counts: a left / right share is a share of the counts
(the uptake); for the others it is a share of the size."""

ANTERIOR_VIEW = ("SCT", "399321004")
"""View Code Sequence of an anterior projection: the patient faces the camera, so the patient's
left is on the image's right (higher columns)."""
POSTERIOR_VIEW = ("SCT", "399001007")
"""View Code Sequence of a posterior projection: the patient's left is on the image's left."""

Side = Literal["high", "low"]
"""Which end of the image's columns lies towards the patient's left: ``high`` (the right of the
image, as in an anterior view or an axial CT) or ``low``."""


@dataclass(frozen=True)
class ComponentMeasurement:
    """One connected component of a segment (``components: true``), largest first.

    Attributes
    ----------
    index
        1-based rank by size.
    pixels, area_mm2, volume_ml
        Size, as for :class:`SegmentMeasurement` (a component of a planar group lies in one
        frame; of a volumetric group it may span slices).
    diameter_mm
        Equivalent diameter: of the circle of the same area (planar) or of the sphere of the
        same volume.
    intensity_sum, intensity_mean
        Sum and mean of the source pixel values inside.
    outlines
        ``(frame index in the group, (N, 2) polygon)`` per frame it touches: its outer outline
        along pixel edges in image coordinates (column, row; 0,0 is the top left corner of the
        top left pixel, as DICOM SCOORD), first vertex repeated at the end.
    """

    index: int
    pixels: int
    area_mm2: float | None
    volume_ml: float | None
    diameter_mm: float
    intensity_sum: float
    intensity_mean: float
    outlines: tuple[tuple[int, np.ndarray], ...] = ()


@dataclass(frozen=True)
class SideMeasurement:
    """The patient's left or right part of a paired organ (``laterality: split``).

    ``pixels`` may end in .5: the midline column is shared half and half.
    ``share_percent`` is this side's share of the segment's counts (NM, PT) or size (others);
    the two sides add up to 100.
    """

    side: Literal["left", "right"]
    pixels: float
    area_mm2: float | None
    volume_ml: float | None
    intensity_sum: float
    share_percent: float


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
    size_reported, counts_reported
        What the report gives of the above (the manifest's ``size`` and ``counts``).
    components
        Per connected component, largest first (``components: true``), else ``None``.
    sides
        ``(left, right)`` (``laterality: split`` and a known orientation), else ``None``.
    laterality
        With ``laterality: split``: where the orientation came from (``anterior view``,
        ``PatientOrientation`` ...) or why the split is missing; else ``None``.
    share_of
        ``counts`` or ``size``: what ``sides[].share_percent`` divides.
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
    size_reported: bool = True
    counts_reported: tuple[str, ...] = ("sum", "mean")
    components: tuple[ComponentMeasurement, ...] | None = None
    sides: tuple[SideMeasurement, ...] | None = None
    laterality: str | None = None
    share_of: str | None = None

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


# -- laterality ------------------------------------------------------------------------------
def _orientation_of(ds: Dataset) -> list[float] | None:
    """ImageOrientationPatient of the instance, its shared functional groups or (NM) its first
    detector, whichever has six numbers first."""
    candidates = [ds.get("ImageOrientationPatient")]
    for keyword in ("SharedFunctionalGroupsSequence", "DetectorInformationSequence"):
        items = ds.get(keyword) or []
        if items:
            item = items[0]
            planes = item.get("PlaneOrientationSequence") or []
            candidates.append(planes[0].get("ImageOrientationPatient") if planes else None)
            candidates.append(item.get("ImageOrientationPatient"))
    for value in candidates:
        try:
            if value is not None and len(value) == 6:
                return [float(v) for v in value]
        except (TypeError, ValueError):
            continue
    return None


def _view_codes(ds: Dataset) -> set[tuple[str, str]]:
    items = list(ds.get("ViewCodeSequence") or [])
    for detector in ds.get("DetectorInformationSequence") or []:
        items += list(detector.get("ViewCodeSequence") or [])
    return {
        (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")))
        for item in items
    }


def patient_left_side(ds: Dataset) -> tuple[Side | None, str]:
    """Which end of the image's columns is towards the patient's left, and how that is known.

    In order: ImageOrientationPatient (its row direction, in the patient's LPS axes: +x is the
    patient's left); PatientOrientation (its first value is the direction of the rows, ``L``
    or ``R``); the anterior / posterior View Code Sequence of a planar NM image (an anterior
    view shows the patient's left on the image's right).

    Returns
    -------
    (Side or None, str)
        ``("high", "anterior view")``, ``("low", "PatientOrientation R")``..., or ``(None,
        reason)`` when the header says nothing usable.
    """
    orientation = _orientation_of(ds)
    if orientation is not None:
        x = orientation[0]  # row direction (increasing column) along the patient's left
        if abs(x) >= 0.5:
            return ("high" if x > 0 else "low"), "ImageOrientationPatient"
        return None, "the image rows do not run left-right (ImageOrientationPatient)"
    value = ds.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2:
        first = str(value[0]).upper()[:1]
        if first in ("L", "R"):
            return ("high" if first == "L" else "low"), f"PatientOrientation {value[0]}"
    views = _view_codes(ds)
    if ANTERIOR_VIEW in views and POSTERIOR_VIEW not in views:
        return "high", "anterior view"
    if POSTERIOR_VIEW in views and ANTERIOR_VIEW not in views:
        return "low", "posterior view"
    return None, (
        "patient orientation unknown (no ImageOrientationPatient, no PatientOrientation L/R, "
        "no anterior or posterior view code)"
    )


def split_column(profile: np.ndarray) -> int:
    """The midline column of a paired organ from its pixels per column.

    The thinnest column (fewest pixels, none counts) in the central third of the organ's width;
    of several, the one nearest the middle.
    """
    cols = np.flatnonzero(profile)
    lo, hi = int(cols[0]), int(cols[-1])
    width = hi - lo + 1
    start, stop = lo + width // 3, hi - width // 3
    if stop < start:
        start = stop = (lo + hi) // 2
    window = profile[start : stop + 1]
    candidates = np.flatnonzero(window == window.min()) + start
    return int(candidates[np.argmin(np.abs(candidates - (lo + hi) / 2))])


def _halves(mask: np.ndarray, values: np.ndarray, column: int) -> dict[str, tuple[float, float]]:
    """``{"low": (pixels, sum), "high": (pixels, sum)}`` of one 2-D or 3-D mask cut at
    ``column``; the column itself is shared half and half."""
    cols = np.arange(mask.shape[-1])
    parts = {"low": cols < column, "high": cols > column, "mid": cols == column}
    out = {
        k: (float(mask[..., m].sum()), float(values[..., m][mask[..., m]].sum()))
        for k, m in parts.items()
    }
    mid_px, mid_sum = out.pop("mid")
    return {k: (px + mid_px / 2, total + mid_sum / 2) for k, (px, total) in out.items()}


def _sides(
    mask: np.ndarray,
    stack: np.ndarray,
    planes: Sequence[Dataset],
    volumetric: bool,
) -> tuple[dict[str, tuple[float, float]] | None, str]:
    """Left / right ``(pixels, sum)`` of one segment, or ``None`` and why not."""
    if not mask.any():
        return None, "segment empty"
    sides = {"left": [0.0, 0.0], "right": [0.0, 0.0]}
    how: list[str] = []
    # a volume is cut once at the midline of the whole organ; planar frames each on their own
    # (an anterior and a posterior view of one study are mirror images)
    pieces = (
        [(mask, stack, planes[0])] if volumetric else list(zip(mask, stack, planes, strict=True))
    )
    for piece, values, source in pieces:
        if not piece.any():
            continue
        left_is, source_how = patient_left_side(source)
        if left_is is None:
            return None, source_how
        how.append(source_how)
        profile = piece.reshape(-1, piece.shape[-1]).sum(axis=0)
        halves = _halves(piece, values, split_column(profile))
        right_is = "low" if left_is == "high" else "high"
        for side, end in (("left", left_is), ("right", right_is)):
            sides[side][0] += halves[end][0]
            sides[side][1] += halves[end][1]
    return {k: (v[0], v[1]) for k, v in sides.items()}, ", ".join(sorted(set(how)))


# -- components ------------------------------------------------------------------------------
def _outline(mask2d: np.ndarray) -> np.ndarray | None:
    """The outer outline of a 2-D mask: its loop enclosing the largest area."""
    # imported here: gsps imports this module (through overlay) for the legend numbers
    from dicom_node.outputs.gsps import mask_polygons

    loops = mask_polygons(mask2d)
    if not loops:
        return None

    def area(loop: np.ndarray) -> float:
        x, y = loop[:, 0].astype(float), loop[:, 1].astype(float)
        return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2

    return max(loops, key=area)


def _components(
    mask: np.ndarray,
    stack: np.ndarray,
    pixel_mm2: float,
    depth: float | None,
    min_pixels: int,
) -> tuple[ComponentMeasurement, ...]:
    """The connected components of one segment, largest first (ties: raster order)."""
    found: list[tuple[int, int, np.ndarray, list[int]]] = []  # (pixels, order, member, frames)
    pieces = [(None, mask)] if depth else [(i, mask[i]) for i in range(mask.shape[0])]
    for frame, piece in pieces:
        labels, count = label(piece)
        if not count:
            continue
        for n in range(1, count + 1):
            member = labels == n
            pixels = int(member.sum())
            if pixels < min_pixels:
                continue
            if frame is None:
                frames = [int(f) for f in np.flatnonzero(member.any(axis=(1, 2)))]
                full = member
            else:
                frames = [frame]
                full = np.zeros(mask.shape, dtype=bool)
                full[frame] = member
            found.append((pixels, len(found), full, frames))
    found.sort(key=lambda item: (-item[0], item[1]))
    out = []
    for index, (pixels, _, member, frames) in enumerate(found, 1):
        inside = stack[member]
        area = None if depth else pixels * pixel_mm2
        volume = pixels * pixel_mm2 * depth / 1000.0 if depth else None
        diameter = (
            (6.0 * volume * 1000.0 / math.pi) ** (1 / 3)
            if volume is not None
            else 2.0 * math.sqrt((area or 0.0) / math.pi)
        )
        outlines = tuple((f, loop) for f in frames if (loop := _outline(member[f])) is not None)
        out.append(
            ComponentMeasurement(
                index=index,
                pixels=pixels,
                area_mm2=area,
                volume_ml=volume,
                diameter_mm=diameter,
                intensity_sum=float(inside.sum()),
                intensity_mean=float(inside.mean()),
                outlines=outlines,
            )
        )
    return tuple(out)


def measure(
    sources: Sequence[Dataset],
    frames: Sequence[np.ndarray],
    masks: Mapping[str, np.ndarray],
    segments: Sequence[SegmentSpec],
    plan: Mapping[str, SegmentMeasurements] | None = None,
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
    plan
        The manifest's ``measurements`` (segment key -> what to measure); ``None`` or a segment
        left out: size, sum and mean only.

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
    planes = [ds for ds in sources for _ in range(max(1, int(ds.get("NumberOfFrames") or 1)))]
    if len(planes) != stack.shape[0]:
        planes = [sources[0]] * stack.shape[0]  # frames not one per header frame: one geometry
    counts_are_counts = str(sources[0].get("Modality", "")).upper() in COUNT_MODALITIES
    results = []
    for number, spec in enumerate(segments, 1):
        if spec.key not in masks:
            raise ValueError(f"masks has no entry for segment {spec.key!r}; keys: {sorted(masks)}")
        mask = np.asarray(masks[spec.key], dtype=bool)
        if mask.shape != stack.shape:
            raise ValueError(
                f"masks[{spec.key!r}] must have the frames' shape {stack.shape}, got {mask.shape}"
            )
        wanted = measurements_for(plan, spec.key)
        pixels = int(mask.sum())
        inside = stack[mask]
        components = (
            _components(mask, stack, row_mm * col_mm, depth, wanted.min_component_pixels)
            if wanted.components
            else None
        )
        sides, how, share_of = None, None, None
        if wanted.laterality == "split":
            split, how = _sides(mask, stack, planes, depth is not None)
            if split is not None:
                share_of = "counts" if counts_are_counts else "size"
                sides = _side_values(split, share_of, row_mm * col_mm, depth)
            else:
                LOGGER.info("segment %s: no left/right split: %s", spec.key, how)
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
                size_reported=wanted.size,
                counts_reported=tuple(wanted.counts),
                components=components,
                sides=sides,
                laterality=how,
                share_of=share_of,
            )
        )
    return results


def _side_values(
    split: Mapping[str, tuple[float, float]],
    share_of: str,
    pixel_mm2: float,
    depth: float | None,
) -> tuple[SideMeasurement, ...]:
    index = 1 if share_of == "counts" else 0
    total = split["left"][index] + split["right"][index]
    out = []
    for side in ("left", "right"):
        px, value = split[side]
        share = 100.0 * split[side][index] / total if total else 50.0
        out.append(
            SideMeasurement(
                side="left" if side == "left" else "right",
                pixels=px,
                area_mm2=None if depth else px * pixel_mm2,
                volume_ml=px * pixel_mm2 * depth / 1000.0 if depth else None,
                intensity_sum=value,
                share_percent=share,
            )
        )
    return tuple(out)
