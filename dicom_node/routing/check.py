"""Checks across the rules of a set: duplicate names and rules shadowed by a stopping rule.

They work on built :class:`~dicom_node.routing.rules.Rule` objects and read no files; the loader
runs them on every load, and ``check_rules`` (in :mod:`dicom_node.routing.loader`) reports
them for ``rules check``, so what ``rules check`` accepts is what the node accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

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
    return _keys(upper) <= _keys(lower)


def _keys(rule: Rule) -> frozenset[tuple]:
    return frozenset(c.key() for c in rule.conditions.children)


def shadow_problems(rules: list[Rule], displays: Mapping[str, str]) -> list[Problem]:
    """One problem per rule that can never fire because a stopping rule above always wins."""
    ordered = sorted(rules, key=lambda r: r.sort_key)
    # each rule's keys once: a pair test is then a set comparison (hundreds of rules stay fast)
    keys = [_keys(rule) for rule in ordered]
    problems = []
    for i, lower in enumerate(ordered):
        for j, upper in enumerate(ordered[:i]):
            if (
                upper.stop
                and upper.name != lower.name
                and upper.sort_key < lower.sort_key
                and keys[j] <= keys[i]
            ):
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
