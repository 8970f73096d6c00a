"""Loading rule folders: rule-level checks, file handling, cross-rule checks, shipped files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from dicom_node.routing import (
    Completion,
    Problem,
    RulesError,
    check_rules,
    load_rules,
    rules_digest,
)
from dicom_node.routing.loader import MAX_FILE_BYTES

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
rules:
  - name: {name}
    priority: {priority}
    when:
      Modality: {modality}
    complete: {{instances: 1}}
    model: thyroid-seg@production
    send_to: [pacs]
    stop: {stop}
"""


def good(name: str = "a", priority: int = 0, modality: str = "NM", stop: str = "false") -> str:
    return GOOD.format(name=name, priority=priority, modality=modality, stop=stop)


def messages(folder: Path, **kwargs: object) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(folder, **kwargs)  # type: ignore[arg-type]
    assert info.value.problems, "RulesError without problems"
    return [str(p) for p in info.value.problems]


class TestRuleFields:
    def test_values_and_defaults(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good(priority=7, stop="true"))
        rule = load_rules(tmp_path).rules[0]
        assert (rule.name, rule.priority, rule.file, rule.line) == ("a", 7, "a.yaml", 2)
        assert rule.complete == Completion(instances=1, idle_seconds=None)
        assert (rule.model, rule.send_to, rule.stop, rule.discard) == (
            "thyroid-seg@production",
            ("pacs",),
            True,
            False,
        )

    def test_complete_defaults_to_node_idle(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good().replace("    complete: {instances: 1}\n", ""))
        assert load_rules(tmp_path).rules[0].complete == Completion(None, None)

    def test_discard_rule_stops(self, tmp_path: Path) -> None:
        (tmp_path / "d.yaml").write_text(
            "rules:\n  - name: d\n    when: {Modality: SEG}\n    discard: true\n"
        )
        rule = load_rules(tmp_path).rules[0]
        assert rule.discard and rule.stop and rule.model is None

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (
                "  - name: a\n    when: {}\n    modle: x@y\n    send_to: [pacs]\n",
                "a.yaml:4: rule 'a': unknown key 'modle' (did you mean 'model'?); a rule may have: "
                "name, priority",
            ),
            (
                "  - when: {}\n    model: x@y\n    send_to: [pacs]\n",
                "a.yaml:2: missing required key 'name'",
            ),
            (
                "  - name: a\n    model: x@y\n    send_to: [pacs]\n",
                "missing required key 'when' (use 'when: {}' to match every series)",
            ),
            (
                "  - name: a\n    when:\n    model: x@y\n    send_to: [pacs]\n",
                "'when' is empty; write 'when: {}'",
            ),
            (
                "  - name: a\n    when: {}\n    model: x\n    send_to: [pacs]\n",
                "a.yaml:4: rule 'a': model must be '<model>@<alias>' or '<model>:<version>'",
            ),
            (
                "  - name: a\n    when: {}\n    send_to: [pacs]\n",
                "a rule needs 'model: <model>@<alias>' or 'discard: true'",
            ),
            ("  - name: a\n    when: {}\n    model: x@y\n", "'send_to' is required with 'model'"),
            (
                "  - name: a\n    when: {}\n    model: x@y\n    send_to: pacs\n",
                "'send_to' must be a list of destination names, e.g. [pacs]",
            ),
            (
                "  - name: a\n    when: {}\n    model: x@y\n    discard: true\n",
                "either 'model' or 'discard: true', not both",
            ),
            (
                "  - name: a\n    when: {}\n    discard: true\n    stop: false\n",
                "a discard rule always stops; remove 'stop: false'",
            ),
            (
                "  - name: a\n    when: {}\n    discard: true\n    complete: {instances: 1}\n",
                "'complete' has no effect on a discard rule",
            ),
            (
                "  - name: a\n    priority: high\n    when: {}\n    discard: true\n",
                "a.yaml:3: rule 'a': 'priority' must be a whole number, got 'high'",
            ),
            (
                "  - name: a\n    when: {}\n    discard: yes\n",
                "'discard' must be true or false, got 'yes'",
            ),
            (
                "  - name: a b\n    when: {}\n    discard: true\n",
                "name must be 1-64 letters, digits",
            ),
            ("  - name: none\n    when: {}\n    discard: true\n", "name 'none' is reserved"),
            (
                "  - name: a\n    when: {}\n    model: x@y\n    send_to: [pacs]\n"
                "    complete: {instance: 1}\n",
                "unknown key 'instance' in 'complete' (did you mean 'instances'?)",
            ),
            (
                "  - name: a\n    when: {}\n    model: x@y\n    send_to: [pacs]\n"
                "    complete: {instances: 0}\n",
                "instances must be a whole number >= 1",
            ),
            (
                "  - name: a\n    when: {}\n    model: x@y\n    send_to: [pacs]\n"
                "    complete: {idle_seconds: -1}\n",
                "idle_seconds must be a number of seconds > 0",
            ),
            ("  - just text\n", "each rule must be a mapping"),
        ],
    )
    def test_messages(self, tmp_path: Path, text: str, message: str) -> None:
        (tmp_path / "a.yaml").write_text("rules:\n" + text)
        found = messages(tmp_path)
        assert any(message in m for m in found), found


class TestFiles:
    def test_yaml_syntax_error_has_line(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text("rules:\n  - name: a\n    when: {Modality: NM\n")
        assert re.match(r"^.*a\.yaml:\d+: YAML syntax error", messages(tmp_path)[0])

    def test_duplicate_yaml_key(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good() + "    stop: true\n")
        assert "duplicate key" in messages(tmp_path)[0]

    def test_unknown_top_level_key_and_missing_rules(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text("rule:\n  - name: a\n")
        assert "unknown top-level key 'rule' (did you mean 'rules'?)" in messages(tmp_path)[0]
        (tmp_path / "a.yaml").write_text("- name: a\n")
        assert "a rule file must be a mapping with a 'rules:' list" in messages(tmp_path)[0]

    def test_empty_file_has_no_rules(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text("# nothing yet\n")
        assert len(load_rules(tmp_path)) == 0

    def test_size_limit(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good() + "#" * MAX_FILE_BYTES)
        assert f"rule files are limited to {MAX_FILE_BYTES} bytes" in messages(tmp_path)[0]

    def test_not_utf8(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_bytes(b"rules: []\n# \xff\xfe\n")
        assert messages(tmp_path) == [f"{tmp_path / 'a.yaml'}:2: file is not UTF-8 text"]

    def test_missing_folder(self, tmp_path: Path) -> None:
        assert "rules folder does not exist" in messages(tmp_path / "nope")[0]

    def test_only_top_level_yaml_files_are_read(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good("a"))
        for sub in ("examples", "tests"):
            (tmp_path / sub).mkdir()
            (tmp_path / sub / "x.yaml").write_text("not: [valid")
        (tmp_path / "b.yml").write_text(good("b"))
        (tmp_path / ".c.yaml").write_text("broken: [")
        ruleset = load_rules(tmp_path)
        assert [r.name for r in ruleset.rules] == ["a"]
        assert ruleset.files == ("a.yaml",)

    def test_problems_from_all_files_are_reported(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good("a", modality="NM").replace("Modality", "Modaliti"))
        (tmp_path / "b.yaml").write_text(good("b").replace("model:", "modle:"))
        found = messages(tmp_path)
        assert any("a.yaml:5" in m for m in found) and any("b.yaml:7" in m for m in found)

    def test_alias_bomb_is_bounded(self, tmp_path: Path) -> None:
        lines = ["rules:", "  - name: a", "    when:", "      any:", "        - &a0 {Modality: NM}"]
        for i in range(1, 12):
            prev = f"*a{i - 1}"
            lines.append(f"        - &a{i} {{any: [{', '.join([prev] * 10)}]}}")
        lines += ["    model: x@y", "    send_to: [pacs]"]
        (tmp_path / "a.yaml").write_text("\n".join(lines) + "\n")
        found = messages(tmp_path)
        assert any("expands the document to more than" in m for m in found), found


class TestCrossChecks:
    def test_order_priority_file_position(self, tmp_path: Path) -> None:
        (tmp_path / "b.yaml").write_text(good("b1", 5) + good("b2", 5).replace("rules:\n", ""))
        (tmp_path / "a.yaml").write_text(
            good("a1", 5, modality="CT") + good("a2", 9, modality="MR").replace("rules:\n", "")
        )
        names = [r.name for r in load_rules(tmp_path).rules]
        assert names == ["a2", "a1", "b1", "b2"]

    def test_duplicate_names_across_files(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good("same"))
        (tmp_path / "b.yaml").write_text(good("same", modality="CT"))
        found = messages(tmp_path)
        assert found == [
            f"{tmp_path / 'b.yaml'}:2: rule 'same': duplicate rule name; first "
            f"defined at {tmp_path / 'a.yaml'}:2"
        ]

    def test_shadowed_by_identical_stop_rule(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(
            good("upper", 10, stop="true") + good("lower", 5).replace("rules:\n", "")
        )
        found = messages(tmp_path)
        assert len(found) == 1
        assert "rule 'lower': can never fire: rule 'upper'" in found[0]

    def test_shadowed_by_catch_all_discard(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(
            good("lower") + "  - name: all\n    priority: 1\n    when: {}\n    discard: true\n"
        )
        assert "rule 'lower': can never fire: rule 'all'" in messages(tmp_path)[0]

    def test_not_shadowed(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(
            good("upper", 10, stop="true")
            + good("lower", 5, modality="CT").replace("rules:\n", "")
            + good("nostop", 20).replace("rules:\n", "").replace("name: nostop", "name: nostop")
        )
        assert [r.name for r in load_rules(tmp_path).rules] == ["nostop", "upper", "lower"]

    def test_subset_of_conditions_shadows(self, tmp_path: Path) -> None:
        text = good("upper", 10, stop="true") + good("lower", 5).replace("rules:\n", "").replace(
            "      Modality: NM\n", "      Modality: NM\n      Rows: 256\n"
        )
        (tmp_path / "a.yaml").write_text(text)
        assert "rule 'lower': can never fire" in messages(tmp_path)[0]

    def test_unknown_destination(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good().replace("[pacs]", "[pcas]"))
        found = messages(tmp_path, destinations={"pacs", "archive"})
        assert (
            "a.yaml:8: rule 'a': unknown destination 'pcas' (did you mean 'pacs'?); "
            "configured: archive, pacs" in found[0]
        )
        assert load_rules(tmp_path, destinations=None)

    def test_unknown_model(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good())

        def model_exists(ref: str) -> tuple[bool, str]:
            return False, "no alias 'production'"

        found = messages(tmp_path, model_exists=model_exists)
        assert (
            "a.yaml:7: rule 'a': unknown model 'thyroid-seg@production': no alias "
            "'production'" in found[0]
        )

    def test_model_store_that_raises_is_a_problem(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good())

        def model_exists(ref: str) -> tuple[bool, str]:
            raise OSError("disk gone")

        assert "model store error: disk gone" in messages(tmp_path, model_exists=model_exists)[0]

    def test_check_agrees_and_sorts(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good().replace("Modality", "Modaliti"))
        assert [str(p) for p in check_rules(tmp_path)] == messages(tmp_path)
        assert isinstance(check_rules(tmp_path)[0], Problem)


class TestVersion:
    def test_version_is_content_hash(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(good())
        first = load_rules(tmp_path).version
        assert first == rules_digest(tmp_path) and len(first) == 12
        (tmp_path / "a.yaml").write_text(good() + "# comment\n")
        assert load_rules(tmp_path).version != first


class TestShipped:
    def test_shipped_rules_load_with_store_check_skipped(self) -> None:
        ruleset = load_rules(REPO / "rules", destinations={"pacs"})
        rule = ruleset.get("thyroid-scintigraphy")
        assert rule is not None and rule.model == "thyroid-seg@production"
        assert rule.complete.instances == 1 and rule.send_to == ("pacs",)

    @pytest.mark.parametrize("name", ["ct-chest-thin.yaml", "mr-brain.yaml", "discard.yaml"])
    def test_examples_are_valid(self, tmp_path: Path, name: str) -> None:
        shutil.copy(REPO / "rules" / "examples" / name, tmp_path / name)
        assert len(load_rules(tmp_path, destinations={"pacs"})) >= 1

    def test_readme_yaml_blocks_are_valid_rules(self, tmp_path: Path) -> None:
        text = (REPO / "rules" / "README.md").read_text()
        blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
        rule_blocks = [b for b in blocks if b.lstrip().startswith("rules:")]
        assert len(rule_blocks) >= 6
        for i, block in enumerate(rule_blocks):
            folder = tmp_path / str(i)
            folder.mkdir()
            (folder / "r.yaml").write_text(block)
            load_rules(folder, destinations={"pacs"})

    def test_readme_test_case_blocks_run(self, tmp_path: Path) -> None:
        from dicom_node.routing import run_cases

        text = (REPO / "rules" / "README.md").read_text()
        blocks = [
            b
            for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
            if b.lstrip().startswith("cases:")
        ]
        assert blocks
        folder = tmp_path / "rules"
        shutil.copytree(REPO / "rules", folder, ignore=shutil.ignore_patterns("*.md"))
        shutil.rmtree(folder / "tests")
        (folder / "tests").mkdir()
        shutil.copytree(REPO / "rules" / "tests" / "samples", folder / "tests" / "samples")
        (folder / "tests" / "readme.yaml").write_text(blocks[0])
        results, problems = run_cases(load_rules(folder), folder)
        assert problems == [] and results
        assert [r.to_dict() for r in results if not r.passed] == []
