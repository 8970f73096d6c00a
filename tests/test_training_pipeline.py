"""The whole training path with the tiny config, through the CLI:
phantoms -> train -> export (parity) -> evaluate -> publish into a temporary model store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result

from dicom_node.modelstore.manifest import load_manifest
from dicom_node.modelstore.store import ModelStore, ModelStoreError
from training import export as export_module
from training.__main__ import main
from training.export import ParityError, export_model
from training.train import load_checkpoint, load_config, train

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"


def _run(*args: str) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _tune(pipeline: dict[str, Path], out: Path, *extra: str) -> None:
    """One epoch of the tiny config at a learning rate that hardly moves the weights."""
    from ruamel.yaml import YAML

    config = load_config(TINY)
    config["train"].update(epochs=1, lr=1e-12, warmup_epochs=0)
    cfg = out.parent / f"{out.name}.yaml"
    YAML(typ="safe").dump(config, cfg)
    _run("train", "--config", str(cfg), "--data", str(pipeline["train"]), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    paths = {
        "train": root / "train",
        "test": root / "test",
        "run": root / "run",
        "model": root / "export" / "2",
        "eval": root / "eval",
        "testB": root / "testB",  # the independent held-out style (phantoms_alt)
        "evalB": root / "evalB",
        "store": root / "models",
    }
    _run(
        "phantoms",
        str(paths["train"]),
        "--n",
        "10",
        "--seed",
        "101",
        "--size",
        "64",
        "--size",
        "48",
    )
    _run("phantoms", str(paths["test"]), "--n", "4", "--seed", "202", "--size", "64")
    _run(
        "phantoms",
        str(paths["testB"]),
        "--n",
        "4",
        "--seed",
        "303",
        "--size",
        "64",
        "--family",
        "B",
    )
    _run("train", "--config", str(TINY), "--data", str(paths["train"]), "--out", str(paths["run"]))
    _run("export", "--checkpoint", str(paths["run"] / "best.pt"), "--out", str(paths["model"]))
    _run(
        "evaluate",
        "--model",
        str(paths["model"]),
        "--data",
        str(paths["test"]),
        "--out",
        str(paths["eval"]),
    )
    _run(
        "evaluate",
        "--model",
        str(paths["model"]),
        "--data",
        str(paths["testB"]),
        "--out",
        str(paths["evalB"]),
    )
    return paths


class TestTrain:
    def test_writes_checkpoints_history_and_split(self, pipeline: dict[str, Path]) -> None:
        run = pipeline["run"]
        for name in ("best.pt", "last.pt", "history.csv", "history.json", "split.json"):
            assert (run / name).is_file(), name
        history = json.loads((run / "history.json").read_text())
        assert [row["epoch"] for row in history] == [1, 2]
        assert {"train_loss", "val_loss", "val_dice_thyroid", "val_dice_nodule"} <= set(history[0])

    def test_split_has_no_patient_in_both(self, pipeline: dict[str, Path]) -> None:
        import pydicom

        split = json.loads((pipeline["run"] / "split.json").read_text())

        def patients(names: list[str]) -> set[str]:
            return {pydicom.dcmread(pipeline["train"] / n / "image.dcm").PatientID for n in names}

        assert split["val"] and not patients(split["train"]) & patients(split["val"])

    def test_same_seed_same_weights(self, pipeline: dict[str, Path], tmp_path: Path) -> None:
        config = load_config(TINY)
        config["train"]["epochs"] = 1
        a = train(config, tmp_path / "a", data_dir=pipeline["train"])
        b = train(config, tmp_path / "b", data_dir=pipeline["train"])
        net_a, _ = load_checkpoint(a.best_checkpoint)
        net_b, _ = load_checkpoint(b.best_checkpoint)
        for (name, pa), pb in zip(
            net_a.state_dict().items(), net_b.state_dict().values(), strict=True
        ):
            assert np.array_equal(pa.numpy(), pb.numpy()), name

    def test_init_starts_from_an_earlier_run(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        """Fine-tuning: --init takes the weights of a checkpoint, the optimiser starts afresh."""
        source = pipeline["run"] / "best.pt"
        _tune(pipeline, tmp_path / "tuned", "--init", str(source))
        _tune(pipeline, tmp_path / "fresh")
        start, _ = load_checkpoint(source)
        tuned, _ = load_checkpoint(tmp_path / "tuned" / "best.pt")
        fresh, _ = load_checkpoint(tmp_path / "fresh" / "best.pt")
        for name, weight in start.named_parameters():
            assert np.allclose(
                dict(tuned.named_parameters())[name].detach(), weight.detach(), atol=1e-6
            ), name
        assert not all(
            np.allclose(dict(fresh.named_parameters())[n].detach(), w.detach(), atol=1e-3)
            for n, w in start.named_parameters()
        )
        record = json.loads((tmp_path / "tuned" / "run.json").read_text())
        assert record["init"]["checkpoint"] == str(source)
        assert len(record["init"]["sha256"]) == 64 and record["init"]["epoch"] >= 1

    def test_init_from_a_published_version_starts_from_the_served_model(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        """The run folder may be gone: --init models/NAME/VERSION rebuilds the served network."""
        import onnxruntime as ort
        import pydicom
        import torch

        from training.unet import UNet
        from training.warmstart import calibrate_norms, load_published

        config = load_config(TINY)
        net = UNet(1, 2, int(config["network"]["depth"]), int(config["network"]["base_channels"]))
        load_published(net, pipeline["model"])
        images = []
        for case in sorted(pipeline["test"].iterdir()):
            pixels = pydicom.dcmread(case / "image.dcm").pixel_array.astype(np.float32)
            images.append(pixels / max(float(np.percentile(pixels, 99.5)), 1.0))
        x = np.stack(images)[:, None]
        session = ort.InferenceSession(str(pipeline["model"] / "model.onnx"))
        served = session.run(None, {session.get_inputs()[0].name: x})[0]
        calibrate_norms(net, [torch.from_numpy(x)])
        with torch.no_grad():
            rebuilt = net.eval()(torch.from_numpy(x)).numpy()
            training_mode = net.train()(torch.from_numpy(x)).numpy()
        # eval mode: the served logits; train mode (batch statistics): the same up to the batch
        assert np.allclose(rebuilt, served, atol=1e-4)
        assert np.abs(training_mode - served).max() < 1e-3 * max(1.0, np.abs(served).max())

        _tune(pipeline, tmp_path / "tuned", "--init", str(pipeline["model"]))
        record = json.loads((tmp_path / "tuned" / "run.json").read_text())["init"]
        assert record["version"] == load_manifest(pipeline["model"] / "manifest.yaml").version
        assert record["sha256"] == load_manifest(pipeline["model"] / "manifest.yaml").sha256
        assert record["calibration_samples"] >= 1

    def test_init_from_a_published_version_of_another_network_is_refused(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        from training.unet import UNet
        from training.warmstart import PublishedModelError, load_published

        config = load_config(TINY)
        wider = int(config["network"]["base_channels"]) + 2
        with pytest.raises(PublishedModelError, match="network section it was trained with"):
            load_published(UNet(1, 2, int(config["network"]["depth"]), wider), pipeline["model"])

    def test_init_of_another_network_says_which_part_differs(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        config = load_config(TINY)
        config["network"]["base_channels"] = int(config["network"]["base_channels"]) + 2
        config["train"]["init"] = str(pipeline["run"] / "best.pt")
        with pytest.raises(ValueError, match="base_channels .* there, .* in the config"):
            train(config, tmp_path / "bad", data_dir=pipeline["train"])


class TestExport:
    def test_manifest_follows_the_contract(self, pipeline: dict[str, Path]) -> None:
        manifest = load_manifest(pipeline["model"] / "manifest.yaml")
        assert (manifest.name, manifest.version) == ("thyroid-seg", "2")
        assert manifest.input.name == "image" and manifest.output.name == "logits"
        assert manifest.output.activation == "sigmoid"
        codes = {s.key: (s.channel, s.type.value) for s in manifest.segments}
        assert codes == {"thyroid": (0, "69748006"), "nodule": (1, "27925004")}
        prov = manifest.provenance
        assert len(prov["data_hash"]) == 64 and prov["config"]["network"]["depth"] == 2
        assert prov["parity_max_abs_diff"] <= 1e-4 and prov["date"]

    def test_onnx_has_opset_17_and_dynamic_batch(self, pipeline: dict[str, Path]) -> None:
        model = onnx.load(pipeline["model"] / "model.onnx")
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value

    def test_parity_failure_stops_the_export(
        self, pipeline: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(export_module, "PARITY_TOLERANCE", -1.0)
        with pytest.raises(ParityError, match="differs from PyTorch by .* tolerance"):
            export_model(pipeline["run"] / "best.pt", tmp_path / "3")
        assert not (tmp_path / "3" / "model.onnx").exists()

    def test_failed_export_leaves_nothing_and_the_rerun_works(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        empty = tmp_path / "no-cases"
        empty.mkdir()
        with pytest.raises(ValueError, match="has no case folder"):
            export_model(pipeline["run"] / "best.pt", tmp_path / "6", reference=empty)
        assert list(tmp_path.iterdir()) == [empty]  # no orphan model.onnx, no temporary folder
        export_model(pipeline["run"] / "best.pt", tmp_path / "6", reference=pipeline["test"])
        assert {p.name for p in (tmp_path / "6").iterdir()} >= {"model.onnx", "manifest.yaml"}
        assert load_manifest(tmp_path / "6" / "manifest.yaml").version == "6"
        with pytest.raises(ValueError, match=r"6 already exists and is not empty; versions are"):
            export_model(pipeline["run"] / "best.pt", tmp_path / "6")

    def test_report_metrics_go_into_the_manifest(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        export_model(
            pipeline["run"] / "best.pt", tmp_path / "4", report=pipeline["eval"] / "report.json"
        )
        metrics = load_manifest(tmp_path / "4" / "manifest.yaml").metrics
        assert set(metrics["thyroid"]) == {"dice", "iou", "hd95_mm", "n"}
        assert "nodule_fp_per_image" in metrics

    def test_reference_set_for_the_promotion_gate(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        export_model(
            pipeline["run"] / "best.pt", tmp_path / "5", reference=pipeline["test"], reference_n=2
        )
        manifest = load_manifest(tmp_path / "5" / "manifest.yaml")
        assert manifest.reference_data == "reference"
        cases = sorted(p.name for p in (tmp_path / "5" / "reference").iterdir() if p.is_dir())
        assert cases == ["case0000", "case0001"]
        labels = (tmp_path / "5" / "reference" / "labels.yaml").read_text()
        assert "nodule: [2]" in labels  # the config's nifti_labels, for label maps
        added = ModelStore(tmp_path / "models").add(tmp_path / "5")
        assert (added.path / "reference" / "case0001" / "truth.npz").is_file()


class TestBothFamilies:
    """Training style and the independent style are both evaluated; the manifest keeps both."""

    def test_reports_have_strata_and_highlights(self, pipeline: dict[str, Path]) -> None:
        for name in ("eval", "evalB"):
            report = json.loads((pipeline[name] / "report.json").read_text())
            strata = report["strata"]["nodule"]
            assert set(strata) == {"location", "size", "counts"}
            assert {"inside", "touching", "edge", "reaching the edge"} == set(strata["location"])
            assert set(report["highlights"]) == {
                "clear fails",
                "surprising successes",
                "borderline",
            }
            lesions = [les for r in report["cases"] for les in r["nodule"]["lesions"]]
            assert sum(r["nodule"]["truth"] for r in report["cases"]) == len(lesions)
            found = sum(1 for les in lesions if les["coverage"] >= 0.5)
            assert report["detection"]["nodule"]["detected"] == found  # >= 50 % coverage
            text = (pipeline[name] / "report.md").read_text()
            assert "strata (found = at least 50% of the lesion covered)" in text
            assert "### clear fails" in text and "highlight-clear-fails.png" in text

    def test_manifest_records_both_evaluations(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        reports = [pipeline["eval"] / "report.json", pipeline["evalB"] / "report.json"]
        export_model(pipeline["run"] / "best.pt", tmp_path / "7", report=reports)
        metrics = load_manifest(tmp_path / "7" / "manifest.yaml").metrics
        assert set(metrics["evaluations"]) == {"eval", "evalB"}
        assert metrics["evaluations"]["evalB"]["evaluated_on"] == str(pipeline["testB"])
        assert metrics["thyroid"] == metrics["evaluations"]["eval"]["thyroid"]
        assert "location: reaching the edge" in metrics["evaluations"]["evalB"]["strata"]["nodule"]


class TestEvaluate:
    def test_report_json_and_markdown(self, pipeline: dict[str, Path]) -> None:
        report = json.loads((pipeline["eval"] / "report.json").read_text())
        assert set(report["mean"]) == {"thyroid", "nodule"}
        assert set(report["mean"]["thyroid"]) >= {"dice", "iou", "hd95_mm"}
        assert 0.0 <= report["mean"]["thyroid"]["dice"] <= 1.0
        assert len(report["cases"]) == 4
        assert {"sensitivity", "fp_per_image"} <= set(report["detection"]["nodule"])
        text = (pipeline["eval"] / "report.md").read_text()
        assert "| thyroid |" in text and "learning_curves.png" in text
        for png in ("best.png", "median.png", "worst.png", "learning_curves.png"):
            assert (pipeline["eval"] / png).stat().st_size > 1000

    def test_tampered_model_is_refused(self, pipeline: dict[str, Path], tmp_path: Path) -> None:
        import shutil

        copy = tmp_path / "2"
        shutil.copytree(pipeline["model"], copy)
        with (copy / "model.onnx").open("ab") as fh:
            fh.write(b"\0")
        result = CliRunner().invoke(
            main,
            [
                "evaluate",
                "--model",
                str(copy),
                "--data",
                str(pipeline["test"]),
                "--out",
                str(tmp_path / "e"),
            ],
        )
        assert result.exit_code == 2
        assert "sha256" in result.output


class TestPublish:
    def test_publish_into_a_store_with_alias(self, pipeline: dict[str, Path]) -> None:
        result = _run(
            "publish",
            str(pipeline["model"]),
            "--models",
            str(pipeline["store"]),
            "--alias",
            "production",
        )
        assert "thyroid-seg:2" in result.output
        store = ModelStore(pipeline["store"])
        resolved = store.resolve("thyroid-seg@production")
        assert resolved.version == "2"
        assert (resolved.path / "model.onnx").read_bytes() == (
            pipeline["model"] / "model.onnx"
        ).read_bytes()

    def test_publishing_the_same_version_twice_is_refused(
        self, pipeline: dict[str, Path], tmp_path: Path
    ) -> None:
        store_root = tmp_path / "models"
        _run("publish", str(pipeline["model"]), "--models", str(store_root))
        result = CliRunner().invoke(
            main, ["publish", str(pipeline["model"]), "--models", str(store_root)]
        )
        assert result.exit_code == 2
        assert "already exists" in result.output
        with pytest.raises(ModelStoreError, match="already exists"):
            ModelStore(store_root).add(pipeline["model"])


class TestServedByANode:
    def test_published_version_is_served_by_a_running_node(
        self, pipeline: dict[str, Path], tmp_path: Path, node_factory: object
    ) -> None:
        """The trained model goes through publish into a store a running node serves from."""
        import pydicom

        from dicom_node.demo.phantoms import make_case
        from tests.conftest import THYROID_RULE, make_config, write_rules
        from tests.helpers.peers import StoreSCP, storescu
        from tests.helpers.waiting import wait_until

        store_root = tmp_path / "models"
        _run(
            "publish", str(pipeline["model"]), "--models", str(store_root), "--alias", "production"
        )
        rules = write_rules(tmp_path / "rules", THYROID_RULE % {"instances": 1}).parent
        with StoreSCP() as pacs:
            config = make_config(tmp_path, store_root, rules, pacs.port)
            node = node_factory(config)  # type: ignore[operator]
            case = make_case(4242, 64)
            path = tmp_path / "study.dcm"
            case.dataset.save_as(path, enforce_file_format=True)
            assert storescu([path], config.port, config.ae_title).returncode == 0
            (seg_path,) = wait_until(pacs.received, what="the SEG at the PACS")
            seg = pydicom.dcmread(seg_path)
            algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("thyroid-seg", "2")
            assert node.wait_idle(10)
            assert node.store.list_jobs()[0].model_version == "2"
