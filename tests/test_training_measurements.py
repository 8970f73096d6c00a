"""A training config declares the report's measurement set; the published model carries it.

``model.measurements`` in a training config is checked as the manifest checks it (unknown segment
or key with "did you mean", bad values with the path), ``export`` writes it into the manifest, and
a node serving the exported model reports what it asks for: here the left / right split of the
gland in the SR, and the same shares in the overlay's legend.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes

from dicom_node.modelstore import load_manifest
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.onnx_models import thyroid_like_image, write_yaml
from tests.helpers.peers import StoreSCP, storescu
from tests.helpers.waiting import wait_until
from training import schema
from training.export import export_model
from training.train import load_config
from training.unet import UNet

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
THYROID = TINY.with_name("thyroid.yaml")

PLAN = {
    "thyroid": {"laterality": "split"},
    "nodule": {"components": True, "min_component_pixels": 4},
}

RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
    outputs: [seg, overlay, report]
    stop: true
"""


def _check(**model: Any) -> None:
    data = load_config(TINY)
    data["model"].update(copy.deepcopy(model))
    schema.check_config(data, "tiny.yaml")


class TestConfig:
    def test_the_block_is_accepted_and_the_shipped_recipe_declares_it(self) -> None:
        _check(measurements=PLAN)
        assert load_config(THYROID)["model"]["measurements"] == PLAN

    @pytest.mark.parametrize(
        ("block", "message"),
        [
            (
                {"thyroyd": {"laterality": "split"}},
                "tiny.yaml: model.measurements: unknown segment 'thyroyd'; did you mean 'thyroid'?",
            ),
            (
                {"thyroid": {"lateral": "split"}},
                "tiny.yaml: model.measurements.thyroid has unknown key 'lateral'; did you mean "
                "'laterality'?",
            ),
            (
                {"thyroid": {"laterality": "both"}},
                "tiny.yaml: model.measurements: thyroid.laterality: Input should be 'none' or "
                "'split' (got 'both')",
            ),
            (
                {"nodule": {"min_component_pixels": 0}},
                "nodule.min_component_pixels: Input should be greater than or equal to 1",
            ),
            ({"thyroid": "split"}, "model.measurements.thyroid must be a mapping"),
            (["thyroid"], "model.measurements must be a mapping of segment key"),
        ],
    )
    def test_mistakes_are_refused(self, block: Any, message: str) -> None:
        with pytest.raises(ValueError) as info:
            _check(measurements=block)
        assert message in str(info.value)

    def test_measurements_is_a_model_key_with_a_hint(self) -> None:
        with pytest.raises(ValueError, match="did you mean 'measurements'"):
            _check(measurement=PLAN)


def _export_gland_everywhere(tmp_path: Path, models: Path) -> Path:
    """Export a tiny network that calls every pixel gland and none nodule, as version 1."""
    config = load_config(TINY)
    config["model"]["measurements"] = PLAN
    net_cfg = {
        "in_channels": 1,
        "out_channels": len(config["model"]["segments"]),
        "depth": int(config["network"]["depth"]),
        "base_channels": int(config["network"]["base_channels"]),
    }
    torch.manual_seed(0)
    net = UNet(**net_cfg)
    with torch.no_grad():  # a known answer without training: the head's bias decides
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([8.0, -8.0]))
    checkpoint = tmp_path / "best.pt"
    torch.save({"state_dict": net.state_dict(), "network": net_cfg, "config": config}, checkpoint)
    result = export_model(checkpoint, models / "thyroid-seg" / "1")
    write_yaml(models / "thyroid-seg" / "aliases.yaml", {"production": "1"})
    return result.manifest_path


def test_export_writes_the_set_and_the_nodes_report_splits_the_gland(
    tmp_path: Path, node_factory: Any
) -> None:
    models = tmp_path / "models"
    manifest = load_manifest(_export_gland_everywhere(tmp_path, models))
    assert manifest.measurements is not None
    assert manifest.measurements["thyroid"].laterality == "split"
    assert manifest.measurements["nodule"].components
    assert manifest.measurements["nodule"].min_component_pixels == 4
    rules = tmp_path / "rules"
    write_rules(rules, RULE)
    image, _ = thyroid_like_image((64, 64), seed=3)
    with StoreSCP(aet="ORTHANC", output_dir=tmp_path / "pacs") as pacs:
        config = make_config(tmp_path, models, rules, pacs.port)
        node = node_factory(config)
        files = write_series([make_nm(rows=64, cols=64, pixels=image)], tmp_path / "in")
        assert storescu(files, config.port, config.ae_title).returncode == 0
        wait_until(lambda: node.store.list_jobs(["done"]), what="a done job", timeout=60)
        wait_until(lambda: len(pacs.received()) >= 3, what="SEG, overlay and SR", timeout=30)
        found = {}
        for path in pacs.received():
            ds = pydicom.dcmread(path)
            found[str(ds.Modality)] = ds
    sr = hd.sr.Comprehensive3DSR.from_dataset(found["SR"])
    gland = next(
        g
        for g in sr.content.get_volumetric_roi_measurement_groups()
        if g.referenced_segment.referenced_segment_numbers == [1]
    )
    shares = {
        m.finding_sites[0].laterality.meaning: float(m.value)
        for m in gland.get_measurements()
        if m.name == codes.SCT.Ratio
    }
    assert set(shares) == {"Left", "Right"} and sum(shares.values()) == pytest.approx(100.0)
    nodule = next(
        g
        for g in sr.content.get_volumetric_roi_measurement_groups()
        if g.referenced_segment.referenced_segment_numbers == [2]
    )
    (count,) = [m for m in nodule.get_measurements() if m.name.value == "246206008"]
    assert float(count.value) == 0  # the network calls no pixel nodule
    legend = [line.strip() for line in str(found["OT"].ImageComments).splitlines()]
    split = f"left {shares['Left']:.1f}% / right {shares['Right']:.1f}% of counts"
    assert split in legend and "0 component(s)" in legend


def test_export_inference_file_sets_the_measurements_of_a_trained_run(tmp_path: Path) -> None:
    from training.export import with_inference

    config = load_config(TINY)
    assert "measurements" not in config["model"]
    chosen = with_inference(config, {"measurements": PLAN})
    assert chosen["model"]["measurements"] == PLAN
    with pytest.raises(ValueError, match="did you mean 'laterality'"):
        with_inference(config, {"measurements": {"thyroid": {"lateralty": "split"}}})
