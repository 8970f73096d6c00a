"""Build the DICOM SEG of one result with highdicom: NM, Secondary Capture, CT and MR sources.

Two paths, chosen by whether the sources live in a usable patient coordinate system
(:func:`_why_not_spatial`):

**Spatial sources** (CT, MR, enhanced CT/MR: a valid Frame of Reference, one orientation and a
distinct Image Position (Patient) on every frame): plain ``highdicom.seg.Segmentation``. highdicom
copies plane positions, orientation and pixel measures from the sources and references every
source instance per frame. A source without Slice Thickness (type 2 in CT/MR) gets the slice
spacing instead, because the SEG's Pixel Measures need one. Should highdicom still refuse the
geometry (several enhanced instances, odd functional groups), the SEG is built frame-referenced.

**Frame-referenced sources** (planar NM, Secondary Capture, US, CR, and CT/MR whose geometry is
unusable: no Frame of Reference, one equal to the Study UID, the same position twice).
Each SEG frame is tied 1:1 to a source frame by its Derivation Image Sequence (PS3.3 A.51.5.1),
not by coordinates. highdicom 0.28 gets two things wrong here:

1. It decides "multi-frame" from the IOD (the NM IOD allows NumberOfFrames) and then reads
   ``SharedFunctionalGroupsSequence[0].PixelMeasuresSequence``, which only *enhanced* multi-frame
   images have: ``AttributeError`` for every NM image. Passing ``pixel_measures`` does not help
   (the source is read first); ``plane_positions`` are refused without a coordinate system, and
   rightly so: invented positions would be false geometry in the SEG.
2. It supports only a *single* source frame without a coordinate system (highdicom issue #284),
   because its frame-referenced dimension index is the segment number alone.

What we do instead, without patching highdicom:

* highdicom reads a *view* of the first source (a copy of its header, never written anywhere) with
  what its enhanced-image path expects: a Shared Functional Groups item whose Pixel Measures item
  is empty (and removed from the SEG afterwards), NumberOfFrames 1 (the template frame), and no
  PixelSpacing. Pixel spacing stays out of the SEG on purpose: without a Frame of Reference,
  highdicom would write Pixel Measures without Slice Thickness, which its own reader rejects;
  SEG frames map 1:1 onto source frames, whose PixelSpacing is the one to use. Everything else
  highdicom copies from the view (patient, study, Frame of Reference UID if any, the referenced
  SOP Class/Instance) equals the real source.
* From that view highdicom builds a template SEG for the first source frame with every segment;
  :func:`_extend_frames` then replicates its per-frame items for every (segment, source frame):
  one or several NM frames, several NM or SC instances in one series. Each item's Source Image
  Sequence names the real SOP Instance and, for multi-frame IODs, the ReferencedFrameNumber
  (explicit even for a one-frame NM image, so readers can ask for "frame 1"). A second dimension,
  Frame Label in the Frame Content Sequence (the attribute highdicom itself indexes for other
  frame-referenced derived images), numbers the source frames. The result is not re-read:
  its highdicom frame look-ups (``get_pixels_by_*``) still describe the template frame, so
  read the written SEG back (``highdicom.seg.segread``) to query it; the tests decode every
  form that way.
* PatientOrientation (General Image, type 2C: required when there is no Image Orientation) is
  copied from the source; highdicom leaves it out and dciodvfy reports the gap.
* A reference to an instance of a single-frame SOP class never carries ReferencedFrameNumber,
  even if the instance has NumberOfFrames (dciodvfy: "Shall not be present for Referenced SOP
  Class that is not multi-frame").
* A source without Frame of Reference whose IOD requires one (CT), or of a SOP class highdicom
  does not know (retired US), is shown to highdicom as Secondary Capture in the view.

Headers that stop short (both paths): highdicom reads every type 2 Patient/Study attribute, so the
builder hands it header copies (:func:`_header`) in which absent ones are empty, ACR-NEMA dates
are repaired and values that break their VR are left out; the caller's datasets are never changed.

Empty masks: frames of a segment that is empty on a source frame are omitted (highdicom's default);
if every mask is empty, every frame is kept, all zero, so the SEG still says "segmented, nothing
found" for each segment. Both forms pass dciodvfy and highdicom's reader.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.modelstore.confidence import Confidence, flag_text
from dicom_node.seg.content import AlgorithmInfo, SegmentSpec
from dicom_node.seg.sources import (
    complete_deidentification,
    drop_invalid_copied_values,
    fill_empty_type2,
    frame_count,
    has_usable_frame_of_reference,
    is_enhanced,
    is_multi_frame_iod,
    needs_frame_of_reference,
    sanitize_type2,
)
from dicom_node.seg.uids import ai_series_description, seg_uids

LOGGER = logging.getLogger(__name__)

CONTENT_LABEL = "AI_SEGMENTATION"
"""Content Label (CS, at most 16 characters) of every SEG the node builds."""

SERIES_NUMBER_OFFSET = 1000
"""The SEG's SeriesNumber is the source's plus this (or this alone when the source has none)."""

SOFTWARE_VERSION = "dicom-node 0.1"
"""Software Versions written into the SEG by default."""

_FRAME_LABEL_DIMENSION = "Source Frame"
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GEOMETRY_KEYWORDS = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
)
_SPATIAL_FALLBACK_ERRORS = (ValueError, AttributeError, KeyError, IndexError, TypeError)
"""What highdicom raises on source geometry it cannot use (then the SEG is frame-referenced)."""


@dataclass(frozen=True)
class _Plane:
    """One mask plane: which source, which frame of it, and how a SEG frame references it."""

    source: int
    frame: int  # 1-based frame of the source instance
    reference: int | None  # ReferencedFrameNumber, None for single-frame SOP classes


def _source_frames(sources: Sequence[Dataset]) -> list[_Plane]:
    """One :class:`_Plane` per frame of every source, in order."""
    planes: list[_Plane] = []
    for index, ds in enumerate(sources):
        multi = is_multi_frame_iod(ds)
        planes.extend(
            _Plane(index, number, number if multi else None)
            for number in range(1, frame_count(ds) + 1)
        )
    return planes


def _check_sources(sources: Sequence[Dataset]) -> None:
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence) or not sources:
        raise TypeError("sources must be a non-empty sequence of pydicom Datasets")
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources must contain pydicom Datasets, got {type(ds).__name__}")
        for keyword in (
            "SOPClassUID",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Rows",
            "Columns",
        ):
            if ds.get(keyword) in (None, ""):
                raise ValueError(f"source instance lacks {keyword}; cannot reference it in a SEG")
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise ValueError(f"sources must belong to one series, got {len(series)} series")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in sources}
    if len(sizes) != 1:
        raise ValueError(f"sources must share Rows and Columns, got {sorted(sizes)}")
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) != len(uids):
        raise ValueError("sources contain the same SOP Instance UID twice")


def _stack_masks(
    masks: Mapping[str, np.ndarray], specs: Sequence[SegmentSpec], shape: tuple[int, int, int]
) -> np.ndarray:
    """Return a bool array (frames, rows, cols, segments) in the order of ``specs``."""
    planes = []
    for spec in specs:
        if spec.key not in masks:
            raise ValueError(f"masks has no entry for segment {spec.key!r}; keys: {sorted(masks)}")
        mask = np.asarray(masks[spec.key])
        if mask.shape != shape:
            raise ValueError(
                f"masks[{spec.key!r}] must have shape (frames, rows, cols) = {shape}, "
                f"got {mask.shape}"
            )
        planes.append(mask.astype(bool, copy=False))
    extra = set(masks) - {spec.key for spec in specs}
    if extra:
        LOGGER.debug("masks without a segment description are not encoded: %s", sorted(extra))
    return np.stack(planes, axis=-1)


MAX_FRACTIONAL_VALUE = 255
"""Maximum Fractional Value of a FRACTIONAL (probability) SEG: probability 1.0 is stored as 255."""


def _stack_probabilities(
    probabilities: Mapping[str, np.ndarray],
    specs: Sequence[SegmentSpec],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """Return float32 (frames, rows, cols, segments) probabilities on the SEG's 1/255 steps.

    Quantised here so that highdicom's scaling (x 255, rounded) and :func:`_extend_frames`'s
    encoding give the same stored values, whichever path builds the SEG.
    """
    planes = []
    for spec in specs:
        if spec.key not in probabilities:
            raise ValueError(
                f"probabilities has no entry for segment {spec.key!r}; "
                f"keys: {sorted(probabilities)}"
            )
        plane = np.asarray(probabilities[spec.key], dtype=np.float32)
        if plane.shape != shape:
            raise ValueError(
                f"probabilities[{spec.key!r}] must have shape (frames, rows, cols) = {shape}, "
                f"got {plane.shape}"
            )
        if not np.all(np.isfinite(plane)):
            raise ValueError(f"probabilities[{spec.key!r}] holds NaN or infinite values")
        steps = np.round(np.clip(plane, 0.0, 1.0) * np.float32(MAX_FRACTIONAL_VALUE))
        planes.append(steps / np.float32(MAX_FRACTIONAL_VALUE))
    return np.stack(planes, axis=-1)


def _header(source: Dataset) -> Dataset:
    """Deep copy of a source's header (no pixel data) with absent type 2 attributes empty.

    highdicom reads ``PatientID``, ``StudyID``, ... as attributes and fails on a source that left
    them out instead of empty; the SEG copies them empty, as the standard says for type 2. A
    malformed date or time (which highdicom refuses) is copied empty too, other patient and study
    values that break their VR are left out (type 3) or empty (type 2), and a de-identified
    source that does not say how gets De-identification Method "not stated by the source".
    """
    header = Dataset()  # pydicom's copy.copy would share the elements with the source
    for element in source:
        if element.keyword not in _PIXEL_DATA_KEYWORDS:
            header.add(copy.deepcopy(element))
    added = fill_empty_type2(header)
    blanked = sanitize_type2(header) + drop_invalid_copied_values(header)
    if complete_deidentification(header):
        added.append("DeidentificationMethod")
    if added or blanked:
        LOGGER.debug("source header: %s added; invalid %s blanked", added, blanked)
    return header


def _template_view(source: Dataset) -> Dataset:
    """Header of a frame-referenced source in the shape highdicom's code path reads.

    Drops the patient geometry (a frame-referenced SEG has none) and a Frame of Reference UID
    that is no valid one, gives the source the Shared Functional Groups item highdicom's
    multi-frame path looks for, with a Pixel Measures item that is empty (removed from the SEG
    again), and sets NumberOfFrames to 1 (the template frame). See the module docstring.

    highdicom refuses a source without Frame of Reference whose IOD requires one (a CT that lost
    it) and a SOP class its tables do not know (retired US and NM classes): such a view says
    Secondary Capture, the one single-frame IOD without patient geometry. Nothing of the SOP
    class reaches the SEG from the view: every reference is rewritten from the real source.
    """
    view = _header(source)
    for keyword in _GEOMETRY_KEYWORDS:
        if keyword in view:
            delattr(view, keyword)
    if not has_usable_frame_of_reference(view):
        for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator"):
            if keyword in view:
                delattr(view, keyword)
    if needs_frame_of_reference(view) is not False and "FrameOfReferenceUID" not in view:
        view.SOPClassUID = _SECONDARY_CAPTURE
        if "NumberOfFrames" in view:
            del view.NumberOfFrames
        return view
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([Dataset()])
    view.SharedFunctionalGroupsSequence = DicomSequence([shared])
    if "NumberOfFrames" in view:
        view.NumberOfFrames = 1
    return view


def _frame_label(plane: _Plane) -> str:
    return f"source {plane.source + 1:04d} frame {plane.frame:04d}"


def _positions(ds: Dataset) -> list[tuple[float, ...]] | None:
    """ImagePositionPatient of each frame, or None when a frame has none."""
    if not is_enhanced(ds):
        value = ds.get("ImagePositionPatient")
        return [tuple(float(v) for v in value)] if value is not None and len(value) == 3 else None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    positions: list[tuple[float, ...]] = []
    for number in range(frame_count(ds)):
        item = per_frame[number] if number < len(per_frame) else Dataset()
        plane = item.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        value = plane[0].get("ImagePositionPatient") if plane else None
        if value is None or len(value) != 3:
            return None
        positions.append(tuple(float(v) for v in value))
    return positions


def _why_not_spatial(sources: Sequence[Dataset]) -> str | None:
    """None if highdicom can build a spatial SEG from ``sources``, else why not."""
    first = sources[0]
    if not all(has_usable_frame_of_reference(ds) for ds in sources):
        return "no (valid) Frame of Reference UID"
    if len({str(ds.FrameOfReferenceUID) for ds in sources}) != 1:
        return "several Frames of Reference"
    if any(is_multi_frame_iod(ds) and not is_enhanced(ds) for ds in sources):
        # highdicom reads an image of a multi-frame IOD as an enhanced one (NM, US multi-frame)
        return "a multi-frame image without functional groups"
    if any(hd.spatial.get_image_coordinate_system(ds) is None for ds in sources):
        return "no patient geometry"
    if not is_enhanced(first):
        orientations = {tuple(ds.get("ImageOrientationPatient") or ()) for ds in sources}
        if len(orientations) != 1 or len(next(iter(orientations))) != 6:
            return "no single Image Orientation (Patient)"
    positions: list[tuple[float, ...]] = []
    for ds in sources:
        found = _positions(ds)
        if found is None:
            return "a frame without Image Position (Patient)"
        positions.extend(found)
    if len(set(positions)) != len(positions):
        return "the same Image Position (Patient) on several frames"
    return None


def _slice_thickness(sources: Sequence[Dataset]) -> float | None:
    """A Slice Thickness for a spatial SEG whose sources have none: their slice spacing."""
    for ds in sources:
        spacing = ds.get("SpacingBetweenSlices")
        if spacing not in (None, "") and float(spacing) > 0:
            return float(spacing)
    positions = [p for ds in sources for p in (_positions(ds) or [])]
    orientation = sources[0].get("ImageOrientationPatient")
    if len(positions) < 2 or orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    offsets = np.unique(np.round(np.asarray(positions) @ normal, 4))
    steps = np.diff(offsets)
    steps = steps[steps > 0]
    return float(steps.min()) if steps.size else None


def _fallback_thickness(sources: Sequence[Dataset], spacing: Any) -> float:
    thickness = _slice_thickness(sources)
    if thickness:
        return thickness
    return min(float(v) for v in spacing) if spacing else 1.0


def _spatial_headers(sources: Sequence[Dataset]) -> list[Dataset]:
    """Header copies for highdicom's spatial path, with a Slice Thickness where it is missing.

    highdicom reads SliceThickness of single-frame sources (AttributeError without it); CT and MR
    make it type 2, so real sources leave it out or empty. See :func:`_complete_pixel_measures`
    for the value used instead.
    """
    headers = [_header(ds) for ds in sources]
    lacking = [h for h in headers if not is_enhanced(h) and h.get("SliceThickness") in (None, "")]
    if lacking:
        thickness = round(_fallback_thickness(sources, lacking[0].get("PixelSpacing")), 6)
        for header in lacking:
            header.SliceThickness = thickness
    return headers


def _complete_pixel_measures(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """Give every Pixel Measures item of a spatial SEG a Slice Thickness (in place).

    highdicom copies Pixel Measures from the sources and leaves Slice Thickness out when they
    have none (or an empty one, it is type 2 in CT/MR); the SEG's Pixel Measures Macro needs it
    (dciodvfy: "Missing attribute Type 1C Conditional Element=<SliceThickness>"). Use the slice
    spacing when there is one, else say the frames are one pixel spacing thick: the thinnest
    thickness that is not a claim of more resolution than the pixels have.
    """
    items = [
        measures
        for group in [
            *seg.get("SharedFunctionalGroupsSequence", []),
            *seg.get("PerFrameFunctionalGroupsSequence", []),
        ]
        for measures in group.get("PixelMeasuresSequence", [])
    ]
    lacking = [item for item in items if item.get("SliceThickness") in (None, "")]
    if not lacking:
        return
    for item in lacking:
        item.SliceThickness = round(_fallback_thickness(sources, item.get("PixelSpacing")), 6)
    LOGGER.debug("sources have no Slice Thickness; the SEG says %s", lacking[0].SliceThickness)


def _drop_single_frame_numbers(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """Remove Referenced Frame Number from references to single-frame SOP classes (in place)."""
    single = {str(ds.SOPInstanceUID) for ds in sources if not is_multi_frame_iod(ds)}
    if not single:
        return
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in item.get("DerivationImageSequence", []):
            for reference in derivation.get("SourceImageSequence", []):
                if (
                    str(reference.ReferencedSOPInstanceUID) in single
                    and "ReferencedFrameNumber" in reference
                ):
                    del reference.ReferencedFrameNumber


def _extend_frames(
    seg: Dataset,
    sources: Sequence[Dataset],
    frames: Sequence[_Plane],
    pixel_array: np.ndarray,
) -> None:
    """Turn a one-source-frame template SEG into one covering every source frame (in place).

    ``seg`` was built from the first source frame with ``omit_empty_frames=False``, so its
    per-frame items are one per segment, in segment order (with one segment, highdicom keeps the
    Segment Identification in the shared item, where it stays valid for every frame).
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    templates = {
        # highdicom puts Segment Identification into the shared item when there is one segment
        int(
            (item if "SegmentIdentificationSequence" in item else shared)
            .SegmentIdentificationSequence[0]
            .ReferencedSegmentNumber
        ): item
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    n_segments = pixel_array.shape[-1]
    pairs = [
        (segment, plane)
        for segment in range(n_segments)
        for plane in range(len(frames))
        if pixel_array[plane, :, :, segment].any()
    ] or [(segment, plane) for segment in range(n_segments) for plane in range(len(frames))]

    items = []
    for segment, plane in pairs:
        item = copy.deepcopy(templates[segment + 1])
        frame = frames[plane]
        source = sources[frame.source]
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame.reference is not None:
            reference.ReferencedFrameNumber = frame.reference
        elif "ReferencedFrameNumber" in reference:
            del reference.ReferencedFrameNumber
        content = item.FrameContentSequence[0]
        content.DimensionIndexValues = [segment + 1, plane + 1]
        content.FrameLabel = _frame_label(frame)
        items.append(item)

    dimension = Dataset()
    dimension.DimensionOrganizationUID = seg.DimensionIndexSequence[0].DimensionOrganizationUID
    dimension.DimensionIndexPointer = tag_for_keyword("FrameLabel")
    dimension.FunctionalGroupPointer = tag_for_keyword("FrameContentSequence")
    dimension.DimensionDescriptionLabel = _FRAME_LABEL_DIMENSION
    seg.DimensionIndexSequence.append(dimension)

    seg.PerFrameFunctionalGroupsSequence = DicomSequence(items)
    seg.NumberOfFrames = len(items)
    planes = np.stack([pixel_array[plane, :, :, segment] for segment, plane in pairs])
    if seg.SegmentationType == "FRACTIONAL":  # one byte per pixel, 0..MaximumFractionalValue
        data = np.round(planes * MAX_FRACTIONAL_VALUE).astype(np.uint8).tobytes()
    else:
        data = pack_bits(planes.astype(np.uint8), pad=False)
    seg.PixelData = data + b"\x00" if len(data) % 2 else data

    referenced = DicomSequence()
    for source in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        referenced.append(ref)
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = referenced


def _frame_referenced(
    sources: Sequence[Dataset],
    frames: Sequence[_Plane],
    pixel_array: np.ndarray,
    common: dict[str, Any],
) -> hd.seg.Segmentation:
    """Build the SEG of sources without usable patient geometry (see the module docstring)."""
    first = sources[0]
    seg = hd.seg.Segmentation(
        source_images=[_template_view(first)],
        pixel_array=pixel_array[:1],
        omit_empty_frames=False,
        **common,
    )
    _extend_frames(seg, sources, frames, pixel_array)
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and not any(len(item) for item in measures):
        del shared.PixelMeasuresSequence
    seg.PatientOrientation = first.get("PatientOrientation", "")
    # Not re-read with Segmentation.from_dataset: that only rebuilds highdicom's frame look-ups
    # (an in-memory SQLite table), ~3 ms of the ~13 ms build of a one-image NM SEG (issue 15),
    # and the node never queries them; the written file is what readers (and tests) decode.
    return seg


def build_seg(
    sources: Sequence[Dataset],
    masks: Mapping[str, np.ndarray],
    segments: Sequence[SegmentSpec | Mapping[str, Any] | Any],
    algorithm: AlgorithmInfo,
    *,
    series_description: str | None = None,
    manufacturer: str = "dicom-node",
    manufacturer_model_name: str = "dicom-node",
    software_versions: str = SOFTWARE_VERSION,
    device_serial_number: str = "0",
    series_number: int | None = None,
    instance_number: int = 1,
    group: str | None = None,
    confidence: Confidence | None = None,
    probabilities: Mapping[str, np.ndarray] | None = None,
) -> hd.seg.Segmentation:
    """Build the DICOM SEG of one (source series, rule, resolved model version).

    BINARY from ``masks``; FRACTIONAL (probabilities) when ``probabilities`` is given.

    Parameters
    ----------
    sources
        Every instance of the source series, in the order the masks' frames follow. Pixel Data
        is not needed.
    masks
        ``masks[key]``: bool array ``(total frames over sources, rows, cols)``; one entry per
        segment key (extra keys are ignored).
    segments
        :class:`SegmentSpec` objects or manifest segment entries, numbered 1, 2, ... in this order.
    algorithm
        The resolved model version and the rule; names the Segmentation Algorithm Identification
        of every segment and, with the source series, derives the UIDs (:func:`seg_uids`).
    series_description
        Defaults to :func:`ai_series_description` ("AI segmentation (thyroid-seg v1) - ...").
    manufacturer, manufacturer_model_name, software_versions, device_serial_number
        General Equipment of the SEG.
    series_number
        Defaults to the source SeriesNumber + 1000.
    instance_number
        InstanceNumber of the SEG.
    group
        ``None`` for a whole series or its first group, else the group key of the sources
        (:attr:`dicom_node.seg.grouping.SourceGroup.uid_group`); part of the UIDs.
    confidence
        The result's confidence (:mod:`dicom_node.modelstore.confidence`): a low one prefixes
        the Series Description with ``LOW CONFIDENCE - ``; either way each segment's Segment
        Description says how sure the model was of it. ``None``: neither.
    probabilities
        ``probabilities[key]``: float array of the masks' shape with values in [0, 1] (the
        model's probabilities; manifest ``probabilities: true``). Given, the SEG is FRACTIONAL
        (Segmentation Fractional Type PROBABILITY, Maximum Fractional Value 255, values
        rounded to 1/255) and encodes these instead of ``masks`` (which must still be given
        and valid: they are what the other outputs are built from).

    Returns
    -------
    highdicom.seg.Segmentation
        A pydicom Dataset with file_meta (Explicit VR Little Endian), ready to write or send.
        For frame-referenced sources its highdicom look-ups are not rebuilt after the frames
        are extended: to query its pixels, read the written SEG back.

    Raises
    ------
    TypeError
        If ``sources`` is not a non-empty sequence of Datasets or ``algorithm`` is not an
        AlgorithmInfo.
    ValueError
        If the sources span several series, differ in size or repeat an instance, lack a UID,
        a mask is missing or has the wrong shape, segment keys repeat, or a manifest segment
        entry is invalid.

    Notes
    -----
    Sources that differ in orientation or Frame of Reference, repeat an Image Position
    (Patient), have no Frame of Reference, or are multi-frame images without functional groups
    give a frame-referenced SEG (no plane positions) that still references every source frame;
    split such a series with :func:`dicom_node.seg.grouping.group_sources` first to keep the
    geometry of each group.
    """
    _check_sources(sources)
    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm must be an AlgorithmInfo, got {type(algorithm).__name__}")
    specs = [SegmentSpec.coerce(entry) for entry in segments]
    if not specs:
        raise ValueError("segments must name at least one segment")
    keys = [spec.key for spec in specs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"segment keys must be unique, got {keys}")

    first = sources[0]
    frames = _source_frames(sources)
    shape = (len(frames), int(first.Rows), int(first.Columns))
    pixel_array = _stack_masks(masks, specs, shape)
    kind: dict[str, Any] = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY}
    if probabilities is not None:
        pixel_array = _stack_probabilities(probabilities, specs, shape)
        kind = {
            "segmentation_type": hd.seg.SegmentationTypeValues.FRACTIONAL,
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            "max_fractional_value": MAX_FRACTIONAL_VALUE,
        }

    identification = algorithm.to_highdicom()
    descriptions = [spec.to_highdicom(n, identification) for n, spec in enumerate(specs, 1)]
    series_uid, sop_uid = seg_uids(
        str(first.SeriesInstanceUID), algorithm.rule, algorithm.model, algorithm.version, group
    )
    if series_number is None:
        source_number = first.get("SeriesNumber")
        series_number = SERIES_NUMBER_OFFSET + (int(source_number) if source_number else 0)
    common: dict[str, Any] = {
        **kind,
        "segment_descriptions": descriptions,
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": sop_uid,
        "instance_number": instance_number,
        "manufacturer": manufacturer,
        "manufacturer_model_name": manufacturer_model_name,
        "software_versions": software_versions,
        "device_serial_number": device_serial_number,
        "content_label": CONTENT_LABEL,
        "content_description": f"{algorithm.model} {algorithm.version}"[:64],
    }

    reason = _why_not_spatial(sources)
    seg: hd.seg.Segmentation | None = None
    if reason is None:
        try:
            seg = hd.seg.Segmentation(
                source_images=_spatial_headers(sources), pixel_array=pixel_array, **common
            )
        except _SPATIAL_FALLBACK_ERRORS as exc:  # geometry highdicom cannot use: no positions
            reason = f"highdicom refused the geometry ({type(exc).__name__}: {exc})"
            LOGGER.warning("spatial SEG not possible, building a frame-referenced one: %s", reason)
        else:
            _complete_pixel_measures(seg, sources)
            _drop_single_frame_numbers(seg, sources)
    if seg is None:
        seg = _frame_referenced(sources, frames, pixel_array, common)

    seg.SeriesDescription = flag_text(
        series_description or ai_series_description(algorithm.model, algorithm.version),
        confidence,
    )
    if confidence is not None:
        for item, spec in zip(seg.SegmentSequence, specs, strict=True):
            item.SegmentDescription = confidence.segment_note(spec.key)
    LOGGER.debug(
        "built SEG %s for series %s: %d segments, %d frames, %s",
        sop_uid,
        first.SeriesInstanceUID,
        len(specs),
        int(seg.NumberOfFrames),
        "spatial" if reason is None else f"frame-referenced ({reason})",
    )
    return seg
