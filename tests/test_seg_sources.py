"""The synthetic sources the SEG tests (and everyone else) build on are valid DICOM themselves."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from tests.helpers.dicom_factory import (
    NM_IMAGE_STORAGE,
    make_ct_series,
    make_mr_series,
    make_nm,
    make_sc,
    thyroid_blob,
    write_series,
)
from tests.helpers.peers import dciodvfy

FACTORIES: dict[str, Callable[[], list[Dataset]]] = {
    "nm": lambda: [make_nm()],
    "nm-3-frames": lambda: [make_nm(frames=3)],
    "sc": lambda: [make_sc()],
    "ct": lambda: make_ct_series(3),
    "mr": lambda: make_mr_series(3),
}


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class TestFactories:
    @pytest.mark.parametrize("kind", sorted(FACTORIES))
    def test_dciodvfy_clean(self, kind: str, tmp_path: Path) -> None:
        for path in write_series(FACTORIES[kind](), tmp_path):
            report = dciodvfy(path)
            assert report.errors == [], report.output
            assert report.warnings == [], report.output

    @pytest.mark.parametrize("kind", sorted(FACTORIES))
    def test_deterministic(self, kind: str) -> None:
        first = [_bytes(ds) for ds in FACTORIES[kind]()]
        again = [_bytes(ds) for ds in FACTORIES[kind]()]
        assert first == again

    def test_seed_changes_uids_and_pixels(self) -> None:
        a, b = make_nm(seed=1), make_nm(seed=2)
        assert a.StudyInstanceUID != b.StudyInstanceUID
        assert a.SOPInstanceUID != b.SOPInstanceUID
        assert not np.array_equal(a.pixel_array, b.pixel_array)

    def test_nm_header(self) -> None:
        ds = pydicom.dcmread(io.BytesIO(_bytes(make_nm(frames=2))))
        assert ds.SOPClassUID == NM_IMAGE_STORAGE
        assert (ds.Modality, ds.BodyPartExamined, int(ds.NumberOfFrames)) == ("NM", "THYROID", 2)
        assert "thyroid" in ds.StudyDescription.lower()
        assert ds.pixel_array.shape == (2, 256, 256)
        assert ds.pixel_array.dtype == np.uint16

    def test_overrides_set_and_delete(self) -> None:
        ds = make_nm(Modality="OT", StudyDescription=None)
        assert ds.Modality == "OT"
        assert "StudyDescription" not in ds

    def test_series_share_study_when_asked(self) -> None:
        nm = make_nm(seed=5)
        ct = make_ct_series(2, study_uid=nm.StudyInstanceUID, seed=5)
        assert {ds.StudyInstanceUID for ds in ct} == {nm.StudyInstanceUID}
        assert ct[0].SeriesInstanceUID != nm.SeriesInstanceUID
        assert ct[0].FrameOfReferenceUID == ct[1].FrameOfReferenceUID

    def test_pixels_shape_checked(self) -> None:
        with pytest.raises(ValueError, match=r"pixels must have shape \(2, 8, 8\)"):
            make_nm(rows=8, cols=8, frames=2, pixels=np.zeros((8, 8), np.uint16))


class TestThyroidBlob:
    def test_two_bright_lobes_on_low_background(self) -> None:
        image = thyroid_blob(256, 256, np.random.default_rng(0))
        assert image.dtype == np.uint16
        assert np.median(image) < 30
        bright = image > 200
        left, right = bright[:, :128].sum(), bright[:, 128:].sum()
        assert left > 500 and right > 500
