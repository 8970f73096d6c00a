"""Benchmarks must not rot: each one runs once, in its quick mode, as part of the suite.

The numbers are not asserted here (speed targets live in bench/RESULTS.md); the run must succeed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHES = sorted(
    p.name for p in (REPO / "bench").glob("bench_*.py") if p.name != "bench_capacity.py"
)
"""Every benchmark but bench_capacity, which has its own test below (it also checks the SEGs)."""


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_runs_in_quick_mode(bench: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / bench), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_capacity_quick_mode_gets_every_seg_back() -> None:
    """bench_capacity's quick mode (one low rate, 10 studies) must see all 10 SEGs arrive at the
    storescp: a harness that loses them would report nothing useful. No timing is asserted."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_capacity.py"), "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 4 |")]
    assert rows and all("| 10/10 | 10/10 |" in row for row in rows), result.stdout[-2000:]
