"""Results besides the SEG that a rule's ``outputs:`` asks for, all derived from one SEG.

* :func:`build_overlays`: an RGB Secondary Capture per source frame, contours and legend burned
  in (:mod:`dicom_node.outputs.overlay`);
* :func:`build_gsps`: a Grayscale Softcopy Presentation State with the outlines on the original
  images (:mod:`dicom_node.outputs.gsps`);
* :func:`build_report`: a TID 1500 Measurement Report on the SEG's segments
  (:mod:`dicom_node.outputs.report`);
* :func:`measure`: the per-segment numbers both show (:mod:`dicom_node.outputs.measurements`).

Each output is a series of its own in the source's study, with UIDs derived like the SEG's
(:func:`dicom_node.seg.output_uids`), so a re-run replaces it.

May import: ``dicom_node.seg`` (the SEG, its value objects and UIDs) and ``dicom_node.modelstore``
(the contract types), nothing else of the node.
"""

from dicom_node.outputs.enum import DEFAULT_OUTPUTS, OutputKind, parse_outputs
from dicom_node.outputs.gsps import build_gsps, mask_polygons
from dicom_node.outputs.measurements import SegmentMeasurement, intensity_unit, measure
from dicom_node.outputs.overlay import DISCLAIMER, RenderedOverlay, build_overlays, render_overlay
from dicom_node.outputs.report import build_report

__all__ = [
    "DEFAULT_OUTPUTS",
    "DISCLAIMER",
    "OutputKind",
    "RenderedOverlay",
    "SegmentMeasurement",
    "build_gsps",
    "build_overlays",
    "build_report",
    "intensity_unit",
    "mask_polygons",
    "measure",
    "parse_outputs",
    "render_overlay",
]
