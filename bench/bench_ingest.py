"""Ingest benchmark: DCMTK storescu into ``dicom-node serve`` versus into DCMTK storescp.

Workload (issue 15, item 1): two sets, each sent by one DCMTK ``storescu`` (``TCP_NODELAY=1``) over
one association: **NM** = 600 NM 256x256 16-bit images, **CT** = 200 CT 512x512 16-bit slices.

- The node runs as an operator runs it: ``dicom-node serve`` as a subprocess (its default
  durability: Success only after the file, its folder and the job-store row are on disk), started
  once and waited on ``/readyz`` before anything is timed; no rules (nothing is routed, so no
  inference competes with the receive path).
- **New SOP Instance UIDs every round.** A duplicate is answered without a write, so every round
  writes its own files (fresh Study/Series/SOP Instance UIDs, pydicom) before timing; the node's
  ``/metrics`` must show every instance received and none duplicate, else the run fails.
- **Rounds alternate** the receivers (storescp first in odd rounds, the node first in even ones),
  storescp into a fresh folder each run; the median of the rounds gives the ratio per set
  (DCMTK seconds / node seconds: 1.0 = as fast as DCMTK).
- **Outputs are kept until the end** (nothing is deleted between runs): this root file system is
  ext4 without a journal, where deleting many files slows every file creation for minutes
  (DESIGN.md, pitfalls).
- Before each timed run the node is left to go quiet (< 5% of a core over 0.5 s), and the load
  average is recorded with every figure (other sessions share these two cores).

Run ``python bench/bench_ingest.py`` (``--quick``: 60 NM + 20 CT, one round, as the suite does).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    REPO,
    NodeServer,
    command_line,
    cpu_seconds,
    load,
    machine,
    node_config,
    settle,
)
from pydicom import Dataset
from pydicom.uid import generate_uid

from tests.helpers.dicom_factory import make_ct_series, make_nm
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import StoreSCP, storescu

RECEIVED = "dicom_node_instances_received_total"
DUPLICATE = "dicom_node_instances_duplicate_total"


@dataclass
class Run:
    """One timed storescu run."""

    seconds: float
    load: str
    cpu: float | None = None
    """CPU seconds the node process used during the run (node runs only)."""


@dataclass
class SetResult:
    """All runs of one set: ``{receiver: [Run, ...]}``."""

    name: str
    n_files: int
    n_bytes: int
    runs: dict[str, list[Run]] = field(default_factory=lambda: {"dcmtk-storescp": [], "node": []})

    def median(self, receiver: str) -> float:
        return statistics.median(r.seconds for r in self.runs[receiver])


class IngestBenchmark:
    """storescu -> {DCMTK storescp, ``dicom-node serve``}, one association per set and run.

    ``setup`` builds the images once and starts the node; ``round`` gives every image fresh
    UIDs, writes the files and times both receivers; ``teardown`` stops the node and removes
    everything.
    """

    def __init__(self, n_nm: int = 600, n_ct: int = 200) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
        self.sets: dict[str, list[Dataset]] = {}
        self.n_nm, self.n_ct = n_nm, n_ct
        self.node: NodeServer | None = None
        self.results: dict[str, SetResult] = {}

    def setup(self) -> None:
        if self.n_nm:
            self.sets["NM"] = [
                make_nm(256, 256, seed="bench-nm", instance_number=i + 1) for i in range(self.n_nm)
            ]
        if self.n_ct:
            self.sets["CT"] = make_ct_series(
                n_slices=self.n_ct, rows=512, cols=512, seed="bench-ct"
            )
        shipped = REPO / "models" / "thyroid-seg"
        models = REPO / "models" if (shipped / "aliases.yaml").exists() else None
        if models is None:
            models = make_store(self.tmp / "models", size=(256, 256))
        (self.tmp / "rules").mkdir()
        # no rules: nothing is routed, so the destination (the discard port) is never called
        config = node_config(self.tmp / "node", models, self.tmp / "rules", pacs_port=9)
        (self.tmp / "node").mkdir()
        self.node = NodeServer(config, self.tmp / "node").__enter__()

    def teardown(self) -> None:
        if self.node is not None:
            self.node.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _write(self, round_no: int, name: str) -> Path:
        """Give the set fresh Study/Series/SOP Instance UIDs and write it; return its folder."""
        folder = self.tmp / f"data-{round_no}" / name
        folder.mkdir(parents=True)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        for k, ds in enumerate(self.sets[name]):
            sop = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            if "FrameOfReferenceUID" in ds:
                ds.FrameOfReferenceUID = frame
            ds.save_as(folder / f"{k:05d}.dcm", enforce_file_format=True)
        return folder

    def _time_storescp(self, folder: Path, out: Path, n: int) -> Run:
        with StoreSCP(output_dir=out) as scp:
            before = load()
            start = time.perf_counter()
            result = storescu([folder], scp.port, scp.aet, timeout=900)
            elapsed = time.perf_counter() - start
            received = len(scp.received())
        if result.returncode != 0:
            raise RuntimeError(f"storescu -> storescp failed: {result.stderr[-2000:]}")
        if received != n:
            raise RuntimeError(f"storescp stored {received} of {n}")
        return Run(elapsed, before)

    def _time_node(self, folder: Path, n: int) -> Run:
        node = self.node
        assert node is not None
        settle(node.pid)
        metrics = node.metrics()
        before = load()
        cpu = cpu_seconds(node.pid)
        start = time.perf_counter()
        result = storescu([folder], node.config.port, node.config.ae_title, timeout=900)
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(node.pid) - cpu
        if result.returncode != 0:
            raise RuntimeError(f"storescu -> node failed: {result.stderr[-2000:]}")
        after = node.metrics()
        received = after.get(RECEIVED, 0) - metrics.get(RECEIVED, 0)
        duplicate = after.get(DUPLICATE, 0) - metrics.get(DUPLICATE, 0)
        if received != n or duplicate:
            raise RuntimeError(f"node received {received:.0f} of {n}, {duplicate:.0f} duplicate")
        return Run(elapsed, before, cpu)

    def round(self, round_no: int) -> None:
        """Fresh UIDs for every set, then both receivers (order alternating by round)."""
        for name in self.sets:
            folder = self._write(round_no, name)
            files = sorted(folder.iterdir())
            result = self.results.setdefault(
                name, SetResult(name, len(files), sum(p.stat().st_size for p in files))
            )
            order = ["dcmtk-storescp", "node"] if round_no % 2 else ["node", "dcmtk-storescp"]
            for receiver in order:
                if receiver == "node":
                    run = self._time_node(folder, len(files))
                else:
                    out = self.tmp / f"storescp-{round_no}-{name}"
                    assert self.node is not None
                    settle(self.node.pid)
                    run = self._time_storescp(folder, out, len(files))
                result.runs[receiver].append(run)
                cpu = "" if run.cpu is None else f", node CPU {run.cpu:.2f} s"
                print(
                    f"  round {round_no} {name}: {receiver} {run.seconds:.2f} s{cpu} ({run.load})",
                    flush=True,
                )


def report(bench: IngestBenchmark, rounds: int, started: str) -> str:
    """A Markdown report: the command, the conditions, per set the runs and the ratio."""
    lines = [
        f"- command: `{command_line()}`",
        f"- date: {started}; machine: {machine()}",
        "- node: `dicom-node serve` subprocess, ready on /readyz before timing, default "
        "durability, no rules; sender: DCMTK storescu, TCP_NODELAY=1, one association per set "
        "and run",
        f"- {rounds} round(s), new Study/Series/SOP Instance UIDs every round (node /metrics: "
        "every instance received, 0 duplicates), receivers alternating (storescp first in odd "
        "rounds), "
        "storescp into a fresh folder per run; **outputs kept until the end** (no deletes during "
        "the runs)",
        "",
        "| set | files | MB | receiver | runs s (load 1/5/15 min before each) | median s | "
        "images/s | ratio (DCMTK / node, medians) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in bench.results.values():
        ref = result.median("dcmtk-storescp")
        for receiver, runs in result.runs.items():
            med = result.median(receiver)
            detail = ", ".join(f"{r.seconds:.2f} ({r.load.removeprefix('load ')})" for r in runs)
            lines.append(
                f"| {result.name} | {result.n_files} | {result.n_bytes / 1e6:.0f} | {receiver} | "
                f"{detail} | {med:.2f} | {result.n_files / med:.0f} | {ref / med:.2f} |"
            )
    lines.append("")
    for result in bench.results.values():
        ratio = result.median("dcmtk-storescp") / result.median("node")
        cpus = [r.cpu for r in result.runs["node"] if r.cpu is not None]
        per = statistics.median(cpus) / result.n_files * 1e3 if cpus else float("nan")
        lines.append(
            f"ratio {result.name}: {ratio:.2f}x DCMTK (target >= 0.5x); node CPU "
            f"{per:.2f} ms per instance (median of the runs; steadier than wall time when "
            "other work shares the cores)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 NM + 20 CT, one round (CI)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nm", type=int, default=600, help="NM 256x256 images per round")
    parser.add_argument("--ct", type=int, default=200, help="CT 512x512 slices per round")
    args = parser.parse_args(argv)
    n_nm, n_ct, rounds = (60, 20, 1) if args.quick else (args.nm, args.ct, args.rounds)
    print(f"$ {command_line()}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = IngestBenchmark(n_nm, n_ct)
    try:
        bench.setup()
        for round_no in range(1, rounds + 1):
            bench.round(round_no)
        print(report(bench, rounds, started))
    finally:
        bench.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
