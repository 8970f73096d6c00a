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
            match=r"case001: truth 'thyroid' has shape \(1, 3, 3\), images are \(1, 64, 64\)",
        ):
            load_reference_cases(reference)
        (reference / "case002" / "truth.npz").unlink()
        (reference / "case001" / "truth.npz").unlink()
        with pytest.raises(GateError, match=r"case001: no truth.npz"):
            load_reference_cases(reference)
        with pytest.raises(GateError, match=r"reference data .*missing is not a folder"):
            load_reference_cases(tmp_path / "missing")
