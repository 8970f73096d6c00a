"""Property tests: the rules parser never crashes, and ``check`` agrees with the loader."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from dicom_node.routing import RulesError, check_rules, evaluate, load_rules
from dicom_node.routing.conditions import OPERATORS
from dicom_node.routing.loader import RULE_KEYS

KEYWORDS = [
    "Modality",
    "Rows",
    "SliceThickness",
    "StudyDate",
    "StudyTime",
    "ImageType",
    "StudyDescription",
    "PatientName",
    "AcquisitionDateTime",
    "RadiopharmaceuticalInformationSequence",
    "RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical",
    "EnergyWindowInformationSequence[*].EnergyWindowName",
    "Modaliti",
    "Seq[0].",
]
WORDS = (
    KEYWORDS
    + list(RULE_KEYS)
    + list(OPERATORS)
    + ["any", "all", "not", "case", "sensitive", "rules", "instances", "idle_seconds", "x"]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "NM",
            "CT",
            "(a",
            "thyr|schild",
            "20240101",
            "12:00",
            "x@y",
            "pacs",
            "thyroid-seg@production",
            "*",
            "[",
            "true",
        ]
    ),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(WORDS), st.text(max_size=6)), children, max_size=5
        ),
    ),
    max_leaves=30,
)
rule_like = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["a", "b", "a b", "none", 5]),
        "when": st.dictionaries(st.sampled_from(WORDS), structures, max_size=4),
    },
    optional={
        key: structures for key in ("priority", "model", "send_to", "stop", "discard", "complete")
    },
)
documents = st.one_of(structures, st.fixed_dictionaries({"rules": st.lists(rule_like, max_size=4)}))

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dump(data: Any) -> str:
    buffer = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump(data, buffer)
    return buffer.getvalue()


def load_outcome(folder: Path) -> tuple[bool, list[str]]:
    """Load the folder: (ok, problem texts); anything but RulesError fails the test."""
    try:
        load_rules(folder, destinations={"pacs"}, model_exists=lambda ref: (ref != "x@y", "no"))
    except RulesError as exc:
        messages = [str(p) for p in exc.problems]
        assert messages, "RulesError with no problems"
        assert not any("internal error" in m for m in messages), messages
        return False, messages
    return True, []


def agree(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "r.yaml").write_text(text, encoding="utf-8")
        ok, messages = load_outcome(folder)
        checked = check_rules(
            folder, destinations={"pacs"}, model_exists=lambda ref: (ref != "x@y", "no")
        )
        assert ok == (not checked)
        assert sorted(messages) == sorted(str(p) for p in checked)
        if ok:
            ruleset = load_rules(folder)
            for header in (
                {},
                {"Modality": "NM", "Rows": "x", "ImageType": "A\\B"},
                {"StudyDate": "garbage", "SliceThickness": [1, "a"]},
            ):
                evaluate(ruleset, header)


@SETTINGS
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes(text: str) -> None:
    agree(text)


@SETTINGS
@given(documents)
def test_arbitrary_structures_never_crash_and_check_agrees(data: Any) -> None:
    agree(dump(data))


@SETTINGS
@given(
    st.lists(
        st.sampled_from(
            [
                "rules:\n",
                "  - name: a\n",
                "  - name: b\n",
                "    when:\n",
                "    when: {}\n",
                "      Modality: NM\n",
                "      Rows: {gt: 5}\n",
                "      any:\n",
                "        - Modality: CT\n",
                "      not: {Modality: CT}\n",
                "    model: m@production\n",
                "    send_to: [pacs]\n",
                "    stop: true\n",
                "    discard: true\n",
                "    priority: 3\n",
                "    complete: {instances: 2}\n",
                "      StudyDescription: {regex: '(a'}\n",
                "      Modaliti: NM\n",
                "  -\n",
                "\t\n",
                "    send_to: [nowhere]\n",
                "    model: x@y\n",
            ]
        ),
        max_size=14,
    )
)
def test_rule_shaped_text_check_agrees(lines: list[str]) -> None:
    agree("".join(lines))


REPO = Path(__file__).resolve().parents[1]
TOUR = """\
rules:
  - name: tour
    when:
      Modality: {in: [NM, PT]}
      StudyDescription: {regex: "thyr|schild"}
      SeriesDescription: {not: {contains: scout}}
      ImageType: {all: true, in: [ORIGINAL, PRIMARY]}
      Rows: {ge: 128}
      Columns: {between: [128, 512]}
      StudyDate: {gt: 2020-01-01}
      StudyTime: {lt: "18:00"}
      AcquisitionDateTime: {lt: 20300101}
      PatientID: {exists: true}
      RadiopharmaceuticalInformationSequence[*].Radiopharmaceutical: {contains: tc}
      EnergyWindowInformationSequence[0].EnergyWindowName: {startswith: tc}
    model: m@production
    send_to: [pacs]
"""
header_values = st.one_of(
    scalars,
    st.binary(max_size=8),
    st.lists(scalars, max_size=3),
    st.lists(
        st.dictionaries(
            st.sampled_from(["Radiopharmaceutical", "EnergyWindowName"]), scalars, max_size=2
        ),
        max_size=3,
    ),
)
headers = st.dictionaries(
    st.sampled_from(
        [
            "Modality",
            "StudyDescription",
            "SeriesDescription",
            "ImageType",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
            "AcquisitionDateTime",
            "PatientID",
            "RadiopharmaceuticalInformationSequence",
            "EnergyWindowInformationSequence",
            "BodyPartExamined",
        ]
    ),
    header_values,
)


@SETTINGS
@given(headers)
def test_evaluation_never_raises_on_any_header(header: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tour.yaml").write_text(TOUR)
        for folder in (Path(tmp), REPO / "rules"):
            decision = evaluate(load_rules(folder), header)
            decision.to_dict()
