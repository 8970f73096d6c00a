"""ONNX runner and hot swap, on CPU with real tiny ONNX models."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dicom_node import metrics
from dicom_node.modelstore.runner import (
    BATCH_SIZE,
    ModelLoadError,
    ModelRunner,
    choose_providers,
)
from dicom_node.modelstore.serving import ServingModels
from dicom_node.modelstore.store import ModelStore, ModelStoreError
from tests.helpers.onnx_models import make_store, thyroid_like_image, write_model_version

NAME = "thyroid-seg"


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


@pytest.fixture
def runner() -> ModelRunner:
    """A fresh runner: sessions are keyed by (name, version, sha256), which repeat across tests."""
    return ModelRunner(threads=1)


class TestChooseProviders:
    def test_cuda_first_when_available(self) -> None:
        available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        assert choose_providers(available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def test_cpu_only(self) -> None:
        assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
            "CPUExecutionProvider"
        ]

    def test_preferred_unavailable_dropped(self) -> None:
        assert choose_providers(["CPUExecutionProvider"], ["CUDAExecutionProvider"]) == [
            "CPUExecutionProvider"
        ]


class TestModelRunner:
    def test_runs_on_cpu_and_segments(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"], size=(64, 64)))
        resolved = store.resolve("thyroid-seg@production")
        image, truth = thyroid_like_image((128, 128), seed=3)
        ok_before = sample("dicom_node_inference_request_success_total", model=NAME, version="1")
        n_before = sample("dicom_node_inference_duration_seconds_count", model=NAME, version="1")
        (masks,) = runner.run(resolved, [image])
        assert runner.providers[-1] == "CPUExecutionProvider"
        assert set(masks) == {"thyroid", "nodule"}
        for mask in masks.values():
            assert mask.shape == (128, 128) and mask.dtype == bool
            assert 0 < mask.sum() < mask.size
        assert dice(masks["thyroid"], truth["thyroid"]) > 0.8
        assert (
            sample("dicom_node_inference_request_success_total", model=NAME, version="1")
            == ok_before + 1
        )
        assert (
            sample("dicom_node_inference_duration_seconds_count", model=NAME, version="1")
            == n_before + 1
        )

    def test_session_is_reused(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"]))
        resolved = store.resolve("thyroid-seg:1")
        first = runner.load(resolved)
        runner.run(resolved, [np.ones((20, 20))])
        assert runner.load(store.resolve("thyroid-seg@production")) is first
        assert first.uses == 1
        assert runner.release(resolved) and not runner.is_loaded(resolved)

    def test_many_frames_of_different_sizes(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"]))
        resolved = store.resolve("thyroid-seg:1")
        frames = [thyroid_like_image((32 + 8 * i, 40), seed=i)[0] for i in range(BATCH_SIZE + 3)]
        results = runner.run(resolved, frames)
        assert [r["thyroid"].shape for r in results] == [f.shape for f in frames]
        assert runner.run(resolved, []) == []

    def test_tampered_weights_refused(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=["1"]))
        resolved = store.resolve("thyroid-seg:1")
        with open(resolved.model_file, "ab") as handle:
            handle.write(b"\0")
        failed = sample("dicom_node_inference_request_failure_total", model=NAME, version="1")
        with pytest.raises(
            ModelLoadError, match=r"thyroid-seg:1: sha256 of model.onnx is .* refusing"
        ):
            runner.run(resolved, [np.ones((8, 8))])
        assert (
            sample("dicom_node_inference_request_failure_total", model=NAME, version="1")
            == failed + 1
        )

    def test_invalid_onnx(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=[("1", "invalid_onnx")]))
        with pytest.raises(
            ModelLoadError, match=r"thyroid-seg:1: ONNX Runtime cannot load model.onnx"
        ):
            runner.load(store.resolve("thyroid-seg:1"))

    def test_wrong_output_shape(self, tmp_path: Path, runner: ModelRunner) -> None:
        store = ModelStore(make_store(tmp_path / "m", versions=[("1", "wrong_output_shape")]))
        with pytest.raises(
            ModelLoadError,
            match=r"warm-up output has shape \[1, 1, 64, 64\], expected 1 x K x h x w with K >= 2",
        ):
            runner.load(store.resolve("thyroid-seg:1"))

    def test_wrong_io_names_and_size(self, tmp_path: Path, runner: ModelRunner) -> None:
        folder = write_model_version(tmp_path / "m" / NAME, version="1")
        manifest = folder / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace("name: image", "name: pixels"))
        store = ModelStore(tmp_path / "m")
        with pytest.raises(
            ModelLoadError,
            match=r"input.name 'pixels' is not an input of the model \(inputs: \['image'\]\)",
        ):
            runner.load(store.resolve("thyroid-seg:1"))
        folder = write_model_version(tmp_path / "m" / NAME, version="2")
        manifest = folder / "manifest.yaml"
        manifest.write_text(manifest.read_text().replace("- 64\n  - 64", "- 128\n  - 128"))
        with pytest.raises(
            ModelLoadError,
            match=r"model input shape \['N', 1, 64, 64\] does not take N x 1 x 128 x 128",
        ):
            runner.load(store.resolve("thyroid-seg:2"))


def wait_until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class TestServingModels:
    def _serving(
        self, tmp_path: Path, versions: list, production: str | None = "1"
    ) -> ServingModels:  # type: ignore[type-arg]
        store = ModelStore(make_store(tmp_path / "m", versions=versions, production=production))
        return ServingModels(store, ModelRunner(threads=1), interval=0.05, retire_grace=0)

    def test_serves_production_and_swaps(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1", "2"])
        assert serving.ready() == (False, serving.ready()[1])
        serving.refresh()
        assert serving.ready() == (True, "")
        job = serving.resolve_for_job("thyroid-seg@production", "1.2.3")
        assert (job.version, job.alias) == ("1", "production")
        assert sample("dicom_node_model_info", model=NAME, version="1", alias="production") == 1
        serving.store.promote(NAME, "2")
        serving.refresh()
        assert serving.resolve_for_job("thyroid-seg@production", "1.2.3").version == "2"
        assert sample("dicom_node_model_info", model=NAME, version="1", alias="production") == 0
        assert sample("dicom_node_model_info", model=NAME, version="2", alias="production") == 1
        assert [k[1] for k in serving.runner.loaded()] == ["2"]  # retired session released
        # the job that resolved version 1 before the swap finishes on version 1
        (masks,) = serving.run(job, [thyroid_like_image((64, 64))[0]])
        assert masks["thyroid"].any()
        serving.refresh()  # ... and the session it reloaded for that is released again
        assert [k[1] for k in serving.runner.loaded()] == ["2"]

    @pytest.mark.parametrize("variant", ["invalid_onnx", "wrong_output_shape"])
    def test_broken_version_keeps_old_serving(self, tmp_path: Path, variant: str) -> None:
        serving = self._serving(tmp_path, ["1", ("2", variant)])
        serving.refresh()
        before = sample("dicom_node_model_load_failures_total", model=NAME, version="2")
        serving.store.promote(NAME, "2")
        serving.refresh()
        assert sample("dicom_node_model_load_failures_total", model=NAME, version="2") == before + 1
        assert serving.resolve_for_job("thyroid-seg@production").version == "1"
        assert serving.served() == {NAME: {"production": "1"}}
        assert serving.ready() == (True, "")
        serving.refresh()  # no retry storm: the failure is remembered for a while
        assert sample("dicom_node_model_load_failures_total", model=NAME, version="2") == before + 1
        serving.store.rollback(NAME)
        serving.refresh()
        assert serving.resolve_for_job("thyroid-seg@production").version == "1"

    def test_tampered_weights_never_served(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1", "2"])
        serving.refresh()
        with open(serving.store.root / NAME / "2" / "model.onnx", "ab") as handle:
            handle.write(b"\0")
        serving.store.promote(NAME, "2")
        serving.refresh()
        assert serving.resolve_for_job("thyroid-seg@production").version == "1"

    def test_not_ready_without_loadable_production(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, [("1", "invalid_onnx")])
        serving.refresh()
        ok, reason = serving.ready()
        assert not ok and "thyroid-seg@production" in reason and "cannot load" in reason
        with pytest.raises(
            ModelStoreError, match=r"thyroid-seg@production: no loaded version to serve"
        ):
            serving.resolve_for_job("thyroid-seg@production")
        assert serving.ready(["thyroid-seg:1"]) == (True, "")

    def test_canary_shadow_and_other_aliases(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1", "2", "3"])
        store = serving.store
        store.canary(NAME, "2", 50)
        store.shadow(NAME, "3")
        store.set_alias(NAME, "candidate", "3")
        serving.refresh()
        uids = [f"1.2.3.{i}" for i in range(200)]
        chosen = {u: serving.resolve_for_job("thyroid-seg@production", u) for u in uids}
        for uid, resolved in chosen.items():
            expected = store.resolve("thyroid-seg@production", uid)
            assert (resolved.version, resolved.alias) == (expected.version, expected.alias)
        assert {r.version for r in chosen.values()} == {"1", "2"}
        assert serving.shadow_for(NAME).version == "3"  # type: ignore[union-attr]
        assert serving.resolve_for_job("thyroid-seg@candidate").version == "3"  # loaded on demand
        assert serving.resolve_for_job("thyroid-seg:2").alias is None
        assert serving.resolve_version(NAME, "1", "production").alias == "production"
        store.canary(NAME, None)
        store.shadow(NAME, None)
        serving.refresh()
        assert serving.shadow_for(NAME) is None
        assert all(
            serving.resolve_for_job("thyroid-seg@production", u).version == "1" for u in uids
        )

    def test_job_sees_alias_change_without_waiting_for_refresh(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1", "2", ("3", "invalid_onnx")])
        serving.refresh()
        serving.store.promote(NAME, "2")
        assert serving.resolve_for_job("thyroid-seg@production").version == "2"
        serving.store.promote(NAME, "3")  # broken: the job still gets a loaded version
        assert serving.resolve_for_job("thyroid-seg@production").version == "2"
        serving.store.rollback(NAME)
        assert serving.resolve_for_job("thyroid-seg@production").version == "2"
        serving.store.rollback(NAME)
        assert serving.resolve_for_job("thyroid-seg@production").version == "1"

    def test_invalid_alias_file_keeps_serving(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1"])
        serving.refresh()
        (serving.store.root / NAME / "aliases.yaml").write_text("production: [oops\n")
        serving.refresh()
        assert serving.resolve_for_job("thyroid-seg@production").version == "1"

    def test_thread_picks_up_alias_change(self, tmp_path: Path) -> None:
        serving = self._serving(tmp_path, ["1", "2"])
        serving.start()
        try:
            assert serving.resolve_for_job("thyroid-seg@production").version == "1"
            serving.store.promote(NAME, "2")
            assert wait_until(lambda: serving.served().get(NAME, {}).get("production") == "2")
        finally:
            serving.stop()
