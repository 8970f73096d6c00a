"""The overlay: a Secondary Capture (RGB) per source frame with the result burned in.

For viewers that cannot show a SEG (most PACS viewers on planar NM; DESIGN.md "dcmqi"), each
source frame becomes one RGB Secondary Capture image of the same study, in a series of its own:

* the source frame windowed for reading: its first Window Center/Width when it has one, else the
  0.5-99.5 percentile range (NM has no window), as 8-bit grey;
* each segment's contour (the mask pixels with a 4-neighbour outside the mask, the image edge
  counting as outside) in the segment's colour (manifest ``color``), drawn in manifest order,
  so a later segment's contour is on top;
* below the image, a legend panel: "AI result, not for diagnosis alone", the model name and
  version, and per segment a colour swatch, its label, area in mm² and pixel count on this frame
  (plus the volume of the whole group for volumetric sources).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.modelstore.confidence import Confidence, flag_text
from dicom_node.outputs.common import (
    copy_patient_study,
    fix_laterality,
    series_number,
    source_frames,
    source_image_item,
)
from dicom_node.outputs.measurements import SegmentMeasurement, measure
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


def _legend(
    algorithm: AlgorithmInfo,
    frame_measurements: Sequence[SegmentMeasurement],
    group_measurements: Sequence[SegmentMeasurement],
    segments: Sequence[SegmentSpec],
    confidence: Confidence | None = None,
) -> list[tuple[str, tuple[int, int, int] | None]]:
    lines: list[tuple[str, tuple[int, int, int] | None]] = [
        (DISCLAIMER, None),
        (f"{algorithm.model} v{algorithm.version}", None),
    ]
    if confidence is not None:  # a low one is flagged by a red swatch on its first line
        for n, text in enumerate(confidence.legend(LEGEND_WIDTH)):
            lines.append((text, LOW_CONFIDENCE_COLOR if confidence.low and n == 0 else None))
    for spec, here, whole in zip(segments, frame_measurements, group_measurements, strict=True):
        text = here.summary()
        if whole.volume_ml is not None:
            text += f"; all slices {whole.volume_ml:.2f} ml"
        lines.append((text, spec.color or DEFAULT_COLOR))
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
        The group's measurements (:func:`dicom_node.outputs.measure`); computed when ``None``.
    confidence
        The result's confidence: the legend says it (a low one with its reasons) and a low one
        prefixes the Series Description with ``LOW CONFIDENCE - ``.

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
    if measurements is None:
        measurements = measure(sources, frames, masks, specs)
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
    for index, ((source, frame_number), frame) in enumerate(zip(planes, frames, strict=True)):
        here = {spec.key: np.asarray(masks[spec.key])[index : index + 1] for spec in specs}
        frame_measurements = measure([source], [frame], here, specs)
        rendered = render_overlay(
            frame,
            [(spec, here[spec.key][0]) for spec in specs],
            _legend(algorithm, frame_measurements, measurements, specs, confidence),
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
        images.append(sc)
    LOGGER.debug("built %d overlay image(s) for series %s", len(images), first.SeriesInstanceUID)
    return images
