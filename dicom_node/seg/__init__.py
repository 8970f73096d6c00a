"""DICOM SEG results: value objects, deterministic UIDs and the highdicom builder.

``build_seg(sources, masks, segments, algorithm)`` returns a BINARY ``highdicom.seg.Segmentation``
(FRACTIONAL, of probabilities, when given ``probabilities=``) for NM (including the
multi-frame NM IOD highdicom 0.28 trips over), Secondary Capture and
single- or multi-slice CT/MR series; see :mod:`dicom_node.seg.sop` for how NM is handled.
``is_image(ds)`` says which received objects are images at all, and ``group_sources(sources)``
splits a series into the groups (size, orientation, Frame of Reference) one SEG each describes.

May import: ``dicom_node.modelstore`` (the contract types, e.g. coded concepts) and nothing else
of the node.
"""

from dicom_node.seg.content import ARTIFICIAL_INTELLIGENCE, AlgorithmInfo, Code, SegmentSpec
from dicom_node.seg.grouping import SourceGroup, group_sources
from dicom_node.seg.sop import CONTENT_LABEL, build_seg
from dicom_node.seg.sources import frame_count, is_image
from dicom_node.seg.uids import OUTPUT_KINDS, ai_series_description, output_uids, seg_uids

__all__ = [
    "ARTIFICIAL_INTELLIGENCE",
    "OUTPUT_KINDS",
    "CONTENT_LABEL",
    "AlgorithmInfo",
    "Code",
    "SegmentSpec",
    "SourceGroup",
    "ai_series_description",
    "build_seg",
    "group_sources",
    "frame_count",
    "is_image",
    "output_uids",
    "seg_uids",
]
