"""The node's background stages: assembly (completion + routing), workers (inference, SEG, export),
and the :class:`~dicom_node.pipeline.node.Node` that wires them to the receiver and job store."""

from dicom_node.pipeline.node import Node

__all__ = ["Node"]
