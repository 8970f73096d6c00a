"""Build the DICOM SEG of one result with highdicom: NM, Secondary Capture, CT and MR sources.

Two paths, chosen by whether the sources live in a patient coordinate system
(``highdicom.spatial.get_image_coordinate_system``):

**Spatial sources** (CT, MR, anything with a Frame of Reference *and* Image Position (Patient)):
plain ``highdicom.seg.Segmentation``. highdicom copies plane positions, orientation and pixel
measures from the sources and references every source instance per frame.

**Frame-referenced sources** (planar NM, Secondary Capture, anything without patient geometry).
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
  frame-referenced derived images), numbers the source frames. The result is re-read with
  ``Segmentation.from_dataset`` so highdicom's decoder checks it and its lookups are current.
* PatientOrientation (General Image, type 2C: required when there is no Image Orientation) is
  copied from the source; highdicom leaves it out and dciodvfy reports the gap.

Empty masks: frames of a segment that is empty on a source frame are omitted (highdicom's default);
if every mask is empty, every frame is kept, all zero, so the SEG still says "segmented, nothing
found" for each segment. Both forms pass dciodvfy and highdicom's reader.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.seg.content import AlgorithmInfo, SegmentSpec
from dicom_node.seg.uids import ai_series_description, seg_uids

LOGGER = logging.getLogger(__name__)

CONTENT_LABEL = "AI_SEGMENTATION"
"""Content Label (CS, at most 16 characters) of every SEG the node builds."""

SERIES_NUMBER_OFFSET = 1000
"""The SEG's SeriesNumber is the source's plus this (or this alone when the source has none)."""

SOFTWARE_VERSION = "dicom-node 0.1"
"""Software Versions written into the SEG by default."""

_FRAME_LABEL_DIMENSION = "Source Frame"
_PIXEL_DATA = 0x7FE00010


def _frame_count(ds: Dataset) -> int:
    """Number of frames of a source instance (1 for single-frame IODs)."""
    value = ds.get("NumberOfFrames")
    return int(value) if value not in (None, "") else 1


def _source_frames(sources: Sequence[Dataset]) -> list[tuple[int, int | None]]:
    """``(source index, frame number or None for single-frame instances)`` for each mask plane."""
    frames: list[tuple[int, int | None]] = []
    for index, ds in enumerate(sources):
        if "NumberOfFrames" in ds:
            frames.extend((index, number) for number in range(1, _frame_count(ds) + 1))
        else:
            frames.append((index, None))
    return frames


def _check_sources(sources: Sequence[Dataset]) -> None:
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence) or not sources:
        raise TypeError("sources must be a non-empty sequence of pydicom Datasets")
    for ds in sources:
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources must contain pydicom Datasets, got {type(ds).__name__}")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
            if keyword not in ds:
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


def _highdicom_view(source: Dataset) -> Dataset:
    """Copy of a frame-referenced source's header in the shape highdicom's code path reads.

    Gives a legacy multi-frame image the Shared Functional Groups item highdicom looks for, with a
    Pixel Measures item that is empty (removed from the SEG again), hides PixelSpacing and sets
    NumberOfFrames to 1 (the template frame). See the module docstring.
    """
    view = Dataset()  # a deep copy of the header: pydicom's copy.copy shares the elements
    for element in source:
        if element.tag != _PIXEL_DATA:
            view.add(copy.deepcopy(element))
    if "SharedFunctionalGroupsSequence" not in view:
        shared = Dataset()
        shared.PixelMeasuresSequence = DicomSequence([Dataset()])
        view.SharedFunctionalGroupsSequence = DicomSequence([shared])
    if "PixelSpacing" in view:
        del view.PixelSpacing
    if "NumberOfFrames" in view:
        view.NumberOfFrames = 1
    return view


def _frame_label(source_index: int, frame_number: int | None) -> str:
    return f"source {source_index + 1:04d} frame {frame_number or 1:04d}"


def _extend_frames(
    seg: Dataset,
    sources: Sequence[Dataset],
    frames: Sequence[tuple[int, int | None]],
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
        source_index, frame_number = frames[plane]
        source = sources[source_index]
        reference = item.DerivationImageSequence[0].SourceImageSequence[0]
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame_number is not None:
            reference.ReferencedFrameNumber = frame_number
        elif "ReferencedFrameNumber" in reference:
            del reference.ReferencedFrameNumber
        content = item.FrameContentSequence[0]
        content.DimensionIndexValues = [segment + 1, plane + 1]
        content.FrameLabel = _frame_label(source_index, frame_number)
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
    data = pack_bits(planes.astype(np.uint8), pad=False)
    seg.PixelData = data + b"\x00" if len(data) % 2 else data

    referenced = DicomSequence()
    for source in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID = source.SOPClassUID
        ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
        referenced.append(ref)
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = referenced


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
) -> hd.seg.Segmentation:
    """Build the BINARY DICOM SEG of one (source series, rule, resolved model version).

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

    Returns
    -------
    highdicom.seg.Segmentation
        A pydicom Dataset with file_meta (Explicit VR Little Endian), ready to write or send.

    Raises
    ------
    TypeError
        If ``sources`` is not a non-empty sequence of Datasets or ``algorithm`` is not an
        AlgorithmInfo.
    ValueError
        If the sources span several series, differ in size or repeat an instance, a mask is
        missing or has the wrong shape, segment keys repeat, or a manifest segment entry is invalid.
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
    pixel_array = _stack_masks(masks, specs, (len(frames), int(first.Rows), int(first.Columns)))

    identification = algorithm.to_highdicom()
    descriptions = [spec.to_highdicom(n, identification) for n, spec in enumerate(specs, 1)]
    series_uid, sop_uid = seg_uids(
        str(first.SeriesInstanceUID), algorithm.rule, algorithm.model, algorithm.version
    )
    if series_number is None:
        source_number = first.get("SeriesNumber")
        series_number = SERIES_NUMBER_OFFSET + (int(source_number) if source_number else 0)
    common: dict[str, Any] = {
        "segmentation_type": hd.seg.SegmentationTypeValues.BINARY,
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

    spatial = hd.spatial.get_image_coordinate_system(first) is not None
    if spatial:
        seg = hd.seg.Segmentation(source_images=list(sources), pixel_array=pixel_array, **common)
    else:
        seg = hd.seg.Segmentation(
            source_images=[_highdicom_view(first)],
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
        # rebuild highdicom's frame lookup tables from the finished dataset
        seg = hd.seg.Segmentation.from_dataset(seg, copy=False)

    seg.SeriesDescription = series_description or ai_series_description(
        algorithm.model, algorithm.version
    )
    LOGGER.debug(
        "built SEG %s for series %s: %d segments, %d frames, %s path",
        sop_uid,
        first.SeriesInstanceUID,
        len(specs),
        int(seg.NumberOfFrames),
        "spatial" if spatial else "frame-referenced",
    )
    return seg
