"""Conditions of the rules DSL: keyword paths, DICOM-aware comparison, and AND / OR / NOT.

Values are compared by the keyword's VR in pydicom's dictionary: IS/DS and binary numbers as
numbers, DA/TM/DT as dates and times, everything else as text (case-insensitive unless
``case: sensitive``). A multi-valued element matches when any value matches, unless ``all: true``.
A missing or empty element makes every condition false except ``exists: false``.
Regular expressions use RE2 (linear time: no catastrophic backtracking), compiled once at load.
"""

from __future__ import annotations

import datetime as dt
import difflib
import enum
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import re2
from pydicom.datadict import dictionary_VR, keyword_dict

LOGGER = logging.getLogger(__name__)

MAX_SEEN_CHARS = 80
"""Values shown in traces are cut to this many characters."""

NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
TEXT_WITH_BACKSLASH_VRS = frozenset({"LT", "ST", "UT", "UN", "OB", "OW"})


class Kind(enum.Enum):
    """How values of an element compare."""

    TEXT = "text"
    NUMBER = "number"
    DATE = "date"
    TIME = "time"
    DATETIME = "datetime"
    SEQUENCE = "sequence"


_KIND_BY_VR = {"DA": Kind.DATE, "TM": Kind.TIME, "DT": Kind.DATETIME, "SQ": Kind.SEQUENCE}
ORDERED_KINDS = frozenset({Kind.NUMBER, Kind.DATE, Kind.TIME, Kind.DATETIME})


class ConditionError(ValueError):
    """A condition is written wrongly; the message says what and how to fix it."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string.

    A choice equal to ``word`` ignoring case wins; otherwise difflib's closest match.
    """
    if not isinstance(word, str):
        return ""
    options = list(choices)
    lowered = {c.lower(): c for c in options}
    close = [lowered[word.lower()]] if word.lower() in lowered else []
    if not close:
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@lru_cache(maxsize=4096)
def keyword_vr(keyword: str) -> str:
    """Return the VR of a DICOM keyword (first one when the dictionary lists several).

    Raises
    ------
    ConditionError
        Not a keyword of pydicom's dictionary; the message suggests the closest one.
    """
    if keyword not in keyword_dict:
        raise ConditionError(f"unknown DICOM keyword '{keyword}'{suggest(keyword, keyword_dict)}")
    return dictionary_VR(keyword_dict[keyword]).split(" or ")[0]


def kind_of(vr: str) -> Kind:
    """Return the comparison kind of a VR."""
    if vr in NUMERIC_VRS:
        return Kind.NUMBER
    return _KIND_BY_VR.get(vr, Kind.TEXT)


IDENTIFYING_PREFIXES = (
    "Patient",
    "OtherPatient",
    "Referring",
    "Performing",
    "Requesting",
    "Physician",
    "Operators",
    "Institution",
    "Accession",
    "Issuer",
)
"""Keywords starting with these hold patient or staff identity (values hidden in audit traces)."""
NOT_IDENTIFYING = frozenset(
    {
        "PatientPosition",
        "PatientOrientation",
        "PatientOrientationCodeSequence",
        "PatientGantryRelationshipCodeSequence",
    }
)


def is_identifying(keyword: str, vr: str) -> bool:
    """True for names, UIDs and identity keywords (``PatientID``, ``AccessionNumber``, ...)."""
    if keyword in NOT_IDENTIFYING:
        return False
    return vr in ("PN", "UI") or keyword.startswith(IDENTIFYING_PREFIXES)


_STEP_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)(?:\[(\d+|\*)\])?$")


@dataclass(frozen=True)
class KeywordPath:
    """``Keyword`` or ``Seq[0].Keyword`` / ``Seq[*].Keyword``: where a value lives in a header."""

    steps: tuple[tuple[str, int | str | None], ...]
    vr: str

    @classmethod
    def parse(cls, text: str) -> KeywordPath:
        """Parse and check a path against pydicom's dictionary.

        Raises
        ------
        ConditionError
            Unknown keyword (with the closest suggestion), malformed step, or a step into
            something that is not a sequence.
        """
        if not isinstance(text, str) or not text:
            raise ConditionError(f"condition keys must be DICOM keywords, got {text!r}")
        parts = text.split(".")
        steps: list[tuple[str, int | str | None]] = []
        vr = ""
        for i, part in enumerate(parts):
            match = _STEP_RE.match(part)
            if match is None:
                raise ConditionError(
                    f"'{text}' is not a keyword path; write Keyword, or Sequence[0].Keyword "
                    f"or Sequence[*].Keyword"
                )
            keyword, index = match.group(1), match.group(2)
            vr = keyword_vr(keyword)
            last = i == len(parts) - 1
            if not last and vr != "SQ":
                raise ConditionError(f"'{keyword}' in '{text}' is not a sequence (VR {vr})")
            if index is not None and vr != "SQ":
                raise ConditionError(
                    f"'{keyword}' is not a sequence (VR {vr}); [..] only selects sequence items"
                )
            if not last and index is None:
                raise ConditionError(
                    f"sequence '{keyword}' in '{text}' needs an item: '{keyword}[0]' or "
                    f"'{keyword}[*]' (any item)"
                )
            steps.append((keyword, int(index) if index and index != "*" else index))
        return cls(tuple(steps), vr)

    @property
    def identifying(self) -> bool:
        """The final keyword holds identity (see :func:`is_identifying`)."""
        return is_identifying(self.steps[-1][0], self.vr)

    @property
    def kind(self) -> Kind:
        """Comparison kind of the final keyword."""
        return kind_of(self.vr)

    def __str__(self) -> str:
        return ".".join(k if i is None else f"{k}[{i}]" for k, i in self.steps)

    def values(self, header: Any) -> list[Any]:
        """Return the individual values found at this path (multi-values and ``[*]`` flattened).

        Empty values are left out, so an empty list means "missing".
        """
        items: list[Any] = [header]
        for keyword, index in self.steps[:-1]:
            next_items: list[Any] = []
            for item in items:
                seq = _get(item, keyword)
                if isinstance(seq, Mapping) or _is_dataset(seq):
                    seq = [seq]
                if not isinstance(seq, Sequence) or isinstance(seq, str | bytes):
                    continue
                if index == "*":
                    next_items.extend(seq)
                elif isinstance(index, int) and index < len(seq):
                    next_items.append(seq[index])
            items = next_items
        keyword, index = self.steps[-1]
        out: list[Any] = []
        for item in items:
            value = _get(item, keyword)
            out.extend(_flatten(value, split=not _is_dataset(item), vr=self.vr))
        if index is not None and self.vr == "SQ":
            out = [out[index]] if isinstance(index, int) and index < len(out) else out
        return out


def _is_dataset(obj: Any) -> bool:
    return hasattr(obj, "data_element") and hasattr(obj, "dir")


def _get(item: Any, keyword: str) -> Any:
    if _is_dataset(item):
        try:
            elem = item.data_element(keyword)
        except Exception:  # noqa: BLE001 - a malformed element reads as missing
            LOGGER.debug("cannot read %s from the header", keyword, exc_info=True)
            return None
        return None if elem is None else elem.value
    if isinstance(item, Mapping):
        return item.get(keyword)
    return None


def _flatten(value: Any, *, split: bool, vr: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, bytes):
        return [value] if value else []
    if isinstance(value, str):
        if split and "\\" in value and vr not in TEXT_WITH_BACKSLASH_VRS:
            return [v for v in value.split("\\") if v.strip()]
        return [value] if value.strip() else []
    if isinstance(value, Mapping) or _is_dataset(value):
        return [value]
    if isinstance(value, Sequence):
        out: list[Any] = []
        for v in value:
            out.extend(_flatten(v, split=split, vr=vr))
        return out
    text = str(value)
    return [value] if text.strip() else []


# ---------------------------------------------------------------- value conversion


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


_DT_RE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")


def _to_date(value: Any) -> dt.date | None:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value).strip().replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _to_time(value: Any) -> dt.time | None:
    if isinstance(value, dt.datetime):
        return value.time()
    if isinstance(value, dt.time):
        return value
    text = str(value).strip().replace(":", "")
    main, _, frac = text.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    try:
        return dt.time(
            int(main[:2]), int(main[2:4] or 0), int(main[4:6] or 0), int((frac + "000000")[:6])
        )
    except ValueError:
        return None


def _to_datetime(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    text = re.sub(r"[-:T ]", "", str(value).strip())
    match = _DT_RE.match(text)
    if match is None or match.end() < len(text.split("+")[0].split("&")[0]):
        return None
    parts = [
        int(g) if g else d for g, d in zip(match.groups()[:6], (0, 1, 1, 0, 0, 0), strict=True)
    ]
    year, month, day, hour, minute, second = parts
    micro = int((match.group(7) or "0").ljust(6, "0")[:6])
    try:
        return dt.datetime(year, month, day, hour, minute, second, micro)
    except ValueError:
        return None


_CONVERT = {
    Kind.NUMBER: _to_number,
    Kind.DATE: _to_date,
    Kind.TIME: _to_time,
    Kind.DATETIME: _to_datetime,
}


def convert(value: Any, kind: Kind) -> Any:
    """Return ``value`` as the kind compares it (``None`` when it cannot be read as that kind)."""
    if kind in _CONVERT:
        return _CONVERT[kind](value)
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1", errors="replace").strip(" \0")
    return str(value).strip()


def show(values: list[Any]) -> str:
    """Render values seen in a header for a trace (``missing`` when there are none)."""
    if not values:
        return "missing"
    shown = [
        v if isinstance(v, int | float) and not isinstance(v, bool) else _text(v) for v in values
    ]
    text = repr(shown[0]) if len(shown) == 1 else repr(shown)
    return text if len(text) <= MAX_SEEN_CHARS else text[: MAX_SEEN_CHARS - 3] + "..."


# ---------------------------------------------------------------- conditions


@dataclass(frozen=True)
class Outcome:
    """Result of a condition on a header: whether it holds, and what a person needs to see."""

    ok: bool
    condition: str
    line: int | None
    seen: str
    sensitive: bool = False
    """``seen`` holds patient-identifying values (see :func:`is_identifying`)."""


class Condition:
    """Base of all conditions: ``evaluate(header) -> Outcome``; ``key()`` compares definitions."""

    line: int | None = None

    def evaluate(self, header: Any) -> Outcome:  # pragma: no cover - abstract
        """Evaluate on a header."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        """Human wording of the condition."""
        raise NotImplementedError

    def key(self) -> Any:  # pragma: no cover - abstract
        """Hashable canonical form (same meaning -> same key)."""
        raise NotImplementedError


OPERATORS = (
    "eq",
    "in",
    "contains",
    "startswith",
    "endswith",
    "regex",
    "lt",
    "le",
    "gt",
    "ge",
    "between",
    "exists",
    "not",
)
"""Operators a keyword's mapping may hold (plus the modifiers ``case`` and ``all``)."""

MODIFIERS = ("case", "all")
TEXT_OPERATORS = frozenset({"contains", "startswith", "endswith", "regex"})
ORDER_OPERATORS = frozenset({"lt", "le", "gt", "ge", "between"})
_SYMBOL = {"eq": "==", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def _scalar_ok(operand: Any) -> bool:
    return isinstance(operand, str | int | float | dt.date | dt.time) and not isinstance(
        operand, bool
    )


class Compare(Condition):
    """``<path> <op> <operand>`` with DICOM-aware conversion; built and checked at load."""

    def __init__(
        self,
        path: KeywordPath,
        op: str,
        operand: Any,
        *,
        case_sensitive: bool = False,
        all_values: bool = False,
        line: int | None = None,
    ) -> None:
        """Check the operand for the operator and the element's kind, and prepare it.

        Raises
        ------
        ConditionError
            Unknown operator, an operator that does not apply to the element, or an operand
            of the wrong type (the message shows it).
        """
        if op not in OPERATORS or op in ("exists", "not"):
            raise ConditionError(f"unknown operator '{op}'{suggest(op, OPERATORS)}")
        self.path, self.op, self.raw = path, op, operand
        self.case_sensitive, self.all_values, self.line = case_sensitive, all_values, line
        kind = path.kind
        name = f"{path} ({path.vr})"
        if kind is Kind.SEQUENCE:
            raise ConditionError(
                f"'{path}' is a sequence: test an item's keyword ('{path}[0].Keyword') or use "
                f"'exists'"
            )
        if op in ORDER_OPERATORS and kind not in ORDERED_KINDS:
            raise ConditionError(
                f"'{op}' compares numbers, dates and times; {name} is text (use eq, in, "
                f"contains, startswith or regex)"
            )
        self.kind = kind if op not in TEXT_OPERATORS else Kind.TEXT
        self._pattern: Any = None
        if op == "in":
            if not isinstance(operand, list) or not operand:
                raise ConditionError(
                    f"'in' takes a list of values, e.g. {{in: [CT, MR]}}, got {operand!r}"
                )
            self.operand: Any = tuple(self._value(v) for v in operand)
        elif op == "between":
            if not isinstance(operand, list) or len(operand) != 2:
                raise ConditionError(
                    f"'between' takes [low, high] (both included), got {operand!r}"
                )
            low, high = (self._value(v) for v in operand)
            if low > high:
                raise ConditionError(f"'between' needs low <= high, got {operand!r}")
            self.operand = (low, high)
        elif op in TEXT_OPERATORS:
            if not isinstance(operand, str) or not operand:
                raise ConditionError(f"'{op}' takes text (quote it if needed), got {operand!r}")
            self.operand = operand if case_sensitive or op == "regex" else operand.casefold()
            if op == "regex":
                self._pattern = compile_regex(operand, case_sensitive=case_sensitive)
        else:
            self.operand = self._value(operand)

    def _value(self, operand: Any) -> Any:
        if not _scalar_ok(operand):
            raise ConditionError(
                f"'{self.op}' on {self.path} needs a single value (text, number, date or "
                f"time), got {operand!r}"
                + (
                    " (quote true/false/yes/no if you mean text)"
                    if isinstance(operand, bool)
                    else ""
                )
            )
        if self.kind is Kind.TEXT:
            text = _text(operand)
            return text if self.case_sensitive else text.casefold()
        value = convert(operand, self.kind)
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        if value is None:
            examples = {
                Kind.NUMBER: "2.5",
                Kind.DATE: "20240131 or 2024-01-31",
                Kind.TIME: "'08:30' or '083000'",
                Kind.DATETIME: "20240131083000",
            }
            raise ConditionError(
                f"{self.path} is a {self.kind.value} ({self.path.vr}); {operand!r} is not a "
                f"{self.kind.value} (e.g. {examples[self.kind]})"
            )
        return value

    def _test(self, value: Any) -> bool:
        if self.kind is Kind.TEXT:
            text = _text(value)
            if not self.case_sensitive and self.op != "regex":
                text = text.casefold()
            if self.op == "eq":
                return text == self.operand
            if self.op == "in":
                return text in self.operand
            if self.op == "contains":
                return self.operand in text
            if self.op == "startswith":
                return text.startswith(self.operand)
            if self.op == "endswith":
                return text.endswith(self.operand)
            return self._pattern.search(text) is not None
        converted = convert(value, self.kind)
        if converted is None:
            return False
        if self.op == "eq":
            return bool(converted == self.operand)
        if self.op == "in":
            return converted in self.operand
        if self.op == "between":
            return bool(self.operand[0] <= converted <= self.operand[1])
        return bool(
            {
                "lt": converted < self.operand,
                "le": converted <= self.operand,
                "gt": converted > self.operand,
                "ge": converted >= self.operand,
            }[self.op]
        )

    def evaluate(self, header: Any) -> Outcome:
        """Hold when any (or with ``all: true`` every) value at the path passes; missing fails."""
        values = self.path.values(header)
        if not values:
            ok = False
        elif self.all_values:
            ok = all(self._test(v) for v in values)
        else:
            ok = any(self._test(v) for v in values)
        return Outcome(ok, self.describe(), self.line, show(values), self.path.identifying)

    def describe(self) -> str:
        """E.g. ``Modality == 'NM'`` or ``SliceThickness <= 1.5``."""
        raw = self.raw
        if self.op in _SYMBOL:
            text = f"{self.path} {_SYMBOL[self.op]} {raw!r}"
        else:
            text = f"{self.path} {self.op} {raw!r}"
        if self.all_values:
            text += " (all values)"
        if self.case_sensitive and self.kind is Kind.TEXT:
            text += " (case-sensitive)"
        return text

    def key(self) -> Any:
        """Canonical form."""
        operand = self.operand
        if self.op == "in":
            operand = tuple(sorted(map(repr, operand)))
        return ("cmp", str(self.path), self.op, repr(operand), self.case_sensitive, self.all_values)


class Exists(Condition):
    """``exists: true`` (a non-empty value is present) or ``exists: false``."""

    def __init__(self, path: KeywordPath, expected: Any, line: int | None = None) -> None:
        """Raises ConditionError unless ``expected`` is true or false."""
        if not isinstance(expected, bool):
            raise ConditionError(f"'exists' takes true or false, got {expected!r}")
        self.path, self.expected, self.line = path, expected, line

    def evaluate(self, header: Any) -> Outcome:
        """Hold when presence equals ``expected``."""
        values = self.path.values(header)
        return Outcome(
            bool(values) == self.expected,
            self.describe(),
            self.line,
            show(values),
            self.path.identifying,
        )

    def describe(self) -> str:
        """``X exists`` / ``X is missing``."""
        return f"{self.path} {'exists' if self.expected else 'is missing'}"

    def key(self) -> Any:
        """Canonical form."""
        return ("exists", str(self.path), self.expected)


class AllOf(Condition):
    """Every child holds (an empty list always holds)."""

    def __init__(self, children: Sequence[Condition], line: int | None = None) -> None:
        """Store the children."""
        self.children, self.line = tuple(children), line

    def evaluate(self, header: Any) -> Outcome:
        """The first child that fails explains the failure."""
        for child in self.children:
            outcome = child.evaluate(header)
            if not outcome.ok:
                return outcome
        return Outcome(True, self.describe(), self.line, "")

    def describe(self) -> str:
        """``A and B``."""
        if not self.children:
            return "always"
        return " and ".join(c.describe() for c in self.children)

    def key(self) -> Any:
        """Canonical form (order-independent)."""
        return ("all", frozenset(c.key() for c in self.children))


class AnyOf(Condition):
    """At least one child holds."""

    def __init__(self, children: Sequence[Condition], line: int | None = None) -> None:
        """Store the children."""
        self.children, self.line = tuple(children), line

    def evaluate(self, header: Any) -> Outcome:
        """Fails with every child's value when none holds."""
        seen = []
        sensitive = False
        for child in self.children:
            outcome = child.evaluate(header)
            sensitive = sensitive or outcome.sensitive
            if outcome.ok:
                return Outcome(True, self.describe(), self.line, outcome.seen, outcome.sensitive)
            seen.append(outcome.seen)
        unique = list(dict.fromkeys(seen))
        return Outcome(False, self.describe(), self.line, "; ".join(unique), sensitive)

    def describe(self) -> str:
        """``any of (A | B)``."""
        return "any of (" + " | ".join(c.describe() for c in self.children) + ")"

    def key(self) -> Any:
        """Canonical form (order-independent)."""
        return ("any", frozenset(c.key() for c in self.children))


class Not(Condition):
    """The child does not hold (a missing element makes the child false, so ``not`` true)."""

    def __init__(self, child: Condition, line: int | None = None) -> None:
        """Store the child."""
        self.child, self.line = child, line

    def evaluate(self, header: Any) -> Outcome:
        """Hold when the child fails."""
        outcome = self.child.evaluate(header)
        return Outcome(not outcome.ok, self.describe(), self.line, outcome.seen, outcome.sensitive)

    def describe(self) -> str:
        """``not (A)``."""
        return f"not ({self.child.describe()})"

    def key(self) -> Any:
        """Canonical form."""
        return ("not", self.child.key())


def compile_regex(pattern: str, *, case_sensitive: bool = False) -> Any:
    """Compile with RE2 (linear time, no backreferences); case-insensitive unless asked.

    Raises
    ------
    ConditionError
        The pattern is not valid RE2 syntax; the message carries RE2's reason.
    """
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = case_sensitive
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace")
            if exc.args and isinstance(exc.args[0], bytes)
            else str(exc)
        )
        raise ConditionError(f"invalid regex {pattern!r}: {reason}") from None
    except Exception as exc:  # noqa: BLE001 - RE2 raises odd types for odd input
        raise ConditionError(f"invalid regex {pattern!r}: {exc}") from None
