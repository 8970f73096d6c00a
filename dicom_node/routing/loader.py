"""Read ``rules/*.yaml`` into a :class:`~dicom_node.routing.rules.RuleSet`, or list every problem.

Only the ``*.yaml`` files directly in the rules folder are read (not ``tests/`` or ``examples/``).
YAML is parsed with ruamel.yaml's round-trip loader so that every problem carries its line.
Nothing in a rule file is executed: it is data, checked against tables of allowed keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from dicom_node.config import bounded_yaml, yaml_problem
from dicom_node.routing.check import duplicate_problems, shadow_problems
from dicom_node.routing.conditions import (
    MODIFIERS,
    OPERATORS,
    AllOf,
    AnyOf,
    Compare,
    Condition,
    ConditionError,
    Exists,
    KeywordPath,
    Not,
    suggest,
)
from dicom_node.routing.rules import (
    DEFAULT_ON_LOW_CONFIDENCE,
    DEFAULT_RULE_OUTPUTS,
    LOW_CONFIDENCE_ACTIONS,
    OUTPUT_NAMES,
    Completion,
    Problem,
    Rule,
    RulesError,
    RuleSet,
    parse_model_ref,
)

LOGGER = logging.getLogger(__name__)

MAX_FILE_BYTES = 262_144
"""A rule file larger than this is refused unread (the shipped one is under 2 kB). ruamel's
pure-Python parser reads about 1 MB/s of comments, so this keeps any file well under a second."""
MAX_VALUES = 5_000
"""Most YAML values (scalars, lists, mappings) one file may expand to, every use of an alias
counted in full, checked while parsing (a "billion laughs" stops at once). The shipped file has
54; ruamel reads about 10,000 values a second, so a file at the limit still loads in half a
second. Anchors and aliases stay allowed: sharing one ``when`` block or ``send_to`` list
between rules is a fair use, and counting each use bounds them as well as refusing them would."""
MAX_PROBLEMS = 50
"""Reading a file stops after this many problems (each one may search the DICOM dictionary
for a "did you mean"); fixing the first ones usually fixes the rest."""
MAX_DEPTH = 16
"""Deepest nesting of any/all/not allowed in a ``when`` block."""
MAX_CONDITIONS = 10_000
"""Most conditions one file may expand to."""
SHORT_CHARS = 60
"""Longest rendering of a value in a message."""
MAX_MESSAGE_CHARS = 400
"""Longest problem message (keys and operands in it are quoted as written)."""
RULE_FILE_GLOB = "*.yaml"
"""Rule files: ``*.yaml`` directly in the rules folder."""

RULE_KEYS: dict[str, str] = {
    "name": "unique name of the rule (letters, digits, _ . -)",
    "priority": "whole number; higher is evaluated first (default 0)",
    "description": "free text for people",
    "when": "conditions on the DICOM header (all must hold)",
    "complete": "{instances: N} and/or {idle_seconds: S}",
    "model": "<model>@<alias> or <model>:<version>",
    "send_to": "list of destination names from the node configuration",
    "stop": "true: no lower-priority rule sees the series",
    "discard": "true: take no action (always stops)",
    "outputs": "list of what goes back: seg, overlay, gsps, report (default [seg])",
    "on_low_confidence": "send, hold or discard a result flagged low confidence (default send)",
}
"""Keys a rule may have, with what each must be (used in messages)."""
REQUIRED_RULE_KEYS = ("name", "when")
FILE_KEYS = ("rules",)
COMPLETE_KEYS = ("instances", "idle_seconds")
COMBINATORS = ("any", "all", "not")

ModelExists = Callable[[str], tuple[bool, str]]


def rule_files(rules_dir: Path) -> list[Path]:
    """Return the rule files of a folder, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in Path(rules_dir).glob(RULE_FILE_GLOB)
        if p.is_file() and not p.name.startswith(".")
    )


def rules_digest(rules_dir: Path) -> str:
    """Return a short content hash of the rule files (names and bytes); ``missing`` if no folder.

    The same value is :attr:`RuleSet.version` of a set loaded from these files.
    """
    rules_dir = Path(rules_dir)
    if not rules_dir.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for path in rule_files(rules_dir):
        try:
            data = path.read_bytes()
        except OSError:
            data = b"<unreadable>"
        digest.update(path.name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:12]


def display_path(path: Path) -> str:
    """Path relative to the working folder when below it, else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


@dataclass
class _FileContext:
    """Where we are while reading one file: collects problems with file/line/rule."""

    display: str
    destinations: set[str] | None = None
    model_exists: ModelExists | None = None
    problems: list[Problem] = field(default_factory=list)
    rule: str | None = None
    budget: int = MAX_CONDITIONS

    def add(self, line: int | None, message: str) -> None:
        """Record a problem; raise :class:`_TooManyProblems` once there are ``MAX_PROBLEMS``."""
        if len(message) > MAX_MESSAGE_CHARS:  # a key or operand can be the size of the file
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        self.problems.append(Problem(self.display, line, self.rule, message))
        if len(self.problems) >= MAX_PROBLEMS:
            self.problems.append(
                Problem(self.display, line, None, f"stopped after {MAX_PROBLEMS} problems")
            )
            raise _TooManyProblems


class _TooManyProblems(Exception):
    """Raised by :meth:`_FileContext.add` to stop reading a file."""


def _key_line(node: Any, key: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:  # noqa: BLE001 - plain dicts and odd keys have no line info
        return default


def _item_line(node: Any, index: int, default: int | None) -> int | None:
    try:
        return int(node.lc.item(index)[0]) + 1
    except Exception:  # noqa: BLE001
        return default


def _node_line(node: Any, default: int | None) -> int | None:
    try:
        return int(node.lc.line) + 1
    except Exception:  # noqa: BLE001
        return default


def _is_seq(value: Any) -> bool:
    return isinstance(value, list | tuple)


# ---------------------------------------------------------------- conditions


class _ConditionParser:
    """Turn a ``when`` mapping into conditions, reporting problems instead of raising."""

    def __init__(self, ctx: _FileContext) -> None:
        self.ctx = ctx

    def _spend(self, line: int | None) -> bool:
        self.ctx.budget -= 1
        if self.ctx.budget == 0:
            self.ctx.add(line, f"more than {MAX_CONDITIONS} conditions in one file; simplify")
        return self.ctx.budget > 0

    def mapping(self, node: Any, line: int | None, depth: int) -> list[Condition]:
        """All conditions of one mapping (ANDed by the caller)."""
        if depth > MAX_DEPTH:
            self.ctx.add(line, f"conditions nested deeper than {MAX_DEPTH} levels; simplify")
            return []
        if not isinstance(node, Mapping):
            self.ctx.add(
                line, f"conditions must be a mapping of 'Keyword: value', got {short(node)}"
            )
            return []
        out: list[Condition] = []
        for key, value in node.items():
            kline = _key_line(node, key, line)
            if not self._spend(kline):
                return out
            cond = self.entry(key, value, kline, depth)
            if cond is not None:
                out.append(cond)
        return out

    def entry(self, key: Any, value: Any, line: int | None, depth: int) -> Condition | None:
        if key in ("any", "all"):
            if not _is_seq(value) or not value:
                self.ctx.add(
                    line,
                    f"'{key}' takes a list of condition mappings, e.g. "
                    f"{key}: [{{BodyPartExamined: THYROID}}, {{...}}]",
                )
                return None
            children: list[Condition] = []
            for i, item in enumerate(value):
                iline = _item_line(value, i, line)
                parts = self.mapping(item, iline, depth + 1)
                children.append(parts[0] if len(parts) == 1 else AllOf(parts, iline))
            return AnyOf(children, line) if key == "any" else AllOf(children, line)
        if key == "not":
            parts = self.mapping(value, _node_line(value, line), depth + 1)
            if not parts:
                return None
            return Not(parts[0] if len(parts) == 1 else AllOf(parts, line), line)
        if isinstance(key, str) and key[:1].islower():
            hint = suggest(key, COMBINATORS) or suggest(key, keyword_dict)
            self.ctx.add(
                line,
                f"unknown condition '{key}'{hint}: at this "
                f"level write a DICOM keyword (e.g. Modality) or any/all/not",
            )
            return None
        try:
            path = KeywordPath.parse(key)
        except ConditionError as exc:
            self.ctx.add(line, str(exc))
            return None
        return self.operators(path, value, line, depth)

    def operators(
        self, path: KeywordPath, value: Any, line: int | None, depth: int
    ) -> Condition | None:
        if value is None:
            self.ctx.add(
                line, f"no value for '{path}' (use {{exists: true}} to test that it is present)"
            )
            return None
        if _is_seq(value):
            self.ctx.add(
                line,
                f"a list is not a value for '{path}': use {{in: [...]}} for one of several values",
            )
            return None
        if not isinstance(value, Mapping):
            return self._build(path, "eq", value, {}, line)
        if depth > MAX_DEPTH:
            self.ctx.add(line, f"conditions nested deeper than {MAX_DEPTH} levels; simplify")
            return None
        mods: dict[str, Any] = {}
        ops: list[tuple[str, Any, int | None]] = []
        unknown = False
        for op, operand in value.items():
            oline = _key_line(value, op, line)
            if op in MODIFIERS:
                mods[op] = (operand, oline)
            elif op in OPERATORS:
                ops.append((op, operand, oline))
            else:
                unknown = True
                allowed = ", ".join(OPERATORS + MODIFIERS)
                self.ctx.add(
                    oline,
                    f"unknown operator '{op}'"
                    f"{suggest(str(op), OPERATORS + MODIFIERS)}; "
                    f"operators: {allowed}",
                )
        options: dict[str, bool] = {"case_sensitive": False, "all_values": False}
        if "case" in mods:
            case, cline = mods["case"]
            if case not in ("sensitive", "insensitive"):
                self.ctx.add(
                    cline, f"'case' must be 'sensitive' or 'insensitive', got {short(case)}"
                )
            options["case_sensitive"] = case == "sensitive"
        if "all" in mods:
            flag, aline = mods["all"]
            if not isinstance(flag, bool):
                self.ctx.add(
                    aline,
                    f"'all' inside an operator mapping must be true or false "
                    f"(every value must match), got {short(flag)}",
                )
            options["all_values"] = flag is True
        if not ops:
            if unknown:
                pass
            elif not mods:
                self.ctx.add(line, f"no operator for '{path}'; e.g. {{contains: text}}")
            else:
                self.ctx.add(
                    line,
                    f"'{path}' has only modifiers ({', '.join(mods)}); add an "
                    f"operator such as eq or contains",
                )
            return None
        conds: list[Condition] = []
        for op, operand, oline in ops:
            if not self._spend(oline):
                break
            if op == "not":
                inner = self.operators(path, operand, oline, depth + 1)
                if inner is not None:
                    conds.append(Not(inner, oline))
                continue
            cond = self._build(path, op, operand, options, oline)
            if cond is not None:
                conds.append(cond)
        if len(conds) != len(ops) or unknown:
            return None
        return conds[0] if len(conds) == 1 else AllOf(conds, line)

    def _build(
        self,
        path: KeywordPath,
        op: str,
        operand: Any,
        options: dict[str, bool],
        line: int | None,
    ) -> Condition | None:
        try:
            if op == "exists":
                return Exists(path, operand, line)
            if isinstance(operand, Mapping):
                raise ConditionError(
                    f"'{op}' on {path} needs a value, got a mapping {short(operand)}"
                )
            if op in ("in", "between") and _is_seq(operand):
                for item in operand:
                    if isinstance(item, Mapping) or _is_seq(item):
                        raise ConditionError(
                            f"'{op}' takes a flat list of values, got {short(operand)}"
                        )
                operand = list(operand)
            return Compare(path, op, operand, line=line, **options)
        except ConditionError as exc:
            self.ctx.add(line, str(exc))
            return None


def short(value: Any, limit: int = SHORT_CHARS) -> str:
    """Render ``value`` for a message in at most ``limit`` characters.

    Only as much of the value is visited as is shown: a value from YAML can share one list
    thousands of times (aliases), and ``repr`` of it would build the whole expansion first.
    """
    parts: list[str] = []
    room = [limit + 1]  # stop once one character more than the limit is written

    def put(text: str) -> bool:
        parts.append(text[: room[0]])
        room[0] -= len(parts[-1])
        return room[0] > 0

    def walk(item: Any) -> bool:  # each level writes a bracket: depth <= limit
        if isinstance(item, Mapping):
            if not put("{"):
                return False
            for i, (key, val) in enumerate(item.items()):
                if (i and not put(", ")) or not walk(key) or not put(": ") or not walk(val):
                    return False
            return put("}")
        if isinstance(item, list | tuple):
            if not put("["):
                return False
            for i, val in enumerate(item):
                if (i and not put(", ")) or not walk(val):
                    return False
            return put("]")
        if isinstance(item, str):
            return put(repr(item[: room[0]]))
        return put(repr(item)[: room[0]])

    walk(value)
    text = "".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- rules


def _parse_rule(
    node: Any,
    ctx: _FileContext,
    fname: str,
    position: int,
    line: int | None,
) -> Rule | None:
    """Build one rule or report its problems (returns ``None`` then)."""
    ctx.rule = None
    if not isinstance(node, Mapping):
        ctx.add(line, f"each rule must be a mapping with name, when, ...; got {short(node)}")
        return None
    # Untrusted YAML: Rule validates the name and its ValueError is reported below.
    name: Any = node.get("name") if all(isinstance(k, str) for k in node) else None
    if isinstance(name, str) and name:
        ctx.rule = name if len(name) <= SHORT_CHARS else short(name)  # Rule refuses it below
    before = len(ctx.problems)
    for key in node:
        if key not in RULE_KEYS:
            ctx.add(
                _key_line(node, key, line),
                f"unknown key '{key}'{suggest(str(key), list(RULE_KEYS))}; a rule may have: "
                f"{', '.join(RULE_KEYS)}",
            )
    for key in REQUIRED_RULE_KEYS:
        if key not in node:
            hint = " (use 'when: {}' to match every series)" if key == "when" else ""
            ctx.add(line, f"missing required key '{key}'{hint}")
    if before != len(ctx.problems) and "when" not in node:
        return None

    def typed(key: str, types: type | tuple[type, ...], what: str) -> Any:
        value = node.get(key)
        if value is None and key not in node:
            return None
        bad_bool = isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)
        )
        if not isinstance(value, types) or bad_bool:
            ctx.add(_key_line(node, key, line), f"'{key}' must be {what}, got {short(value)}")
            return None
        return value

    priority = typed("priority", int, "a whole number")
    description = typed("description", str, "text")
    model = typed("model", str, "text like thyroid-seg@production")
    stop = typed("stop", bool, "true or false")
    discard = typed("discard", bool, "true or false")
    send_to: tuple[str, ...] = ()
    if "send_to" in node:
        raw = node["send_to"]
        if isinstance(raw, str):
            ctx.add(
                _key_line(node, "send_to", line),
                f"'send_to' must be a list of destination names, e.g. [{raw}]",
            )
        elif not _is_seq(raw) or not all(isinstance(d, str) and d for d in raw):
            ctx.add(
                _key_line(node, "send_to", line),
                f"'send_to' must be a list of destination names, got {short(raw)}",
            )
        else:
            send_to = tuple(raw)
    outputs = _parse_outputs(node, ctx, line)
    on_low_confidence = _parse_on_low_confidence(node, ctx, line)
    if model is not None:
        try:
            parse_model_ref(model)
        except ValueError as exc:
            ctx.add(_key_line(node, "model", line), str(exc))
        else:
            _check_model(model, ctx, _key_line(node, "model", line))
    if ctx.destinations is not None:
        known = ", ".join(sorted(ctx.destinations)) or "none configured"
        for dest in send_to:
            if dest not in ctx.destinations:
                ctx.add(
                    _key_line(node, "send_to", line),
                    f"unknown destination '{dest}'{suggest(dest, ctx.destinations)}; "
                    f"configured: {known}",
                )
    complete = _parse_complete(node, ctx, line)
    if discard and "complete" in node:
        ctx.add(
            _key_line(node, "complete", line),
            "'complete' has no effect on a discard rule; remove it",
        )
    when_line = _key_line(node, "when", line)
    when = node.get("when")
    conditions: list[Condition] = []
    if when is None and "when" in node:
        ctx.add(when_line, "'when' is empty; write 'when: {}' to match every series")
    elif when is not None:
        if isinstance(when, Mapping) and not when:
            conditions = []
        else:
            conditions = _ConditionParser(ctx).mapping(when, when_line, 1)
    if before != len(ctx.problems):
        return None
    try:
        return Rule(
            name=name,
            priority=0 if priority is None else priority,
            file=fname,
            line=line or 1,
            conditions=AllOf(conditions, when_line),
            complete=complete or Completion(),
            model=model,
            send_to=send_to,
            outputs=outputs,
            on_low_confidence=on_low_confidence,
            stop=bool(discard) if stop is None else stop,
            discard=bool(discard),
            position=position,
            description=description,
        )
    except (TypeError, ValueError) as exc:
        ctx.add(line, str(exc))
        return None


def _parse_outputs(node: Mapping, ctx: _FileContext, line: int | None) -> tuple[str, ...]:
    """The rule's ``outputs`` list (default ``[seg]``); a bad name is a problem with a hint."""
    if "outputs" not in node:
        return DEFAULT_RULE_OUTPUTS
    raw = node["outputs"]
    oline = _key_line(node, "outputs", line)
    if not _is_seq(raw) or not raw or not all(isinstance(o, str) and o for o in raw):
        ctx.add(oline, f"'outputs' must be a list of {', '.join(OUTPUT_NAMES)}, got {short(raw)}")
        return DEFAULT_RULE_OUTPUTS
    for name in raw:
        if name not in OUTPUT_NAMES:
            ctx.add(
                oline,
                f"unknown output '{name}'{suggest(name, OUTPUT_NAMES)}; "
                f"allowed: {', '.join(OUTPUT_NAMES)}",
            )
    return tuple(raw)


def _parse_on_low_confidence(node: Mapping, ctx: _FileContext, line: int | None) -> str:
    """The rule's ``on_low_confidence`` (default ``send``); a bad value is a problem with a hint."""
    if "on_low_confidence" not in node:
        return DEFAULT_ON_LOW_CONFIDENCE
    raw = node["on_low_confidence"]
    allowed = ", ".join(LOW_CONFIDENCE_ACTIONS)
    if not isinstance(raw, str) or raw not in LOW_CONFIDENCE_ACTIONS:
        hint = suggest(raw, LOW_CONFIDENCE_ACTIONS) if isinstance(raw, str) else ""
        ctx.add(
            _key_line(node, "on_low_confidence", line),
            f"'on_low_confidence' must be one of {allowed}, got {short(raw)}{hint}",
        )
        return DEFAULT_ON_LOW_CONFIDENCE
    return raw


def _check_model(model: str, ctx: _FileContext, line: int | None) -> None:
    if ctx.model_exists is None:
        return
    try:
        ok, reason = ctx.model_exists(model)
    except Exception as exc:  # noqa: BLE001 - a broken store is a problem, not a crash
        ok, reason = False, f"model store error: {exc}"
    if not ok:
        ctx.add(line, f"unknown model '{model}': {reason}")


def _parse_complete(node: Mapping, ctx: _FileContext, line: int | None) -> Completion | None:
    if "complete" not in node:
        return None
    raw = node["complete"]
    cline = _key_line(node, "complete", line)
    if not isinstance(raw, Mapping) or not raw:
        ctx.add(
            cline,
            f"'complete' must be {{instances: N}} and/or {{idle_seconds: S}}, got {short(raw)}",
        )
        return None
    bad = [k for k in raw if k not in COMPLETE_KEYS]
    for key in bad:
        ctx.add(
            _key_line(raw, key, cline),
            f"unknown key '{key}' in 'complete'{suggest(str(key), COMPLETE_KEYS)}; "
            f"allowed: {', '.join(COMPLETE_KEYS)}",
        )
    if bad:
        return None
    try:
        return Completion(instances=raw.get("instances"), idle_seconds=raw.get("idle_seconds"))
    except (TypeError, ValueError) as exc:
        ctx.add(cline, f"'complete': {exc}")
        return None


def parse_text(
    text: str,
    fname: str,
    display: str,
    *,
    destinations: set[str] | None = None,
    model_exists: ModelExists | None = None,
) -> tuple[list[Rule], list[Problem]]:
    """Parse one rule file's text into rules and problems (never raises for bad input)."""
    ctx = _FileContext(display, destinations, model_exists)
    try:
        data = bounded_yaml("rt", max_values=MAX_VALUES, max_chars=MAX_FILE_BYTES).load(text)
    except Exception as exc:  # noqa: BLE001 - ruamel raises many types; all are YAML errors
        ctx.add(*yaml_problem(exc))
        return [], ctx.problems
    if data is None:
        return [], []
    try:
        return _parse_file(data, ctx, fname), ctx.problems
    except _TooManyProblems:
        return [], ctx.problems


def _parse_file(data: Any, ctx: _FileContext, fname: str) -> list[Rule]:
    """The rules of one loaded file; problems go to ``ctx``."""
    if not isinstance(data, Mapping):
        ctx.add(1, f"a rule file must be a mapping with a 'rules:' list, got {short(data)}")
        return []
    for key in data:
        if key not in FILE_KEYS:
            ctx.add(
                _key_line(data, key, 1),
                f"unknown top-level key '{key}'{suggest(str(key), FILE_KEYS)}; a rule file "
                f"has only 'rules:'",
            )
    raw_rules = data.get("rules")
    if raw_rules is None:
        if "rules" not in data and not ctx.problems:
            ctx.add(1, "missing 'rules:' list")
        return []
    if not _is_seq(raw_rules):
        ctx.add(_key_line(data, "rules", 1), f"'rules' must be a list, got {short(raw_rules)}")
        return []
    rules = []
    for position, node in enumerate(raw_rules):
        rule = _parse_rule(node, ctx, fname, position, _item_line(raw_rules, position, None))
        if rule is not None:
            rules.append(rule)
    return rules


def _read_file(path: Path, display: str) -> tuple[str | None, list[Problem]]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, [
                Problem(
                    display,
                    None,
                    None,
                    f"file is {size} bytes; rule files are limited to {MAX_FILE_BYTES} bytes",
                )
            ]
        data = path.read_bytes()
    except OSError as exc:
        return None, [Problem(display, None, None, f"cannot read file: {exc.strerror}")]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return None, [Problem(display, line, None, "file is not UTF-8 text")]


def cross_checks(rules: list[Rule], displays: Mapping[str, str]) -> list[Problem]:
    """Checks across rules: duplicate names and rules shadowed by a stopping rule above."""
    return duplicate_problems(rules, displays) + shadow_problems(rules, displays)


def collect(
    rules_dir: Path,
    *,
    destinations: set[str] | None = None,
    model_exists: ModelExists | None = None,
) -> tuple[RuleSet | None, list[Problem]]:
    """Read and check a rules folder; return the set (``None`` on problems) and the problems."""
    rules_dir = Path(rules_dir)
    shown_dir = display_path(rules_dir)
    if not rules_dir.is_dir():
        return None, [Problem(shown_dir, None, None, "rules folder does not exist")]
    version = rules_digest(rules_dir)
    problems: list[Problem] = []
    rules: list[Rule] = []
    displays: dict[str, str] = {}
    files = rule_files(rules_dir)
    for path in files:
        display = display_path(path)
        displays[path.name] = display
        text, read_problems = _read_file(path, display)
        problems.extend(read_problems)
        if text is None:
            continue
        try:
            file_rules, file_problems = parse_text(
                text, path.name, display, destinations=destinations, model_exists=model_exists
            )
        except Exception as exc:  # noqa: BLE001 - never let a rule file crash the node
            LOGGER.exception("internal error while reading %s", display)
            file_rules, file_problems = (
                [],
                [Problem(display, None, None, f"internal error while reading: {exc}")],
            )
        rules.extend(file_rules)
        problems.extend(file_problems)
    problems.extend(cross_checks(rules, displays))
    if problems:
        return None, problems
    return RuleSet(tuple(rules), version, shown_dir, tuple(p.name for p in files)), []


def load_rules(
    rules_dir: Path,
    *,
    destinations: set[str] | None = None,
    model_exists: ModelExists | None = None,
) -> RuleSet:
    """Load every ``*.yaml`` file directly in ``rules_dir`` into one checked rule set.

    Parameters
    ----------
    rules_dir:
        The rules folder. Subfolders (``tests/``, ``examples/``) are not read.
    destinations:
        Destination names of the node configuration; ``None`` skips the destination check.
    model_exists:
        ``model_exists(ref) -> (ok, reason)`` for ``name@alias`` / ``name:version``; ``None``
        skips the model-store check.

    Returns
    -------
    RuleSet
        Rules in evaluation order with the content hash of the files as ``version``.

    Raises
    ------
    RulesError
        Anything wrong in any file (YAML syntax, unknown key, operator or keyword, invalid
        regex, wrong value type, unknown destination or model, duplicate names, shadowed
        rules, size and nesting limits); ``.problems`` lists them all with file and line.
    """
    ruleset, problems = collect(rules_dir, destinations=destinations, model_exists=model_exists)
    if ruleset is None:
        raise RulesError(problems)
    return ruleset


def check_rules(
    rules_dir: Path,
    destinations: set[str] | None = None,
    model_exists: ModelExists | None = None,
) -> list[Problem]:
    """Return every problem of a rules folder (empty exactly when :func:`load_rules` succeeds).

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
