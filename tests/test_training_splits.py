"""Split files: fixed patient splits, k-fold cross-validation, a test split `train` never opens."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from ruamel.yaml import YAML

from training.__main__ import main as training_cli
from training.examples.ct_liver import write_dataset
from training.splits import SplitError, make_split, read_split, write_split
from training.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "training/configs/ct-liver-tiny.yaml"

_OPENED: list[str] | None = None
"""Paths opened while a test records them (one audit hook per process, switched by this)."""


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | Path):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@contextmanager
def recording() -> Iterator[list[str]]:
    """Every path the process opens inside the ``with`` block."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 small CT patients (one series each, NIfTI label maps)."""
    root = tmp_path_factory.mktemp("ct") / "data"
    write_dataset(root, 6, seed=5, size=64, slices=3)
    return root


def _config(epochs: int = 1) -> dict[str, Any]:
    config = copy.deepcopy(load_config(CONFIG))
    config["train"]["epochs"] = epochs
    config["data"].pop("split")
    return config


def _write(data: dict[str, Any], path: Path) -> Path:
    with path.open("w") as fh:
        YAML(typ="safe").dump(data, fh)
    return path


class TestSplitFile:
    def test_made_by_patient_with_folds(self, data: Path, tmp_path: Path) -> None:
        made = make_split(data, val_fraction=0.2, test_fraction=0.2, folds=2, seed=1)
        assert made == make_split(data, val_fraction=0.2, test_fraction=0.2, folds=2, seed=1)
        split = read_split(write_split(made, tmp_path / "split.yaml"))
        assert len(split.test) == 2 and len(split.val) == 2 and len(split.train) == 2
        assert split.patients["CTLIVER001"] == ("ctliver001",)
        assert sorted(p for f in split.folds for p in f) == sorted(split.train + split.val)
        train_ids, val_ids = split.for_fold(2)
        assert set(val_ids) == set(split.folds[1]) and not set(train_ids) & set(val_ids)
        assert not set(split.test) & {*train_ids, *val_ids}

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"val": ["CTLIVER001"]}, "patient 'CTLIVER001' is in both train and val"),
            ({"tset": []}, "unknown key 'tset'; did you mean 'test'"),
            ({"folds": [["CTLIVER001"], ["NOBODY"]]}, "folds must partition train \\+ val"),
            ({"folds": [["CTLIVER001"], ["CTLIVER001", "CTLIVER002"]]}, "in more than one fold"),
            ({"test": ["NOBODY"]}, "test names patient 'NOBODY', not under 'patients'"),
            ({"train": ["CTLIVER001"]}, "are in no split"),
        ],
    )
    def test_bad_files_refused_with_the_reason(
        self, tmp_path: Path, change: dict[str, Any], message: str
    ) -> None:
        base: dict[str, Any] = {
            "patients": {"CTLIVER001": ["ctliver001"], "CTLIVER002": ["ctliver002"]},
            "train": ["CTLIVER001"],
            "val": ["CTLIVER002"],
            "test": [],
        }
        if change == {"train": ["CTLIVER001"]}:
            base["val"] = []
        base.update(change)
        with pytest.raises(SplitError, match=message):
            read_split(_write(base, tmp_path / "split.yaml"))


class TestTrainWithSplit:
    def test_test_split_is_never_opened(self, data: Path, tmp_path: Path) -> None:
        made = make_split(data, val_fraction=0.2, test_fraction=0.2, seed=2)
        split_path = write_split(made, tmp_path / "split.yaml")
        with recording() as opened:
            result = train(_config(), tmp_path / "run", data_dir=data, split=split_path)
        split = read_split(split_path)
        assert result.best_epoch == 1
        test_dirs = [str(data / n) for n in split.folders(split.test)]
        used_dirs = [str(data / n) for n in split.folders(split.train + split.val)]
        assert any(p.startswith(tuple(used_dirs)) for p in opened)  # the recorder works
        assert not [p for p in opened if p.startswith(tuple(test_dirs))]
        recorded = json.loads((tmp_path / "run/split.json").read_text())
        assert recorded["val"] == split.folders(split.val) and recorded["test_patients"] == 2
        run = json.loads((tmp_path / "run/run.json").read_text())
        assert run["split"] == {"file": str(split.path), "sha256": split.sha256, "fold": None}

    def test_wrong_patient_and_unlisted_folder_refused(self, data: Path, tmp_path: Path) -> None:
        made = make_split(data, val_fraction=0.2, test_fraction=0.2, seed=2)
        a, b = made["train"][:2]
        made["patients"][a], made["patients"][b] = made["patients"][b], made["patients"][a]
        with pytest.raises(SplitError, match="is listed for patient .* but its images have"):
            train(
                _config(), tmp_path / "r1", data_dir=data, split=write_split(made, tmp_path / "s1")
            )
        made = make_split(data, val_fraction=0.2, test_fraction=0.2, seed=2)
        gone = made["test"].pop()
        made["patients"].pop(gone)
        with pytest.raises(SplitError, match=r"1 case folder\(s\) of .* are in no split"):
            train(
                _config(), tmp_path / "r2", data_dir=data, split=write_split(made, tmp_path / "s2")
            )

    def test_fold_needs_folds(self, data: Path, tmp_path: Path) -> None:
        with pytest.raises(SplitError, match="--fold 1 needs a split file with folds"):
            train(_config(), tmp_path / "run", data_dir=data, fold=1)

    def test_cross_validation_summary(self, data: Path, tmp_path: Path) -> None:
        made = make_split(data, val_fraction=0.2, test_fraction=0.2, folds=2, seed=3)
        split_path = write_split(made, tmp_path / "split.yaml")
        config = _config()
        config_path = tmp_path / "cv.yaml"
        _write(config, config_path)
        result = CliRunner().invoke(
            training_cli,
            [
                "cv",
                "--config",
                str(config_path),
                "--split",
                str(split_path),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "cv"),
            ],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((tmp_path / "cv/cv.json").read_text())
        assert [f["fold"] for f in summary["folds"]] == [1, 2]
        for k, fold in enumerate(read_split(split_path).folds, start=1):
            recorded = json.loads((tmp_path / f"cv/fold-{k}/split.json").read_text())
            assert recorded["val"] == sorted(made["patients"][p][0] for p in fold)
            assert recorded["fold"] == k
        scores = [f["val_score"] for f in summary["folds"]]
        assert summary["mean"]["val_score"] == pytest.approx(sum(scores) / 2)
        assert set(summary["mean"]) == {"val_score", "liver", "lesion"}
        assert "| mean |" in (tmp_path / "cv/cv.md").read_text()
