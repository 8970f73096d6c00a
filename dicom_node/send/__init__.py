"""send: export of results to destinations (DICOM C-STORE; TLS), with timeouts and statuses.

May import: ``dicom_node.jobs`` records, ``dicom_node.config``, ``dicom_node.metrics``.
"""
