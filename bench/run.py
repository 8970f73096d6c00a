"""Run every benchmark once: ``python bench/run.py [--quick]`` (quick mode is what CI runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "bench_latency.py",
    "bench_ingest.py",
    "bench_inference.py",
    "bench_reconcile.py",
    "bench_capacity.py",
    "bench_scaleout.py",
]


def main() -> int:
    quick = ["--quick"] if "--quick" in sys.argv[1:] else []
    failed = []
    for name in BENCHES:
        if not (HERE / name).exists():
            continue
        print(f"== {name} {' '.join(quick)}", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / name), *quick], cwd=HERE.parent).returncode
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
