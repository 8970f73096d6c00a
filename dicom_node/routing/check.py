"""Checks across rules (duplicate names, shadowed rules) and ``check_rules`` for ``rules check``.

The loader runs the same checks, so ``check_rules(d)`` is empty exactly when ``load_rules(d)``
succeeds: what ``rules check`` accepts is what the node accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from dicom_node.routing.loader import ModelExists, collect
from dicom_node.routing.rules import Problem, Rule

LOGGER = logging.getLogger(__name__)


def duplicate_problems(rules: list[Rule], displays: Mapping[str, str]) -> list[Problem]:
    """One problem per rule whose name was already used (pointing at the first use)."""
    first: dict[str, Rule] = {}
    problems = []
    for rule in sorted(rules, key=lambda r: (r.file, r.position)):
        if rule.name in first:
            other = first[rule.name]
            problems.append(
                Problem(
                    displays.get(rule.file, rule.file),
                    rule.line,
                    rule.name,
                    f"duplicate rule name; first defined at "
                    f"{displays.get(other.file, other.file)}:{other.line}",
                )
            )
        else:
            first[rule.name] = rule
    return problems


def shadows(upper: Rule, lower: Rule) -> bool:
    """True when ``upper`` (evaluated first, with ``stop``) fires whenever ``lower`` would.

    Sound and simple: every top-level condition of ``upper`` is also a top-level condition of
    ``lower`` (this covers an empty ``when`` and identical ``when`` blocks).
    """
    if not upper.stop or upper.sort_key >= lower.sort_key:
        return False
    upper_keys = {c.key() for c in upper.conditions.children}
    lower_keys = {c.key() for c in lower.conditions.children}
    return upper_keys <= lower_keys


def shadow_problems(rules: list[Rule], displays: Mapping[str, str]) -> list[Problem]:
    """One problem per rule that can never fire because a stopping rule above always wins."""
    ordered = sorted(rules, key=lambda r: r.sort_key)
    problems = []
    for i, lower in enumerate(ordered):
        for upper in ordered[:i]:
            if upper.name != lower.name and shadows(upper, lower):
                what = (
                    "matches every series"
                    if not upper.conditions.children
                    else ("has the same or fewer conditions")
                )
                problems.append(
                    Problem(
                        displays.get(lower.file, lower.file),
                        lower.line,
                        lower.name,
                        f"can never fire: rule '{upper.name}' "
                        f"({displays.get(upper.file, upper.file)}:{upper.line}, priority "
                        f"{upper.priority}, stop) {what} and is evaluated first; raise this rule's "
                        f"priority or narrow '{upper.name}'",
                    )
                )
                break
    return problems


def check_rules(
    rules_dir: Path,
    destinations: set[str] | None = None,
    model_exists: ModelExists | None = None,
) -> list[Problem]:
    """Return every problem of a rules folder (empty when the node would load it).

    Parameters
    ----------
    rules_dir:
        The rules folder (``*.yaml`` directly in it).
    destinations:
        Configured destination names, or ``None`` to skip that check.
    model_exists:
        ``model_exists(ref) -> (ok, reason)``, or ``None`` to skip the model-store check.

    Returns
    -------
    list[Problem]
        Sorted by file and line.
    """
    _, problems = collect(Path(rules_dir), destinations=destinations, model_exists=model_exists)
    return sorted(problems, key=lambda p: (p.file, p.line or 0))
