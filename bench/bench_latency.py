"""Time to result and memory: single-image NM studies through a node into Orthanc.

Workload: N single-image 256x256 NM studies (synthetic thyroid phantoms), rule
``complete: {instances: 1}``, one association each (as a PACS sends). Measured per study: from the
C-STORE response (end of the C-STORE) to the SEG being listed by Orthanc's REST API (polled every
10 ms). Memory: the node process's RSS after a warm-up of 20 studies and after the last one.

Model: the shipped ``models/thyroid-seg`` when present, else a same-size ONNX stand-in built by the
tests' helper (marked in the output).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, NodeServer, machine, node_config, rss_bytes
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage

from dicom_node.demo.phantoms import make_case
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import Orthanc

RULE = """\
rules:
  - name: thyroid
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
"""


class TimeToResult:
    """Benchmark class: ``setup``, ``time_studies``, ``teardown``."""

    def __init__(self, n: int, warmup: int) -> None:
        self.n = n
        self.warmup = warmup
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))

    def setup(self) -> None:
        shipped = REPO / "models" / "thyroid-seg"
        if (shipped / "aliases.yaml").exists():
            self.models, self.model_kind = REPO / "models", "shipped thyroid-seg"
        else:
            self.models = make_store(self.tmp / "models", size=(256, 256))
            self.model_kind = "256x256 ONNX stand-in (tests/helpers/onnx_models.py)"
        (self.tmp / "rules").mkdir()
        (self.tmp / "rules" / "thyroid.yaml").write_text(RULE)
        self.orthanc = Orthanc().__enter__()
        config = node_config(self.tmp, self.models, self.tmp / "rules", self.orthanc.dicom_port)
        self.node = NodeServer(config, self.tmp).__enter__()
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.add_requested_context(NuclearMedicineImageStorage)

    def teardown(self) -> None:
        self.node.__exit__(None, None, None)
        self.orthanc.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _count(self) -> int:
        return int(self.orthanc.rest_get("/statistics")["CountInstances"])

    def _one(self, seed: int) -> float:
        ds = make_case(seed, 256).dataset
        before = self._count()
        assoc = self.ae.associate(
            "127.0.0.1", self.node.config.port, ae_title=self.node.config.ae_title
        )
        status = assoc.send_c_store(ds)
        end_of_store = time.perf_counter()
        assoc.release()
        if not status or status.Status != 0:
            raise RuntimeError(f"C-STORE failed: {status}")
        deadline = end_of_store + 60
        while self._count() < before + 1:  # Orthanc stores the SEG: one more instance
            if time.perf_counter() > deadline:
                raise RuntimeError("no SEG within 60 s")
            time.sleep(0.01)
        return time.perf_counter() - end_of_store

    def time_studies(self) -> dict[str, object]:
        pid = self.node.proc.pid  # type: ignore[union-attr]
        for i in range(self.warmup):
            self._one(10_000 + i)
        rss_start = rss_bytes(pid)
        times = [self._one(20_000 + i) for i in range(self.n)]
        rss_end = rss_bytes(pid)
        times.sort()
        return {
            "studies": self.n,
            "model": self.model_kind,
            "p50_s": round(statistics.median(times), 3),
            "p95_s": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3),
            "max_s": round(times[-1], 3),
            "rss_start_mb": round(rss_start / 2**20, 1),
            "rss_end_mb": round(rss_end / 2**20, 1),
            "rss_growth_mb": round((rss_end - rss_start) / 2**20, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 studies, for CI")
    parser.add_argument("--studies", type=int, default=500)
    args = parser.parse_args()
    bench = TimeToResult(n=5 if args.quick else args.studies, warmup=2 if args.quick else 20)
    bench.setup()
    try:
        result = bench.time_studies()
    finally:
        bench.teardown()
    result["machine"] = machine()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
