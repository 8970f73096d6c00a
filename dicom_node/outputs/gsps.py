"""The presentation state: a GSPS on the original images with each segment's outline.

One Grayscale Softcopy Presentation State per SEG (highdicom's ``pr`` module) references every
source image of the group; a viewer that supports presentation states shows the outline on the
original pixels, without a copy of them:

* one Graphic Layer per segment (in manifest order, the segment's colour as its recommended
  display colour), holding per source frame the segment's outline as closed POLYLINE graphic
  objects in PIXEL units: the pixel edges between the mask and the rest (:func:`mask_polygons`),
  so the outline is exactly the SEG's boundary (PS3.3 C.10.5.1.2: 0\\0 is the top left corner of
  the top left pixel, Columns\\Rows the bottom right corner of the last one);
* a text layer with the segment labels, the model name and version and "AI result, not for
  diagnosis alone" in the top left corner of each frame.

highdicom 0.28 looks for Shared Functional Groups on NM sources unless the Modality LUT and the
VOI LUT are given (DESIGN.md pitfall): both are always passed, the Modality LUT from the
source's Rescale Slope/Intercept (identity when absent), the VOI window from its Window
Center/Width or else the 0.5-99.5 percentile range of its frames, as the overlay uses.
Laterality is set as for the overlay (:func:`dicom_node.outputs.common.fix_laterality`).
UIDs come from :func:`dicom_node.seg.output_uids` (``kind="gsps"``): a re-run replaces it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicom_node.modelstore.confidence import Confidence, flag_text
from dicom_node.outputs.common import (
    copy_patient_study,
    fix_laterality,
    series_number,
    source_frames,
)
from dicom_node.outputs.overlay import DEFAULT_COLOR, DISCLAIMER, HIGH_PERCENTILE, LOW_PERCENTILE
from dicom_node.seg import AlgorithmInfo, SegmentSpec, output_uids
from dicom_node.seg.sop import SOFTWARE_VERSION

LOGGER = logging.getLogger(__name__)

CONTENT_LABEL = "AI_OUTLINES"
"""Content Label (CS, at most 16 characters) of every presentation state the node builds."""

TEXT_LAYER = "AI_LEGEND"
"""Graphic Layer of the text (labels, model, disclaimer)."""

_Vertex = tuple[int, int]


def mask_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D bool mask along pixel edges, as ``(N, 2)`` (column, row) arrays.

    Each outline is a loop of pixel corners (first vertex repeated at the end, collinear
    vertices dropped); the mask's pixels lie on the right of the direction of travel, so holes
    come out as loops of their own, running the other way.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    inside = padded[1:-1, 1:-1]
    out: dict[_Vertex, list[_Vertex]] = defaultdict(list)
    sides = (
        (padded[:-2, 1:-1], (0, 0), (1, 0)),  # top: (c, r) -> (c+1, r)
        (padded[1:-1, 2:], (1, 0), (1, 1)),  # right
        (padded[2:, 1:-1], (1, 1), (0, 1)),  # bottom
        (padded[1:-1, :-2], (0, 1), (0, 0)),  # left
    )
    count = 0
    for neighbour, start, end in sides:
        rows, cols = np.nonzero(inside & ~neighbour)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            out[(c + start[0], r + start[1])].append((c + end[0], r + end[1]))
            count += 1
    loops: list[np.ndarray] = []
    while out:
        first = next(iter(out))
        loop = [first]
        here, heading = first, None
        while True:
            ends = out[here]
            pick = 0
            if len(ends) > 1 and heading is not None:  # two loops touch at a corner: turn right
                turns = [
                    heading[0] * (e[1] - here[1]) - heading[1] * (e[0] - here[0]) for e in ends
                ]
                pick = int(np.argmax(turns))
            nxt = ends.pop(pick)
            if not ends:
                del out[here]
            heading = (nxt[0] - here[0], nxt[1] - here[1])
            here = nxt
            loop.append(here)
            if here == first:  # every vertex has as many edges in as out: the loop closes
                break
        loops.append(_simplify(np.asarray(loop, dtype=np.float64)))
    LOGGER.debug("outline: %d edge(s) in %d loop(s)", count, len(loops))
    return loops


def _simplify(loop: np.ndarray) -> np.ndarray:
    """Drop the vertices of a closed loop that lie on a straight run."""
    points = loop[:-1]
    before = np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (
        points[:, 1] - before[:, 1]
    ) * (after[:, 0] - points[:, 0])
    kept = points[cross != 0]
    return np.vstack([kept, kept[:1]])


def _voi(source: Dataset, frames: Sequence[np.ndarray]) -> hd.pr.SoftcopyVOILUTTransformation:
    center, width = source.get("WindowCenter"), source.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, Sequence) else center)
        w = float(width[0] if isinstance(width, Sequence) else width)
    except (TypeError, ValueError, IndexError):
        c = w = 0.0
    explanation = "source window"
    if w <= 0:
        values = np.concatenate([np.ravel(f) for f in frames])
        low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
        high = max(float(high), float(low) + 1.0)
        c, w = (float(low) + high) / 2.0, high - float(low)
        explanation = "0.5-99.5 percentile"
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=c, window_width=w, window_explanation=explanation
    )


def _modality_lut(source: Dataset) -> hd.ModalityLUTTransformation:
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    rescale_type = "HU" if (source.get("Modality") or "").upper() == "CT" else "US"
    return hd.ModalityLUTTransformation(
        rescale_intercept=intercept, rescale_slope=slope, rescale_type=rescale_type
    )


def build_gsps(
    sources: Sequence[Dataset],
    frames: Sequence[np.ndarray],
    masks: Mapping[str, np.ndarray],
    segments: Sequence[SegmentSpec],
    algorithm: AlgorithmInfo,
    seg: Dataset,
    *,
    group: str | None = None,
    confidence: Confidence | None = None,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build the presentation state of one SEG: outlines per segment layer, a text layer.

    Parameters
    ----------
    sources
        The SEG's source instances, in mask frame order (all are referenced).
    frames
        The source frames, Modality LUT applied (for the VOI window when a source has none).
    masks
        ``{key: bool (frames, rows, cols)}`` as given to :func:`dicom_node.seg.build_seg`.
    segments
        The SEG's segments in order (layer order, colour, label).
    algorithm
        The resolved model version and rule (text, UIDs).
    seg
        The SEG: Patient and Study attributes are copied from it.
    group
        The SEG's group key (``SourceGroup.uid_group``), part of the UIDs.
    confidence
        The result's confidence: a third text line says it (a low one with its reasons) and a
        low one prefixes the Series Description with ``LOW CONFIDENCE - ``.

    Returns
    -------
    highdicom.pr.GrayscaleSoftcopyPresentationState

    Raises
    ------
    ValueError
        The number of frames differs from the sources', or a mask is missing or misshapen.
    """
    specs = list(segments)
    planes = source_frames(sources)
    if len(frames) != len(planes):
        raise ValueError(
            f"frames must hold one array per source frame ({len(planes)}), got {len(frames)}"
        )
    for spec in specs:
        shape = np.shape(masks[spec.key]) if spec.key in masks else None
        if shape is None or shape[0] != len(planes):
            raise ValueError(
                f"masks[{spec.key!r}] must have one plane per source frame ({len(planes)}), "
                f"got shape {shape}"
            )
    layers = [
        hd.pr.GraphicLayer(
            layer_name=f"SEGMENT_{n}",
            order=n,
            description=spec.label,
            display_color=hd.color.CIELabColor.from_rgb(*(spec.color or DEFAULT_COLOR)),
        )
        for n, spec in enumerate(specs, 1)
    ]
    text_layer = hd.pr.GraphicLayer(
        layer_name=TEXT_LAYER, order=len(specs) + 1, description="labels and model"
    )
    legend = f"{algorithm.model} v{algorithm.version}: " + ", ".join(s.label for s in specs)
    texts = [(DISCLAIMER, 0.01), (legend, 0.06)]
    if confidence is not None:
        texts.append((confidence.summary(), 0.11))
    annotations = []
    for index, (source, frame_number) in enumerate(planes):
        for layer, spec in zip(layers, specs, strict=True):
            objects = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=loop,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
                for loop in mask_polygons(np.asarray(masks[spec.key])[index])
            ]
            if objects:
                annotations.append(
                    hd.pr.GraphicAnnotation(
                        referenced_images=[source],
                        graphic_layer=layer,
                        referenced_frame_number=frame_number,
                        graphic_objects=objects,
                    )
                )
        text = [
            hd.pr.TextObject(
                text_value=value[:1024],
                units=hd.pr.AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, top, 0.99, top + 0.05),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
            for value, top in texts
        ]
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=text_layer,
                referenced_frame_number=frame_number,
                text_objects=text,
            )
        )
    first = sources[0]
    series_uid, sop_uid = output_uids(
        "gsps",
        str(first.SeriesInstanceUID),
        algorithm.rule,
        algorithm.model,
        algorithm.version,
        group,
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(sources),
        series_instance_uid=series_uid,
        series_number=series_number(first, "gsps"),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="dicom-node",
        manufacturer_model_name="dicom-node",
        software_versions=SOFTWARE_VERSION,
        device_serial_number="0",
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm.model} {algorithm.version} outlines"[:64],
        graphic_annotations=annotations,
        graphic_layers=[*layers, text_layer],
        modality_lut_transformation=_modality_lut(first),
        voi_lut_transformations=[_voi(first, frames)],
    )
    copy_patient_study(seg, gsps)
    fix_laterality(first, gsps)
    gsps.SeriesDescription = flag_text(
        f"AI outlines ({algorithm.model} v{algorithm.version}) - not for diagnosis alone",
        confidence,
    )
    LOGGER.debug("built GSPS %s: %d annotation(s)", sop_uid, len(annotations))
    return gsps
