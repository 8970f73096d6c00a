"""The contract's frame reader: order, Modality LUT, colour, errors that name no UID."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_node.modelstore.frames import (
    SeriesReadError,
    modality_lut,
    read_case_folder,
    read_series,
    series_frames,
)
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series


class TestModalityLut:
    def test_ct_is_hounsfield(self, tmp_path: Path) -> None:
        series = make_ct_series(2, 16, 16)
        frames = read_series(write_series(series, tmp_path)).frames
        for frame, ds in zip(frames, series, strict=True):
            assert frame.dtype == np.float32
            np.testing.assert_array_equal(frame, ds.pixel_array.astype(np.float32) - 1024)

    def test_nm_without_rescale_keeps_stored_values(self, tmp_path: Path) -> None:
        ds = make_nm(rows=32, cols=32, seed=1)
        (frame,) = read_series(write_series([ds], tmp_path)).frames
        np.testing.assert_array_equal(frame, ds.pixel_array.astype(np.float32))

    def test_per_frame_functional_group_wins(self) -> None:
        ds = Dataset()
        item, shared = Dataset(), Dataset()
        item.PixelValueTransformationSequence = [Dataset()]
        item.PixelValueTransformationSequence[0].RescaleSlope = 2
        item.PixelValueTransformationSequence[0].RescaleIntercept = -10
        shared.PixelValueTransformationSequence = [Dataset()]
        shared.PixelValueTransformationSequence[0].RescaleSlope = 1
        shared.PixelValueTransformationSequence[0].RescaleIntercept = 5
        ds.PerFrameFunctionalGroupsSequence = [item, Dataset()]
        ds.SharedFunctionalGroupsSequence = [shared]
        out = modality_lut(ds, np.ones((2, 2, 2), np.uint16))
        assert out[0].tolist() == [[-8.0, -8.0], [-8.0, -8.0]]
        assert out[1].tolist() == [[6.0, 6.0], [6.0, 6.0]]


class TestOrder:
    def test_slice_position_not_instance_number_or_file_order(self, tmp_path: Path) -> None:
        series = make_ct_series(4, 8, 8)
        for ds, number in zip(series, (3, 1, 4, 2), strict=True):
            ds.InstanceNumber = number
        paths = write_series(series[::-1], tmp_path)
        read = read_series(paths)
        z = [float(ds.ImagePositionPatient[2]) for ds in read.sources]
        assert z == sorted(z)
        assert read.origins == [(0, 1), (1, 1), (2, 1), (3, 1)]
        assert read.spacing == (0.8, 0.8)

    def test_no_geometry_sorts_by_instance_number(self) -> None:
        a, b = make_nm(rows=8, cols=8, seed=1), make_nm(rows=8, cols=8, seed=2)
        a.InstanceNumber, b.InstanceNumber = 2, 1
        assert series_frames([a, b]).sources == [b, a]


class TestColourAndErrors:
    def test_colour_stays_multi_sample(self) -> None:
        ds = make_nm(rows=8, cols=8, seed=1)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.arange(8 * 8 * 3, dtype=np.uint8).tobytes()
        (frame,) = series_frames([ds]).frames
        assert frame.shape == (8, 8, 3) and frame.dtype == np.float32

    def test_errors_name_position_not_uid(self, tmp_path: Path) -> None:
        series = make_ct_series(2, 8, 8)
        series[1].PixelData = b"\x00"
        paths = write_series(series, tmp_path)
        with pytest.raises(
            SeriesReadError, match=r"^instance 2 of 2 \(InstanceNumber 2\): pixel"
        ) as e:
            read_series(paths)
        assert str(series[1].SOPInstanceUID) not in str(e.value)
        (tmp_path / "junk").write_bytes(b"junk")
        with pytest.raises(SeriesReadError, match=r"^instance 1 of 1: not readable as DICOM"):
            read_series([tmp_path / "junk"])

    def test_case_folder_without_image(self, tmp_path: Path) -> None:
        np.savez(tmp_path / "truth.npz", a=np.zeros(2))
        with pytest.raises(SeriesReadError, match="no DICOM image in the folder"):
            read_case_folder(tmp_path)
