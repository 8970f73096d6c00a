"""Ingest diagnostics: DCMTK storescu into the node's StorageSCP *in this process* vs storescp.

Not the issue 15 measurement (that is ``bench_ingest.py``: ``dicom-node serve``, fresh UIDs per
round). This is the receive room's tool for taking the receive path apart: durability variants
(two flushes, one, none), ``--jobstore``, ``--senders N``. It re-sends the same UIDs into a fresh
spool per run, so nothing is a duplicate; pass ``--keep-outputs`` on this disk (DESIGN.md).

Workload (issue 2): 600 NM 256x256 (16 bit) and 200 CT 512x512 (16 bit) instances, sent by DCMTK
``storescu`` with ``TCP_NODELAY=1`` over one association per run (``--senders N``: N storescu at
once, the files dealt round-robin; storescp then runs with ``--fork``), timed against DCMTK
``storescp`` in the same run (storescp writes files, without fsync). The node's SCP runs in this
process with its real durability (fsync before Success) and a callback that records the instance;
``--jobstore`` adds the node's SQLite job store to the callback, as ``dicom-node serve`` has it.

Run ``python bench/bench_ingest_inprocess.py`` (``--quick``: 60 NM + 20 CT, one round, as CI does).
Rounds alternate the receivers so that load from other processes hits both alike; the ratio is
DCMTK time / node time (1.0 = as fast as DCMTK), from medians and from best runs.

Each receiver's output is deleted right after its run, so every run creates its files while the
previous runs' files are freshly deleted. On ext4 *without a journal* (this build machine) that
makes every file creation scan the recently freed inodes (``perf``: ``ext4_create`` ->
``recently_deleted``), a cost that grows over the rounds for both receivers. ``--keep-outputs``
deletes the outputs only at the end, which measures both receivers without that effect.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom_node.config import NodeConfig  # noqa: E402
from dicom_node.jobs.records import InstanceRecord  # noqa: E402
from dicom_node.receive.scp import StorageSCP  # noqa: E402
from dicom_node.receive.spool import Spool  # noqa: E402
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series  # noqa: E402
from tests.helpers.peers import StoreSCP, storescu  # noqa: E402

LOGGER = logging.getLogger("bench_ingest")

VARIANTS: dict[str, dict[str, Any]] = {
    "node": {"fsync": True, "fsync_directory": True},
    "node-1flush": {"fsync": True, "fsync_directory": False},
    "node-nofsync": {"fsync": False, "fsync_directory": False},
}
"""Spool durability per variant: the default (two flushes per instance, strict POSIX), one flush
(``spool.FSYNC_DIRECTORY = False``) and none (measures the receive path alone; never used by the
node)."""


@dataclass
class Workload:
    """The files sent each run."""

    n_nm: int
    n_ct: int
    folder: Path
    n_files: int = 0
    n_bytes: int = 0
    senders: list[Path] = field(default_factory=list)

    def build(self, senders: int = 1) -> None:
        """Write the NM and CT files (deterministic UIDs), dealt round-robin to ``senders``
        folders ``s0``, ``s1`` ... (one storescu each)."""
        datasets = [
            make_nm(256, 256, seed="bench-nm", instance_number=i + 1) for i in range(self.n_nm)
        ]
        if self.n_ct:
            datasets += make_ct_series(n_slices=self.n_ct, rows=512, cols=512, seed="bench-ct")
        for k in range(senders):
            write_series(datasets[k::senders], self.folder / f"s{k}")
        self.senders = [self.folder / f"s{k}" for k in range(senders)]
        files = list(self.folder.rglob("*.dcm"))
        self.n_files = len(files)
        self.n_bytes = sum(p.stat().st_size for p in files)


@dataclass
class Result:
    """Wall times of one receiver over the rounds."""

    name: str
    seconds: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.seconds)

    def best(self) -> float:
        return min(self.seconds)


class IngestBenchmark:
    """storescu -> {DCMTK storescp, node SCP}, one association of ``n_nm + n_ct`` instances.

    ``setup`` builds the workload once; each ``time_*`` call sends it to a fresh receiver
    (fresh output folder / spool, so nothing is a duplicate) and returns the wall time.
    """

    def __init__(
        self,
        n_nm: int = 600,
        n_ct: int = 200,
        jobstore: bool = False,
        senders: int = 1,
        keep_outputs: bool = False,
    ) -> None:
        self.n_nm, self.n_ct, self.jobstore, self.senders = n_nm, n_ct, jobstore, senders
        self.keep_outputs = keep_outputs
        self.tmp: Path | None = None
        self.workload: Workload | None = None
        self._runs = 0

    def _output(self, name: str) -> Path:
        """A fresh output folder for one run (kept until teardown with ``keep_outputs``)."""
        assert self.tmp is not None
        self._runs += 1
        return self.tmp / (f"{name}-{self._runs}" if self.keep_outputs else name)

    def _discard(self, folder: Path) -> None:
        if not self.keep_outputs:
            shutil.rmtree(folder, ignore_errors=True)

    def setup(self) -> None:
        """Create the tmp folder and the files to send."""
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        self.workload = Workload(self.n_nm, self.n_ct, self.tmp / "data")
        self.workload.build(self.senders)

    def teardown(self) -> None:
        """Remove everything the benchmark wrote."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _send(self, port: int, called_ae: str) -> float:
        """Send the workload with one storescu per sender folder, all at once; return seconds."""
        assert self.workload is not None
        results: list[Any] = [None] * len(self.workload.senders)

        def send(k: int) -> None:
            results[k] = storescu([self.workload.senders[k]], port, called_ae, timeout=900)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(results))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        for result in results:
            if result is None or result.returncode != 0:
                raise RuntimeError(f"storescu failed: {getattr(result, 'stderr', '')[-2000:]}")
        return elapsed

    def time_dcmtk_storescp(self) -> float:
        """DCMTK storescp writing every file (no fsync): the reference."""
        assert self.tmp is not None and self.workload is not None
        out = self._output("storescp-out")
        fork = ["--fork"] if self.senders > 1 else []  # one process per association
        with StoreSCP(output_dir=out, extra_args=fork) as scp:
            elapsed = self._send(scp.port, scp.aet)
            received = len(scp.received())
        self._discard(out)
        if received != self.workload.n_files:
            raise RuntimeError(f"storescp stored {received} of {self.workload.n_files}")
        return elapsed

    def time_node(self, variant: str = "node") -> float:
        """The node's StorageSCP with the durability of ``variant`` (see :data:`VARIANTS`)."""
        assert self.tmp is not None and self.workload is not None
        storage = self._output(f"storage-{variant}")
        config = NodeConfig(
            ae_title="DICOMNODE",
            host="127.0.0.1",
            port=0,
            storage=storage,
            min_free_disk=0,
            max_associations=max(16, self.senders),
        )
        spool = Spool(storage, **VARIANTS[variant])
        records: list[InstanceRecord] = []
        callback: Callable[[InstanceRecord], None] = records.append
        store = None
        if self.jobstore:
            from dicom_node.jobs.store import JobStore

            store = JobStore.open(storage)

            def callback(record: InstanceRecord) -> None:
                store.record_instance(record)
                records.append(record)

        scp = StorageSCP(config, spool, callback)
        scp.start()
        try:
            elapsed = self._send(scp.port, "DICOMNODE")
        finally:
            scp.stop()
            if store is not None:
                store.close()
        self._discard(storage)
        if len(records) != self.workload.n_files:
            raise RuntimeError(f"node recorded {len(records)} of {self.workload.n_files}")
        return elapsed


def run(
    rounds: int,
    n_nm: int,
    n_ct: int,
    variants: list[str],
    jobstore: bool,
    senders: int = 1,
    keep_outputs: bool = False,
) -> str:
    """Run the benchmark and return a Markdown report."""
    bench = IngestBenchmark(n_nm, n_ct, jobstore, senders, keep_outputs)
    bench.setup()
    try:
        assert bench.workload is not None
        results = {name: Result(name) for name in ["dcmtk-storescp", *variants]}
        for round_no in range(rounds):
            results["dcmtk-storescp"].seconds.append(bench.time_dcmtk_storescp())
            for variant in variants:
                results[variant].seconds.append(bench.time_node(variant))
            LOGGER.info(
                "round %d: %s",
                round_no + 1,
                ", ".join(f"{r.name} {r.seconds[-1]:.2f} s" for r in results.values()),
            )
        n, mb = bench.workload.n_files, bench.workload.n_bytes / 1e6
    finally:
        bench.teardown()
    ref = results["dcmtk-storescp"]
    lines = [
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: "
        f"{platform.machine()}, {_cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, load average before: {_loadavg()}",
        f"- workload: {n_nm} NM 256x256 + {n_ct} CT 512x512 = {n} files, {mb:.0f} MB, "
        f"{senders} concurrent storescu association(s) (storescp "
        f"{'--fork' if senders > 1 else 'single process'}), TCP_NODELAY=1; {rounds} round(s), "
        "receivers "
        "alternating; callback: "
        + ("SQLite job store" if jobstore else "in-memory list")
        + ("; outputs kept until the end" if keep_outputs else "; outputs deleted after each run"),
        "",
        "| receiver | median s | best s | images/s (median) | MB/s (median) | ratio median | "
        "ratio best |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results.values():
        med, best = result.median(), result.best()
        lines.append(
            f"| {result.name} | {med:.2f} | {best:.2f} | {n / med:.0f} | {mb / med:.0f} | "
            f"{ref.median() / med:.2f} | {ref.best() / best:.2f} |"
        )
    return "\n".join(lines)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 NM + 20 CT, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="node,node-1flush,node-nofsync",
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--jobstore", action="store_true", help="record into the SQLite job store")
    parser.add_argument("--senders", type=int, default=1, help="concurrent storescu processes")
    parser.add_argument(
        "--keep-outputs",
        action="store_true",
        help="delete received files only at the end (no freshly freed inodes during the runs)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("dicom_node").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    n_nm, n_ct, rounds = (60, 20, 1) if args.quick else (600, 200, args.rounds)
    print(run(rounds, n_nm, n_ct, variants, args.jobstore, max(1, args.senders), args.keep_outputs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
