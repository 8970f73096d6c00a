"""Model references: one grammar for rules, the store, serving and the CLI."""

from __future__ import annotations

import pytest

from dicom_node.modelstore import ModelRef, ModelRefError, parse_model_ref
from dicom_node.routing.rules import parse_model_ref as rules_parse_model_ref


class TestParseModelRef:
    def test_forms(self) -> None:
        assert parse_model_ref("thyroid-seg@production") == ModelRef("thyroid-seg", "production")
        assert parse_model_ref("thyroid-seg:2").as_tuple() == ("thyroid-seg", None, "2")
        assert parse_model_ref(" thyroid-seg ").as_tuple() == ("thyroid-seg", "production", None)
        assert str(parse_model_ref("thyroid-seg:2.1")) == "thyroid-seg:2.1"

    @pytest.mark.parametrize("bad", ["a@b@c", "a:", "a@", "@x", "a@Prod", "a:b:c", "", "a b@x"])
    def test_bad(self, bad: str) -> None:
        with pytest.raises(ModelRefError, match=r"model must be '<model>@<alias>' or"):
            parse_model_ref(bad)

    def test_not_a_string(self) -> None:
        with pytest.raises(ModelRefError, match=r"got 5"):
            parse_model_ref(5)  # type: ignore[arg-type]

    def test_bare_name_refused_without_default(self) -> None:
        with pytest.raises(ModelRefError, match=r"got 'thyroid-seg'"):
            parse_model_ref("thyroid-seg", default_alias=None)

    def test_ref_needs_exactly_one_tag(self) -> None:
        with pytest.raises(ModelRefError, match="exactly one of alias and version"):
            ModelRef("a", alias="production", version="1")


class TestRulesUseTheSameGrammar:
    @pytest.mark.parametrize(
        "ref", ["thyroid-seg@production", "thyroid-seg:2", "m.x_1@canary", "a:1.0-rc"]
    )
    def test_same_answer(self, ref: str) -> None:
        assert rules_parse_model_ref(ref) == parse_model_ref(ref).as_tuple()

    @pytest.mark.parametrize("ref", ["thyroid-seg", "a@Prod", "a@b@c"])
    def test_rules_refuse_what_the_store_refuses_or_bare_names(self, ref: str) -> None:
        with pytest.raises(ValueError, match=r"model must be '<model>@<alias>'"):
            rules_parse_model_ref(ref)
