"""Value objects of the routing rules: problems, completion, a rule, and the loaded rule set.

A :class:`Rule` is built by :mod:`dicom_node.routing.loader` from one entry of a ``rules/*.yaml``
file; it validates its own fields in ``__post_init__`` so that no half-valid rule can exist.
Within routing it imports only :mod:`dicom_node.routing.conditions`. Loading a folder is
:func:`dicom_node.routing.loader.load_rules`; evaluating a set is
:func:`dicom_node.routing.engine.evaluate`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from dicom_node.modelstore import parse_model_ref as _parse_model_ref
from dicom_node.routing.conditions import AllOf

LOGGER = logging.getLogger(__name__)

RULE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Rule names: letters, digits, ``_ . -``; 1-64 characters (they appear in metrics and audit)."""

RESERVED_NAMES = frozenset({"none"})
"""Names a rule may not take (``none`` means "no rule" in test cases and metrics)."""

OUTPUT_NAMES = ("seg", "overlay", "gsps", "report")
"""What a rule's ``outputs`` may list; the values of ``dicom_node.outputs.OutputKind`` (routing
may not import outputs, a test keeps the two equal)."""

DEFAULT_RULE_OUTPUTS = ("seg",)
"""What a rule without ``outputs`` sends back."""

LOW_CONFIDENCE_ACTIONS = ("send", "hold", "discard")
"""What a rule's ``on_low_confidence`` may say to do with a result flagged low confidence:
send it anyway (flagged in every output), hold it until ``dicom-node release``/``discard``,
or discard it (the job ends skipped, saying why)."""

DEFAULT_ON_LOW_CONFIDENCE = "send"
"""What a rule without ``on_low_confidence`` does with a low-confidence result."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a rule file, pointing at the file, line and rule.

    ``str()`` gives ``rules/thyroid.yaml:12: rule 'x': unknown operator 'regexp' ...``.
    """

    file: str
    line: int | None
    rule: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        who = f" rule '{self.rule}':" if self.rule else ""
        return f"{where}:{who} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Return the problem as a JSON-ready mapping."""
        return {"file": self.file, "line": self.line, "rule": self.rule, "message": self.message}


class RulesError(ValueError):
    """A rule set is invalid; ``problems`` lists every problem found (all files, not the first)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the rules:\n{lines}")


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """Split ``name@alias`` / ``name:version`` into ``(name, alias, version)``.

    The model store's grammar (:mod:`dicom_node.modelstore.refs`); a rule must name its alias
    or version, so a bare model name is refused here.

    Raises
    ------
    dicom_node.modelstore.ModelRefError
        A ValueError: ``ref`` does not have one of the two forms.
    """
    return _parse_model_ref(ref, default_alias=None).as_tuple()


@dataclass(frozen=True)
class Completion:
    """When a series is ready: after ``instances`` instances, or ``idle_seconds`` of quiet.

    Both ``None`` means "the node's ``default_idle_seconds``". Both set: whichever holds first.
    """

    instances: int | None = None
    idle_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.instances is not None and (
            isinstance(self.instances, bool)
            or not isinstance(self.instances, int)
            or self.instances < 1
        ):
            raise ValueError(f"instances must be a whole number >= 1, got {self.instances!r}")
        if self.idle_seconds is not None and (
            isinstance(self.idle_seconds, bool)
            or not isinstance(self.idle_seconds, int | float)
            or not 0 < self.idle_seconds <= 86400
        ):
            raise ValueError(
                f"idle_seconds must be a number of seconds > 0 and <= 86400, "
                f"got {self.idle_seconds!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return ``{instances, idle_seconds}``."""
        return {"instances": self.instances, "idle_seconds": self.idle_seconds}

    def describe(self) -> str:
        """Human wording, e.g. ``after 1 instance(s)``."""
        parts = []
        if self.instances is not None:
            parts.append(f"after {self.instances} instance(s)")
        if self.idle_seconds is not None:
            parts.append(f"after {self.idle_seconds:g} s without new instances")
        return " or ".join(parts) if parts else "after the node's default idle time"


@dataclass(frozen=True)
class Rule:
    """One routing rule: conditions on the header and what to do when they hold.

    Attributes
    ----------
    name, priority, file, line:
        Identity, order (higher first) and where it was written (file name within the rules
        folder, 1-based line of the rule's first key).
    conditions:
        The ``when`` block as one :class:`~dicom_node.routing.conditions.AllOf`.
    complete, model, send_to, stop, discard:
        Actions. Exactly one of ``model`` and ``discard`` applies; a discard rule always stops.
    outputs:
        What goes back to ``send_to`` (names of :data:`OUTPUT_NAMES`, default ``("seg",)``). The
        SEG is always built (the other outputs derive from it) but sent only when listed; a
        ``report`` references the SEG's segments, so it needs ``seg`` in the list.
    on_low_confidence:
        What to do with a result its model's manifest flags low confidence (one of
        :data:`LOW_CONFIDENCE_ACTIONS`, default ``send``).
    position:
        Index of the rule in its file (ties in priority are broken by file, then position).
    """

    name: str
    priority: int
    file: str
    line: int
    conditions: AllOf
    complete: Completion = field(default_factory=Completion)
    model: str | None = None
    send_to: tuple[str, ...] = ()
    stop: bool = False
    discard: bool = False
    position: int = 0
    description: str | None = None
    outputs: tuple[str, ...] = DEFAULT_RULE_OUTPUTS
    on_low_confidence: str = DEFAULT_ON_LOW_CONFIDENCE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not RULE_NAME_RE.match(self.name):
            raise ValueError(
                f"name must be 1-64 letters, digits, '_', '.' or '-', got {self.name!r}"
            )
        if self.name.lower() in RESERVED_NAMES:
            raise ValueError(f"name {self.name!r} is reserved; choose another")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"priority must be a whole number, got {self.priority!r}")
        if self.discard:
            if self.model is not None:
                raise ValueError("a rule takes either 'model' or 'discard: true', not both")
            if self.send_to:
                raise ValueError("'send_to' has no effect on a discard rule; remove it")
            if not self.stop:
                raise ValueError("a discard rule always stops; remove 'stop: false'")
            if self.outputs != DEFAULT_RULE_OUTPUTS:
                raise ValueError("'outputs' has no effect on a discard rule; remove it")
            if self.on_low_confidence != DEFAULT_ON_LOW_CONFIDENCE:
                raise ValueError("'on_low_confidence' has no effect on a discard rule; remove it")
        else:
            if self.model is None:
                raise ValueError("a rule needs 'model: <model>@<alias>' or 'discard: true'")
            parse_model_ref(self.model)
            if not self.send_to:
                raise ValueError("'send_to' is required with 'model' (destination names)")
        _check_outputs(self.outputs)
        if self.on_low_confidence not in LOW_CONFIDENCE_ACTIONS:
            raise ValueError(
                f"'on_low_confidence' must be one of {', '.join(LOW_CONFIDENCE_ACTIONS)}, "
                f"got {self.on_low_confidence!r}"
            )

    @property
    def sort_key(self) -> tuple[int, str, int]:
        """Evaluation order: priority descending, then file name, then position in the file."""
        return (-self.priority, self.file, self.position)

    def to_dict(self) -> dict[str, Any]:
        """Return what the audit log and ``--json`` show of the rule (``outputs`` if not [seg],
        ``on_low_confidence`` if not ``send``)."""
        shown: dict[str, Any] = (
            {} if self.outputs == DEFAULT_RULE_OUTPUTS else {"outputs": list(self.outputs)}
        )
        if self.on_low_confidence != DEFAULT_ON_LOW_CONFIDENCE:
            shown["on_low_confidence"] = self.on_low_confidence
        return {
            "name": self.name,
            "priority": self.priority,
            "file": self.file,
            "line": self.line,
            "model": self.model,
            "send_to": list(self.send_to),
            "complete": self.complete.to_dict(),
            "stop": self.stop,
            "discard": self.discard,
            **shown,
        }


def _check_outputs(outputs: tuple[str, ...]) -> None:
    """Raise ValueError unless ``outputs`` is a non-empty tuple of distinct output names."""
    allowed = ", ".join(OUTPUT_NAMES)
    if not isinstance(outputs, tuple) or not outputs:
        raise ValueError(f"'outputs' must be a non-empty list of {allowed}, got {outputs!r}")
    for name in outputs:
        if name not in OUTPUT_NAMES:
            raise ValueError(f"unknown output {name!r} in 'outputs'; allowed: {allowed}")
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"'outputs' lists an output twice: {list(outputs)}")
    if "report" in outputs and "seg" not in outputs:
        raise ValueError(
            "'outputs' has 'report' without 'seg': the report references the SEG's segments, "
            "so a PACS without the SEG cannot resolve it; add seg"
        )


@dataclass(frozen=True)
class RuleSet:
    """Every rule of a rules folder, in evaluation order, with the content hash of its files.

    Attributes
    ----------
    rules:
        Sorted by priority (descending), then file name, then position.
    version:
        Short content hash of the ``*.yaml`` files (``dicom_node_rules_info{version}``).
    directory:
        The folder the rules came from (display form).
    files:
        The file names that were read.
    """

    rules: tuple[Rule, ...]
    version: str
    directory: str = ""
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.rules, key=lambda r: r.sort_key))
        object.__setattr__(self, "rules", ordered)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, name: str) -> Rule | None:
        """Return the rule called ``name`` or ``None``."""
        for rule in self.rules:
            if rule.name == name:
                return rule
        return None
