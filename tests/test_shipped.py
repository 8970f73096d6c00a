"""What `make run` serves: the shipped rules and the shipped thyroid model, end to end.

Orthanc pushes synthetic thyroid studies (unseen seeds) to a node configured like the embedded
defaults (`./rules`, `./models`), and must get back dciodvfy-clean SEGs that outline the gland.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.demo.phantoms_classic import make_case  # what thyroid-seg:1 was trained on
from dicom_node.modelstore import ModelStore
from dicom_node.routing import load_rules
from tests.conftest import REPO
from tests.helpers.peers import Orthanc, dciodvfy
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
HELD_OUT_SEEDS = (990_001, 990_002)  # not in training: training uses its own documented seeds


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def test_shipped_model_is_in_the_store_and_small() -> None:
    store = ModelStore(REPO / "models")
    resolved = store.resolve("thyroid-seg@production")
    store.verify(resolved)  # sha256 of the weights matches the manifest
    assert resolved.model_file.stat().st_size <= 10 * 2**20
    keys = [s.key for s in resolved.manifest.segments]
    assert keys == ["thyroid", "nodule"]


def test_shipped_production_is_version_5_with_a_serving_contract() -> None:
    """v5 (v4 fine-tuned on three phantom styles) is production after a recorded, gated
    promotion; v1, v2 (v1's weights with confidence and measurements), v3 and v4 stay for
    rollback."""
    store = ModelStore(REPO / "models")
    prod = store.resolve("thyroid-seg@production")
    store.verify(prod)
    v1, v2, v3, v4 = (store.resolve(f"thyroid-seg:{n}") for n in (1, 2, 3, 4))
    for older in (v1, v2, v3, v4):
        store.verify(older)
    assert prod.manifest.version == "5"
    assert prod.manifest.sha256 not in (v1.manifest.sha256, v3.manifest.sha256, v4.manifest.sha256)
    assert v2.manifest.sha256 == v1.manifest.sha256
    assert prod.manifest.confidence is not None and prod.manifest.confidence.ood is not None
    assert prod.manifest.confidence.method == "entropy"
    # chosen on validation draws of A, B and C: no border step (version 4 had one)
    assert [step.op for step in prod.manifest.postprocess] == [
        "largest_component",
        "min_size",
        "within",
        "fill_holes",
    ]
    assert prod.manifest.measurements is not None
    assert prod.manifest.measurements["thyroid"].laterality == "split"
    history = (REPO / "models" / "thyroid-seg" / "history.yaml").read_text()
    assert (
        "promote: production 4 -> 5" in history
        or '"from": "4", "to": "5", "reason": "promote"' in history
    )


def test_shipped_rules_load_against_shipped_models_and_defaults() -> None:
    config = load_config(environ={})
    rules = load_rules(
        REPO / "rules",
        destinations=set(config.destinations),
        model_exists=ModelStore(REPO / "models").model_exists,
    )
    assert any(r.model == "thyroid-seg@production" for r in rules.rules)


@pytest.mark.parametrize("size", [256, 128])
def test_orthanc_push_gets_a_good_seg_from_the_shipped_model(
    tmp_path: Path, node_factory: Any, size: int
) -> None:
    with Orthanc() as orthanc:
        config = load_config(environ={}).model_copy(
            update={
                "host": "127.0.0.1",
                "port": free_port(),
                "http_host": "127.0.0.1",
                "http_port": free_port(),
                "storage": tmp_path / "var",
                "rules": REPO / "rules",
                "models": REPO / "models",
                "min_free_disk": 0,
                "destinations": {
                    "pacs": load_config(environ={})
                    .destinations["pacs"]
                    .model_copy(update={"port": orthanc.dicom_port})
                },
            }
        )
        node = node_factory(config)
        orthanc.set_modality("node", config.ae_title, "127.0.0.1", config.port)
        cases = [make_case(seed, size) for seed in HELD_OUT_SEEDS]
        for case in cases:
            path = tmp_path / f"{case.dataset.SOPInstanceUID}.dcm"
            case.dataset.save_as(path, enforce_file_format=True)
            uploaded = orthanc.upload(path)
            orthanc.send_to_modality("node", [uploaded[0]["ID"]])

        def segs() -> list[str]:
            return [
                i
                for i in orthanc.instances()
                if orthanc.instance_tags(i).get("SOPClassUID") == SEG_SOP_CLASS
            ]

        seg_ids = wait_until(lambda: len(segs()) == len(cases) and segs(), 60, "two SEGs")
        assert node.wait_idle(10)
        for job in node.store.list_jobs():
            assert (job.state, job.rule, job.model_version) == (
                "done",
                "thyroid-scintigraphy",
                "5",  # production: issue 13's model, fine-tuned on three phantom styles
            ), job
        by_source = {str(c.dataset.SOPInstanceUID): c for c in cases}
        for seg_id in seg_ids:
            path = tmp_path / f"seg-{seg_id}.dcm"
            path.write_bytes(orthanc.instance_file(seg_id))
            assert dciodvfy(path).errors == []
            seg = hd.seg.segread(path)
            source_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
            case = by_source[str(source_uid.ReferencedSOPInstanceUID)]
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[str(source_uid.ReferencedSOPInstanceUID)],
                segment_numbers=[1],
            )
            assert _dice(np.asarray(pixels[0, ..., 0]).astype(bool), case.truth["thyroid"]) > 0.9
