"""``dicom-node``: serve, demo, jobs, retry, status, and the ``rules`` and ``models`` groups.

Every verb takes ``--config FILE`` after the verb (default: the embedded defaults, then
``DICOM_NODE_<KEY>`` environment variables).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from dicom_node import __version__
from dicom_node.config import ConfigError, NodeConfig, load_config

if TYPE_CHECKING:  # imported where used: `dicom-node --help` stays quick
    from dicom_node.jobs.store import JobStore

LOGGER = logging.getLogger(__name__)

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Node configuration YAML (default: embedded defaults + DICOM_NODE_* variables).",
)


def get_config(path: Path | None) -> NodeConfig:
    """Load the configuration or exit with the precise error (exit code 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO: keep its noise (and any peer data) to warnings
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # highdicom logs source SOP Instance UIDs at INFO for every SEG: UIDs only at DEBUG here
    logging.getLogger("highdicom").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicom-node")
def main() -> None:
    """A headless DICOM node serving AI segmentation: C-STORE in, DICOM SEG out."""


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the node in the foreground until SIGTERM/SIGINT (graceful stop)."""
    config = get_config(config_path)
    setup_logging(config.log_level)
    from dicom_node.node import Node
    from dicom_node.ownership import StorageInUse

    try:
        node = Node(config)
        node.start()
    except StorageInUse as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start the node: {exc}") from exc
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        LOGGER.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stop.wait(0.05):  # stop accepting promptly after SIGTERM
        pass
    node.stop()


@main.command()
@config_option
@click.option("--size", type=click.Choice(["256", "128"]), default="256", show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the demo's storage and the received SEG (default: a temp folder).",
)
def demo(config_path: Path | None, size: str, seed: int, out: Path | None) -> None:
    """The whole loop on one machine: node, synthetic thyroid study, SEG back, Dice printed."""
    from dicom_node.demo.run import run_demo

    config = get_config(config_path)
    setup_logging("WARNING")
    try:
        report = run_demo(config, size=int(size), seed=seed, out=out)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"SEG received: {report.seg_path}")
    click.echo(f"model {report.model} version {report.version}, rule {report.rule}")
    click.echo(f"time from C-STORE to SEG: {report.seconds:.2f} s")
    for key, value in report.dice.items():
        click.echo(f"Dice {key}: {value:.3f} (against the phantom's truth)")


def _open_store(config: NodeConfig) -> JobStore:
    from dicom_node.jobs.store import JobStore

    if not (config.storage / "jobs.db").exists():
        raise click.ClickException(
            f"no job store at {config.storage / 'jobs.db'}: has a node run with this storage?"
        )
    return JobStore.open(config.storage)


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%m-%d %H:%M:%S")


@main.command()
@config_option
@click.option("--failed", is_flag=True, help="Only failed jobs.")
@click.option("--state", "states", multiple=True, help="Only jobs in this state (repeatable).")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--shadow",
    is_flag=True,
    help='Also list the latest shadow runs (JSON: objects with "kind": "shadow").',
)
def jobs(
    config_path: Path | None,
    failed: bool,
    states: tuple[str, ...],
    limit: int,
    as_json: bool,
    shadow: bool,
) -> None:
    """List jobs, newest first: state, rule, model version, destinations, error."""
    from dicom_node.jobs import JobState

    store = _open_store(get_config(config_path))
    wanted = ["failed"] if failed else list(states)
    try:
        chosen = [JobState(s) for s in wanted]
    except ValueError as exc:
        names = ", ".join(s.value for s in JobState)
        raise click.BadParameter(f"{exc}; states are: {names}", param_hint="--state") from exc
    rows = store.list_jobs(chosen or None, limit=limit)
    runs = store.shadow_results(limit=limit) if shadow else []
    if as_json:
        for row in rows:
            click.echo(row.to_json())
        for run in runs:
            click.echo(json.dumps(dict(run.to_dict(), kind="shadow"), sort_keys=True))
        return
    table = Table(title=f"jobs ({len(rows)} shown)")
    for col in ("id", "state", "rule", "model", "to", "updated", "outcome / error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        model = f"{r.model_name}:{r.model_version}" if r.model_version else (r.model_ref or "")
        table.add_row(
            str(r.id),
            r.state.value,
            r.rule or "",
            model,
            ",".join(r.destinations or ()),
            _when(r.updated_at),
            r.error or r.outcome or "",
        )
    console = Console()
    console.print(table)
    if shadow:
        runs_table = Table(title=f"shadow runs ({len(runs)} shown; never exported)")
        for col in ("job", "shadow", "production", "agreement (Dice)", "at"):
            runs_table.add_column(col, overflow="fold")
        for run in runs:
            runs_table.add_row(
                str(run.job_id),
                f"{run.model}:{run.version}",
                run.production_version or "",
                ", ".join(f"{k} {v:.3f}" for k, v in sorted(run.agreement.items())),
                _when(run.created_at),
            )
        console.print(runs_table)


@main.command()
@config_option
@click.argument("job_id", type=int)
def retry(config_path: Path | None, job_id: int) -> None:
    """Re-queue a failed job (re-export its SEG if it was built, else run it again)."""
    store = _open_store(get_config(config_path))
    try:
        job = store.retry(job_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"job {job_id} is {job.state.value} again; a running node picks it up")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def status(config_path: Path | None, as_json: bool) -> None:
    """Jobs by state, and the running node's readiness if it answers on http_port."""
    config = get_config(config_path)
    counts = _open_store(config).counts() if (config.storage / "jobs.db").exists() else {}
    ready: Any
    try:
        url = f"http://127.0.0.1:{config.http_port}/readyz"
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback only)
            ready = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        ready = json.loads(exc.read() or b"{}")
    except OSError:
        ready = None
    if as_json:
        click.echo(json.dumps({"jobs": counts, "node": ready}, indent=1))
        return
    console = Console()
    if ready is None:
        console.print(f"node: [yellow]not answering[/] on http port {config.http_port}")
    else:
        flag = "[green]ready[/]" if ready.get("ready") else "[red]not ready[/]"
        console.print(f"node: {flag}")
        for name, check in ready.get("checks", {}).items():
            console.print(f"  {name}: {'ok' if check['ok'] else 'FAIL'} - {check['detail']}")
    table = Table(title=f"jobs in {config.storage}")
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for state, n in counts.items():
        table.add_row(state, str(n))
    console.print(table)


@main.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
def cleanup(config_path: Path | None, dry_run: bool) -> None:
    """Delete the spooled instances and results of finished series past their retention age.

    The same pass a running node makes every ``retention.interval`` (done after
    ``retention.done_after``, failed after ``failed_after``, skipped after ``skipped_after``);
    a series with any unfinished job is never touched. Safe while the node runs. Prints what
    it freed (or, with --dry-run, would free) and writes it to the audit log. Exit code 0, or
    1 when there is no job store.
    """
    from dicom_node.audit import AuditLog

    config = get_config(config_path)
    store = _open_store(config)
    try:
        report = store.purge_expired(config.storage, config.retention, dry_run=dry_run)
    finally:
        store.close()
    states: dict[str, int] = {}
    for purged in report.series:
        for _job, state in purged.jobs:
            states[state] = states.get(state, 0) + 1
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no jobs"
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{verb} {report.files} file(s), {_human_bytes(report.bytes)} "
        f"({report.bytes} bytes) of {len(report.series)} series ({by_state})"
    )
    if report.leftover.files:
        click.echo(f"  of which {report.leftover.files} file(s) of an interrupted earlier pass")
    if dry_run:
        return
    from dicom_node.node import audit_retention

    audit_retention(AuditLog(config.storage / "audit.log"), report, by="cli")


def _human_bytes(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _add_groups() -> None:
    from dicom_node.models_cli import models
    from dicom_node.routing.cli import rules

    main.add_command(rules)
    main.add_command(models)


_add_groups()

if __name__ == "__main__":
    main()
