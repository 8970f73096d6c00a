"""``on_low_confidence`` in the rules, and the ``held`` state with release and discard.

The rule key is checked like ``outputs`` (a bad value is a problem with its file, line and a
"did you mean"); a held job keeps its results until ``release`` exports them or ``discard``
ends it skipped, saying why; a late instance re-opens it like a finished job. The whole path
through a running node is tests/test_confidence_node.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicom_node.cli import main as cli
from dicom_node.jobs import TRANSITIONS, JobState, JobStore, Route, SegResult, TransitionError
from dicom_node.jobs.records import Instance
from dicom_node.routing import load_rules
from dicom_node.routing.rules import RulesError
from tests.conftest import config_file, make_config, write_rules

RULE = """\
rules:
  - name: thyroid
    when:
      Modality: NM
    model: thyroid-seg@production
    send_to: [pacs]
    outputs: [seg, overlay]
    on_low_confidence: %s
"""


def _load(tmp_path: Path, text: str) -> object:
    write_rules(tmp_path / "rules", text)
    return load_rules(tmp_path / "rules", destinations={"pacs"})


class TestRuleKey:
    @pytest.mark.parametrize("action", ["send", "hold", "discard"])
    def test_each_action_is_read(self, tmp_path: Path, action: str) -> None:
        rules = _load(tmp_path, RULE % action)
        (rule,) = rules.rules  # type: ignore[attr-defined]
        assert rule.on_low_confidence == action
        shown = rule.to_dict()
        assert shown.get("on_low_confidence") == (None if action == "send" else action)

    def test_default_is_send(self, tmp_path: Path) -> None:
        text = "\n".join(line for line in RULE.splitlines() if "on_low" not in line)
        (rule,) = _load(tmp_path, text).rules  # type: ignore[attr-defined]
        assert rule.on_low_confidence == "send"

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            ("hodl", "got 'hodl' (did you mean 'hold'?)"),
            ("[hold]", "got ['hold']"),
            ("true", "got True"),
        ],
    )
    def test_a_bad_value_names_file_line_and_choices(
        self, tmp_path: Path, value: str, message: str
    ) -> None:
        with pytest.raises(RulesError) as caught:
            _load(tmp_path, RULE % value)
        (problem,) = caught.value.problems
        assert problem.line == 8 and problem.rule == "thyroid"
        assert problem.message.startswith("'on_low_confidence' must be one of send, hold, discard")
        assert message in problem.message
        assert "rules.yaml:8: rule 'thyroid': 'on_low_confidence' must be" in str(problem)

    def test_rules_explain_says_what_a_low_confidence_result_gets(self, tmp_path: Path) -> None:
        write_rules(tmp_path / "rules", RULE % "hold")
        image = Path(__file__).resolve().parents[1] / "models/thyroid-seg/1/reference/case0001"
        out = CliRunner().invoke(
            cli, ["rules", "explain", "--rules", str(tmp_path / "rules"), str(image / "image.dcm")]
        )
        assert out.exit_code == 0, out.output
        assert "if the model flags low confidence: hold" in out.output

    def test_a_discard_rule_refuses_it(self, tmp_path: Path) -> None:
        text = """\
rules:
  - name: drop
    when: {Modality: SR}
    discard: true
    on_low_confidence: hold
"""
        with pytest.raises(RulesError, match="'on_low_confidence' has no effect on a discard"):
            _load(tmp_path, text)


@pytest.fixture
def store(tmp_path: Path, store_url: str) -> Iterator[JobStore]:
    """The job store on SQLite, then on PostgreSQL (``store_url`` of tests/conftest.py)."""
    s = JobStore.open(tmp_path / "var", store_url)
    yield s
    s.close()


def _instance(sop: str, series: str = "1.2.3.4") -> Instance:
    return Instance(
        sop,
        "1.2.840.10008.5.1.4.1.1.20",
        "1.2.3",
        series,
        "NM",
        f"spool/1.2.3/{series}/{sop}.dcm",
        100,
        "SCU",
        "1.2.840.10008.1.2.1",
        time.time(),
    )


def _held(store: JobStore) -> int:
    store.record_instance(_instance("1.1"))
    (job,) = store.jobs_in(JobState.RECEIVED)
    route = Route(rule="thyroid", model_ref="m@production", destinations=("pacs",))
    assert store.route(job.id, [route], "v")
    assert store.queue(job.id, 1)
    claimed = store.claim()
    assert claimed is not None
    store.used_instances(job.id, 1)
    results = [SegResult(0, "results/x/seg.dcm", "1.9"), SegResult(1, "results/x/o.dcm", "1.8")]
    store.hold(
        job.id,
        "results/x/seg.dcm",
        "1.9",
        "held: low confidence (matrix 1024x256 outside training range (rows 128-256)); "
        f"release with 'dicom-node release {job.id}' or drop with 'dicom-node discard {job.id}'",
        {"outputs": ["seg", "overlay"], "confidence": {"low": True}},
        results,
    )
    return job.id


class TestHeldState:
    def test_the_table_has_the_held_edges(self) -> None:
        assert JobState.HELD in TRANSITIONS[JobState.RUNNING]
        assert TRANSITIONS[JobState.HELD] == {
            JobState.EXPORTING,
            JobState.SKIPPED,
            JobState.ROUTED,
        }
        assert JobState.HELD not in TRANSITIONS[JobState.EXPORTING]

    def test_a_held_job_keeps_its_results_and_is_not_claimed(self, store: JobStore) -> None:
        job_id = _held(store)
        job = store.get(job_id)
        assert job is not None and job.state is JobState.HELD and job.lease_until is None
        assert [r.path for r in store.results(job_id)] == ["results/x/seg.dcm", "results/x/o.dcm"]
        assert store.claim() is None  # nothing to do until a person decides
        assert store.counts()["held"] == 1

    def test_release_makes_it_due_for_export(self, store: JobStore) -> None:
        job_id = _held(store)
        job = store.release_held(job_id)
        assert job.state is JobState.EXPORTING
        assert job.outcome is not None and job.outcome.startswith("released from hold (held:")
        claimed = store.claim()
        assert claimed is not None and claimed.id == job_id and claimed.details is not None
        assert claimed.details["outputs"] == ["seg", "overlay"]

    def test_discard_ends_it_skipped_with_the_reasons(self, store: JobStore) -> None:
        job_id = _held(store)
        job = store.discard_held(job_id)
        assert job.state is JobState.SKIPPED and job.finished_at is not None
        assert job.outcome == (
            "discarded: low confidence (matrix 1024x256 outside training range (rows 128-256)) "
            "(dicom-node discard)"
        )

    def test_only_held_jobs_can_be_released_or_discarded(self, store: JobStore) -> None:
        job_id = _held(store)
        store.discard_held(job_id)
        with pytest.raises(TransitionError, match="is skipped, only held jobs can be released"):
            store.release_held(job_id)
        with pytest.raises(KeyError, match="no job with id 99"):
            store.discard_held(99)

    def test_a_late_instance_reopens_a_held_job(self, store: JobStore) -> None:
        job_id = _held(store)
        store.record_instance(_instance("1.2"))
        job = store.get(job_id)
        assert job is not None and job.state is JobState.ROUTED
        assert job.seg_path is None and job.outcome == "re-opened: new instance"

    def test_discard_running_ends_skipped_without_export(self, store: JobStore) -> None:
        store.record_instance(_instance("1.1"))
        (job,) = store.jobs_in(JobState.RECEIVED)
        route = Route(rule="thyroid", model_ref="m@production", destinations=("pacs",))
        assert store.route(job.id, [route], "v") and store.queue(job.id, 1)
        assert store.claim() is not None
        store.discard_running(job.id, "discarded: low confidence (x)", {"confidence": {}})
        done = store.get(job.id)
        assert done is not None and done.state is JobState.SKIPPED
        assert done.outcome == "discarded: low confidence (x)" and done.seg_path is None


class TestCli:
    def test_release_and_discard_verbs(self, tmp_path: Path, store: JobStore) -> None:
        database = store.engine.url.render_as_string(hide_password=False)
        config = make_config(
            tmp_path, tmp_path / "models", tmp_path / "rules", 104, database=database
        )
        path = config_file(config, tmp_path / "node.yaml")
        first = _held(store)
        runner = CliRunner()
        listed = runner.invoke(cli, ["jobs", "--state", "held", "--json", "--config", str(path)])
        (row,) = [json.loads(line) for line in listed.output.splitlines()]
        assert row["state"] == "held" and row["outcome"].startswith("held: low confidence (")
        out = runner.invoke(cli, ["release", str(first), "--config", str(path)])
        assert out.exit_code == 0, out.output
        assert out.output == (
            f"job {first} released: exporting; a running node sends its results\n"
        )
        again = runner.invoke(cli, ["discard", str(first), "--config", str(path)])
        assert again.exit_code == 1
        assert f"job {first} is exporting, only held jobs can be discarded" in again.output
        missing = runner.invoke(cli, ["release", "99", "--config", str(path)])
        assert missing.exit_code == 1 and "no job with id 99" in missing.output
        audit = (config.storage / "audit.log").read_text()
        assert '"event": "released"' in audit and '"by": "cli"' in audit
