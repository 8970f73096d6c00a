"""Schema versions of the job store (dicom_node/jobs/migrations), on SQLite and PostgreSQL.

A store of the first release, with data in it, is upgraded when a node opens it; the chain's
result is today's metadata; ``migrate: never`` refuses an old store and names the command; a
store of a newer version is refused; ``dicom-node migrate`` upgrades a real old store; a node on
PostgreSQL takes a study from DCMTK storescu and sends its SEG back.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, insert, inspect, select, text

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobState, JobStore, migrations, schema
from dicom_node.jobs.migrations import SchemaError
from dicom_node.jobs.records import Instance
from dicom_node.jobs.schema import StoreError
from tests.conftest import DICOM_NODE, REPO, config_file, make_config
from tests.helpers import schema_v1

STUDY = "1.2.826.0.1.3680043.8.498.100"
SERIES = [f"1.2.826.0.1.3680043.8.498.1{k:02d}" for k in range(1, 9)]
STATES = ["received", "routed", "queued", "running", "exporting", "done", "failed", "skipped"]
NOW = 1_764_000_000.0  # a fixed past time: every row's age is deterministic


def _engine(url: str) -> Engine:
    return create_engine(url)


def first_release_store(url: str) -> dict[str, Any]:
    """Write a store as the first release did (its own ``create_all``, its row shapes):
    one series per job state with two instances each, a shadow run as a ``kind='shadow'`` job of
    the ``done`` series, and an orphan shadow job (its production job gone). Returns what was
    written, for the assertions."""
    engine = _engine(url)
    schema_v1.metadata.create_all(engine)
    jobs: dict[str, dict[str, Any]] = {}
    with engine.begin() as conn:
        for k, (series_uid, state) in enumerate(zip(SERIES, STATES, strict=True)):
            for n in (1, 2):
                sop = f"{series_uid}.{n}"
                conn.execute(
                    insert(schema_v1.instances).values(
                        sop_instance_uid=sop,
                        series_uid=series_uid,
                        study_uid=STUDY,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                        modality="NM",
                        path=f"spool/{STUDY}/{series_uid}/{sop}.dcm",
                        size=1000 + n,
                        calling_ae="PACS",
                        transfer_syntax="1.2.840.10008.1.2.1",
                        received_at=NOW + k,
                    )
                )
            conn.execute(
                insert(schema_v1.series).values(
                    series_uid=series_uid,
                    study_uid=STUDY,
                    modality="NM",
                    n_instances=2,
                    first_received=NOW + k,
                    last_received=NOW + k,
                )
            )
            routed = state != "received"
            row = {
                "series_uid": series_uid,
                "study_uid": STUDY,
                "kind": "production",
                "state": state,
                "rule": "thyroid" if routed else None,
                "rules_version": "abc123" if routed else None,
                "model_ref": "thyroid-seg@production" if routed else None,
                "destinations": ["pacs"] if routed else None,
                "complete_instances": 2 if routed else None,
                "attempts": 1 if state in ("running", "exporting", "done", "failed") else 0,
                "export_attempts": 0,
                "next_attempt_at": 0.0,
                "lease_until": NOW + 300 if state in ("running", "exporting") else None,
                "created_at": NOW + k,
                "updated_at": NOW + k,
                "n_instances": 2 if state not in ("received", "routed") else None,
                "seg_path": f"results/{series_uid}/seg.dcm"
                if state in ("exporting", "done")
                else None,
                "outcome": "delivered to pacs" if state == "done" else None,
                "error": "export failed: refused" if state == "failed" else None,
                "details": {"dice": {"thyroid": 0.9}} if state == "done" else None,
                "finished_at": NOW + k + 1 if state in ("done", "failed", "skipped") else None,
            }
            job_id = conn.execute(insert(schema_v1.jobs).values(row)).inserted_primary_key[0]
            jobs[state] = {**row, "id": job_id}
        done = jobs["done"]
        shadow = {
            "series_uid": done["series_uid"],
            "study_uid": STUDY,
            "kind": "shadow",
            "state": "done",
            "rule": "thyroid",
            "model_ref": "thyroid-seg@production",
            "model_name": "thyroid-seg",
            "model_version": "2",
            "created_at": NOW + 50,
            "updated_at": NOW + 50,
            "finished_at": NOW + 51,
            "next_attempt_at": 0.0,
            "attempts": 1,
            "export_attempts": 0,
            "outcome": "shadow: not exported",
            "details": {"agreement": {"thyroid": 0.8}, "production_version": "1"},
        }
        conn.execute(insert(schema_v1.jobs).values(shadow))
        orphan = {**shadow, "series_uid": SERIES[0], "rule": "gone"}  # no production job
        conn.execute(insert(schema_v1.jobs).values(orphan))
    engine.dispose()
    return jobs


def _revision(url: str) -> str | None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = _engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


class TestChain:
    def test_the_chain_builds_exactly_the_metadata(self, store_url: str) -> None:
        """Running every revision on an empty database gives ``schema.metadata`` (tables,
        columns, types, nullability, indexes, unique and foreign keys): so a fresh store made
        by ``create_all`` and an upgraded one are the same."""
        engine = schema.engine_for(store_url)
        try:
            with engine.begin() as conn:
                command.upgrade(migrations._config(connection=conn), "head")
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                diff = compare_metadata(context, schema.metadata)
            assert diff == []
            with engine.connect() as conn:
                assert MigrationContext.configure(conn).get_current_revision() == (
                    migrations.head()
                )
        finally:
            engine.dispose()

    def test_the_first_revision_is_the_first_release(self, store_url: str) -> None:
        """Revision 0001 builds what the first release's own ``create_all`` built."""
        engine = schema.engine_for(store_url)
        try:
            with engine.begin() as conn:
                command.upgrade(migrations._config(connection=conn), "0001")
            with engine.connect() as conn:
                context = MigrationContext.configure(conn, opts={"compare_type": True})
                assert compare_metadata(context, schema_v1.metadata) == []
        finally:
            engine.dispose()

    def test_a_fresh_store_is_created_at_the_head(self, tmp_path: Path, store_url: str) -> None:
        JobStore.open(tmp_path, store_url).close()
        assert _revision(store_url) == migrations.head()
        assert set(schema.metadata.tables) <= _tables(store_url)


class TestUpgrade:
    def test_a_first_release_store_with_data_is_migrated_at_open(
        self, tmp_path: Path, store_url: str
    ) -> None:
        written = first_release_store(store_url)
        assert _revision(store_url) is None
        store = JobStore.open(tmp_path, store_url)
        try:
            assert _revision(store_url) == migrations.head()
            # every job kept, with its state and fields; no claim owner yet
            for state, row in written.items():
                job = store.get(row["id"])
                assert job is not None, state
                assert job.state is JobState(state)
                assert (job.series_uid, job.rule, job.seg_path, job.error, job.outcome) == (
                    row["series_uid"],
                    row["rule"],
                    row["seg_path"],
                    row["error"],
                    row["outcome"],
                )
                assert job.lease_until == row["lease_until"]
                assert tuple(job.destinations or ()) == tuple(row["destinations"] or ())
            assert store.counts() == {s.value: (1 if s.value in STATES else 0) for s in JobState}
            done = store.get(written["done"]["id"])
            assert done is not None and dict(done.details or {}) == {"dice": {"thyroid": 0.9}}
            # the shadow run moved out of the jobs table onto its production job
            (run,) = store.shadow_results()
            assert (run.job_id, run.model, run.version, run.production_version) == (
                written["done"]["id"],
                "thyroid-seg",
                "2",
                "1",
            )
            assert dict(run.agreement) == {"thyroid": 0.8} and run.created_at == NOW + 51
            assert run.scores is None  # IoU/HD95 are kept from revision 0004 on
            with store.engine.connect() as conn:
                kinds = conn.execute(select(schema.jobs.c.kind)).scalars().all()
                owners = set(conn.execute(select(schema.jobs.c.owner)).scalars())
            assert sorted(kinds) == ["production"] * 8 + ["shadow"]  # the orphan stays, unlisted
            assert owners == {None}
            assert len(store.list_jobs(limit=100)) == 8
            # instances and series as they were
            for series_uid in SERIES:
                info = store.series_info(series_uid)
                assert info is not None and info.n_instances == 2
                assert [i.size for i in store.series_instances(series_uid)] == [1001, 1002]
            # and the store works on: a late instance re-opens the done job, claims take the
            # queued one, processes register, a file past 2 GiB is recorded
            late = Instance(
                sop_instance_uid=f"{written['done']['series_uid']}.3",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                study_uid=STUDY,
                series_uid=written["done"]["series_uid"],
                modality="NM",
                path="spool/late.dcm",
                size=3 * 2**30,
                calling_ae="PACS",
                transfer_syntax="1.2.840.10008.1.2.1",
                received_at=time.time(),
            )
            assert store.record_instance(late)
            assert store.series_instances(late.series_uid)[-1].size == 3 * 2**30
            reopened = store.get(written["done"]["id"])
            assert reopened is not None and reopened.state is JobState.ROUTED
            owner = store.register_process("worker", "test")
            claimed = store.claim(lease=60)
            assert claimed is not None and claimed.id == written["queued"]["id"]
            with store.engine.connect() as conn:
                held_by = conn.execute(
                    select(schema.jobs.c.owner).where(schema.jobs.c.id == claimed.id)
                ).scalar()
            assert held_by == owner
            long_version = "2026-12-01." + "v" * 53  # as long as the model store allows
            store.resolved(claimed.id, "thyroid-seg", long_version, None, "0" * 64)
            resolved = store.get(claimed.id)
            assert resolved is not None and resolved.model_version == long_version
        finally:
            store.close()
        JobStore.open(tmp_path, store_url).close()  # opening again changes nothing
        assert _revision(store_url) == migrations.head()

    @pytest.mark.parametrize("revision", ["0001", "0002", "0003"])
    def test_a_store_without_version_table_is_recognised_at_each_revision(
        self, tmp_path: Path, store_url: str, revision: str
    ) -> None:
        """Stores written before revisions existed are told apart by their tables."""
        engine = schema.engine_for(store_url)
        try:
            with engine.begin() as conn:
                command.upgrade(migrations._config(connection=conn), revision)
                conn.execute(text("DROP TABLE alembic_version"))
            with engine.connect() as conn:
                assert migrations.identify(conn) == revision
        finally:
            engine.dispose()
        JobStore.open(tmp_path, store_url).close()
        assert _revision(store_url) == migrations.head()

    def test_concurrent_starts_migrate_once(self, tmp_path: Path, store_url: str) -> None:
        """Processes starting together on one old store: one upgrades (under the migration
        lock), the others wait and find the head; the data migration ran once."""
        first_release_store(store_url)
        barrier = threading.Barrier(3)
        errors: list[BaseException] = []

        def start() -> None:
            barrier.wait()
            try:
                JobStore.open(tmp_path, store_url).close()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        store = JobStore.open(tmp_path, store_url)
        try:
            assert len(store.shadow_results()) == 1
        finally:
            store.close()
        assert _revision(store_url) == migrations.head()


class TestRefusals:
    def test_migrate_never_refuses_an_old_store_and_names_the_command(
        self, tmp_path: Path, store_url: str
    ) -> None:
        first_release_store(store_url)
        with pytest.raises(SchemaError) as caught:
            JobStore.open(tmp_path, store_url, migrate="never")
        message = str(caught.value)
        assert "is at schema revision 0001" in message
        assert f"needs {migrations.head()}" in message
        assert "dicom-node migrate" in message
        # nothing was changed: still the first release's tables, no version table
        assert _revision(store_url) is None
        assert _tables(store_url) == {"instances", "series", "jobs"}

    def test_a_store_of_a_newer_version_is_refused(self, tmp_path: Path, store_url: str) -> None:
        JobStore.open(tmp_path, store_url).close()
        engine = _engine(store_url)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        engine.dispose()
        for mode in ("auto", "never"):
            with pytest.raises(SchemaError, match=r"revision 0099, which this dicom-node does not"):
                JobStore.open(tmp_path, store_url, migrate=mode)
        assert _revision(store_url) == "0099"

    def test_tables_of_no_release_are_refused(self, tmp_path: Path, store_url: str) -> None:
        engine = _engine(store_url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE jobs (id INTEGER PRIMARY KEY)"))
        engine.dispose()
        with pytest.raises(SchemaError, match="match no released schema"):
            JobStore.open(tmp_path, store_url)

    def test_an_unreachable_server_or_wrong_password_is_named_without_the_password(
        self, tmp_path: Path, pg_url: str
    ) -> None:
        from sqlalchemy.engine import make_url

        url = make_url(pg_url)
        assert url.password
        wrong = url.set(password="Wr0ng-s3cret").render_as_string(hide_password=False)
        with pytest.raises(StoreError) as caught:
            JobStore.open(tmp_path, wrong)
        message = str(caught.value)
        assert "Wr0ng-s3cret" not in message and "***" in message
        assert "password authentication failed" in message
        from tests.helpers.ports import free_port

        closed = url.set(port=free_port()).render_as_string(hide_password=False)
        with pytest.raises(StoreError, match="cannot open the job store") as caught:
            JobStore.open(tmp_path, closed)
        assert str(url.password) not in str(caught.value)


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DICOM_NODE, *args, "--config", str(config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestMigrateCommand:
    def test_migrate_upgrades_a_real_old_store(self, tmp_path: Path, store_url: str) -> None:
        first_release_store(store_url)
        config = NodeConfig(storage=tmp_path / "var", database=store_url, migrate="never")
        path = config_file(config, tmp_path / "node.yaml")
        password = "" if store_url.startswith("sqlite") else store_url.split(":")[2].split("@")[0]

        refused = _cli(path, "jobs")
        assert refused.returncode != 0
        assert "is at schema revision 0001" in refused.stderr
        assert "dicom-node migrate" in refused.stderr
        served = _cli(path, "serve")  # the node refuses to start, before it listens
        assert served.returncode == 1, served.stderr
        assert "is at schema revision 0001" in served.stderr
        assert "`migrate: never`" in served.stderr and "Traceback" not in served.stderr

        dry = _cli(path, "migrate", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert f"schema revision 0001 -> {migrations.head()}" in dry.stdout
        sql = _cli(path, "migrate", "--sql")
        assert sql.returncode == 0, sql.stderr
        assert "CREATE TABLE processes" in sql.stdout and "CREATE TABLE studies" in sql.stdout
        assert _revision(store_url) is None  # neither changed anything

        done = _cli(path, "migrate")
        assert done.returncode == 0, done.stderr
        assert f"schema revision 0001 -> {migrations.head()}" in done.stdout
        again = _cli(path, "migrate")
        assert f"schema revision {migrations.head()} (up to date)" in again.stdout
        for out in (refused, served, dry, sql, done, again):
            assert not password or password not in out.stdout + out.stderr

        listed = _cli(path, "jobs", "--json")  # migrate: never is happy now
        assert listed.returncode == 0, listed.stderr
        assert len(listed.stdout.splitlines()) == 8


class TestNodeOnPostgres:
    def test_storescu_study_comes_back_as_a_seg_through_postgresql(
        self,
        tmp_path: Path,
        models_dir: Path,
        rules_dir: Path,
        pg_url: str,
        node_factory: Any,
    ) -> None:
        from tests.helpers.dicom_factory import make_nm, write_series
        from tests.helpers.peers import StoreSCP, storescu
        from tests.helpers.waiting import wait_until

        with StoreSCP(output_dir=tmp_path / "pacs") as pacs:
            config = make_config(tmp_path, models_dir, rules_dir, pacs.port, database=pg_url)
            node = node_factory(config)
            assert node.store.engine.dialect.name == "postgresql"
            files = write_series([make_nm(rows=64, cols=64, seed="pg")], tmp_path / "in")
            result = storescu(files, config.port, config.ae_title)
            assert result.returncode == 0, result.stderr
            received = wait_until(pacs.received, timeout=60, what="the SEG at the PACS")
            (job,) = node.store.list_jobs()
            wait_until(lambda: node.store.get(job.id).state is JobState.DONE, what="job done")
        assert len(received) == 1
        assert not (config.storage / "jobs.db").exists()  # the store is the server's
        store = JobStore.open(tmp_path / "elsewhere", pg_url)  # any process sees the same
        try:
            assert store.counts()["done"] == 1
        finally:
            store.close()


class TestDatabaseKey:
    def test_urls_are_checked_and_a_bad_one_is_named_without_its_password(
        self, tmp_path: Path
    ) -> None:
        from dicom_node.config import ConfigError, load_config

        env = {"DICOM_NODE_DATABASE": "postgresql://node:s3cret-pw@db.example:5432/dicom"}
        config = load_config(None, environ=env)
        assert config.database == "postgresql+psycopg://node:s3cret-pw@db.example:5432/dicom"
        assert config.migrate == "auto"
        for bad, why in [
            ("mysql://node:s3cret-pw@db/dicom", "'mysql' is not supported"),
            ("postgresql+psycopg2://node:s3cret-pw@db/dicom", "driver 'psycopg2'"),
            ("not a url s3cret-pw", "must be a database URL"),
        ]:
            with pytest.raises(ConfigError, match=why) as caught:
                load_config(None, environ={"DICOM_NODE_DATABASE": bad})
            assert "s3cret-pw" not in str(caught.value)
        with pytest.raises(ConfigError, match="migrate"):
            load_config(None, environ={"DICOM_NODE_MIGRATE": "sometimes"})

    def test_a_relative_sqlite_url_is_relative_to_the_config_file(self, tmp_path: Path) -> None:
        from dicom_node.config import load_config

        path = tmp_path / "site" / "node.yaml"
        path.parent.mkdir()
        path.write_text("database: sqlite:///db/jobs.db\n")
        config = load_config(path, environ={})
        assert config.database == f"sqlite:///{tmp_path / 'site' / 'db' / 'jobs.db'}"
        store = JobStore.for_config(config)
        try:
            assert (tmp_path / "site" / "db" / "jobs.db").is_file()
        finally:
            store.close()


class TestBothDatabasesAlike:
    def test_a_score_that_is_not_a_number_is_stored_as_null(
        self, tmp_path: Path, store_url: str
    ) -> None:
        """PostgreSQL refuses NaN in JSON, SQLite keeps it: both store null."""
        store = JobStore.open(tmp_path, store_url)
        try:
            assert store.record_instance(
                Instance(
                    sop_instance_uid="1.2.3.4.1",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                    study_uid="1.2.3",
                    series_uid="1.2.3.4",
                    modality="NM",
                    path="spool/x.dcm",
                    size=1,
                    calling_ae=None,
                    transfer_syntax=None,
                    received_at=time.time(),
                )
            )
            (job,) = store.list_jobs()
            details = {"hd95_mm": float("nan"), "scores": [1.0, float("inf")], "dice": 0.9}
            from dicom_node.jobs import transitions

            transitions.set_fields(store.engine, job.id, details=details)
            stored = store.get(job.id)
            assert stored is not None
            assert dict(stored.details or {}) == {
                "hd95_mm": None,
                "scores": [1.0, None],
                "dice": 0.9,
            }
        finally:
            store.close()

    def test_an_overlong_modality_is_cut_to_its_width_on_both(
        self, tmp_path: Path, store_url: str
    ) -> None:
        """PostgreSQL enforces VARCHAR(16), SQLite does not: a broken sender's 40-character
        Modality is recorded the same way on both (cut to 16), never refused by one only."""
        store = JobStore.open(tmp_path, store_url)
        try:
            inst = Instance(
                sop_instance_uid="1.2.3.4.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
                study_uid="1.2.3",
                series_uid="1.2.3.4",
                modality="X" * 40,
                path="spool/x.dcm",
                size=1,
                calling_ae=None,
                transfer_syntax=None,
                received_at=time.time(),
            )
            assert store.record_instance(inst)
            assert [i.modality for i in store.series_instances("1.2.3.4")] == ["X" * 16]
            info = store.series_info("1.2.3.4")
            assert info is not None and info.modality == "X" * 16
        finally:
            store.close()
