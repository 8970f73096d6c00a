"""Capacity benchmark: single-image NM thyroid studies at a steady rate, time to SEG at a storescp.

Workload (issue 15, item 2): a rate sweep (default 5, 10, 15, 20 studies/s, 90 studies each) of
single-image 256x256 NM thyroid studies (``dicom_node.demo.phantoms.make_case``, generated before
each rate is timed), each study on its own association (pynetdicom, TCP_NODELAY set on its socket),
sent open-loop: study *i* starts at ``t0 + i / rate`` whatever happened to the ones before (a pool
of sender threads, so a slow node does not slow the offered rate).

- The node runs as an operator runs it: ``dicom-node serve`` as a subprocess with its default
  poll interval and durability, waited on ``/readyz``; rule ``Modality NM, complete: {instances:
  1}``, model ``thyroid-seg@production`` (the shipped one when present, else a same-size ONNX
  stand-in, marked in the output), destination a DCMTK ``storescp`` (``TCP_NODELAY=1``).
- **time to SEG** = arrival of the SEG at storescp (the modification time of the file storescp
  wrote, i.e. when it finished writing it; the kernel's coarse clock, ~4 ms granularity) minus the
  end of the C-STORE (the C-STORE response read by the sender). The SEG is matched to its study by
  StudyInstanceUID. SEGs count as returned when they arrive within ``--window`` (30 s) of the last
  C-STORE of the rate.
- **backlog**: the median time to SEG of the last tenth of the studies (in send order) against the
  first tenth; "yes" when the last tenth is 1.5x slower and at least 50 ms slower, or lost SEGs.
- Also per rate: the offered rate achieved (first to last send), the node's CPU seconds per study
  (``/proc/<pid>/stat`` over the rate, all threads), the load average before and after.
- ``--profile``: after the sweep, one more pass at the highest rate sustained (all SEGs back, no
  backlog, p95 <= 0.5 s; the highest rate of the sweep if none was) with ``py-spy record`` attached
  to the node (``--nonblocking``, 100 Hz); writes the collapsed stacks, an SVG flamegraph and a
  top summary (CPU ms per study by function, self and inclusive, and by thread) to
  ``--profile-dir``. That pass is reported apart: py-spy costs CPU on the same two cores.

Run ``python bench/bench_capacity.py [--rates 5,10,15,20] [--studies 90] [--profile]``;
``--quick``: one low rate (4/s), 10 studies, as the suite does.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import NuclearMedicineImageStorage

from dicom_node.config import Destination, NodeConfig
from dicom_node.demo.phantoms import make_case
from tests.helpers.onnx_models import make_store
from tests.helpers.peers import StoreSCP

RULE = """\
rules:
  - name: thyroid
    when: {Modality: NM}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
"""

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SENDER_THREADS = 16
"""Concurrent associations the sender may hold: enough that a slow node does not lower the
offered rate (up to ~16 x rate seconds of C-STORE each)."""


def _nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle on its requestor socket; a benchmark sender should not wait on it."""
    sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass
class Study:
    """One sent study and what became of it."""

    uid: str
    scheduled: float = 0.0
    started: float = 0.0
    end_of_store: float = 0.0
    """Wall clock (``time.time``), to compare with file modification times."""
    status: int | None = None
    seg_arrival: float | None = None

    @property
    def time_to_seg(self) -> float | None:
        return None if self.seg_arrival is None else self.seg_arrival - self.end_of_store


@dataclass
class RateResult:
    """Everything measured at one rate."""

    rate: float
    label: str
    studies: list[Study] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""
    cpu_s: float = 0.0
    achieved_rate: float = 0.0
    max_lag: float = 0.0

    def times(self) -> list[float]:
        return sorted(t for s in self.studies if (t := s.time_to_seg) is not None)

    def backlog(self) -> tuple[float | None, float | None, str]:
        tenth = max(1, len(self.studies) // 10)
        first = [s.time_to_seg for s in self.studies[:tenth]]
        last = [s.time_to_seg for s in self.studies[-tenth:]]
        if any(t is None for t in first + last):
            med_first = statistics.median([t for t in first if t is not None] or [float("nan")])
            return med_first, None, "yes (SEGs missing)"
        f, la = statistics.median(first), statistics.median(last)  # type: ignore[type-var]
        verdict = "yes" if la > 1.5 * f and la - f > 0.05 else "no"
        return f, la, verdict

    def p95(self) -> float | None:
        times = self.times()
        return times[min(len(times) - 1, int(0.95 * len(times)))] if times else None

    def sustained(self) -> bool:
        """Issue 15's bar: every C-STORE ok, every SEG back, no backlog, p95 <= 0.5 s."""
        n = len(self.studies)
        ok = sum(1 for s in self.studies if s.status == 0)
        p95 = self.p95()
        return (
            n > 0
            and ok == n
            and len(self.times()) == n
            and self.backlog()[2] == "no"
            and p95 is not None
            and p95 <= TARGET_P95
        )

    def row(self) -> str:
        times = self.times()
        n = len(self.studies)

        def pct(q: float) -> str:
            return f"{times[min(len(times) - 1, int(q * len(times)))]:.3f}" if times else "-"

        first, last, verdict = self.backlog()
        first_s = f"{first:.3f}" if first is not None else "-"
        last_s = f"{last:.3f}" if last is not None else "-"
        ok = sum(1 for s in self.studies if s.status == 0)
        return (
            f"| {self.label} | {self.achieved_rate:.1f} | {ok}/{n} | {len(times)}/{n} | "
            f"{pct(0.5)} | {pct(0.95)} | {f'{times[-1]:.3f}' if times else '-'} | "
            f"{first_s} -> {last_s}: {verdict} | {1000 * self.cpu_s / n:.0f} | "
            f"{self.max_lag:.3f} | {self.load_before.removeprefix('load ')} -> "
            f"{self.load_after.removeprefix('load ')} |"
        )


TARGET_P95 = 0.5
"""Issue 15: p95 time to SEG at or below this, sustained (no backlog), at 15 studies/s."""

TARGET_RATE = 15.0

HEADER = (
    "| rate /s | offered /s | C-STORE ok | SEGs returned | p50 s | p95 s | max s | "
    "backlog (median first tenth -> last tenth) | node CPU ms/study | max sender lag s | "
    "load 1/5/15 before -> after |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | "
    "--- | --- |"
)


class CapacityBenchmark:
    """``setup`` starts storescp and the node; ``time_rate`` runs one rate; ``teardown`` stops
    both and removes everything."""

    def __init__(self, window: float = 30.0) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
        self.window = window
        self.scp: StoreSCP | None = None
        self.node: NodeServer | None = None
        self.model_kind = ""
        self._seen: set[str] = set()
        self._arrivals: dict[str, float] = {}
        self._next_seed = 0
        self.ae = AE(ae_title="BENCHSCU")
        self.ae.add_requested_context(NuclearMedicineImageStorage)

    def setup(self) -> None:
        shipped = REPO / "models" / "thyroid-seg"
        if (shipped / "aliases.yaml").exists():
            models, self.model_kind = REPO / "models", "shipped thyroid-seg"
        else:
            models = make_store(self.tmp / "models", size=(256, 256))
            self.model_kind = "256x256 ONNX stand-in (tests/helpers/onnx_models.py)"
        (self.tmp / "rules").mkdir()
        (self.tmp / "rules" / "thyroid.yaml").write_text(RULE)
        self.scp = StoreSCP(aet="STORESCP", output_dir=self.tmp / "received").__enter__()
        config = node_config(
            self.tmp,
            models,
            self.tmp / "rules",
            self.scp.port,
            poll_interval=NodeConfig.model_fields["poll_interval"].default,
            destinations={
                "pacs": Destination(ae_title=self.scp.aet, host="127.0.0.1", port=self.scp.port)
            },
        )
        self.node = NodeServer(config, self.tmp).__enter__()

    def teardown(self) -> None:
        if self.node is not None:
            self.node.__exit__(None, None, None)
        if self.scp is not None:
            self.scp.__exit__(None, None, None)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def idle_cpu(self, seconds: float = 3.0) -> float:
        """CPU seconds per second the node uses with nothing to do (its loops and the HTTP
        port), the floor under every rate's CPU per study."""
        assert self.node is not None
        settle(self.node.pid)
        before = cpu_seconds(self.node.pid)
        time.sleep(seconds)
        return (cpu_seconds(self.node.pid) - before) / seconds

    def _datasets(self, n: int) -> list[Dataset]:
        """``n`` new phantom studies (new seeds, so new UIDs: nothing is a duplicate)."""
        seeds = range(self._next_seed, self._next_seed + n)
        self._next_seed += n
        return [make_case(1_000 + s, 256).dataset for s in seeds]

    def _send(self, ds: Dataset, study: Study) -> None:
        node = self.node
        assert node is not None
        study.started = time.time()
        assoc = self.ae.associate(
            "127.0.0.1",
            node.config.port,
            ae_title=node.config.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
        )
        if not assoc.is_established:
            return
        try:
            status = assoc.send_c_store(ds)
            study.end_of_store = time.time()
            # send_c_store returns an empty Dataset on timeout or abort (DESIGN.md, pitfalls)
            study.status = int(status.Status) if status and "Status" in status else None
        finally:
            assoc.release()

    def _scan(self) -> None:
        """Read the SEGs storescp wrote since the last scan: study UID -> modification time."""
        assert self.scp is not None
        with os.scandir(self.scp.output_dir) as entries:
            for entry in entries:
                if entry.name in self._seen or not entry.is_file():
                    continue
                mtime = entry.stat().st_mtime
                try:
                    ds = dcmread(entry.path, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - still being written: try next scan
                    continue
                self._seen.add(entry.name)
                if str(ds.SOPClassUID) == SEG_STORAGE:
                    self._arrivals.setdefault(str(ds.StudyInstanceUID), mtime)

    def time_rate(self, rate: float, n: int, label: str | None = None) -> RateResult:
        """Offer ``n`` studies at ``rate`` per second; wait for the SEGs; return the figures."""
        node = self.node
        assert node is not None
        datasets = self._datasets(n)
        studies = [Study(uid=str(ds.StudyInstanceUID)) for ds in datasets]
        result = RateResult(rate, label or f"{rate:g}", studies)
        settle(node.pid)
        result.load_before = load()
        cpu_before = cpu_seconds(node.pid)
        t0 = time.time() + 0.2
        with ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="sender") as pool:
            for i, (ds, study) in enumerate(zip(datasets, studies, strict=True)):
                study.scheduled = t0 + i / rate
                delay = study.scheduled - time.time()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self._send, ds, study)
        deadline = max(s.end_of_store for s in studies) + self.window
        wanted = {s.uid for s in studies if s.status == 0}
        while time.time() < deadline:
            self._scan()
            if wanted <= self._arrivals.keys():
                break
            time.sleep(0.1)
        self._scan()
        result.cpu_s = cpu_seconds(node.pid) - cpu_before
        result.load_after = load()
        for study in studies:
            arrival = self._arrivals.get(study.uid)
            if arrival is not None and study.end_of_store and arrival <= deadline:
                study.seg_arrival = arrival
        starts = [s.started for s in studies]
        result.achieved_rate = (n - 1) / (max(starts) - min(starts)) if n > 1 else rate
        result.max_lag = max(s.started - s.scheduled for s in studies)
        return result


# -- profile --------------------------------------------------------------------------------------


def _py_spy() -> str:
    candidate = Path(sys.executable).with_name("py-spy")
    found = str(candidate) if candidate.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


def _frame_name(frame: str) -> str:
    """``func (dicom_node/receive/scp.py:12)`` -> ``func (receive/scp.py)``: group by function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "dicom_node/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def _thread_name(frame: str) -> str:
    """``thread (24879): dicom-node-scp:52159`` -> ``dicom-node-scp:N``: one row per kind."""
    name = frame.split("): ", 1)[1] if "): " in frame else frame
    return re.sub(r"\d+", "N", name)


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], hz: float, n: int, top: int = 25) -> str:
    """Non-idle thread time per study (and share of samples) by thread and by function.

    py-spy samples every thread that is not idle in the OS sense; a thread waiting for the GIL
    counts, so the total exceeds the CPU time ``/proc`` reports: read the shares, not the sum.
    """
    total = max(1, sum(c for _, c in stacks))
    ms = 1000.0 / hz / n
    threads: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        thread = _thread_name(frames[0]) if frames[0].startswith("thread") else "?"
        body = [f for f in frames if not f.startswith(("thread", "process"))]
        threads[thread] += count
        if body:
            self_[_frame_name(body[-1])] += count
        for name in {_frame_name(f) for f in body}:
            incl[name] += count

    def rows(counter: Counter[str], k: int) -> list[str]:
        return [f"  {c * ms:7.1f} {100 * c / total:5.1f}%  {f}" for f, c in counter.most_common(k)]

    return "\n".join(
        [
            f"{total} samples at {hz:g} Hz over {n} studies = {total * ms:.0f} ms of non-idle "
            "thread time per study (py-spy; waiting for the GIL counts as non-idle)",
            "",
            "by thread, numbers in names folded to N (ms/study, share of samples):",
            *rows(threads, 12),
            "",
            "self time by function:",
            *rows(self_, top),
            "",
            "inclusive time by function:",
            *rows(incl, top),
        ]
    )


def flamegraph_svg(stacks: list[tuple[list[str], int]], title: str) -> str:
    """A self-contained icicle/flame graph (hover shows frame and samples)."""

    def child(node: dict, name: str) -> dict:
        found = node["children"].get(name)
        if found is None:
            found = {"count": 0, "children": {}}
            node["children"][name] = found
        return found

    tree: dict = {"count": 0, "children": {}}
    for frames, count in stacks:
        tree["count"] += count
        node = tree
        for frame in frames:
            node = child(node, frame)
            node["count"] += count
    width, row = 1600.0, 16
    total = max(1, tree["count"])
    rects: list[str] = []
    depth_max = 0

    def draw(node: dict, x: float, depth: int) -> None:
        nonlocal depth_max
        depth_max = max(depth_max, depth)
        for name, sub in sorted(node["children"].items()):
            w = width * sub["count"] / total
            if w >= 0.5:
                y = 24 + depth * row
                hue = 20 + (hash(name) % 40)
                label = html.escape(name)
                text = html.escape(name[: int(w / 7)]) if w > 30 else ""
                rects.append(
                    f"<g><title>{label} ({sub['count']} samples, "
                    f"{100 * sub['count'] / total:.1f}%)</title>"
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
                    f'fill="hsl({hue},90%,60%)"/>'
                    f'<text x="{x + 2:.1f}" y="{y + 12}" font-size="11">{text}</text></g>'
                )
                draw(sub, x, depth + 1)
            x += w

    draw(tree, 0.0, 0)
    height = 40 + (depth_max + 1) * row
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="monospace"><text x="4" y="16" font-size="13">{html.escape(title)}</text>'
        + "".join(rects)
        + "</svg>"
    )


def profile(bench: CapacityBenchmark, rate: float, n: int, out: Path) -> tuple[RateResult, str]:
    """One more pass at ``rate`` with py-spy on the node; write stacks, SVG and summary."""
    assert bench.node is not None
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "capacity-profile.txt"
    hz = 100
    spy = subprocess.Popen(
        [
            _py_spy(),
            "record",
            "--pid",
            str(bench.node.pid),
            "--rate",
            str(hz),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)  # py-spy attached
        result = bench.time_rate(rate, n, label=f"{rate:g} (under py-spy)")
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
    stacks = read_collapsed(raw)
    summary = summarize(stacks, hz, n)
    (out / "capacity-profile-summary.txt").write_text(summary + "\n")
    (out / "capacity-flamegraph.svg").write_text(
        flamegraph_svg(stacks, f"dicom-node serve, {n} studies at {rate:g}/s (py-spy {hz} Hz)")
    )
    return result, summary


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one rate (4/s), 10 studies (CI)")
    parser.add_argument("--rates", default="5,10,15,20", help="studies per second, comma-separated")
    parser.add_argument("--studies", type=int, default=90, help="studies per rate")
    parser.add_argument("--window", type=float, default=30.0, help="seconds after the last send")
    parser.add_argument("--profile", action="store_true", help="py-spy pass at the highest rate")
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bench-capacity-profile",
        help="where --profile writes stacks, flamegraph and summary",
    )
    args = parser.parse_args(argv)
    rates = [4.0] if args.quick else [float(r) for r in args.rates.split(",") if r.strip()]
    n = 10 if args.quick else args.studies
    print(f"$ {command_line()}", flush=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    bench = CapacityBenchmark(window=args.window)
    results: list[RateResult] = []
    summary = ""
    idle = 0.0
    try:
        bench.setup()
        idle = bench.idle_cpu()
        print(f"node idle: {1000 * idle:.0f} ms CPU per second ({load()})", flush=True)
        for i in range(3):  # warm-up: model loaded, first inference done; not counted
            bench.time_rate(1.0, 1, label=f"warm-up {i}")
        print(HEADER, flush=True)
        for rate in rates:
            results.append(bench.time_rate(rate, n))
            print(results[-1].row(), flush=True)
        if args.profile:
            # at the highest rate sustained (issue 15), else at the highest rate of the sweep
            held = [r.rate for r in results if r.sustained()]
            profiled, summary = profile(bench, max(held or rates), n, args.profile_dir)
            results.append(profiled)
    finally:
        bench.teardown()
    print()
    print(f"- command: `{command_line()}`")
    print(f"- date: {started}; machine: {machine()}; model: {bench.model_kind}")
    print(f"- node idle CPU: {1000 * idle:.0f} ms per second (included in CPU ms/study)")
    print(
        f"- {n} single-image 256x256 NM studies per rate, one association each (pynetdicom, "
        f"open-loop, up to {SENDER_THREADS} at once); node `dicom-node serve` (default poll "
        "interval), destination DCMTK storescp (TCP_NODELAY=1); time to SEG = SEG file written "
        "by storescp - end of C-STORE; returned = within "
        f"{args.window:g} s of the last C-STORE"
    )
    print()
    print(HEADER)
    for result in results:
        print(result.row())
    measured = results[: len(rates)]
    held = [r.rate for r in measured if r.sustained()]
    best = f"{max(held):g}/s" if held else "none"
    met = any(rate >= TARGET_RATE for rate in held)
    print()
    print(
        f"highest rate sustained (all SEGs back, no backlog, p95 <= {TARGET_P95:g} s): {best}; "
        f"target >= {TARGET_RATE:g}/s: {'met' if met else 'not met'}"
    )
    if summary:
        print()
        print(f"profile ({args.profile_dir}):")
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
