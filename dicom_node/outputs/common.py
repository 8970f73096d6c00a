"""What every output object repeats from its SEG and sources: patient, study, references.

The SEG (:func:`dicom_node.seg.build_seg`) has already repaired the sources' Patient and Study
modules (absent type 2 attributes empty, broken dates blanked, de-identification completed), so
the outputs copy those modules from the SEG instead of repairing the sources a second time: the
SEG, the overlay, the presentation state and the report of one result always agree.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicom_node.seg.sources import frame_count, is_multi_frame_iod

LOGGER = logging.getLogger(__name__)

PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
"""Patient and General Study attributes copied from the SEG into every output."""

SERIES_NUMBER_OFFSETS = {"overlay": 2000, "gsps": 3000, "report": 4000}
"""An output's SeriesNumber is the source's plus this (the SEG's is plus 1000)."""

SOURCE_IMAGE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
"""Purpose of Reference of a Source Image Sequence item (CID 7202)."""


def copy_patient_study(seg: Dataset, target: Dataset) -> None:
    """Set ``target``'s Patient and Study attributes to the SEG's (absent ones are removed)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in seg:
            setattr(target, keyword, copy.deepcopy(seg[keyword].value))
        elif keyword in target and keyword != "StudyInstanceUID":
            delattr(target, keyword)


def series_number(source: Dataset, kind: str) -> int:
    """SeriesNumber of an output: the source's plus :data:`SERIES_NUMBER_OFFSETS`."""
    number = source.get("SeriesNumber")
    try:
        base = int(number) if number not in (None, "") else 0
    except (TypeError, ValueError):
        base = 0
    return SERIES_NUMBER_OFFSETS[kind] + base


def fix_laterality(source: Dataset, target: Dataset) -> None:
    """General Series Laterality (type 2C) and BodyPartExamined, as dciodvfy checks them.

    highdicom leaves Laterality out, which dciodvfy reports as an error unless the Body Part
    Examined says the part is unpaired (DESIGN.md pitfall). The source's Laterality (or its
    Image Laterality L/R) is copied with its BodyPartExamined; without either, Laterality is
    left empty, which is what type 2 means by "unknown".
    """
    body_part = source.get("BodyPartExamined")
    if body_part:
        target.BodyPartExamined = body_part
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    if laterality in ("L", "R"):
        target.Laterality = laterality
    elif not body_part:
        target.Laterality = ""
    elif "Laterality" in target:
        del target.Laterality


def source_frames(sources: Sequence[Dataset]) -> list[tuple[Dataset, int | None]]:
    """Per frame of ``sources`` in mask order: the instance and its ReferencedFrameNumber.

    The frame number is ``None`` for single-frame SOP classes (a reference to them must not
    carry one), as in the SEG.
    """
    frames: list[tuple[Dataset, int | None]] = []
    for ds in sources:
        multi = is_multi_frame_iod(ds)
        frames.extend((ds, n if multi else None) for n in range(1, frame_count(ds) + 1))
    return frames


def source_image_item(ds: Dataset, frame: int | None) -> Dataset:
    """One Source Image Sequence item naming ``ds`` (and ``frame`` of it, for multi-frame IODs)."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = SOURCE_IMAGE_PURPOSE
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item
