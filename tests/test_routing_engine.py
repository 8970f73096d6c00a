"""Evaluation: order, stop, discard, traces, real DICOM headers, explain and rule test cases."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from dicom_node.routing import RuleSet, evaluate, explain_paths, load_rules, run_cases
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series

REPO = Path(__file__).resolve().parents[1]

RULES = """\
rules:
  - name: ignore-seg
    priority: 1000
    when: {Modality: SEG}
    discard: true
  - name: thyroid
    priority: 100
    when:
      Modality: NM
      StudyDescription: {regex: "thyr|schild"}
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [pacs]
    stop: true
  - name: nm-research
    priority: 50
    when:
      Modality: NM
    model: research-seg:2
    send_to: [research]
  - name: ct-thin
    priority: 10
    when:
      Modality: CT
      SliceThickness: {le: 1.5}
    complete: {idle_seconds: 30}
    model: lung:1
    send_to: [pacs]
"""


@pytest.fixture
def ruleset(tmp_path: Path) -> RuleSet:
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "site.yaml").write_text(RULES)
    return load_rules(folder)


class TestEvaluate:
    def test_stop_ends_evaluation(self, ruleset: RuleSet) -> None:
        decision = evaluate(ruleset, {"Modality": "NM", "StudyDescription": "Thyroid"})
        assert decision.rule_names == ["thyroid"]
        assert [t.outcome for t in decision.trace] == [
            "failed",
            "fired",
            "not evaluated",
            "not evaluated",
        ]
        assert decision.jobs == decision.matched and not decision.discarded

    def test_rules_without_stop_all_fire(self, ruleset: RuleSet) -> None:
        decision = evaluate(ruleset, {"Modality": "NM", "StudyDescription": "Bone"})
        assert decision.rule_names == ["nm-research"]
        failed = decision.trace[1]
        assert (failed.rule, failed.outcome, failed.condition_line, failed.seen) == (
            "thyroid",
            "failed",
            10,
            "'Bone'",
        )
        assert failed.condition == "StudyDescription regex 'thyr|schild'"

    def test_discard(self, ruleset: RuleSet) -> None:
        decision = evaluate(ruleset, {"Modality": "SEG"})
        assert decision.discarded and decision.rule_names == ["ignore-seg"]
        assert decision.jobs == []

    def test_discard_below_a_firing_rule_cancels_it(self, tmp_path: Path) -> None:
        (tmp_path / "r.yaml").write_text(
            "rules:\n  - name: all-nm\n    priority: 9\n    when: {Modality: NM}\n"
            "    model: m@production\n    send_to: [pacs]\n"
            "  - name: no-test\n    when: {PatientID: {startswith: TEST}}\n    discard: true\n"
        )
        decision = evaluate(load_rules(tmp_path), {"Modality": "NM", "PatientID": "TEST1"})
        assert decision.rule_names == ["all-nm", "no-test"]
        assert decision.discarded and decision.jobs == []

    def test_nothing_matches_and_missing_value_is_shown(self, ruleset: RuleSet) -> None:
        decision = evaluate(ruleset, {"Modality": "CT"})
        assert decision.matched == [] and not decision.discarded
        assert decision.trace[-1].seen == "missing"
        assert decision.trace[-1].condition == "SliceThickness <= 1.5"

    def test_to_dict_is_json_and_can_drop_values(self, ruleset: RuleSet) -> None:
        decision = evaluate(ruleset, {"Modality": "CT", "SliceThickness": "1.0"})
        data = json.loads(json.dumps(decision.to_dict()))
        assert data["matched"][0] == {
            "name": "ct-thin",
            "priority": 10,
            "file": "site.yaml",
            "line": 21,
            "model": "lung:1",
            "send_to": ["pacs"],
            "complete": {"instances": None, "idle_seconds": 30},
            "stop": False,
            "discard": False,
        }
        assert data["version"] == ruleset.version
        assert all("seen" not in t for t in decision.to_dict(include_values=False)["trace"])

    def test_identifying_values_hidden_unless_revealed(self, tmp_path: Path) -> None:
        (tmp_path / "t.yaml").write_text(
            "rules:\n  - name: test-patients\n    when: {PatientID: {startswith: TEST}}\n"
            "    discard: true\n"
        )
        decision = evaluate(load_rules(tmp_path), {"PatientID": "12345"})
        assert decision.to_dict()["trace"][0]["seen"] == "(identifying value hidden)"
        assert decision.to_dict(reveal=True)["trace"][0]["seen"] == "'12345'"

    def test_real_dataset_header(self, ruleset: RuleSet, tmp_path: Path) -> None:
        ds = make_nm(rows=16, cols=16, StudyDescription="Schilddrüse")
        path = write_series([ds], tmp_path / "nm")[0]
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert evaluate(ruleset, header).rule_names == ["thyroid"]

    def test_wrong_header_type(self, ruleset: RuleSet) -> None:
        with pytest.raises(TypeError, match="header must be a pydicom Dataset or a mapping"):
            evaluate(ruleset, "NM")  # type: ignore[arg-type]


class TestExplain:
    def test_series_grouped_from_real_files(self, ruleset: RuleSet, tmp_path: Path) -> None:
        data = tmp_path / "data"
        write_series([make_nm(rows=16, cols=16, seed=1, StudyDescription="Thyroid")], data / "nm")
        write_series(
            make_ct_series(n_slices=3, rows=16, cols=16, seed=2, SliceThickness="1.0"), data / "ct"
        )
        (data / "notes.txt").write_text("not dicom")
        explanations, skipped = explain_paths(ruleset, [data])
        assert skipped == [data / "notes.txt"]
        by_modality = {e.modality: e for e in explanations}
        assert by_modality["NM"].decision.rule_names == ["thyroid"]
        assert by_modality["CT"].decision.rule_names == ["ct-thin"]
        assert len(by_modality["CT"].files) == 3
        assert json.loads(json.dumps(by_modality["CT"].to_dict()))["instances"] == 3

    def test_missing_path(self, ruleset: RuleSet, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            explain_paths(ruleset, [tmp_path / "nope"])


class TestRuleCases:
    def test_shipped_cases_pass(self) -> None:
        folder = REPO / "rules"
        results, problems = run_cases(load_rules(folder), folder)
        assert problems == []
        assert len(results) >= 10
        failed = [r.to_dict() for r in results if not r.passed]
        assert failed == []
        assert {r.expected for r in results} == {("thyroid-scintigraphy",), ()}

    def test_failures_and_case_errors(self, ruleset: RuleSet, tmp_path: Path) -> None:
        folder = tmp_path / "rules"
        (folder / "tests").mkdir()
        (folder / "tests" / "t.yaml").write_text("""\
cases:
  - name: wrong expectation
    header: {Modality: NM}
    expect: thyroid
  - name: typo in header
    header: {Modalty: NM}
    expect: none
  - name: unknown rule
    header: {Modality: NM}
    expect: thyroide
  - name: two rules
    header: {Modality: NM, StudyDescription: Bone}
    expect: [nm-research]
  - name: no header
    expect: none
  - name: missing file
    file: nope.dcm
    expect: none
""")
        results, problems = run_cases(ruleset, folder)
        assert problems == []
        outcome = {r.name: (r.passed, r.error, r.got) for r in results}
        assert outcome["wrong expectation"] == (False, None, ("nm-research",))
        assert (
            "unknown DICOM keyword 'Modalty' in header (did you mean 'Modality'?)"
            in outcome["typo in header"][1]
        )
        assert (
            "expects rule 'thyroide', which is not in the rule set (did you mean "
            "'thyroid'?)" in outcome["unknown rule"][1]
        )
        assert outcome["two rules"][0]
        assert "give exactly one of 'header'" in outcome["no header"][1]
        assert "cannot read DICOM file" in outcome["missing file"][1]
        assert results[0].line == 2

    def test_unreadable_test_file(self, ruleset: RuleSet, tmp_path: Path) -> None:
        folder = tmp_path / "rules"
        (folder / "tests").mkdir()
        (folder / "tests" / "t.yaml").write_text("cases: [\n")
        results, problems = run_cases(ruleset, folder)
        assert results == [] and "cannot read test file" in problems[0].message
