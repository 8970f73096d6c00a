"""Promotion gate: a worse candidate is refused, an equal one passes, the data is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_node.modelstore.gate import GateError, dice, load_reference_cases, run_gate
from dicom_node.modelstore.runner import ModelRunner
from dicom_node.modelstore.store import ModelStore
from tests.helpers.dicom_factory import make_nm
from tests.helpers.onnx_models import make_store, thyroid_like_image, write_model_version

NAME = "thyroid-seg"


def make_reference(folder: Path, cases: int = 3, shape: tuple[int, int] = (64, 64)) -> Path:
    """Write case folders (image.dcm + truth.npz) in the training evaluation format."""
    for i in range(cases):
        case = folder / f"case{i:03d}"
        case.mkdir(parents=True)
        image, truth = thyroid_like_image(shape, seed=100 + i)
        make_nm(rows=shape[0], cols=shape[1], pixels=image, seed=f"gate-{i}").save_as(
            case / "image.dcm", enforce_file_format=True
        )
        np.savez(case / "truth.npz", **truth)
    return folder


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    return make_reference(tmp_path / "reference")


def test_dice() -> None:
    a = np.zeros((4, 4), bool)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[:2] = True
    assert dice(b, b) == 1.0 and dice(a, b) == 0.0


class TestGate:
    def test_worse_candidate_refused(self, tmp_path: Path, reference: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", ("2", "worse")]))
        result = run_gate(store, NAME, "2", data=reference, runner=ModelRunner(threads=1))
        assert not result.passed
        assert result.production_version == "1" and result.cases == 3
        assert result.candidate["thyroid"] < result.production["thyroid"] - 0.01
        assert any(r.startswith("thyroid: mean Dice") for r in result.reasons)
        recorded = result.to_dict()
        assert recorded["passed"] is False and set(recorded["candidate"]) == {"thyroid", "nodule"}

    def test_equal_candidate_passes(self, tmp_path: Path, reference: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"]))
        result = run_gate(store, NAME, "2", data=reference)
        assert result.passed and result.reasons == []
        assert result.candidate == result.production
        assert result.candidate["thyroid"] > 0.8

    def test_tolerance_lets_a_small_drop_pass(self, tmp_path: Path, reference: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", ("2", "worse")]))
        assert run_gate(store, NAME, "2", data=reference, tolerance=1.0).passed

    def test_without_production_passes(self, tmp_path: Path, reference: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"], production=None))
        result = run_gate(store, NAME, "1", data=reference)
        assert result.passed and result.production == {} and result.production_version is None

    def test_reference_data_from_manifest(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"]))
        source = write_model_version(
            tmp_path / "in", version="2", variant="worse", reference_data="reference"
        )
        make_reference(source / "reference", cases=2)
        store.add(source)
        result = run_gate(store, NAME, "2")
        assert not result.passed and result.cases == 2
        assert result.data.endswith("2/reference")

    def test_no_reference_data(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1", "2"]))
        with pytest.raises(GateError, match=r"thyroid-seg:2: no reference data .* pass --data DIR"):
            run_gate(store, NAME, "2")

    def test_bad_cases_are_named(self, tmp_path: Path, reference: Path) -> None:
        np.savez(reference / "case001" / "truth.npz", thyroid=np.zeros((3, 3), bool))
        with pytest.raises(
            GateError,
            match=r"case001: truth.npz\['thyroid'\] has shape \(1, 3, 3\) but the images are "
            r"\(1, 64, 64\)",
        ):
            load_reference_cases(reference)
        (reference / "case002" / "truth.npz").unlink()
        (reference / "case001" / "truth.npz").unlink()
        with pytest.raises(GateError, match=r"case001: no mask \(expected truth.npz, a DICOM SEG"):
            load_reference_cases(reference)
        with pytest.raises(GateError, match=r"reference data .*missing is not a folder"):
            load_reference_cases(tmp_path / "missing")


class TestFloors:
    """A first version is measured against a floor, not waved through with nothing to compare."""

    def test_useless_first_version_refused_by_default_floor(
        self, tmp_path: Path, reference: Path
    ) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=[("1", "empty")], production=None))
        result = run_gate(store, NAME, "1", data=reference, runner=ModelRunner(threads=1))
        assert not result.passed and result.production_version is None
        assert result.candidate["thyroid"] == 0.0
        assert result.floors == {"thyroid": 0.1, "nodule": 0.1}
        assert "thyroid: mean Dice 0.0000 < floor 0.1000 (default for a first version)" in (
            result.reasons
        )
        assert result.report()[1].startswith("thyroid: mean Dice 0.0000 over 3 case(s); floor")
        assert result.to_dict()["floors"] == {"thyroid": 0.1, "nodule": 0.1}

    def test_manifest_store_and_caller_floors_highest_wins(
        self, tmp_path: Path, reference: Path
    ) -> None:
        root = make_store(tmp_path / "m", versions=["1"], production=None)
        store = ModelStore(root)
        ok = run_gate(store, NAME, "1", data=reference)
        assert ok.passed, ok.reasons
        (root / NAME / "gate.yaml").write_text("min_dice: {thyroid: 0.99}\n")
        refused = run_gate(store, NAME, "1", data=reference, min_dice={"thyroid": 0.5})
        assert not refused.passed
        assert refused.floor_sources["thyroid"] == "thyroid-seg/gate.yaml"
        assert any(r.startswith("thyroid: mean Dice") and "< floor 0.9900" for r in refused.reasons)
        with pytest.raises(GateError, match=r"names segment 'liver'; segments are"):
            run_gate(store, NAME, "1", data=reference, min_dice={"liver": 0.5})
        (root / NAME / "gate.yaml").write_text("min_dice: {thyroid: 2}\n")
        with pytest.raises(GateError, match=r"min_dice\['thyroid'\] must be a number in \[0, 1\]"):
            run_gate(store, NAME, "1", data=reference)

    def test_manifest_floor_applies_with_production_too(
        self, tmp_path: Path, reference: Path
    ) -> None:
        from dicom_node.modelstore.manifest import parse_manifest
        from tests.helpers.onnx_models import manifest_dict

        store = ModelStore(make_store(tmp_path / "m", versions=["1"]))
        source = write_model_version(tmp_path / "in", version="2")
        manifest = (source / "manifest.yaml").read_text()
        (source / "manifest.yaml").write_text(manifest + "gate:\n  min_dice: {thyroid: 0.999}\n")
        store.add(source)
        result = run_gate(store, NAME, "2", data=reference)
        assert not result.passed and result.production_version == "1"
        assert result.floor_sources == {"thyroid": "manifest"}  # no default with production
        assert result.candidate == result.production  # same model: the floor alone refuses
        bad = manifest_dict() | {"gate": {"min_dice": {"liver": 0.5}}}
        with pytest.raises(
            ValueError, match=r"gate.min_dice: unknown segment key\(s\) \['liver'\]"
        ):
            parse_manifest(bad)

    def test_declared_floor_without_truth_refuses(self, tmp_path: Path, reference: Path) -> None:
        for case in reference.iterdir():
            with np.load(case / "truth.npz") as npz:
                thyroid = npz["thyroid"]
            np.savez(case / "truth.npz", thyroid=thyroid)
        store = ModelStore(make_store(tmp_path / "m", versions=["1"], production=None))
        result = run_gate(store, NAME, "1", data=reference, min_dice={"nodule": 0.3})
        assert not result.passed
        assert result.reasons == [
            "nodule: floor 0.3000 (--min-dice) cannot be checked: the reference set has no "
            "truth for 'nodule'"
        ]


class TestAgreement:
    def test_both_empty_is_no_evidence(self) -> None:
        from dicom_node.modelstore.scoring import agreement

        empty = np.zeros((2, 4, 4), bool)
        some = empty.copy()
        some[0, :2] = True
        assert agreement(empty, empty) is None
        assert agreement(some, empty) == 0.0 and agreement(some, some) == 1.0
        assert dice(empty, empty) == 1.0  # evaluation keeps its convention


class TestShadowAgreement:
    """The worker's shadow comparison records no value for a segment both versions left empty."""

    def test_both_empty_segment_not_recorded(self) -> None:
        from types import SimpleNamespace
        from typing import Any

        from dicom_node.infer.worker import InferenceResult, Worker

        empty = np.zeros((4, 4), bool)
        some = empty.copy()
        some[:2] = True
        production = InferenceResult([{"liver": some, "lesion": empty}], ("liver", "lesion"), 0.1)
        shadow = InferenceResult([{"liver": some, "lesion": empty}], ("liver", "lesion"), 0.1)
        recorded: list[dict[str, float]] = []

        def add(job_id: int, name: str, version: str, agreement: Any, **_: Any) -> None:
            recorded.append(dict(agreement))

        stub = SimpleNamespace(
            models=SimpleNamespace(shadow_for=lambda _: SimpleNamespace(name="m", version="2")),
            _infer=lambda resolved, series: shadow,
            store=SimpleNamespace(add_shadow_result=add),
        )
        resolved = SimpleNamespace(name="m", version="1")
        # the series' geometry (one 4x4 frame) for the 3-D IoU/HD95 beside the Dice
        series = SimpleNamespace(sources=[make_nm(rows=4, cols=4)], spacing=(1.0, 1.0))
        Worker._shadow(stub, SimpleNamespace(id=1), resolved, series, production)  # type: ignore[arg-type]
        assert recorded == [{"liver": 1.0}]


class TestPromoteCommand:
    def test_useless_first_version_refused_with_a_reason(
        self, tmp_path: Path, reference: Path
    ) -> None:
        from click.testing import CliRunner

        from dicom_node.models_cli import models

        store_dir = make_store(tmp_path / "m", versions=[("1", "empty")], production=None)
        args = ["promote", NAME, "1", "--data", str(reference), "--models", str(store_dir)]
        result = CliRunner().invoke(models, args)
        assert result.exit_code == 1, result.output
        assert (
            "thyroid: mean Dice 0.0000 over 3 case(s); floor 0.1000 (default for a first "
            "version); 3-D IoU 0.0000, HD95 n/a -> refused"
        ) in result.output
        assert "refused by the gate: " in result.output
        assert "thyroid: mean Dice 0.0000 < floor 0.1000" in result.output
        assert ModelStore(store_dir).aliases(NAME).get("production") is None
        floor = CliRunner().invoke(models, [*args, "--min-dice", "thyroid"])
        assert floor.exit_code == 2 and "must be KEY=VALUE, got 'thyroid'" in floor.output
