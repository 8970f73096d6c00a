"""training.train: reproducible with a time budget, resumable, the run folder's record."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from dicom_node.demo.phantoms import write_cases
from training.__main__ import main
from training.train import load_checkpoint, load_config, train

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    write_cases(root, 8, 303, [64])
    return root


def _config(**train: Any) -> dict[str, Any]:
    config = copy.deepcopy(load_config(TINY))
    config["train"].update(train)
    return config


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b))
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class TestReproducible:
    def test_same_config_and_seed_same_weights_with_a_budget(
        self, data: Path, tmp_path: Path
    ) -> None:
        config = _config(max_minutes=5)
        a = train(config, tmp_path / "a", data_dir=data)
        b = train(config, tmp_path / "b", data_dir=data)
        assert a.stopped == b.stopped == "completed all epochs"
        _same_weights(a.out_dir / "last.pt", b.out_dir / "last.pt")
        _same_weights(a.best_checkpoint, b.best_checkpoint)
        assert [r["lr"] for r in a.history] == [r["lr"] for r in b.history]

    def test_run_record(self, data: Path, tmp_path: Path) -> None:
        result = train(_config(), tmp_path / "run", data_dir=data, config_path=str(TINY))
        record = json.loads((result.out_dir / "run.json").read_text())
        assert record["status"] == "finished" and record["config"]["seed"] == 7
        assert len(record["data_hash"]) == 64 and record["data_dir"] == str(data)
        assert record["versions"]["torch"] == torch.__version__
        assert {"python", "numpy", "onnx", "onnxruntime", "pydicom"} <= set(record["versions"])
        assert record["git"] is None or len(record["git"]["commit"]) == 40
        assert record["stopped"]["budget_hit"] is False and record["stopped"]["epoch"] == 2
        _, ckpt = load_checkpoint(result.best_checkpoint)
        assert ckpt["versions"] == record["versions"]


class TestBudgetAndResume:
    def test_budget_stops_at_an_epoch_boundary_and_resume_finishes_the_same(
        self, data: Path, tmp_path: Path
    ) -> None:
        whole = train(_config(epochs=3, max_minutes=None), tmp_path / "whole", data_dir=data)
        assert len(whole.history) == 3
        cut = train(_config(epochs=3, max_minutes=1e-7), tmp_path / "cut", data_dir=data)
        assert len(cut.history) == 1 and cut.stopped.startswith("time budget of 1e-07 min")
        record = json.loads((cut.out_dir / "run.json").read_text())
        assert record["stopped"]["budget_hit"] is True and record["stopped"]["epoch"] == 1
        # the schedule is the same whether or not the budget is set: epoch 1 is identical
        assert cut.history[0]["lr"] == whole.history[0]["lr"]
        assert cut.history[0]["train_loss"] == whole.history[0]["train_loss"]
        # the budget still applies on resume (it restarts), so lift it through the record
        record["config"]["train"]["max_minutes"] = None
        (cut.out_dir / "run.json").write_text(json.dumps(record))
        result = CliRunner().invoke(main, ["train", "--resume", str(cut.out_dir)])
        assert result.exit_code == 0, result.output
        assert "completed all epochs" in result.output
        resumed = json.loads((cut.out_dir / "run.json").read_text())
        assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 3
        _same_weights(whole.out_dir / "last.pt", cut.out_dir / "last.pt")
        _same_weights(whole.best_checkpoint, cut.out_dir / "best.pt")

    def test_finished_run_is_not_resumed(self, data: Path, tmp_path: Path) -> None:
        done = train(_config(epochs=1), tmp_path / "done", data_dir=data)
        result = CliRunner().invoke(main, ["train", "--resume", str(done.out_dir)])
        assert result.exit_code != 0
        assert "the run finished (completed all epochs)" in " ".join(result.output.split())
        empty = tmp_path / "empty"
        empty.mkdir()
        result = CliRunner().invoke(main, ["train", "--resume", str(empty)])
        assert result.exit_code != 0
        assert "is not a run folder: no run.json" in " ".join(result.output.split())
