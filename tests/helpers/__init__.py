"""Helpers shared by the test suite: ports, DICOM factories, tiny ONNX models, real peers."""
