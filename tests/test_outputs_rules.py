"""A rule's ``outputs:``: parsed by the loader, checked by the Rule, [seg] by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.routing.loader import load_rules
from dicom_node.routing.rules import RulesError

BASE = "rules:\n  - name: a\n    when: {}\n    model: x@y\n    send_to: [pacs]\n"


def load(tmp_path: Path, extra: str) -> object:
    (tmp_path / "r.yaml").write_text(BASE + extra)
    return load_rules(tmp_path)


class TestRuleOutputs:
    def test_default_is_seg(self, tmp_path: Path) -> None:
        rule = load(tmp_path, "").rules[0]  # type: ignore[attr-defined]
        assert rule.outputs == ("seg",)
        assert "outputs" not in rule.to_dict()

    def test_listed_outputs_in_order(self, tmp_path: Path) -> None:
        rule = load(tmp_path, "    outputs: [seg, overlay, report]\n").rules[0]  # type: ignore[attr-defined]
        assert rule.outputs == ("seg", "overlay", "report")
        assert rule.to_dict()["outputs"] == ["seg", "overlay", "report"]

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (
                "    outputs: [seg, overlya]\n",
                r"r.yaml:6: rule 'a': unknown output 'overlya' \(did "
                r"you mean 'overlay'\?\); allowed: seg, overlay, gsps, report",
            ),
            ("    outputs: overlay\n", "'outputs' must be a list of seg, overlay, gsps, report"),
            ("    outputs: []\n", "'outputs' must be a list of seg, overlay, gsps, report"),
            ("    outputs: [seg, seg]\n", r"'outputs' lists an output twice: \['seg', 'seg'\]"),
            ("    outputs: [report]\n", "'report' without 'seg'"),
        ],
    )
    def test_bad_outputs_are_problems(self, tmp_path: Path, extra: str, message: str) -> None:
        with pytest.raises(RulesError, match=message):
            load(tmp_path, extra)

    def test_discard_rule_refuses_outputs(self, tmp_path: Path) -> None:
        (tmp_path / "r.yaml").write_text(
            "rules:\n  - name: a\n    when: {}\n    discard: true\n    outputs: [overlay]\n"
        )
        with pytest.raises(RulesError, match="'outputs' has no effect on a discard rule"):
            load_rules(tmp_path)
