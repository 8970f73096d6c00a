"""Start-up reconciliation benchmark: ``reconcile_spool`` over a large spool (issue 9 item 5).

Workload: 100,000 spooled instances (1,000 series of 100, in 100 studies), each a small valid
DICOM file under ``spool/<study>/<series>/<sop>.dcm`` with its row in the job store, as a node
that ran for weeks leaves them; plus ``--missing`` (default 100) files without a row, the
instances a power cut took from the job store, which reconciliation must read back and record.
Timed: :func:`dicom_node.jobs.reconcile.reconcile_spool` on a freshly opened job store, twice
(``cold``: the first pass records the missing rows; ``warm``: nothing to record, the usual start),
and the spool's own start-up scan (``Spool(storage)`` sums the bytes of every spooled file).

This machine's root file system is ext4 without a journal, where deleting many files makes the
next creations slow for minutes (bench/RESULTS.md). The 100k-file spool is therefore built once
in ``--workdir`` (default: a fixed folder under the temp dir) and kept for later runs; ``--clean``
removes it at the end. The missing rows are deleted again before each run, so every run measures
the same work. ``--quick`` (CI) uses 2,000 instances in a temporary folder, removed at the end.

Run ``python bench/bench_reconcile.py`` (``--quick``, ``--instances N``, ``--workdir DIR``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from sqlalchemy import delete, insert  # noqa: E402

from bench.common import machine  # noqa: E402
from dicom_node.jobs.reconcile import reconcile_spool  # noqa: E402
from dicom_node.jobs.schema import instances, jobs, series  # noqa: E402
from dicom_node.jobs.store import JobStore  # noqa: E402
from dicom_node.receive.spool import Spool  # noqa: E402

SPOOL_DIR = "spool"  # dicom_node.receive.spool.SPOOL_DIR
PER_SERIES = 100
SERIES_PER_STUDY = 10
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"


def _uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.10.999." + ".".join(str(p) for p in parts)


_TEMPLATE_STUDY = _uid(1, 99999)
_TEMPLATE_SERIES = _uid(2, 99999)
_TEMPLATE_SOP = _uid(9, 999999)


def _template() -> bytes:
    """A small valid DICOM file; the UIDs are patched per instance (same lengths)."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = NM_STORAGE
    ds.SOPInstanceUID = _TEMPLATE_SOP
    ds.StudyInstanceUID = _TEMPLATE_STUDY
    ds.SeriesInstanceUID = _TEMPLATE_SERIES
    ds.Modality = "NM"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NM_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


class ReconcileBenchmark:
    """A spool of ``n`` recorded instances plus ``missing`` unrecorded ones under ``workdir``."""

    def __init__(self, workdir: Path, n: int, missing: int) -> None:
        self.workdir = workdir
        self.n = n
        self.missing = missing
        self.storage = workdir / "var"

    def _names(self) -> list[tuple[str, str, str]]:
        out = []
        total = self.n + self.missing
        for i in range(total):
            s = i // PER_SERIES
            # fixed-width numbers: every file is the template with its UIDs overwritten in place
            study, ser = _uid(1, 10000 + s // SERIES_PER_STUDY), _uid(2, 10000 + s)
            out.append((study, ser, _uid(9, 100000 + i)))
        return out

    def setup(self) -> None:
        """Build the spool and rows once (kept between runs); drop the 'missing' rows again."""
        names = self._names()
        marker = self.storage / f".bench-{self.n}-{self.missing}"
        store = JobStore.open(self.storage)
        try:
            if not marker.exists():
                self._build(store, names)
                marker.write_text("built\n")
            lost = [sop for _st, _se, sop in names[self.n :]]
            with store.engine.begin() as conn:
                for k in range(0, len(lost), 500):
                    conn.execute(
                        delete(instances).where(instances.c.sop_instance_uid.in_(lost[k : k + 500]))
                    )
        finally:
            store.close()

    def _build(self, store: JobStore, names: list[tuple[str, str, str]]) -> None:
        template = _template()
        now = time.time()
        rows = []
        made: set[str] = set()
        for study, ser, sop in names:
            folder = self.storage / SPOOL_DIR / study / ser
            if str(folder) not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(str(folder))
            data = _patched(template, study, ser, sop)
            path = folder / f"{sop}.dcm"
            path.write_bytes(data)
            rows.append(
                {
                    "sop_instance_uid": sop,
                    "series_uid": ser,
                    "study_uid": study,
                    "sop_class_uid": NM_STORAGE,
                    "modality": "NM",
                    "path": f"{SPOOL_DIR}/{study}/{ser}/{sop}.dcm",
                    "size": len(data),
                    "calling_ae": None,
                    "transfer_syntax": ExplicitVRLittleEndian,
                    "received_at": now,
                }
            )
        series_rows = {}
        for row in rows:
            series_rows.setdefault(
                row["series_uid"],
                {
                    "series_uid": row["series_uid"],
                    "study_uid": row["study_uid"],
                    "modality": "NM",
                    "n_instances": 0,
                    "first_received": now,
                    "last_received": now,
                },
            )["n_instances"] += 1
        with store.engine.begin() as conn:
            conn.execute(insert(instances), rows)
            conn.execute(insert(series), list(series_rows.values()))
            conn.execute(
                insert(jobs),
                [
                    {
                        "series_uid": s["series_uid"],
                        "study_uid": s["study_uid"],
                        "kind": "production",
                        "state": "done",
                        "rule": "bench",
                        "created_at": now,
                        "updated_at": now,
                        "finished_at": now,
                        "next_attempt_at": 0.0,
                        "attempts": 1,
                        "export_attempts": 0,
                    }
                    for s in series_rows.values()
                ],
            )

    def time_spool_scan(self) -> float:
        """``Spool(storage)``: the node's other start-up walk (sums the spool's bytes)."""
        start = time.perf_counter()
        spool = Spool(self.storage)
        elapsed = time.perf_counter() - start
        assert spool.bytes_used() > 0
        return elapsed

    def time_reconcile(self) -> tuple[float, int]:
        """One ``reconcile_spool`` on a freshly opened store: (seconds, instances recorded)."""
        store = JobStore.open(self.storage)
        try:
            start = time.perf_counter()
            added = reconcile_spool(store, self.storage, SPOOL_DIR)
            return time.perf_counter() - start, added
        finally:
            store.close()


def _patched(template: bytes, study: str, ser: str, sop: str) -> bytes:
    """``template`` with its UIDs overwritten (same widths, so no re-encoding)."""
    if len(study) != len(_TEMPLATE_STUDY) or len(sop) != len(_TEMPLATE_SOP):
        raise ValueError(f"UIDs must keep the template's widths, got {study!r}, {sop!r}")
    return (
        template.replace(_TEMPLATE_SOP.encode(), sop.encode())
        .replace(_TEMPLATE_STUDY.encode(), study.encode())
        .replace(_TEMPLATE_SERIES.encode(), ser.encode())
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 instances, temp folder")
    parser.add_argument("--instances", type=int, default=100_000)
    parser.add_argument("--missing", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--clean", action="store_true", help="remove the spool at the end")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else args.instances
    missing = min(args.missing, 20) if args.quick else args.missing
    temp = args.quick or args.workdir is None and args.clean
    if args.quick:
        workdir = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    else:
        workdir = args.workdir or Path(tempfile.gettempdir()) / f"dicom-node-bench-reconcile-{n}"
    bench = ReconcileBenchmark(workdir, n, missing)
    try:
        start = time.perf_counter()
        bench.setup()
        print(f"machine: {machine()}")
        print(f"spool: {n} recorded + {missing} unrecorded instances in {workdir}")
        print(f"setup: {time.perf_counter() - start:.1f} s")
        cold, added = bench.time_reconcile()
        warm, again = bench.time_reconcile()
        print(f"reconcile cold (records the missing rows): {cold:.3f} s, {added} recorded")
        print(f"reconcile warm (nothing to record):        {warm:.3f} s, {again} recorded")
        print(f"spool byte scan (Spool(storage)):          {bench.time_spool_scan():.3f} s")
        if added != missing or again != 0:
            print(f"FAIL: expected {missing} then 0 recorded, got {added} then {again}")
            return 1
    finally:
        if temp or args.clean:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
