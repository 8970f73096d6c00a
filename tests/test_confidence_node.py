"""The low-confidence flag through a running node, with the shipped U-Net and DCMTK storescp.

The shipped ``thyroid-seg:1`` (a real ONNX U-Net) is served with a ``confidence:`` block: mean
predictive entropy and the input provenance of 300 thyroid phantoms (what training's export
records, see :func:`training.confidence_eval.input_provenance`). A phantom study the model gets
right goes out unflagged; images it cannot handle (a uniform flood field, a whole-body matrix,
a thyroid scan with a wrong pixel spacing) are flagged in every output, with the reasons, and
the rule's ``on_low_confidence`` decides: ``send`` exports them flagged, ``hold`` keeps them
until ``dicom-node release`` / ``discard``, ``discard`` ends the job saying why.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.uid import generate_uid
from ruamel.yaml import YAML

from dicom_node.cli import main as cli
from dicom_node.config import Destination
from tests.conftest import config_file, make_config, write_rules
from tests.helpers.metrics import sample
from tests.helpers.peers import StoreSCP, dciodvfy, storescu
from tests.helpers.waiting import wait_until

LOGGER = logging.getLogger(__name__)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "thyroid-seg" / "1"
REFERENCE = SHIPPED / "reference"
"""The shipped version's own held-out cases (its promotion-gate reference set)."""

PROVENANCE = {
    "modalities": ["NM"],
    "rows": [128, 256],
    "columns": [128, 256],
    "pixel_spacing_mm": [0.2627, 1.616],
    "intensity": {"p99_5": [7.0, 617.1], "mean": [0.7639, 36.3], "contrast": [4.184, 22.86]},
    "n_images": 300,
}
"""``input_provenance`` of 300 phantoms (``write_cases(n=300, seed=4242, size=[256, 128])``)."""

RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
    outputs: [seg, overlay, gsps, report]
    on_low_confidence: %s
    stop: true
"""

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
LOW_METRIC = "dicom_node_low_confidence_results_total"
CERTAINTY = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")


@pytest.fixture
def shipped_store(tmp_path: Path) -> Path:
    """A model store with the shipped thyroid-seg:1 and a confidence block, production -> 1."""
    root = tmp_path / "models"
    version = root / "thyroid-seg" / "1"
    shutil.copytree(SHIPPED, version, ignore=shutil.ignore_patterns("reference"))
    yaml = YAML(typ="safe")
    manifest = yaml.load((version / "manifest.yaml").read_text())
    manifest.pop("reference_data", None)
    manifest["confidence"] = {"method": "entropy", "threshold": 0.25, "ood": PROVENANCE}
    with open(version / "manifest.yaml", "w") as fh:
        yaml.dump(manifest, fh)
    (root / "thyroid-seg" / "aliases.yaml").write_text('production: "1"\n')
    return root


@pytest.fixture
def storescp() -> Iterator[StoreSCP]:
    with StoreSCP() as scp:
        yield scp


def _study(ds: pydicom.Dataset, seed: int) -> pydicom.Dataset:
    """``ds`` as an instance of a study and series of its own (fresh UIDs)."""
    out = ds.copy()
    out.StudyInstanceUID = generate_uid(entropy_srcs=["study", str(seed)])
    out.SeriesInstanceUID = generate_uid(entropy_srcs=["series", str(seed)])
    out.SOPInstanceUID = generate_uid(entropy_srcs=["sop", str(seed)])
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def _pixels(ds: pydicom.Dataset, counts: np.ndarray) -> pydicom.Dataset:
    ds.Rows, ds.Columns = counts.shape
    ds.PixelData = counts.astype("<u2").tobytes()
    ds.SmallestImagePixelValue, ds.LargestImagePixelValue = int(counts.min()), int(counts.max())
    return ds


def _reference(case: str, seed: int) -> pydicom.Dataset:
    return _study(pydicom.dcmread(REFERENCE / case / "image.dcm"), seed)


def good_phantom() -> pydicom.Dataset:
    """A held-out thyroid study the shipped model gets right (Dice 0.99 and 0.98, entropy 0.09)."""
    return _reference("case0005", 148)


def flood_field() -> pydicom.Dataset:
    """A uniform flood field (a camera QC image, not a thyroid) in an NM thyroid header."""
    counts = np.random.default_rng(5).poisson(20, (256, 256))
    return _pixels(_reference("case0000", 5), counts)


def whole_body() -> pydicom.Dataset:
    """A bone-scan-like 1024 x 256 anterior whole-body image: hot spine and joints."""
    rng = np.random.default_rng(6)
    rows, cols = np.mgrid[0:1024, 0:256]
    body = (np.abs(cols - 128) < 60) * 8.0 + (np.abs(cols - 128) < 8) * 40.0
    joints = sum(
        80.0 * np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / 200.0)
        for r, c in ((300, 80), (300, 176), (600, 100), (600, 156))
    )
    return _pixels(_reference("case0002", 6), rng.poisson(body + joints))


def wrong_spacing() -> pydicom.Dataset:
    """A thyroid study whose header says 4.8 mm pixels (a collimator the model never saw)."""
    ds = _reference("case0001", 150)
    ds.PixelSpacing = ["4.8", "4.8"]
    return ds


def _push(ds: pydicom.Dataset, folder: Path, port: int, ae: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert storescu([path], port, ae).returncode == 0


def _config(tmp_path: Path, models: Path, action: str, scp: StoreSCP) -> Any:
    rules = tmp_path / "rules"
    write_rules(rules, RULE % action)
    config = make_config(tmp_path, models, rules, scp.port)
    dest = Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port)
    return config.model_copy(update={"destinations": {"pacs": dest}})


def _received(scp: StoreSCP, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for path in scp.received():
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID == study_uid:
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def _job(node: Any, study_uid: str) -> Any:
    return next(j for j in node.store.list_jobs() if j.study_uid == study_uid)


class TestSend:
    def test_a_good_study_is_unflagged_a_flood_field_is_flagged_everywhere(
        self, tmp_path: Path, shipped_store: Path, storescp: StoreSCP, node_factory: Any
    ) -> None:
        config = _config(tmp_path, shipped_store, "send", storescp)
        node = node_factory(config)
        labels = {"model": "thyroid-seg", "version": "1"}
        before = sample(config.http_port, LOW_METRIC, **labels)
        good, bad = good_phantom(), flood_field()
        for ds in (good, bad):
            _push(ds, tmp_path / "in", config.port, config.ae_title)
        for ds in (good, bad):
            wait_until(
                lambda ds=ds: len(_received(storescp, ds.StudyInstanceUID)) == 4,
                what="SEG, overlay, GSPS and SR at storescp",
                timeout=60,
            )
        ok = _received(storescp, good.StudyInstanceUID)
        (seg,) = ok[SEG]
        verdict = _job(node, good.StudyInstanceUID).details["confidence"]
        assert verdict["low"] is False, verdict
        assert not seg.SeriesDescription.startswith("LOW CONFIDENCE")
        notes = [item.SegmentDescription for item in seg.SegmentSequence]
        assert all(n.startswith("confidence ok (entropy") for n in notes), notes

        flagged = _received(storescp, bad.StudyInstanceUID)
        for objects in flagged.values():
            for ds in objects:
                assert ds.SeriesDescription.startswith("LOW CONFIDENCE - AI "), ds.SOPClassUID
        (seg,) = flagged[SEG]
        notes = [item.SegmentDescription for item in seg.SegmentSequence]
        assert all(n.startswith("LOW CONFIDENCE") for n in notes), notes
        job = _job(node, bad.StudyInstanceUID)
        assert job.state == "done"
        reasons = job.details["confidence"]["reasons"]
        assert any(
            r.startswith("contrast (99.5th percentile / mean) 1.")
            and "training range 4.18-22.9" in r
            for r in reasons
        ), reasons
        sr = hd.sr.Comprehensive3DSR.from_dataset(flagged[SR_3D][0])
        for group in sr.content.get_volumetric_roi_measurement_groups():
            (evaluation,) = group.get_qualitative_evaluations(name=CERTAINTY)
            assert evaluation.value.meaning == "Low"
        (gsps,) = flagged[GSPS]
        texts = [
            t.UnformattedTextValue
            for a in gsps.GraphicAnnotationSequence
            for t in getattr(a, "TextObjectSequence", [])
        ]
        assert any(t.startswith("low confidence: contrast") for t in texts), texts
        for kind, objects in flagged.items():  # flagged outputs stay valid
            path = tmp_path / f"flagged-{kind}.dcm"
            objects[0].save_as(path)
            assert dciodvfy(path).errors == [], (kind, dciodvfy(path).output)
        png = tmp_path / "flagged-overlay.png"
        Image.fromarray(flagged[SC][0].pixel_array).save(png)
        print(f"flagged overlay PNG: {png}")
        assert sample(config.http_port, LOW_METRIC, **labels) == before + 1


class TestHoldAndDiscard:
    def test_hold_exports_nothing_until_release_and_discard_drops(
        self, tmp_path: Path, shipped_store: Path, storescp: StoreSCP, node_factory: Any
    ) -> None:
        config = _config(tmp_path, shipped_store, "hold", storescp)
        node = node_factory(config)
        spacing, body, good = wrong_spacing(), whole_body(), good_phantom()
        for ds in (spacing, body, good):
            _push(ds, tmp_path / "in", config.port, config.ae_title)
        held = wait_until(
            lambda: len(node.store.list_jobs(["held"])) == 2 and node.store.list_jobs(["held"]),
            what="two held jobs",
            timeout=60,
        )
        wait_until(lambda: _received(storescp, good.StudyInstanceUID), what="the good study")
        assert _received(storescp, spacing.StudyInstanceUID) == {}
        assert _received(storescp, body.StudyInstanceUID) == {}
        by_study = {j.study_uid: j for j in held}
        kept = by_study[spacing.StudyInstanceUID]
        assert kept.outcome.startswith(
            "held: low confidence (pixel spacing 4.8 mm outside training range 0.263-1.62 mm"
        ), kept.outcome
        assert f"dicom-node release {kept.id}" in kept.outcome
        wait_until(  # the job-state gauge counts them (refreshed every 2 s)
            lambda: sample(config.http_port, "dicom_node_jobs", state="held") == 2,
            what="dicom_node_jobs{state=held} = 2",
        )
        path = config_file(config, tmp_path / "node.yaml")
        status = CliRunner().invoke(cli, ["status", "--config", str(path)])
        assert f"job {kept.id} (thyroid): held: low confidence" in status.output

        released = CliRunner().invoke(cli, ["release", str(kept.id), "--config", str(path)])
        assert released.exit_code == 0, released.output
        assert f"job {kept.id} released: exporting" in released.output
        wait_until(
            lambda: len(_received(storescp, spacing.StudyInstanceUID)) == 4,
            what="the released results at storescp",
        )
        seg = _received(storescp, spacing.StudyInstanceUID)[SEG][0]
        assert seg.SeriesDescription.startswith("LOW CONFIDENCE")  # released, still flagged
        wait_until(lambda: node.store.get(kept.id).state == "done", what="released job done")

        dropped = by_study[body.StudyInstanceUID]
        gone = CliRunner().invoke(cli, ["discard", str(dropped.id), "--config", str(path)])
        assert gone.exit_code == 0, gone.output
        job = node.store.get(dropped.id)
        assert job.state == "skipped"
        assert job.outcome.startswith("discarded: low confidence (matrix 1024x256 outside training")
        again = CliRunner().invoke(cli, ["release", str(dropped.id), "--config", str(path)])
        assert again.exit_code == 1
        assert "is skipped, only held jobs can be released" in again.output
        assert _received(storescp, body.StudyInstanceUID) == {}
        events = {
            (r["event"], r.get("job"))
            for r in (json.loads(line) for line in (config.storage / "audit.log").open())
        }
        assert {("held", kept.id), ("released", kept.id), ("discarded", dropped.id)} <= events
        assert ("low_confidence", kept.id) in events

    def test_discard_rule_ends_the_job_skipped_saying_why(
        self, tmp_path: Path, shipped_store: Path, storescp: StoreSCP, node_factory: Any
    ) -> None:
        config = _config(tmp_path, shipped_store, "discard", storescp)
        node = node_factory(config)
        bad = flood_field()
        _push(bad, tmp_path / "in", config.port, config.ae_title)
        job = wait_until(
            lambda: next(iter(node.store.list_jobs(["skipped"])), None), what="a skipped job"
        )
        assert job.outcome.startswith("discarded: low confidence (contrast (99.5th percentile")
        node.wait_idle(5)
        assert _received(storescp, bad.StudyInstanceUID) == {}
