"""Outputs through a running node: a rule with ``outputs: [seg, overlay, report]``, Orthanc as PACS.

DCMTK pushes an NM study, the node segments it and exports the SEG, one overlay image per frame
and the SR; Orthanc holds them all in the source's study, each valid under dciodvfy. A rule whose
outputs leave out the SEG exports only what it lists. (That a re-run gives the same UIDs, so the
PACS replaces, is tested on the builders: tests/test_outputs_overlay.py, test_outputs_report.py.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from PIL import Image

from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.peers import Orthanc, dciodvfy, storescu
from tests.helpers.waiting import wait_until

LOGGER = logging.getLogger(__name__)

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"

OUTPUTS_RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
    outputs: [%(outputs)s]
    stop: true
"""


def by_class(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Orthanc's instances of one study, by SOP Class UID (source images included)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for iid in orthanc.instances():
        tags = orthanc.instance_tags(iid)
        if tags.get("StudyInstanceUID") == study_uid:
            out.setdefault(str(tags.get("SOPClassUID")), []).append({"id": iid, **tags})
    return out


def fetch(orthanc: Orthanc, iid: str, path: Path) -> pydicom.Dataset:
    path.write_bytes(orthanc.instance_file(iid))
    return pydicom.dcmread(path)


class TestOutputsThroughTheNode:
    def test_seg_overlay_and_report_reach_orthanc(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, OUTPUTS_RULE % {"outputs": "seg, overlay, report"})
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules, orthanc.dicom_port)
            node = node_factory(config)
            source = make_nm(frames=2, seed=21)
            files = write_series([source], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0

            def complete() -> dict[str, list[dict[str, Any]]] | None:
                found = by_class(orthanc, str(source.StudyInstanceUID))
                counts = (
                    len(found.get(SEG, [])),
                    len(found.get(SC, [])),
                    len(found.get(SR_3D, [])),
                )
                return found if counts == (1, 2, 1) else None

            found = wait_until(complete, what="SEG, 2 overlays and an SR in Orthanc", timeout=60)
            seg = fetch(orthanc, found[SEG][0]["id"], tmp_path / "seg.dcm")
            overlays = [
                fetch(orthanc, item["id"], tmp_path / f"overlay-{n}.dcm")
                for n, item in enumerate(found[SC])
            ]
            sr_path = tmp_path / "sr.dcm"
            sr = hd.sr.Comprehensive3DSR.from_dataset(
                fetch(orthanc, found[SR_3D][0]["id"], sr_path)
            )
            for path in [tmp_path / "seg.dcm", sr_path] + [
                tmp_path / f"overlay-{n}.dcm" for n in range(2)
            ]:
                report = dciodvfy(path)
                assert report.errors == [], (path.name, report.output)
            series = {seg.SeriesInstanceUID, sr.SeriesInstanceUID}
            series |= {o.SeriesInstanceUID for o in overlays}
            assert len(series) == 3 and source.SeriesInstanceUID not in series
            frames = sorted(o.SourceImageSequence[0].ReferencedFrameNumber for o in overlays)
            assert frames == [1, 2]
            groups = sr.content.get_volumetric_roi_measurement_groups()
            assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {
                seg.SOPInstanceUID
            }
            assert sorted(
                n for g in groups for n in g.referenced_segment.referenced_segment_numbers
            ) == [int(s.SegmentNumber) for s in seg.SegmentSequence]
            png = tmp_path / "overlay-from-orthanc.png"
            Image.fromarray(overlays[0].pixel_array).save(png)
            LOGGER.warning("overlay from Orthanc written to %s", png)
            print(f"overlay PNG: {png}")

            node.wait_idle(10)
            (job,) = node.store.list_jobs()
            assert job.state == "done", job
            assert job.outcome == "SEG, 2 overlay image(s), report sent to pacs"
            assert job.details["outputs"] == ["seg", "overlay", "report"]
            rows = node.store.results(job.id)
            kinds = [Path(r.path).name.split("-", 1)[0] for r in rows][1:]
            assert kinds == ["overlay", "overlay", "report"]
            assert all(r.delivered == ("pacs",) for r in rows)

    def test_outputs_without_seg_send_only_what_they_list_gsps_too(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, OUTPUTS_RULE % {"outputs": "overlay, gsps"})
        with Orthanc() as orthanc:
            config = make_config(tmp_path, models_dir, rules, orthanc.dicom_port)
            node = node_factory(config)
            source = make_nm(seed=22)
            files = write_series([source], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            job = wait_until(lambda: node.store.list_jobs(["done"]), what="a done job")[0]
            found = by_class(orthanc, str(source.StudyInstanceUID))
            assert len(found.get(SC, [])) == 1 and len(found.get(GSPS, [])) == 1
            assert SEG not in found and SR_3D not in found
            assert job.outcome == "1 overlay image(s), 1 presentation state(s) sent to pacs"
            path = tmp_path / "gsps.dcm"
            gsps = fetch(orthanc, found[GSPS][0]["id"], path)
            assert dciodvfy(path).errors == []
            (image,) = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence
            assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert (config.storage / job.seg_path).is_file()  # built, kept, not sent
