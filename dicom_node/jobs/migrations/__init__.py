"""Schema versions of the job store: an Alembic chain shipped inside the package.

``versions/0001_first_release.py`` is the schema the first release created; each later revision
adds what came after it, the last one is :data:`dicom_node.jobs.schema.metadata` (a test runs the
chain on both databases and compares it with the metadata). The chain is loaded from the package
(no ``alembic.ini`` in the operator's folder).

:func:`prepare` runs when a store opens, inside one write transaction that holds the migration
lock (PostgreSQL: an advisory lock, so that processes starting together never both migrate;
SQLite: ``BEGIN IMMEDIATE``):

* a store with no tables is created at the head (``create_all``, stamped);
* a store of a release before revisions existed (no ``alembic_version``) is recognised by its
  tables and columns (:data:`SIGNATURES`) and stamped at that revision;
* a store behind the head is upgraded (``migrate: auto``) or refused with the command to run
  (``migrate: never``); a store at a revision this version does not know (written by a newer
  dicom-node) is refused.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from dicom_node.jobs.schema import StoreError, metadata, safe_url

LOGGER = logging.getLogger(__name__)

MIGRATE_MODES = ("auto", "never")
"""Values of the ``migrate:`` config key."""

LOCK_KEY = 0x64636D6E6D6967  # "dcmnmig": pg_advisory_xact_lock key of schema changes
"""PostgreSQL advisory lock held while a process checks and upgrades the schema."""

VERSION_TABLE = "alembic_version"

SIGNATURES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "0001": (frozenset({"instances", "series", "jobs"}), frozenset()),
    "0002": (
        frozenset(
            {"instances", "series", "jobs", "studies", "shadow_results", "retention_pending"}
        ),
        frozenset(),
    ),
    "0003": (
        frozenset(
            {
                "instances",
                "series",
                "jobs",
                "studies",
                "shadow_results",
                "retention_pending",
                "seg_results",
            }
        ),
        frozenset(),
    ),
    "0004": (
        frozenset(
            {
                "instances",
                "series",
                "jobs",
                "studies",
                "shadow_results",
                "retention_pending",
                "seg_results",
                "processes",
            }
        ),
        frozenset({"owner"}),
    ),
}
"""Revision -> (its tables, columns of ``jobs`` it added) for stores written before
``alembic_version`` existed: each release's code created all of its tables at once."""


class SchemaError(StoreError):
    """The store's schema is not this version's and may not (or cannot) be brought to it."""


@dataclass(frozen=True)
class SchemaState:
    """Where a store's schema stands."""

    revision: str | None
    """Its revision; None: an empty database."""
    stamped: bool
    """Whether ``alembic_version`` holds it (False: recognised from the tables)."""
    head: str
    """This version's revision."""

    @property
    def known(self) -> bool:
        return self.revision is None or self.revision in revisions()


def _config(output: io.StringIO | None = None, **attributes: Any) -> Config:
    # alembic's messages go nowhere (we log our own); offline SQL goes to ``output``
    cfg = Config(stdout=io.StringIO(), output_buffer=output)
    cfg.set_main_option("script_location", "dicom_node.jobs:migrations")
    cfg.attributes.update(attributes)
    return cfg


def script() -> ScriptDirectory:
    """The shipped chain."""
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision of :data:`dicom_node.jobs.schema.metadata`."""
    found = script().get_current_head()
    assert found is not None, "the shipped chain has revisions"
    return found


def revisions() -> list[str]:
    """Every shipped revision, oldest first."""
    return [s.revision for s in reversed(list(script().walk_revisions()))]


def identify(conn: Connection) -> str | None:
    """The revision of a store without ``alembic_version``, from its tables and columns.

    Returns None for a database without any of the job store's tables.

    Raises
    ------
    SchemaError
        The tables match no released schema (names the ones missing).
    """
    inspector = inspect(conn)
    names = set(inspector.get_table_names()) - {VERSION_TABLE}
    ours = names & set(metadata.tables)
    if not ours:
        return None
    job_columns = {c["name"] for c in inspector.get_columns("jobs")} if "jobs" in names else set()
    for revision in reversed(list(SIGNATURES)):
        tables, columns = SIGNATURES[revision]
        later = set().union(*(t for r, (t, _) in SIGNATURES.items() if r > revision))
        if tables <= names and columns <= job_columns and not (ours & (later - tables)):
            return revision
    missing = sorted(SIGNATURES["0001"][0] - names)
    raise SchemaError(
        f"the database holds job-store tables ({', '.join(sorted(ours))}) that match no "
        f"released schema (missing: {', '.join(missing) or 'columns of jobs'}); it was not "
        "written by dicom-node, or is damaged: point `database:` at an empty database"
    )


def state(conn: Connection) -> SchemaState:
    """Where the store behind ``conn`` stands (reads only)."""
    stamped = MigrationContext.configure(conn).get_current_revision()
    if stamped is not None:
        return SchemaState(stamped, True, head())
    return SchemaState(identify(conn), False, head())


@contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """A write transaction holding the migration lock (see the module docstring).

    Raises
    ------
    StoreError
        The database cannot be reached (the message masks the password).
    """
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            yield conn
    except DBAPIError as exc:
        if exc.connection_invalidated or isinstance(exc.orig, _connect_errors()):
            raise StoreError(
                f"cannot open the job store {safe_url(str(engine.url))}: "
                f"{_first_line(exc.orig)} (check `database:` and that the server runs)"
            ) from None
        raise


def _connect_errors() -> tuple[type[BaseException], ...]:
    try:
        import psycopg

        return (psycopg.OperationalError,)
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return ()


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).strip().splitlines() or ["unknown error"])[0][:300]


def command_hint(config_path: str | None = None) -> str:
    """The command that upgrades the store of this configuration."""
    return f"dicom-node migrate --config {config_path or '<the node.yaml it runs with>'}"


def prepare(engine: Engine, migrate: str = "auto", config_path: str | None = None) -> SchemaState:
    """Bring the store behind ``engine`` to this version's schema at start (module docstring).

    Parameters
    ----------
    migrate:
        ``auto`` upgrades an older store; ``never`` refuses it.
    config_path:
        Named in the refusal's command (``dicom-node migrate --config ...``).

    Returns
    -------
    SchemaState
        Where the store stood before (its ``revision`` None: it was created now).

    Raises
    ------
    SchemaError
        A newer or unknown schema, or an older one with ``migrate="never"``.
    StoreError
        The database cannot be reached.
    """
    if migrate not in MIGRATE_MODES:
        raise ValueError(f"migrate must be one of {MIGRATE_MODES}, got {migrate!r}")
    where = safe_url(str(engine.url))
    with locked(engine) as conn:
        before = state(conn)
        if before.revision == before.head:
            if not before.stamped:
                _stamp(conn, before.head)
            return before
        if before.revision is None:
            metadata.create_all(conn)  # equal to the chain's result (tests/test_migrations.py)
            _stamp(conn, before.head)
            LOGGER.info("job store %s created at schema revision %s", where, before.head)
            return before
        _refuse_unknown(before, where)
        if migrate == "never":
            raise SchemaError(
                f"the job store {where} is at schema revision {before.revision}, this "
                f"dicom-node needs {before.head}, and `migrate: never` forbids upgrading it "
                f"at start: run `{command_hint(config_path)}` (back up the database first), "
                "then start again"
            )
        _upgrade(conn, before)
        LOGGER.warning(
            "job store %s upgraded from schema revision %s to %s",
            where,
            before.revision,
            before.head,
        )
    return before


def _refuse_unknown(at: SchemaState, where: str) -> None:
    if not at.known:
        raise SchemaError(
            f"the job store {where} is at schema revision {at.revision}, which this dicom-node "
            f"does not know (it knows {', '.join(revisions())}): it was written by a newer "
            "dicom-node. Run that version, or point `database:` at another database"
        )


def _stamp(conn: Connection, revision: str) -> None:
    command.stamp(_config(connection=conn), revision)


def _upgrade(conn: Connection, before: SchemaState) -> None:
    if not before.stamped:
        assert before.revision is not None
        _stamp(conn, before.revision)
    try:
        command.upgrade(_config(connection=conn), "head")
    except SQLAlchemyError as exc:
        raise SchemaError(
            f"upgrading the job store from schema revision {before.revision} to {before.head} "
            f"failed, nothing was changed: {_first_line(getattr(exc, 'orig', None) or exc)}"
        ) from exc


def upgrade(engine: Engine) -> tuple[SchemaState, str]:
    """Upgrade the store to the head now (``dicom-node migrate``); return (before, after).

    Raises
    ------
    SchemaError, StoreError
        As :func:`prepare`.
    """
    before = prepare(engine, "auto")
    return before, before.head


def sql(engine: Engine) -> str:
    """The SQL that :func:`upgrade` would run on this store, without running it.

    Raises
    ------
    SchemaError, StoreError
        As :func:`prepare`; an empty database prints the whole chain.
    """
    with locked(engine) as conn:
        at = state(conn)
    _refuse_unknown(at, safe_url(str(engine.url)))
    if at.revision == at.head:
        return ""
    out = io.StringIO()
    rng = f"{at.revision}:head" if at.revision else "head"
    prefix = ""
    if at.revision and not at.stamped:
        prefix = (
            f"-- the store has no {VERSION_TABLE} table: it is recognised as revision "
            f"{at.revision} and stamped first\n"
        )
    command.upgrade(
        _config(out, url=engine.url.render_as_string(hide_password=True)), rng, sql=True
    )
    return prefix + out.getvalue()


def package_path() -> str:
    """The folder of the chain inside the installed package (for ``alembic`` itself)."""
    return str(resources.files(__name__))
