"""The spool's durability cost alone: one flush per instance (the default) against two.

A/B in one process, rounds alternating: ``Spool.store`` of ``--n`` instances of ``--size`` bytes
(NM 256x256 16-bit: 131 kB; CT 512x512: 525 kB) into a fresh series folder through prepared
files, with ``defer_directory_fsync`` on (data, inode and checksum flushed on the C-STORE path,
the folder by the background thread) and off (file, then folder, both on the C-STORE path).
Prints the milliseconds per store of every round and their medians. The spool lives under
``--dir`` (default: the system temp folder) and is kept: deleting many files slows file
creation on this disk for minutes (DESIGN.md, pitfalls); ``--clean`` removes it (``--quick``,
as the suite runs it, always does).

Run ``python bench/bench_ingest_spool.py [--n 200] [--size 131000] [--rounds 6]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import command_line, load

from dicom_node.receive.spool import Spool


def one_round(root: Path, defer: bool, n: int, data: bytes, tag: int) -> float:
    """Milliseconds per store of ``n`` new instances, after the prepared files are ready."""
    spool = Spool(root, prepare_ahead=True, defer_directory_fsync=defer)
    study, series = f"1.2.826.0.1.3680043.10.{tag}", "1.2.826.0.1.3680043.11.1"
    spool.store(study, series, "1.2.826.0.1.3680043.12.1", [b"warm-up"])
    time.sleep(0.3)  # the background thread prepares its files
    start = time.perf_counter()
    for i in range(n):
        spool.store(study, series, f"1.2.826.0.1.3680043.13.{i + 1}", [data])
    return (time.perf_counter() - start) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="instances per round")
    parser.add_argument("--size", type=int, default=131_000, help="bytes per instance")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", type=Path, default=None, help="where the spools go")
    parser.add_argument("--clean", action="store_true", help="remove the spools at the end")
    parser.add_argument("--quick", action="store_true", help="20 instances, 2 rounds (CI)")
    args = parser.parse_args(argv)
    n, rounds = (20, 2) if args.quick else (args.n, args.rounds)
    base = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    data = os.urandom(args.size)
    print(f"$ {command_line()}  ({load()})", flush=True)
    results: dict[bool, list[float]] = {True: [], False: []}
    try:
        for r in range(rounds):
            for defer in (True, False) if r % 2 else (False, True):
                ms = one_round(base / f"r{r}-{int(defer)}", defer, n, data, 2 * r + int(defer) + 1)
                results[defer].append(ms)
    finally:
        if args.clean or args.quick:
            shutil.rmtree(base, ignore_errors=True)
    for defer, label in ((True, "one flush (default)"), (False, "two flushes")):
        runs = ", ".join(f"{x:.2f}" for x in results[defer])
        print(f"{label}: ms per store {runs}; median {statistics.median(results[defer]):.2f}")
    ratio = statistics.median(results[False]) / statistics.median(results[True])
    print(f"two flushes / one flush: {ratio:.2f}x ({load()}); spools kept in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
