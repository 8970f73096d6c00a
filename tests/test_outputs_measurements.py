"""The measurement set a manifest declares (``measurements:``), measured and reported.

Synthetic images whose answer is known: a "paired organ" of two blobs with different counts and a
thin bridge, seen in an anterior view (the patient's left on the image's right), a posterior
view (on the image's left), with PatientOrientation, and as an axial CT slice series; "nodules"
of known size. The SR is written, validated with dciodvfy and read back with highdicom's SR
parsing: measurements present, units UCUM, the segment groups resolving to the SEG's segments,
the component groups outlined on the right source frame, the two sides adding up to 100 %.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from ruamel.yaml import YAML

from dicom_node.modelstore import ManifestError, parse_manifest
from dicom_node.modelstore.measureplan import SegmentMeasurements
from dicom_node.outputs import build_report, measure
from dicom_node.outputs.measurements import patient_left_side, split_column
from dicom_node.seg import build_seg
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.peers import Orthanc, dciodvfy, storescu
from tests.helpers.waiting import wait_until
from tests.test_outputs_overlay import ALGORITHM, SPECS

PLAN = {
    "thyroid": SegmentMeasurements(laterality="split"),
    "nodule": SegmentMeasurements(components=True, min_component_pixels=2),
}

IMAGE_LEFT_COUNTS, IMAGE_RIGHT_COUNTS = 1.0, 3.0


def paired(rows: int = 64, cols: int = 64) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One frame: a lobe on the image's left (300 px of 1 count), one on its right (300 px of
    3 counts), a bridge of no counts between; two nodules (48 px and 16 px) and one pixel."""
    frame = np.zeros((rows, cols))
    gland = np.zeros((1, rows, cols), bool)
    gland[0, 20:40, 10:25] = True
    frame[20:40, 10:25] = IMAGE_LEFT_COUNTS
    gland[0, 20:40, 35:50] = True
    frame[20:40, 35:50] = IMAGE_RIGHT_COUNTS
    gland[0, 30:32, 25:35] = True  # the isthmus, no counts
    nodule = np.zeros_like(gland)
    nodule[0, 30:38, 40:46] = True  # 48 px, in the image-right lobe
    nodule[0, 22:26, 12:16] = True  # 16 px
    nodule[0, 50, 50] = True  # 1 px: below min_component_pixels
    return frame, {"thyroid": gland, "nodule": nodule}


def with_view(ds: Dataset, code: str, meaning: str) -> Dataset:
    item = ds.DetectorInformationSequence[0].ViewCodeSequence[0]
    item.CodeValue, item.CodeMeaning = code, meaning
    return ds


def sides(ds: Dataset) -> dict[str, float]:
    frame, masks = paired()
    thyroid = measure([ds], [frame], masks, SPECS, PLAN)[0]
    assert thyroid.sides is not None, thyroid.laterality
    return {s.side: s.share_percent for s in thyroid.sides}


class TestManifest:
    def manifest(self, **extra: object) -> dict:
        return {
            "name": "m",
            "version": "1",
            "sha256": "ab" * 32,
            "input": {"name": "x", "size": [64, 64]},
            "output": {"name": "y"},
            "segments": [
                {
                    "key": "thyroid",
                    "label": "Thyroid",
                    "channel": 0,
                    "category": {"value": "123037004", "scheme": "SCT", "meaning": "A"},
                    "type": {"value": "69748006", "scheme": "SCT", "meaning": "T"},
                }
            ],
            **extra,
        }

    def test_measurements_block_is_read(self) -> None:
        manifest = parse_manifest(
            self.manifest(measurements={"thyroid": {"laterality": "split", "counts": ["sum"]}})
        )
        assert manifest.measurements is not None
        spec = manifest.measurements["thyroid"]
        assert spec.laterality == "split" and spec.counts == ("sum",) and spec.size
        assert "measurements" not in parse_manifest(self.manifest()).to_dict()

    @pytest.mark.parametrize(
        ("block", "message"),
        [
            ({"thyriod": {}}, "measurements: unknown segment key(s) ['thyriod']"),
            ({"thyroid": {"laterality": "both"}}, "measurements.thyroid.laterality"),
            ({"thyroid": {"count": ["sum"]}}, "measurements.thyroid.count: unknown field"),
        ],
    )
    def test_bad_block_is_named(self, block: dict, message: str) -> None:
        with pytest.raises(ManifestError, match="manifest") as info:
            parse_manifest(self.manifest(measurements=block))
        assert message in str(info.value)


class TestLaterality:
    def test_anterior_view_puts_patient_left_on_image_right(self) -> None:
        ds = make_nm(rows=64, cols=64)  # the factory's view code: Anterior projection
        assert patient_left_side(ds) == ("high", "anterior view")
        assert sides(ds) == {"left": 75.0, "right": 25.0}

    def test_posterior_view_puts_patient_left_on_image_left(self) -> None:
        ds = with_view(make_nm(rows=64, cols=64), "399001007", "Posterior projection")
        assert patient_left_side(ds) == ("low", "posterior view")
        assert sides(ds) == {"left": 25.0, "right": 75.0}

    def test_patient_orientation_wins_over_the_view_code(self) -> None:
        ds = make_nm(rows=64, cols=64, PatientOrientation=["R", "F"])
        assert patient_left_side(ds) == ("low", "PatientOrientation R")
        assert sides(ds)["left"] == 25.0

    def test_axial_ct_volume_is_split_once_at_its_midline(self) -> None:
        # ImageOrientationPatient rows along +x (the patient's left): left is at high columns
        sources = make_ct_series(3, rows=64, cols=64)
        assert patient_left_side(sources[0]) == ("high", "ImageOrientationPatient")
        frame, masks = paired()
        stack = [frame] * 3
        volume = {k: np.repeat(v, 3, axis=0) for k, v in masks.items()}
        thyroid = measure(sources, stack, volume, SPECS, PLAN)[0]
        assert thyroid.share_of == "size"  # HU are no counts: a share of the volume
        left, right = thyroid.sides or ()
        assert left.pixels + right.pixels == thyroid.pixels
        assert left.volume_ml + right.volume_ml == pytest.approx(thyroid.volume_ml)
        assert left.share_percent == pytest.approx(50.0, abs=1.0)  # blobs of equal size
        assert left.share_percent + right.share_percent == pytest.approx(100.0)

    def test_unknown_orientation_leaves_the_split_out_and_says_why(self) -> None:
        ds = make_nm(rows=64, cols=64)
        del ds.DetectorInformationSequence[0].ViewCodeSequence
        frame, masks = paired()
        thyroid = measure([ds], [frame], masks, SPECS, PLAN)[0]
        assert thyroid.sides is None
        assert thyroid.laterality is not None and "orientation unknown" in thyroid.laterality

    def test_split_column_is_the_thinnest_central_column(self) -> None:
        profile = np.array([0, 5, 6, 6, 1, 2, 6, 6, 5, 0])
        assert split_column(profile) == 4


class TestComponents:
    def test_components_largest_first_with_equivalent_diameter(self) -> None:
        ds = make_nm(rows=64, cols=64)
        frame, masks = paired()
        nodule = measure([ds], [frame], masks, SPECS, PLAN)[1]
        spacing = float(ds.PixelSpacing[0]) * float(ds.PixelSpacing[1])
        parts = nodule.components or ()
        assert [p.pixels for p in parts] == [48, 16]  # the 1-pixel one is below the minimum
        assert parts[0].area_mm2 == pytest.approx(48 * spacing)
        assert parts[0].diameter_mm == pytest.approx(2 * math.sqrt(48 * spacing / math.pi))
        assert parts[0].intensity_mean == IMAGE_RIGHT_COUNTS
        ((frame_index, outline),) = parts[0].outlines
        assert frame_index == 0 and outline.tolist()[0] == outline.tolist()[-1]
        assert sorted({tuple(v) for v in outline.tolist()}) == [
            (40, 30),
            (40, 38),
            (46, 30),
            (46, 38),
        ]

    def test_default_plan_measures_as_before(self) -> None:
        ds = make_nm(rows=64, cols=64)
        frame, masks = paired()
        thyroid, nodule = measure([ds], [frame], masks, SPECS)
        assert thyroid.sides is None and nodule.components is None
        assert thyroid.counts_reported == ("sum", "mean") and thyroid.size_reported


def report_of(sources: list[Dataset], frames: list[np.ndarray], masks: dict, tmp_path: Path):
    seg = build_seg(sources, masks, SPECS, ALGORITHM)
    sr = build_report(sources, seg, measure(sources, frames, masks, SPECS, PLAN), ALGORITHM)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "sr.dcm"
    path.write_bytes(buffer.getvalue())
    result = dciodvfy(path)
    assert result.errors == [], result.output
    back = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    return back, seg


def measured(group: object) -> list[hd.sr.Measurement]:
    return list(group.get_measurements())  # type: ignore[attr-defined]


class TestReport:
    def test_lobar_split_and_nodules_read_back(self, tmp_path: Path) -> None:
        ds = make_nm(rows=64, cols=64)
        frame, masks = paired()
        back, seg = report_of([ds], [frame], masks, tmp_path)
        segments = back.content.get_volumetric_roi_measurement_groups()
        numbers = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        assert {g.referenced_segment.referenced_sop_instance_uid for g in segments} == {
            seg.SOPInstanceUID
        }
        by_number = {g.referenced_segment.referenced_segment_numbers[0]: g for g in segments}
        assert sorted(by_number) == sorted(numbers)
        thyroid = measured(by_number[1])
        shares = {}
        for m in thyroid:
            if m.name == codes.SCT.Ratio:
                assert m.unit.value == "%"
                (site,) = m.finding_sites
                shares[site.laterality.meaning] = m.value
        assert shares == {"Left": 75.0, "Right": 25.0}
        assert sum(shares.values()) == pytest.approx(100.0)
        units = {(m.name.meaning, m.unit.value) for m in thyroid}
        assert {("Area", "mm2"), ("Total", "{counts}"), ("Mean", "{counts}")} <= units
        count = [m for m in measured(by_number[2]) if m.name.value == "246206008"]
        assert [c.value for c in count] == [2]
        planar = back.content.get_planar_roi_measurement_groups()
        assert [g.tracking_identifier for g in planar] == [
            "Cold nodule 1 of 2 (segment 2)",
            "Cold nodule 2 of 2 (segment 2)",
        ]
        first = planar[0]
        region = first.roi
        assert region.value_type == hd.sr.ValueTypeValues.SCOORD
        assert region.GraphicType == "POLYLINE"  # closed: the outline of the component
        assert [float(v) for v in region.GraphicData[:2]] == [40.0, 30.0]
        image = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert image.ReferencedSOPInstanceUID == ds.SOPInstanceUID
        assert image.ReferencedFrameNumber == 1
        names = {(m.name.meaning, m.unit.value) for m in measured(first)}
        assert names == {
            ("Area", "mm2"),
            ("Diameter", "mm"),
            ("Total", "{counts}"),
            ("Mean", "{counts}"),
        }

    def test_ct_volume_components_are_volumetric_regions(self, tmp_path: Path) -> None:
        sources = make_ct_series(3, rows=64, cols=64)
        frame, masks = paired()
        volume = {k: np.repeat(v, 3, axis=0) for k, v in masks.items()}
        back, _ = report_of(sources, [frame] * 3, volume, tmp_path)
        groups = back.content.get_volumetric_roi_measurement_groups()
        # in a volume the 1-pixel nodule spans 3 slices: 3 voxels, above min_component_pixels
        components = [g for g in groups if " of 3 " in str(g.tracking_identifier)]
        assert len(components) == 3
        sizes = {m.name.meaning: m.unit.value for m in measured(components[0])}
        assert sizes["Volume"] == "ml" and sizes["Diameter"] == "mm"


MEASURED_RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
    outputs: [seg, report]
    stop: true
"""


class TestThroughTheNode:
    def test_report_in_orthanc_matches_the_seg_and_splits_the_gland(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        # the test store's manifest declares the measurement set, as a thyroid model's would
        manifest = models_dir / "thyroid-seg" / "1" / "manifest.yaml"
        yaml = YAML(typ="safe")
        data = yaml.load(manifest.read_text())
        keys = [s["key"] for s in data["segments"]]
        data["measurements"] = {keys[0]: {"laterality": "split"}}
        with manifest.open("w") as fh:
            yaml.dump(data, fh)
        rules = tmp_path / "rules"
        write_rules(rules, MEASURED_RULE)
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules, orthanc.dicom_port)
            node = node_factory(config)
            source = make_nm(seed=31)
            files = write_series([source], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            wait_until(lambda: node.store.list_jobs(["done"]), what="a done job", timeout=60)
            found = {}
            for iid in orthanc.instances():
                ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(iid)))
                found[ds.Modality] = ds
        seg, sr = found["SEG"], hd.sr.Comprehensive3DSR.from_dataset(found["SR"])
        pixel_mm2 = float(source.PixelSpacing[0]) * float(source.PixelSpacing[1])
        frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        seg_pixels = {
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber): int(frame.sum())
            for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True)
        }
        assert seg_pixels[1] > 0  # the gland was found: the comparison below means something
        groups = sr.content.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(seg.SegmentSequence)
        for group in groups:
            (number,) = group.referenced_segment.referenced_segment_numbers
            (area,) = [
                m for m in measured(group) if m.name == codes.SCT.Area and not m.finding_sites
            ]
            assert area.value == pytest.approx(seg_pixels.get(number, 0) * pixel_mm2)
        gland = next(g for g in groups if g.referenced_segment.referenced_segment_numbers == [1])
        shares = [m.value for m in measured(gland) if m.name == codes.SCT.Ratio]
        assert len(shares) == 2 and sum(shares) == pytest.approx(100.0)
