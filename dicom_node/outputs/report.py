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

Finding type and category are the segment's SNOMED CT codes; the algorithm is the resolved model
version. The observer is the model as a device. UIDs come from
:func:`dicom_node.seg.output_uids` (``kind="report"``): a re-run replaces the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

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


def _measurements(value: SegmentMeasurement, unit: hd.sr.CodedConcept) -> list[hd.sr.Measurement]:
    out = []
    if value.volume_ml is not None:
        out.append(
            hd.sr.Measurement(name=codes.SCT.Volume, value=value.volume_ml, unit=VOLUME_UNIT)
        )
    elif value.area_mm2 is not None:
        out.append(hd.sr.Measurement(name=codes.SCT.Area, value=value.area_mm2, unit=AREA_UNIT))
    out.append(hd.sr.Measurement(name=codes.SCT.Total, value=value.intensity_sum, unit=unit))
    if value.intensity_mean is not None:
        out.append(hd.sr.Measurement(name=codes.SCT.Mean, value=value.intensity_mean, unit=unit))
    return out


def build_report(
    sources: Sequence[Dataset],
    seg: Dataset,
    measurements: Sequence[SegmentMeasurement],
    algorithm: AlgorithmInfo,
    *,
    group: str | None = None,
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
    groups = []
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
                measurements=_measurements(value, unit),
            )
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
    sr.SeriesDescription = (
        f"AI measurements ({algorithm.model} v{algorithm.version}) - not for diagnosis alone"
    )[:64]
    sr.SoftwareVersions = SOFTWARE_VERSION
    LOGGER.debug("built report %s: %d segment group(s)", sop_uid, len(groups))
    return sr


__all__ = ["AREA_UNIT", "IMAGING_PROCEDURE", "VOLUME_UNIT", "build_report"]
