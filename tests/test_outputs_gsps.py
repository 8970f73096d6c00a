"""GSPS outputs: valid under dciodvfy, graphic objects on the right images, outlines = SEG edge.

One GSPS-applied image (its VOI window and POLYLINE outlines drawn on the source frame) is
written as PNG under the test's tmp dir so a person can look.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom import Dataset

from dicom_node.outputs import build_gsps, mask_polygons
from dicom_node.seg import build_seg, output_uids
from tests.helpers.dicom_factory import make_ct_series, make_nm
from tests.helpers.peers import dciodvfy
from tests.test_outputs_overlay import ALGORITHM, SPECS, frames_of, masks_of

LOGGER = logging.getLogger(__name__)

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


def build(sources: list[Dataset]) -> tuple[Dataset, Dataset, dict[str, np.ndarray]]:
    frames = frames_of(sources)
    masks = masks_of(frames)
    seg = build_seg(sources, masks, SPECS, ALGORITHM)
    return build_gsps(sources, frames, masks, SPECS, ALGORITHM, seg), seg, masks


def round_trip(ds: Dataset, path: Path) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def fill(loops: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of loops (even-odd rule)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    x, y = cols + 0.5, rows + 0.5
    inside = np.zeros(shape, bool)
    for loop in loops:
        for (x0, y0), (x1, y1) in zip(loop[:-1], loop[1:], strict=True):
            if y0 == y1:
                continue
            crosses = ((y0 <= y) & (y < y1)) | ((y1 <= y) & (y < y0))
            at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
            inside ^= crosses & (x < at)
    return inside


class TestMaskPolygons:
    def test_square_hole_and_corner_touch(self) -> None:
        mask = np.zeros((8, 8), bool)
        mask[1:6, 1:6] = True
        mask[3, 3] = False
        mask[6, 6] = True  # touches the square at a corner only
        loops = mask_polygons(mask)
        assert len(loops) == 3
        assert all(np.array_equal(loop[0], loop[-1]) for loop in loops)
        assert np.array_equal(fill(loops, mask.shape), mask)

    def test_random_masks_are_reproduced(self) -> None:
        rng = np.random.default_rng(7)
        for _ in range(20):
            mask = rng.random((16, 16)) > 0.6
            assert np.array_equal(fill(mask_polygons(mask), mask.shape), mask)

    def test_empty_mask_has_no_outline(self) -> None:
        assert mask_polygons(np.zeros((4, 4), bool)) == []


class TestBuildGsps:
    @pytest.mark.parametrize(
        "make",
        [lambda: [make_nm()], lambda: [make_nm(frames=3, seed=3)], lambda: make_ct_series(3)],
    )
    def test_valid_under_dciodvfy(self, make: object, tmp_path: Path) -> None:
        sources = make()  # type: ignore[operator]
        gsps, seg, _ = build(sources)
        path = tmp_path / "gsps.dcm"
        back = round_trip(gsps, path)
        report = dciodvfy(path)
        assert report.errors == [], report.output
        assert back.SOPClassUID == GSPS
        assert back.StudyInstanceUID == sources[0].StudyInstanceUID
        assert back.PatientID == seg.PatientID
        referenced = {
            item.ReferencedSOPInstanceUID
            for series in back.ReferencedSeriesSequence
            for item in series.ReferencedImageSequence
        }
        assert referenced == {ds.SOPInstanceUID for ds in sources}
        assert (back.SeriesInstanceUID, back.SOPInstanceUID) == output_uids(
            "gsps", str(sources[0].SeriesInstanceUID), "thyroid", "thyroid-seg", "1"
        )

    def test_outlines_on_the_right_frames_equal_the_seg(self, tmp_path: Path) -> None:
        sources = [make_nm(frames=3, seed=3)]
        gsps, _, masks = build(sources)
        back = round_trip(gsps, tmp_path / "gsps.dcm")
        layers = {item.GraphicLayer: item for item in back.GraphicLayerSequence}
        assert {layers[f"SEGMENT_{n}"].GraphicLayerDescription for n in (1, 2)} == {
            s.label for s in SPECS
        }
        found: dict[tuple[str, int], list[np.ndarray]] = {}
        for annotation in back.GraphicAnnotationSequence:
            (image,) = annotation.ReferencedImageSequence
            assert image.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
            frame = int(image.ReferencedFrameNumber)
            for obj in annotation.get("GraphicObjectSequence", []):
                assert obj.GraphicType == "POLYLINE"
                assert obj.GraphicAnnotationUnits == "PIXEL"
                points = np.asarray(obj.GraphicData, float).reshape(-1, 2)
                found.setdefault((annotation.GraphicLayer, frame), []).append(points)
        rows, cols = int(sources[0].Rows), int(sources[0].Columns)
        for n, spec in enumerate(SPECS, 1):
            for frame in (1, 2, 3):
                loops = found.get((f"SEGMENT_{n}", frame), [])
                expected = masks[spec.key][frame - 1]
                assert np.array_equal(fill(loops, (rows, cols)), expected), (spec.key, frame)
        texts = [
            t.UnformattedTextValue
            for a in back.GraphicAnnotationSequence
            for t in a.get("TextObjectSequence", [])
        ]
        assert "AI result, not for diagnosis alone" in texts
        assert any("thyroid-seg v1" in t for t in texts)

        # a person can look: the first frame with the GSPS's window and outlines applied
        voi = back.SoftcopyVOILUTSequence[0]
        low = float(voi.WindowCenter) - float(voi.WindowWidth) / 2
        grey = np.clip((frames_of(sources)[0] - low) / float(voi.WindowWidth), 0, 1) * 255
        canvas = Image.fromarray(grey.astype(np.uint8)).convert("RGB").resize((cols * 2, rows * 2))
        draw = ImageDraw.Draw(canvas)
        for n, spec in enumerate(SPECS, 1):
            for loop in found.get((f"SEGMENT_{n}", 1), []):
                draw.line([tuple(p * 2) for p in loop], fill=spec.color, width=1)
        png = tmp_path / "gsps-applied.png"
        canvas.save(png)
        LOGGER.warning("GSPS-applied image written to %s", png)
        print(f"GSPS PNG: {png}")

    def test_nm_needs_no_functional_groups(self) -> None:
        # highdicom 0.28 reads SharedFunctionalGroupsSequence of NM unless the LUTs are passed
        gsps, _, _ = build([make_nm()])
        assert gsps.Modality == "PR"
        assert float(gsps.SoftcopyVOILUTSequence[0].WindowWidth) > 0
        assert float(gsps.RescaleSlope) == 1.0
