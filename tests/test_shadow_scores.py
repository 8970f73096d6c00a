"""Shadow agreement as 3-D Dice, IoU and HD95 (mm) per segment over a whole series (issue 14).

The worker runs a real shadow version (ONNX Runtime, tests/helpers/onnx_models.py) beside
production on a multi-slice CT series and a multi-frame NM instance whose geometry is known, on
an image where the two versions disagree in a way that can be worked out by hand; the job store
keeps the scores on SQLite and PostgreSQL; ``models show`` summarises them beside Dice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset

from dicom_node.audit import AuditLog
from dicom_node.infer.worker import Worker
from dicom_node.jobs import InstanceRecord, JobState, JobStore, Route
from dicom_node.jobs.records import ShadowResult
from dicom_node.models_cli import models as models_cli
from dicom_node.modelstore import ModelRunner, ModelStore, ServingModels
from dicom_node.modelstore.scoring import agreement_scores, hd95
from tests.conftest import make_config
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.onnx_models import write_model_version, write_yaml
from tests.helpers.ports import free_port

NAME = "thyroid-seg"
SIZE = 64  # the test models' input size: no resampling, so masks are exact
SIDE, CORNER = 20, 22  # a bright square of SIDE pixels from (CORNER, CORNER) ...
SQUARE = range(1, 3)  # ... on frames 1..2; frame 3 a strip 2 pixels thin; 0 and 4 blank
STRIP, FRAMES = 3, 5
SPACING = (0.7, 0.7)  # PixelSpacing (mm)
GAP = 2.5  # mm between slices
POSITIONS = [i * GAP for i in range(FRAMES)]


def bright() -> np.ndarray:
    volume = np.zeros((FRAMES, SIZE, SIZE), dtype=bool)
    volume[SQUARE.start : SQUARE.stop, CORNER : CORNER + SIDE, CORNER : CORNER + SIDE] = True
    volume[STRIP, 31:33, 12:52] = True
    return volume


def expected_thyroid() -> tuple[np.ndarray, np.ndarray]:
    """What ``ok`` and ``worse`` make of :func:`bright`: a 3x3 mean above 0.25 and 0.7.

    On the square, ``ok`` keeps it and the outside pixels next to a side that see 3 of its
    pixels (3/9), not those at a side's ends (2/9) or diagonal to a corner (1/9); ``worse``
    keeps only pixels with all 9 inside (an edge pixel sees 6/9): the square shrunk by one.
    The strip is too thin for ``worse``: there ``ok`` sits a slice gap above ``worse``'s top.
    """
    x = np.pad(bright().astype(float), ((0, 0), (1, 1), (1, 1)))
    mean = sum(x[:, r : r + SIZE, c : c + SIZE] for r in range(3) for c in range(3)) / 9.0
    return np.asarray(mean > 0.25), np.asarray(mean > 0.7)


def ct_slices() -> list[Dataset]:
    """Single-frame CT slices GAP mm apart (ImagePositionPatient), PixelSpacing SPACING."""
    slices = make_ct_series(FRAMES, SIZE, SIZE, seed="shadow-ct", PixelSpacing=list(SPACING))
    for ds, lit in zip(slices, bright(), strict=True):
        ds.PixelData = (lit * 1000).astype(np.int16).tobytes()  # HU -1024 and -24
    return slices


def nm_multiframe() -> list[Dataset]:
    """One multi-frame NM instance, frames GAP mm apart (SpacingBetweenSlices)."""
    counts = (bright() * 100).astype(np.uint16)
    return [
        make_nm(
            SIZE,
            SIZE,
            frames=FRAMES,
            pixels=counts,
            seed="shadow-nm",
            PixelSpacing=list(SPACING),
            SpacingBetweenSlices=GAP,
        )
    ]


def model_store(root: Path, production: str, shadow: str) -> Path:
    """Versions 1 (``production`` variant) and 2 (``shadow`` variant), 2 in shadow of 1."""
    for version, variant in (("1", production), ("2", shadow)):
        write_model_version(
            root / NAME, name=NAME, version=version, variant=variant, modalities=("CT", "NM")
        )
    write_yaml(root / NAME / "aliases.yaml", {"production": "1", "shadow": "2"})
    return root


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    """The job store on SQLite, then on PostgreSQL (``store_url`` of tests/conftest.py)."""
    s = JobStore.open(tmp_path / "var", store_url)
    yield s
    s.close()


def shadow_run(
    tmp_path: Path, store: JobStore, datasets: list[Dataset], production: str, shadow: str
) -> ShadowResult:
    """Take the series through the worker (production plus shadow) and return the shadow row."""
    models = model_store(tmp_path / "models", production, shadow)
    config = make_config(tmp_path, models, tmp_path / "rules", free_port())
    spool = config.storage / "spool"
    files = write_series(datasets, spool)
    for ds, path in zip(datasets, files, strict=True):
        store.record_instance(
            InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                study_uid=str(ds.StudyInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                modality=str(ds.Modality),
                path=str(path.relative_to(config.storage)),
                size=path.stat().st_size,
                calling_ae="SCU",
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                received_at=1.0,
            )
        )
    (job,) = store.jobs_in(JobState.RECEIVED)
    assert store.route(job.id, [Route(rule="r", model_ref=f"{NAME}@production")], "v")
    assert store.queue(job.id, len(datasets))
    claimed = store.claim()
    assert claimed is not None
    serving = ServingModels(ModelStore(models), ModelRunner(threads=1))
    serving.refresh()
    Worker(config, store, serving, AuditLog(config.storage / "audit.jsonl")).process(claimed)
    done = store.get(job.id)
    assert done is not None and done.state is JobState.DONE, done
    (run,) = store.shadow_results()
    assert (run.job_id, run.version, run.production_version) == (job.id, "2", "1")
    return run


class TestWorkerRecordsSeriesScores:
    @pytest.mark.parametrize("series", [ct_slices, nm_multiframe], ids=["ct-slices", "nm-frames"])
    def test_known_disagreement_gives_3d_iou_and_hd95_in_mm(
        self, tmp_path: Path, store: JobStore, series: object
    ) -> None:
        run = shadow_run(tmp_path, store, series(), "ok", "worse")  # type: ignore[operator]
        ok, worse = expected_thyroid()
        assert (int(ok[1].sum()), int(worse[1].sum())) == (
            SIDE**2 + 4 * (SIDE - 2),
            (SIDE - 2) ** 2,
        )
        assert (int(ok[STRIP].sum()), int(worse[STRIP].sum())) == (80 + 2 * 38, 0)
        grown, shrunk = int(ok.sum()), int(worse.sum())  # worse lies inside ok
        assert run.scores is not None
        thyroid = run.scores["thyroid"]
        assert thyroid["dice"] == pytest.approx(2 * shrunk / (grown + shrunk))
        assert thyroid["iou"] == pytest.approx(shrunk / grown)
        assert run.agreement["thyroid"] == thyroid["dice"]  # the column of old, same number
        # HD95 in mm with the headers' geometry, not in pixels or slice indices
        in_mm = hd95(ok, worse, SPACING, POSITIONS)
        assert thyroid["hd95_mm"] == pytest.approx(in_mm)
        assert in_mm != pytest.approx(hd95(ok, worse, SPACING))  # slices 1 mm apart
        assert in_mm != pytest.approx(hd95(ok, worse, positions=POSITIONS))  # 1 mm pixels
        # the strip lies one slice gap above worse's top and reaches beyond its sides
        assert GAP <= in_mm < GAP + 2 * SPACING[0]
        # ok finds "nodules" beside the square, worse never does: no HD95, never NaN
        assert run.scores["nodule"] == {"dice": 0.0, "iou": 0.0, "hd95_mm": None}
        assert run.agreement["nodule"] == 0.0

    def test_both_empty_is_no_evidence(self, tmp_path: Path, store: JobStore) -> None:
        run = shadow_run(tmp_path, store, ct_slices(), "worse", "empty")
        assert run.scores is not None
        assert run.scores["nodule"] == {"dice": None, "iou": None, "hd95_mm": None}
        assert "nodule" not in run.agreement  # as before: no Dice 1.0 for two empty masks
        assert run.scores["thyroid"] == {"dice": 0.0, "iou": 0.0, "hd95_mm": None}

    def test_a_series_split_into_groups_is_scored_whole(
        self, tmp_path: Path, store: JobStore
    ) -> None:
        """Frames of two matrix sizes (two SEGs): Dice and IoU pool both, HD95 of the worst."""
        big = ct_slices()
        small = make_ct_series(
            1,
            SIZE // 2,
            SIZE // 2,
            study_uid=big[0].StudyInstanceUID,
            series_uid=big[0].SeriesInstanceUID,
            seed="shadow-ct-small",
            PatientID=big[0].PatientID,
            FrameOfReferenceUID=big[0].FrameOfReferenceUID,
        )
        small[0].InstanceNumber = 99
        run = shadow_run(tmp_path, store, [*big, *small], "ok", "worse")
        assert run.scores is not None
        thyroid = run.scores["thyroid"]
        assert thyroid["dice"] is not None and 0.0 < thyroid["dice"] < 1.0
        assert run.agreement["thyroid"] == thyroid["dice"]
        ok, worse = expected_thyroid()
        alone = hd95(ok, worse, SPACING, POSITIONS)
        assert thyroid["hd95_mm"] is not None and thyroid["hd95_mm"] >= alone - 1e-9


class TestScoresAreChecked:
    def test_agreement_scores_pool_parts_and_never_say_nan(self) -> None:
        a = np.zeros((2, 8, 8), bool)
        b = a.copy()
        a[0, 2:4, 2:4] = True  # part one: only a has something
        c = np.zeros((1, 8, 8), bool)
        c[0, 1:5, 1:5] = True  # part two: both agree
        scores = agreement_scores([(a, b, (1.0, 1.0), None), (c, c, (1.0, 1.0), [0.0])])
        assert scores == {
            "dice": pytest.approx(32 / 36),
            "iou": pytest.approx(16 / 20),
            "hd95_mm": None,
        }
        assert agreement_scores([(b, b, (1.0, 1.0), None)])["dice"] is None

    @pytest.mark.parametrize(
        ("scores", "message"),
        [
            ({"t": {"dice": math.nan, "iou": 0.5, "hd95_mm": 1.0}}, "finite number or None"),
            ({"t": {"dice": 0.5, "iou": 0.5, "hd95_mm": math.inf}}, "finite number or None"),
            ({"t": {"dice": 1.5, "iou": 0.5, "hd95_mm": 1.0}}, r"in \[0, 1\]"),
            ({"t": {"dice": 0.5, "iou": 0.5, "hd95_mm": -1.0}}, ">= 0"),
            ({"t": {"dice": 0.5}}, "must map exactly dice, iou, hd95_mm"),
        ],
    )
    def test_a_bad_score_is_refused_before_it_is_written(
        self, tmp_path: Path, scores: dict, message: str
    ) -> None:
        store = JobStore.open(tmp_path / "var")
        try:
            job_id = _job(store, "1.2.9")
            with pytest.raises(ValueError, match=message):
                store.add_shadow_result(job_id, NAME, "2", {"t": 0.5}, "1", scores=scores)
            assert store.shadow_results() == []
            store.add_shadow_result(job_id, NAME, "2", {"t": 0.5}, "1")  # as before 0004
            (run,) = store.shadow_results()
            assert run.scores is None
        finally:
            store.close()


def _job(store: JobStore, uid: str) -> int:
    store.record_instance(
        InstanceRecord(
            sop_instance_uid=f"{uid}.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
            study_uid="1.2",
            series_uid=uid,
            modality="NM",
            path=f"spool/1.2/{uid}/{uid}.1.dcm",
            size=10,
            calling_ae=None,
            transfer_syntax=None,
            received_at=1.0,
        )
    )
    (job,) = [j for j in store.jobs_in(JobState.RECEIVED) if j.series_uid == uid]
    return job.id


def test_models_show_puts_iou_and_hd95_beside_dice(tmp_path: Path) -> None:
    models = model_store(tmp_path / "models", "ok", "worse")
    storage = tmp_path / "var"
    jobs = JobStore.open(storage)
    try:
        runs: list[tuple[dict[str, float | None], dict[str, float | None]]] = [
            (
                {"dice": 0.9, "iou": 0.8, "hd95_mm": 1.5},
                {"dice": None, "iou": None, "hd95_mm": None},
            ),
            ({"dice": 0.7, "iou": 0.5, "hd95_mm": 4.5}, {"dice": 0.0, "iou": 0.0, "hd95_mm": None}),
            (
                {"dice": 0.8, "iou": 0.6, "hd95_mm": None},
                {"dice": None, "iou": None, "hd95_mm": None},
            ),
        ]
        ids = []
        for i, (thyroid, nodule) in enumerate(runs):
            ids.append(_job(jobs, f"1.2.{i}"))
            agreement = {k: v["dice"] for k, v in (("thyroid", thyroid), ("nodule", nodule))}
            scores = {"thyroid": thyroid, "nodule": nodule}
            measured = {k: v for k, v in agreement.items() if v is not None}
            jobs.add_shadow_result(ids[-1], NAME, "2", measured, "1", scores=scores)
        ids.append(_job(jobs, "1.2.old"))
        jobs.add_shadow_result(ids[-1], NAME, "2", {"thyroid": 1.0}, "1")  # before revision 0004
    finally:
        jobs.close()
    config = tmp_path / "node.yaml"
    config.write_text(f"models: {models}\nstorage: {storage}\nhttp_port: {free_port()}\n")
    out = CliRunner().invoke(models_cli, ["show", NAME, "--config", str(config)])
    assert out.exit_code == 0, out.output
    text = out.output
    # the Dice line of old counts every run; the 3-D figures only those that recorded them
    assert "shadow 2 agreement thyroid: mean Dice 0.850 over 4 run(s), min 0.700" in text
    assert (
        "3-D over 3 series: Dice median 0.800 mean 0.800; IoU median 0.600 mean 0.633; "
        "HD95 median 3.0 mean 3.0 mm (1 series with one version empty: no HD95)"
    ) in text
    assert f"worst series: job {ids[1]}, Dice 0.700, IoU 0.500, HD95 4.5 mm" in text
    assert "shadow 2 agreement nodule: mean Dice 0.000 over 1 run(s), min 0.000" in text
    assert "3-D over 1 series: Dice median 0.000 mean 0.000; IoU median 0.000 mean 0.000 (" in text
    assert f"worst series: job {ids[1]}, Dice 0.000, IoU 0.000, HD95 -" in text
    assert "2 series with both versions empty: no evidence, not counted" in text
    # and each run beside its Dice in `dicom-node jobs --shadow`
    from dicom_node.cli import main as node_cli

    listed = CliRunner().invoke(
        node_cli, ["jobs", "--shadow", "--config", str(config)], env={"COLUMNS": "300"}
    )
    assert listed.exit_code == 0, listed.output
    assert "nodule 0.000, -; thyroid 0.500, 4.5 mm" in listed.output
    assert "nodule no evidence; thyroid 0.600, -" in listed.output
