"""Real files from many vendors through a running node, sent by a real client (pynetdicom).

A selection of the corpus of ``tests/test_seg_corpus.py`` (pydicom's test files and the
``pydicom-data`` package): one file per (SOP class, transfer syntax) pair, so that every syntax
(uncompressed, deflate, big endian, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000) and
every family (CT, MR, enhanced MR, US incl. multi-frame, CR, SC, OT, RT, SR, NM-modality SC,
palette and YBR colour) goes through, plus the multi-instance DICOMDIR test series. A catch-all
rule sends everything to a generic one-channel model of any modality. Each file gets UIDs of
its own (one study and series per file, the same mapping for equal values), so that files that
share UIDs in the corpus do not meet in one series; every other attribute is sent as it is.

Each file's outcome is asserted: a SEG (every SEG dciodvfy-clean and referencing its sources),
``skipped`` with the reason for a non-image, a failure status for what the receiver refuses, or
a job failure that names the instance and the condition for pixel data no backend decodes. No
outcome may be an ``internal error``.
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import AE, build_context

from dicom_node.jobs import JobState
from dicom_node.seg.sources import is_image
from tests.conftest import make_config, write_rules
from tests.helpers.peers import StoreSCP, dciodvfy
from tests.helpers.waiting import wait_until
from tests.test_infer_worker import generic_store
from tests.test_seg_corpus import BROKEN, DECODER, IMAGES, NO_STUDY_UID, OTHERS, Case, _read

pytestmark = pytest.mark.slow

CATCH_ALL = """\
rules:
  - name: everything
    when: {}
    complete: {idle_seconds: 1}
    model: generic@production
    send_to: [pacs]
"""

PER_KEY = 1
"""Files per (SOP class, transfer syntax, photometric interpretation): keeps the test short."""

MAX_FRAMES = 40
"""Files with more frames are left out (a 3-minute test says nothing more than a 1-minute one)."""

REFUSED = {
    **{name: (0xA901, "no Study Instance UID (type 1)") for name in NO_STUDY_UID},
    "MR_truncated.dcm": (0xA903, "Pixel Data shorter than the header declares"),
    "badVR.dcm": (0xC210, "a value that breaks its VR: the data set cannot be parsed"),
}
"""Files the receiver refuses, with the status and why."""

UNDECODABLE = set(DECODER) - {"JPEG-lossy.dcm"}
"""Images whose pixel data no backend decodes: the job fails naming syntax and backends."""

UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


@dataclass
class Sent:
    """One corpus file as sent and what became of it."""

    case: Case
    datasets: list[Dataset]
    expected: str  # "seg", "skipped", "refused", "failed"
    why: str = ""
    statuses: tuple[int | None, ...] = ()
    outcome: str = ""


def _key(ds: Dataset) -> tuple[str, str, str]:
    return (
        str(ds.get("SOPClassUID", "")),
        str(getattr(ds.file_meta, "TransferSyntaxUID", "")),
        str(ds.get("PhotometricInterpretation", "")),
    )


def _select() -> list[Case]:
    chosen: list[Case] = []
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for case in [*IMAGES, *OTHERS]:
        name = case.paths[0].name
        if name in BROKEN and name not in REFUSED:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(case.paths[0], stop_before_pixels=True, force=True)
            except Exception:
                continue
        if "SOPClassUID" not in ds or str(ds.SOPClassUID) == "1.2.840.10008.1.3.10":
            continue  # DICOMDIRs and headerless fragments are not sent by a PACS
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except ValueError:  # an invalid IS: kept, the receiver has to answer it
            frames = 1
        if frames > MAX_FRAMES:
            continue
        special = name in REFUSED or name in DECODER or len(case.paths) > 1
        key = _key(ds)
        if special or seen[key] < PER_KEY:
            seen[key] += 1
            chosen.append(case)
    return chosen


def _remap(datasets: list[Dataset], case: Case) -> None:
    """Give the case UIDs of its own (equal values stay equal); absent ones stay absent."""
    mapping: dict[str, str] = {}
    for ds in datasets:
        for keyword in UID_KEYWORDS:
            value = ds.get(keyword)
            if value in (None, ""):
                continue
            old = str(value)
            if old not in mapping:
                mapping[old] = generate_uid(entropy_srcs=["corpus-node", case.name, old])
            setattr(ds, keyword, mapping[old])
        if "SOPInstanceUID" in ds:
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _expected(case: Case, ds: Dataset) -> tuple[str, str]:
    name = case.paths[0].name
    if name in REFUSED:
        return "refused", REFUSED[name][1]
    ok, reason = is_image(ds)
    if not ok:
        return "skipped", reason
    if name in UNDECODABLE:
        return "failed", "pixel data no installed backend decodes"
    return "seg", ""


def _send(port: int, items: list[Sent]) -> None:
    """C-STORE every dataset with pynetdicom, each in its own transfer syntax."""
    pairs = sorted(
        {
            (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            for s in items
            for ds in s.datasets
        }
    )
    for start in range(0, len(pairs), 100):  # at most 128 contexts per association
        chunk = set(pairs[start : start + 100])
        ae = AE(ae_title="CORPUS")
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(chunk)]
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert assoc.is_established, "the node must accept the association"
        try:
            for sent in items:
                for ds in sent.datasets:
                    if (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) not in chunk:
                        continue
                    try:
                        status = assoc.send_c_store(ds)
                    except ValueError:  # no accepted presentation context for it
                        sent.statuses += (None,)
                        continue
                    sent.statuses += (int(status.Status) if status else -1,)
        finally:
            assoc.release()


def test_corpus_through_a_running_node(tmp_path: Path, node_factory: Any) -> None:
    models = generic_store(tmp_path / "models")
    rules = tmp_path / "rules"
    write_rules(rules, CATCH_ALL)
    items: list[Sent] = []
    for case in _select():
        datasets = [_read(path) for path in case.paths]
        _remap(datasets, case)
        expected, why = _expected(case, datasets[0])
        items.append(Sent(case, datasets, expected, why))
    assert len(items) >= 40, "the corpus shrank: is pydicom-data installed?"

    with StoreSCP() as pacs:
        config = make_config(tmp_path, models, rules, pacs.port, workers=2, export_retries=0)
        node = node_factory(config)
        started = time.monotonic()
        _send(config.port, items)

        accepted = [s for s in items if s.statuses and all(st == 0 for st in s.statuses)]
        series = {str(s.datasets[0].SeriesInstanceUID): s for s in accepted}
        terminal = (JobState.DONE, JobState.FAILED, JobState.SKIPPED)

        def finished() -> bool:
            jobs = node.store.list_jobs(limit=1000)
            return len(jobs) >= len(series) and all(j.state in terminal for j in jobs)

        wait_until(finished, timeout=180, what="every corpus series to finish")
        jobs = {j.series_uid: j for j in node.store.list_jobs(limit=1000)}
        elapsed = time.monotonic() - started

        problems: list[str] = []
        rows: list[tuple[str, str, str, str]] = []
        for sent in items:
            ds = sent.datasets[0]
            label = sent.case.name
            family = UID(str(ds.SOPClassUID)).name or str(ds.SOPClassUID)
            syntax = UID(str(ds.file_meta.TransferSyntaxUID)).name
            if not sent.statuses or any(st != 0 for st in sent.statuses):
                sent.outcome = "refused " + ", ".join(
                    "at association" if st is None else f"0x{st:04X}" for st in sent.statuses
                )
                if sent.expected != "refused":
                    problems.append(f"{label}: expected {sent.expected}, {sent.outcome}")
                elif sent.statuses != (REFUSED[sent.case.paths[0].name][0],):
                    want = REFUSED[sent.case.paths[0].name][0]
                    problems.append(f"{label}: expected {want:#06x}, {sent.outcome}")
                rows.append((label, family, syntax, sent.outcome))
                continue
            job = jobs.get(str(ds.SeriesInstanceUID))
            if job is None:
                problems.append(f"{label}: accepted but no job")
                continue
            text = job.error or job.outcome or ""
            sent.outcome = f"{job.state.value}: {text}"
            rows.append((label, family, syntax, sent.outcome[:90]))
            if "internal error" in text:
                problems.append(f"{label}: {sent.outcome}")
            elif sent.expected == "seg":
                if job.state is not JobState.DONE:
                    problems.append(f"{label}: expected a SEG, {sent.outcome}")
                    continue
                results = node.store.results(job.id)
                source_uids = {str(d.SOPInstanceUID) for d in sent.datasets}
                referenced: set[str] = set()
                for result in results:
                    path = config.storage / result.path
                    report = dciodvfy(path)
                    if report.errors:
                        problems.append(f"{label}: SEG {result.position}: {report.errors}")
                    seg = pydicom.dcmread(path)
                    referenced |= {
                        str(item.ReferencedSOPInstanceUID)
                        for ref in seg.ReferencedSeriesSequence
                        for item in ref.ReferencedInstanceSequence
                    }
                if referenced != source_uids:
                    problems.append(f"{label}: the SEGs do not reference every source instance")
            elif sent.expected == "skipped":
                if job.state is not JobState.SKIPPED or sent.why not in text:
                    problems.append(f"{label}: expected skipped ({sent.why}), {sent.outcome}")
            elif sent.expected == "failed":
                if job.state is not JobState.FAILED or "backends tried:" not in text:
                    problems.append(f"{label}: expected a decoding failure, {sent.outcome}")
                elif "instance 1 of 1" not in text:
                    problems.append(f"{label}: the failure does not name the instance: {text}")
            else:
                problems.append(f"{label}: expected {sent.expected}, {sent.outcome}")

        n_segs = sum(len(node.store.results(j.id)) for j in jobs.values() if j.state == "done")
        wait_until(lambda: len(pacs.received()) >= n_segs, what="every SEG at the PACS")
    table = "\n".join(f"{a:50} {b[:38]:38} {c[:34]:34} {d}" for a, b, c, d in sorted(rows))
    print(f"\n{len(items)} files, {n_segs} SEGs, {elapsed:.1f} s\n{table}")
    assert problems == [], "\n".join(problems) + "\n\n" + table
    kinds = {s.expected for s in items}
    assert kinds == {"seg", "skipped", "refused", "failed"}, kinds
