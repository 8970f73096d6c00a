"""Retention (jobs/retention.py): old finished series lose their files, unfinished ones never do.

Store-level tests drive the two steps (rows, then files) directly, including a crash between and
during them; node-level tests run a real node with a DCMTK storescp as the PACS, and the
``dicom-node cleanup`` command.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from dicom_node import metrics
from dicom_node.config import Destination, NodeConfig, RetentionConfig, parse_duration
from dicom_node.jobs import JobStore
from dicom_node.jobs import retention as retention_mod
from dicom_node.jobs.reconcile import reconcile_spool
from dicom_node.jobs.records import Instance
from dicom_node.jobs.schema import jobs, series
from tests.conftest import DICOM_NODE, REPO, config_file, make_config, write_rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.metrics import sample
from tests.helpers.peers import StoreSCP, storescu
from tests.helpers.waiting import wait_until

DAY = 86400.0
AGES = RetentionConfig()  # done 24h, failed 14d, skipped 1h


def _counter(name: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name)
    return 0.0 if value is None else value


class Storage:
    """A storage folder with a job store and spooled files written as the receiver writes them."""

    def __init__(self, root: Path, database: str | None = None) -> None:
        self.root = root
        self.database = database
        self.store = JobStore.open(root, database)
        self._n = 0

    def add(
        self, series_uid: str, n: int = 1, study_uid: str = "1.2.3", size: int = 100
    ) -> list[str]:
        """Spool and record ``n`` instances of a series; return their relative paths."""
        paths = []
        for _ in range(n):
            self._n += 1
            sop = f"{series_uid}.{self._n}"
            rel = f"spool/{study_uid}/{series_uid}/{sop}.dcm"
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(b"\0" * size)
            inst = Instance(
                sop, "1.2.840.10008.5.1.4.1.1.20", study_uid, series_uid, "NM", rel, size,
                "SCU", "1.2.840.10008.1.2.1", time.time(),
            )  # fmt: skip
            assert self.store.record_instance(inst)
            paths.append(rel)
        return paths

    def result(self, series_uid: str, name: str = "seg.dcm", size: int = 50) -> str:
        rel = f"results/{series_uid}/{name}"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(b"\1" * size)
        return rel

    def finish(self, series_uid: str, state: str, age: float, seg_path: str | None = None) -> None:
        """Put every job of the series in ``state``, finished (and last received) ``age`` ago."""
        then = time.time() - age
        with self.store.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.series_uid == series_uid)
                .values(state=state, rule="r", finished_at=then, seg_path=seg_path)
            )
            conn.execute(
                update(series).where(series.c.series_uid == series_uid).values(last_received=then)
            )

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def job_states(self, series_uid: str) -> list[str]:
        with self.store.engine.connect() as conn:
            return list(
                conn.execute(select(jobs.c.state).where(jobs.c.series_uid == series_uid)).scalars()
            )


@pytest.fixture
def storage(tmp_path: Path, store_url: str) -> Iterator[Storage]:
    """A storage folder whose job store is SQLite, then PostgreSQL (``store_url``)."""
    database = None if store_url.startswith("sqlite") else store_url
    s = Storage(tmp_path / "var", database)
    yield s
    s.store.close()


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("24h", DAY), ("14d", 14 * DAY), ("30m", 1800.0), (90, 90.0), ("1s", 1.0)],
    )
    def test_parse(self, text: Any, seconds: float) -> None:
        assert parse_duration(text) == seconds

    def test_bad_duration_names_the_key(self) -> None:
        with pytest.raises(ValueError, match=r"(?s)retention\.done_after.*'24 hours'"):
            NodeConfig(retention={"done_after": "24 hours"})

    def test_defaults(self) -> None:
        ages = NodeConfig().retention
        assert (ages.done_after, ages.failed_after, ages.skipped_after) == (DAY, 14 * DAY, 3600.0)


class TestSelection:
    def test_old_finished_series_go_and_everything_else_stays(self, storage: Storage) -> None:
        done_old = storage.add("9.1", n=2)
        seg = storage.result("9.1")
        stale_seg = storage.result("9.1", "older-version.dcm")  # a re-run's replaced SEG
        storage.finish("9.1", "done", 2 * DAY, seg_path=seg)
        skipped_old = storage.add("9.2")
        storage.finish("9.2", "skipped", 2 * 3600)
        failed_recent = storage.add("9.3")
        storage.finish("9.3", "failed", 2 * DAY)  # failed: kept 14 days for a retry
        done_recent = storage.add("9.4")
        storage.finish("9.4", "done", 3600)
        unfinished = storage.add("9.5")  # received, never routed
        files0 = _counter("dicom_node_retention_freed_files_total")
        bytes0 = _counter("dicom_node_retention_freed_bytes_total")

        report = storage.store.purge_expired(storage.root, AGES)

        assert sorted(s.series_uid for s in report.series) == ["9.1", "9.2"]
        assert report.freed.files == 5 and report.freed.bytes == 3 * 100 + 2 * 50
        for rel in [*done_old, seg, stale_seg, *skipped_old]:
            assert not storage.exists(rel), rel
        assert not (storage.root / "spool/1.2.3/9.1").exists()  # empty folders go too
        assert not (storage.root / "results/9.1").exists()
        for rel in [*failed_recent, *done_recent, *unfinished]:
            assert storage.exists(rel), rel
        assert storage.job_states("9.1") == [] and storage.job_states("9.2") == []
        assert storage.job_states("9.5") == ["received"]
        assert storage.store.series_info("9.1") is None
        assert _counter("dicom_node_retention_freed_files_total") - files0 == 5
        assert _counter("dicom_node_retention_freed_bytes_total") - bytes0 == 400
        # a second pass finds nothing
        assert storage.store.purge_expired(storage.root, AGES).series == []

    def test_a_series_with_one_unfinished_job_keeps_everything(self, storage: Storage) -> None:
        files = storage.add("9.1", n=2)
        storage.finish("9.1", "done", 2 * DAY)
        with storage.store.engine.begin() as conn:  # a second rule's job, still queued
            row = conn.execute(select(jobs).where(jobs.c.series_uid == "9.1")).mappings().one()
            values = {k: v for k, v in row.items() if k != "id"}
            conn.execute(jobs.insert().values(**{**values, "rule": "r2", "state": "queued"}))
        assert storage.store.purge_expired(storage.root, AGES).series == []
        assert all(storage.exists(f) for f in files)

    def test_dry_run_reports_and_deletes_nothing(self, storage: Storage) -> None:
        files = storage.add("9.1", n=3)
        seg = storage.result("9.1")
        storage.finish("9.1", "done", 2 * DAY, seg_path=seg)
        report = storage.store.purge_expired(storage.root, AGES, dry_run=True)
        assert report.dry_run and report.files == 4 and report.bytes == 350
        assert [j for s in report.series for _i, j in s.jobs] == ["done"]
        assert all(storage.exists(f) for f in [*files, seg])
        assert storage.job_states("9.1") == ["done"]


class TestLateInstances:
    def test_a_late_instance_before_the_pass_keeps_the_series(self, storage: Storage) -> None:
        files = storage.add("9.1", n=2)
        storage.finish("9.1", "done", 2 * DAY)
        files += storage.add("9.1")  # re-opens the done job (routed: to be rebuilt)
        assert storage.job_states("9.1") == ["routed"]
        assert storage.store.purge_expired(storage.root, AGES).series == []
        assert all(storage.exists(f) for f in files)

    def test_a_late_instance_spooled_during_the_pass_is_kept(self, storage: Storage) -> None:
        old = storage.add("9.1", n=2)
        storage.finish("9.1", "done", 2 * DAY)
        # the receiver has written the late file but not recorded it yet when the pass runs
        late = "spool/1.2.3/9.1/9.1.late.dcm"
        (storage.root / late).write_bytes(b"late")
        report = storage.store.purge_expired(storage.root, AGES)
        assert [s.series_uid for s in report.series] == ["9.1"]
        assert not any(storage.exists(f) for f in old)
        assert storage.exists(late)  # only recorded paths are tombstoned
        inst = Instance(
            "9.1.late", "1.2.840.10008.5.1.4.1.1.20", "1.2.3", "9.1", "NM", late, 4, None, None,
            time.time(),
        )  # fmt: skip
        assert storage.store.record_instance(inst)  # a new series and job, with its file
        assert storage.job_states("9.1") == ["received"]


class TestCrashSafety:
    def test_crash_between_rows_and_files_neither_loses_nor_resurrects(
        self, storage: Storage
    ) -> None:
        files = storage.add("9.1", n=3)
        storage.finish("9.1", "done", 2 * DAY)
        keep = storage.add("9.2")
        # step 1 commits, then the process dies before any file is deleted
        assert [
            s.series_uid for s in retention_mod.expire(storage.store.engine, storage.root, AGES)
        ] == ["9.1"]
        assert all(storage.exists(f) for f in files)
        storage.store.close()
        storage.store = JobStore.open(storage.root, storage.database)  # restart
        # reconciliation must not record the tombstoned files again (that would re-run the job
        # and send its SEG to the PACS a second time)
        assert reconcile_spool(storage.store, storage.root, "spool") == 0
        assert storage.job_states("9.1") == []
        freed = storage.store.finish_purges(storage.root)
        assert freed.files == 3
        assert not any(storage.exists(f) for f in files) and storage.exists(keep[0])
        assert reconcile_spool(storage.store, storage.root, "spool") == 0
        assert storage.store.purge_expired(storage.root, AGES).freed.files == 0

    def test_crash_while_deleting_files_finishes_on_the_next_pass(
        self, storage: Storage, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        files = storage.add("9.1", n=4)
        storage.finish("9.1", "done", 2 * DAY)
        real = retention_mod._unlink
        calls = []

        def dies_after_two(*args: Any) -> int | None:
            if len(calls) == 2:
                raise SystemExit("kill -9")
            calls.append(args)
            return real(*args)

        monkeypatch.setattr(retention_mod, "_unlink", dies_after_two)
        with pytest.raises(SystemExit):
            storage.store.purge_expired(storage.root, AGES)
        monkeypatch.setattr(retention_mod, "_unlink", real)
        assert sum(storage.exists(f) for f in files) == 2
        assert reconcile_spool(storage.store, storage.root, "spool") == 0
        report = storage.store.purge_expired(storage.root, AGES)
        assert report.leftover.files == 2 and report.series == []
        assert not any(storage.exists(f) for f in files)

    def test_a_resent_tombstoned_instance_keeps_its_file(self, storage: Storage) -> None:
        (path,) = storage.add("9.1")
        storage.finish("9.1", "done", 2 * DAY)
        retention_mod.expire(storage.store.engine, storage.root, AGES)
        # the PACS re-sends that very instance before the files go: the spool keeps the file
        # it has, the store records it again (a new series)
        inst = Instance(
            "9.1.1", "1.2.840.10008.5.1.4.1.1.20", "1.2.3", "9.1", "NM", path, 100, None, None,
            time.time(),
        )  # fmt: skip
        assert storage.store.record_instance(inst)
        freed = storage.store.finish_purges(storage.root)
        assert (freed.files, freed.kept) == (0, 1)
        assert storage.exists(path)


# -- on a running node -----------------------------------------------------------------------
RULES = """\
rules:
  - name: thyroid
    priority: 100
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
  - name: ct-waits
    priority: 50
    when: {Modality: CT}
    complete: {instances: 10}
    model: thyroid-seg@production
    send_to: [pacs]
"""


def _spooled(storage: Path, series_uid: str) -> list[Path]:
    return sorted((storage / "spool").glob(f"*/{series_uid}/*.dcm"))


def _node_config(tmp_path: Path, models_dir: Path, pacs: StoreSCP, **overrides: Any) -> NodeConfig:
    rules = tmp_path / "rules"
    write_rules(rules, RULES)
    config = make_config(tmp_path, models_dir, rules, pacs.port, **overrides)
    dest = Destination(ae_title=pacs.aet, host="127.0.0.1", port=pacs.port)
    return config.model_copy(update={"destinations": {"pacs": dest}})


class TestOnARunningNode:
    def test_old_finished_files_disappear_unfinished_stay(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        ages = RetentionConfig(done_after=1, failed_after=14 * DAY, skipped_after=1, interval=0.3)
        with StoreSCP() as pacs:
            config = _node_config(tmp_path, models_dir, pacs, retention=ages)
            node = node_factory(config)
            freed0 = sample(config.http_port, "dicom_node_retention_freed_files_total")
            nm = make_nm(rows=64, cols=64, seed="ret-nm")
            ct = make_ct_series(n_slices=2, rows=32, cols=32, seed="ret-ct")
            files = write_series([nm, *ct], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            wait_until(lambda: pacs.received(), what="the SEG at the PACS")
            wait_until(
                lambda: (
                    not _spooled(config.storage, nm.SeriesInstanceUID)
                    and not (config.storage / "results" / nm.SeriesInstanceUID).exists()
                ),
                timeout=20,
                what="retention to delete the done series' instance and SEG",
            )
            assert node.store.series_info(nm.SeriesInstanceUID) is None
            # the CT series waits for 10 instances: routed, unfinished, untouched
            assert len(_spooled(config.storage, ct[0].SeriesInstanceUID)) == 2
            assert [j.state for j in node.store.list_jobs()] == ["routed"]
            time.sleep(1.0)  # several more passes
            assert len(_spooled(config.storage, ct[0].SeriesInstanceUID)) == 2
            assert sample(config.http_port, "dicom_node_retention_freed_files_total") - freed0 == 2
            left = sum(p.stat().st_size for p in _spooled(config.storage, ct[0].SeriesInstanceUID))
            assert sample(config.http_port, "dicom_node_spool_bytes") == left
            purged = [e for e in node.audit.read() if e["event"] == "purged"]
            assert [(e["series"], e["states"], e["files"]) for e in purged] == [
                (nm.SeriesInstanceUID, ["done"], 2)
            ]

    def test_restart_between_rows_and_files_loses_nothing_and_resurrects_nothing(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        with StoreSCP() as pacs:
            config = _node_config(tmp_path, models_dir, pacs)  # default ages: 24 h
            node = node_factory(config)
            nm = make_nm(rows=64, cols=64, seed="crash-nm")
            ct = make_ct_series(n_slices=2, rows=32, cols=32, seed="crash-ct")
            files = write_series([nm, *ct], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            wait_until(lambda: pacs.received(), what="the SEG at the PACS")
            wait_until(lambda: node.store.list_jobs(["done"]), what="the NM job done")
            node.stop()
            # a day and more later the pass commits its rows, then the process dies
            store = JobStore.open(config.storage)
            with store.engine.begin() as conn:
                then = time.time() - 2 * DAY
                conn.execute(update(jobs).where(jobs.c.state == "done").values(finished_at=then))
                conn.execute(update(series).values(last_received=then))
            expired = retention_mod.expire(store.engine, config.storage, config.retention)
            store.close()
            assert [s.series_uid for s in expired] == [nm.SeriesInstanceUID]
            assert _spooled(config.storage, nm.SeriesInstanceUID)  # files still there

            node = node_factory(config)
            assert not _spooled(config.storage, nm.SeriesInstanceUID)
            assert not (config.storage / "results" / nm.SeriesInstanceUID).exists()
            time.sleep(1.0)  # a resurrected series would be routed, run and sent again by now
            assert node.store.series_info(nm.SeriesInstanceUID) is None
            assert len(pacs.received()) == 1
            assert len(_spooled(config.storage, ct[0].SeriesInstanceUID)) == 2
            assert [j.state for j in node.store.list_jobs()] == ["routed"]


class TestCleanupCommand:
    def test_dry_run_reports_then_cleanup_frees(self, storage: Storage, tmp_path: Path) -> None:
        files = storage.add("9.1", n=2, size=1000)
        storage.finish("9.1", "done", 2 * DAY)
        keep = storage.add("9.2")
        config = NodeConfig(storage=storage.root, min_free_disk=0, database=storage.database)
        path = config_file(config, tmp_path / "node.yaml")

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*DICOM_NODE, "cleanup", *args, "--config", str(path)],
                cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        dry = cli("--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "would free 2 file(s), 2.0 kB (2000 bytes) of 1 series (1 done)" in dry.stdout
        assert all(storage.exists(f) for f in files)
        real = cli()
        assert real.returncode == 0, real.stderr
        assert "freed 2 file(s), 2.0 kB (2000 bytes) of 1 series (1 done)" in real.stdout
        assert not any(storage.exists(f) for f in files) and storage.exists(keep[0])
        events = [
            json.loads(line) for line in (storage.root / "audit.log").read_text().splitlines()
        ]
        assert [e["event"] for e in events] == ["purged", "retention"]
        assert events[1]["bytes"] == 2000 and events[1]["by"] == "cli"
        again = cli()
        assert "freed 0 file(s), 0 B (0 bytes) of 0 series (no jobs)" in again.stdout

    def test_without_a_job_store_it_fails_clearly(self, tmp_path: Path) -> None:
        path = config_file(NodeConfig(storage=tmp_path / "nothing"), tmp_path / "node.yaml")
        result = subprocess.run(
            [*DICOM_NODE, "cleanup", "--config", str(path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1
        assert "no job store" in result.stderr
