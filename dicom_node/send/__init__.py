"""send: export of results to destinations (DICOM C-STORE, TLS; DICOMweb STOW-RS), with timeouts
and statuses; :func:`send_files` picks the protocol by the destination's ``type``.

May import: ``dicom_node.jobs`` records, ``dicom_node.config``, ``dicom_node.metrics``.
"""

from dicom_node.send.result import ExportResult
from dicom_node.send.sender import send_files

__all__ = ["ExportResult", "send_files"]
