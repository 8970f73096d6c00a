"""Small contract types: Dice/IoU, sha256 and atomic writes, the coded concept."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from dicom_node.modelstore import Code, atomic_write, dice, iou, load_manifest, sha256_file
from dicom_node.seg import SegmentSpec
from tests.helpers.onnx_models import write_model_version


class TestScoring:
    def test_values_and_empty_masks(self) -> None:
        a = np.array([1, 1, 0, 0], bool)
        b = np.array([1, 0, 1, 0], bool)
        assert dice(a, b) == 0.5 and iou(a, b) == pytest.approx(1 / 3)
        empty = np.zeros(4, bool)
        assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
        assert dice(a, empty) == 0.0

    def test_shape_mismatch(self) -> None:
        with pytest.raises(ValueError, match=r"masks must have the same shape"):
            dice(np.zeros(3), np.zeros(4))

    def test_training_uses_the_same_functions(self) -> None:
        from training import metrics

        assert metrics.dice is dice and metrics.iou is iou


class TestFiles:
    def test_atomic_write_forms(self, tmp_path: Path) -> None:
        target = tmp_path / "f.bin"
        atomic_write(target, b"abc")
        assert target.read_bytes() == b"abc"
        atomic_write(target, "dé")
        assert target.read_text(encoding="utf-8") == "dé"
        atomic_write(target, lambda fh: fh.write(b"xyz"))
        assert target.read_bytes() == b"xyz"
        assert oct(target.stat().st_mode & 0o777) == oct(0o644)
        assert sorted(os.listdir(tmp_path)) == ["f.bin"]
        assert sha256_file(target) == hashlib.sha256(b"xyz").hexdigest()

    def test_failed_writer_leaves_old_file(self, tmp_path: Path) -> None:
        target = tmp_path / "f.bin"
        target.write_bytes(b"old")

        def boom(fh: object) -> None:
            raise RuntimeError("disk on fire")

        with pytest.raises(RuntimeError, match="disk on fire"):
            atomic_write(target, boom)
        assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]

    def test_bad_content(self, tmp_path: Path) -> None:
        with pytest.raises(TypeError, match="content must be bytes, str or a writer"):
            atomic_write(tmp_path / "x", 5)  # type: ignore[arg-type]


class TestCode:
    def test_one_type_from_manifest_to_seg(self, tmp_path: Path) -> None:
        manifest = load_manifest(write_model_version(tmp_path))
        segment = manifest.segments[0]
        assert isinstance(segment.type, Code)
        assert SegmentSpec.from_manifest(segment).type == segment.type

    def test_validation(self) -> None:
        with pytest.raises(
            ValueError, match=r"code scheme must be a non-empty string of at most 16"
        ):
            Code("1", "", "x")
        with pytest.raises(TypeError, match=r"code value must be a string, got 1"):
            Code(1, "SCT", "x")  # type: ignore[arg-type]
        assert Code.from_mapping({"value": 69748006, "scheme": "SCT", "meaning": "T"}).value == (
            "69748006"
        )
        with pytest.raises(ValueError, match=r"unknown keys \['extra'\]"):
            Code.from_mapping({"value": "1", "scheme": "SCT", "meaning": "x", "extra": 1})
