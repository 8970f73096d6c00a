"""Operators of the rules DSL, DICOM-aware matching and their error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.routing import RulesError, RuleSet, evaluate, load_rules
from dicom_node.routing.conditions import ConditionError, KeywordPath, compile_regex

RULE = """\
rules:
  - name: r
    when:
{when}
    model: m@production
    send_to: [pacs]
"""


def ruleset(tmp_path: Path, when: str) -> RuleSet:
    """Load a one-rule set whose ``when`` block is ``when`` (indented by the caller's YAML)."""
    body = "\n".join("      " + line for line in when.strip("\n").splitlines())
    (tmp_path / "r.yaml").write_text(RULE.format(when=body))
    return load_rules(tmp_path)


def fires(tmp_path: Path, when: str, header: Any) -> bool:
    return bool(evaluate(ruleset(tmp_path, when), header).matched)


def problems(tmp_path: Path, when: str) -> str:
    with pytest.raises(RulesError) as info:
        ruleset(tmp_path, when)
    return "\n".join(str(p) for p in info.value.problems)


class TestEquality:
    def test_plain_value_is_case_insensitive(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "Modality: NM", {"Modality": "nm"})
        assert not fires(tmp_path, "Modality: NM", {"Modality": "CT"})

    def test_eq_operator_and_surrounding_spaces(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "BodyPartExamined: {eq: thyroid}", {"BodyPartExamined": "THYROID "})

    def test_case_sensitive_opt_in(self, tmp_path: Path) -> None:
        when = "Manufacturer: {eq: SIEMENS, case: sensitive}"
        assert fires(tmp_path, when, {"Manufacturer": "SIEMENS"})
        assert not fires(tmp_path, when, {"Manufacturer": "Siemens"})

    def test_numeric_string_equals_number(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "SliceThickness: 1.5", {"SliceThickness": "1.50"})
        assert fires(tmp_path, "Rows: 256", {"Rows": 256})

    def test_person_name_case_insensitive(self, tmp_path: Path) -> None:
        ds = Dataset()
        ds.ReferringPhysicianName = "Curie^Marie"
        assert fires(tmp_path, "ReferringPhysicianName: CURIE^MARIE", ds)


class TestTextOperators:
    def test_in(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "Modality: {in: [CT, MR]}", {"Modality": "mr"})
        assert not fires(tmp_path, "Modality: {in: [CT, MR]}", {"Modality": "NM"})

    def test_contains_startswith_endswith(self, tmp_path: Path) -> None:
        header = {"SeriesDescription": "Thyroid ANT 99mTc"}
        assert fires(tmp_path, "SeriesDescription: {contains: ant}", header)
        assert fires(tmp_path, "SeriesDescription: {startswith: thyroid}", header)
        assert fires(tmp_path, "SeriesDescription: {endswith: 99MTC}", header)
        assert not fires(tmp_path, "SeriesDescription: {startswith: ant}", header)

    def test_regex_searches_ignoring_case(self, tmp_path: Path) -> None:
        when = 'StudyDescription: {regex: "thyr|schild|sköld"}'
        assert fires(tmp_path, when, {"StudyDescription": "SKÖLDKÖRTEL"})
        assert not fires(tmp_path, when, {"StudyDescription": "bone"})

    def test_regex_case_sensitive(self, tmp_path: Path) -> None:
        when = 'SeriesDescription: {regex: "^T1", case: sensitive}'
        assert fires(tmp_path, when, {"SeriesDescription": "T1 MPRAGE"})
        assert not fires(tmp_path, when, {"SeriesDescription": "t1 mprage"})

    def test_regex_is_linear_time(self) -> None:
        pattern = compile_regex("(a+)+$")
        assert pattern.search("a" * 50_000 + "!") is None  # would hang a backtracking engine


class TestOrderOperators:
    def test_lt_le_gt_ge_on_decimal_strings(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "SliceThickness: {le: 1.5}", {"SliceThickness": "1.25"})
        assert fires(tmp_path, "SliceThickness: {le: 1.5}", {"SliceThickness": "1.5"})
        assert not fires(tmp_path, "SliceThickness: {lt: 1.5}", {"SliceThickness": "1.5"})
        assert fires(tmp_path, "Rows: {gt: 128}", {"Rows": 256})
        assert fires(tmp_path, "Rows: {ge: 256}", {"Rows": "256"})

    def test_between_is_inclusive(self, tmp_path: Path) -> None:
        when = "SliceThickness: {between: [0.5, 1.5]}"
        assert fires(tmp_path, when, {"SliceThickness": "0.5"})
        assert fires(tmp_path, when, {"SliceThickness": 1.5})
        assert not fires(tmp_path, when, {"SliceThickness": "3"})

    def test_dates_compare_as_dates(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "StudyDate: {ge: 2024-01-01}", {"StudyDate": "20240315"})
        assert fires(tmp_path, "StudyDate: {lt: 20240101}", {"StudyDate": 20231231})
        assert not fires(tmp_path, "StudyDate: {gt: 2024-01-01}", {"StudyDate": "20231231"})

    def test_times_compare_as_times(self, tmp_path: Path) -> None:
        assert fires(tmp_path, 'StudyTime: {lt: "12:00"}', {"StudyTime": "083015.123"})
        assert not fires(tmp_path, 'StudyTime: {lt: "120000"}', {"StudyTime": "1300"})

    def test_datetime(self, tmp_path: Path) -> None:
        when = "AcquisitionDateTime: {ge: 20240101120000}"
        assert fires(tmp_path, when, {"AcquisitionDateTime": "20240101123000.5"})
        assert not fires(tmp_path, when, {"AcquisitionDateTime": "20231231"})

    def test_pydicom_datetime_conversion(self, tmp_path: Path) -> None:
        import pydicom.config

        old = pydicom.config.datetime_conversion
        pydicom.config.datetime_conversion = True
        try:
            ds = Dataset()
            ds.StudyDate = "20240315"
            ds.StudyTime = "083000"
            assert fires(tmp_path, "StudyDate: {between: [2024-03-01, 2024-03-31]}", ds)
            assert fires(tmp_path, 'StudyTime: {lt: "09:00"}', ds)
        finally:
            pydicom.config.datetime_conversion = old

    def test_unparseable_header_value_does_not_match(self, tmp_path: Path) -> None:
        assert not fires(tmp_path, "SliceThickness: {le: 1.5}", {"SliceThickness": "thin"})


class TestExistsNotAnyAll:
    def test_exists(self, tmp_path: Path) -> None:
        assert fires(tmp_path, "PatientID: {exists: true}", {"PatientID": "X"})
        assert not fires(tmp_path, "PatientID: {exists: true}", {"PatientID": ""})
        assert fires(tmp_path, "ContrastBolusAgent: {exists: false}", {})

    def test_missing_element_makes_conditions_false(self, tmp_path: Path) -> None:
        assert not fires(tmp_path, "Modality: {in: [NM]}", {})
        assert not fires(tmp_path, "Rows: {gt: 1}", {"Rows": None})

    def test_not_mapping_and_not_operator(self, tmp_path: Path) -> None:
        when = "not: {StudyDescription: {contains: parathyroid}}"
        assert fires(tmp_path, when, {"StudyDescription": "thyroid"})
        assert not fires(tmp_path, when, {"StudyDescription": "Parathyroid MIBI"})
        assert fires(tmp_path, when, {})  # missing -> inner false -> not true
        when = "SeriesDescription: {not: {contains: scout}}"
        assert not fires(tmp_path, when, {"SeriesDescription": "SCOUT"})

    def test_any_and_all_nest(self, tmp_path: Path) -> None:
        when = """
any:
  - BodyPartExamined: THYROID
  - all:
      - BodyPartExamined: NECK
      - SeriesDescription: {contains: thyroid}
"""
        assert fires(tmp_path, when, {"BodyPartExamined": "THYROID"})
        assert fires(tmp_path, when, {"BodyPartExamined": "NECK", "SeriesDescription": "Thyroid"})
        assert not fires(tmp_path, when, {"BodyPartExamined": "NECK", "SeriesDescription": "x"})

    def test_empty_when_matches_everything(self, tmp_path: Path) -> None:
        (tmp_path / "r.yaml").write_text(RULE.format(when="").replace("when:\n", "when: {}\n"))
        assert evaluate(load_rules(tmp_path), {}).matched


class TestMultiValued:
    def test_any_value_matches_by_default(self, tmp_path: Path) -> None:
        ds = Dataset()
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert fires(tmp_path, "ImageType: PRIMARY", ds)
        assert fires(tmp_path, "ImageType: PRIMARY", {"ImageType": r"ORIGINAL\PRIMARY"})
        assert fires(tmp_path, "ImageType: PRIMARY", {"ImageType": ["DERIVED", "PRIMARY"]})

    def test_all_values_with_all_true(self, tmp_path: Path) -> None:
        when = "ImageType: {all: true, in: [ORIGINAL, PRIMARY, AXIAL]}"
        assert fires(tmp_path, when, {"ImageType": ["ORIGINAL", "PRIMARY"]})
        assert not fires(tmp_path, when, {"ImageType": ["ORIGINAL", "LOCALIZER"]})


class TestSequences:
    def header(self) -> Dataset:
        ds = Dataset()
        first, second = Dataset(), Dataset()
        first.Radiopharmaceutical = "Tc-99m pertechnetate"
        second.Radiopharmaceutical = "I-123"
        ds.RadiopharmaceuticalInformationSequence = Sequence([first, second])
        return ds

    def test_item_index(self, tmp_path: Path) -> None:
        path = "RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical"
        assert fires(tmp_path, f"{path}: {{contains: pertechnetate}}", self.header())
        assert not fires(tmp_path, f"{path}: {{contains: I-123}}", self.header())
        assert not fires(tmp_path, path.replace("[0]", "[5]") + ": x", self.header())

    def test_any_item(self, tmp_path: Path) -> None:
        path = "RadiopharmaceuticalInformationSequence[*].Radiopharmaceutical"
        assert fires(tmp_path, f"{path}: {{contains: I-123}}", self.header())
        mapping = {"RadiopharmaceuticalInformationSequence": [{"Radiopharmaceutical": "I-123"}]}
        assert fires(tmp_path, f"{path}: I-123", mapping)

    def test_sequence_exists(self, tmp_path: Path) -> None:
        assert fires(
            tmp_path, "RadiopharmaceuticalInformationSequence: {exists: true}", self.header()
        )


class TestErrors:
    def test_unknown_keyword_suggests(self, tmp_path: Path) -> None:
        text = problems(tmp_path, "Modaliti: NM")
        assert (
            "r.yaml:4: rule 'r': unknown DICOM keyword 'Modaliti' (did you mean 'Modality'?)"
            in text
        )

    def test_unknown_operator_suggests_and_lists(self, tmp_path: Path) -> None:
        text = problems(tmp_path, "StudyDescription: {regexp: thyr}")
        assert "unknown operator 'regexp' (did you mean 'regex'?); operators: eq, in" in text

    def test_invalid_regex_with_line(self, tmp_path: Path) -> None:
        text = problems(tmp_path, "Modality: NM\nStudyDescription: {regex: '(a'}")
        assert "r.yaml:5: rule 'r': invalid regex '(a': missing )" in text

    def test_backreference_refused(self, tmp_path: Path) -> None:
        assert "invalid regex" in problems(tmp_path, r"StudyDescription: {regex: '(a)\1'}")

    @pytest.mark.parametrize(
        ("when", "message"),
        [
            ("SliceThickness: {le: thin}", "SliceThickness is a number (DS); 'thin' is not a num"),
            ("Modality: {lt: 5}", "'lt' compares numbers, dates and times; Modality (CS) is te"),
            ("StudyDate: {gt: yesterday}", "StudyDate is a date (DA); 'yesterday' is not a date"),
            ("Rows: {gt: .nan}", "Rows is a number (US); nan is not a number"),
            ("Modality: {in: CT}", "'in' takes a list of values"),
            ("Rows: {between: [5]}", "'between' takes [low, high]"),
            ("Rows: {between: [5, 1]}", "'between' needs low <= high"),
            ("PatientID: {exists: maybe}", "'exists' takes true or false"),
            ("StudyDescription: {contains: 5}", "'contains' takes text"),
            ("Modality: [NM, PT]", "a list is not a value for 'Modality': use {in: [...]}"),
            ("Modality:", "no value for 'Modality'"),
            ("Modality: true", "quote true/false/yes/no if you mean text"),
            ("Modality: {case: loud, eq: NM}", "'case' must be 'sensitive' or 'insensitive'"),
            ("ImageType: {all: yes, eq: X}", "'all' inside an operator mapping must be true"),
            ("Modality: {}", "no operator for 'Modality'"),
            ("regex: thyr", "unknown condition 'regex'"),
            ("modality: NM", "unknown condition 'modality' (did you mean 'Modality'?)"),
            ("MODALITY: NM", "unknown DICOM keyword 'MODALITY' (did you mean 'Modality'?)"),
            ("any: {Modality: NM}", "'any' takes a list of condition mappings"),
            ("Modality.Rows: 1", "'Modality' in 'Modality.Rows' is not a sequence"),
            ("Modality[0]: NM", "'Modality' is not a sequence (VR CS)"),
            (
                "RadiopharmaceuticalInformationSequence.Radiopharmaceutical: x",
                "needs an item: 'RadiopharmaceuticalInformationSequence[0]'",
            ),
            ("RadiopharmaceuticalInformationSequence: x", "is a sequence: test an item's keyword"),
            ("Modality-X: NM", "is not a keyword path"),
        ],
    )
    def test_messages(self, tmp_path: Path, when: str, message: str) -> None:
        assert message in problems(tmp_path, when)

    def test_nesting_limit(self, tmp_path: Path) -> None:
        when = "Modality: NM"
        for _ in range(20):
            when = "not:\n" + "\n".join("  " + line for line in when.splitlines())
        assert "nested deeper than 16 levels" in problems(tmp_path, when)


class TestKeywordPath:
    def test_parse_and_str(self) -> None:
        path = KeywordPath.parse("EnergyWindowInformationSequence[*].EnergyWindowName")
        assert str(path) == "EnergyWindowInformationSequence[*].EnergyWindowName"
        assert path.vr == "SH"

    def test_unknown(self) -> None:
        with pytest.raises(ConditionError, match=r"unknown DICOM keyword 'Rowz' \(did you mean"):
            KeywordPath.parse("Rowz")
