"""Confidence of a result: the manifest block, the uncertainty, the input checks, the runner.

Unit tests of :mod:`dicom_node.modelstore.confidence` and of the runner's ``run_confident`` on
real (tiny) ONNX models; the training side (provenance, the flag's evaluation) and that the
node and ``evaluate`` judge a case alike. The node end to end is tests/test_confidence_node.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.demo.phantoms import make_case, write_case
from dicom_node.modelstore import (
    ConfidenceSpec,
    ManifestError,
    ModelRunner,
    ModelStore,
    parse_manifest,
    read_series,
    summarize_input,
)
from dicom_node.modelstore.confidence import (
    Confidence,
    SegmentUncertainty,
    UncertaintyMeter,
    assess,
    binary_entropy,
    flag_text,
    ood_reasons,
)
from tests.helpers.onnx_models import make_store, manifest_dict, thyroid_like_image
from training.confidence_eval import (
    case_summary,
    confidence_block,
    flag_evaluation,
    input_provenance,
    markdown,
)
from training.data import SegmentRef, load_dataset

OOD = {
    "modalities": ["NM"],
    "rows": [128, 256],
    "columns": [128, 256],
    "pixel_spacing_mm": [1.8, 2.4],
    "intensity": {"contrast": [4.0, 30.0]},
}


def _manifest(**confidence: Any) -> dict[str, Any]:
    data = manifest_dict()
    data["confidence"] = confidence
    return data


class TestManifestBlock:
    def test_a_full_block_parses_and_round_trips(self) -> None:
        block = {"method": "entropy", "threshold": 0.2, "thresholds": {"nodule": 0.3}, "ood": OOD}
        manifest = parse_manifest(_manifest(**block))
        assert manifest.confidence is not None
        assert manifest.confidence.threshold_for("nodule") == 0.3
        assert manifest.confidence.threshold_for("thyroid") == 0.2
        assert manifest.confidence.ood is not None
        assert manifest.confidence.ood.pixel_spacing_mm == (1.8, 2.4)
        again = parse_manifest(manifest.to_dict())
        assert again.confidence == manifest.confidence

    def test_no_block_means_no_confidence(self) -> None:
        assert parse_manifest(manifest_dict()).confidence is None

    @pytest.mark.parametrize(
        ("block", "message"),
        [
            ({"method": "entropi"}, r"confidence\.method: Input should be 'entropy', 'tta'"),
            ({"thresholds": {"nodul": 0.3}}, r"confidence\.thresholds: unknown segment key"),
            ({"threshold": 1.5}, r"confidence\.threshold: Input should be less than or equal"),
            ({"method": "tta"}, r"'tta' compares the test-time augmented runs.*tta: \[flip_lr\]"),
            ({"method": "none"}, r"method 'none' checks nothing without 'ood'"),
            ({"ood": {"pixel_spacing_mm": [2.4, 1.8]}}, r"low <= high, got \[2\.4, 1\.8\]"),
            ({"ood": {"intensity": {"p99": [1, 2]}}}, r"unknown intensity statistic 'p99'"),
            ({"ood": {"rowz": [1, 2]}}, r"confidence\.ood\.rowz: unknown field"),
        ],
    )
    def test_bad_blocks_are_refused_with_the_field_named(
        self, block: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ManifestError, match=message):
            parse_manifest(_manifest(**block), "manifest.yaml")

    def test_tta_is_accepted_when_the_manifest_declares_augmentations(self) -> None:
        data = _manifest(method="tta")
        data["tta"] = ["flip_lr"]
        assert parse_manifest(data).confidence.method == "tta"  # type: ignore[union-attr]


class TestUncertainty:
    def test_binary_entropy_is_zero_when_sure_and_one_at_a_coin_flip(self) -> None:
        assert binary_entropy(np.array([0.0, 1.0, 0.5])).round(6).tolist() == [0.0, 0.0, 1.0]

    def test_entropy_is_the_mean_over_the_segments_candidate_pixels(self) -> None:
        spec = ConfidenceSpec(method="entropy")
        meter = UncertaintyMeter(spec, {"a": 0, "b": 1})
        probs = np.zeros((2, 4, 4))
        probs[0, :2] = 1.0  # 8 sure pixels
        probs[0, 2, :2] = 0.5  # 2 coin flips
        # b: nothing reaches the candidate probability: not judged
        probs[1] = 0.05
        meter.add(probs)
        a, b = meter.result()
        assert a.pixels == 10 and a.score == pytest.approx(0.2)
        assert b.score is None and not b.low

    def test_tta_disagreement_is_one_minus_dice_over_the_whole_result(self) -> None:
        spec = ConfidenceSpec.model_construct(method="tta", threshold=0.25, thresholds={}, ood=None)
        meter = UncertaintyMeter(spec, {"a": 0}, thresholds={"a": 0.5})
        plain = np.zeros((1, 4, 4))
        plain[0, :, :2] = 0.9  # 8 pixels
        flipped = np.zeros((1, 4, 4))
        flipped[0, :, 1:3] = 0.9  # 8 pixels, 4 shared
        meter.add(plain, [flipped])
        (a,) = meter.result()
        assert a.score == pytest.approx(0.5) and a.low
        with pytest.raises(ValueError, match="needs the augmented probabilities"):
            meter.add(plain)

    def test_scores_above_threshold_are_low_with_a_reason(self) -> None:
        spec = ConfidenceSpec(method="entropy", threshold=0.2, thresholds={"b": 0.5})
        per_segment = (SegmentUncertainty("a", 0.3, 0.2, 10), SegmentUncertainty("b", 0.4, 0.5, 5))
        result = assess(spec, per_segment, None, {"a": "Thyroid"})
        assert result.low and result.score == 0.4
        assert result.reasons == ("Thyroid: mean predictive entropy 0.30 above threshold 0.2",)
        assert result.segment_note("a") == "LOW CONFIDENCE: entropy 0.30 > 0.2"
        assert result.segment_note("b") == "LOW CONFIDENCE: another segment is uncertain"


class TestInputChecks:
    def test_every_check_says_what_and_the_training_range(self) -> None:
        spec = ConfidenceSpec(method="none", ood=OOD)
        frame = np.full((1024, 256), 20.0)
        summary = summarize_input([frame], "CT", [(4.8, 4.8)])
        assert spec.ood is not None
        assert ood_reasons(spec.ood, summary) == [
            "modality CT is not one the model was trained on (NM)",
            "matrix 1024x256 outside training range (rows 128-256)",
            "pixel spacing 4.8 mm outside training range 1.8-2.4 mm",
            "contrast (99.5th percentile / mean) 1 outside training range 4-30",
        ]

    def test_an_input_like_the_training_data_passes(self) -> None:
        spec = ConfidenceSpec(method="none", ood=OOD)
        image, _ = thyroid_like_image((128, 128), seed=3)
        summary = summarize_input([image], "nm", [(2.0, 2.0)])
        assert spec.ood is not None and ood_reasons(spec.ood, summary) == []
        result = assess(spec, (), summary)
        assert not result.low and result.summary().startswith("confidence ok")

    def test_flag_text_marks_and_fits_64_characters(self) -> None:
        low = Confidence("entropy", 0.5, True, ("x",))
        text = "AI segmentation (thyroid-seg v1) - not for diagnosis alone"
        assert flag_text(text, low).startswith("LOW CONFIDENCE - AI segmentation")
        assert len(flag_text(text, low)) == 64
        assert flag_text(text, Confidence("entropy", 0.1, False)) == text
        with pytest.raises(ValueError, match="must say why"):
            Confidence("entropy", 0.5, True)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(make_store(tmp_path / "models", size=(64, 64)))


def _with(resolved: Any, **block: Any) -> Any:
    manifest = resolved.manifest.model_copy(update={"confidence": ConfidenceSpec(**block)})
    return dataclasses.replace(resolved, manifest=manifest)


class TestRunner:
    def test_run_confident_masks_equal_run_and_the_verdict_follows_the_manifest(
        self, store: ModelStore
    ) -> None:
        runner = ModelRunner(threads=1)
        # the tiny model's nodule channel follows the Poisson noise: only the thyroid is judged
        resolved = _with(
            store.resolve("thyroid-seg@production"), thresholds={"nodule": 1.0}, ood=OOD
        )
        image, _ = thyroid_like_image((128, 128), seed=1)
        good = runner.run_confident(resolved, [image], summarize_input([image], "NM", [(2.0, 2.0)]))
        plain = runner.run(resolved, [image])
        assert all(np.array_equal(good.masks[0][k], plain[0][k]) for k in plain[0])
        assert good.confidence is not None and not good.confidence.low, good.confidence
        rng = np.random.default_rng(0)
        field = rng.poisson(50, (128, 128)).astype(np.uint16)  # a uniform flood field
        bad = runner.run_confident(resolved, [field], summarize_input([field], "NM", [(2.0, 2.0)]))
        assert bad.confidence is not None and bad.confidence.low
        assert any(
            r.startswith("contrast (99.5th percentile / mean)") for r in bad.confidence.reasons
        )

    def test_without_a_block_there_is_no_verdict(self, store: ModelStore) -> None:
        image, _ = thyroid_like_image((64, 64), seed=1)
        made = ModelRunner(threads=1).run_confident(
            store.resolve("thyroid-seg@production"), [image]
        )
        assert made.confidence is None and set(made.masks[0]) == {"thyroid", "nodule"}

    def test_tta_disagreement_comes_from_the_manifests_augmented_runs(
        self, store: ModelStore
    ) -> None:
        resolved = store.resolve("thyroid-seg@production")
        data = resolved.manifest.to_dict()
        data["tta"] = ["flip_lr"]
        data["confidence"] = {"method": "tta", "threshold": 0.05}
        resolved = dataclasses.replace(resolved, manifest=parse_manifest(data))
        image, _ = thyroid_like_image((64, 64), seed=2)
        made = ModelRunner(threads=1).run_confident(resolved, [image])
        assert made.confidence is not None and made.confidence.method == "tta"
        thyroid = made.confidence.segment("thyroid")
        # the tiny model is nearly symmetric: plain and mirrored thyroid masks agree closely
        assert thyroid is not None and thyroid.score is not None and thyroid.score < 0.05


class TestTrainingSide:
    def _cases(self, tmp_path: Path, seeds: list[int]) -> list[Any]:
        for seed in seeds:
            write_case(make_case(seed, 128 if seed % 2 else 256), tmp_path / f"case{seed}")
        refs = [SegmentRef("thyroid", "Thyroid", "69748006")]
        cases, _ = load_dataset(tmp_path, refs)
        return cases

    def test_provenance_covers_every_training_case(self, tmp_path: Path) -> None:
        cases = self._cases(tmp_path, [1, 2, 3, 4])
        block = input_provenance(cases)
        assert block["modalities"] == ["NM"] and block["n_images"] == 4
        assert block["rows"] == [128, 256] and block["columns"] == [128, 256]
        spec = ConfidenceSpec(**confidence_block({"threshold": 0.3}, cases))
        assert spec.method == "entropy" and spec.threshold == 0.3 and spec.ood is not None
        for case in cases:  # outward rounding: no training case is outside its own ranges
            assert ood_reasons(spec.ood, case_summary(case)) == []
        with pytest.raises(ValueError, match="unknown key"):
            confidence_block({"treshold": 0.3}, cases)

    def test_node_and_evaluate_see_the_same_input(self, tmp_path: Path) -> None:
        (case,) = self._cases(tmp_path, [5])
        series = read_series(sorted(tmp_path.rglob("image.dcm")))
        modality = dcmread(sorted(tmp_path.rglob("image.dcm"))[0]).Modality
        node_view = summarize_input(series.frames, modality, [series.spacing])
        assert case_summary(case) == node_view

    def test_the_flag_evaluation_counts_worst_and_other_images(self) -> None:
        low = Confidence("entropy", 0.4, True, ("Thyroid: mean predictive entropy 0.40",))
        ok = Confidence("entropy", 0.1, False)
        scores = [0.5, 0.9, 0.95, 0.96, 0.97, 0.97, 0.98, 0.98, 0.99, 0.99, 0.99, 0.99]
        verdicts = [low, ok, low, ok, ok, ok, ok, ok, ok, ok, ok, ok]
        names = [f"case{i}" for i in range(12)]
        block = flag_evaluation(names, scores, verdicts)
        assert block is not None
        assert block["worst"] == {"n": 2, "flagged": 1, "recall": 0.5, "max_score": 0.9}
        assert block["good"]["n"] == 10 and block["good"]["flagged"] == 1
        assert block["precision"] == 0.5
        text = "\n".join(markdown(block, {"method": "entropy", "threshold": 0.25}))
        assert "**1 flagged** (recall 50%)" in text and "| case0 | 0.500 | yes |" in text
        assert flag_evaluation(names, scores, [None] * 12) is None


class TestEvaluateAndExport:
    def test_evaluate_reports_the_flag_and_export_records_the_provenance(
        self, tmp_path: Path
    ) -> None:
        from tests.helpers.onnx_models import write_model_version, write_yaml
        from training.evaluate import evaluate
        from training.export import report_metrics, training_confidence

        data = tmp_path / "data"
        for seed in range(6):
            write_case(make_case(300 + seed, 64), data / f"case{seed}")
        config = {
            "model": {"segments": manifest_dict()["segments"], "confidence": {"threshold": 0.3}},
            "data": {},
        }
        block = training_confidence({"config": config, "data_dir": str(data)})
        assert block["threshold"] == 0.3 and block["ood"]["n_images"] == 6
        version = write_model_version(tmp_path / "v", size=(64, 64))
        manifest = manifest_dict(sha256=parse_manifest_file(version)["sha256"], size=(64, 64))
        manifest["confidence"] = {**block, "thresholds": {"nodule": 1.0}}
        write_yaml(version / "manifest.yaml", manifest)
        report = evaluate(version, data, tmp_path / "out", figures=False)
        flags = report["confidence"]
        assert flags["n_images"] == 6 and flags["worst"]["n"] == 1
        assert flags["spec"]["method"] == "entropy" and flags["spec"]["ood"] is True
        assert all("confidence" in record for record in report["cases"])
        assert "## Low-confidence flag" in (tmp_path / "out" / "report.md").read_text()
        assert report_metrics(report)["confidence"]["worst_images"] == 1
        missing = training_confidence({"config": config, "data_dir": str(tmp_path / "gone")})
        assert "ood" not in missing  # no data any more: no provenance, said in the log


def parse_manifest_file(folder: Path) -> dict[str, Any]:
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load((folder / "manifest.yaml").read_text()))
