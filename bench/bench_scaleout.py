"""Scale-out benchmark: single-image NM studies end to end with 1 and 2 worker processes.

Workload (issue 11): ``--studies`` (default 60) single-image 256x256 NM thyroid studies
(``dicom_node.demo.phantoms.make_case``, new UIDs for every configuration), sent with one DCMTK
``storescu`` run (one association, ``TCP_NODELAY=1``) to a receiver; destination a DCMTK
``storescp``. **Throughput** = studies / (last SEG written at storescp - start of the send):
C-STORE to SEG, every stage included. Configurations, in one run on the same machine:

- ``sqlite, 1 process``: ``role: all``, the embedded SQLite job store;
- ``postgresql, 1 process``: the same on PostgreSQL (a server started for the run with
  ``initdb``/``pg_ctl`` as the ``postgres`` user, in a temporary folder on a free port);
- ``postgresql, receiver + 1 worker`` and ``postgresql, receiver + 2 workers``: separate
  ``dicom-node serve --role`` processes on one PostgreSQL and one storage folder.

Every process runs ``workers: 1`` and ``inference_threads: 1`` (one job, one core each), so that
2 worker processes against 1 measures what a second process adds; the ratio is the figure to
quote. The model is the shipped ``thyroid-seg`` when present, else a same-size ONNX stand-in.

Run ``python bench/bench_scaleout.py [--studies 60]``; ``--quick``: 8 studies per
configuration, as the suite does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import REPO, NodeServer, command_line, load, machine, node_config
from pydicom import dcmread

from dicom_node.config import Destination
from dicom_node.demo.phantoms import make_case
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import StoreSCP, storescu
from tests.helpers.ports import free_port, wait_for_port

RULE = """\
rules:
  - name: thyroid
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
"""

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
TIMEOUT = 600.0
"""Seconds one configuration may take before the run is abandoned."""


@contextmanager
def postgres() -> Iterator[Callable[[str], str]]:
    """A throw-away PostgreSQL server; yields ``new_database(name) -> SQLAlchemy URL``.

    Its folder is a temporary folder of its own (the ``postgres`` user must reach it), removed
    after the server stopped.
    """
    pg_bin = Path("/usr/lib/postgresql/15/bin")
    workdir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    data = workdir / "data"
    as_pg: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root (DESIGN.md, pitfalls)
        shutil.chown(workdir, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    ctl = [*as_pg, str(pg_bin / "pg_ctl"), "-D", str(data), "-w"]
    try:
        initdb = [*as_pg, str(pg_bin / "initdb"), "-D", str(data), "-U", "bench", "-A", "trust"]
        subprocess.run(initdb, check=True, capture_output=True)
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1"
        log = workdir / "log"
        subprocess.run(
            [*ctl, "-o", options, "-l", str(log), "start"], check=True, capture_output=True
        )
        wait_for_port(port, timeout=30)

        def new_database(name: str) -> str:
            createdb = [str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "bench"]
            subprocess.run([*as_pg, *createdb, name], check=True, capture_output=True)
            return f"postgresql+psycopg://bench@127.0.0.1:{port}/{name}"

        yield new_database
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Result:
    label: str
    studies: int
    seconds: float
    segs: int
    load_before: str
    load_after: str

    @property
    def rate(self) -> float:
        return self.studies / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        return (
            f"| {self.label} | {self.segs}/{self.studies} | {self.seconds:.1f} | "
            f"{self.rate:.2f} | {self.load_before.removeprefix('load ')} -> "
            f"{self.load_after.removeprefix('load ')} |"
        )


class ScaleoutBenchmark:
    """``setup`` makes the model store, rules and storescp; ``time_site`` runs one site."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
        self.model_kind = ""
        self.models = self.tmp / "models"
        self.scp: StoreSCP | None = None
        self._seed = 0

    def setup(self) -> None:
        shipped = REPO / "models" / "thyroid-seg"
        if (shipped / "aliases.yaml").exists():
            self.models, self.model_kind = REPO / "models", "shipped thyroid-seg"
        else:
            self.models = make_store(self.tmp / "models", size=(256, 256))
            self.model_kind = "256x256 ONNX stand-in (tests/helpers/onnx_models.py)"
        (self.tmp / "rules").mkdir()
        (self.tmp / "rules" / "thyroid.yaml").write_text(RULE)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _studies(self, folder: Path, n: int) -> list[Path]:
        folder.mkdir(parents=True)
        paths = []
        for i in range(n):
            ds = make_case(50_000 + self._seed + i, 256).dataset
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        self._seed += n
        return paths

    def time_site(self, label: str, n: int, database: str | None, workers: int) -> Result:
        """``workers`` 0: one ``role: all`` process; else a receiver and that many workers."""
        run = self.tmp / label.replace(" ", "-").replace(",", "").replace("+", "")
        files = self._studies(run / "studies", n)
        with ExitStack() as stack:
            scp = stack.enter_context(StoreSCP(aet="STORESCP", output_dir=run / "received"))
            base = node_config(
                run,
                self.models,
                self.tmp / "rules",
                scp.port,
                workers=1,
                inference_threads=1,
                destinations={
                    "pacs": Destination(ae_title=scp.aet, host="127.0.0.1", port=scp.port)
                },
                **({"database": database} if database else {}),
            )
            roles = ["all"] if workers == 0 else ["receiver"] + ["worker"] * workers
            receiver = None
            for i, role in enumerate(roles):
                workdir = run / f"{role}-{i}"
                workdir.mkdir()
                config = base.model_copy(
                    update={
                        "role": role,
                        "port": free_port(),
                        "http_port": free_port(),
                        "node_name": f"{role}-{i}",
                    }
                )
                server = stack.enter_context(NodeServer(config, workdir))
                if role != "worker":
                    receiver = server
            assert receiver is not None
            before = load()
            start = time.time()
            sent = storescu(files, receiver.config.port, receiver.config.ae_title, timeout=TIMEOUT)
            if sent.returncode != 0:
                raise RuntimeError(f"{label}: storescu failed: {sent.stderr[-500:]}")
            last = _wait_segs(scp.output_dir, n, start + TIMEOUT)
            return Result(
                label, n, (last or time.time()) - start, _count_segs(scp.output_dir), before, load()
            )


def _count_segs(folder: Path) -> int:
    return sum(
        1
        for p in folder.iterdir()
        if p.is_file() and str(dcmread(p, stop_before_pixels=True).SOPClassUID) == SEG_STORAGE
    )


def _wait_segs(folder: Path, n: int, deadline: float) -> float | None:
    """Wait for ``n`` SEGs in ``folder``; the modification time of the last one (None: timeout)."""
    seen: dict[str, float] = {}
    while time.time() < deadline:
        for entry in os.scandir(folder):
            if entry.name in seen or not entry.is_file():
                continue
            try:
                ds = dcmread(entry.path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - still being written: next scan
                continue
            if str(ds.SOPClassUID) == SEG_STORAGE:
                seen[entry.name] = entry.stat().st_mtime
        if len(seen) >= n:
            return max(seen.values())
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="8 studies per configuration")
    args = parser.parse_args(argv)
    n = 8 if args.quick else args.studies
    bench = ScaleoutBenchmark()
    results: list[Result] = []
    try:
        bench.setup()
        results.append(bench.time_site("sqlite, 1 process", n, None, 0))
        with postgres() as new_database:
            results.append(bench.time_site("postgresql, 1 process", n, new_database("one"), 0))
            for workers in (1, 2):
                label = f"postgresql, receiver + {workers} worker{'s' if workers > 1 else ''}"
                results.append(bench.time_site(label, n, new_database(f"w{workers}"), workers))
    finally:
        bench.teardown()
    print(f"`{command_line()}`; {machine()}; model: {bench.model_kind}; {n} studies per row")
    print("| configuration | SEGs | seconds | studies/s | load 1/5/15 before -> after |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(r.row())
    by = {r.label: r for r in results}
    one, two = by["postgresql, receiver + 1 worker"], by["postgresql, receiver + 2 workers"]
    sqlite, pg = by["sqlite, 1 process"], by["postgresql, 1 process"]
    print(
        f"2 workers / 1 worker: {two.rate / one.rate:.2f}x; "
        f"PostgreSQL / SQLite (1 process): {pg.rate / sqlite.rate:.2f}x"
    )
    lost = [r.label for r in results if r.segs != r.studies]
    if lost:
        print(f"SEGs missing or duplicated in: {', '.join(lost)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
