"""``dicom-node models ...``: list, show, add, promote, rollback, shadow, canary.

Every verb takes ``--models DIR`` (default: ``models`` of the configuration) and ``--config FILE``.
Errors print one precise line and exit with status 1.
"""

from __future__ import annotations

import functools
import io
import logging
import statistics
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from ruamel.yaml import YAML

from dicom_node.modelstore.aliases import CANARY, PRODUCTION, SHADOW, append_history
from dicom_node.modelstore.refs import ModelRefError, parse_model_ref
from dicom_node.modelstore.store import ModelStore, ModelStoreError

LOGGER = logging.getLogger(__name__)

METRICS_TIMEOUT = 1.0
"""Seconds ``show`` waits for a running node's /metrics before leaving the live section out."""


def _config(config_path: Path | None) -> Any:
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _store_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--models`` and ``--config`` and pass a ``store`` (and ``config_path``) instead."""

    @click.option(
        "--models",
        "models_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Model store folder (default: 'models' of the configuration).",
    )
    @click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Node configuration YAML (default: embedded defaults + DICOM_NODE_* variables).",
    )
    @functools.wraps(func)
    def wrapper(models_dir: Path | None, config_path: Path | None, **kwargs: Any) -> Any:
        root = models_dir if models_dir is not None else _config(config_path).models
        try:
            return func(store=ModelStore(root), config_path=config_path, **kwargs)
        except (ModelStoreError, ModelRefError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _console() -> Console:
    # piped output (scripts, tests) gets wide tables instead of 80-column wrapping
    width = None if sys.stdout.isatty() else 160
    return Console(highlight=False, soft_wrap=True, width=width)


def _size(path: Path) -> str:
    total: float = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for unit in ("B", "kB", "MB", "GB"):
        if total < 1000 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1000
    return f"{total:.1f} GB"  # pragma: no cover


def _headline(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, dict) and "dice" in value:
            parts.append(f"{key} Dice {float(value['dice']):.3f}")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{key} {value:g}")
    return ", ".join(parts[:4])


def _alias_labels(aliases: dict[str, Any]) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        if isinstance(target, dict):
            labels.setdefault(target["version"], []).append(f"{alias} {target['percent']}%")
        else:
            labels.setdefault(target, []).append(alias)
    return labels


@click.group("models")
def models() -> None:
    """Manage the model store: versions, aliases, shadow and canary."""


@models.command("list")
@_store_command
def list_cmd(store: ModelStore, config_path: Path | None) -> None:
    """List models, versions, aliases, sizes, short sha256 and headline metrics."""
    console = _console()
    names = store.list_models()
    if not names:
        console.print(f"no models in {store.root}")
        return
    table = Table(title=f"models in {store.root}")
    for column in ("model", "version", "aliases", "size", "sha256", "metrics"):
        table.add_column(column)
    for name in names:
        try:
            labels = _alias_labels(store.aliases(name))
        except ModelStoreError as exc:
            labels = {}
            console.print(f"[red]{exc}[/]")
        for version in store.versions(name):
            try:
                manifest = store.manifest(name, version)
            except ModelStoreError as exc:
                table.add_row(name, version, "", "", "", f"[red]invalid: {exc}[/]")
                continue
            table.add_row(
                name,
                version,
                ", ".join(labels.get(version, [])),
                _size(store.model_dir(name) / version),
                manifest.sha256[:12],
                _headline(manifest.metrics),
            )
    console.print(table)


def _yaml_text(data: Any) -> str:
    yaml = YAML()  # round-trip dumper: keeps the manifest's field order
    yaml.default_flow_style = False
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def _node_metrics(config_path: Path | None, name: str) -> list[str] | None:
    """Inference counts/latency and shadow agreement of ``name`` from a running node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        port = _config(config_path).http_port
    except click.ClickException:
        return None
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/metrics", timeout=METRICS_TIMEOUT
        ) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    counts: dict[tuple[str, str], float] = {}
    durations: dict[str, list[float]] = {}
    agreement: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != name:
                continue
            version = labels.get("version", "")
            if sample.name.endswith("inference_request_success_total"):
                counts[(version, "ok")] = sample.value
            elif sample.name.endswith("inference_request_failure_total"):
                counts[(version, "failed")] = sample.value
            elif sample.name.endswith("inference_duration_seconds_sum"):
                durations.setdefault(version, [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("inference_duration_seconds_count"):
                durations.setdefault(version, [0.0, 0.0])[1] = sample.value
            elif sample.name.endswith("shadow_agreement_sum"):
                agreement.setdefault((version, labels["segment"]), [0.0, 0.0])[0] = sample.value
            elif sample.name.endswith("shadow_agreement_count"):
                agreement.setdefault((version, labels["segment"]), [0.0, 0.0])[1] = sample.value
    lines = []
    for version in sorted({v for v, _ in counts} | set(durations)):
        total, n = durations.get(version, [0.0, 0.0])
        mean = f", mean {1000 * total / n:.0f} ms" if n else ""
        lines.append(
            f"version {version}: {counts.get((version, 'ok'), 0):.0f} ok, "
            f"{counts.get((version, 'failed'), 0):.0f} failed{mean}"
        )
    for (version, segment), (total, n) in sorted(agreement.items()):
        if n:
            lines.append(
                f"shadow {version} agreement {segment}: mean Dice {total / n:.3f} over {n:.0f}"
            )
    return lines


SHADOW_RUNS = 1000
"""How many of the latest shadow runs in the job store ``show`` summarises."""


def _shadow_summary(config_path: Path | None, name: str) -> list[str]:
    """Dice agreement per shadow version and segment from the node's job store, if any, with
    the 3-D Dice, IoU and HD95 of the runs that recorded them (median, mean, worst series)."""
    try:
        config = _config(config_path)
    except click.ClickException:
        return []
    storage = config.storage
    if config.database is None and not (storage / "jobs.db").is_file():
        return []
    from dicom_node.jobs.store import JobStore

    try:
        store = JobStore.for_config(config)
    except Exception as exc:  # unreachable or refused: the summary is optional
        LOGGER.debug("no shadow summary: %s", exc)
        return []
    try:
        runs = store.shadow_results(model=name, limit=SHADOW_RUNS)
    except Exception as exc:  # an old or foreign database: the summary is optional
        LOGGER.debug("no shadow summary from %s: %s", storage, exc)
        return []
    finally:
        store.close()
    scores: dict[tuple[str, str], list[float]] = {}
    measured: dict[tuple[str, str], list[tuple[int, Any]]] = {}
    for run in runs:
        for segment, value in run.agreement.items():
            scores.setdefault((run.version, segment), []).append(float(value))
        for segment, values in (run.scores or {}).items():
            measured.setdefault((run.version, segment), []).append((run.job_id, values))
    lines = []
    for version, segment in sorted(set(scores) | set(measured)):
        v = scores.get((version, segment))
        if v:
            lines.append(
                f"shadow {version} agreement {segment}: mean Dice {sum(v) / len(v):.3f} over "
                f"{len(v)} run(s), min {min(v):.3f}"
            )
        lines.extend(_scores_lines(measured.get((version, segment), [])))
    return lines


def _stats(values: list[float], digits: str) -> str:
    return f"median {statistics.median(values):{digits}} mean {statistics.fmean(values):{digits}}"


def _scores_lines(runs: list[tuple[int, Any]]) -> list[str]:
    """IoU and HD95 beside Dice (median, mean, worst series) of the runs that recorded them.

    Runs of versions before revision 0004 have no scores and are not counted here; runs where
    both versions left the segment empty are counted as "no evidence", not as agreement.
    """
    if not runs:
        return []
    rated = [(job, s) for job, s in runs if s["dice"] is not None]
    lines = []
    empty = len(runs) - len(rated)
    if rated:
        dice = [float(s["dice"]) for _, s in rated]
        iou = [float(s["iou"]) for _, s in rated]
        hd = [float(s["hd95_mm"]) for _, s in rated if s["hd95_mm"] is not None]
        text = f"    3-D over {len(rated)} series: Dice {_stats(dice, '.3f')}"
        text += f"; IoU {_stats(iou, '.3f')}"
        if hd:
            text += f"; HD95 {_stats(hd, '.1f')} mm"
        if len(hd) < len(rated):
            text += f" ({len(rated) - len(hd)} series with one version empty: no HD95)"
        lines.append(text)
        job, worst = min(rated, key=lambda item: (float(item[1]["dice"]), -item[0]))
        hd95 = worst["hd95_mm"]
        lines.append(
            f"    worst series: job {job}, Dice {float(worst['dice']):.3f}, "
            f"IoU {float(worst['iou']):.3f}, "
            f"HD95 {'-' if hd95 is None else format(float(hd95), '.1f') + ' mm'}"
        )
    if empty:
        lines.append(f"    {empty} series with both versions empty: no evidence, not counted")
    return lines


@models.command("show")
@click.argument("ref")
@click.option(
    "--history",
    "history_lines",
    default=10,
    show_default=True,
    help="How many of the latest history entries to show.",
)
@_store_command
def show_cmd(store: ModelStore, config_path: Path | None, ref: str, history_lines: int) -> None:
    """Show NAME[@ALIAS|:VERSION]: manifest, aliases, shadow/canary, history, live counts."""
    console = _console()
    name, alias, version = parse_model_ref(ref).as_tuple()
    if not store.model_dir(name).is_dir():
        raise ModelStoreError(f"no model {name!r} in {store.root}")
    aliases = store.aliases(name)
    console.print(f"[bold]{name}[/] in {store.root}")
    console.print(f"versions: {', '.join(store.versions(name)) or 'none'}")
    console.print("aliases:")
    for key in sorted(aliases, key=lambda a: (a != PRODUCTION, a)):
        target = aliases[key]
        if isinstance(target, dict):
            console.print(f"  {key}: {target['version']} ({target['percent']}% of studies)")
        else:
            console.print(f"  {key}: {target}")
    for key in (SHADOW, CANARY):
        if key not in aliases:
            console.print(f"  {key}: off")
    if version is not None:
        resolved = store.resolve(f"{name}:{version}")
    elif alias in aliases:
        resolved = store.resolve(f"{name}@{alias}")
    else:
        resolved = None
        console.print(f"\nalias {alias!r} is not set")
    if resolved is not None:
        console.print(f"\n[bold]manifest of {resolved.ref}[/] ({resolved.path})")
        console.print(_yaml_text(resolved.manifest.to_dict()), markup=False)
    history = store.history(name)
    if history:
        console.print(f"[bold]history[/] (last {min(history_lines, len(history))})")
        for entry in history[-history_lines:]:
            gate = entry.get("gate")
            verdict = ""
            if isinstance(gate, dict):
                verdict = " gate " + ("passed" if gate.get("passed") else "refused")
                verdict += " (forced)" if gate.get("forced") else ""
            console.print(
                f"  {entry.get('time', '?')} {entry.get('reason', '?')}: "
                f"{entry.get('alias') or 'version'} {entry.get('from')} -> {entry.get('to')}"
                f"{verdict}",
                markup=False,
            )
    summary = _shadow_summary(config_path, name)
    if summary:
        console.print("[bold]shadow runs in the job store[/]")
        for line in summary:
            console.print(f"  {line}", markup=False)
    live = _node_metrics(config_path, name)
    if live:
        console.print("[bold]running node[/]")
        for line in live:
            console.print(f"  {line}", markup=False)


@models.command("add")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--allow-contract-change",
    is_flag=True,
    help="Accept segments (keys, labels, codes) that differ from production's.",
)
@_store_command
def add_cmd(
    store: ModelStore, config_path: Path | None, path: Path, allow_contract_change: bool
) -> None:
    """Copy the version folder PATH into the store (atomic; refuses on any problem)."""
    resolved = store.add(path, allow_contract_change=allow_contract_change)
    click.echo(f"added {resolved.ref} ({resolved.sha256[:12]}) at {resolved.path}")


@models.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default=PRODUCTION, show_default=True, help="Alias to point.")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Reference set (case folders with image.dcm + truth.npz).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="Largest allowed drop of any segment's mean Dice.",
)
@click.option(
    "--min-dice",
    "min_dice",
    multiple=True,
    metavar="KEY=VALUE",
    help="Floor of a segment's mean Dice (repeatable); the manifest's gate.min_dice and "
    "models/<name>/gate.yaml add theirs, the highest wins.",
)
@click.option("--force", is_flag=True, help="Promote even if the gate refuses or cannot run.")
@_store_command
def promote_cmd(
    store: ModelStore,
    config_path: Path | None,
    name: str,
    version: str,
    alias: str,
    data: Path | None,
    tolerance: float,
    min_dice: tuple[str, ...],
    force: bool,
) -> None:
    """Point ALIAS (default production) at VERSION after the promotion gate."""
    from dicom_node.modelstore.gate import GateError, run_gate

    store.manifest(name, version)  # unknown version: precise error before any work
    floors: dict[str, float] = {}
    for item in min_dice:
        key, sep, value = item.partition("=")
        try:
            floors[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise click.BadParameter(f"must be KEY=VALUE, got {item!r}", param_hint="--min-dice")
    gate: dict[str, Any] | None = None
    if alias == PRODUCTION or data is not None:
        try:
            result = run_gate(store, name, version, data=data, tolerance=tolerance, min_dice=floors)
        except GateError as exc:
            if not force:
                raise click.ClickException(f"promotion gate cannot run: {exc}") from exc
            gate = {"passed": False, "forced": True, "skipped": str(exc)}
            click.echo(f"gate skipped (--force): {exc}")
        else:
            gate = result.to_dict()
            for line in result.report():
                click.echo(line)
            if not result.passed:
                gate["forced"] = force
                if not force:
                    append_history(
                        store.model_dir(name),
                        {
                            "alias": None,
                            "from": None,
                            "to": version,
                            "reason": "gate refused",
                            "gate": gate,
                        },
                    )
                    raise click.ClickException(
                        f"promotion of {name}:{version} to {alias} refused by the gate: "
                        + "; ".join(result.reasons)
                        + " (use --force to promote anyway)"
                    )
                click.echo("gate refused, promoting anyway (--force)")
    entry = store.promote(name, version, alias=alias, gate_result=gate)
    click.echo(f"{name}: {alias} {entry['from']} -> {entry['to']}")


@models.command("rollback")
@click.argument("name")
@_store_command
def rollback_cmd(store: ModelStore, config_path: Path | None, name: str) -> None:
    """Point production back at the previous production version (from the history)."""
    entry = store.rollback(name)
    click.echo(f"{name}: production {entry['from']} -> {entry['to']} (rollback)")


@models.command("shadow")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--off", is_flag=True, help="Stop the shadow.")
@_store_command
def shadow_cmd(
    store: ModelStore, config_path: Path | None, name: str, version: str | None, off: bool
) -> None:
    """Run VERSION in shadow of production (never exported), or stop with --off."""
    if off == (version is not None):
        raise click.ClickException("give either VERSION or --off")
    entry = store.shadow(name, None if off else version)
    click.echo(f"{name}: shadow {entry['from'] or 'off'} -> {entry['to'] or 'off'}")


@models.command("canary")
@click.argument("name")
@click.argument("version", required=False)
@click.argument("percent", required=False, type=click.IntRange(0, 100))
@click.option("--off", is_flag=True, help="Stop the canary.")
@_store_command
def canary_cmd(
    store: ModelStore,
    config_path: Path | None,
    name: str,
    version: str | None,
    percent: int | None,
    off: bool,
) -> None:
    """Send PERCENT % of studies (chosen by StudyInstanceUID) to VERSION, or stop with --off."""
    if off:
        if version is not None:
            raise click.ClickException("give either VERSION PERCENT or --off")
        entry = store.canary(name, None)
        click.echo(f"{name}: canary off")
        return
    if version is None or percent is None:
        raise click.ClickException("give VERSION and PERCENT (0-100), or --off")
    entry = store.canary(name, version, percent)
    click.echo(f"{name}: canary {entry['to']['version']} at {entry['to']['percent']}% of studies")


if __name__ == "__main__":
    models()
