"""The overlay: a Secondary Capture (RGB) per source frame with the result burned in.

For viewers that cannot show a SEG (most PACS viewers on planar NM; DESIGN.md "dcmqi"), each
source frame becomes one RGB Secondary Capture image of the same study, in a series of its own:

* the source frame windowed for reading: its first Window Center/Width when it has one, else the
  0.5-99.5 percentile range (NM has no window), as 8-bit grey;
* each segment's contour (the mask pixels with a 4-neighbour outside the mask, the image edge
  counting as outside) in the segment's colour (manifest ``color``), drawn in manifest order,
  so a later segment's contour is on top;
* below the image (never on it), a legend panel: "AI result, not for diagnosis alone", the model
  name and version, the confidence (when the manifest declares one; a low one with a red swatch)
  and per segment a colour swatch with the numbers of the report (:func:`legend_lines`): its
  label, area in mm² (volume in ml for volumetric sources) and pixel count, the sum and mean of
  the pixel values inside (counts for NM), and what the manifest's ``measurements:`` asks for:
  the left / right share in % of a paired organ (or why it is missing), the number of connected
  components and each one's size and equivalent diameter. The numbers are those of the whole
  group (all frames of the SEG, as in the SR), computed once by the worker and given to both
  builders, so the overlay and the report cannot disagree. The legend's text is also written to
  Image Comments, one line per legend line.

Small matrices are enlarged by an integer factor (nearest neighbour: every source pixel becomes
``scale x scale`` overlay pixels, see :func:`overlay_scale`) so the legend's text stays legible;
the Pixel Spacing written is the source's divided by the factor.

The SC is highdicom's ``SCImage`` with what dciodvfy and readers need set afterwards: Laterality
and BodyPartExamined (:func:`dicom_node.outputs.common.fix_laterality`), PatientOrientation from
the source (empty when it has none: highdicom demands a value, and an invented one would lie),
Conversion Type WSD, Burned In Annotation NO (the legend names no patient), and a Source Image
Sequence naming the source instance and frame. UIDs come from
:func:`dicom_node.seg.output_uids` (``kind="overlay"``, index = frame): a re-run replaces.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.modelstore.confidence import Confidence, flag_text
from dicom_node.modelstore.measureplan import SegmentMeasurements
from dicom_node.outputs.common import (
    copy_patient_study,
    fix_laterality,
    series_number,
    source_frames,
    source_image_item,
)
from dicom_node.outputs.measurements import SegmentMeasurement, intensity_unit, measure
from dicom_node.seg import AlgorithmInfo, SegmentSpec, output_uids
from dicom_node.seg.sop import SOFTWARE_VERSION

LOGGER = logging.getLogger(__name__)

DISCLAIMER = "AI result, not for diagnosis alone"
"""Burned into every overlay's legend."""

MIN_DISPLAY_SIZE = 256
"""Matrices smaller than this (larger side) are enlarged by an integer factor to reach it."""

LINE_HEIGHT = 13
"""Pixels per legend line (Pillow's default font is 10 px)."""

LEGEND_MARGIN = 4
"""Pixels around the legend text."""

DEFAULT_COLOR = (255, 0, 0)
"""Contour colour of a segment whose manifest entry has none."""

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
"""Window of a frame without Window Center/Width."""

LEGEND_WIDTH = 42
"""Characters per confidence line of the legend (the default font's 6 px per character fit
a 256-pixel-wide image)."""

LOW_CONFIDENCE_COLOR = (255, 0, 0)
"""Swatch in front of the ``LOW CONFIDENCE`` line of the legend."""

INDENT = "   "
"""Before a segment's second and later legend lines (the width of its swatch)."""

MAX_COMPONENT_LINES = 5
"""Components listed per segment in the legend (all of them are in the report)."""

UNIT_SHORT = {"{counts}": "counts", "[hnsf'U]": "HU"}
"""Legend spelling of the UCUM unit of the pixel-value statistics (none for unit ``1``)."""

LEGEND_SEPARATOR = "\r\n"
"""Between the legend's lines in Image Comments (LT: CR LF separates lines)."""


@dataclass(frozen=True)
class RenderedOverlay:
    """One rendered frame: the RGB pixels and how they map onto the source frame.

    Attributes
    ----------
    pixels
        uint8 (rows, cols, 3): the enlarged image on top, the legend panel below it.
    scale
        Source pixel (r, c) is overlay pixels ``[r*scale:(r+1)*scale, c*scale:(c+1)*scale]``.
    image_rows
        Rows of the image part (``source rows * scale``); the legend starts below.
    """

    pixels: np.ndarray
    scale: int
    image_rows: int


def overlay_scale(rows: int, cols: int) -> int:
    """Integer enlargement of a ``rows x cols`` frame (1 when it is already large enough)."""
    return max(1, MIN_DISPLAY_SIZE // max(rows, cols, 1))


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2-D bool mask: inside, with a 4-neighbour outside (or the edge)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def _window_values(source: Dataset) -> tuple[float, float] | None:
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c - w / 2.0, c + w / 2.0) if w > 0 else None


def window(frame: np.ndarray, source: Dataset | None = None) -> np.ndarray:
    """Return the frame as uint8 grey for reading (see the module docstring).

    Parameters
    ----------
    frame
        (rows, cols) or (rows, cols, samples) values, Modality LUT applied.
    source
        The instance, for its Window Center/Width.
    """
    values = np.asarray(frame, dtype=np.float64)
    if values.ndim == 3:
        values = values.mean(axis=-1)
    limits = _window_values(source) if source is not None else None
    if limits is None:
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
    else:
        low, high = limits
    if high <= low:
        high = low + 1.0
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
    return np.round(scaled).astype(np.uint8)


def render_overlay(
    frame: np.ndarray,
    masks: Sequence[tuple[SegmentSpec, np.ndarray]],
    legend: Sequence[tuple[str, tuple[int, int, int] | None]],
    source: Dataset | None = None,
) -> RenderedOverlay:
    """Render one frame with its contours and a legend panel below.

    Parameters
    ----------
    frame
        The source frame (:func:`window` is applied).
    masks
        ``(segment, bool (rows, cols))`` in drawing order.
    legend
        Lines of text, each with the colour of a swatch before it (``None``: no swatch).
    source
        The source instance (window values).

    Returns
    -------
    RenderedOverlay
    """
    grey = window(frame, source)
    rows, cols = grey.shape
    scale = overlay_scale(rows, cols)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    for spec, mask in masks:
        edge = contour(mask)
        rgb[edge] = spec.color or DEFAULT_COLOR
    image = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    panel_rows = 2 * LEGEND_MARGIN + LINE_HEIGHT * len(legend)
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + panel_rows), (0, 0, 0))
    canvas.paste(Image.fromarray(image, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    swatch = LINE_HEIGHT - 4
    for n, (text, color) in enumerate(legend):
        y = image.shape[0] + LEGEND_MARGIN + n * LINE_HEIGHT
        x = LEGEND_MARGIN
        if color is not None:
            draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(color))
            x += swatch + 4
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return RenderedOverlay(pixels=np.asarray(canvas), scale=scale, image_rows=image.shape[0])


def _number(value: float) -> str:
    """A legend number: one decimal, or three significant digits in exponent form when large."""
    return f"{value:.1f}" if abs(value) < 1e6 else f"{value:.3e}"


def _size_text(volume_ml: float | None, area_mm2: float | None) -> str:
    if volume_ml is not None:
        return f"{volume_ml:.2f} ml"
    return f"{area_mm2:.1f} mm2" if area_mm2 is not None else "-"


def _segment_lines(value: SegmentMeasurement, unit: str, n_frames: int, width: int) -> list[str]:
    """The legend lines of one segment: the report's numbers for it (see the module docstring).

    The first line is the segment's (it gets the swatch); the others are indented.
    """
    pixels = f"{value.pixels} {'vx' if value.volume_ml is not None else 'px'}"
    head = f"{value.label}: "
    head += (
        f"{_size_text(value.volume_ml, value.area_mm2)} ({pixels})"
        if value.size_reported
        else pixels
    )
    if value.size_reported and not value.spacing_known:
        head += " (spacing unknown)"
    lines = [head]
    counts = []
    if "sum" in value.counts_reported:
        counts.append(f"sum {_number(value.intensity_sum)}")
    if "mean" in value.counts_reported and value.intensity_mean is not None:
        counts.append(f"mean {_number(value.intensity_mean)}")
    if counts:
        lines.append(f"{INDENT}{', '.join(counts)}{' ' + unit if unit else ''}")
    if value.sides:
        left, right = sorted(value.sides, key=lambda s: s.side)  # "left" < "right"
        lines.append(
            f"{INDENT}left {left.share_percent:.1f}% / right {right.share_percent:.1f}%"
            f" of {'counts' if value.share_of == 'counts' else 'size'}"
        )
    elif value.laterality is not None:  # a split was asked for and is missing: say why
        lines += textwrap.wrap(
            f"no left/right split: {value.laterality}",
            width,
            initial_indent=INDENT,
            subsequent_indent=INDENT,
            max_lines=2,  # the node logs the whole reason
            placeholder=" ...",
        )
    if value.components is not None:
        parts = value.components
        lines.append(f"{INDENT}{len(parts)} component(s)")
        for part in parts[:MAX_COMPONENT_LINES]:
            where = ""
            if n_frames > 1 and part.volume_ml is None and part.outlines:
                where = f", frame {part.outlines[0][0] + 1}"
            size = _size_text(part.volume_ml, part.area_mm2)
            lines.append(f"{INDENT}#{part.index} {size}, d {part.diameter_mm:.1f} mm{where}")
        if len(parts) > MAX_COMPONENT_LINES:
            lines.append(f"{INDENT}... {len(parts) - MAX_COMPONENT_LINES} more in the report")
    return [line[:width] for line in lines]


def legend_lines(
    algorithm: AlgorithmInfo,
    measurements: Sequence[SegmentMeasurement],
    segments: Sequence[SegmentSpec],
    *,
    modality: str | None = None,
    n_frames: int = 1,
    confidence: Confidence | None = None,
    width: int = LEGEND_WIDTH,
) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The legend of every overlay of one SEG: text lines, each with its swatch colour or ``None``.

    Parameters
    ----------
    algorithm
        The resolved model version (second line).
    measurements
        The group's measurements, the very ones the report is built from (the worker computes
        them once with the manifest's ``measurements:`` plan).
    segments
        The SEG's segments in order (swatch colours).
    modality
        The sources' Modality: the unit of the pixel-value statistics (``counts``, ``HU``).
    n_frames
        Frames of the group: with more than one, a line says the numbers are over all of them.
    confidence
        The result's confidence (lines after the model's; a low one with a red swatch).
    width
        Characters per line.

    Returns
    -------
    list of (str, colour or None)
    """
    lines: list[tuple[str, tuple[int, int, int] | None]] = [
        (DISCLAIMER, None),
        (f"{algorithm.model} v{algorithm.version}", None),
    ]
    if confidence is not None:  # a low one is flagged by a red swatch on its first line
        for n, text in enumerate(confidence.legend(width)):
            lines.append((text, LOW_CONFIDENCE_COLOR if confidence.low and n == 0 else None))
    if n_frames > 1:
        lines.append((f"measured over all {n_frames} frames (as the SR)"[:width], None))
    unit = UNIT_SHORT.get(intensity_unit(modality)[0], "")
    for spec, value in zip(segments, measurements, strict=True):
        for n, text in enumerate(_segment_lines(value, unit, n_frames, width)):
            lines.append((text, (spec.color or DEFAULT_COLOR) if n == 0 else None))
    return lines


def _orientation(source: Dataset) -> list[str] | str:
    value = source.get("PatientOrientation")
    return list(value) if value is not None and len(value) == 2 else ""


def build_overlays(
    sources: Sequence[Dataset],
    frames: Sequence[np.ndarray],
    masks: Mapping[str, np.ndarray],
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmInfo,
    seg: Dataset,
    *,
    group: str | None = None,
    measurements: Sequence[SegmentMeasurement] | None = None,
    confidence: Confidence | None = None,
    plan: Mapping[str, SegmentMeasurements] | None = None,
) -> list[hd.sc.SCImage]:
    """Build one RGB Secondary Capture per source frame of one SEG.

    Parameters
    ----------
    sources
        The SEG's source instances, in mask frame order.
    frames
        The source frames, Modality LUT applied (the worker's ``SeriesFrames.frames`` of the
        group), one per mask frame.
    masks
        ``{key: bool (frames, rows, cols)}`` as given to :func:`dicom_node.seg.build_seg`.
    segments
        The SEG's segments in order (colour and label come from them).
    algorithm
        The resolved model version and rule (legend, UIDs).
    seg
        The SEG built from the same masks: Patient and Study attributes are copied from it.
    group
        The SEG's group key (``SourceGroup.uid_group``), part of the UIDs.
    measurements
        The group's measurements (:func:`dicom_node.outputs.measure`), the ones the report is
        built from; computed with ``plan`` when ``None``.
    confidence
        The result's confidence: the legend says it (a low one with its reasons) and a low one
        prefixes the Series Description with ``LOW CONFIDENCE - ``.
    plan
        The manifest's ``measurements`` (used only when ``measurements`` is ``None``).

    Returns
    -------
    list of highdicom.sc.SCImage
        One per frame, InstanceNumber 1, 2, ...; ready to write or send.

    Raises
    ------
    ValueError
        The number of frames differs from the sources' frames, or a mask is missing or has
        the wrong shape.
    """
    specs = list(segments)
    planes = source_frames(sources)
    if len(frames) != len(planes):
        raise ValueError(
            f"frames must hold one array per source frame ({len(planes)}), got {len(frames)}"
        )
    for spec in specs:  # measure() checks the same; given measurements skip it
        shape = np.shape(masks[spec.key]) if spec.key in masks else None
        if shape != (len(planes), *np.shape(frames[0])[:2]):
            raise ValueError(
                f"masks[{spec.key!r}] must be bool (frames, rows, cols) = "
                f"{(len(planes), *np.shape(frames[0])[:2])}, got {shape}; keys: {sorted(masks)}"
            )
    if measurements is None:
        measurements = measure(sources, frames, masks, specs, plan)
    if len(measurements) != len(specs):
        raise ValueError(
            f"measurements must hold one per segment ({len(specs)}), got {len(measurements)}"
        )
    first = sources[0]
    series_uid, _ = output_uids(
        "overlay",
        str(first.SeriesInstanceUID),
        algorithm.rule,
        algorithm.model,
        algorithm.version,
        group,
    )
    number = series_number(first, "overlay")
    description = f"AI overlay ({algorithm.model} v{algorithm.version}) - not for diagnosis alone"
    images = []
    legend = legend_lines(
        algorithm,
        measurements,
        specs,
        modality=first.get("Modality"),
        n_frames=len(planes),
        confidence=confidence,
    )
    for index, ((source, frame_number), frame) in enumerate(zip(planes, frames, strict=True)):
        rendered = render_overlay(
            frame,
            [(spec, np.asarray(masks[spec.key])[index]) for spec in specs],
            legend,
            source,
        )
        _, sop_uid = output_uids(
            "overlay",
            str(first.SeriesInstanceUID),
            algorithm.rule,
            algorithm.model,
            algorithm.version,
            group,
            index,
        )
        spacing = source.get("PixelSpacing")
        sc = hd.sc.SCImage(
            pixel_array=rendered.pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=str(seg.StudyInstanceUID),
            series_instance_uid=series_uid,
            series_number=number,
            sop_instance_uid=sop_uid,
            instance_number=index + 1,
            manufacturer="dicom-node",
            pixel_spacing=(
                (float(spacing[0]) / rendered.scale, float(spacing[1]) / rendered.scale)
                if spacing is not None and len(spacing) == 2
                else None
            ),
            patient_orientation=("L", "F"),  # replaced below: highdicom demands a value
        )
        sc.PatientOrientation = _orientation(source)  # type: ignore[assignment]
        copy_patient_study(seg, sc)
        fix_laterality(source, sc)
        sc.SeriesDescription = flag_text(description, confidence)
        sc.ConversionType = "WSD"
        sc.BurnedInAnnotation = "NO"
        sc.SoftwareVersions = SOFTWARE_VERSION
        sc.DerivationDescription = (
            f"Contours of {algorithm.model} {algorithm.version} on the source frame; {DISCLAIMER}"
        )[:1024]
        sc.SourceImageSequence = DicomSequence([source_image_item(source, frame_number)])
        # the legend as text too: what a viewer's header shows, and what a program can check
        sc.ImageComments = LEGEND_SEPARATOR.join(text for text, _ in legend)[:10240]  # LT
        images.append(sc)
    LOGGER.debug("built %d overlay image(s) for series %s", len(images), first.SeriesInstanceUID)
    return images
