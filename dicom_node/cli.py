"""``dicom-node``: serve, demo, jobs, retry, rerun, release, discard, status, migrate, and the
``rules`` and ``models`` groups.

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
import time
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
    # alembic narrates every schema step at INFO; the job store logs the upgrade itself
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # highdicom logs source SOP Instance UIDs at INFO for every SEG: UIDs only at DEBUG here
    logging.getLogger("highdicom").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicom-node")
def main() -> None:
    """A headless DICOM node serving AI segmentation: C-STORE in, DICOM SEG out."""


@main.command()
@config_option
@click.option(
    "--role",
    type=click.Choice(["all", "receiver", "worker"]),
    default=None,
    help="What this process runs: receiver (DICOM listener, spool, routing), worker (claims "
    "jobs: inference, results, export) or all (default: the config's 'role', else all). "
    'Several processes need a server database (README "Scaling out").',
)
def serve(config_path: Path | None, role: str | None) -> None:
    """Run the node in the foreground until SIGTERM/SIGINT (graceful stop)."""
    config = get_config(config_path)
    if role is not None:
        config = config.model_copy(update={"role": role})
    setup_logging(config.log_level)
    from dicom_node.jobs.schema import StoreError
    from dicom_node.node import Node
    from dicom_node.ownership import StorageInUse

    try:
        node = Node(config)
        node.start()
    except (StorageInUse, StoreError) as exc:
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
    from dicom_node.jobs.schema import StoreError
    from dicom_node.jobs.store import JobStore

    if config.database is None and not (config.storage / "jobs.db").exists():
        raise click.ClickException(
            f"no job store at {config.storage / 'jobs.db'}: has a node run with this storage?"
        )
    try:
        return JobStore.for_config(config)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None


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
        # runs recorded before revision 0004 have no IoU/HD95: no empty column for them
        scored = any(run.scores is not None for run in runs)
        columns = ["job", "shadow", "production", "agreement (Dice)"]
        for col in [*columns, *(["3-D IoU, HD95"] if scored else []), "at"]:
            runs_table.add_column(col, overflow="fold")
        for run in runs:
            cells = [
                str(run.job_id),
                f"{run.model}:{run.version}",
                run.production_version or "",
                ", ".join(f"{k} {v:.3f}" for k, v in sorted(run.agreement.items())),
            ]
            if scored:
                cells.append(_shadow_scores_text(run.scores))
            runs_table.add_row(*cells, _when(run.created_at))
        console.print(runs_table)


def _shadow_scores_text(scores: Any) -> str:
    """``thyroid 0.618, 2.6 mm; nodule no evidence`` (empty for runs from before the scores)."""
    parts = []
    for key, v in sorted((scores or {}).items()):
        if v["iou"] is None:
            parts.append(f"{key} no evidence")  # both versions empty
        else:
            hd95 = "-" if v["hd95_mm"] is None else f"{v['hd95_mm']:.1f} mm"
            parts.append(f"{key} {v['iou']:.3f}, {hd95}")
    return "; ".join(parts)


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
@click.argument("job_id", type=int, required=False)
@click.option("--series", "series_uid", default=None, help="Re-run every job of this series.")
@click.option(
    "--version",
    "version",
    default=None,
    help="Model version to run (default: resolve the job's model reference again, i.e. the "
    "rule's alias - the current production).",
)
def rerun(
    config_path: Path | None, job_id: int | None, series_uid: str | None, version: str | None
) -> None:
    """Process a finished job's stored instances again: JOB_ID, or --series UID.

    With --version V that version runs: a version other than the one that made the result gives
    a SEG with new UIDs, which the PACS stores beside the earlier one; the same version gives the
    same UIDs, so the PACS replaces it. Without --version the job's model reference is resolved
    again (the rule's alias: the current production). Refused (exit 1) when the job is in
    flight, the version does not exist, or the instances are gone (retention deleted them):
    resend the study then.
    """
    from dicom_node.audit import AuditLog

    if (job_id is None) == (series_uid is None):
        raise click.UsageError("give a JOB_ID or --series UID (one of them)")
    config = get_config(config_path)
    store = _open_store(config)
    try:
        if job_id is not None:
            job = store.get(job_id)
            if job is None:
                raise click.ClickException(
                    f"no job with id {job_id} (finished jobs are deleted with their instances "
                    f"after the retention period; dicom-node jobs lists the current ones)"
                )
            targets = [job]
        else:
            targets = store.jobs_for_series(str(series_uid))
            if not targets:
                raise click.ClickException(
                    f"no job for series {series_uid}: never received here, or deleted with its "
                    f"instances after the retention period; resend the study from the PACS"
                )
        _check_rerun_inputs(config, store, targets[0].series_uid)
        done = []
        for job in targets:
            name = job.model_name or _model_of(job.model_ref)
            if version is not None:
                _check_version(config, name, version)
            try:
                done.append(store.rerun(job.id, name, version))
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    audit = AuditLog(config.storage / "audit.log")
    for job in done:
        audit.write("rerun", job=job.id, rule=job.rule, by="cli", outcome=job.outcome)
        click.echo(f"job {job.id} queued: {job.outcome}; a running node picks it up")


def _model_of(ref: str | None) -> str:
    from dicom_node.modelstore import ModelRefError, parse_model_ref

    try:
        return parse_model_ref(ref or "").name
    except ModelRefError as exc:
        raise click.ClickException(f"the job has no usable model reference ({exc})") from exc


def _check_version(config: NodeConfig, name: str, version: str) -> None:
    """Exit 1 unless ``name:version`` is in the model store."""
    from dicom_node.modelstore import ModelStore, ModelStoreError

    store = ModelStore(config.models)
    try:
        store.resolve(f"{name}:{version}")
    except ModelStoreError as exc:
        known = ", ".join(store.versions(name)) or "none"
        raise click.ClickException(
            f"cannot re-run with {name}:{version}: {exc} (versions of {name}: {known})"
        ) from exc


def _check_rerun_inputs(config: NodeConfig, store: JobStore, series_uid: str) -> None:
    """Exit 1 unless every stored instance of the series is still on disk."""
    rows = store.series_instances(series_uid)
    gone = [r for r in rows if not (config.storage / r.path).is_file()]
    if not rows or gone:
        raise click.ClickException(
            f"the instances of this series are gone ({len(gone) if rows else 'all'} of "
            f"{len(rows)} missing from {config.storage}; retention deletes them after "
            f"retention.done_after): resend the study from the PACS instead"
        )


def _decide_held(config_path: Path | None, job_id: int, verb: str) -> Any:
    """Release or discard a held job, with its audit line; exit 1 with the reason otherwise."""
    from dicom_node.audit import AuditLog

    config = get_config(config_path)
    store = _open_store(config)
    try:
        job = store.release_held(job_id) if verb == "release" else store.discard_held(job_id)
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()
    event = "released" if verb == "release" else "discarded"
    AuditLog(config.storage / "audit.log").write(
        event, job=job_id, rule=job.rule, by="cli", outcome=job.outcome
    )
    return job


@main.command()
@config_option
@click.argument("job_id", type=int)
def release(config_path: Path | None, job_id: int) -> None:
    """Export a held job's results after all (a rule's on_low_confidence: hold kept them back).

    The results are sent as built, still flagged LOW CONFIDENCE in every output. Exit code 0,
    or 1 when the job does not exist or is not held (dicom-node jobs --state held lists them).
    """
    job = _decide_held(config_path, job_id, "release")
    click.echo(f"job {job_id} released: {job.state.value}; a running node sends its results")


@main.command()
@config_option
@click.argument("job_id", type=int)
def discard(config_path: Path | None, job_id: int) -> None:
    """Drop a held job's results: nothing is exported, the job ends skipped saying why.

    Exit code 0, or 1 when the job does not exist or is not held.
    """
    job = _decide_held(config_path, job_id, "discard")
    click.echo(f"job {job_id} {job.state.value}: {job.outcome}")


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def status(config_path: Path | None, as_json: bool) -> None:
    """Jobs by state, the processes on the job store, and the local node's readiness.

    Processes: every ``dicom-node serve`` registered on this job store (receivers and workers
    of every host), with its role, host, pid, the age of its last heartbeat and its state:
    ``alive`` (heartbeat within ``process_lease``), ``dead`` (silent longer: the jobs it held
    are taken back by another process) or ``stopped`` (stopped gracefully).
    """
    config = get_config(config_path)
    counts: dict[str, int] = {}
    procs: list[dict[str, Any]] = []
    held: list[Any] = []
    if config.database is not None or (config.storage / "jobs.db").exists():
        store = _open_store(config)
        try:
            counts = store.counts()
            held = store.list_jobs(["held"], limit=20) if counts.get("held") else []
            now = time.time()
            lease = config.process_lease
            procs = [p.to_dict(now, lease) for p in store.list_processes()]
        finally:
            store.close()
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
        waiting = [{"id": j.id, "rule": j.rule, "outcome": j.outcome} for j in held]
        click.echo(
            json.dumps(
                {"jobs": counts, "held": waiting, "processes": procs, "node": ready}, indent=1
            )
        )
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
    if held:  # a person has to decide on these: say which and why
        console.print("held (dicom-node release JOB_ID / dicom-node discard JOB_ID):")
        for job in held:
            console.print(f"  job {job.id} ({job.rule}): {job.outcome}", markup=False)
    console.print(_processes_table(procs))


_PROCESS_STATE_STYLE = {"alive": "green", "dead": "red", "stopped": "dim"}


def _processes_table(procs: list[dict[str, Any]]) -> Table:
    """``dicom-node status``: one row per registered process, newest first."""
    table = Table(title=f"processes ({len(procs)})")
    for col in ("id", "node", "role", "host", "pid", "heartbeat", "state", "version"):
        table.add_column(col, overflow="fold")
    for p in procs:
        style = _PROCESS_STATE_STYLE.get(p["state"], "")
        table.add_row(
            p["id"],
            str((p["details"] or {}).get("node", "")),
            p["role"],
            p["host"],
            str(p["pid"]),
            f"{p['heartbeat_age']:.1f} s ago",
            f"[{style}]{p['state']}[/]" if style else p["state"],
            p["version"] or "",
        )
    return table


@main.command()
@config_option
@click.option(
    "--dry-run", is_flag=True, help="Only say which revision the store is at and would reach."
)
@click.option("--sql", "as_sql", is_flag=True, help="Print the SQL of the upgrade; change nothing.")
def migrate(config_path: Path | None, dry_run: bool, as_sql: bool) -> None:
    """Upgrade the job store (``database:``, else ``storage/jobs.db``) to this version's schema.

    A node does this itself at start unless the config says ``migrate: never``. Stop every
    process on the store and back the database up first; concurrent starts wait for the upgrade.
    """
    from dicom_node.jobs import migrations
    from dicom_node.jobs.schema import StoreError, engine_for, safe_url

    config = get_config(config_path)
    setup_logging("WARNING")
    target = config.database or str(config.storage / "jobs.db")
    if config.database is None and not (config.storage / "jobs.db").exists():
        raise click.ClickException(
            f"no job store at {target}: nothing to migrate (a node creates it at the head)"
        )
    engine = engine_for(target)
    where = safe_url(str(engine.url))
    try:
        if as_sql:
            click.echo(migrations.sql(engine) or f"-- {where} is at the head already")
            return
        if dry_run:
            with migrations.locked(engine) as conn:
                at = migrations.state(conn)
            if at.revision is not None and not at.known:
                migrations.prepare(engine, "never")  # raises the newer-version refusal
            click.echo(f"{where}: schema revision {at.revision or '(empty)'} -> {at.head}")
            return
        before, after = migrations.upgrade(engine)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    if before.revision == after:
        click.echo(f"{where}: schema revision {after} (up to date)")
    else:
        click.echo(f"{where}: schema revision {before.revision or '(empty)'} -> {after}")


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
