"""``rules test``: run the test cases in ``<rules dir>/tests/*.yaml`` against the rules.

A case gives a header (mapping keyword -> value) or a DICOM file (relative to the test file) and
the rule expected to fire (``none`` for no rule; a list when several rules fire)::

    cases:
      - name: french thyroid study
        header: {Modality: NM, StudyDescription: Scintigraphie thyroidienne}
        expect: thyroid-scintigraphy
      - name: a CT is not routed
        file: samples/ct.dcm
        expect: none
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import keyword_dict

from dicom_node.config import bounded_yaml, yaml_problem
from dicom_node.routing.conditions import suggest
from dicom_node.routing.engine import RoutingDecision, evaluate
from dicom_node.routing.loader import MAX_FILE_BYTES, MAX_VALUES, display_path, short
from dicom_node.routing.rules import Problem, RuleSet

LOGGER = logging.getLogger(__name__)

TESTS_FOLDER = "tests"
"""Test cases live in ``<rules dir>/tests/*.yaml``."""
CASE_KEYS = ("name", "header", "file", "expect", "description")
NO_RULE = "none"


@dataclass(frozen=True)
class CaseResult:
    """The outcome of one test case."""

    name: str
    file: str
    line: int | None
    expected: tuple[str, ...]
    got: tuple[str, ...]
    error: str | None = None
    decision: RoutingDecision | None = None

    @property
    def passed(self) -> bool:
        """True when no error and the fired rules are the expected ones."""
        return self.error is None and self.expected == self.got

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "file": self.file,
            "line": self.line,
            "expected": list(self.expected),
            "got": list(self.got),
            "passed": self.passed,
            "error": self.error,
        }


def _line(node: Any, key: Any = None, index: int | None = None) -> int | None:
    try:
        if index is not None:
            return int(node.lc.item(index)[0]) + 1
        return int(node.lc.key(key)[0] if key is not None else node.lc.line) + 1
    except Exception:  # noqa: BLE001 - no line info
        return None


def _check_header(header: Any, path: str = "") -> str | None:
    """Return a message for the first unknown keyword in a test header (typos hide failures)."""
    if not isinstance(header, Mapping):
        return f"header{path} must be a mapping of keyword: value"
    for key, value in header.items():
        if not isinstance(key, str) or key not in keyword_dict:
            return f"unknown DICOM keyword '{key}' in header{path}{suggest(str(key), keyword_dict)}"
        items = value if isinstance(value, list) else []
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                message = _check_header(item, f"{path}.{key}[{i}]")
                if message:
                    return message
    return None


def _expected(raw: Any) -> tuple[str, ...] | str:
    if isinstance(raw, str) and raw:
        return () if raw == NO_RULE else (raw,)
    if isinstance(raw, list) and raw and all(isinstance(x, str) and x for x in raw):
        return tuple(raw)
    return f"'expect' must be a rule name, a list of rule names or 'none', got {short(raw)}"


def _run_case(
    node: Any,
    ruleset: RuleSet,
    test_file: Path,
    display: str,
    line: int | None,
    index: int,
) -> CaseResult:
    name = f"case {index + 1}"
    if not isinstance(node, Mapping):
        return CaseResult(
            name,
            display,
            line,
            (),
            (),
            "a case must be a mapping with name, header or file, and expect",
        )
    name = str(node.get("name") or name)

    def fail(message: str, at: int | None = line) -> CaseResult:
        return CaseResult(name, display, at, (), (), message)

    unknown = [k for k in node if k not in CASE_KEYS]
    if unknown:
        return fail(
            f"unknown key '{unknown[0]}'{suggest(str(unknown[0]), CASE_KEYS)}; "
            f"a case may have: {', '.join(CASE_KEYS)}",
            _line(node, unknown[0]) or line,
        )
    if "expect" not in node:
        return fail("missing 'expect' (a rule name, or 'none')")
    expected = _expected(node["expect"])
    if isinstance(expected, str):
        return fail(expected, _line(node, "expect") or line)
    for rule_name in expected:
        if ruleset.get(rule_name) is None:
            known = [r.name for r in ruleset.rules]
            return fail(
                f"expects rule '{rule_name}', which is not in the rule set"
                f"{suggest(rule_name, known)}",
                _line(node, "expect") or line,
            )
    if ("header" in node) == ("file" in node):
        return fail("give exactly one of 'header' (keyword: value) or 'file' (a DICOM file)")
    if "header" in node:
        header = node["header"]
        message = _check_header(header)
        if message:
            return fail(message, _line(node, "header") or line)
    else:
        path = test_file.parent / str(node["file"])
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file fails the case, clearly
            return fail(
                f"cannot read DICOM file {display_path(path)}: {exc}", _line(node, "file") or line
            )
    decision = evaluate(ruleset, header)
    return CaseResult(
        name, display, line, tuple(expected), tuple(decision.rule_names), None, decision
    )


def run_cases(ruleset: RuleSet, rules_dir: Path) -> tuple[list[CaseResult], list[Problem]]:
    """Run every case of ``<rules_dir>/tests/*.yaml``.

    Returns
    -------
    tuple[list[CaseResult], list[Problem]]
        One result per case, and problems with test files that could not be read at all.
    """
    results: list[CaseResult] = []
    problems: list[Problem] = []
    folder = Path(rules_dir) / TESTS_FOLDER
    files = (
        sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("."))
        if folder.is_dir()
        else []
    )
    for test_file in files:
        display = display_path(test_file)
        try:
            if test_file.stat().st_size > MAX_FILE_BYTES:
                problems.append(
                    Problem(display, None, None, f"test file larger than {MAX_FILE_BYTES} bytes")
                )
                continue
            text = test_file.read_text(encoding="utf-8")
            # the same budget as a rule file: aliases count per use (see loader.MAX_VALUES)
            data = bounded_yaml("rt", max_values=MAX_VALUES, max_chars=MAX_FILE_BYTES).load(text)
        except Exception as exc:  # noqa: BLE001 - YAML and OS errors are all problems
            line, message = (
                (None, exc.strerror or str(exc)) if isinstance(exc, OSError) else yaml_problem(exc)
            )
            problems.append(Problem(display, line, None, f"cannot read test file: {message}"))
            continue
        cases = data.get("cases") if isinstance(data, Mapping) else None
        if not isinstance(cases, list):
            problems.append(Problem(display, 1, None, "a test file needs a 'cases:' list"))
            continue
        for index, node in enumerate(cases):
            results.append(
                _run_case(node, ruleset, test_file, display, _line(cases, index=index), index)
            )
    return results, problems
