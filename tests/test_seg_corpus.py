"""Every real file we can get: a valid SEG for each image series, a reason for everything else.

The corpus is pydicom's bundled test files plus the ``pydicom-data`` package (the dev extra), all
written by other people's scanners and tools: CT, MR, enhanced CT/MR, CR, US (palette colour,
RGB, YBR, multi-frame), Secondary Capture (8/16/32 bit, RGB, YBR, multi-frame), NM-modality SC,
big endian, deflate, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE, plus the
downsized multi-instance CT/MR/CR series of pydicom's DICOMDIR tests. Nothing is downloaded: a
file that only exists online is simply not in the corpus.

For each image series the masks are synthetic (a threshold on the decoded pixels, per frame, and
a disc), the SEG is built the way the worker builds it (``group_sources`` then ``build_seg`` per
group) and must pass ``dciodvfy`` without errors, reference every source instance and round-trip
through pydicom and highdicom. Every other file must be recognised as not an image by
:func:`dicom_node.seg.sources.is_image`.
"""

from __future__ import annotations

import io
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import data_manager
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.modelstore.frames import decode_pixels
from dicom_node.seg import AlgorithmInfo, SegmentSpec, build_seg
from dicom_node.seg.grouping import group_sources
from dicom_node.seg.sources import frame_count, is_image
from tests.helpers.onnx_models import DEFAULT_SEGMENTS
from tests.helpers.peers import dciodvfy

ALGORITHM = AlgorithmInfo(
    model="thyroid-seg", version="1", alias="production", sha256="ab" * 32, rule="corpus"
)
SEGMENTS = [SegmentSpec.from_manifest(entry) for entry in DEFAULT_SEGMENTS]

TEST_FILES = Path(data_manager.DATA_ROOT) / "test_files"

NOT_DICOM = {
    "README.txt",
    "crayons.icc",
    "rtplan.dump",
    "rtstruct.dump",
    "test1.json",
    "test_PN.json",
    "zipMR.gz",
}
"""Files in pydicom's test folder that are not DICOM at all (pydicom's own fixtures)."""

DECODER = {
    "JPEG2000-embedded-sequence-delimiter.dcm": "decoder",
}
"""Image files whose pixel data no installed decoder reads (xfail, reason "decoder"). The
12-bit JPEG Extended ``JPEG-lossy.dcm`` decodes through the node's frame reader (GDCM)."""

BROKEN = {
    "MR_truncated.dcm": "Pixel Data shorter than Rows x Columns: the worker rejects it on decode",
    "meta_missing_tsyntax.dcm": "no Transfer Syntax UID: the pixel data cannot be interpreted",
}
"""Image files that are damaged on purpose (pydicom's error-path fixtures): excluded."""

NO_STUDY_UID = {
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jls_lossy_sample.dcm",
}
"""Images without Study Instance UID (type 1): no study to put a SEG in; build_seg refuses."""
NO_STUDY_UID_SKIP = "no Study Instance UID: build_seg refuses (test_no_study_uid_is_refused)"

INVALID_SOURCE_UIDS = {
    "bad_sequence.dcm": "UIDs are hex digests",
    "color-pl.dcm": "UIDs under the illegal root 999",
    "color-px.dcm": "UIDs under the illegal root 999",
}
SUMMARY_OF_VR_ERRORS = (
    "Error - Dicom dataset contains invalid data values for Value Representations"
)
"""Images whose own UIDs are invalid: the SEG must repeat the Study UID and reference the
instance, so dciodvfy's errors about those values are the source's; every other error counts."""


@dataclass(frozen=True)
class Case:
    """One series of the corpus (most are one file; the DICOMDIR test series have several)."""

    name: str
    paths: tuple[Path, ...]


def _corpus_paths() -> list[Path]:
    paths = [p for p in TEST_FILES.rglob("*") if p.is_file() and p.suffix != ".py"]
    for source in data_manager.external_data_sources().values():
        paths += [Path(p) for p in source.get_paths("*", data_manager.DataTypes.DATASET)]
    return sorted({p for p in paths if p.name not in NOT_DICOM and "__pycache__" not in p.parts})


def _read(path: Path) -> Dataset:
    """Read a corpus file; files without File Meta get the transfer syntax pydicom found.

    The node never stores such a file (the receiver writes File Meta from the presentation
    context), so this stands in for the receiver, not for the worker.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if ds.original_encoding[0]
            else ExplicitVRLittleEndian
            if ds.original_encoding[1]
            else ExplicitVRBigEndian
        )
    return ds


def _name(path: Path) -> str:
    try:
        return str(path.relative_to(TEST_FILES))
    except ValueError:
        return path.name


def _cases() -> tuple[list[Case], list[Case]]:
    """(image series, non-image files) of the corpus; decided by the header only."""
    series: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    images: list[Case] = []
    others: list[Case] = []
    for path in _corpus_paths():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
        except Exception:  # pydicom's own broken fixtures are for pydicom's tests
            continue
        if is_image(ds)[0]:
            if "dicomdirtests" in path.parts:  # downsized multi-instance series
                folder = str(path.parent.relative_to(TEST_FILES))
                series[(folder, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(path)
            else:
                images.append(Case(_name(path), (path,)))
        else:
            others.append(Case(_name(path), (path,)))
    by_folder: dict[str, list[list[Path]]] = defaultdict(list)
    for key in sorted(series):
        by_folder[key[0]].append(series[key])
    for folder, groups in by_folder.items():
        for number, paths in enumerate(groups, 1):
            name = folder if len(groups) == 1 else f"{folder} series {number}"
            images.append(Case(name, tuple(sorted(paths))))
    return sorted(images, key=lambda c: c.name), others


IMAGES, OTHERS = _cases()


def _param(case: Case) -> object:
    file = case.paths[0].name
    if file in NO_STUDY_UID:
        return pytest.param(case, id=case.name, marks=pytest.mark.skip(reason=NO_STUDY_UID_SKIP))
    if file in DECODER:
        return pytest.param(case, id=case.name, marks=pytest.mark.xfail(reason=DECODER[file]))
    return pytest.param(case, id=case.name)


def _frames(ds: Dataset) -> np.ndarray:
    """Decoded frames (frames, rows, cols); colour as the mean of the samples (as the worker)."""
    pixels = decode_pixels(ds, "instance 1 of 1").astype(np.float64)  # the worker's decoders
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        pixels = pixels.mean(axis=-1)
    return pixels.reshape(frame_count(ds), int(ds.Rows), int(ds.Columns))


def _masks(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Thyroid: above the 75th percentile of each frame (a disc if the frame is flat);
    nodule: a disc around the centre of the first frame."""
    n, rows, cols = frames.shape
    yy, xx = np.mgrid[:rows, :cols]
    disc = (yy - rows // 2) ** 2 + (xx - cols // 2) ** 2 <= (min(rows, cols) / 4) ** 2
    thyroid = np.stack([f > np.percentile(f, 75) for f in frames])
    thyroid[~thyroid.any(axis=(1, 2))] = disc
    nodule = np.zeros_like(thyroid)
    nodule[0] = disc
    return {"thyroid": thyroid, "nodule": nodule}


def _referenced(seg: Dataset) -> set[str]:
    return {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


def _per_frame(seg: Dataset) -> set[str]:
    return {
        str(ref.ReferencedSOPInstanceUID)
        for item in seg.PerFrameFunctionalGroupsSequence
        for derivation in item.DerivationImageSequence
        for ref in derivation.SourceImageSequence
    }


def _segment_sums(seg: Dataset) -> dict[int, int]:
    """Foreground pixels per segment number, from the SEG's own Pixel Data."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    sums: dict[int, int] = defaultdict(int)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ident = item if "SegmentIdentificationSequence" in item else shared
        sums[int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)] += int(
            frame.sum()
        )
    return dict(sums)


@pytest.mark.parametrize("case", [_param(c) for c in IMAGES if c.paths[0].name not in BROKEN])
def test_image_series_gives_valid_seg(case: Case, tmp_path: Path) -> None:
    sources = [_read(path) for path in case.paths]
    frames = np.concatenate([_frames(ds) for ds in sources])  # xfail "decoder" fails here
    masks = _masks(frames)
    groups = group_sources(sources)
    assert sum(len(g.sources) for g in groups) == len(sources)
    uids = set()
    for group in groups:
        group_masks = {key: mask[list(group.frame_indices)] for key, mask in masks.items()}
        seg = build_seg(
            list(group.sources), group_masks, SEGMENTS, ALGORITHM, group=group.uid_group
        )
        uids.add(str(seg.SOPInstanceUID))

        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        path = tmp_path / f"seg-{group.index}.dcm"
        path.write_bytes(buffer.getvalue())
        buffer.seek(0)
        back = pydicom.dcmread(buffer)
        hd.seg.Segmentation.from_dataset(back)

        report = dciodvfy(path)
        errors = report.errors
        if case.paths[0].name in INVALID_SOURCE_UIDS:
            invalid = {str(ds.StudyInstanceUID) for ds in sources} | {
                str(ds.get(k, ""))
                for ds in sources
                for k in ("SeriesInstanceUID", "SOPInstanceUID")
            }
            errors = [
                line
                for line in errors
                if not any(uid in line for uid in invalid) and line != SUMMARY_OF_VR_ERRORS
            ]
        assert errors == [], report.output
        source_uids = {str(ds.SOPInstanceUID) for ds in group.sources}
        assert _referenced(back) == source_uids
        assert _per_frame(back) == source_uids
        assert back.StudyInstanceUID == group.sources[0].StudyInstanceUID
        expected = {
            number: int(group_masks[spec.key].sum()) for number, spec in enumerate(SEGMENTS, 1)
        }
        assert _segment_sums(back) == {n: total for n, total in expected.items() if total}
    assert len(uids) == len(groups)


@pytest.mark.parametrize("name", sorted(NO_STUDY_UID))
def test_no_study_uid_is_refused(name: str) -> None:
    [case] = [c for c in IMAGES if c.paths[0].name == name]
    sources = [_read(path) for path in case.paths]
    masks = _masks(np.concatenate([_frames(ds) for ds in sources]))
    with pytest.raises(ValueError, match="source instance lacks StudyInstanceUID"):
        build_seg(sources, masks, SEGMENTS, ALGORITHM)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in OTHERS])
def test_non_image_is_recognised(case: Case) -> None:
    ds = pydicom.dcmread(case.paths[0], force=True)
    ok, reason = is_image(ds)
    assert not ok
    assert reason


def test_corpus_covers_what_the_node_accepts() -> None:
    """Guard against a corpus that silently shrinks (e.g. pydicom-data not installed)."""
    modalities: set[str] = set()
    syntaxes: set[str] = set()
    for case in IMAGES:
        ds = pydicom.dcmread(case.paths[0], stop_before_pixels=True, force=True)
        modalities.add(str(ds.get("Modality", "")))
        syntaxes.add(str(getattr(ds.file_meta, "TransferSyntaxUID", "")))
    assert {"CT", "MR", "US", "CR", "OT", "NM"} <= modalities
    assert len(syntaxes) >= 10
    assert len(IMAGES) >= 100
