"""The report: a TID 1500 Measurement Report (Comprehensive 3D SR) on the SEG's segments.

One measurement group per segment of the SEG, each referencing *the segment* (Referenced
Segment: SEG instance and Segment Number, with the source frames it was built from), never a
Referenced Segmentation Frame: highdicom 0.28 only offers the latter for planar ROI groups, and
dciodvfy refuses it (DESIGN.md pitfall). So every group is a TID 1411 Volumetric ROI group, also
for planar sources, where the segment is the one frame's region and the size is an area.

Per segment (the numbers of :mod:`dicom_node.outputs.measurements`, the same the overlay
shows):

* Area (SCT 42798000) in ``mm2``, or for a volumetric group Volume (SCT 118565006) in ``ml``;
* Total (SCT 255619001) and Mean (SCT 373098007) of the source pixel values inside, in the
  modality's unit (``{counts}`` for NM and PT, ``[hnsf'U]`` for CT, ``1`` otherwise); the mean
  is left out for an empty segment.

That is the default; the manifest's ``measurements:`` chooses per segment (size and counts on or
off, and):

* ``components: true``: Number of lesions (SCT 246206008, unit ``1``) in the segment's group,
  and one more group per connected component, largest first, outlined on its source frame (a
  closed POLYLINE SCOORD; TID 1410 planar, or TID 1411 with one region per slice in a volume):
  its Area / Volume, Diameter (SCT 81827009, ``mm``: the equivalent circle's or sphere's),
  Total and Mean;
* ``laterality: split``: per side, in the segment's group, Area / Volume, Total (counts only)
  and Ratio (SCT 118586006) in ``%``, each with the Finding Site "segment type, laterality Left
  (SCT 7771000) / Right (SCT 24028007)"; the two Ratios add up to 100.

Finding type and category are the segment's SNOMED CT codes; the algorithm is the resolved model
version. The observer is the model as a device. UIDs come from
:func:`dicom_node.seg.output_uids` (``kind="report"``): a re-run replaces the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.modelstore.confidence import Confidence, flag_text
from dicom_node.outputs.common import copy_patient_study, series_number, source_frames
from dicom_node.outputs.measurements import SegmentMeasurement, intensity_unit
from dicom_node.seg import AlgorithmInfo, output_uids
from dicom_node.seg.sop import SOFTWARE_VERSION
from dicom_node.seg.uids import UID_NAMESPACE, UID_PREFIX

LOGGER = logging.getLogger(__name__)

AREA_UNIT = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
"""UCUM unit of an area."""
VOLUME_UNIT = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
"""UCUM unit of a volume."""
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
"""Procedure Reported when the source names none (ProcedureCodeSequence)."""
LENGTH_UNIT = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
"""UCUM unit of a component's equivalent diameter."""
NO_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")
"""UCUM unit of a count."""
PERCENT = hd.sr.CodedConcept("%", "UCUM", "Percent")
"""UCUM unit of a side's share."""
COMPONENT_COUNT = hd.sr.CodedConcept("246206008", "SCT", "Number of lesions")
"""How many connected components a segment has (``components: true``)."""
SHARE = hd.sr.CodedConcept("118586006", "SCT", "Ratio")
"""A side's share of its paired organ's counts (NM, PT) or size, in percent; the finding site
(the segment's type with laterality Left or Right) says which side."""
CERTAINTY = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
"""Qualitative evaluation of every segment group when the result has a confidence: ``Low``
(SCT 62482003) for a low-confidence result, else ``High`` (SCT 75540009)."""
CERTAINTY_LOW = hd.sr.CodedConcept("62482003", "SCT", "Low")
CERTAINTY_HIGH = hd.sr.CodedConcept("75540009", "SCT", "High")


def _uid(*parts: str) -> str:
    return str(generate_uid(prefix=UID_PREFIX, entropy_srcs=[UID_NAMESPACE, *parts]))


def _procedure(source: Dataset) -> hd.sr.CodedConcept:
    for item in source.get("ProcedureCodeSequence") or []:
        try:
            return hd.sr.CodedConcept(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)
        except (AttributeError, TypeError, ValueError):
            continue
    return IMAGING_PROCEDURE


def _segment_code(seg: Dataset, number: int, keyword: str) -> hd.sr.CodedConcept | None:
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == number and keyword in item:
            code = item.get(keyword)[0]
            return hd.sr.CodedConcept(code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning)
    return None


def _size(
    volume_ml: float | None, area_mm2: float | None, sites: list[hd.sr.FindingSite] | None = None
) -> list[hd.sr.Measurement]:
    if volume_ml is not None:
        return [
            hd.sr.Measurement(
                name=codes.SCT.Volume, value=volume_ml, unit=VOLUME_UNIT, finding_sites=sites
            )
        ]
    if area_mm2 is not None:
        return [
            hd.sr.Measurement(
                name=codes.SCT.Area, value=area_mm2, unit=AREA_UNIT, finding_sites=sites
            )
        ]
    return []


def _measurements(
    value: SegmentMeasurement,
    unit: hd.sr.CodedConcept,
    site: hd.sr.CodedConcept | None = None,
) -> list[hd.sr.Measurement]:
    """The segment's own measurements: size, counts, number of components, the two sides."""
    out = _size(value.volume_ml, value.area_mm2) if value.size_reported else []
    if "sum" in value.counts_reported:
        out.append(hd.sr.Measurement(name=codes.SCT.Total, value=value.intensity_sum, unit=unit))
    if "mean" in value.counts_reported and value.intensity_mean is not None:
        out.append(hd.sr.Measurement(name=codes.SCT.Mean, value=value.intensity_mean, unit=unit))
    if value.components is not None:
        out.append(
            hd.sr.Measurement(name=COMPONENT_COUNT, value=len(value.components), unit=NO_UNIT)
        )
    for side in value.sides or ():
        laterality = codes.SCT.Left if side.side == "left" else codes.SCT.Right
        sites = [hd.sr.FindingSite(site or IMAGING_PROCEDURE, laterality=laterality)]
        out += _size(side.volume_ml, side.area_mm2, sites)
        if value.share_of == "counts":
            out.append(
                hd.sr.Measurement(
                    name=codes.SCT.Total, value=side.intensity_sum, unit=unit, finding_sites=sites
                )
            )
        out.append(
            hd.sr.Measurement(
                name=SHARE, value=side.share_percent, unit=PERCENT, finding_sites=sites
            )
        )
    return out


_Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _component_groups(
    value: SegmentMeasurement,
    planes: Sequence[tuple[Dataset, int | None]],
    unit: hd.sr.CodedConcept,
    codes_of: tuple[hd.sr.CodedConcept | None, hd.sr.CodedConcept | None],
    algorithm_id: hd.sr.AlgorithmIdentification,
    sop_uid: str,
) -> list[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    """One ROI group per connected component: its outline on the source image(s), its size,
    equivalent diameter and counts (TID 1410 planar / TID 1411 volumetric with image regions)."""
    finding_type, finding_category = codes_of
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    total = len(value.components or ())
    for part in value.components or ():
        regions = []
        for frame, outline in part.outlines:
            source, number = planes[frame]
            regions.append(
                hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: last vertex = first
                    graphic_data=np.asarray(outline, dtype=float),
                    source_image=hd.sr.SourceImageForRegion(
                        str(source.SOPClassUID),
                        str(source.SOPInstanceUID),
                        referenced_frame_numbers=[number] if number is not None else None,
                    ),
                )
            )
        if not regions:
            continue
        measured = _size(part.volume_ml, part.area_mm2) + [
            hd.sr.Measurement(name=codes.SCT.Diameter, value=part.diameter_mm, unit=LENGTH_UNIT),
            hd.sr.Measurement(name=codes.SCT.Total, value=part.intensity_sum, unit=unit),
            hd.sr.Measurement(name=codes.SCT.Mean, value=part.intensity_mean, unit=unit),
        ]
        tracking = hd.sr.TrackingIdentifier(
            uid=_uid(sop_uid, "segment", str(value.number), "component", str(part.index)),
            identifier=f"{value.label} {part.index} of {total} (segment {value.number})"[:64],
        )
        if part.volume_ml is None and len(regions) == 1:
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=regions[0],
                    finding_type=finding_type,
                    finding_category=finding_category,
                    algorithm_id=algorithm_id,
                    measurements=measured,
                )
            )
        else:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_regions=regions,
                    finding_type=finding_type,
                    finding_category=finding_category,
                    algorithm_id=algorithm_id,
                    measurements=measured,
                )
            )
    return groups


def build_report(
    sources: Sequence[Dataset],
    seg: Dataset,
    measurements: Sequence[SegmentMeasurement],
    algorithm: AlgorithmInfo,
    *,
    group: str | None = None,
    confidence: Confidence | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Measurement Report of one SEG.

    Parameters
    ----------
    sources
        The SEG's source instances (evidence, referenced source frames).
    seg
        The SEG (evidence; its segments are referenced by number).
    measurements
        One per segment of the SEG (:func:`dicom_node.outputs.measure`).
    algorithm
        The resolved model version and rule (observer, algorithm, UIDs).
    group
        The SEG's group key (``SourceGroup.uid_group``), part of the UIDs.
    confidence
        The result's confidence: each group gets the qualitative evaluation
        :data:`CERTAINTY` (Low for a low-confidence result, else High) and a low one prefixes
        the Series Description with ``LOW CONFIDENCE - ``. ``None``: neither.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Complete, unverified; ready to write or send.

    Raises
    ------
    ValueError
        A measurement names a segment number the SEG does not have.
    """
    numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
    unknown = sorted({m.number for m in measurements} - numbers)
    if unknown:
        raise ValueError(f"measurements name segment number(s) {unknown}; the SEG has {numbers}")
    first = sources[0]
    series_uid, sop_uid = output_uids(
        "report",
        str(first.SeriesInstanceUID),
        algorithm.rule,
        algorithm.model,
        algorithm.version,
        group,
    )
    unit_code, unit_meaning = intensity_unit(first.get("Modality"))
    unit = hd.sr.CodedConcept(unit_code, "UCUM", unit_meaning)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.model, version=algorithm.version, parameters=None
    )
    source_images = [
        hd.sr.SourceImageForSegmentation(
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            referenced_frame_numbers=[frame] if frame is not None else None,
        )
        for ds, frame in source_frames(sources)
    ]
    certainty = None
    if confidence is not None:
        flag = CERTAINTY_LOW if confidence.low else CERTAINTY_HIGH
        certainty = [hd.sr.QualitativeEvaluation(name=CERTAINTY, value=flag)]
    groups: list[_Group] = []
    for value in measurements:
        referenced = hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=value.number,
            source_images=source_images,
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=_uid(str(sop_uid), "segment", str(value.number)),
                    identifier=f"{value.label} (segment {value.number})"[:64],
                ),
                referenced_segment=referenced,
                finding_type=_segment_code(seg, value.number, "SegmentedPropertyTypeCodeSequence"),
                finding_category=_segment_code(
                    seg, value.number, "SegmentedPropertyCategoryCodeSequence"
                ),
                algorithm_id=algorithm_id,
                measurements=_measurements(
                    value,
                    unit,
                    _segment_code(seg, value.number, "SegmentedPropertyTypeCodeSequence"),
                ),
                qualitative_evaluations=certainty,
            )
        )
    for value in measurements:  # after the segments: each component of those that ask for it
        groups += _component_groups(
            value,
            source_frames(sources),
            unit,
            (
                _segment_code(seg, value.number, "SegmentedPropertyTypeCodeSequence"),
                _segment_code(seg, value.number, "SegmentedPropertyCategoryCodeSequence"),
            ),
            algorithm_id,
            str(sop_uid),
        )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", algorithm.model, algorithm.version),
            name=f"{algorithm.model} {algorithm.version}"[:64],
            manufacturer_name="dicom-node",
            model_name=algorithm.model,
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_procedure(first),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=content,
        series_instance_uid=series_uid,
        series_number=series_number(first, "report"),
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="dicom-node",
        is_complete=True,
    )
    copy_patient_study(seg, sr)
    sr.SeriesDescription = flag_text(
        f"AI measurements ({algorithm.model} v{algorithm.version}) - not for diagnosis alone",
        confidence,
    )
    sr.SoftwareVersions = SOFTWARE_VERSION
    LOGGER.debug("built report %s: %d segment group(s)", sop_uid, len(groups))
    return sr


__all__ = ["AREA_UNIT", "CERTAINTY", "IMAGING_PROCEDURE", "VOLUME_UNIT", "build_report"]
