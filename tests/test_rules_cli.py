"""``rules check | explain | test``: exit codes and output, in-process and as a process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dicom_node.routing.cli import _files_model_exists, rules
from tests.helpers.dicom_factory import make_ct_series, make_nm, write_series
from tests.helpers.onnx_models import make_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site folder: node.yaml (destination pacs), rules/ (shipped rules + tests), models/."""
    shutil.copytree(REPO / "rules", tmp_path / "rules", ignore=shutil.ignore_patterns("examples"))
    make_store(tmp_path / "models", versions=["1"], production="1", size=(32, 32))
    (tmp_path / "node.yaml").write_text(
        "rules: rules\nmodels: models\ndestinations:\n"
        "  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}\n"
    )
    return tmp_path


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(rules, [str(a) for a in args], catch_exceptions=False)


class TestCheck:
    def test_valid_site(self, site: Path) -> None:
        result = invoke("check", "--config", site / "node.yaml")
        assert result.exit_code == 0, result.output
        assert "OK: 1 rule(s) in 1 file(s), rule set " in result.output

    def test_each_problem_names_file_line_rule(self, site: Path) -> None:
        text = (site / "rules" / "thyroid.yaml").read_text()
        text = text.replace("Modality: NM", "Modaliti: NM").replace("[pacs]", "[pcas]")
        (site / "rules" / "thyroid.yaml").write_text(text)
        result = invoke("check", "--config", site / "node.yaml")
        assert result.exit_code == 1
        assert (
            "rules/thyroid.yaml:13: rule 'thyroid-scintigraphy': unknown DICOM keyword "
            "'Modaliti' (did you mean 'Modality'?)" in result.output
        )
        assert (
            "unknown destination 'pcas' (did you mean 'pacs'?); configured: pacs" in result.output
        )
        assert "2 problem(s)" in result.output

    def test_unknown_model_alias_in_store(self, site: Path) -> None:
        text = (site / "rules" / "thyroid.yaml").read_text()
        (site / "rules" / "thyroid.yaml").write_text(text.replace("@production", "@canary"))
        result = invoke("check", "--config", site / "node.yaml")
        assert result.exit_code == 1
        assert "unknown model 'thyroid-seg@canary'" in result.output
        assert invoke("check", "--config", site / "node.yaml", "--skip-models").exit_code == 0

    def test_rules_folder_as_argument_and_option(self, site: Path) -> None:
        shutil.rmtree(site / "models")
        result = invoke("check", site / "rules", "--config", site / "node.yaml")
        assert result.exit_code == 1 and "no model 'thyroid-seg'" in result.output
        result = invoke("check", "--rules", site / "rules", "--skip-models")
        assert result.exit_code == 0

    def test_yml_files_are_pointed_out(self, site: Path) -> None:
        (site / "rules" / "ct.yml").write_text("rules: []\n")
        result = invoke("check", "--config", site / "node.yaml")
        assert "ct.yml is not read: rule files end in .yaml" in result.output

    def test_bad_config_exits_2(self, site: Path) -> None:
        (site / "node.yaml").write_text("port: many\n")
        result = CliRunner().invoke(rules, ["check", "--config", str(site / "node.yaml")])
        assert result.exit_code == 2


class TestExplain:
    def test_readable_output_on_real_files(self, site: Path) -> None:
        data = site / "data"
        write_series(
            [
                make_nm(
                    rows=16,
                    cols=16,
                    seed=3,
                    StudyDescription="Bone scan",
                    SeriesDescription="ANT",
                    BodyPartExamined="WHOLEBODY",
                )
            ],
            data / "bone",
        )
        write_series(
            [make_nm(rows=16, cols=16, seed=4, StudyDescription="Thyroid")], data / "thyroid"
        )
        result = invoke("explain", "--config", site / "node.yaml", data)
        assert result.exit_code == 0, result.output
        assert "✔ thyroid-scintigraphy" in result.output
        assert "model: thyroid-seg@production" in result.output
        assert "send to: pacs" in result.output and "complete: after 1 instance(s)" in result.output
        assert "✘ thyroid-scintigraphy" in result.output
        assert "saw: 'WHOLEBODY'; 'Bone scan'; 'ANT'" in result.output
        assert "no rule fires" in result.output

    def test_json(self, site: Path) -> None:
        data = site / "ct"
        write_series(make_ct_series(n_slices=2, rows=16, cols=16, seed=5), data)
        result = invoke("explain", "--json", "--rules", site / "rules", data)
        assert result.exit_code == 0
        out = json.loads(result.output)
        assert out["series"][0]["instances"] == 2
        trace = out["series"][0]["decision"]["trace"][0]
        assert (trace["rule"], trace["outcome"], trace["seen"]) == (
            "thyroid-scintigraphy",
            "failed",
            "'CT'",
        )

    def test_invalid_rules_exit_1(self, site: Path) -> None:
        (site / "rules" / "bad.yaml").write_text("rules: [")
        result = invoke("explain", "--rules", site / "rules", REPO / "rules" / "tests")
        assert result.exit_code == 1 and "YAML syntax error" in result.output


class TestTest:
    def test_shipped_cases_pass(self, site: Path) -> None:
        result = invoke("test", "--config", site / "node.yaml")
        assert result.exit_code == 0, result.output
        assert "PASS French, NECK, unaccented" in result.output
        assert " passed, 0 failed" in result.output

    def test_failing_case_exits_1_with_explanation(self, site: Path) -> None:
        (site / "rules" / "tests" / "mine.yaml").write_text(
            "cases:\n  - name: bone scan is thyroid?\n"
            "    header: {Modality: NM, StudyDescription: Bone}\n"
            "    expect: thyroid-scintigraphy\n"
        )
        result = invoke("test", "--rules", site / "rules")
        assert result.exit_code == 1
        assert "FAIL bone scan is thyroid?" in result.output
        assert "expected: thyroid-scintigraphy; got: none" in result.output
        assert "saw: missing; 'Bone'" in result.output
        assert "1 failed" in result.output


class TestModelExistsFallback:
    def test_files_model_exists(self, tmp_path: Path) -> None:
        store = make_store(tmp_path / "models", versions=["1"], production="1", size=(32, 32))
        exists = _files_model_exists(store)
        assert exists("thyroid-seg@production") == (True, "")
        assert exists("thyroid-seg:1") == (True, "")
        assert exists("thyroid-seg@shadow")[0] is False
        assert "no version '7'" in exists("thyroid-seg:7")[1]
        assert "no model 'lung'" in exists("lung@production")[1]


def test_as_a_process(site: Path) -> None:
    """``python -m dicom_node.routing.cli`` runs the same group (what ``dicom-node rules`` is)."""
    base = [sys.executable, "-m", "dicom_node.routing.cli"]
    ok = subprocess.run(
        [*base, "check", "--config", str(site / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=site,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK: 1 rule(s)" in ok.stdout
    tested = subprocess.run(
        [*base, "test", "--config", str(site / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=site,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    (site / "rules" / "thyroid.yaml").write_text("rules:\n  - name: x\n    when: {Rowz: 1}\n")
    bad = subprocess.run(
        [*base, "check", "--config", str(site / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=site,
        timeout=120,
    )
    assert bad.returncode == 1
    assert "rules/thyroid.yaml:3: rule 'x': unknown DICOM keyword 'Rowz'" in bad.stdout
