"""Command line: ``python -m training phantoms|split|train|cv|evaluate|export|publish``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

LOGGER = logging.getLogger("training")
CONSOLE = Console(stderr=True)


@contextmanager
def _bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A rich progress bar; yields ``update(done)`` or ``update(stage, done, total)``."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=CONSOLE, transient=False) as progress:
        task = progress.add_task(description, total=total)
        current = {"stage": description}

        def update(*args: int | str) -> None:
            if len(args) == 1:
                progress.update(task, completed=int(args[0]))
                return
            stage, done, total_ = args
            if stage != current["stage"]:
                current["stage"] = str(stage)
                progress.reset(task, description=str(stage))
            progress.update(task, completed=int(done), total=int(total_) or None)

        yield update


def _fail(message: str) -> None:
    CONSOLE.print(f"[red]error:[/red] {message}")
    sys.exit(2)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Train, evaluate, export and publish segmentation models for dicom-node."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=CONSOLE, show_path=False)],
    )


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Number of studies.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Master seed.")
@click.option(
    "--size",
    "sizes",
    type=int,
    multiple=True,
    default=(256,),
    show_default=True,
    help="Matrix size; repeat (--size 256 --size 128) to mix sizes.",
)
@click.option(
    "--family",
    type=click.Choice(["A", "B", "C", "D", "classic"]),
    default="A",
    show_default=True,
    help="Phantom family: A = the training style, B = a second style written independently "
    "(held out until version 3, trained on by version 4), "
    "C = a third independent style for reporting only (never trained on), "
    "D = a fourth style, for reporting only, never trained on, "
    "classic = the generator thyroid-seg:1 was trained on (training/README.md).",
)
def phantoms(out: Path, n: int, seed: int, sizes: tuple[int, ...], family: str) -> None:
    """Write N synthetic thyroid scintigraphy studies to OUT/<case>/image.dcm + truth.npz."""
    from dicom_node.demo.phantoms import write_cases

    with _bar("phantoms", n) as update:
        folders = write_cases(out, n, seed, list(sizes), progress=update, family=family)
    click.echo(f"wrote {len(folders)} cases to {out}")


@main.command("train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default="training/configs/thyroid.yaml",
    show_default=True,
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("var/training/run"),
    show_default=True,
    help="Output folder for checkpoints and the learning curve.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Case folders (overrides data.train of the config).",
)
@click.option("--skip-bad", is_flag=True, help="Skip and list bad cases instead of stopping.")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue the run in RUN_DIR after its last finished epoch (its recorded config, "
    "data, split and fold; --config, --out, --data, --split and --fold are ignored).",
)
@click.option(
    "--split",
    "split_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Split file (python -m training split): train and validate on its patients; its test "
    "patients' folders are never opened. Default: the config's data.split, else val_fraction.",
)
@click.option(
    "--fold",
    type=click.IntRange(min=1),
    default=None,
    help="Cross-validation fold K (1-based) of the split file's folds: validate on fold K, "
    "train on the others.",
)
@click.option(
    "--init",
    "init_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Start from these weights (fine-tuning): a checkpoint of an earlier run (best.pt) or a "
    "published version's folder (models/NAME/VERSION); default the config's train.init. "
    "Optimiser and schedule start afresh.",
)
def train_cmd(
    config_path: str | None,
    out: Path,
    data_dir: Path | None,
    skip_bad: bool,
    resume_dir: Path | None,
    split_path: Path | None,
    fold: int | None,
    init_path: Path | None,
) -> None:
    """Train a U-Net from a config; writes best.pt, last.pt, history.csv/json, run.json to OUT."""
    from training.data import DataError
    from training.runrecord import read_run_record
    from training.train import load_config, train

    try:
        if resume_dir is not None:
            record = read_run_record(resume_dir)
            config, out = record["config"], resume_dir
            data_dir, config_path = Path(record["data_dir"]), record.get("config_path")
            recorded = record.get("split") or {}
            split_path = Path(recorded["file"]) if recorded.get("file") else None
            fold = recorded.get("fold")
        else:
            config = load_config(config_path or "training/configs/thyroid.yaml")
        with _bar("load", None) as update:
            result = train(
                config,
                out,
                data_dir=data_dir,
                skip_bad=skip_bad,
                config_path=config_path,
                progress=update,
                resume=resume_dir is not None,
                split=split_path,
                fold=fold,
                init=None if resume_dir is not None else init_path,
            )
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    for line in result.skipped:
        click.echo(f"skipped: {line}")
    click.echo(
        f"best epoch {result.best_epoch} (validation score {result.best_score:.4f}); "
        f"{result.stopped}; checkpoint {result.best_checkpoint}"
    )


@main.command("split")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Split file to write (YAML).",
)
@click.option("--val-fraction", type=float, default=0.15, show_default=True)
@click.option(
    "--test-fraction",
    type=float,
    default=0.15,
    show_default=True,
    help="Patients held out as the test split (0: none).",
)
@click.option(
    "--folds",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also partition train + val into N folds for `cv` / `train --fold K` (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def split_cmd(
    data_dir: Path, out: Path, val_fraction: float, test_fraction: float, folds: int, seed: int
) -> None:
    """Write a split file for DATA_DIR by PatientID (reads DICOM headers only)."""
    from training.splits import make_split, write_split

    if folds == 1:
        _fail("--folds must be 0 (none) or at least 2")
    try:
        data = make_split(
            data_dir,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
        )
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        return
    write_split(data, out)
    click.echo(
        f"wrote {out}: {len(data['patients'])} patients; train {len(data['train'])}, val "
        f"{len(data['val'])}, test {len(data['test'])}"
        + (f", {len(data['folds'])} folds" if "folds" in data else "")
    )


@main.command("cv")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
)
@click.option(
    "--split",
    "split_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Split file with folds (python -m training split DATA --folds N).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for fold-1 ... fold-N runs and cv.json / cv.md.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Case folders (overrides data.train of the config).",
)
def cv_cmd(config_path: str, split_path: Path, out: Path, data_dir: Path | None) -> None:
    """Cross-validation: `train --fold K` for every fold, then a summary over the folds."""
    from training.data import DataError
    from training.splits import read_split, render_summary, summarise_folds
    from training.train import load_config, train

    try:
        config = load_config(config_path)
        split = read_split(split_path)
        if not split.folds:
            raise ValueError(f"{split_path}: no folds (python -m training split --folds N)")
        runs = []
        for k in range(1, len(split.folds) + 1):
            run = out / f"fold-{k}"
            with _bar(f"fold {k}", None) as update:
                train(
                    config,
                    run,
                    data_dir=data_dir,
                    config_path=config_path,
                    progress=update,
                    split=split,
                    fold=k,
                )
            runs.append(run)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    summary = summarise_folds(runs)
    (out / "cv.json").write_text(json.dumps(summary, indent=1))
    (out / "cv.md").write_text(render_summary(summary))
    click.echo(render_summary(summary))
    click.echo(f"summary: {out / 'cv.json'}")


@main.command("export")
@click.option(
    "--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Version folder to write (model.onnx + manifest.yaml).",
)
@click.option("--name", default=None, help="Model name (default: the config's model.name).")
@click.option("--version", "version", default=None, help="Version (default: OUT's folder name).")
@click.option(
    "--report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="report.json of an evaluation, copied into the manifest metrics; repeat to record "
    "several (the first gives the top-level figures, each is kept under metrics.evaluations "
    "by its folder's name).",
)
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True)
@click.option(
    "--reference",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Case folders to copy as the promotion gate's reference set (reference_data).",
)
@click.option(
    "--reference-n",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="How many reference cases to copy.",
)
@click.option(
    "--reference-split",
    "reference_split",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Split file: copy only the test split's case folders of --reference (held-out "
    "patients, never trained on).",
)
@click.option(
    "--inference",
    "inference_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="YAML with postprocess / tta / probabilities / thresholds / confidence chosen on "
    "validation data (and the report's measurements); replaces the training config's model keys.",
)
def export_cmd(
    checkpoint: Path,
    out: Path,
    name: str | None,
    version: str | None,
    report: tuple[Path, ...],
    opset: int,
    reference: Path | None,
    reference_n: int,
    reference_split: Path | None,
    inference_file: Path | None,
) -> None:
    """Export a checkpoint to ONNX (parity-checked) with its manifest.yaml."""
    import tempfile

    from ruamel.yaml import YAML

    from training.export import ParityError, export_model
    from training.splits import split_folders

    if reference_split is not None and reference is None:
        _fail("--reference-split needs --reference DATA (the folder the split file describes)")
    staging = tempfile.TemporaryDirectory(prefix="reference-")
    try:
        if reference is not None and reference_split is not None:
            # the test split's folders, linked into one folder for the copy
            for folder in split_folders(reference_split, reference, "test"):
                (Path(staging.name) / folder.name).symlink_to(folder.resolve())
            reference = Path(staging.name)
        inference = None
        if inference_file is not None:
            try:
                inference = YAML(typ="safe").load(inference_file.read_text(encoding="utf-8"))
            except Exception as exc:  # ruamel raises many error types; all mean "not YAML"
                raise ValueError(f"{inference_file}: not valid YAML: {exc}") from None
            inference = inference or {}
            if not isinstance(inference, dict):
                raise ValueError(f"{inference_file}: must be a mapping of settings")
        result = export_model(
            checkpoint,
            out,
            name=name,
            version=version,
            report=list(report),
            opset=opset,
            reference=reference,
            reference_n=reference_n,
            inference=inference,
        )
    except (ParityError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    finally:
        staging.cleanup()
    click.echo(
        f"exported {result.onnx_path} ({result.size_bytes / 1e6:.2f} MB, max |ONNX - torch| "
        f"{result.max_abs_diff:.2e}); manifest {result.manifest_path}"
    )


@main.command("evaluate")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Version folder with model.onnx + manifest.yaml.",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Case folders with masks.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option(
    "--history",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="history.json of the training run (learning curves).",
)
@click.option("--skip-bad", is_flag=True, help="Skip and list bad cases instead of stopping.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Training config whose train.segments (lesion: true) and display apply (default: the "
    "config recorded in the manifest).",
)
@click.option(
    "--split",
    "split_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Split file: evaluate only its test split's case folders (see --on).",
)
@click.option(
    "--on",
    "split_name",
    type=click.Choice(["test", "val", "train"]),
    default="test",
    show_default=True,
    help="Which split of --split to evaluate.",
)
def evaluate_cmd(
    model_dir: Path,
    data_dir: Path,
    out: Path,
    history: Path | None,
    skip_bad: bool,
    config_path: Path | None,
    split_path: Path | None,
    split_name: str,
) -> None:
    """Run the exported model on every case; write report.json, report.md and overlays."""
    from training.data import DataError
    from training.evaluate import evaluate
    from training.splits import split_folders
    from training.train import load_config

    try:
        config = load_config(config_path) if config_path else None
        folders = split_folders(split_path, data_dir, split_name) if split_path else None
        with _bar("evaluate", None) as update:
            report = evaluate(
                model_dir,
                data_dir,
                out,
                history=history,
                skip_bad=skip_bad,
                progress=update,
                config=config,
                folders=folders,
            )
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    from training.evaluate import _jsonable

    summary = {
        "mean": report["mean"],
        "mean_3d": report.get("mean_3d"),
        "detection": report.get("detection"),
    }
    click.echo(json.dumps(_jsonable(summary), indent=1))
    click.echo(f"report: {out / 'report.md'}")


@main.command("publish")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--models",
    "models_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
    help="Model store root.",
)
@click.option("--alias", default=None, help="Point this alias (e.g. candidate) at the new version.")
@click.option(
    "--allow-contract-change",
    is_flag=True,
    help="Accept segments that differ from the previous version's.",
)
def publish_cmd(
    model_dir: Path, models_root: Path, alias: str | None, allow_contract_change: bool
) -> None:
    """Add MODEL_DIR to the model store (same checks as `dicom-node models add`)."""
    from dicom_node.modelstore.store import ModelStoreError
    from training.publish import publish

    try:
        resolved = publish(
            model_dir, models_root, alias=alias, allow_contract_change=allow_contract_change
        )
    except (ModelStoreError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    via = f" as {resolved.alias}" if resolved.alias else ""
    click.echo(f"published {resolved.ref}{via} to {resolved.path}")


if __name__ == "__main__":
    main()
