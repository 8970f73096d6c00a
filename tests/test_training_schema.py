"""training.schema and what reads it: unknown keys refused everywhere with "did you mean",
per-segment weights and lesion flags, augmentations that declare their modalities, overlays
windowed per modality."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ruamel.yaml import YAML

from training.evaluate import DEFAULT_DISPLAY, display_image, evaluation_settings, summarise
from training.schema import check_config, display_settings, train_segments
from training.train import load_config
from training.transforms import RandCountScale, build_augmentation

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TINY = CONFIGS / "tiny.yaml"


def _tiny() -> dict[str, Any]:
    return copy.deepcopy(load_config(TINY))


class TestUnknownKeys:
    @pytest.mark.parametrize(
        ("section", "key", "hint"),
        [
            ("train", "patiance", "did you mean 'patience'"),
            ("data", "val_fracton", "did you mean 'val_fraction'"),
            ("network", "base_channel", "did you mean 'base_channels'"),
            ("augment", "flip_ud", "did you mean 'flip_lr'"),
        ],
    )
    def test_refused_with_a_hint(self, section: str, key: str, hint: str) -> None:
        config = _tiny()
        config[section][key] = 1
        with pytest.raises(ValueError, match=rf"{section} has unknown key '{key}'; {hint}"):
            check_config(config)

    def test_everywhere(self, tmp_path: Path) -> None:
        config = _tiny()
        config["model"]["segments"][0]["colour"] = [1, 2, 3]
        with pytest.raises(ValueError, match=r"model.segments\[0\] has unknown key 'colour'; did"):
            check_config(config)
        config = _tiny()
        config["augment"]["affine"]["rotate"] = 5
        with pytest.raises(ValueError, match=r"augment.affine has unknown key 'rotate'; did you"):
            check_config(config)
        config = _tiny()
        config["sed"] = 1
        with pytest.raises(ValueError, match=r"unknown key 'sed'; did you mean 'seed'"):
            check_config(config)
        path = tmp_path / "c.yaml"
        config = _tiny()
        config["model"]["input"]["modality"] = ["CT"]
        YAML(typ="safe").dump(config, path)
        with pytest.raises(ValueError, match=r"c.yaml: model.input has unknown key 'modality'"):
            load_config(path)

    def test_renamed_nodule_weight_says_what_replaced_it(self) -> None:
        config = _tiny()
        config["train"]["nodule_weight"] = 2.0
        with pytest.raises(ValueError, match=r"train.nodule_weight is no longer read; use "):
            check_config(config)

    def test_shipped_configs_pass(self) -> None:
        for path in sorted(CONFIGS.glob("*.yaml")):
            load_config(path)


class TestSegments:
    def test_weights_and_lesions(self) -> None:
        config = load_config(CONFIGS / "thyroid.yaml")
        segments = train_segments(config, ["thyroid", "nodule"])
        assert segments == {
            "thyroid": {"weight": 1.0, "lesion": False},
            "nodule": {"weight": 2.0, "lesion": True},  # what nodule_weight: 2.0 used to be
        }

    def test_bad_values(self) -> None:
        config = _tiny()
        config["train"]["segments"] = {"liver": {"weight": 2}}
        with pytest.raises(ValueError, match=r"train.segments has unknown key 'liver'"):
            check_config(config)
        config["train"]["segments"] = {"nodule": {"weight": 0}}
        with pytest.raises(ValueError, match=r"segments.nodule.weight must be a number > 0"):
            check_config(config)
        config["train"]["segments"] = {"nodule": {"lesion": "yes"}}
        with pytest.raises(ValueError, match=r"segments.nodule.lesion must be true or false"):
            check_config(config)

    def test_detection_for_every_lesion_segment(self) -> None:
        square = np.zeros((8, 8), bool)
        square[2:4, 2:4] = True
        record = {
            k: {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0, "truth_pixels": 4}
            | {"truth": 1, "detected": 1, "false_positives": 0}
            for k in ("liver", "lesion")
        }
        out = summarise([record], ["liver", "lesion"], ["lesion"])
        assert set(out["detection"]) == {"lesion"}
        assert out["detection"]["lesion"]["sensitivity"] == 1.0

    def test_lesions_from_the_manifest_provenance(self) -> None:
        from dicom_node.modelstore.manifest import parse_manifest
        from tests.helpers.onnx_models import manifest_dict

        config = _tiny()
        config["train"]["segments"] = {"thyroid": {"lesion": True}}
        manifest = parse_manifest(manifest_dict() | {"provenance": {"config": config}})
        lesions, display = evaluation_settings(manifest)
        assert lesions == ["thyroid"] and display["NM"]["invert"] is True
        legacy = parse_manifest(manifest_dict() | {"provenance": {"config": {"train": {}}}})
        assert evaluation_settings(legacy)[0] == ["nodule"]  # recorded before train.segments


class TestAugmentationModalities:
    def test_counts_refused_for_ct(self) -> None:
        with pytest.raises(ValueError, match=r"augment.counts suits modalities \['NM'\] only"):
            build_augmentation({"counts": {"prob": 0.5}}, ["CT"])
        assert len(build_augmentation({"counts": {"prob": 0.5}}, ["NM"])) == 1

    def test_counts_never_clips_negative_values(self) -> None:
        hu = {"image": np.full((4, 4), -1000.0, np.float32), "masks": np.zeros((1, 4, 4), bool)}
        counts = RandCountScale(prob=1.0).set_random_state(0)
        with pytest.raises(ValueError, match=r"needs count data \(>= 0\), got a minimum of -1000"):
            counts(hu)

    def test_flip_lr_off_unless_asked(self) -> None:
        assert build_augmentation({}) == []
        assert [type(t).__name__ for t in build_augmentation({"flip_lr": 0.5})] == ["RandFlipLR"]


class TestDisplay:
    def test_ct_window_and_nm_inversion(self) -> None:
        hu = np.array([[-1000.0, -160.0], [40.0, 240.0]])
        shown = display_image(hu, "CT", DEFAULT_DISPLAY)
        assert shown.tolist() == [[0.0, 0.0], [0.5, 1.0]]  # centre 40, width 400
        counts = np.array([[0.0, 50.0], [100.0, 100.0]])
        assert display_image(counts, "NM", DEFAULT_DISPLAY)[0, 0] == 1.0  # inverted
        plain = display_settings({"display": {"nm": {"invert": False}}})
        assert display_image(counts, "NM", plain)[0, 0] == 0.0

    def test_window_from_the_config(self) -> None:
        settings = display_settings({"display": {"CT": {"window": [0, 100]}}})
        assert display_image(np.array([[50.0]]), "CT", settings)[0, 0] == 1.0
        with pytest.raises(ValueError, match=r"display.CT.window must be \[centre, width\]"):
            display_settings({"display": {"CT": {"window": [0]}}})
        with pytest.raises(ValueError, match=r"display.CT has unknown key 'windw'; did you mean"):
            display_settings({"display": {"CT": {"windw": [0, 1]}}})
