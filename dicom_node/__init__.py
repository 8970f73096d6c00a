"""dicom-node: a headless DICOM node that serves AI segmentation in the background."""

__version__ = "0.1.0"
