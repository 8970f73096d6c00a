"""The worked CT example of training/README.md, end to end, with the README's own commands.

data -> split -> train -> export -> evaluate -> publish -> gate (promote), then a running node
(rule from the README) segments a held-out patient's series and sends the SEG to DCMTK
``storescp``; its 3-D Dice against the label map must equal ``evaluate``'s per-series Dice for
that patient within 0.01. Tiny configuration: about a minute on 2 shared cores.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from dicom_node.cli import main as node_cli
from dicom_node.modelstore import ModelStore
from dicom_node.modelstore.scoring import dice
from tests.conftest import make_config, write_rules
from tests.helpers.peers import StoreSCP, dciodvfy, storescu
from tests.helpers.waiting import wait_until
from training.__main__ import main as training_cli
from training.data import load_case
from training.examples.ct_liver import main as ct_liver_cli
from training.splits import read_split
from training.train import load_config, segment_refs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "training" / "README.md"

pytestmark = pytest.mark.slow


def _block(marker: str) -> str:
    """The fenced block right after ``<!-- ct-example: MARKER -->`` in the README."""
    text = README.read_text()
    found = re.search(rf"<!-- ct-example: {marker} -->\n```\w*\n(.*?)```", text, re.S)
    assert found, f"README has no ct-example {marker} block"
    return found.group(1)


def _run(line: str) -> str:
    """Run one README command in-process (same CLI objects as the installed scripts)."""
    argv = shlex.split(line)
    if argv[0].endswith("python"):
        assert argv[1] == "-m", line
        module, args = argv[2], argv[3:]
        cli = {"training": training_cli, "training.examples.ct_liver": ct_liver_cli}[module]
    else:
        assert argv[0] == "dicom-node", line
        cli, args = node_cli, argv[1:]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, f"{line}\n{result.output}"
    return result.output


def test_readme_ct_example_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_factory: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "training").symlink_to(ROOT / "training")  # the README runs from the repo root
    commands = [ln for ln in _block("commands").splitlines() if ln.strip()]
    outputs = []
    for line in commands:
        started = time.monotonic()
        outputs.append(_run(line))
        print(f"{time.monotonic() - started:6.1f} s  {line[:70]}")

    data = tmp_path / "var/ct-liver/data"
    split = read_split(tmp_path / "var/ct-liver/split.yaml")
    assert len(split.test) == 2 and not set(split.test) & {*split.train, *split.val}
    promoted = outputs[-1]
    assert "liver: mean Dice" in promoted and "lesion: mean Dice" in promoted, promoted
    store = ModelStore(tmp_path / "var/ct-liver/models")
    assert store.aliases("ct-liver").get("production") == "1"
    report = json.loads((tmp_path / "var/ct-liver/eval/report.json").read_text())
    assert {v["case"] for v in report["volumes"]} == set(split.folders(split.test))
    assert report["mean_3d"]["liver"]["dice"] > 0.5
    assert report["volumes"][0]["frames"] == 12
    assert report["volumes"][0]["slice_positions_mm"][:2] == [0.0, 5.0]  # the series geometry

    rules = tmp_path / "rules"
    write_rules(rules, _block("rule"), name="ct-liver.yaml")
    case = split.folders(split.test)[0]
    with StoreSCP() as pacs:
        config = make_config(tmp_path, tmp_path / "var/ct-liver/models", rules, pacs.port)
        node_factory(config)
        files = sorted((data / case).glob("*.dcm"))
        assert storescu(files, config.port, config.ae_title).returncode == 0
        segs = wait_until(pacs.received, timeout=60, what="the SEG of the CT series")
        assert len(segs) == 1
        seg = pydicom.dcmread(segs[0])
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Liver lesion"]
        assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 12
        checked = dciodvfy(segs[0])
        assert not checked.errors, checked.output
        # the served SEG, read back below by training's own SEG reader on the same frames
        served = tmp_path / "served" / case
        served.mkdir(parents=True)
        for f in files:
            shutil.copy(f, served / f.name)
        shutil.copy(segs[0], served / "seg.dcm")
    refs = segment_refs(load_config(ROOT / "training/configs/ct-liver-tiny.yaml"))
    truth = load_case(data / case, refs, nifti_labels={"liver": [1, 2], "lesion": [2]})
    from_node = load_case(served, refs)
    assert from_node.mask_format == "seg"
    evaluated = next(v for v in report["volumes"] if v["case"] == case)
    for k, ref in enumerate(refs):
        node_dice = dice(from_node.masks[k], truth.masks[k])
        assert abs(node_dice - evaluated[ref.key]["dice"]) <= 0.01, (ref.key, node_dice)
    assert np.any(from_node.masks[0])  # a liver was found and sent
