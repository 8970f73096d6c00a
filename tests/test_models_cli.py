"""``dicom-node models``: every verb, its refusals (exit 1, one precise line) and the history."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from prometheus_client import generate_latest

from dicom_node import metrics
from dicom_node.models_cli import models
from dicom_node.modelstore.runner import ModelRunner
from dicom_node.modelstore.store import ModelStore
from tests.helpers.onnx_models import make_store, write_model_version
from tests.helpers.ports import free_port
from tests.test_modelstore_gate import make_reference

NAME = "thyroid-seg"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return make_store(tmp_path / "models", versions=["1"], production="1")


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(models, [str(a) for a in args], catch_exceptions=False)


def test_list_shows_versions_aliases_and_metrics(store_dir: Path, tmp_path: Path) -> None:
    cli("add", write_model_version(tmp_path / "in", version="2"), "--models", store_dir)
    cli("canary", NAME, "2", "10", "--models", store_dir)
    result = cli("list", "--models", store_dir)
    assert result.exit_code == 0, result.output
    sha = ModelStore(store_dir).manifest(NAME, "1").sha256[:12]
    assert sha in result.output
    assert "production" in result.output and "canary 10%" in result.output
    assert "thyroid Dice 0.900" in result.output


def test_list_empty_store(tmp_path: Path) -> None:
    result = cli("list", "--models", tmp_path / "none")
    assert result.exit_code == 0 and "no models in" in result.output


def test_models_dir_from_config(store_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text(f"models: {store_dir}\n")
    result = cli("list", "--config", config)
    assert result.exit_code == 0 and NAME in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("modles: x\n")
    result = CliRunner().invoke(models, ["list", "--config", str(bad)])
    assert result.exit_code == 1 and "modles" in result.output


class TestAdd:
    def test_add_and_refusals(self, store_dir: Path, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="2")
        result = cli("add", source, "--models", store_dir)
        assert result.exit_code == 0 and "added thyroid-seg:2" in result.output
        again = CliRunner().invoke(models, ["add", str(source), "--models", str(store_dir)])
        assert again.exit_code == 1
        assert "Error: refused thyroid-seg:2: version '2' already exists" in again.output

    def test_tampered(self, store_dir: Path, tmp_path: Path) -> None:
        source = write_model_version(tmp_path / "in", version="2")
        (source / "model.onnx").write_bytes(b"tampered")
        result = CliRunner().invoke(models, ["add", str(source), "--models", str(store_dir)])
        assert result.exit_code == 1 and "sha256 of" in result.output
        assert ModelStore(store_dir).versions(NAME) == ["1"]

    def test_contract_change_needs_flag(self, store_dir: Path, tmp_path: Path) -> None:
        from tests.helpers.onnx_models import DEFAULT_SEGMENTS

        segments = [dict(s) for s in DEFAULT_SEGMENTS[:1]]
        source = write_model_version(tmp_path / "in", version="2", segments=segments)
        result = CliRunner().invoke(models, ["add", str(source), "--models", str(store_dir)])
        assert result.exit_code == 1 and "segment 'nodule' removed" in result.output
        ok = cli("add", source, "--models", store_dir, "--allow-contract-change")
        assert ok.exit_code == 0


class TestPromote:
    def test_gate_refuses_worse_and_force_overrides(self, tmp_path: Path) -> None:
        store_dir = make_store(tmp_path / "m", versions=["1", ("2", "worse")])
        data = make_reference(tmp_path / "ref", cases=2)
        result = CliRunner().invoke(
            models, ["promote", NAME, "2", "--data", str(data), "--models", str(store_dir)]
        )
        assert result.exit_code == 1
        assert "refused by the gate: nodule: mean Dice 0.0000 < production" in result.output
        store = ModelStore(store_dir)
        assert store.aliases(NAME)["production"] == "1"
        assert store.history(NAME)[-1]["reason"] == "gate refused"
        forced = cli("promote", NAME, "2", "--data", data, "--force", "--models", store_dir)
        assert forced.exit_code == 0 and "production 1 -> 2" in forced.output
        entry = store.history(NAME)[-1]
        assert entry["gate"]["passed"] is False and entry["gate"]["forced"] is True

    def test_gate_passes_then_rollback(self, tmp_path: Path) -> None:
        store_dir = make_store(tmp_path / "m", versions=["1", "2"])
        data = make_reference(tmp_path / "ref", cases=2)
        result = cli("promote", NAME, "2", "--data", data, "--models", store_dir)
        assert result.exit_code == 0 and "thyroid: mean Dice" in result.output
        assert ModelStore(store_dir).history(NAME)[-1]["gate"]["passed"] is True
        back = cli("rollback", NAME, "--models", store_dir)
        assert back.exit_code == 0 and "production 2 -> 1 (rollback)" in back.output
        again = CliRunner().invoke(models, ["rollback", NAME, "--models", str(store_dir)])
        assert again.exit_code == 1 and "no previous production version" in again.output

    def test_gate_without_data_needs_force(self, tmp_path: Path) -> None:
        store_dir = make_store(tmp_path / "m", versions=["1", "2"])
        result = CliRunner().invoke(models, ["promote", NAME, "2", "--models", str(store_dir)])
        assert result.exit_code == 1 and "promotion gate cannot run" in result.output
        assert cli("promote", NAME, "2", "--force", "--models", store_dir).exit_code == 0
        other = cli("promote", NAME, "1", "--alias", "candidate", "--models", store_dir)
        assert other.exit_code == 0 and "candidate None -> 1" in other.output

    def test_unknown_version(self, store_dir: Path) -> None:
        result = CliRunner().invoke(models, ["promote", NAME, "9", "--models", str(store_dir)])
        assert result.exit_code == 1 and "thyroid-seg:9: no such version" in result.output


class TestShadowCanary:
    def test_shadow_and_canary_on_off(self, tmp_path: Path) -> None:
        store_dir = make_store(tmp_path / "m", versions=["1", "2"])
        assert cli("shadow", NAME, "2", "--models", store_dir).exit_code == 0
        assert cli("canary", NAME, "2", "25", "--models", store_dir).exit_code == 0
        store = ModelStore(store_dir)
        assert store.aliases(NAME) == {
            "production": "1",
            "shadow": "2",
            "canary": {"version": "2", "percent": 25},
        }
        assert cli("shadow", NAME, "--off", "--models", store_dir).exit_code == 0
        assert cli("canary", NAME, "--off", "--models", store_dir).exit_code == 0
        assert store.aliases(NAME) == {"production": "1"}

    def test_usage_errors(self, store_dir: Path) -> None:
        for args in (["shadow", NAME], ["canary", NAME, "1"], ["shadow", NAME, "1", "--off"]):
            result = CliRunner().invoke(models, [*args, "--models", str(store_dir)])
            assert result.exit_code == 1, args
            assert "give" in result.output
        result = CliRunner().invoke(
            models, ["canary", NAME, "1", "101", "--models", str(store_dir)]
        )
        assert result.exit_code == 2 and "101" in result.output


@pytest.fixture
def metrics_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = generate_latest(metrics.REGISTRY)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_show_with_running_node(store_dir: Path, tmp_path: Path, metrics_server: int) -> None:
    store = ModelStore(store_dir)
    ModelRunner(threads=1).run(store.resolve("thyroid-seg@production"), [np.ones((16, 16))])
    store.shadow(NAME, "1")
    metrics.SHADOW_AGREEMENT.labels(model=NAME, version="1", segment="thyroid").observe(0.98)
    config = tmp_path / "node.yaml"
    config.write_text(f"models: {store_dir}\nhttp_port: {metrics_server}\n")
    result = cli("show", NAME, "--config", config)
    assert result.exit_code == 0, result.output
    assert "production: 1" in result.output and "canary: off" in result.output
    assert "manifest of thyroid-seg:1" in result.output and "69748006" in result.output
    assert "shadow: shadow None -> 1" in result.output  # history line
    assert "running node" in result.output
    assert "version 1: " in result.output and " ok, " in result.output
    assert "shadow 1 agreement thyroid: mean Dice" in result.output


def test_show_errors(store_dir: Path) -> None:
    result = CliRunner().invoke(models, ["show", "lung", "--models", str(store_dir)])
    assert result.exit_code == 1 and "no model 'lung'" in result.output
    result = cli("show", "thyroid-seg@candidate", "--models", store_dir)
    assert result.exit_code == 0 and "alias 'candidate' is not set" in result.output


def test_module_runs_as_subprocess(store_dir: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dicom_node.models_cli",
            "rollback",
            NAME,
            "--models",
            str(store_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Error: thyroid-seg: no previous production version" in proc.stderr


def test_show_summarises_shadow_runs_from_job_store(store_dir: Path, tmp_path: Path) -> None:
    from dicom_node.jobs import InstanceRecord, JobState, JobStore

    storage = tmp_path / "var"
    jobs = JobStore.open(storage)
    try:
        for i in range(2):
            uid = f"1.2.{i}"
            jobs.record_instance(
                InstanceRecord(
                    sop_instance_uid=f"{uid}.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                    study_uid="1.2",
                    series_uid=uid,
                    modality="NM",
                    path=f"spool/1.2/{uid}/{uid}.1.dcm",
                    size=10,
                    calling_ae=None,
                    transfer_syntax=None,
                    received_at=1.0,
                )
            )
        for job, value in zip(jobs.jobs_in(JobState.RECEIVED), (0.9, 1.0), strict=True):
            jobs.add_shadow_result(job.id, NAME, "2", {"thyroid": value, "nodule": 1.0}, "1")
        jobs.add_shadow_result(job.id, "other-model", "7", {"thyroid": 0.1})
    finally:
        jobs.close()
    config = tmp_path / "node.yaml"
    config.write_text(f"models: {store_dir}\nstorage: {storage}\nhttp_port: {free_port()}\n")
    result = cli("show", NAME, "--config", config)
    assert result.exit_code == 0, result.output
    assert "shadow 2 agreement thyroid: mean Dice 0.950 over 2 run(s), min 0.900" in result.output
