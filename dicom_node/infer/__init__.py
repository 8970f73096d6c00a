"""infer: the worker stage. A claimed job -> frames -> model -> masks -> results -> send.

May import: ``dicom_node.jobs``, ``dicom_node.modelstore``, ``dicom_node.seg``,
``dicom_node.send``, ``dicom_node.audit``, ``dicom_node.config``, ``dicom_node.metrics``.
"""
