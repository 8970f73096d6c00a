"""FRACTIONAL (probability) SEGs: valid under dciodvfy on both build paths, values read back.

``build_seg(..., probabilities=...)`` is what the worker calls for a manifest with
``probabilities: true``: multi-frame NM (the frame-referenced path this package encodes itself)
and a CT series (highdicom's spatial path) must both give Maximum Fractional Value 255 and the
probabilities to 1/255 when highdicom reads the file back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.seg import AlgorithmInfo, SegmentSpec, build_seg
from tests.helpers.dicom_factory import make_ct_series, make_nm
from tests.helpers.onnx_models import DEFAULT_SEGMENTS
from tests.helpers.peers import dciodvfy

SEGMENTS = [SegmentSpec.from_manifest(s) for s in DEFAULT_SEGMENTS]
ALGORITHM = AlgorithmInfo(model="m", version="1", alias=None, sha256="0" * 64, rule="r")


def _sources(kind: str) -> list[Any]:
    if kind == "nm":
        return [make_nm(32, 32, frames=2, seed="frac-nm")]
    return make_ct_series(3, 32, 32, seed="frac-ct")


@pytest.mark.parametrize("kind", ["nm", "ct"])
def test_fractional_seg_is_valid_and_holds_the_probabilities(tmp_path: Path, kind: str) -> None:
    sources = _sources(kind)
    n = 2 if kind == "nm" else 3
    rng = np.random.default_rng(0)
    probs = {
        "thyroid": rng.random((n, 32, 32)).astype(np.float32),
        "nodule": np.zeros((n, 32, 32), np.float32),
    }
    probs["nodule"][0, 4:9, 4:9] = 0.7  # one frame with a nodule; the others all 0
    masks = {key: value > 0.5 for key, value in probs.items()}
    seg = build_seg(sources, masks, SEGMENTS, ALGORITHM, probabilities=probs)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)

    report = dciodvfy(path)
    assert report.errors == [], report.output
    raw = pydicom.dcmread(path)
    assert raw.SegmentationType == "FRACTIONAL"
    assert raw.SegmentationFractionalType == "PROBABILITY"
    assert int(raw.MaximumFractionalValue) == 255 and int(raw.BitsAllocated) == 8
    read = hd.seg.segread(path)
    options: dict[str, Any] = {
        "segment_numbers": [1, 2],
        "combine_segments": False,
        "dtype": np.float32,
    }
    if kind == "nm":  # one multi-frame source: its frames by number
        back = read.get_pixels_by_source_frame(
            source_sop_instance_uid=str(sources[0].SOPInstanceUID),
            source_frame_numbers=list(range(1, n + 1)),
            **options,
        )
    else:
        back = read.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources], **options
        )
    for k, key in enumerate(("thyroid", "nodule")):
        np.testing.assert_allclose(back[..., k], probs[key], atol=0.5 / 255 + 1e-6)


def test_probabilities_must_match_the_masks_shape() -> None:
    sources = _sources("ct")
    masks = {s.key: np.zeros((3, 32, 32), bool) for s in SEGMENTS}
    wrong = {s.key: np.zeros((3, 16, 16), np.float32) for s in SEGMENTS}
    with pytest.raises(ValueError, match=r"probabilities\['thyroid'\] must have shape"):
        build_seg(sources, masks, SEGMENTS, ALGORITHM, probabilities=wrong)
    nan = {s.key: np.full((3, 32, 32), np.nan, np.float32) for s in SEGMENTS}
    with pytest.raises(ValueError, match="NaN or infinite"):
        build_seg(sources, masks, SEGMENTS, ALGORITHM, probabilities=nan)
