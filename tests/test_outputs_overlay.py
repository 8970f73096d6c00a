"""Overlay outputs: valid Secondary Capture under dciodvfy, contours where the SEG has its edge.

Every object is written to BytesIO and read back before asserting, and written to a file for
dciodvfy. One overlay is also written as PNG under the test's tmp dir so a person can look.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset

from dicom_node.modelstore.manifest import DEFAULT_SEGMENT_COLORS, parse_manifest
from dicom_node.outputs import (
    DISCLAIMER,
    OutputKind,
    build_overlays,
    measure,
    parse_outputs,
    render_overlay,
)
from dicom_node.outputs.overlay import (
    LEGEND_MARGIN,
    LEGEND_WIDTH,
    LINE_HEIGHT,
    contour,
    legend_lines,
    overlay_scale,
    window,
)
from dicom_node.routing.rules import OUTPUT_NAMES
from dicom_node.seg import AlgorithmInfo, SegmentSpec, build_seg, output_uids, seg_uids
from tests.helpers.dicom_factory import make_ct_series, make_nm, make_sc
from tests.helpers.onnx_models import DEFAULT_SEGMENTS, manifest_dict
from tests.helpers.peers import dciodvfy

LOGGER = logging.getLogger(__name__)

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ALGORITHM = AlgorithmInfo(
    model="thyroid-seg", version="1", alias="production", sha256="ab" * 32, rule="thyroid"
)
SPECS = [SegmentSpec.coerce(s) for s in DEFAULT_SEGMENTS]


def frames_of(sources: list[Dataset]) -> list[np.ndarray]:
    """Source frames in mask order, as float (the worker's SeriesFrames.frames)."""
    out: list[np.ndarray] = []
    for ds in sources:
        pixels = ds.pixel_array.astype(np.float32)
        out.extend(pixels.reshape(-1, int(ds.Rows), int(ds.Columns)))
    return out


def masks_of(frames: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Thyroid: the brightest tenth of each frame; nodule: a square inside it on frame 0."""
    stack = np.stack(frames)
    thyroid = np.stack([f > np.percentile(f, 90) for f in stack])
    nodule = np.zeros_like(thyroid)
    rows, cols = stack.shape[1:]
    nodule[0, rows // 3 : rows // 3 + 8, cols // 3 : cols // 3 + 8] = True
    return {"thyroid": thyroid, "nodule": nodule}


def round_trip(ds: Dataset, path: Path) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def build(sources: list[Dataset]) -> tuple[list[Dataset], Dataset, dict[str, np.ndarray]]:
    frames = frames_of(sources)
    masks = masks_of(frames)
    seg = build_seg(sources, masks, SPECS, ALGORITHM)
    return build_overlays(sources, frames, masks, SPECS, ALGORITHM, seg), seg, masks


SOURCES = {
    "nm-1-frame": lambda: [make_nm()],
    "nm-3-frames": lambda: [make_nm(frames=3, seed=3)],
    "nm-64": lambda: [make_nm(rows=64, cols=64, seed=5)],
    "sc": lambda: [make_sc()],
    "ct-3-slices": lambda: make_ct_series(3),
}


class TestBuildOverlays:
    @pytest.mark.parametrize("name", sorted(SOURCES))
    def test_valid_secondary_capture_per_frame(self, name: str, tmp_path: Path) -> None:
        sources = SOURCES[name]()
        overlays, seg, _ = build(sources)
        n_frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in sources)
        assert len(overlays) == n_frames
        series = {str(o.SeriesInstanceUID) for o in overlays}
        assert len(series) == 1
        for index, overlay in enumerate(overlays):
            path = tmp_path / f"overlay-{index}.dcm"
            back = round_trip(overlay, path)
            report = dciodvfy(path)
            assert report.errors == [], report.output
            assert back.SOPClassUID == SC_STORAGE
            assert back.PhotometricInterpretation == "RGB"
            assert back.SamplesPerPixel == 3
            assert back.StudyInstanceUID == sources[0].StudyInstanceUID
            assert back.PatientID == seg.PatientID
            assert back.SeriesInstanceUID not in (
                sources[0].SeriesInstanceUID,
                seg.SeriesInstanceUID,
            )
            assert back.InstanceNumber == index + 1
            assert "not for diagnosis alone" in back.SeriesDescription
            (item,) = back.SourceImageSequence
            assert item.ReferencedSOPInstanceUID in {ds.SOPInstanceUID for ds in sources}

    def test_source_image_sequence_names_each_frame(self, tmp_path: Path) -> None:
        sources = [make_nm(frames=3, seed=3)]
        overlays, _, _ = build(sources)
        refs = [
            (
                o.SourceImageSequence[0].ReferencedSOPInstanceUID,
                o.SourceImageSequence[0].ReferencedFrameNumber,
            )
            for o in overlays
        ]
        assert refs == [(sources[0].SOPInstanceUID, n) for n in (1, 2, 3)]

    def test_single_frame_class_reference_has_no_frame_number(self) -> None:
        overlays, _, _ = build(make_ct_series(2))
        assert all("ReferencedFrameNumber" not in o.SourceImageSequence[0] for o in overlays)

    def test_contour_colour_where_the_seg_has_its_boundary(self, tmp_path: Path) -> None:
        sources = [make_nm(rows=64, cols=64, seed=5)]
        overlays, seg, masks = build(sources)
        back = round_trip(overlays[0], tmp_path / "overlay.dcm")
        pixels = back.pixel_array
        scale = overlay_scale(64, 64)
        assert scale == 4 and pixels.shape[1] == 64 * scale
        # the segments as the PACS has them: the SEG's own pixels, read back
        read = hd.seg.Segmentation.from_dataset(round_trip(seg, tmp_path / "seg.dcm"))
        stored = {
            spec.key: read.get_pixels_by_source_frame(
                source_sop_instance_uid=sources[0].SOPInstanceUID,
                source_frame_numbers=[1],
                segment_numbers=[n],
                combine_segments=False,
                skip_overlap_checks=True,
            )[0, :, :, 0].astype(bool)
            for n, spec in enumerate(SPECS, 1)
        }
        assert np.array_equal(stored["thyroid"], masks["thyroid"][0])
        thyroid_edge = contour(stored["thyroid"])
        nodule_edge = contour(stored["nodule"])
        image = pixels[: 64 * scale, :, :]
        sampled = image[scale // 2 :: scale, scale // 2 :: scale]  # one pixel per source pixel
        assert np.all(sampled[nodule_edge] == SPECS[1].color)
        only_thyroid = thyroid_edge & ~nodule_edge
        assert only_thyroid.any()
        assert np.all(sampled[only_thyroid] == SPECS[0].color)
        inside = stored["thyroid"] & ~thyroid_edge & ~nodule_edge
        grey = sampled[inside]
        assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])
        png = tmp_path / "overlay.png"
        Image.fromarray(pixels).save(png)
        LOGGER.warning("overlay written to %s", png)
        print(f"overlay PNG: {png}")

    def test_rerun_replaces_same_uids_and_other_kind_differs(self) -> None:
        sources = [make_nm(frames=2, seed=2)]
        first, seg, _ = build(sources)
        again, _, _ = build(sources)
        assert [o.SOPInstanceUID for o in first] == [o.SOPInstanceUID for o in again]
        series, sop0 = output_uids(
            "overlay", str(sources[0].SeriesInstanceUID), "thyroid", "thyroid-seg", "1"
        )
        assert first[0].SeriesInstanceUID == series and first[0].SOPInstanceUID == sop0
        assert series != seg.SeriesInstanceUID
        assert series not in seg_uids(
            str(sources[0].SeriesInstanceUID), "thyroid", "thyroid-seg", "1"
        )
        report_series, _ = output_uids(
            "report", str(sources[0].SeriesInstanceUID), "thyroid", "thyroid-seg", "1"
        )
        assert report_series != series

    def test_frame_count_mismatch_is_refused(self) -> None:
        sources = [make_nm(frames=2, seed=2)]
        frames = frames_of(sources)
        masks = masks_of(frames)
        seg = build_seg(sources, masks, SPECS, ALGORITHM)
        with pytest.raises(ValueError, match=r"one array per source frame \(2\), got 1"):
            build_overlays(sources, frames[:1], masks, SPECS, ALGORITHM, seg)


class TestRender:
    def test_legend_lines_and_scale(self) -> None:
        frame = np.zeros((32, 32), np.float32)
        mask = np.zeros((32, 32), bool)
        mask[8:16, 8:16] = True
        legend = [(DISCLAIMER, None), ("thyroid-seg v1", None), ("Thyroid: 1 mm2", (255, 0, 0))]
        out = render_overlay(frame, [(SPECS[0], mask)], legend)
        assert out.scale == 8 and out.image_rows == 256
        assert out.pixels.shape[0] > out.image_rows  # legend panel below the image
        panel = out.pixels[out.image_rows :]
        assert (panel.min(axis=-1) > 150).any()  # white (anti-aliased) text was drawn
        assert (panel == (255, 0, 0)).all(axis=-1).any()  # the swatch

    def test_contour_of_a_square_and_the_edge(self) -> None:
        mask = np.zeros((6, 6), bool)
        mask[1:5, 1:5] = True
        edge = contour(mask)
        assert edge.sum() == 12 and not edge[2:4, 2:4].any()
        full = contour(np.ones((3, 3), bool))
        assert full.sum() == 8  # the image edge counts as outside

    def test_window_uses_window_values_when_present(self) -> None:
        source = Dataset()
        source.WindowCenter, source.WindowWidth = 100, 200
        out = window(np.array([[0.0, 100.0, 200.0, 500.0]]), source)
        assert out.tolist() == [[0, 128, 255, 255]]


class TestMeasure:
    def test_area_from_pixel_spacing_and_sums(self) -> None:
        sources = [make_nm(rows=64, cols=64, seed=5)]
        frames = frames_of(sources)
        masks = masks_of(frames)
        values = measure(sources, frames, masks, SPECS)
        spacing = [float(v) for v in sources[0].PixelSpacing]
        nodule = values[1]
        assert nodule.pixels == 64
        assert nodule.area_mm2 == pytest.approx(64 * spacing[0] * spacing[1])
        assert nodule.volume_ml is None
        assert nodule.intensity_sum == pytest.approx(float(frames[0][masks["nodule"][0]].sum()))
        assert "mm2" in nodule.summary() and "(64 px)" in nodule.summary()

    def test_volume_for_slices(self) -> None:
        sources = make_ct_series(3)
        frames = frames_of(sources)
        masks = masks_of(frames)
        values = measure(sources, frames, masks, SPECS)
        assert values[0].area_mm2 is None and values[0].volume_ml is not None
        assert values[1].intensity_mean is None or values[1].pixels > 0


class TestOutputNames:
    def test_routing_vocabulary_equals_output_kinds(self) -> None:
        assert OUTPUT_NAMES == tuple(k.value for k in OutputKind)

    def test_parse_outputs(self) -> None:
        assert parse_outputs(["seg", "Overlay", "seg"]) == (OutputKind.SEG, OutputKind.OVERLAY)
        with pytest.raises(ValueError, match="unknown output 'sr'; allowed: seg, overlay"):
            parse_outputs(["sr"])
        with pytest.raises(TypeError, match="outputs must be a list"):
            parse_outputs("seg")


class TestManifestColors:
    def test_segments_without_color_get_distinct_defaults(self) -> None:
        data = manifest_dict()
        for seg in data["segments"]:
            seg.pop("color")
        manifest = parse_manifest(data)
        colors = [s.color for s in manifest.segments]
        assert colors == list(DEFAULT_SEGMENT_COLORS[:2])
        given = manifest_dict()
        assert [tuple(s["color"]) for s in given["segments"]] == [
            s.color for s in parse_manifest(given).segments
        ]


class TestLegendMeasurements:
    """The legend shows the report's numbers: one measurement, given to both builders."""

    def test_legend_equals_the_reports_numbers(self, tmp_path: Path) -> None:
        # imported here: test_outputs_measurements imports this module (ALGORITHM, SPECS)
        from pydicom.sr.codedict import codes

        from dicom_node.outputs import build_report
        from tests.test_outputs_measurements import PLAN, paired

        ds = make_nm(rows=64, cols=64)  # anterior view: the patient's left on the image's right
        frame, masks = paired()
        frame = frame * 40.0 + np.random.default_rng(7).poisson(3.0, frame.shape)
        seg = build_seg([ds], masks, SPECS, ALGORITHM)
        values = measure([ds], [frame], masks, SPECS, PLAN)  # once, as the worker does
        (overlay,) = build_overlays(
            [ds], [frame], masks, SPECS, ALGORITHM, seg, measurements=values
        )
        report = build_report([ds], seg, values, ALGORITHM)
        overlay_back = round_trip(overlay, tmp_path / "overlay.dcm")
        sr_back = round_trip(report, tmp_path / "sr.dcm")
        for name in ("overlay.dcm", "sr.dcm"):
            result = dciodvfy(tmp_path / name)
            assert result.errors == [], result.output
        sr = hd.sr.Comprehensive3DSR.from_dataset(sr_back)
        groups = {
            g.referenced_segment.referenced_segment_numbers[0]: g
            for g in sr.content.get_volumetric_roi_measurement_groups()
        }
        legend = str(overlay_back.ImageComments).splitlines()
        assert legend[:2] == [DISCLAIMER, "thyroid-seg v1"]

        def line(prefix: str) -> str:
            found = [text for text in legend if text.strip().startswith(prefix)]
            assert len(found) == 1, (prefix, legend)
            return found[0].strip()

        # the thyroid: area, counts, and the lobar split, as the SR has them
        thyroid = {m.name.meaning: m for m in groups[1].get_measurements() if not m.finding_sites}
        shares = {
            m.finding_sites[0].laterality.meaning: m.value
            for m in groups[1].get_measurements()
            if m.name == codes.SCT.Ratio
        }
        assert shares["Left"] > 70.0 and shares["Left"] + shares["Right"] == pytest.approx(100)
        area = float(thyroid["Area"].value)
        assert line("Thyroid:") == f"Thyroid: {area:.1f} mm2 ({values[0].pixels} px)"
        total, mean = float(thyroid["Total"].value), float(thyroid["Mean"].value)
        head = legend.index(next(t for t in legend if t.startswith("Thyroid:")))
        assert legend[head + 1].strip() == f"sum {total:.1f}, mean {mean:.1f} counts"
        assert (
            line("left ") == f"left {shares['Left']:.1f}% / right {shares['Right']:.1f}% of counts"
        )
        # the nodules: their count, and per component the size and diameter of its SR group
        (count,) = [m for m in groups[2].get_measurements() if m.name.value == "246206008"]
        assert line(f"{int(count.value)} component(s)") == "2 component(s)"
        planar = sr.content.get_planar_roi_measurement_groups()
        assert len(planar) == 2
        for n, group in enumerate(planar, 1):
            got = {m.name.meaning: float(m.value) for m in group.get_measurements()}
            assert line(f"#{n} ") == f"#{n} {got['Area']:.1f} mm2, d {got['Diameter']:.1f} mm"
        # every legend line is drawn in the panel below the image, one text band each
        pixels = overlay_back.pixel_array
        scale = overlay_scale(64, 64)
        image_rows = 64 * scale
        assert pixels.shape[0] == image_rows + 2 * LEGEND_MARGIN + LINE_HEIGHT * len(legend)
        for n in range(len(legend)):
            top = image_rows + LEGEND_MARGIN + n * LINE_HEIGHT
            band = pixels[top : top + LINE_HEIGHT]
            assert (band.min(axis=-1) > 150).any(), f"legend line {n} not drawn: {legend[n]!r}"
        # and the image still shows the contours where the SEG (as read back) has its boundary
        read = hd.seg.Segmentation.from_dataset(round_trip(seg, tmp_path / "seg.dcm"))
        stored = read.get_pixels_by_source_frame(
            source_sop_instance_uid=ds.SOPInstanceUID,
            source_frame_numbers=[1],
            combine_segments=False,
            skip_overlap_checks=True,
        )[0].astype(bool)
        sampled = pixels[:image_rows][scale // 2 :: scale, scale // 2 :: scale]
        nodule_edge = contour(stored[:, :, 1])
        assert nodule_edge.any() and np.all(sampled[nodule_edge] == SPECS[1].color)
        thyroid_edge = contour(stored[:, :, 0]) & ~nodule_edge
        assert thyroid_edge.any() and np.all(sampled[thyroid_edge] == SPECS[0].color)
        png = tmp_path / "overlay-measurements.png"
        Image.fromarray(pixels).save(png)
        print(f"overlay PNG: {png}")

    def test_missing_split_says_why_and_many_frames_say_so(self) -> None:
        from tests.test_outputs_measurements import PLAN, paired

        ds = make_nm(rows=64, cols=64, frames=2, seed=1)
        del ds.DetectorInformationSequence[0].ViewCodeSequence
        frame, masks = paired()
        frames = [frame, frame]
        two = {k: np.repeat(v, 2, axis=0) for k, v in masks.items()}
        values = measure([ds], frames, two, SPECS, PLAN)
        lines = [t for t, _ in legend_lines(ALGORITHM, values, SPECS, modality="NM", n_frames=2)]
        assert "measured over all 2 frames (as the SR)" in lines
        why = " ".join(t.strip() for t in lines)
        assert "no left/right split: patient orientation unknown" in why
        assert any(t.strip().startswith("#1 ") and t.endswith(", frame 1") for t in lines)
        assert all(len(t) <= LEGEND_WIDTH for t in lines)
