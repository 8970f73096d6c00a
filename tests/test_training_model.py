"""The shipped model ``models/thyroid-seg`` (production 2 = version 1's weights): store-valid,
small, and it segments fresh studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.demo.phantoms_classic import make_case  # what thyroid-seg:1 was trained on
from dicom_node.modelstore.runner import ModelRunner
from dicom_node.modelstore.store import ModelStore
from training.metrics import dice

MODELS = Path(__file__).resolve().parents[1] / "models"

pytestmark = pytest.mark.skipif(
    not (MODELS / "thyroid-seg" / "1" / "model.onnx").is_file(), reason="no shipped model"
)


class TestShippedModel:
    def test_production_is_version_2_and_verifies(self) -> None:
        store = ModelStore(MODELS)
        resolved = store.resolve("thyroid-seg@production")
        assert resolved.version == "2"  # version 1's weights + confidence and measurements
        store.verify(resolved)
        assert resolved.model_file.stat().st_size <= 10 * 1024 * 1024
        manifest = resolved.manifest
        assert manifest.input.size == (256, 256) and manifest.input.modalities == ["NM"]
        assert {s.key: s.type.value for s in manifest.segments} == {
            "thyroid": "69748006",
            "nodule": "27925004",
        }
        assert manifest.metrics["thyroid"]["dice"] >= 0.95
        assert manifest.metrics["nodule"]["dice"] >= 0.80
        assert manifest.metrics["nodule_fp_per_image"] <= 0.1
        assert (resolved.path / manifest.reference_data).is_dir()
        # the low-confidence flag catches most of the worst held-out images
        assert manifest.metrics["confidence"]["worst_recall"] >= 0.8

    @pytest.mark.parametrize("size", [256, 128])
    def test_segments_unseen_phantoms_through_the_node_runner(self, size: int) -> None:
        store = ModelStore(MODELS)
        resolved = store.resolve("thyroid-seg@production")
        cases = [make_case(seed, size) for seed in (777_001, 777_002, 777_003)]
        results = ModelRunner().run(resolved, [c.dataset.pixel_array for c in cases])
        scores = [
            dice(r["thyroid"], c.truth["thyroid"]) for r, c in zip(results, cases, strict=True)
        ]
        assert np.mean(scores) > 0.9, scores
        for result, case in zip(results, cases, strict=True):
            assert result["nodule"].shape == case.truth["nodule"].shape
            # nodules lie inside the gland (multi-label: thyroid includes its nodules)
            outside = int((result["nodule"] & ~result["thyroid"]).sum())
            assert outside <= 0.05 * int(result["nodule"].sum()) + 5
