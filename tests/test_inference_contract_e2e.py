"""The manifest's inference settings through a running node, against training's ``evaluate``.

A real (left/right asymmetric) ONNX model whose manifest declares ``tta:`` and ``postprocess:``
is served by a node; the SEG the PACS (DCMTK ``storescp``) receives for a CT series holds exactly
the masks ``evaluate``'s :func:`~training.evaluate.predict_case` computes on the same files.
With ``probabilities: true`` the SEG of an NM image is FRACTIONAL (probability, 0-255), valid
under ``dciodvfy``, and highdicom reads back the runner's probabilities to 1/255, while the
overlay and the report beside it are built from the thresholded, post-processed masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.jobs import JobState
from dicom_node.modelstore import ModelRunner, read_series
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.onnx_models import write_yaml
from tests.helpers.peers import StoreSCP, dciodvfy, storescu
from tests.helpers.waiting import wait_until
from tests.test_modelstore_postprocess import (
    resolved_version,
    test_image,
    write_asymmetric_version,
)

SLICES = 3

RULE = """\
rules:
  - name: everything
    when:
      Modality: {exists: true}
    complete: {instances: %(instances)d}
    model: asym@production
    send_to: [pacs]
    outputs: [%(outputs)s]
"""

STEPS = [
    {"op": "min_size", "segment": "nodule", "pixels": 60},
    {"op": "largest_component", "segment": "thyroid", "keep": 1, "connectivity": "3d"},
    {"op": "fill_holes", "segment": "thyroid", "where": "nodule"},
    {"op": "within", "segment": "nodule", "of": "thyroid"},
]


@pytest.fixture
def pacs() -> Any:
    with StoreSCP() as scp:
        yield scp


def _store(root: Path, **manifest: Any) -> Path:
    folder = write_asymmetric_version(root / "asym", **manifest)
    write_yaml(root / "asym" / "aliases.yaml", {"production": "1"})
    return folder


def _ct_case(folder: Path) -> list[Path]:
    """A CT series whose slices are :func:`test_image` frames, with an (empty) truth."""
    series = make_ct_series(SLICES, 64, 64, seed="pp-ct")
    for index, ds in enumerate(series):
        ds.PixelData = test_image(10 + index).astype(np.int16).tobytes()
    files = write_series(series, folder)
    empty = np.zeros((SLICES, 64, 64), bool)
    np.savez(folder / "truth.npz", thyroid=empty, nodule=empty)
    return files


def _done(node: Any) -> Any:
    (job,) = wait_until(
        lambda: [j for j in node.store.list_jobs() if j.state in (JobState.DONE, JobState.FAILED)],
        timeout=60,
        what="the job to finish",
    )
    assert job.state is JobState.DONE, job
    return job


def _seg_pixels(path: Path, sources: list[Any], **options: Any) -> np.ndarray:
    """Segments 1, 2 of the SEG on ``sources`` (frame order): (F, H, W, 2)."""
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[1, 2],
        combine_segments=False,
        **options,
    )


def test_node_seg_masks_equal_evaluate_masks_with_tta_and_postprocess(
    tmp_path: Path, node_factory: Any, pacs: StoreSCP
) -> None:
    from training.data import SegmentRef, load_dataset
    from training.evaluate import predict_case, predict_case_details

    folder = _store(tmp_path / "models", tta=["flip_lr"], postprocess=STEPS)
    files = _ct_case(tmp_path / "cases" / "ct1")
    write_rules(tmp_path / "rules", RULE % {"instances": SLICES, "outputs": "seg"})
    node = node_factory(make_config(tmp_path, tmp_path / "models", tmp_path / "rules", pacs.port))
    assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
    _done(node)
    (seg_path,) = pacs.received()
    assert dciodvfy(seg_path).errors == []
    assert pydicom.dcmread(seg_path).SegmentationType == "BINARY"

    refs = [SegmentRef("thyroid", "Thyroid"), SegmentRef("nodule", "Cold nodule")]
    (case,), _ = load_dataset(tmp_path / "cases", refs)
    resolved = resolved_version(folder)
    runner = ModelRunner(threads=1)
    evaluated = predict_case(runner, resolved, case)
    served = _seg_pixels(seg_path, read_series(files).sources).astype(bool)
    for k, key in enumerate(("thyroid", "nodule")):
        np.testing.assert_array_equal(served[..., k], np.stack([m[key] for m in evaluated]))
    # the declared steps really changed the masks (on both sides, then)
    details = predict_case_details(runner, resolved, case)
    for key in ("thyroid", "nodule"):
        raw = np.stack([m[key] for m in details.thresholded])
        assert not np.array_equal(raw, served[..., ("thyroid", "nodule").index(key)]), key


def test_probabilities_give_a_fractional_seg_of_the_runners_probabilities(
    tmp_path: Path, node_factory: Any, pacs: StoreSCP
) -> None:
    folder = _store(tmp_path / "models", tta=["flip_lr"], probabilities=True, postprocess=STEPS)
    nm = make_nm(64, 64, seed="pp-nm", pixels=test_image(20).astype(np.uint16))
    files = write_series([nm], tmp_path / "in")
    write_rules(tmp_path / "rules", RULE % {"instances": 1, "outputs": "seg"})
    node = node_factory(make_config(tmp_path, tmp_path / "models", tmp_path / "rules", pacs.port))
    assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
    _done(node)
    (seg_path,) = pacs.received()
    report = dciodvfy(seg_path)
    assert report.errors == [], report.output
    seg = pydicom.dcmread(seg_path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "PROBABILITY"
    assert int(seg.MaximumFractionalValue) == 255

    series = read_series(files)
    made = ModelRunner(threads=1).predict(
        resolved_version(folder), series.frames, spacing=series.spacing
    )
    stored = _seg_pixels(seg_path, series.sources, dtype=np.float32)
    (probs,) = made.probabilities or []
    for k, key in enumerate(("thyroid", "nodule")):
        np.testing.assert_allclose(stored[0, ..., k], probs[key], atol=0.5 / 255 + 1e-6)
    # the probabilities are the model's (before postprocess), not the binary masks
    assert ((stored > 0.05) & (stored < 0.95)).any()


def test_outputs_beside_a_fractional_seg_come_from_the_masks(
    tmp_path: Path, node_factory: Any, pacs: StoreSCP
) -> None:
    _store(tmp_path / "models", probabilities=True, postprocess=STEPS)
    nm = make_nm(64, 64, seed="pp-out", pixels=test_image(21).astype(np.uint16))
    files = write_series([nm], tmp_path / "in")
    write_rules(tmp_path / "rules", RULE % {"instances": 1, "outputs": "seg, overlay, report"})
    node = node_factory(make_config(tmp_path, tmp_path / "models", tmp_path / "rules", pacs.port))
    assert storescu(files, node.config.port, "DICOMNODE").returncode == 0
    _done(node)
    received = {str(pydicom.dcmread(p).Modality): p for p in pacs.received()}
    assert set(received) >= {"SEG", "SR"} and len(received) == 3  # + the overlay image
    for path in received.values():
        report = dciodvfy(path)
        assert report.errors == [], (path.name, report.output)
    assert pydicom.dcmread(received["SEG"]).SegmentationType == "FRACTIONAL"
    # the report measures the thresholded, post-processed masks, not the probability maps
    series = read_series(files)
    made = ModelRunner(threads=1).predict(
        resolved_version(tmp_path / "models" / "asym" / "1"), series.frames, spacing=series.spacing
    )
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(received["SR"]))
    areas = {
        group.finding_type.value: {m.name.meaning: m for m in group.get_measurements()}["Area"]
        for group in sr.content.get_volumetric_roi_measurement_groups()
    }
    pixel_mm2 = float(series.spacing[0]) * float(series.spacing[1])
    (masks,) = made.masks
    (raw,) = made.thresholded
    assert masks["nodule"].sum() != raw["nodule"].sum()  # the steps changed the nodule mask
    for key, code in (("thyroid", "69748006"), ("nodule", "27925004")):
        assert areas[code].value == pytest.approx(masks[key].sum() * pixel_mm2), key
