"""Benchmarks must not rot: each one runs once, in its quick mode, as part of the suite.

The numbers are not asserted here (speed targets live in bench/RESULTS.md); the run must succeed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCHES = sorted(p.name for p in (REPO / "bench").glob("bench_*.py"))


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
