"""YAML that explodes: alias bombs, self-referencing aliases and oversized files (issue 10 item 7).

A 338-byte "billion laughs" once kept ``rules check`` busy past 20 s and 500 MB. Every YAML the
node reads (rule files, rule test files, node.yaml and ``DICOM_NODE_*`` values) goes through the
bounded loader of :mod:`dicom_node.config`, which counts each use of an alias in full.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import (
    CONFIG_MAX_BYTES,
    YAML_MAX_VALUES,
    ConfigError,
    YAMLLimitError,
    bounded_yaml,
    load_config,
)
from dicom_node.routing import RulesWatcher, load_rules, run_cases
from dicom_node.routing.loader import MAX_FILE_BYTES, MAX_VALUES, check_rules, short
from tests.conftest import THYROID_RULE, make_config, write_rules
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
MAX_SECONDS = 10.0
"""A bound, not a speed target: before the fix the bomb ran past 20 s and 500 MB. Measured on a
quiet 2-core machine: 0.6 s for a fresh ``rules check`` process, start-up included, and 0.2-0.4 s
in-process for any file under the size limit; the margin is for a test machine running the suite
on every core (the memory bound below is the sharper check)."""
MAX_CHILD_RSS = 200 * 2**20
"""...and with at most this peak memory (the process imports pydicom: about 90 MB)."""


def laughs(levels: int = 9, width: int = 9, use: str = "rules: *{last}") -> str:
    """The classic bomb: ``a: &a [x,...]``, ``b: &b [*a,...]``, ... ``levels`` deep."""
    names = [chr(ord("a") + i) for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{','.join(['x'] * width)}]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * width)}]")
    lines.append(use.format(last=names[-1]))
    return "\n".join(lines) + "\n"


def stop_at(limit: int, levels: int = 9, width: int = 9, first_line: int = 1) -> str:
    """``"<line>: YAML alias '*<name>'"``: where the bounded loader stops reading :func:`laughs`.

    Counted as the loader counts: the top mapping, then per line its key and list, and each
    alias the full size of what it names.
    """
    total, size = 1, 0
    for level in range(levels):
        total += 2  # the key and the list
        for _ in range(width):
            total += size or 1
            if total > limit:
                alias = f"*{chr(ord('a') + level - 1)}"
                return f"{first_line + level}: YAML alias '{alias}'"
        size = 1 + width * (size or 1)
    raise AssertionError("the bomb fits the limit")


_PEAK_WRAPPER = """\
import runpy, sys
peak_file, module = sys.argv.pop(1), sys.argv.pop(1)
sys.argv[0] = module
code = 0
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
finally:
    with open("/proc/self/status") as status:
        peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    with open(peak_file, "w") as out:
        out.write(peak)
sys.exit(code)
"""


def run_measured(args: list[str], cwd: Path) -> tuple[int, str, float, int]:
    """Run ``python -m MODULE ...``; return exit code, output, wall seconds, own peak RSS (bytes).

    The peak is the child's ``VmHWM`` read by the child itself at exit: ``VmHWM`` belongs to the
    process image after ``exec``, whereas ``ru_maxrss`` (``wait4``, ``RUSAGE_SELF``) keeps the
    peak of the image it replaced, i.e. of the forked pytest worker (measured: 1.1 GB after the
    corpus tests).
    """
    assert args[1] == "-m", args
    out, peak = cwd / "out.txt", cwd / "peak.txt"
    start = time.monotonic()
    with out.open("wb") as sink:
        proc = subprocess.run(
            [args[0], "-c", _PEAK_WRAPPER, str(peak), *args[2:]],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            check=False,
        )
    elapsed = time.monotonic() - start
    return proc.returncode, out.read_text(), elapsed, int(peak.read_text()) * 1024


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site folder with a valid rule file and a bomb next to it."""
    rules = tmp_path / "rules"
    write_rules(rules, THYROID_RULE % {"instances": 1}, "thyroid.yaml")
    (tmp_path / "node.yaml").write_text("rules: rules\n")
    return tmp_path


class TestRulesCheckProcess:
    def test_billion_laughs_is_refused_fast_with_file_and_line(self, site: Path) -> None:
        bomb = laughs()
        assert len(bomb) < 400  # the size of the reported file
        (site / "rules" / "bomb.yaml").write_text(bomb)
        args = [sys.executable, "-m", "dicom_node.cli", "rules", "check", "rules"]
        code, output, elapsed, rss = run_measured(args + ["--config", "node.yaml"], site)
        assert code == 1, output
        expected = f"rules/bomb.yaml:{stop_at(MAX_VALUES)} expands the document to more than"
        assert f"{expected} {MAX_VALUES} values" in output, output
        assert len(output) < 1000, output
        assert elapsed < MAX_SECONDS, f"rules check took {elapsed:.2f} s"
        assert rss < MAX_CHILD_RSS, f"rules check peaked at {rss / 2**20:.0f} MB"

    def test_bomb_in_a_rule_test_file_is_refused(self, site: Path) -> None:
        tests = site / "rules" / "tests"
        tests.mkdir()
        (tests / "bomb.yaml").write_text(laughs(use="cases: *{last}"))
        args = [sys.executable, "-m", "dicom_node.cli", "rules", "test", "rules"]
        code, output, elapsed, rss = run_measured(args + ["--config", "node.yaml"], site)
        assert code != 0, output
        line, alias = stop_at(MAX_VALUES).split(": ", 1)
        assert f"rules/tests/bomb.yaml:{line}: cannot read test file: {alias}" in output, output
        assert elapsed < MAX_SECONDS and rss < MAX_CHILD_RSS, (elapsed, rss)


class TestLoader:
    def test_bomb_inside_a_when_block(self, tmp_path: Path) -> None:
        text = laughs(use="") + (
            "rules:\n  - name: a\n    model: x@y\n    send_to: [pacs]\n"
            "    when: {Modality: {in: *i}}\n"
        )
        (tmp_path / "a.yaml").write_text(text)
        start = time.monotonic()
        problems = check_rules(tmp_path)
        assert time.monotonic() - start < MAX_SECONDS
        assert [f"{p.line}: {p.message.split(' expands')[0]}" for p in problems] == [
            stop_at(MAX_VALUES)
        ]

    def test_alias_that_contains_itself(self, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text("rules:\n  - &r {name: a, when: {any: [*r]}}\n")
        [problem] = check_rules(tmp_path)
        assert problem.line == 2
        assert "alias '*r' is used inside its own anchor '&r'" in problem.message

    def test_long_text_repeated_by_aliases(self, tmp_path: Path) -> None:
        uses = ", ".join(["*s"] * 9)
        text = (
            f's: &s "{"x" * 50_000}"\nrules:\n  - name: a\n    model: x@y\n'
            f"    send_to: [pacs]\n    when: {{StudyDescription: {{in: [{uses}]}}}}\n"
        )
        (tmp_path / "a.yaml").write_text(text)
        [problem] = check_rules(tmp_path)
        assert problem.line == 6
        assert f"more than {MAX_FILE_BYTES} characters of text" in problem.message

    def test_fair_use_of_anchors_still_works(self, tmp_path: Path) -> None:
        text = (
            "rules:\n"
            "  - name: nm\n    when: &nm {Modality: NM}\n    model: x@y\n"
            "    send_to: &dest [pacs]\n"
            "  - name: nm-thyroid\n    priority: 10\n"
            "    when: {<<: *nm, BodyPartExamined: THYROID}\n    model: x@y\n    send_to: *dest\n"
        )
        (tmp_path / "a.yaml").write_text(text)
        ruleset = load_rules(tmp_path, destinations={"pacs"})
        assert [r.name for r in ruleset.rules] == ["nm-thyroid", "nm"]

    def test_file_of_plain_values_at_the_size_limit_loads_fast(self, tmp_path: Path) -> None:
        # no aliases: as many values as fit (far over MAX_VALUES), then just comments
        shapes = {
            "values": "rules: [" + ",".join(["0"] * (MAX_FILE_BYTES // 2 - 10)) + "]\n",
            "comments": "# c\n" * (MAX_FILE_BYTES // 4),
            "problems": "".join(f"k{i}: 1\n" for i in range(MAX_VALUES // 2 - 10)),
        }
        for name, text in shapes.items():
            assert len(text) <= MAX_FILE_BYTES
            (tmp_path / "a.yaml").write_text(text)
            start = time.monotonic()
            problems = check_rules(tmp_path)
            assert time.monotonic() - start < MAX_SECONDS, name
            assert len(problems) <= 51, name

    def test_messages_never_render_a_huge_value(self) -> None:
        data = bounded_yaml("rt").load(laughs(levels=3))
        big: Any = [data["c"]] * 1000
        for _ in range(20):  # 1000**20 elements if it were expanded
            big = [big] * 1000
        start = time.monotonic()
        text = short(big)
        assert time.monotonic() - start < 0.1
        assert len(text) <= 60 and text.endswith("...")
        assert short({"a": "x" * 10**7}) == "{'a': '" + "x" * 50 + "..."


class TestConfig:
    def test_bomb_in_node_yaml(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text(laughs(use="allowed_callers: *{last}"))
        start = time.monotonic()
        expected = re.escape(f"node.yaml:{stop_at(YAML_MAX_VALUES)} expands")
        with pytest.raises(ConfigError, match=expected) as info:
            load_config(path, environ={})
        assert time.monotonic() - start < MAX_SECONDS
        assert len(str(info.value)) < 300

    def test_bomb_in_an_environment_value(self) -> None:
        env = {"DICOM_NODE_ALLOWED_CALLERS": laughs(use="x: *{last}")}
        with pytest.raises(ConfigError, match="DICOM_NODE_ALLOWED_CALLERS: YAML alias"):
            load_config(None, environ=env)

    def test_oversized_config_file(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text("#" * (CONFIG_MAX_BYTES + 1))
        with pytest.raises(ConfigError, match=f"the limit is {CONFIG_MAX_BYTES}"):
            load_config(path, environ={})

    def test_limit_error_carries_the_line(self) -> None:
        with pytest.raises(YAMLLimitError) as info:
            bounded_yaml("safe", max_values=5).load("a: [1, 2]\nb: [3, 4]\n")
        assert info.value.line == 2


def test_rule_tests_loader_reports_bomb(tmp_path: Path) -> None:
    write_rules(tmp_path, THYROID_RULE % {"instances": 1})
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yaml").write_text(laughs(use="cases: *{last}"))
    results, problems = run_cases(load_rules(tmp_path), tmp_path)
    assert results == []
    line, alias = stop_at(MAX_VALUES).split(": ", 1)
    assert [(p.line, p.message.split(" expands")[0]) for p in problems] == [
        (int(line), f"cannot read test file: {alias}")
    ]


class TestRunningNode:
    def test_watcher_rejects_a_bomb_and_keeps_the_last_good_set(self, tmp_path: Path) -> None:
        from dicom_node.routing import ActiveRules

        rules = tmp_path / "rules"
        write_rules(rules, THYROID_RULE % {"instances": 1})
        active = ActiveRules()
        watcher = RulesWatcher(
            rules,
            lambda: load_rules(rules),
            on_change=active.set,
            on_error=active.set_error,
            interval=0.1,
        )
        watcher.start()
        try:
            good = active.current
            assert good is not None
            (rules / "bomb.yaml").write_text(laughs())
            start = time.monotonic()
            wait_until(lambda: active.error, timeout=MAX_SECONDS, what="the bomb to be rejected")
            assert time.monotonic() - start < MAX_SECONDS
            assert f"bomb.yaml:{stop_at(MAX_VALUES)} expands" in (active.error or "")
            assert active.current is good
        finally:
            watcher.stop()

    def test_node_rejects_the_reload_and_keeps_serving(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        rules = tmp_path / "rules"
        write_rules(rules, THYROID_RULE % {"instances": 1})
        node = node_factory(make_config(tmp_path, models_dir, rules, pacs_port=9))
        wait_until(lambda: node.rules.current is not None, what="rules loaded")
        good = node.rules.current
        (rules / "bomb.yaml").write_text(laughs())
        wait_until(lambda: node.rules.error, timeout=3.0, what="the bomb to be rejected")
        assert f"bomb.yaml:{stop_at(MAX_VALUES)} expands" in node.rules.error
        assert node.rules.current is good
        (rules / "bomb.yaml").unlink()
        wait_until(lambda: node.rules.error is None, timeout=3.0, what="the bomb to be gone")
        assert node.rules.current.version == good.version
