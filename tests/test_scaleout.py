"""Several processes on one job store: liveness, ownership, leases, roles (README "Scaling out").

Unit tests drive :mod:`dicom_node.jobs.processes` with explicit clocks on the embedded store;
the end-to-end tests run two receivers and two workers as separate ``dicom-node serve``
processes on one real PostgreSQL and one storage folder, with DCMTK peers on both ends.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.config import NodeConfig
from dicom_node.jobs import JobState, JobStore, TransitionError
from dicom_node.jobs import processes as procs
from dicom_node.ownership import StorageInUse, StorageLock
from tests.conftest import DICOM_NODE, REPO, config_file, make_config
from tests.helpers.metrics import scrape
from tests.helpers.ports import free_port
from tests.test_jobstore import ROUTE, _inst

LEASE = 30.0


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    """The job store on SQLite, then on PostgreSQL (``store_url``)."""
    s = JobStore.open(tmp_path, database=store_url)
    yield s
    s.close()


def _queued(store: JobStore, n: int = 1) -> list[int]:
    for i in range(n):
        store.record_instance(_inst(f"1.{i}", series=f"1.2.3.{i}"))
    ids = []
    for job in store.jobs_in(JobState.RECEIVED):
        assert store.route(job.id, [ROUTE], "v")
        assert store.queue(job.id, 1)
        ids.append(job.id)
    return ids


def _as(store: JobStore, owner: str | None) -> JobStore:
    """Another process's view of the same job store (same engine, its own owner id)."""
    return JobStore(store.engine, owner=owner)


class TestLeases:
    def test_a_live_owner_keeps_its_job_and_a_dead_ones_job_comes_back_after_the_lease(
        self, store: JobStore
    ) -> None:
        t0 = time.time()
        a, b = _as(store, None), _as(store, None)
        a.register_process("worker", "t")
        b.register_process("worker", "t")
        (job_id,) = _queued(store)
        claimed = a.claim(lease=LEASE)
        assert claimed is not None and claimed.owner == a.owner
        # a beats at t0+20 and renews its job: still alive and leased at t0+45
        assert procs.heartbeat(store.engine, a.owner or "", LEASE, [job_id], now=t0 + 20)
        assert procs.take_back(store.engine, LEASE, now=t0 + 45) == []
        assert store.get(job_id).state is JobState.RUNNING  # type: ignore[union-attr]
        # a stops beating: dead after t0+50, its lease runs out at t0+50 too
        assert procs.take_back(store.engine, LEASE, now=t0 + 49) == []
        assert procs.take_back(store.engine, LEASE, now=t0 + 51) == [job_id]
        job = store.get(job_id)
        assert job is not None
        assert (job.state, job.owner, job.lease_until) == (JobState.QUEUED, None, None)
        again = b.claim(lease=LEASE)
        assert again is not None and (again.id, again.owner) == (job_id, b.owner)
        assert again.attempts == 2

    def test_a_stale_heartbeat_alone_does_not_take_a_leased_job(self, store: JobStore) -> None:
        """A fresh claim by a process that registered after the taker's snapshot: its lease
        protects it even when the taker believes the owner dead."""
        t0 = time.time()
        a = _as(store, None)
        a.register_process("worker", "t")
        (job_id,) = _queued(store)
        assert a.claim(lease=LEASE) is not None
        procs.heartbeat(store.engine, a.owner or "", LEASE, [], now=t0 - 100)  # stale beat
        assert procs.take_back(store.engine, LEASE, now=t0 + 5) == []
        assert procs.take_back(store.engine, LEASE, now=t0 + LEASE + 1) == [job_id]

    def test_the_old_owner_can_no_longer_move_a_job_taken_back(self, store: JobStore) -> None:
        t0 = time.time()
        a, b = _as(store, None), _as(store, None)
        a.register_process("worker", "t")
        b.register_process("worker", "t")
        (job_id,) = _queued(store)
        assert a.claim(lease=LEASE) is not None
        assert procs.take_back(store.engine, LEASE, now=t0 + 100) == [job_id]  # a froze
        assert b.claim(lease=LEASE) is not None
        with pytest.raises(TransitionError, match="no longer held by this process"):
            a.exporting(job_id, "results/x.dcm", "1.9")
        with pytest.raises(TransitionError, match="taken back after its lease ran out"):
            a.fail(job_id, "late")
        assert not a.release(job_id)
        b.exporting(job_id, "results/x.dcm", "1.9")
        assert b.done(job_id, "sent") is JobState.DONE
        job = store.get(job_id)
        assert job is not None and (job.state, job.owner) == (JobState.DONE, None)

    def test_an_export_retry_is_free_for_any_process(self, store: JobStore) -> None:
        a, b = _as(store, "a"), _as(store, "b")
        (job_id,) = _queued(store)
        assert a.claim() is not None
        a.exporting(job_id, "results/x.dcm", "1.9")
        a.export_retry(job_id, delay=0, error="down")
        job = store.get(job_id)
        assert job is not None and (job.owner, job.lease_until) == (None, None)
        assert procs.take_back(store.engine, LEASE, now=time.time() + 1000) == []
        claimed = b.claim()
        assert claimed is not None and (claimed.state, claimed.owner) == (JobState.EXPORTING, "b")

    def test_alone_takes_back_every_other_owners_job_at_once(self, store: JobStore) -> None:
        a = _as(store, None)
        a.register_process("all", "t")
        ids = _queued(store, 2)
        assert a.claim(lease=LEASE) is not None and a.claim(lease=LEASE) is not None
        me = _as(store, None)
        me.register_process("all", "t")
        assert me.take_back(LEASE) == [], "a is alive: not on a shared store"
        assert me.take_back(LEASE, alone=True) == ids

    def test_a_stopped_process_is_listed_as_stopped_and_a_silent_one_as_dead(
        self, store: JobStore
    ) -> None:
        a, b = _as(store, None), _as(store, None)
        a.register_process("receiver", "t")
        b.register_process("worker", "t")
        a.mark_stopped()
        now = time.time()
        states = {p.id: p.state(now, LEASE) for p in store.list_processes()}
        assert states == {a.owner: procs.STOPPED, b.owner: procs.ALIVE}
        later = {p.id: p.state(now + LEASE + 1, LEASE) for p in store.list_processes()}
        assert later == {a.owner: procs.STOPPED, b.owner: procs.DEAD}
        assert b.heartbeat(LEASE) is True
        assert a.heartbeat(LEASE) is False, "a stopped process must register again"
        assert procs.prune(store.engine, LEASE, keep=0, now=now + LEASE + 1) == 2

    def test_process_ids_name_host_and_pid_and_differ_per_start(self) -> None:
        first, second = procs.new_process_id(123), procs.new_process_id(123)
        assert first != second
        host, pid, rand = first.split(":")
        assert (pid, len(rand)) == ("123", 8) and host
        assert len(first) <= 64


class TestStorageLockRule:
    def test_sqlite_is_one_process_per_storage_server_database_shares_it(
        self, tmp_path: Path
    ) -> None:
        first = StorageLock(tmp_path, shared=True)
        second = StorageLock(tmp_path, shared=True)
        first.acquire()
        second.acquire()  # several processes on a server database share storage
        try:
            with pytest.raises(StorageInUse, match="server database"):
                StorageLock(tmp_path).acquire()
        finally:
            first.release()
            second.release()
        alone = StorageLock(tmp_path)
        alone.acquire()
        try:
            with pytest.raises(StorageInUse, match="embedded SQLite job store"):
                StorageLock(tmp_path, shared=True).acquire()
            with pytest.raises(StorageInUse, match="one storage folder has one process"):
                StorageLock(tmp_path).acquire()
        finally:
            alone.release()


class TestConfig:
    def test_a_lease_shorter_than_three_heartbeats_is_refused(self) -> None:
        with pytest.raises(ValueError, match="process_lease .* must be at least 3"):
            NodeConfig(heartbeat_interval=5, process_lease=10)

    def test_serve_role_is_checked_by_the_cli(self) -> None:
        out = subprocess.run(
            [*DICOM_NODE, "serve", "--role", "inferencer"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode == 2
        assert "'inferencer' is not one of 'all', 'receiver', 'worker'" in out.stderr


class TestSingleProcess:
    def test_metrics_name_the_node_and_status_lists_the_process(
        self, tmp_path: Path, models_dir: Path, rules_dir: Path, node_factory: Any
    ) -> None:
        config = make_config(
            tmp_path,
            models_dir,
            rules_dir,
            free_port(),
            node_name="site-a-all",
            heartbeat_interval=0.2,
            process_lease=1.0,
        )
        node = node_factory(config)
        text = scrape(config.http_port)
        samples = [ln for ln in text.splitlines() if ln.startswith("dicom_node_")]
        assert samples and all('node="site-a-all"' in ln for ln in samples)
        path = config_file(config, tmp_path / "node.yaml")
        out = subprocess.run(
            [*DICOM_NODE, "status", "--config", str(path), "--json"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        (proc,) = json.loads(out.stdout)["processes"]
        assert (proc["id"], proc["role"], proc["state"]) == (node.process_id, "all", "alive")
        assert proc["heartbeat_age"] < 1.0


# -- several `dicom-node serve` processes on one PostgreSQL and one storage -------------------
HEARTBEAT = 0.3
"""Heartbeat of the processes under test (seconds); the lease is :data:`E2E_LEASE`."""
E2E_LEASE = 3.0


def _dcm(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _source_series(seg_path: Path) -> str:
    return str(_dcm(seg_path).ReferencedSeriesSequence[0].SeriesInstanceUID)


def _audit(storage: Path) -> list[dict[str, Any]]:
    path = storage / "audit.log"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _status(config_path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*DICOM_NODE, "status", "--config", str(config_path), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


class Site:
    """Configurations of receivers and workers sharing one database and one storage."""

    def __init__(
        self, tmp_path: Path, models: Path, rules: Path, pacs_port: int, database: str
    ) -> None:
        self.tmp_path = tmp_path
        self.base = make_config(
            tmp_path,
            models,
            rules,
            pacs_port,
            database=database,
            heartbeat_interval=HEARTBEAT,
            process_lease=E2E_LEASE,
            workers=1,
        )

    def config(self, name: str, role: str) -> tuple[NodeConfig, Path]:
        workdir = self.tmp_path / name
        workdir.mkdir(exist_ok=True)
        config = self.base.model_copy(
            update={
                "role": role,
                "node_name": name,
                "port": free_port(),
                "http_port": free_port(),
            }
        )
        return config, workdir

    @property
    def storage(self) -> Path:
        return self.base.storage


@pytest.fixture
def pacs() -> Iterator[Any]:
    from tests.helpers.peers import StoreSCP

    with StoreSCP() as scp:
        yield scp


class TestFourProcesses:
    def test_forty_studies_through_two_receivers_and_two_workers_each_seg_exactly_once(
        self,
        tmp_path: Path,
        models_dir: Path,
        rules_dir: Path,
        pg_url: str,
        pacs: Any,
        node_process: Any,
    ) -> None:
        from tests.helpers.dicom_factory import make_nm, write_series
        from tests.helpers.peers import storescu
        from tests.helpers.waiting import wait_until

        site = Site(tmp_path, models_dir, rules_dir, pacs.port, pg_url)
        nodes = {}
        for name, role in (
            ("receiver-1", "receiver"),
            ("receiver-2", "receiver"),
            ("worker-1", "worker"),
            ("worker-2", "worker"),
        ):
            config, workdir = site.config(name, role)
            nodes[name] = node_process(config, workdir)
        files = [
            write_series([make_nm(rows=64, cols=64, seed=f"scale-{i}")], tmp_path / f"s{i}")[0]
            for i in range(40)
        ]
        receivers = [nodes["receiver-1"].config, nodes["receiver-2"].config]
        for i, path in enumerate(files):  # alternately to both receivers
            target = receivers[i % 2]
            sent = storescu([path], target.port, target.ae_title)
            assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(pacs.received()) >= 40, timeout=90, what="40 SEGs at the PACS")
        time.sleep(3 * HEARTBEAT)  # a duplicate would arrive now
        segs = pacs.received()
        sources = {str(_dcm(p).SeriesInstanceUID) for p in files}
        got = Counter(_source_series(p) for p in segs)
        assert set(got) == sources, "none lost"
        assert max(got.values()) == 1, f"exactly one SEG per series: {got.most_common(3)}"

        records = _audit(site.storage)
        done = Counter(r["job"] for r in records if r["event"] == "done")
        claimed = Counter(r["job"] for r in records if r["event"] == "claimed")
        routed = Counter(r["job"] for r in records if r["event"] == "routed")
        assert len(done) == 40 and set(done.values()) == {1}, "each job done once"
        assert set(claimed) == set(done) and set(claimed.values()) == {1}, "claimed once each"
        assert len(routed) == 40 and set(routed.values()) == {1}, "routed once each"
        ids = {name: n.config for name, n in nodes.items()}
        status = _status(nodes["worker-1"].path)
        by_name = {p["details"]["node"]: p for p in status["processes"]}
        assert set(by_name) == set(ids)
        assert {n: p["role"] for n, p in by_name.items()} == {
            "receiver-1": "receiver",
            "receiver-2": "receiver",
            "worker-1": "worker",
            "worker-2": "worker",
        }
        assert {p["state"] for p in by_name.values()} == {"alive"}
        workers = {by_name["worker-1"]["id"], by_name["worker-2"]["id"]}
        claimers = {r["process"] for r in records if r["event"] == "claimed"}
        assert claimers <= workers, "only workers claim jobs"
        assert status["jobs"]["done"] == 40
        for node in nodes.values():
            assert "Traceback" not in node.output(), node.output()[-3000:]

    def test_kill_9_a_worker_holding_a_job_another_completes_it_after_the_lease(
        self,
        tmp_path: Path,
        models_dir: Path,
        rules_dir: Path,
        pg_url: str,
        pacs: Any,
        node_process: Any,
    ) -> None:
        from dicom_node.jobs.schema import create
        from dicom_node.node import TESTHOOK_HOLD_JOB
        from tests.conftest import NodeProcess
        from tests.helpers.dicom_factory import make_nm, write_series
        from tests.helpers.peers import storescu
        from tests.helpers.waiting import wait_until

        site = Site(tmp_path, models_dir, rules_dir, pacs.port, pg_url)
        receiver = node_process(*site.config("receiver-1", "receiver"))
        config, workdir = site.config("worker-1", "worker")
        doomed = NodeProcess(config, workdir).start(env={TESTHOOK_HOLD_JOB: "600"})
        store = JobStore(create(pg_url))
        try:
            path = write_series([make_nm(rows=64, cols=64, seed="kill-9")], tmp_path / "k")[0]
            assert storescu([path], receiver.config.port, receiver.config.ae_title).returncode == 0
            job = wait_until(
                lambda: next(iter(store.list_jobs(["running"])), None),
                timeout=30,
                what="the doomed worker to hold the job",
            )
            owner = job.owner
            assert owner is not None
            survivor = node_process(*site.config("worker-2", "worker"))
            time.sleep(2 * HEARTBEAT)
            held = store.get(job.id)
            assert held is not None and (held.state, held.owner) == (JobState.RUNNING, owner)
            doomed.kill9()
            wait_until(lambda: len(pacs.received()) >= 1, timeout=60, what="the SEG")
            time.sleep(3 * HEARTBEAT)
            assert [_source_series(p) for p in pacs.received()] == [
                str(_dcm(path).SeriesInstanceUID)
            ], "exactly one SEG"
            finished = store.get(job.id)
            assert finished is not None and finished.state is JobState.DONE
            dead = {p.id: p for p in store.list_processes()}[owner]
            records = _audit(site.storage)
            (taken,) = [r for r in records if r["event"] == "taken_back"]
            assert taken["jobs"] == [job.id]
            assert taken["time"] >= dead.heartbeat_at + E2E_LEASE - 0.01, "not before the lease"
            claims = [r["process"] for r in records if r["event"] == "claimed"]
            assert claims[0] == owner and claims[1] != owner and len(claims) == 2
            (done,) = [r for r in records if r["event"] == "done"]
            assert done["process"] == claims[1]
            status = {p["id"]: p["state"] for p in _status(survivor.path)["processes"]}
            assert status[owner] == "dead"
        finally:
            store.close()
            doomed.kill9()
