"""Evaluate a rule set on a series header, with a trace a person can read.

Rules run in order (priority descending, then file, then position). Every rule whose conditions
hold fires; a firing rule with ``stop`` (every discard rule) ends the evaluation. For each rule
that did not fire, the trace records the first condition that failed and the value it saw.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from dicom_node.routing.rules import Rule, RuleSet

LOGGER = logging.getLogger(__name__)

HIDDEN = "(identifying value hidden)"
"""Shown instead of patient or staff identity in traces written to the audit log."""


class _RuleIdentity(TypedDict):
    """The fields of a `TraceEntry` that name its rule."""

    rule: str
    priority: int
    file: str
    line: int


@dataclass(frozen=True)
class TraceEntry:
    """What happened to one rule during an evaluation.

    Attributes
    ----------
    rule, priority, file, line:
        The rule.
    outcome:
        ``fired``, ``failed`` (a condition did not hold) or ``not evaluated`` (an earlier
        rule stopped the evaluation).
    condition, condition_line, seen:
        For ``failed``: the first condition that failed, its line and the value it saw
        (``missing`` when the element is absent).
    """

    rule: str
    priority: int
    file: str
    line: int
    outcome: str
    condition: str | None = None
    condition_line: int | None = None
    seen: str | None = None
    sensitive: bool = False

    def to_dict(self, include_values: bool = True, reveal: bool = False) -> dict[str, Any]:
        """JSON-ready form.

        ``include_values=False`` drops the header values seen; identifying values (patient
        and staff names, IDs, UIDs) are replaced by ``HIDDEN`` unless ``reveal`` is true.
        """
        out = {
            "rule": self.rule,
            "priority": self.priority,
            "file": self.file,
            "line": self.line,
            "outcome": self.outcome,
            "condition": self.condition,
            "condition_line": self.condition_line,
        }
        if include_values:
            out["seen"] = HIDDEN if self.sensitive and not reveal else self.seen
        return out


@dataclass(frozen=True)
class RoutingDecision:
    """The result of evaluating a rule set on one header.

    Attributes
    ----------
    matched:
        Rules that fired, in order (the last one stopped evaluation if it has ``stop``).
    discarded:
        A discard rule fired: the series is not processed at all (not even by rules above
        it that fired without ``stop``); the audit log says which rule discarded it.
    trace:
        One entry per rule of the set, in evaluation order.
    version:
        The rule set's version.
    """

    matched: list[Rule]
    discarded: bool
    trace: list[TraceEntry] = field(default_factory=list)
    version: str = ""

    @property
    def jobs(self) -> list[Rule]:
        """The fired rules that run a model (what the node queues); none when discarded.

        A discard rule cancels the series entirely, including rules above it that fired
        without ``stop``.
        """
        if self.discarded:
            return []
        return [r for r in self.matched if r.model is not None]

    @property
    def rule_names(self) -> list[str]:
        """Names of the fired rules (``[]`` when none)."""
        return [r.name for r in self.matched]

    def to_dict(self, include_values: bool = True, reveal: bool = False) -> dict[str, Any]:
        """JSON-ready form for the audit log (default) and ``rules explain --json``.

        Parameters
        ----------
        include_values:
            Include the header values each failing condition saw.
        reveal:
            Show identifying values (names, IDs, UIDs) instead of hiding them; for the
            ``explain`` command run by a person on their own files, not for logs.
        """
        return {
            "version": self.version,
            "matched": [r.to_dict() for r in self.matched],
            "discarded": self.discarded,
            "trace": [t.to_dict(include_values, reveal) for t in self.trace],
        }


def evaluate(ruleset: RuleSet, header: Any) -> RoutingDecision:
    """Evaluate ``ruleset`` on ``header`` (a pydicom Dataset or a mapping keyword -> value).

    Returns
    -------
    RoutingDecision
        Never raises for any header content: unreadable values make conditions false.
    """
    if not isinstance(header, Mapping) and not hasattr(header, "data_element"):
        raise TypeError(
            f"header must be a pydicom Dataset or a mapping of keyword -> value, "
            f"got {type(header).__name__}"
        )
    matched: list[Rule] = []
    trace: list[TraceEntry] = []
    stopped_by: Rule | None = None
    for rule in ruleset.rules:
        base: _RuleIdentity = {
            "rule": rule.name,
            "priority": rule.priority,
            "file": rule.file,
            "line": rule.line,
        }
        if stopped_by is not None:
            trace.append(
                TraceEntry(
                    **base, outcome="not evaluated", condition=f"stopped by '{stopped_by.name}'"
                )
            )
            continue
        outcome = rule.conditions.evaluate(header)
        if outcome.ok:
            matched.append(rule)
            trace.append(TraceEntry(**base, outcome="fired"))
            if rule.stop:
                stopped_by = rule
        else:
            trace.append(
                TraceEntry(
                    **base,
                    outcome="failed",
                    condition=outcome.condition,
                    condition_line=outcome.line,
                    seen=outcome.seen,
                    sensitive=outcome.sensitive,
                )
            )
    discarded = any(r.discard for r in matched)
    LOGGER.debug("rules %s: fired %s", ruleset.version, [r.name for r in matched])
    return RoutingDecision(matched, discarded, trace, ruleset.version)
