"""What a source instance is, as far as a SEG is concerned: an image or not, multi-frame or not.

Real series carry objects that are no images at all (structured reports, RT plans, waveforms,
DICOMDIRs, SEGs of someone else) and images whose headers stop short of the standard (type 2
attributes left out instead of left empty). The worker asks :func:`is_image` before inference and
skips what is not an image, with the reason; :func:`build_seg` uses the other helpers so that a
header that stops short still gives a valid SEG.
"""

from __future__ import annotations

import logging
import re

from highdicom._standard_utils import ModuleUsageValues, get_module_usage, is_attribute_in_iod
from pydicom import Dataset, config
from pydicom.uid import UID
from pydicom.valuerep import validate_value

LOGGER = logging.getLogger(__name__)

NOT_SEGMENTED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.1.3.10": "a DICOMDIR (media storage directory), not an image",
    "1.2.840.10008.5.1.4.1.1.66.4": "a Segmentation: a result, not a source image",
    "1.2.840.10008.5.1.4.1.1.66.7": "a Label Map Segmentation: a result, not a source image",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose: a dose grid, not an image",
    "1.2.840.10008.5.1.4.1.1.30": "a Parametric Map: derived values, not an image",
}
"""SOP classes that may carry pixels but are never segmented, with the reason."""

IMAGE_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)
"""Image Pixel attributes without which Pixel Data cannot be interpreted."""

EMPTY_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 Patient and General Study attributes the SEG copies; absent in a source means empty."""

_RETIRED_MULTI_FRAME = {
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.5",  # Nuclear Medicine Image Storage (Retired)
}


def is_image(ds: Dataset) -> tuple[bool, str]:
    """Tell whether ``ds`` is an image the node can segment, and if not, why.

    Parameters
    ----------
    ds
        A source instance (header and pixel data as received; nothing is decoded).

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` for an image; ``(False, reason)`` otherwise. The reason names the SOP
        class (never a UID of the patient's data), e.g. ``"Basic Text SR Storage has no Pixel
        Data"``, ready for a log line or a skipped job.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a pydicom Dataset, got {type(ds).__name__}")
    sop_class = ds.get("SOPClassUID")
    if sop_class is None:
        media = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if media is not None and str(media) in NOT_SEGMENTED_SOP_CLASSES:
            return False, NOT_SEGMENTED_SOP_CLASSES[str(media)]
        return False, "has no SOP Class UID"
    name = UID(str(sop_class)).name or "an unknown SOP class"
    if str(sop_class) in NOT_SEGMENTED_SOP_CLASSES:
        return False, f"{name} is {NOT_SEGMENTED_SOP_CLASSES[str(sop_class)]}"
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return False, f"{name} has floating point pixel data only, not an image"
        return False, f"{name} has no Pixel Data"
    missing = [keyword for keyword in IMAGE_PIXEL_KEYWORDS if ds.get(keyword) in (None, "")]
    if missing:
        return False, f"{name} lacks {', '.join(missing)}: its Pixel Data cannot be interpreted"
    return True, ""


def frame_count(ds: Dataset) -> int:
    """Number of frames in the Pixel Data (NumberOfFrames, 1 when absent or empty).

    Raises
    ------
    ValueError
        If NumberOfFrames is not a positive integer.
    """
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"NumberOfFrames must be a positive integer, got {value!r}") from None
    if count < 1:
        raise ValueError(f"NumberOfFrames must be a positive integer, got {value!r}")
    return count


def is_multi_frame_iod(ds: Dataset) -> bool:
    """Whether the instance's IOD allows several frames (then a frame is referenced by number).

    A reference to an instance of a single-frame SOP class must not carry a Referenced Frame
    Number (PS3.3 C.7.6.1.1.4; dciodvfy: "Shall not be present for Referenced SOP Class that is
    not multi-frame"), even when the instance itself (wrongly) has NumberOfFrames.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _RETIRED_MULTI_FRAME:
        return True
    try:
        return bool(is_attribute_in_iod("NumberOfFrames", sop_class))
    except KeyError:  # a SOP class highdicom's tables do not know
        return "NumberOfFrames" in ds


def is_enhanced(ds: Dataset) -> bool:
    """Whether the instance carries functional groups (an enhanced multi-frame image)."""
    return "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds


def fill_empty_type2(ds: Dataset) -> list[str]:
    """Add each absent :data:`EMPTY_TYPE2_KEYWORDS` attribute to ``ds`` as empty (in place).

    Only for header copies made by the builder; never call it on a caller's dataset.

    Returns
    -------
    list of str
        The keywords that were added.
    """
    added = []
    for keyword in EMPTY_TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, None)
            added.append(keyword)
    return added


_PATIENT_SEX = {"M", "F", "O", ""}
_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_OLD_SEPARATORS = {"PatientBirthDate": ".", "StudyDate": ".", "StudyTime": ":"}
"""ACR-NEMA forms (``1997.04.24``, ``10:32:15``) pydicom reads but DICOM does not allow."""


def sanitize_type2(ds: Dataset) -> list[str]:
    """Make type 2 dates, times and Patient's Sex valid DICOM values, or empty (in place).

    Only for header copies made by the builder: a SEG that repeated an invalid value would fail
    validation (highdicom refuses some, dciodvfy the rest). The ACR-NEMA forms ``YYYY.MM.DD`` and
    ``HH:MM:SS`` lose their separators; anything else invalid becomes empty, which is what type 2
    allows for "unknown".

    Returns
    -------
    list of str
        The keywords that were blanked (never their values: they are patient data).
    """
    blanked = []
    for keyword, pattern in (
        ("PatientBirthDate", _DA_RE),
        ("StudyDate", _DA_RE),
        ("StudyTime", _TM_RE),
    ):
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        text = str(value).strip()
        if not pattern.match(text):
            text = text.replace(_OLD_SEPARATORS[keyword], "")
        if pattern.match(text):
            if text != str(value):
                setattr(ds, keyword, text)
        else:
            setattr(ds, keyword, None)
            blanked.append(keyword)
    sex = ds.get("PatientSex")
    if sex is not None and str(sex).strip().upper() not in _PATIENT_SEX:
        ds.PatientSex = None
        blanked.append("PatientSex")
    elif sex is not None and str(sex) != str(sex).strip().upper():
        ds.PatientSex = str(sex).strip().upper()
    return blanked


COPIED_STUDY_KEYWORDS = frozenset(
    {
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
    }
)
"""General Study / Patient Study attributes outside group 0010 that the SEG copies."""


def drop_invalid_copied_values(ds: Dataset) -> list[str]:
    """Remove patient and study values that break their VR (in place); type 2 ones become empty.

    The SEG copies the Patient and Study modules from its source, invalid values included, and
    dciodvfy then fails the SEG for the source's fault (a Patient's Age ``22Y``, a 64 character
    Study ID). UIDs are never touched: the SEG has to repeat them. Only for the builder's header
    copies; call after :func:`sanitize_type2`, which repairs the forms that can be repaired.

    Returns
    -------
    list of str
        Keywords removed or emptied (never their values).
    """
    dropped = []
    for element in list(ds):
        keyword = element.keyword
        copied = element.tag.group in (0x0010, 0x0012) or keyword in COPIED_STUDY_KEYWORDS
        if not copied or element.VR in ("SQ", "UI") or element.is_empty:
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                validate_value(element.VR, value, config.RAISE)
        except (TypeError, ValueError):
            if keyword in EMPTY_TYPE2_KEYWORDS:
                element.value = None
            else:
                del ds[element.tag]
            dropped.append(keyword or str(element.tag))
    return dropped


DEIDENTIFICATION_UNSTATED = "not stated by the source"
"""De-identification Method of a SEG whose source says YES to Patient Identity Removed only."""


def complete_deidentification(ds: Dataset) -> bool:
    """Give a de-identified header without a method the method :data:`DEIDENTIFICATION_UNSTATED`.

    Patient Identity Removed YES makes De-identification Method (or its code sequence) type 1C;
    the SEG copies the flag, so it needs one of them. Only for the builder's header copies.

    Returns
    -------
    bool
        True if the method was added.
    """
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return False
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return False
    ds.DeidentificationMethod = DEIDENTIFICATION_UNSTATED
    return True


def has_usable_frame_of_reference(ds: Dataset) -> bool:
    """Whether the instance has a Frame of Reference UID a SEG can repeat.

    Some writers fill FrameOfReferenceUID with the Study Instance UID; dciodvfy rejects that
    ("StudyInstanceUID has same value as FrameOfReferenceUID"), so such a source counts as one
    without a Frame of Reference.
    """
    value = str(ds.get("FrameOfReferenceUID", "") or "")
    others = {str(ds.get(keyword, "")) for keyword in ("StudyInstanceUID", "SeriesInstanceUID")}
    return bool(value) and value not in others


def needs_frame_of_reference(ds: Dataset) -> bool | None:
    """Whether the instance's IOD makes the Frame of Reference module mandatory.

    Returns
    -------
    bool or None
        None when highdicom's tables do not know the SOP class (a retired one, a private one).
    """
    try:
        usage = get_module_usage("frame-of-reference", str(ds.get("SOPClassUID", "")))
    except KeyError:
        return None
    return bool(usage == ModuleUsageValues.MANDATORY)
