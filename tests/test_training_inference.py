"""Declaring post-processing, test-time augmentation and probability maps in training.

The training config's ``model.postprocess`` / ``model.tta`` / ``model.probabilities`` are checked
like the manifest checks them (unknown keys with "did you mean"), and ``export`` writes them into
the manifest; settings chosen after training on validation data (``export --inference FILE``)
replace the config's, per-segment thresholds included.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from ruamel.yaml import YAML

from dicom_node.modelstore import load_manifest
from training import schema
from training.export import export_model, with_inference
from training.train import load_config
from training.unet import UNet

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


@pytest.fixture
def config() -> dict[str, Any]:
    data = load_config(TINY)
    # two segments, as in the thyroid recipe, so that steps can refer to another segment
    segments = data["model"]["segments"]
    if len(segments) == 1:
        nodule = copy.deepcopy(segments[0])
        nodule.update(key="nodule", label="Cold nodule", channel=1)
        segments.append(nodule)
    return data


def _check(config: dict[str, Any], **model: Any) -> None:
    data = copy.deepcopy(config)
    data["model"].update(model)
    schema.check_config(data, "tiny.yaml")


class TestConfigKeys:
    def test_the_keys_are_accepted(self, config: dict[str, Any]) -> None:
        _check(
            config,
            tta=["flip_lr"],
            probabilities=True,
            postprocess=[
                {"op": "min_size", "segment": "nodule", "mm2": 10, "pixels": 4},
                {"op": "fill_holes", "segment": "thyroid", "where": "nodule"},
            ],
        )

    @pytest.mark.parametrize(
        ("model", "message"),
        [
            (
                {"postprocess": [{"op": "min_size", "segment": "nodule", "pixles": 4}]},
                "tiny.yaml: model.postprocess[0] (min_size) has unknown key 'pixles'; "
                "did you mean 'pixels'?",
            ),
            (
                {"postprocess": [{"op": "fill_hole", "segment": "thyroid"}]},
                "unknown op 'fill_hole'; did you mean 'fill_holes'?",
            ),
            (
                {"postprocess": [{"op": "within", "segment": "nodule", "of": "thyriod"}]},
                "model.postprocess[0].of: unknown segment 'thyriod'; did you mean 'thyroid'?",
            ),
            (
                {"postprocess": [{"op": "largest_component", "segment": "thyroid", "keep": 0}]},
                "keep: Input should be greater than or equal to 1",
            ),
            ({"postprocess": {"op": "min_size"}}, "model.postprocess must be a list of steps"),
            ({"tta": ["flip_lr", "rot90"]}, "model.tta must be a list of distinct"),
            ({"probabilities": "yes"}, "model.probabilities must be true or false"),
            ({"postproces": []}, "unknown key 'postproces'; did you mean 'postprocess'?"),
        ],
    )
    def test_mistakes_are_refused(
        self, config: dict[str, Any], model: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ValueError) as caught:
            _check(config, **model)
        assert message in str(caught.value)


class TestWithInference:
    def test_settings_replace_the_configs_and_set_thresholds(self, config: dict[str, Any]) -> None:
        config["model"]["tta"] = ["flip_ud"]
        chosen = with_inference(
            config,
            {
                "tta": ["flip_lr"],
                "postprocess": [{"op": "min_size", "segment": "nodule", "pixels": 5}],
                "thresholds": {"nodule": 0.4},
            },
        )
        assert chosen["model"]["tta"] == ["flip_lr"]
        assert chosen["model"]["segments"][1]["threshold"] == 0.4
        assert "threshold" not in chosen["model"]["segments"][0]
        assert config["model"]["tta"] == ["flip_ud"]  # the original is untouched

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            ({"treshold": {}}, "unknown key 'treshold'; did you mean 'thresholds'?"),
            ({"thresholds": {"nodul": 0.4}}, "did you mean 'nodule'?"),
            ({"thresholds": {"nodule": 1.5}}, "thresholds.nodule must be a number between 0"),
        ],
    )
    def test_mistakes_are_refused(
        self, config: dict[str, Any], settings: dict[str, Any], message: str
    ) -> None:
        with pytest.raises(ValueError, match=message.replace("?", r"\?").replace(".", r"\.")):
            with_inference(config, settings)


def test_export_writes_the_settings_into_the_manifest(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    config["model"]["tta"] = ["flip_lr"]
    net_cfg = {
        "in_channels": 1,
        "out_channels": len(config["model"]["segments"]),
        "depth": int(config["network"]["depth"]),
        "base_channels": int(config["network"]["base_channels"]),
    }
    torch.manual_seed(0)
    checkpoint = tmp_path / "best.pt"
    torch.save(
        {"state_dict": UNet(**net_cfg).state_dict(), "network": net_cfg, "config": config},
        checkpoint,
    )
    plain = export_model(checkpoint, tmp_path / "1")
    manifest = load_manifest(plain.manifest_path)
    assert manifest.tta == ["flip_lr"] and manifest.postprocess == []
    assert not manifest.probabilities

    steps = [{"op": "largest_component", "segment": "thyroid", "keep": 2}]
    chosen = export_model(
        checkpoint,
        tmp_path / "2",
        inference={"postprocess": steps, "probabilities": True, "thresholds": {"nodule": 0.3}},
    )
    manifest = load_manifest(chosen.manifest_path)
    assert [s.model_dump(exclude_defaults=True) for s in manifest.postprocess] == [
        {"op": "largest_component", "segment": "thyroid", "keep": 2}
    ]
    assert manifest.tta == ["flip_lr"] and manifest.probabilities
    assert manifest.threshold("nodule") == 0.3 and manifest.threshold("thyroid") == 0.5
    recorded = YAML(typ="safe").load(chosen.manifest_path.read_text())["provenance"]["config"]
    assert recorded["model"]["postprocess"] == steps  # what evaluate reads back
