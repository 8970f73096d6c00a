"""The model contract end to end: what training, ``evaluate`` and the gate score, the node serves.

Two guarantees, each against the code paths that really run:

* the promotion gate and the worker read the same files into the same frames and get the same
  masks and Dice from the same runner (including a CT series whose file order, InstanceNumber
  order and slice order disagree);
* a CT model trained with a ``fixed`` Hounsfield window by training's own recipe scores the same
  liver Dice in ``evaluate`` as in the SEG a running node returns to a PACS. Before the contract,
  training applied RescaleSlope/RescaleIntercept and the node did not: the SEG was empty or wrong.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.infer.worker import Worker
from dicom_node.modelstore import ModelRunner, ModelStore, dice, read_series
from dicom_node.modelstore import gate as gate_module
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import Orthanc, storescu
from tests.helpers.waiting import wait_until

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SIZE = 64
SLICES = 3
LIVER_HU, FAT_HU, AIR_HU, NOISE_HU = 60.0, -100.0, -1000.0, 12.0
"""The synthetic abdomen: a liver blob at ~60 HU in soft tissue at ~-100 HU, air outside."""

WINDOW = {"method": "fixed", "scale": 0.005, "offset": 0.5}
"""HU -> network input: -1000 -> -4.5, -100 -> 0, 60 -> 0.8 (meaningless on stored values)."""

LIVER_SEGMENT = {
    "key": "liver",
    "label": "Liver",
    "channel": 0,
    "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
    "type": {"value": "10200004", "scheme": "SCT", "meaning": "Liver"},
    "color": [180, 80, 60],
}

CT_CONFIG: dict[str, Any] = {
    "seed": 11,
    "model": {
        "name": "liver-seg",
        "description": "tiny CT liver model (test)",
        "input": {
            "name": "image",
            "size": [SIZE, SIZE],
            "channels": 1,
            "modalities": ["CT"],
            "normalization": WINDOW,
        },
        "output": {"name": "logits", "activation": "sigmoid", "threshold": 0.5},
        "segments": [LIVER_SEGMENT],
    },
    "network": {"depth": 2, "base_channels": 8},
    "data": {"val_fraction": 0.25},
    "augment": {},
    "train": {
        "epochs": 30,
        "batch_size": 4,
        "lr": 0.01,
        "weight_decay": 0.0001,
        "warmup_epochs": 0,
        "patience": 30,
        "bce_weight": 1.0,
        "dice_weight": 1.0,
        "max_minutes": 2,
        "num_workers": 0,
        "threads": 2,
    },
}

CT_RULE = f"""\
rules:
  - name: liver-ct
    priority: 100
    when:
      Modality: CT
    complete: {{instances: {SLICES}}}
    model: liver-seg@production
    send_to: [pacs]
    stop: true
"""


def _set_pixels(ds: Dataset, stored: np.ndarray) -> None:
    ds.PixelData = np.ascontiguousarray(stored.astype(np.int16)).tobytes()


def ct_case(
    folder: Path, seed: int, *, reverse_numbers: bool = False, key: str = "liver"
) -> tuple[list[Path], np.ndarray]:
    """Write a synthetic CT series (stored = HU + 1024) and its ``truth.npz``; return files, truth.

    ``reverse_numbers`` makes InstanceNumber run against the slice position, and the files are
    written in a shuffled order, so only the contract's frame order pairs frames with truth.
    """
    rng = np.random.default_rng(seed)
    series = make_ct_series(SLICES, SIZE, SIZE, seed=f"ct{seed}")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    body = ((xx - 0.5) / 0.44) ** 2 + ((yy - 0.5) / 0.36) ** 2 <= 1.0
    truth = []
    for index, ds in enumerate(series):
        cx, cy = 0.5 + rng.uniform(-0.12, 0.12), 0.5 + rng.uniform(-0.08, 0.08)
        rx, ry = rng.uniform(0.12, 0.22), rng.uniform(0.10, 0.18)
        liver = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0) & body
        hu = np.where(body, FAT_HU, AIR_HU) + rng.normal(0, NOISE_HU, body.shape)
        hu = np.where(liver, LIVER_HU + rng.normal(0, NOISE_HU, body.shape), hu)
        _set_pixels(ds, np.round(hu) + 1024)  # RescaleIntercept -1024, slope 1
        if reverse_numbers:
            ds.InstanceNumber = SLICES - index
        truth.append(liver)
    folder.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(series)) if reverse_numbers else np.arange(len(series))
    files = []
    for position, index in enumerate(order):
        path = folder / f"IM{position:04d}"
        series[int(index)].save_as(path, enforce_file_format=True)
        files.append(path)
    stack = np.stack(truth)  # slice (z) order = the contract's frame order
    np.savez_compressed(folder / "truth.npz", **{key: stack})
    return files, stack


def ct_dataset(root: Path, n: int, first_seed: int) -> Path:
    for i in range(n):
        ct_case(root / f"case{i:03d}", first_seed + i)
    return root


def seg_masks(seg_path: Path, sources: list[Dataset]) -> np.ndarray:
    """The SEG's segment 1 on ``sources`` (in the contract's frame order): bool (F, H, W)."""
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[1],
        combine_segments=False,
    )
    return np.asarray(pixels[..., 0]).astype(bool)


class TestGateScoresWhatTheNodeServes:
    """The gate's reading and scoring against the worker's, on the same files and runner."""

    def test_same_frames_masks_and_dice(self, tmp_path: Path) -> None:
        store = ModelStore(make_store(tmp_path / "models", versions=["1"], production="1"))
        resolved = store.resolve("thyroid-seg:1")
        reference = tmp_path / "reference"
        case_files = {}
        for seed in (1, 2):  # CT: shuffled files, InstanceNumber against the slice order
            files, _ = ct_case(reference / f"ct{seed}", seed, reverse_numbers=True, key="thyroid")
            case_files[f"ct{seed}"] = files
        nm_files = write_series([make_nm(rows=SIZE, cols=SIZE, seed=3)], reference / "nm3")
        np.savez(reference / "nm3" / "truth.npz", thyroid=np.zeros((SIZE, SIZE), bool))
        case_files["nm3"] = nm_files

        runner = ModelRunner()
        cases = gate_module.load_reference_cases(reference)
        gate_scores = gate_module.evaluate(runner, resolved, cases)
        worker = Worker(  # the worker's own inference step; it needs no job store for this
            make_config(tmp_path, tmp_path / "models", tmp_path / "rules", 4242),
            store=None,  # type: ignore[arg-type]
            models=runner,
            audit=None,  # type: ignore[arg-type]
        )
        worker_dice: dict[str, list[float]] = {}
        for case in cases:
            series = read_series(case_files[case.name])  # what _infer_and_build reads
            for mine, theirs in zip(series.frames, case.frames, strict=True):
                np.testing.assert_array_equal(mine, theirs)
            served = worker._infer(resolved, series).masks
            gated = runner.run(resolved, case.frames)
            for key, truth in case.truth.items():
                np.testing.assert_array_equal(served[key], np.stack([g[key] for g in gated]))
                worker_dice.setdefault(key, []).append(dice(served[key], truth))
        assert gate_scores == {k: float(np.mean(v)) for k, v in worker_dice.items()}

    def test_ct_frames_are_hounsfield_in_slice_order(self, tmp_path: Path) -> None:
        files, truth = ct_case(tmp_path / "ct", 5, reverse_numbers=True)
        series = read_series(files)
        stack = series.stack()
        assert stack.dtype == np.float32
        # the liver is bright in HU and every frame pairs with its own truth slice
        for frame, liver in zip(stack, truth, strict=True):
            assert abs(float(frame[liver].mean()) - LIVER_HU) < 5
            assert abs(float(frame[~liver & (frame > -500)].mean()) - FAT_HU) < 5
        z = [float(ds.ImagePositionPatient[2]) for ds in series.sources]
        assert z == sorted(z)


@pytest.fixture(scope="module")
def ct_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train -> export -> evaluate a tiny CT liver model with training's own recipe."""
    from training.evaluate import evaluate
    from training.export import export_model
    from training.train import train

    root = tmp_path_factory.mktemp("ct-model")
    train_dir = ct_dataset(root / "train", 8, first_seed=100)
    test_dir = ct_dataset(root / "test", 3, first_seed=200)
    config = copy.deepcopy(CT_CONFIG)
    config["data"]["train"] = str(train_dir)
    result = train(config, root / "run", data_dir=train_dir)
    version = root / "export" / "1"
    export_model(result.best_checkpoint, version, version="1")
    report = evaluate(version, test_dir, root / "eval", figures=False)
    return {"root": root, "version": version, "test": test_dir, "report": report}


class TestCtModelThroughTheNode:
    """The CT case that scored Dice 0.96 in ``evaluate`` and 0.00 in the node's SEG."""

    def test_evaluate_scores_high(self, ct_model: dict[str, Any]) -> None:
        assert ct_model["report"]["mean"]["liver"]["dice"] > 0.9

    def test_stored_values_would_not_do(self, ct_model: dict[str, Any]) -> None:
        """The bug this contract fixes: the same model on raw stored values fails."""
        from training.evaluate import version_of

        resolved = version_of(ct_model["version"])
        runner = ModelRunner()
        raw, hu = [], []
        for case in sorted(p for p in ct_model["test"].iterdir() if p.is_dir()):
            files = sorted(case.glob("IM*"))
            truth = np.load(case / "truth.npz")["liver"]
            series = read_series(files)
            stored = [np.asarray(ds.pixel_array) for ds in series.sources]
            raw.append(dice(np.stack([m["liver"] for m in runner.run(resolved, stored)]), truth))
            hu.append(
                dice(np.stack([m["liver"] for m in runner.run(resolved, series.frames)]), truth)
            )
        assert float(np.mean(hu)) > 0.9
        assert float(np.mean(raw)) < 0.6, f"stored values scored {raw}"

    def test_seg_from_a_running_node_matches_evaluate(
        self, tmp_path: Path, ct_model: dict[str, Any], node_factory: Any
    ) -> None:
        from training.publish import publish

        models = tmp_path / "models"
        publish(ct_model["version"], models, alias="production")
        rules = tmp_path / "rules"
        write_rules(rules, CT_RULE)
        report = ct_model["report"]
        evaluated = {
            (r["case"], r["frame"]): r["liver"]["dice"]
            for r in report["cases"]
            if r["liver"]["truth_pixels"] > 0
        }
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models, rules, orthanc.dicom_port)
            node_factory(config)
            cases = sorted(p for p in ct_model["test"].iterdir() if p.is_dir())
            files = [f for case in cases for f in sorted(case.glob("IM*"))]
            result = storescu(files, config.port, config.ae_title)
            assert result.returncode == 0, result.stderr

            def segs() -> list[str] | None:
                found = [
                    iid
                    for iid in orthanc.instances()
                    if orthanc.instance_tags(iid).get("SOPClassUID") == SEG_SOP_CLASS
                ]
                return found if len(found) == len(cases) else None

            seg_ids = wait_until(segs, timeout=90, what=f"{len(cases)} SEGs in Orthanc")
            by_series: dict[str, Path] = {}
            for n, iid in enumerate(seg_ids):
                path = tmp_path / f"seg{n}.dcm"
                path.write_bytes(orthanc.instance_file(iid))
                seg = pydicom.dcmread(path)
                by_series[str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)] = path
        served: dict[tuple[str, int], float] = {}
        for case in cases:
            series = read_series(sorted(case.glob("IM*")))
            truth = np.load(case / "truth.npz")["liver"]
            masks = seg_masks(by_series[str(series.sources[0].SeriesInstanceUID)], series.sources)
            for f in range(len(truth)):
                if truth[f].any():
                    served[(case.name, f)] = dice(masks[f], truth[f])
        assert served.keys() == evaluated.keys()
        node_mean = float(np.mean(list(served.values())))
        evaluate_mean = float(np.mean(list(evaluated.values())))
        assert abs(node_mean - evaluate_mean) <= 0.01, (node_mean, evaluate_mean)
        assert node_mean > 0.9
        (tmp_path / "scores.json").write_text(
            json.dumps({"node": node_mean, "evaluate": evaluate_mean})
        )
