"""``rules explain``: the rule that fires for each series in DICOM files, and why others did not.

Files are read header-only (``stop_before_pixels``); folders are searched recursively; files that
are not DICOM are skipped. A series is evaluated on its first instance (lowest InstanceNumber),
as the node does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dicom_node.routing.engine import RoutingDecision, evaluate
from dicom_node.routing.rules import RuleSet

LOGGER = logging.getLogger(__name__)

MAX_FILES = 100_000
"""Most files one ``explain`` call reads."""


@dataclass(frozen=True)
class SeriesExplanation:
    """One series found on disk, the header it was judged on, and the decision."""

    series_uid: str
    modality: str
    series_description: str
    files: tuple[Path, ...]
    decision: RoutingDecision

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``rules explain --json``)."""
        return {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "series_description": self.series_description,
            "instances": len(self.files),
            "first_file": str(self.files[0]),
            "decision": self.decision.to_dict(reveal=True),
        }


def iter_files(paths: Iterable[Path]) -> list[Path]:
    """Files given, plus every file below the folders given (sorted, hidden ones skipped)."""
    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            out.extend(
                p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")
            )
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        if len(out) > MAX_FILES:
            raise ValueError(f"more than {MAX_FILES} files; point explain at a smaller folder")
    return out


def read_headers(files: Iterable[Path]) -> tuple[dict[str, list[tuple[Path, Any]]], list[Path]]:
    """Read headers and group them by SeriesInstanceUID; return groups and skipped files."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    skipped: list[Path] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
            LOGGER.debug("skipping %s: not readable as DICOM", path)
            skipped.append(path)
            continue
        if "DirectoryRecordSequence" in ds:  # a DICOMDIR indexes files; it is not an image
            skipped.append(path)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"(no series UID) {path}")
        groups.setdefault(uid, []).append((path, ds))
    return groups, skipped


def _instance_number(item: tuple[Path, Any]) -> tuple[float, str]:
    try:
        return float(item[1].get("InstanceNumber", 0) or 0), str(item[0])
    except (TypeError, ValueError):
        return 0.0, str(item[0])


def explain_paths(
    ruleset: RuleSet, paths: Iterable[Path]
) -> tuple[list[SeriesExplanation], list[Path]]:
    """Evaluate ``ruleset`` on every series found under ``paths``.

    Returns
    -------
    tuple[list[SeriesExplanation], list[Path]]
        One explanation per series (ordered by first file), and the files skipped as not DICOM.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    """
    groups, skipped = read_headers(iter_files(paths))
    out = []
    for uid, items in groups.items():
        items = sorted(items, key=_instance_number)
        header = items[0][1]
        out.append(
            SeriesExplanation(
                series_uid=uid,
                modality=str(header.get("Modality", "") or ""),
                series_description=str(header.get("SeriesDescription", "") or ""),
                files=tuple(p for p, _ in items),
                decision=evaluate(ruleset, header),
            )
        )
    return out, skipped


def render_decision(decision: RoutingDecision, console: Console, indent: str = "  ") -> None:
    """Print a decision for a person: what fired, and why each rule above it did not."""
    fired = {r.name for r in decision.matched}
    for entry in decision.trace:
        if entry.outcome == "fired":
            rule = next(r for r in decision.matched if r.name == entry.rule)
            line = Text(f"{indent}✔ ", style="bold green")
            line.append(f"{rule.name}", style="bold")
            line.append(f"  (priority {rule.priority}, {rule.file}:{rule.line})")
            console.print(line)
            if rule.discard:
                console.print(f"{indent}    discard: no action, recorded in the audit log")
            else:
                console.print(f"{indent}    model: {rule.model}")
                console.print(f"{indent}    send to: {', '.join(rule.send_to)}")
                console.print(f"{indent}    complete: {rule.complete.describe()}")
                if rule.on_low_confidence != "send":
                    console.print(
                        f"{indent}    if the model flags low confidence: {rule.on_low_confidence}"
                    )
            if rule.stop:
                console.print(f"{indent}    stop: lower-priority rules are not evaluated")
        elif entry.outcome == "failed" and (not fired or _before_last_fired(decision, entry)):
            line = Text(f"{indent}✘ ", style="red")
            line.append(entry.rule, style="bold")
            line.append(f"  (priority {entry.priority}, {entry.file}:{entry.line})")
            console.print(line)
            where = f" (line {entry.condition_line})" if entry.condition_line else ""
            console.print(Text(f"{indent}    failed: {entry.condition}{where}"))
            console.print(Text(f"{indent}    saw: {entry.seen}"))
    if not decision.matched:
        console.print(Text(f"{indent}→ no rule fires: the series is not processed", style="yellow"))
    elif decision.discarded:
        name = next(r.name for r in decision.matched if r.discard)
        console.print(
            Text(f"{indent}→ discarded by '{name}': the series is not processed", style="yellow")
        )


def _before_last_fired(decision: RoutingDecision, entry: Any) -> bool:
    names = [t.rule for t in decision.trace]
    last = max(names.index(r.name) for r in decision.matched)
    return names.index(entry.rule) < last


def render(explanations: list[SeriesExplanation], ruleset: RuleSet, console: Console) -> None:
    """Print every series' explanation."""
    console.print(
        f"rule set {ruleset.version}: {len(ruleset.rules)} rule(s) from {ruleset.directory}"
    )
    for exp in explanations:
        console.print()
        table = Table.grid(padding=(0, 1))
        table.add_row(Text("series", style="bold cyan"), Text(exp.series_uid))
        table.add_row("modality", Text(exp.modality or "-"))
        table.add_row("description", Text(exp.series_description or "-"))
        table.add_row("instances", f"{len(exp.files)} (first: {exp.files[0]})")
        console.print(table)
        render_decision(exp.decision, console)
